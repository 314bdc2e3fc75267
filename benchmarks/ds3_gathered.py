"""What DeepSpeed ZeRO-3 keeps gathered at the loss over several ranks, watched on CPU processes.

memory._ds3_states counts the parameters gathered at the loss as min(partitioned, stage3_max_live_parameters):
from the second step on, the coordinator's prefetch (made at every module's fetch, containers included) runs
ahead of the forward until max_live elements are gathered, and marks whatever is still gathered when it reaches
the backward's entries as reused. This script checks that claim against DeepSpeed itself, on a scale a CPU runs:
2 ranks over gloo (torchrun), shardlab's gpt or llama of 12-20 narrow layers (one case with activation
checkpointing, as the runner applies it), the limits scaled down with it.
For each case it prints the elements gathered (not NOT_AVAILABLE, persistent ones left out) at the end of each
step's forward next to the estimator's figure. Step 0 records the trace, so nothing is kept there.

    .venv/bin/python benchmarks/ds3_gathered.py            # the cases below, ~10 s each on 2 cores
    .venv/bin/python benchmarks/ds3_gathered.py --volumes  # the all-gathers a step saves (comm.py), against
                                                           # basis.ds3_never_released
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SHAPE = {"layers": 12, "hidden": 64, "heads": 4, "vocab": 1000, "seq_len": 32}
ZERO = {"stage3_max_reuse_distance": 100_000, "stage3_prefetch_bucket_size": 5000,
        "stage3_param_persistence_threshold": 100, "stage3_max_live_parameters": 10**9}
CASES = [  # (shape changes, zero_optimization changes[, activation checkpointing])
    ({}, {}),
    ({}, {"stage3_max_live_parameters": 300_000}, True),
    ({}, {"stage3_max_live_parameters": 300_000}),
    ({}, {"stage3_max_reuse_distance": 1_000_000}),
    ({}, {"stage3_max_live_parameters": 300_000, "stage3_max_reuse_distance": 1_000_000}),
    ({}, {"stage3_max_live_parameters": 300_000, "stage3_prefetch_bucket_size": 50_000}),
    ({"layers": 20}, {"stage3_max_live_parameters": 500_000}),
    ({"family": "llama", "kv_heads": 2, "ffn_hidden": 160}, {"stage3_max_live_parameters": 200_000}),
    # a head (vocab x hidden) ten blocks large, under and over max_live: its gather passes the limit by itself
    ({"vocab": 8000}, {"stage3_max_live_parameters": 700_000}),
    ({"vocab": 8000}, {"stage3_max_live_parameters": 400_000}),
]
STEPS = 3


def worker(case: dict, out: str) -> None:
    """One rank (under torchrun): train STEPS steps, rank 0 writes the gathered elements per step."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from shardlab.models import shape_from_dict
    from shardlab.run.gpt import build_model

    dist.init_process_group("gloo")
    spec = shape_from_dict(case["shape"])
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 1 << 30,
           "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
           "zero_optimization": {"stage": 3, **case["zero"]}}
    model = build_model(spec)
    if case.get("ac"):  # as the runner does it (frameworks/deepspeed.py apply)
        from shardlab.frameworks.base import block_classes, set_activation_checkpointing

        set_activation_checkpointing(model, block_classes(model, ("Block",)), True)
    engine, *_ = deepspeed.initialize(model=model, config=cfg, dist_init_required=False)
    # elements all-gathered (NOT_AVAILABLE when asked for), in forward and in backward: the coordinator's own call
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    volume, phase = {"forward": 0, "backward": 0}, ["forward"]
    own = Coordinator._PartitionedParameterCoordinator__all_gather_params_

    def counted(self, params, forward, quantize=False):
        volume[phase[0]] += sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE)
        return own(self, params, forward, quantize)

    Coordinator._PartitionedParameterCoordinator__all_gather_params_ = counted
    gathered, volumes = [], []
    for _ in range(STEPS):
        x = torch.randint(0, spec.vocab, (1, spec.seq_len))
        volume.update(forward=0, backward=0)
        phase[0] = "forward"
        logits = engine(x)
        gathered.append(sum(p.ds_numel for p in engine.module.parameters()
                            if p.ds_status != ZeroParamStatus.NOT_AVAILABLE and not p.ds_persist))
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), x.view(-1))
        phase[0] = "backward"
        engine.backward(loss)
        volumes.append(dict(volume))
        engine.step()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"gathered": gathered, "volumes": volumes}))
    # the engine torn down while the process group exists, as the runner's Worker.finish does: left to the
    # interpreter's exit it aborted 5 of 40 runs here ("terminate called without an active exception")
    import gc

    del engine, logits, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def measured(shape: dict, zero: dict, ac: bool = False, timeout_s: float = 240) -> list[int]:
    """Elements gathered at the end of each step's forward, DeepSpeed ZeRO-3 on 2 CPU ranks (ac: with activation
    checkpointing)."""
    return _run(shape, zero, ac, timeout_s)["gathered"]


