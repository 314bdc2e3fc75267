"""The FSDP1 / FSDP2 / DeepSpeed ZeRO comparison tables, kept as data and returned as DataFrames.

Each row names its `source`. Where a row can be checked, `verified_by` says how and the table carries
the live outcome beside it: the installed framework's own API or the launcher's own argument parser
(tablecheck.py), the estimator's arithmetic for a published number (computed when the table is built,
never typed in), or real runs handed to `claims(runs=...)`. Separately, `shardlab_refuses` says
whether shardlab's validation refuses what a row says a framework cannot do.
Facts come from /work/shared/reference/fsdp-vs-zero-comparison.md and the frameworks' own docs and
docstrings (torch 2.13, DeepSpeed 0.19.8); the wording is ours.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from shardlab.estimate.gpus import DEFAULT_GPU
from shardlab.units import GB

ACCEL = "https://huggingface.co/docs/accelerate/en/concept_guides/fsdp_and_deepspeed"
FSDP1_DOC = "https://docs.pytorch.org/docs/stable/fsdp.html"
FSDP2_DOC = "https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html"
DS_CONFIG = "https://www.deepspeed.ai/docs/config-json/"
DS_ZERO = "https://www.deepspeed.ai/tutorials/zero/"
ZERO_PAPER = "https://arxiv.org/abs/1910.02054"
ZEROPP_PAPER = "https://arxiv.org/abs/2306.10209"
REF = "reference/fsdp-vs-zero-comparison.md"

FRAMEWORK_COLUMNS = ("fsdp1", "fsdp2", "deepspeed")

# check=("api", name): the installed framework's own API says what the row says (tablecheck.py).
# rule=(rule_id, plan dict): shardlab's validation refuses what the row says a framework cannot do
# (shown as shardlab_rule / shardlab_refuses: shardlab agreeing with the table, not evidence for it).
FEATURES: list[dict[str, Any]] = [
    dict(topic="sharding", fsdp1="sharding_strategy: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD",
         fsdp2="fully_shard(reshard_after_forward=True|False|int) on a 1-D mesh; 2-D mesh for HSDP",
         deepspeed="zero_optimization.stage 0-3; ZeRO++ zero_hpz_partition_size",
         note="FULL_SHARD = ZeRO-3, SHARD_GRAD_OP = ZeRO-2; ZeRO-1 (optimizer states only) has no FSDP form.",
         source=f"{ACCEL}; {FSDP2_DOC}", check=("api", "sharding"), rule=("zero1_is_deepspeed_only", {"framework": "fsdp2", "sharding": "zero1"})),
    dict(topic="offload", fsdp1="CPUOffload(offload_params=True): parameters, gradients and optimizer step go to CPU together",
         fsdp2="offload_policy=CPUOffloadPolicy(): the same all-or-nothing move to CPU",
         deepspeed="offload_optimizer and offload_param set separately, to cpu or nvme",
         note="Only DeepSpeed can offload just the optimizer, or offload to NVMe.",
         source=f"{ACCEL}; torch fsdp/_fully_shard/_fsdp_api.py CPUOffloadPolicy",
         check=("api", "offload"), rule=("fsdp_offload_all_or_nothing", {"framework": "fsdp2", "offload": {"optimizer": "cpu"}})),
    dict(topic="model loading", fsdp1="build on meta / rank 0 only, param_init_fn + sync_module_states=True (accelerate: fsdp_cpu_ram_efficient_loading)",
         fsdp2="build on the meta device, fully_shard, then to_empty() and initialise or load the shards",
         deepspeed="construct inside deepspeed.zero.Init() (accelerate: zero3_init_flag; automatic with transformers)",
         note="Both avoid a full fp32 copy of the model per rank while building it.",
         source=f"{ACCEL}; {FSDP2_DOC}",
         check=("api", "loading"), rule=("low_memory_init_needs_sync", {"framework": "fsdp1", "low_memory_init": True, "sync_module_states": False})),
    dict(topic="checkpointing", fsdp1="state_dict_type: SHARDED_STATE_DICT (fast) or FULL_STATE_DICT (gathered on rank 0)",
         fsdp2="DTensor state dicts through torch.distributed.checkpoint; full via StateDictOptions(full_state_dict=True)",
         deepspeed="engine.save_checkpoint (a shard per rank), zero_to_fp32.py to consolidate, 16-bit gather on save (ZeRO-3)",
         note="Consolidating on one rank is slow for large models: save sharded and convert offline.",
         source=f"{ACCEL}; torch distributed/checkpoint/state_dict.py",
         check=("api", "checkpointing"), rule=("full_16bit_is_deepspeed_zero3", {"framework": "fsdp1", "checkpoint": "full_16bit"})),
    dict(topic="prefetch", fsdp1="backward_prefetch=BACKWARD_PRE|BACKWARD_POST, forward_prefetch=True, limit_all_gathers",
         fsdp2="one unit ahead implicitly; explicit lists via set_modules_to_forward_prefetch / set_modules_to_backward_prefetch",
         deepspeed="automatic from the traced module order; sized by stage3_prefetch_bucket_size",
         note="FSDP exposes the schedule; DeepSpeed tunes it through bucket sizes.",
         source=f"{ACCEL}; {FSDP2_DOC}; {DS_CONFIG}",
         check=("api", "prefetch"), rule=("ignored_knobs", {"framework": "deepspeed", "forward_prefetch": True})),
    dict(topic="wrapping", fsdp1="auto_wrap_policy (transformer_auto_wrap_policy, size_based_auto_wrap_policy)",
         fsdp2="call fully_shard on each block, then on the root (bottom-up)",
         deepspeed="none: parameters are partitioned one by one, grouped into buckets for communication",
         note="The FSDP wrap unit sets what is all-gathered at once, hence the peak of gathered parameters.",
         source=f"{ACCEL}; {FSDP2_DOC}",
         check=("api", "wrapping"), rule=("ignored_knobs", {"framework": "deepspeed", "wrap": {"policy": "size"}})),
    dict(topic="torch.compile", fsdp1="needs use_orig_params=True (flat parameters otherwise hide the originals)",
         fsdp2="works as is: parameters stay per-tensor DTensors, no flat parameters",
         deepspeed="engine.compile() compiles the wrapped module",
         note="", source=f"{ACCEL}; torch fsdp/fully_sharded_data_parallel.py use_orig_params; deepspeed runtime/engine.py compile", check=None),
    dict(topic="gradient accumulation", fsdp1="no_sync() context on all but the last micro-batch (holds unsharded gradients: more memory)",
         fsdp2="set_requires_gradient_sync(False) on all but the last micro-batch",
         deepspeed="gradient_accumulation_steps in the config; engine.step() acts only on the boundary",
         note="DeepSpeed's no_sync() refuses ZeRO-2/3, which must reduce every micro-batch.",
         source=f"{ACCEL}; deepspeed runtime/engine.py no_sync",
         check=("api", "accumulation"), rule=("global_batch_consistent", {"global_batch_size": 3, "micro_batch_size": 1, "grad_accum_steps": 1})),
    dict(topic="mixed precision", fsdp1="MixedPrecision(param_dtype, reduce_dtype, buffer_dtype)",
         fsdp2="MixedPrecisionPolicy(param_dtype, reduce_dtype, output_dtype, cast_forward_inputs)",
         deepspeed="bf16.enabled / fp16.enabled (+ loss_scale), communication_data_type",
         note="See the precision table.", source=f"{ACCEL}; {FSDP2_DOC}; {DS_CONFIG}",
         check=("api", "mixed_precision"), rule=("fp16_fsdp2_needs_scaler", {"framework": "fsdp2", "precision": "fp16", "loss_scaling": "none"})),
    dict(topic="multi-node, slow links", fsdp1="HYBRID_SHARD: shard inside a node, replicate across nodes",
         fsdp2="2-D device mesh (replicate, shard)",
         deepspeed="ZeRO++ hpZ (zero_hpz_partition_size = GPUs per node), qwZ / qgZ quantized collectives",
         note="qwZ / qgZ run on CUDA only.", source=f"{REF}; {ZEROPP_PAPER}",
         check=("api", "multi_node"), rule=("hpz_needs_deepspeed_zero3", {"framework": "fsdp2", "zeropp": {"hpz_partition_size": 2}, "topology": {"gpus_per_node": 2}})),
]

OFFLOADING: list[dict[str, Any]] = [
    dict(aspect="what moves", fsdp1="parameters, gradients and optimizer states, all together", fsdp2="parameters, gradients and optimizer states, all together",
         deepspeed="optimizer states (offload_optimizer, stage 1-3) and parameters (offload_param) independently",
         source=f"{ACCEL}; torch CPUOffload / CPUOffloadPolicy docstrings", check=("api", "offload"), rule=("fsdp_offload_all_or_nothing", {"framework": "fsdp1", "offload": {"params": "cpu"}})),
    dict(aspect="parameter offload", fsdp1="with the rest", fsdp2="with the rest", deepspeed="ZeRO-3 only",
         source=DS_ZERO, check=None, rule=("params_offload_needs_zero3", {"framework": "deepspeed", "sharding": "zero2", "offload": {"params": "cpu"}})),
    dict(aspect="targets", fsdp1="CPU", fsdp2="CPU", deepspeed="CPU or NVMe (ZeRO-Infinity, needs nvme_path)",
         source=f"{REF}; {DS_CONFIG}", check=("api", "offload"), rule=("nvme_needs_deepspeed", {"framework": "fsdp2", "offload": {"optimizer": "nvme", "params": "nvme", "nvme_path": "/nvme"}})),
    dict(aspect="optimizer step", fsdp1="torch optimizer on the CPU shards", fsdp2="torch optimizer on the CPU shards",
         deepspeed="DeepSpeedCPUAdam (a C++ op, JIT-built on first use) on the CPU, whatever the device",
         source="torch CPUOffloadPolicy docstring; deepspeed runtime/zero/offload_config.py", check=None),
    dict(aspect="pinned host memory", fsdp1="always pinned", fsdp2="CPUOffloadPolicy(pin_memory=True) by default",
         deepspeed="offload_*.pin_memory (default on)", source="torch fsdp/_fully_shard/_fsdp_api.py; deepspeed offload_config.py", check=None),
    dict(aspect="GPU memory left for optimizer states", fsdp1="none", fsdp2="none", deepspeed="none with offload_optimizer",
         source=DS_ZERO, check=("claim", "offload_optimizer")),
]

PRECISION: list[dict[str, Any]] = [
    dict(aspect="stored (sharded) parameters", fsdp1="the dtype the model was built in (flat parameters)", fsdp2="the parameters' original dtype",
         deepspeed="16-bit model weights plus an fp32 master copy in the optimizer, whatever the model dtype", source=ACCEL, check=("claim", "bytes_per_param")),
    dict(aspect="compute", fsdp1="MixedPrecision.param_dtype", fsdp2="MixedPrecisionPolicy.param_dtype", deepspeed="bf16 / fp16 section of the config",
         source=f"{ACCEL}; {FSDP2_DOC}", check=None),
    dict(aspect="gradient reduction", fsdp1="reduce_dtype", fsdp2="reduce_dtype (None: the compute dtype)", deepspeed="communication_data_type (default: the training dtype)",
         source=f"{FSDP2_DOC}; {DS_CONFIG}", check=("api", "mixed_precision"), rule=("dtype_mismatch", {"precision": "bf16", "reduce_dtype": "fp16"})),
    dict(aspect="optimizer step", fsdp1="in the stored dtype", fsdp2="on the sharded parameters in their original dtype", deepspeed="always fp32 (master weights)",
         source=f"{ACCEL}; torch MixedPrecisionPolicy docstring", check=None),
    dict(aspect="fp16 loss scaling", fsdp1="ShardedGradScaler", fsdp2="none built in: torch.amp.GradScaler", deepspeed="built in (fp16.loss_scale 0 = dynamic)",
         source=f"{FSDP1_DOC}; {DS_CONFIG}", check=("api", "scaler"), rule=("fp16_fsdp2_needs_scaler", {"framework": "fsdp2", "precision": "fp16", "loss_scaling": "none"})),
    dict(aspect="checkpoint precision", fsdp1="the stored dtype (fp32 when the model is fp32)", fsdp2="the stored dtype", deepspeed="fp32 via zero_to_fp32.py, or 16-bit with stage3_gather_16bit_weights_on_model_save",
         source=ACCEL, check=("api", "checkpointing"), rule=("full_16bit_is_deepspeed_zero3", {"framework": "fsdp2", "checkpoint": "full_16bit"})),
]

LAUNCHERS: list[dict[str, Any]] = [
    dict(launcher="torchrun", runs="FSDP1, FSDP2, DeepSpeed (deepspeed.initialize reads the torchrun environment)", multi_node="run once per node with --node-rank and a c10d rendezvous",
         config="none (code holds the setup)", source="https://docs.pytorch.org/docs/stable/elastic/run.html", check=("launch", "torchrun")),
    dict(launcher="deepspeed", runs="DeepSpeed (any torch.distributed program)", multi_node="one command, a hostfile, ssh (pdsh) to the nodes",
         config="ds_config.json via --deepspeed_config", source="https://www.deepspeed.ai/getting-started/", check=("launch", "deepspeed")),
    dict(launcher="accelerate launch", runs="FSDP1, FSDP2, DeepSpeed through one YAML", multi_node="run once per node with --machine_rank",
         config="accelerate config YAML (fsdp_config or deepspeed_config)", source=ACCEL, check=("launch", "accelerate")),
    dict(launcher="slurm (srun)", runs="any of the above, one task per node", multi_node="the scheduler starts one launcher per node",
         config="sbatch script", source="https://slurm.schedmd.com/srun.html", check=None),
]

WHEN: list[dict[str, Any]] = [
    dict(situation="the model, its gradients and Adam states fit on one GPU", choose="ddp (NO_SHARD / ZeRO-0)",
         why="the least communication: ZeRO-3 moves more bytes per step", source=ZERO_PAPER, check=("claim", "comm_zero3_vs_ddp")),
    dict(situation="the weights fit replicated but the optimizer states do not", choose="zero2 (SHARD_GRAD_OP / ZeRO-2)",
         why="shards gradients and optimizer states at DDP's communication cost", source=ZERO_PAPER, check=("claim", "comm_zero2_vs_ddp")),
    dict(situation="the weights alone do not fit replicated", choose="zero3 (FULL_SHARD / ZeRO-3)",
         why="model states per GPU fall with the number of GPUs", source=ZERO_PAPER, check=("claim", "states_zero3")),
    dict(situation="ZeRO-3 on every GPU still does not fit", choose="offload (DeepSpeed for optimizer-only or NVMe)",
         why="frees GPU memory at a large cost in step time", source=f"{REF}; {DS_ZERO}", check=("claim", "offload_optimizer")),
    dict(situation="several nodes without a fast interconnect", choose="hybrid (HYBRID_SHARD / 2-D mesh / ZeRO++ hpZ)",
         why="parameter all-gathers stay inside a node", source=f"{REF}; {ZEROPP_PAPER}", check=("claim", "hybrid_inter_node")),
    dict(situation="PyTorch-native code, torch.compile, composing with tensor or pipeline parallelism", choose="fsdp2",
         why="per-parameter DTensor sharding, no flat parameters, no extra dependency", source=FSDP2_DOC, check=None),
    dict(situation="optimizer states only (ZeRO-1), optimizer-only offload, NVMe", choose="deepspeed",
         why="FSDP has none of these", source=f"{ACCEL}; {DS_ZERO}", check=("api", "sharding"), rule=("zero1_is_deepspeed_only", {"framework": "fsdp1", "sharding": "zero1"})),
]


# --------------------------------------------------------------------------------------------
# Checks


def _check_rule(rule: tuple[str, dict] | None) -> tuple[str, Any]:
    """Whether shardlab's own validation refuses what the row says a framework cannot do (shardlab
    agreeing with the table: a consistency check of shardlab, not evidence for the row)."""
    if rule is None:
        return "", None
    from shardlab.plan import plan_from_dict

    rule_id, plan = rule
    found = {f.rule for f in plan_from_dict(plan, check=False).findings()}
    shown = ", ".join(f"{k}={v}" for k, v in plan.items())
    return f"plan rule {rule_id} on {{{shown}}}", rule_id in found


def _resolve(check, claims_by_id: dict[str, dict]) -> tuple[str, Any]:
    if check is None:
        return "", None
    from shardlab import tablecheck

    kind = check[0]
    if kind == "api":
        return tablecheck.api(check[1])
    if kind == "launch":
        return tablecheck.launch(check[1])
    if kind == "claim":
        c = claims_by_id[check[1]]
        return f"claim {check[1]}: {c['verified_by']} = {c['shardlab']}", c["agrees"]
    raise ValueError(f"unknown check kind {kind!r}")


def _table(rows: list[dict], key: str, gpu: str = DEFAULT_GPU) -> pd.DataFrame:
    needs_claims = any(r.get("check") and r["check"][0] == "claim" for r in rows)
    by_id = {c["id"]: c for c in claims(gpu=gpu).to_dict("records")} if needs_claims else {}
    out = []
    for r in rows:
        row = {k: v for k, v in r.items() if k not in ("check", "rule")}
        row["verified_by"], row["verified"] = _resolve(r.get("check"), by_id)
        if any("rule" in x for x in rows):
            row["shardlab_rule"], row["shardlab_refuses"] = _check_rule(r.get("rule"))
        out.append(row)
    return pd.DataFrame(out).set_index(key)


def features() -> pd.DataFrame:
    """Feature by feature: how FSDP1, FSDP2 and DeepSpeed express it."""
    return _table(FEATURES, "topic")


def offloading(gpu: str = DEFAULT_GPU) -> pd.DataFrame:
    """What each framework can offload, where to, and where the optimizer step then runs."""
    return _table(OFFLOADING, "aspect", gpu)


def precision(gpu: str = DEFAULT_GPU) -> pd.DataFrame:
    """Which dtype each framework stores, computes, reduces, steps and saves in."""
    return _table(PRECISION, "aspect", gpu)


def launchers() -> pd.DataFrame:
    """The launchers, what they start, and the command shardlab builds for each (2 nodes x 8 GPUs)."""
    return _table(LAUNCHERS, "launcher")


def when_to_use(gpu: str = DEFAULT_GPU) -> pd.DataFrame:
    """Situation -> choice, each backed where possible by the estimator's numbers."""
    return _table(WHEN, "situation", gpu)


