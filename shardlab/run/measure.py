"""What a rank really holds and sends: model-state bytes, collective traffic, memory.

(a) `state_bytes(model, optimizer, framework)` reads the framework's own sharded tensors: FSDP1 flat
    parameters (their local shard), FSDP2 DTensor local shards, DeepSpeed's partitioned 16-bit and
    fp32 groups and the inner optimizer's state. Storage is de-duplicated, so views into one flat
    buffer count once. DeepSpeed's fp32 master copies count under `optimizer` (as the estimator does);
    FSDP trains its (sharded) fp32 parameters directly, so they count under `params`.
(b) `CommCounter` wraps the torch.distributed collectives the frameworks call (FSDP1 and FSDP2 call
    all_gather_single / reduce_scatter_single / all_reduce; DeepSpeed binds all_gather_into_tensor /
    reduce_scatter_tensor at init; DTensor uses the functional collectives). Bytes per call: the output
    of an all-gather, the input of a reduce-scatter, the tensor of an all-reduce / broadcast / reduce,
    the input of an all-to-all. Only the outermost wrapped call counts (all_gather_into_tensor calls
    all_gather_single inside torch). Keys are collective families: all_gather, reduce_scatter,
    all_reduce, broadcast, reduce, all_to_all, gather, scatter.
(c) `memory()`: CUDA allocated / reserved (+ peaks since the last reset) and the process RSS.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import defaultdict
from typing import Any, Callable

import torch

# torch.distributed function -> (family, how to find the counted tensor(s) in its arguments)
_ARG = {  # name: (family, positional index, keyword name)
    "all_gather_single": ("all_gather", 0, "output_tensor"),
    "all_gather_into_tensor": ("all_gather", 0, "output_tensor"),
    "_all_gather_base": ("all_gather", 0, "output_tensor"),
    "all_gather": ("all_gather", 0, "tensor_list"),
    "all_gather_coalesced": ("all_gather", 0, "output_tensor_lists"),
    "reduce_scatter_single": ("reduce_scatter", 1, "input"),
    "reduce_scatter_tensor": ("reduce_scatter", 1, "input"),
    "_reduce_scatter_base": ("reduce_scatter", 1, "input"),
    "reduce_scatter": ("reduce_scatter", 1, "input_list"),
    "all_reduce": ("all_reduce", 0, "tensor"),
    "all_reduce_coalesced": ("all_reduce", 0, "tensors"),
    "broadcast": ("broadcast", 0, "tensor"),
    "reduce": ("reduce", 0, "tensor"),
    "all_to_all_single": ("all_to_all", 1, "input"),
    "all_to_all": ("all_to_all", 1, "input_tensor_list"),
    "gather": ("gather", 0, "tensor"),
    "scatter": ("scatter", 0, "tensor"),
}
# DTensor's functional collectives (used e.g. by FSDP2's grad-norm clipping and full_tensor()).
_FUNCOL = {
    "all_gather_tensor": ("all_gather", 0, "self", True),
    "reduce_scatter_tensor": ("reduce_scatter", 0, "self", False),
    "all_reduce": ("all_reduce", 0, "self", False),
}


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class CommCounter:
    """Counts bytes and calls per collective family while installed; `pause()` hides our own traffic."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.count: dict[str, int] = defaultdict(int)
        self._local = threading.local()
        self._saved: list[tuple[Any, str, Callable]] = []

    # -- installing ---------------------------------------------------------------------------
    def install(self) -> "CommCounter":
        """Wrap the collectives in torch.distributed and its c10d module (call before the frameworks start)."""
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for mod in (dist, c10d):
            for name, (family, idx, kw) in _ARG.items():
                fn = getattr(mod, name, None)
                if fn is not None and not getattr(fn, "_shardlab_wrapped", False):
                    self._patch(mod, name, self._wrap(fn, family, idx, kw, world_scale=False))
        try:
            import torch.distributed._functional_collectives as funcol
        except ImportError:  # pragma: no cover - old torch
            return self
        for name, (family, idx, kw, scale) in _FUNCOL.items():
            fn = getattr(funcol, name, None)
            if fn is not None and not getattr(fn, "_shardlab_wrapped", False):
                self._patch(funcol, name, self._wrap(fn, family, idx, kw, world_scale=scale))
        return self

    def uninstall(self) -> None:
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()

    def _patch(self, mod: Any, name: str, wrapper: Callable) -> None:
        self._saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, wrapper)

    def _wrap(self, fn: Callable, family: str, idx: int, kw: str, world_scale: bool) -> Callable:
        counter = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            local = counter._local
            depth = getattr(local, "depth", 0)
            if depth == 0 and not getattr(local, "paused", False):
                arg = args[idx] if len(args) > idx else kwargs.get(kw)
                n = _nbytes(arg)
                if world_scale:  # functional all-gather: input shard x group size = output
                    n *= _group_size(args[2] if len(args) > 2 else kwargs.get("group"))
                counter.bytes[family] += n
                counter.count[family] += 1
            local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                local.depth = depth

        wrapper._shardlab_wrapped = True  # type: ignore[attr-defined]
        return wrapper

    # -- reading ------------------------------------------------------------------------------
    def reset(self) -> None:
        self.bytes.clear()
        self.count.clear()

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        """(bytes by family, calls by family) since the last reset."""
        return dict(self.bytes), dict(self.count)

    @contextlib.contextmanager
    def pause(self):
        """Collectives issued inside are not counted (the worker's own loss averaging, barriers...)."""
        prev = getattr(self._local, "paused", False)
        self._local.paused = True
        try:
            yield
        finally:
            self._local.paused = prev


