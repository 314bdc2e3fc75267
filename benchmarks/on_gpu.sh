#!/usr/bin/env bash
# GPU machine wrapper for the GPU benchmarks (gpu_validate.py, zero3_gap.py): install the carried
# wheels (deepspeed, pydantic, hjson...: `bash benchmarks/gpu_wheels.sh` puts them into .whl/),
# make shardlab importable, keep NVLink multicast off, print the versions, then run the script.
# Usage: bash benchmarks/on_gpu.sh SCRIPT.py [args]
set -euo pipefail
script=${1:?usage: on_gpu.sh SCRIPT.py [args]}; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} (the runner sanitises it for its workers)"
python3 -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, torch.cuda.get_device_name())'
python3 "$script" "$@"