# --------------------------------------------------------------------------------------------
# Published numbers, recomputed live by the estimator or measured by runs



_EST_CACHE: dict[tuple, dict] = {}


def _est(plan: dict, model, gpu: str) -> dict:
    """The estimator's dict, memoised: several tables ask for the same few setups."""
    import json

    from shardlab.estimate import estimate
    from shardlab.models import resolve_model
    from shardlab.plan import plan_from_dict

    key = (json.dumps(plan, sort_keys=True), str(model), gpu)
    if key not in _EST_CACHE:
        _EST_CACHE[key] = estimate(plan_from_dict(plan, check=False), resolve_model(model), gpu).to_dict()
    return _EST_CACHE[key]


def _states(plan: dict, model, gpu: str) -> float:
    g = _est(plan, model, gpu)["per_gpu"]
    return g["params"] + g["grads"] + g["optimizer"]


def _comm(plan: dict, model, gpu: str, key: str = "total") -> float:
    return _est(plan, model, gpu)["comm_per_step"][key]


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# The ZeRO paper's Figure 1: Psi = 7.5B, K = 12 (mixed-precision Adam), Nd = 64 GPUs. Two micro-batches
# per step: the paper's ZeRO-1 holds full gradients, which DeepSpeed's stage 1 does only while it
# accumulates (with one micro-batch it frees each gradient once reduced, holding what stage 2 holds).
_FIG1 = {"topology": {"nodes": 8, "gpus_per_node": 8}, "precision": "fp16", "framework": "deepspeed", "grad_accum_steps": 2}
_ONE_NODE = {"topology": {"nodes": 1, "gpus_per_node": 8}, "framework": "deepspeed", "precision": "bf16"}
PAPER_MODEL = 7.5e9