def _group_size(group: Any) -> int:
    import torch.distributed as dist

    try:
        if isinstance(group, dist.ProcessGroup):
            return group.size()
        if hasattr(group, "size") and callable(group.size) and not isinstance(group, (list, tuple)):
            return int(group.size())  # a 1-D DeviceMesh
        if isinstance(group, (list, tuple)):
            return len(group)
    except Exception:
        pass
    return dist.get_world_size()


# ---------------------------------------------------------------------------------------------
# Model-state bytes


class _Tally:
    """Storages already counted for one kind of state, and how many of its bytes sit in CPU memory."""

    def __init__(self) -> None:
        self.seen: set = set()
        self.cpu = 0


def _storage_bytes(tensors, seen: _Tally) -> int:
    """Sum of distinct storages' sizes (views into one flat buffer count once)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = _local(t)
        if t.device.type == "meta":
            continue
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), t.device.type)
            size = st.nbytes()
        except (RuntimeError, NotImplementedError):
            key, size = (id(t), "?"), t.numel() * t.element_size()
        if size == 0 or key in seen.seen:
            continue
        seen.seen.add(key)
        total += size
        if t.device.type == "cpu":
            seen.cpu += size
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; any other tensor as is."""
    loc = getattr(t, "_local_tensor", None)
    return loc if isinstance(loc, torch.Tensor) else t


def _optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    out = []
    for state in getattr(optimizer, "state", {}).values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:  # skip scalar step counters
                out.append(v)
    return out


def state_bytes(model: torch.nn.Module, optimizer, framework: str) -> tuple[dict[str, int], dict[str, int]]:
    """({params, grads, optimizer} bytes this rank holds right now on any device, the same in CPU memory)."""
    tallies = {k: _Tally() for k in ("params", "grads", "optimizer")}
    if framework == "deepspeed":
        total = _deepspeed_state_bytes(model, optimizer, tallies)
    else:
        params = list(model.parameters())
        total = {
            "params": _storage_bytes(params, tallies["params"]),
            "grads": _storage_bytes([p.grad for p in params], tallies["grads"]),
            "optimizer": _storage_bytes(_optimizer_state_tensors(optimizer), tallies["optimizer"]),
        }
    return total, {k: t.cpu for k, t in tallies.items()}


