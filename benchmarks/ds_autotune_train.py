"""DeepSpeed's Autotuner beside `shardlab tune` (issue 20): the config it starts from and the user script it launches.

The Autotuner (deepspeed/autotuning, DeepSpeed 0.19.8) is a mode of the `deepspeed` launcher: it runs
one profiling launch (ZeRO-3, micro-batch 1, stopped after the first forward: parameter count and
activation memory), then, per ZeRO stage it believes fits, one launch per micro-batch size it tries,
each its own `deepspeed` process that trains `end_profile_step + 1` steps and writes the engine's
throughput (samples/s from its forward/backward/step timers). It hands the config to the user script as
base64 in place of the `--deepspeed_config` path. With the micro-batch sizes given as a list and
"fast" mode (its default: micro-batch and stage only), the accumulation keeps
max(micro-batch) x gradient_accumulation_steps sequences per GPU: a fixed global batch, as
benchmarks/tune_gpu.py's cases hold. So gpt125's space (global batch 16, micro-batch 4/8/16) over
ZeRO 0-3 is 1 + 4 x 3 = 13 launches.

    # write the starting config from shardlab's own DeepSpeed export (bf16, AdamW, clipping as shardlab runs it)
    python benchmarks/ds_autotune_train.py --write-config /tmp/at/ds.json --model gpt-125m --micro-batches 4,8,16 --stages 0,1,2,3
    # on the GPU machine, from /tmp/at (the Autotuner writes autotuning_results/ and autotuning_exps/ in the cwd):
    deepspeed --autotuning tune --num_gpus 1 --master_port 29700 $REPO/benchmarks/ds_autotune_train.py \\
        --model gpt-125m --steps 20 --deepspeed_config ds.json
    # -> autotuning_results/ds_config_optimal.json (its pick) and each launch's metrics.json / stderr.log

The script trains shardlab's GPT (run/gpt.py, the model shardlab's runs train) on random tokens; run
alone (no autotuning block) it trains `--steps` optimizer steps and prints tokens/s.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_config(path: Path, model: str, micro_batches: list[int], stages: list[int], device: str = "cuda") -> dict:
    """The DeepSpeed config shardlab's runs hand to deepspeed.initialize (frameworks/deepspeed.py), turned
    into an Autotuner starting point."""
    from shardlab import Plan
    from shardlab.frameworks.deepspeed import ds_config

    cfg = ds_config(Plan(framework="deepspeed", sharding="zero2", micro_batch_size=max(micro_batches)), device)
    cfg["train_micro_batch_size_per_gpu"] = sorted(micro_batches)  # a list: the sizes it tries
    cfg["gradient_accumulation_steps"] = 1  # with the largest size: the global batch per GPU it keeps
    cfg["zero_optimization"] = {"stage": stages if len(stages) > 1 else stages[0]}
    cfg["autotuning"] = {"enabled": True, "fast": True, "metric": "throughput", "start_profile_step": 3,
                         "end_profile_step": 5, "arg_mappings": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return cfg


def read_config(text: str) -> dict:
    """A config path, or the base64 the Autotuner passes in its place."""
    if os.path.isfile(text):
        return json.loads(Path(text).read_text())
    return json.loads(base64.urlsafe_b64decode(text).decode())


def train(model: str, config: dict, steps: int) -> None:
    import deepspeed
    import torch

    from shardlab.models import resolve_model
    from shardlab.run.gpt import build_model, loss_fn

    spec = resolve_model(model)
    deepspeed.init_distributed()
    net = build_model(spec, seed=0, device="cpu")
    engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=config)
    mb, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    g = torch.Generator().manual_seed(engine.global_rank)
    t0 = None
    for step in range(steps):  # with an autotuning block the engine exits by itself after end_profile_step
        if step == 2:
            t0 = time.perf_counter()
        for _ in range(gas):
            tokens = torch.randint(0, spec.vocab, (mb, spec.seq_len + 1), generator=g).to(engine.device)
            loss = loss_fn(engine(tokens[:, :-1]), tokens[:, 1:])
            engine.backward(loss)
            engine.step()
    if t0 is not None and engine.global_rank == 0:
        dt = (time.perf_counter() - t0) / (steps - 2)
        print(f"{model}: {mb * gas * spec.seq_len / dt:,.0f} tokens/s per GPU ({dt * 1e3:.1f} ms per step)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt-125m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--deepspeed_config", default=None, help="a path, or base64 (as the Autotuner passes it)")
    ap.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    ap.add_argument("--write-config", type=Path, default=None)
    ap.add_argument("--micro-batches", default="4,8,16")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--device", default="cuda", help="the device the written config is for (cpu: torch's AdamW)")
    a = ap.parse_args()
    if a.write_config:
        write_config(a.write_config, a.model, [int(x) for x in a.micro_batches.split(",")], [int(x) for x in a.stages.split(",")], a.device)
        print(f"wrote {a.write_config}")
        return 0
    train(a.model, read_config(a.deepspeed_config), a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
