"""The GPU table: peak dense TFLOPS, memory and link bandwidths that the estimators divide by.

Figures are vendor data sheets' dense (no sparsity) tensor-core peaks and the memory that
`nvidia-smi` reports as total. Bandwidths are per GPU, one direction, in bytes/s, as a collective
sees them: `intra_node` is NVLink where the part has it (else PCIe), `inter_node` assumes one NIC
per GPU of the generation the part is usually deployed with (HDR 200 Gb/s for A100, NDR 400 Gb/s
for H100/H200, Ethernet for the PCIe cards). They are planning figures: override any of them with
`register_gpu` or by passing a `GPU` / dict to `estimate(..., gpu=...)`. `hbm_bw` is the data sheet's
device-memory bandwidth and `sms` the streaming-multiprocessor count; the step-time model takes
achievable fractions of these peaks from a calibration (estimate/calibrate.py) or its defaults.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields, replace

from shardlab.plan import bad_input
from shardlab.units import GB, KIB, MIB


@dataclass(frozen=True)
class GPU:
    """One accelerator kind. TFLOPS are dense peaks (10^12 FLOP/s); bandwidths in bytes/s."""

    name: str
    bf16_tflops: float  # dense bf16/fp16 tensor-core peak (also used for fp16)
    fp32_tflops: float  # plain fp32 (no TF32): torch's default for matmuls
    memory_bytes: int
    intra_node_bw: float
    inter_node_bw: float
    # host <-> device copies (offload), pinned, one direction. H100/H200 SXM: PCIe Gen5 x16, 64 GB/s each way
    # (the data sheets' 128 GB/s counts both); the table's 50 GB/s assumes ~80% of it, not measured on the lent hosts
    pcie_bw: float = 25 * GB
    hbm_bw: float = 2000 * GB  # device memory bandwidth, data sheet (memory-bound kernels, the optimizer step)
    sms: int = 108  # streaming multiprocessors (wave quantization of matmul tiles)
    # one cuBLAS workspace, which torch allocates through the caching allocator per (handle, stream):
    # its default (CUBLAS_WORKSPACE_CONFIG unset, aten CublasHandlePool) is ":4096:8" = 32 MiB on
    # sm90 (Hopper), ":4096:2:16:8" = 8 MiB + 128 KiB on the others
    cublas_workspace: int = 8 * MIB + 128 * KIB
    # the caching allocator's cap (torch.cuda.set_per_process_memory_fraction x memory) where a process
    # sets one; None: the memory less the CUDA context (allocator.fit decides what fits against it)
    allocator_limit_bytes: int | None = None

    def peak_tflops(self, precision: str) -> float:
        return self.fp32_tflops if precision == "fp32" else self.bf16_tflops

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("a100-40gb", 312.0, 19.5, 40960 * MIB, 300 * GB, 25 * GB, 25 * GB, 1555 * GB, 108),
        GPU("a100-80gb", 312.0, 19.5, 81920 * MIB, 300 * GB, 25 * GB, 25 * GB, 2039 * GB, 108),
        GPU("h100-80gb", 989.0, 67.0, 81559 * MIB, 450 * GB, 50 * GB, 50 * GB, 3350 * GB, 132, 32 * MIB),  # SXM5, NVLink 4
        GPU("h100-pcie", 756.0, 51.0, 81559 * MIB, 64 * GB, 50 * GB, 50 * GB, 2000 * GB, 114, 32 * MIB),  # PCIe Gen5, no NVLink bridge
        GPU("h200", 989.0, 67.0, 143771 * MIB, 450 * GB, 50 * GB, 50 * GB, 4800 * GB, 132, 32 * MIB),
        GPU("l4", 121.0, 30.3, 23034 * MIB, 32 * GB, 6.25 * GB, 25 * GB, 300 * GB, 58),
        GPU("a10g", 70.0, 31.2, 23028 * MIB, 32 * GB, 6.25 * GB, 25 * GB, 600 * GB, 80),
        GPU("rtx4090", 165.0, 82.6, 24564 * MIB, 32 * GB, 3.125 * GB, 25 * GB, 1008 * GB, 128),  # bf16 with fp32 accumulate
    )
}

DEFAULT_GPU = "h100-80gb"  # the GPU an estimate is for when none is named (CLI, widgets, compare)
_ALIASES = {"h100": "h100-80gb", "h100-sxm": "h100-80gb", "a100": "a100-80gb", "4090": "rtx4090", "h200-141gb": "h200"}


def register_gpu(name: str, **values) -> GPU:
    """Add (or replace) a GPU in the table; unspecified fields copy h100-80gb's, say so explicitly."""
    base = GPUS.get(name, GPUS[DEFAULT_GPU])
    known = {f.name for f in fields(GPU)} - {"name"}
    unknown = set(values) - known
    if unknown:
        raise bad_input("gpu", f"unknown GPU fields {sorted(unknown)}; valid ones are {sorted(known)}.")
    g = replace(base, name=name, **values)
    GPUS[name] = g
    return g


