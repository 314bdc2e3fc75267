#!/usr/bin/env bash
# Fill .whl/ with what the lent GPU machine's image lacks (it has torch, numpy, transformers; no deepspeed,
# pydantic or hjson, and no network): DeepSpeed built here as a pure-Python wheel (DS_BUILD_OPS=0, its ops
# JIT-build there) and its dependencies as CPython 3.12 manylinux wheels, at the versions requirements.txt pins.
# Then carry them: run(carry=[".whl"], command="bash benchmarks/on_gpu.sh SCRIPT ...").
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i -E "^$1==" requirements.txt | head -1 || true; }
PIP=${PIP:-.venv/bin/pip}
mkdir -p .whl
ver() { $PIP show "$1" 2>/dev/null | sed -n 's/^Version: //p' || true; }
pkgs=()
for p in pydantic hjson psutil nvidia-ml-py; do pkgs+=("$(pin $p)"); done
# not pinned in requirements.txt: the versions the local install resolved
for p in pydantic_core annotated-types typing-inspection typing_extensions einops msgpack ninja py-cpuinfo tabulate; do
  v=$(ver "$p"); if [ -n "$v" ]; then pkgs+=("$p==$v"); fi
done
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl "${pkgs[@]}"
DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w .whl "$(pin deepspeed)"
ls .whl
