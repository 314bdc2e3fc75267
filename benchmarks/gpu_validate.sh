#!/usr/bin/env bash
# GPU machine wrapper for gpu_validate.py: install the carried wheels (deepspeed, pydantic, hjson...,
# built/downloaded into .whl/ as docs/benchmarks.md says), make shardlab importable, keep NVLink
# multicast off, then run the matrix. Usage: benchmarks/gpu_validate.sh OUTDIR [gpu_validate.py args]
set -euo pipefail
out=${1:?usage: gpu_validate.sh OUTDIR [args]}; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} (the runner sanitises it for its workers)"
python3 -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, torch.cuda.get_device_name())'
python3 benchmarks/gpu_validate.py --out "$out" "$@"