def _run(shape: dict, zero: dict, ac: bool = False, timeout_s: float = 240) -> dict:
    """The worker's record: {"gathered": per step, "volumes": per step {"forward", "backward"} elements all-gathered}."""
    from shardlab.estimate.collbench import run_workers

    case = {"shape": {**SHAPE, **shape}, "zero": {**ZERO, **zero}, "ac": ac}
    return run_workers([__file__, "--worker", json.dumps(case)], 2, "DeepSpeed ZeRO-3", timeout_s,
                       env={"DS_ACCELERATOR": "cpu"}, tail=1500)


def predicted(shape: dict, zero: dict) -> tuple[int, int]:
    """(the estimator's gathered elements at the loss, the largest parameter) for the same model and limits."""
    import importlib
    from unittest import mock

    from shardlab.estimate import basis
    from shardlab.models import shape_from_dict
    from shardlab.plan import plan_from_dict

    z = {**ZERO, **zero}
    plan = plan_from_dict({"framework": "deepspeed", "sharding": "zero3", "precision": "bf16", "topology": {"gpus_per_node": 2},
                           "buckets": {"param_persistence_threshold": z["stage3_param_persistence_threshold"],
                                       "prefetch_bucket_size": z["stage3_prefetch_bucket_size"]}}, check=False)
    s = basis.resolve(plan, shape_from_dict({**SHAPE, **shape}))
    memory = importlib.import_module("shardlab.estimate.memory")  # (the package's `memory` is the function)
    with mock.patch.object(basis, "DS_MAX_LIVE", z["stage3_max_live_parameters"]), \
            mock.patch.object(basis, "DS_MAX_REUSE", z["stage3_max_reuse_distance"]):
        gathered = memory._ds3_states(s)[4]
    sh = s.shapes
    return gathered // s.P, max(a * b for a, b in sh.embed + sh.block + sh.head)


VOLUME_CASES = [  # (shape changes, zero_optimization changes): a model under max_live at two prefetch rates, two over it
    ({}, {}),
    ({}, {"stage3_prefetch_bucket_size": 50_000}),
    ({}, {"stage3_max_live_parameters": 300_000}),
    ({"layers": 20}, {"stage3_max_live_parameters": 500_000}),
]


def never_released(shape: dict, zero: dict) -> tuple[int, int, int]:
    """(measured, estimated, partitioned) elements gathered in forward and kept to their backward in the last step:
    measured as 2 x partitioned - the elements the step all-gathered; estimated by basis.ds3_never_released."""
    from unittest import mock

    from shardlab.estimate import basis
    from shardlab.models import shape_from_dict
    from shardlab.plan import plan_from_dict

    z = {**ZERO, **zero}
    volume = _run(shape, zero)["volumes"][-1]
    plan = plan_from_dict({"framework": "deepspeed", "sharding": "zero3", "precision": "bf16", "topology": {"gpus_per_node": 2},
                           "buckets": {"param_persistence_threshold": z["stage3_param_persistence_threshold"],
                                       "prefetch_bucket_size": z["stage3_prefetch_bucket_size"]}}, check=False)
    s = basis.resolve(plan, shape_from_dict({**SHAPE, **shape}))
    partitioned = s.spec.params - basis.persistent_numel(s)
    with mock.patch.object(basis, "DS_MAX_LIVE", z["stage3_max_live_parameters"]), \
            mock.patch.object(basis, "DS_MAX_REUSE", z["stage3_max_reuse_distance"]):
        estimated = basis.ds3_never_released(s)
    return 2 * partitioned - volume["forward"] - volume["backward"], estimated, partitioned


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--volumes", action="store_true", help="the elements never released between forward and backward instead")
    a = ap.parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker), a.out)
        return 0
    if a.volumes:
        for shape, zero in VOLUME_CASES:
            got, want, part = never_released(shape, zero)
            print(f"shape {shape or 'base'} zero {zero or 'base'}: kept from forward to backward {got:,} of {part:,} "
                  f"partitioned, estimator {want:,} ({(want - got) / part:+.1%} of the model)", flush=True)
        return 0
    outside = 0
    for shape, zero, *ac in CASES:
        got = measured(shape, zero, bool(ac and ac[0]))
        want, largest = predicted(shape, zero)
        outside += abs(got[-1] - want) > largest
        print(f"shape {shape or 'base'} zero {zero or 'base'}{' checkpointed' if ac else ''}: gathered per step {got}, estimator {want:,} "
              f"(off by {got[-1] - want:+,}; largest parameter {largest:,})", flush=True)
    print(f"{len(CASES) - outside} of {len(CASES)} cases within one parameter of the estimator")
    return 0


if __name__ == "__main__":
    sys.exit(main())