def _fig1(sharding: str):
    def compute(gpu, runs):
        v = _states({**_FIG1, "sharding": sharding}, 7.5e9, gpu) / GB
        return f"estimate: per-GPU params+grads+optimizer, deepspeed {sharding}, 7.5e9 params, 64 GPUs, fp16, 2 micro-batches (GB)", round(v, 2)
    return compute


def _comm_ratio(a: str, b: str, framework: str, key: str = "total", nodes: int = 1, extra: dict | None = None,
                precision: str = "fp32"):
    """comm_per_step[key] of sharding `a` over sharding `b`: fp32 by default (dtype choices cancel), the ZeRO
    paper's bare 7.5B-parameter model (the algorithm, without a real model's unsharded root unit), 8 GPUs a node.
    Quantized collectives do not cancel: their ratio depends on the dtype they replace, so ZeRO++ is
    compared in 16-bit, the paper's setting (int8 weights are half of fp16, a quarter of fp32)."""
    base = {"framework": framework, "precision": precision, "topology": {"nodes": nodes, "gpus_per_node": 8}}

    def compute(gpu, runs):
        num = _comm({**base, "sharding": a, **(extra or {})}, PAPER_MODEL, gpu, key)
        v = _ratio(num, _comm({**base, "sharding": b}, PAPER_MODEL, gpu, key))
        more = f" + {extra}" if extra else ""
        return f"estimate: comm_per_step.{key} {framework} {a}{more} / {b}, 7.5e9 params, {nodes}x8 GPUs", round(v, 3)
    return compute


