"""Fingerprints of what FSDP1 / FSDP2 really built, read from the framework's own objects.

A fingerprint is plain data: the wrapped units (module paths), each unit's sharding / reshard flag,
mixed-precision dtypes, offload policy, prefetch settings, mesh, use_orig_params; which modules are
compiled or recompute their activations; the optimizer's class, hyper-parameters and parameter
count; the gradient scaler's class. The same function reads the runner's objects and the exported
script's, so a difference is a difference in what the two built, never in how they were described.
"""

from __future__ import annotations

import functools

_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def _clean(path: str) -> str:
    for p in _PREFIXES:
        path = path.replace(p, "")
    return path.removesuffix("_fsdp_wrapped_module").rstrip(".")


def _dtype(d) -> str | None:
    return None if d is None else str(d).removeprefix("torch.")


def _modules(module) -> dict:
    import torch.utils.checkpoint as ckpt

    root = getattr(module, "_orig_mod", module)
    out = {"compiled_root": root is not module, "compiled": [], "checkpointed": []}
    for name, m in root.named_modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            out["compiled"].append(_clean(name))
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, functools.partial) and fwd.func is ckpt.checkpoint:
            out["checkpointed"].append(_clean(name))
    return out


def fsdp1_units(module) -> list[dict]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = getattr(module, "_orig_mod", module)
    units = []
    for name, m in root.named_modules():
        if not isinstance(m, FSDP):
            continue
        mp, mesh = m.mixed_precision, getattr(m, "_device_mesh", None)
        units.append({
            "path": _clean(name), "strategy": m.sharding_strategy.name,
            "dtypes": (_dtype(mp.param_dtype), _dtype(mp.reduce_dtype), _dtype(mp.buffer_dtype)),
            "offload_params": m.cpu_offload.offload_params,
            "backward_prefetch": None if m.backward_prefetch is None else m.backward_prefetch.name,
            "forward_prefetch": m.forward_prefetch, "limit_all_gathers": m.limit_all_gathers,
            "use_orig_params": m._use_orig_params, "mesh": None if mesh is None else (tuple(mesh.shape), mesh.mesh_dim_names),
            "numel": 0 if m._flat_param is None else int(m._flat_param._unpadded_unsharded_size.numel()),
        })
    return units


def fsdp2_units(module) -> list[dict]:
    from torch.distributed.fsdp import FSDPModule

    root = getattr(module, "_orig_mod", module)
    paths = {id(m): _clean(n) for n, m in root.named_modules()}
    units = []
    for name, m in root.named_modules():
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        pg = state._fsdp_param_group
        mp, off, mesh = pg.mp_policy, pg.offload_policy, pg.mesh_info.mesh
        units.append({
            "path": _clean(name), "reshard_after_forward": pg.post_forward_mesh_info is not None,
            "dtypes": (_dtype(mp.param_dtype), _dtype(mp.reduce_dtype)),
            "offload": (type(off).__name__, getattr(off, "pin_memory", None)),
            "mesh": (tuple(mesh.shape), mesh.mesh_dim_names),
            "numel": sum(p._orig_size.numel() for p in pg.fsdp_params),
            "forward_prefetch": [paths[id(s._modules[0])] for s in state._states_to_forward_prefetch],
        })
    return units


def optimizer(opt) -> dict:
    groups = [{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]
    return {"class": type(opt).__name__, "groups": groups,
            "numel": sum(p.numel() for g in opt.param_groups for p in g["params"])}


def fingerprint(framework: str, module, opt, scaler) -> dict:
    units = fsdp1_units(module) if framework == "fsdp1" else fsdp2_units(module)
    return {"units": units, **_modules(module), "optimizer": optimizer(opt),
            "scaler": None if scaler is None else type(scaler).__name__}
