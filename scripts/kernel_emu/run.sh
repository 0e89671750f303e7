#!/bin/sh
# Runs kernels/*.cu on the CPU (one std::thread per CUDA thread, barriers for
# __syncthreads and shuffles) against dense references. No GPU or nvcc needed: a check of
# the kernels' logic on machines without a GPU, not of NVRTC or performance.
set -e
here=$(dirname "$0"); k="$here/../../kernels"; tmp=${TMPDIR:-/tmp}/falcon-kernel-emu; mkdir -p "$tmp"
cat "$here/emu.h" "$k/common.cuh" "$k/attention.cu" "$here/drive_attn.cpp" > "$tmp/attn.cpp"
cat "$here/emu.h" "$k/common.cuh" "$k/norm.cu" "$k/softmax.cu" "$k/elementwise.cu" "$k/rope.cu" "$k/gather.cu" "$here/drive_misc.cpp" > "$tmp/misc.cpp"
for f in attn misc; do g++ -std=c++20 -O1 -fno-strict-aliasing -Wno-unknown-pragmas -pthread "$tmp/$f.cpp" -o "$tmp/$f"; "$tmp/$f"; done