def _offload(gpu, runs):
    g = _est({**_ONE_NODE, "sharding": "zero2", "offload": {"optimizer": "cpu"}}, "gpt-1.3b", gpu)
    return "estimate: per_gpu.optimizer, deepspeed zero2 + offload.optimizer cpu, gpt-1.3b (bytes)", g["per_gpu"]["optimizer"]


def _bytes_per_param(gpu, runs):
    from shardlab.models import resolve_model

    n = resolve_model("gpt-1.3b").params
    v = _states({"framework": "deepspeed", "sharding": "ddp", "precision": "bf16"}, "gpt-1.3b", gpu) / n
    return "estimate: (params+grads+optimizer) / parameters, deepspeed ddp bf16, gpt-1.3b, 1 GPU", round(v, 2)


def _same_losses(gpu, runs):
    from shardlab.compare import loss_frame

    df = loss_frame(runs)
    z3 = df[df.sharding == "zero3"]
    if z3.framework.nunique() < 2:
        return "runs: needs zero3 runs of two frameworks", None
    wide = z3.pivot_table(index="step", columns="run", values="loss")
    spread = float((wide.max(axis=1) - wide.min(axis=1)).abs().max())
    return f"runs: largest loss spread per step over {', '.join(wide.columns)}", round(spread, 6)


