#!/usr/bin/env bash
# Compiles every kernels/*.cu with NVIDIA's NVRTC exactly as the CUDA backend does at run
# time (tests/nvrtc_kernels.rs: common.cuh pasted in front, the same options, compute_90 and
# compute_80), then assembles the PTX with ptxas for sm_90/sm_80 with -v and fails on any
# register spill. No GPU, driver or nvcc install needed: NVRTC and ptxas come from NVIDIA's
# PyPI wheels in a venv of their own.
#
#   scripts/nvrtc-check.sh                 # venv at $CUDA_VENV (default /work/venv-cuda)
#   CUDA_VENV=/tmp/cu13 scripts/nvrtc-check.sh --install   # create it first (needs PyPI)
#
# Not part of `cargo test` by default: the test there skips without libnvrtc on the path,
# and CI cannot count on reaching PyPI.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CUDA_VENV:-/work/venv-cuda}
if [ "${1:-}" = --install ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "nvidia-cuda-nvrtc==13.*" "nvidia-cuda-nvcc==13.*"
fi
CU=$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -1)
if [ -z "$CU" ] || [ ! -f "$CU/lib/libnvrtc.so.13" ]; then
    echo "no CUDA 13 NVRTC wheel in $VENV: run $0 --install (or set CUDA_VENV)" >&2
    exit 2
fi
export LD_LIBRARY_PATH="$CU/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -x "$CU/bin/ptxas" ] && export FALCON_PTXAS="$CU/bin/ptxas"
cd "$ROOT"
cargo test --release --test nvrtc_kernels -- --nocapture
