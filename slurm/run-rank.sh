#!/usr/bin/env bash
# One MPI rank: bind it to the GPU of its local rank, then run falcon-batch with the
# arguments given. Slurm (--gpus-per-node) exports the node's allocated GPUs in
# CUDA_VISIBLE_DEVICES; the local rank picks its own entry so ranks never share a device.
set -euo pipefail
local_rank="${SLURM_LOCALID:-${OMPI_COMM_WORLD_LOCAL_RANK:-0}}"
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
    if (( local_rank >= ${#gpus[@]} )); then
        echo "local rank $local_rank but only ${#gpus[@]} GPUs visible ($CUDA_VISIBLE_DEVICES)" >&2
        exit 1
    fi
    export CUDA_VISIBLE_DEVICES="${gpus[$local_rank]}"
else
    export CUDA_VISIBLE_DEVICES="$local_rank"
fi
exec "${FALCON_BATCH:-falcon-batch}" "$@"