def _params_fraction(gpu, runs):
    from shardlab.compare import compare

    df = compare(runs)
    z3 = df[(df.strategy == "zero3") & (df.framework != "deepspeed")] if (df.framework != "deepspeed").any() else df[df.strategy == "zero3"]
    if z3.empty:
        return "runs: needs a zero3 run", None
    r = z3.iloc[0]
    # Stored parameters are fp32 except DeepSpeed's 16-bit weights in mixed precision.
    elem = 4 if r.precision == "fp32" or r.framework != "deepspeed" else 2
    if not r.model_params:
        return "runs: the zero3 run names no model", None
    return (f"runs: params bytes held per rank x world size / full model bytes, {r.name}",
            round(r.params_bytes * r.world_size / (r.model_params * elem), 3))


# id, claim, source, what the source says, how to test agreement, how shardlab computes it.
CLAIMS: list[dict[str, Any]] = [
    dict(id="comm_zero3_vs_ddp", claim="ZeRO-3 / FULL_SHARD moves 1.5x the bytes per step of DDP (3 vs 2 model sizes): FSDP2", source=f"{ZERO_PAPER} sec. 7; {REF} 4.3",
         claimed=1.5, agree=lambda v: abs(v - 1.5) < 0.05, compute=_comm_ratio("zero3", "ddp", "fsdp2")),
    dict(id="comm_zero3_vs_ddp_deepspeed", claim="ZeRO-3 moves 1.5x the bytes per step of DDP: DeepSpeed", source=f"{ZERO_PAPER} sec. 7",
         claimed=1.5, agree=lambda v: abs(v - 1.5) < 0.05, compute=_comm_ratio("zero3", "ddp", "deepspeed")),
    dict(id="comm_zero2_vs_ddp", claim="ZeRO-2 / SHARD_GRAD_OP moves the same bytes as DDP: FSDP2", source=f"{ZERO_PAPER} sec. 7",
         claimed=1.0, agree=lambda v: abs(v - 1.0) < 0.05, compute=_comm_ratio("zero2", "ddp", "fsdp2")),
    dict(id="comm_zero2_vs_ddp_deepspeed", claim="ZeRO-2 moves the same bytes as DDP: DeepSpeed", source=f"{ZERO_PAPER} sec. 7",
         claimed=1.0, agree=lambda v: abs(v - 1.0) < 0.05, compute=_comm_ratio("zero2", "ddp", "deepspeed"),
         note="DeepSpeed's ZeRO-1/2 all-reduce whole gradient buckets, then all-gather the updated parameters (estimator notes)"),
    dict(id="comm_zero1_vs_ddp", claim="ZeRO-1 moves the same bytes as DDP: DeepSpeed", source=f"{ZERO_PAPER} sec. 7",
         claimed=1.0, agree=lambda v: abs(v - 1.0) < 0.05, compute=_comm_ratio("zero1", "ddp", "deepspeed"),
         note="as for ZeRO-2"),
    dict(id="states_ddp", claim="DDP with mixed-precision Adam holds 16 bytes per parameter: 120 GB for 7.5B", source=f"{ZERO_PAPER} fig. 1",
         claimed=120.0, agree=lambda v: abs(v / 120.0 - 1) < 0.03, compute=_fig1("ddp")),
    dict(id="states_zero1", claim="ZeRO-1 on 64 GPUs: 31.4 GB per GPU for 7.5B", source=f"{ZERO_PAPER} fig. 1",
         claimed=31.4, agree=lambda v: abs(v / 31.4 - 1) < 0.03, compute=_fig1("zero1")),
    dict(id="states_zero2", claim="ZeRO-2 on 64 GPUs: 16.6 GB per GPU for 7.5B", source=f"{ZERO_PAPER} fig. 1",
         claimed=16.6, agree=lambda v: abs(v / 16.6 - 1) < 0.03, compute=_fig1("zero2")),
    dict(id="states_zero3", claim="ZeRO-3 on 64 GPUs: 1.9 GB per GPU for 7.5B", source=f"{ZERO_PAPER} fig. 1",
         claimed=1.9, agree=lambda v: abs(v / 1.9 - 1) < 0.03, compute=_fig1("zero3")),
    dict(id="bytes_per_param", claim="mixed-precision Adam model states: 2 + 2 + 12 = 16 bytes per parameter", source=f"{ZERO_PAPER} sec. 3.1",
         claimed=16.0, agree=lambda v: abs(v - 16) < 0.1, compute=_bytes_per_param),
    dict(id="offload_optimizer", claim="ZeRO-Offload keeps no optimizer state on the GPU", source=DS_ZERO,
         claimed=0, agree=lambda v: v == 0, compute=_offload),
    dict(id="hybrid_inter_node", claim="hybrid sharding sends fewer bytes between nodes than full sharding", source=f"{REF} 3.4",
         claimed="< 1", agree=lambda v: v < 1, compute=_comm_ratio("hybrid", "zero3", "fsdp2", "inter_node", nodes=2)),
    dict(id="zeropp_inter_node", claim="ZeRO++ (qwZ + hpZ + qgZ) cuts ZeRO-3's inter-node bytes 4x", source=ZEROPP_PAPER,
         claimed=0.25, agree=lambda v: abs(v - 0.25) < 0.05,
         compute=_comm_ratio("zero3", "zero3", "deepspeed", "inter_node", nodes=2,
                             extra={"zeropp": {"quantized_weights": True, "quantized_gradients": True, "hpz_partition_size": 8}},
                             precision="bf16")),
    dict(id="same_losses", claim="FSDP FULL_SHARD and ZeRO-3 are the same algorithm: same losses for the same seed", source=f"{REF} overview",
         claimed=0.0, agree=lambda v: v < 1e-3, compute=_same_losses, needs_runs=True),
    dict(id="zero3_params_fraction", claim="ZeRO-3 keeps 1/N of the parameters on each of N ranks", source=ZERO_PAPER,
         claimed=1.0, agree=lambda v: abs(v - 1) < 0.1, compute=_params_fraction, needs_runs=True),
]