def _deepspeed_state_bytes(engine, zero_opt, tallies: dict[str, _Tally]) -> dict[str, int]:
    """DeepSpeed: read the ZeRO optimizer's partitioned groups (stage3.py / stage_1_and_2.py)."""
    opt = getattr(engine, "optimizer", None) or zero_opt
    seen_p, seen_g, seen_o = tallies["params"], tallies["grads"], tallies["optimizer"]
    stage3 = hasattr(opt, "fp16_partitioned_groups_flat")
    if stage3:
        # ZeRO-3: each module parameter keeps only its partition (ds_tensor) in a flat 16-bit group.
        params = _storage_bytes([g for g in opt.fp16_partitioned_groups_flat if g is not None], seen_p)
        params += _storage_bytes([getattr(p, "ds_tensor", None) for p in engine.module.parameters()], seen_p)
        # with hpZ the secondary (node-local) partition is held too
        params += _storage_bytes([getattr(p, "ds_secondary_tensor", None) for p in engine.module.parameters()], seen_p)
        # parameters below stage3_param_persistence_threshold stay gathered (full) between steps
        params += _storage_bytes([p.data for p in engine.module.parameters() if p.data.numel() > 0], seen_p)
        grads = _stage3_grad_bytes(opt, seen_g)
        master = getattr(opt, "fp32_partitioned_groups_flat", [])
    elif hasattr(opt, "bit16_groups_flat"):
        # ZeRO-1/2: full 16-bit (or fp32) parameters, partitioned fp32 master + optimizer states.
        params = _storage_bytes(opt.bit16_groups_flat, seen_p)
        grads = _stage12_grad_bytes(opt, seen_g)
        master = getattr(opt, "single_partition_of_fp32_groups", [])
    else:
        # ZeRO disabled (plain data parallel inside DeepSpeed).
        ps = list(engine.module.parameters())
        params = _storage_bytes(ps, seen_p)
        grads = _storage_bytes([p.grad for p in ps], seen_g)
        master = []
    inner = getattr(opt, "optimizer", opt)
    optim = _storage_bytes(list(master), seen_o) + _storage_bytes(_optimizer_state_tensors(inner), seen_o)
    return {"params": params, "grads": grads, "optimizer": optim}


def _stage3_grad_bytes(opt, seen: _Tally) -> int:
    tensors = []
    flat = getattr(opt, "grad_partitions_flat_buffer", None)
    if flat is not None:
        tensors.append(flat)
    for g in getattr(opt, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", {}).values():
        tensors.append(g)
    for g in getattr(opt, "averaged_gradients", {}).values() if isinstance(getattr(opt, "averaged_gradients", None), dict) else []:
        tensors.extend(g if isinstance(g, list) else [g])
    return _storage_bytes(tensors, seen)


def _stage12_grad_bytes(opt, seen: _Tally) -> int:
    # the partition's gradients are copied into one buffer sized by the params it touches
    tensors = [getattr(opt, "grads_in_partition", None)]
    ag = getattr(opt, "averaged_gradients", {})
    for g in (ag.values() if isinstance(ag, dict) else ag):
        if g is not None:
            tensors.extend(g if isinstance(g, list) else [g])
    for g in getattr(opt, "single_partition_of_fp32_groups", []):
        if getattr(g, "grad", None) is not None:
            tensors.append(g.grad)
    # gradients of the local partition accumulate in the flat ipg bucket / per-param .grad for ZeRO-1
    for group in getattr(opt, "bit16_groups", []):
        for p in group:
            if p.grad is not None:
                tensors.append(p.grad)
    return _storage_bytes(tensors, seen)


# ---------------------------------------------------------------------------------------------
# Memory


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def memory(device: str) -> dict[str, int]:
    """Process RSS always; on CUDA also allocated / reserved now and their peaks since the last reset."""
    out = {"rss_bytes": rss_bytes()}
    if device == "cuda" and torch.cuda.is_available():
        out.update(
            allocated_bytes=torch.cuda.memory_allocated(),
            reserved_bytes=torch.cuda.memory_reserved(),
            peak_allocated_bytes=torch.cuda.max_memory_allocated(),
            peak_reserved_bytes=torch.cuda.max_memory_reserved(),
        )
    return out


def reset_peaks(device: str) -> None:
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def allocated(device: str) -> int | None:
    """Bytes allocated now (CUDA), None on CPU: the per-phase boundary figure."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return None