def get_gpu(gpu: str | GPU | dict) -> GPU:
    """A GPU by table name, a GPU object, or a dict of GPU fields (name required)."""
    if isinstance(gpu, GPU):
        return gpu
    if isinstance(gpu, dict):
        d = dict(gpu)
        name = d.pop("name", "custom")
        known = {f.name for f in fields(GPU)} - {"name"}
        missing = known - set(d) - {"pcie_bw", "hbm_bw", "sms", "cublas_workspace", "allocator_limit_bytes"}
        if missing:
            raise bad_input("gpu", f"a custom GPU needs {sorted(missing)} as well; got {sorted(d)}. Give bf16_tflops, fp32_tflops, memory_bytes, intra_node_bw and inter_node_bw (bytes/s).")
        unknown = set(d) - known
        if unknown:
            raise bad_input("gpu", f"unknown GPU fields {sorted(unknown)}; valid ones are {sorted(known)}.")
        return GPU(name=name, **d)
    key = str(gpu).strip().lower()
    key = _ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    near = difflib.get_close_matches(key, list(GPUS) + list(_ALIASES), n=1, cutoff=0.5)
    hint = f" Did you mean '{_ALIASES.get(near[0], near[0])}'?" if near else ""
    raise bad_input("--gpu", f"--gpu={gpu!r} is not in the GPU table.{hint} Known GPUs: {', '.join(GPUS)} (or register your own with shardlab.estimate.gpus.register_gpu).")


def capped(gpu: str | GPU | dict, limit_bytes: int) -> GPU:
    """`gpu` as a process sees it after torch.cuda.set_per_process_memory_fraction(limit / memory):
    the allocator may reserve `limit_bytes`; the CUDA context lives outside that cap."""
    g = get_gpu(gpu)
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or not 0 < limit_bytes <= g.memory_bytes:
        raise bad_input("allocator_limit_bytes", f"allocator_limit_bytes={limit_bytes!r} must be a whole number of bytes between 1 and "
                        f"{g.name}'s {g.memory_bytes:,}. Use e.g. capped('h200', 18 * 2**30).")
    return replace(g, name=f"{g.name}-capped-{limit_bytes / 2**30:g}gib", allocator_limit_bytes=limit_bytes)


# torch.cuda.get_device_name() patterns -> shardlab's GPU table (shardlab/estimate/gpus.py); first match wins
_GPU_NAMES = ((r"\bh200\b", "h200"), (r"\bh100\b.*\bpcie\b", "h100-pcie"), (r"\bh100\b", "h100-80gb"),
              (r"\ba100\b.*\b40gb\b", "a100-40gb"), (r"\ba100\b", "a100-80gb"), (r"\ba10g\b", "a10g"),
              (r"\brtx 4090\b", "rtx4090"), (r"\bl4\b", "l4"))


def gpu_table_name(device_name: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb'; None when the table has no such GPU."""
    import re

    low = device_name.lower().replace("-", " ")
    for pattern, name in _GPU_NAMES:
        if re.search(pattern, low):
            return name
    return None


def peak_tflops(device_name: str, precision: str) -> float | None:
    """This GPU's dense peak TFLOPS for `precision` from the table (by its CUDA name), None if unknown."""
    name = gpu_table_name(device_name)
    return None if name is None else get_gpu(name).peak_tflops(precision)