def claims(runs=None, gpu: str = DEFAULT_GPU) -> pd.DataFrame:
    """Published numbers next to shardlab's own: estimator claims always, run claims when `runs` are given.

    `agrees` is None where shardlab could not compute its number (e.g. no matching run).
    """
    rows = []
    for c in CLAIMS:
        if c.get("needs_runs") and not runs:
            continue
        try:
            how, value = c["compute"](gpu, runs)
        except Exception as e:  # a table must still show; the row says why it is unchecked
            how, value = f"not computed: {type(e).__name__}: {e}", None
        agrees = None if value is None or (isinstance(value, float) and value != value) else bool(c["agree"](value))
        rows.append(dict(id=c["id"], claim=c["claim"], claimed=c["claimed"], shardlab=value, agrees=agrees,
                         verified_by=how, source=c["source"], note=c.get("note", "")))
    return pd.DataFrame(rows).astype({"claimed": object, "shardlab": object})


def all_tables(runs=None, gpu: str = DEFAULT_GPU) -> dict[str, pd.DataFrame]:
    """Every comparison table by name; `runs` adds the run-checked claims."""
    return {"features": features(), "offloading": offloading(gpu), "precision": precision(gpu),
            "launchers": launchers(), "when to use which": when_to_use(gpu), "claims": claims(runs=runs, gpu=gpu)}


__all__ = ["features", "offloading", "precision", "launchers", "when_to_use", "claims", "all_tables", "CLAIMS"]
