# %% [markdown]
# # 03 · The memory math
#
# Where does every byte go? Training with Adam in mixed precision keeps, per parameter, a 16-bit
# weight, a 16-bit gradient, and three fp32 numbers for the optimizer (a master copy of the weight,
# Adam's momentum and its variance): 2 + 2 + 12 = **16 bytes**. The ZeRO paper calls these the *model
# states*. Each ZeRO stage splits one more of them across the N data-parallel GPUs. Activations,
# communication buffers and the CUDA context come on top.
#
# All figures here come from shardlab's estimator (`shardlab.estimate`), which is plain arithmetic and
# answers in milliseconds. Units are named every time: GB = 10^9 bytes (the ZeRO paper's unit),
# GiB = 2^30 bytes (what `nvidia-smi` and PyTorch report).

# %%
import pandas as pd
import panel as pn

pn.extension(inline=True)  # inline: the widgets work offline too

from shardlab import plots
from shardlab.estimate import estimate
from shardlab.models import PRESETS, bare
from shardlab.plan import Plan

GB, GIB = 10**9, 2**30

def states(e):
    """Model states per GPU (bytes): parameters + gradients + optimizer (incl. fp32 master weights)."""
    g = e.per_gpu
    return g["params"] + g["grads"] + g["optimizer"]

# %% [markdown]
# ## 1. Sixteen bytes, stored two ways
#
# FSDP and DeepSpeed both land on 16 bytes per parameter without sharding, but they file them
# differently. DeepSpeed keeps the model in bf16 and the fp32 master inside the optimizer; FSDP keeps
# the parameters themselves in fp32 (they *are* the master) and casts a bf16 copy only for compute.

# %%
model = PRESETS["gpt-1.3b"]
rows = []
for fw in ("deepspeed", "fsdp2"):
    e = estimate(Plan(framework=fw, sharding="ddp", precision="bf16"), model)
    rows.append({"framework": fw, **{k: e.per_gpu[k] / model.params for k in ("params", "grads", "optimizer")},
                 "total": states(e) / model.params})
print(f"{model.name}: {model.params:,} parameters; bytes per parameter, one GPU, no sharding")
pd.DataFrame(rows).set_index("framework").round(2)

# %% [markdown]
# ## 2. Each stage, one more state split
#
# The ZeRO paper's Figure 1: a 7.5B-parameter model, 64 GPUs, mixed-precision Adam. DDP holds all
# 16 bytes per parameter on every GPU; ZeRO-1 splits the 12 optimizer bytes; ZeRO-2 also the
# gradients; ZeRO-3 also the parameters. The estimator recomputes each bar.
#
# One detail: the paper's ZeRO-1 keeps the full gradients. DeepSpeed's stage 1 does that only while it
# accumulates micro-batches; with a single micro-batch per step it frees each gradient as soon as it
# is reduced, and ends up holding what stage 2 holds. So the plans below accumulate 2 micro-batches
# (change `ACCUM` to 1 and watch ZeRO-1 drop to ZeRO-2's figure).

# %%
psi, n_gpus, ACCUM = 7.5e9, 64, 2
paper = {"ddp": 120, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}  # GB per GPU, as printed in the paper
parts, table = [], []
for stage in ("ddp", "zero1", "zero2", "zero3"):
    e = estimate(Plan(framework="deepspeed", sharding=stage, precision="fp16", grad_accum_steps=ACCUM,
                      topology={"nodes": 8, "gpus_per_node": 8}), bare(psi))
    for part in ("params", "grads", "optimizer"):
        parts.append({"run": stage, "kind": "estimate", "part": part, "bytes": e.per_gpu[part]})
    table.append({"stage": stage, "paper (GB)": paper[stage], "shardlab (GB)": round(states(e) / GB, 2)})
display(pd.DataFrame(table).set_index("stage"))
pn.panel(plots.memory_breakdown(pd.DataFrame(parts)))

# %% [markdown]
# ## 3. The paper's table, recomputed for any N
#
# Table 1 of the ZeRO paper gives model-state memory per GPU as the data-parallel degree grows. With
# ZeRO-3 it falls as 1/N without limit; ZeRO-1 and ZeRO-2 flatten out at the part they do not split
# (the 2- or 4-byte copies of the weights and gradients).

# %%
rows = []
for psi in (7.5e9, 128e9, 1e12):
    for n in (1, 4, 16, 64, 256, 1024):
        topo = {"nodes": max(1, n // 8), "gpus_per_node": min(n, 8)}
        row = {"parameters": f"{psi / 1e9:g}B", "GPUs": n}
        for stage, label in (("ddp", "DDP"), ("zero1", "ZeRO-1"), ("zero2", "ZeRO-2"), ("zero3", "ZeRO-3")):
            plan = Plan(framework="deepspeed", sharding=stage, precision="fp16", grad_accum_steps=ACCUM, topology=topo)
            row[f"{label} (GB)"] = round(states(estimate(plan, bare(psi))) / GB, 1)
        rows.append(row)
pd.DataFrame(rows).set_index(["parameters", "GPUs"])

# %% [markdown]
# ## 4. Beyond model states
#
# A real model has a shape, so it also has activations (what backward needs from forward), gathered
# parameters in flight, communication buckets, and the CUDA context. Here is the estimator's full
# account for `gpt-1.3b` (sequence 2048, micro-batch 4) on 8 GPUs with FSDP2 full sharding. Each line
# says what it counts.

# %%
e = estimate(Plan(framework="fsdp2", sharding="zero3", precision="bf16", micro_batch_size=4, topology={"gpus_per_node": 8}), "gpt-1.3b", "h100-80gb")
print(e.summary())

# %% [markdown]
# Activations dominate here, and they do not shrink with sharding. Activation checkpointing keeps only
# each block's input and recomputes the rest in backward:

# %%
for ckpt in (False, True):
    e = estimate(Plan(framework="fsdp2", sharding="zero3", micro_batch_size=4, activation_checkpointing=ckpt,
                      topology={"gpus_per_node": 8}), "gpt-1.3b", "h100-80gb")
    print(f"activation_checkpointing={ckpt!s:5}: activations {e.per_gpu['activations'] / GIB:6.2f} GiB, "
          f"total {e.per_gpu['total'] / GIB:6.2f} GiB, step {e.time['step_time_s'] * 1e3:.0f} ms")

# %% [markdown]
# ### The same step, traced
#
# The figures above are arithmetic. `estimate(..., method="trace")` checks them another way: it builds
# the model on *fake tensors* (shapes and dtypes, no storage), wraps it with the real FSDP code on a
# fake process group of the plan's world size, runs one real training step (forward, loss, backward,
# optimizer step) and records the peak of live bytes. No GPU and no memory are needed, so it takes
# seconds, not the minutes of a real run, and even a model too big for any machine traces. For
# DeepSpeed (whose engine does not run on fake tensors) the forward/backward working set is traced
# and the model states stay arithmetic; the result says which. In the ConfigBuilder (lab 02), the
# **trace this step** button beside the memory bar shows the traced figure next to the analytical one.
# A small 4-layer shape keeps this cell to a few seconds:

# %%
small = {"name": "gpt-4layer", "family": "gpt", "layers": 4, "hidden": 768, "heads": 12, "vocab": 50257, "seq_len": 2048}
plan = Plan(framework="fsdp2", sharding="zero3", precision="bf16", micro_batch_size=4, topology={"gpus_per_node": 8})
arith, traced = estimate(plan, small, "h100-80gb"), estimate(plan, small, "h100-80gb", method="trace")
a, t = arith.per_gpu["peak_allocated"], traced.per_gpu["peak_allocated"]
print(f"peak allocated per GPU: analytical {a / GIB:.2f} GiB, traced {t / GIB:.2f} GiB, traced - analytical {(t - a) / GIB:+.2f} GiB ({t / a - 1:+.1%})")
print(traced.notes["trace"])

# %% [markdown]
# When the two disagree, one of them misses a mechanism: that is how several terms above were found
# (the fp32 loss's copies of the logits, DeepSpeed's copy of the gradient partition in its step).
# Both are checked against peaks measured on a GPU (docs/benchmarks.md).

# %% [markdown]
# ## 5. What fits on your GPUs
#
# `fits` tries every strategy on one plan and model and says which fit in a GPU's memory (everything
# counted). Change `GPU` and `N_GPUS` to your own machine (`shardlab.estimate.GPUS` lists the kinds).

# %%
from shardlab.estimate import GPUS
from shardlab.estimate.fits import fits

GPU, N_GPUS = "a100-80gb", 8
rows = []
for m in ("gpt-1.3b", "gpt-6.7b", "llama-8b", "gpt-13b"):
    for r in fits(Plan(precision="bf16", topology={"gpus_per_node": N_GPUS}), m, GPU):
        rows.append({"model": m, "strategy": r["strategy"], "per GPU (GiB)": round(r["used_bytes"] / GIB, 1), "fits": r["fits"]})
verdict = pd.DataFrame(rows).pivot(index="model", columns="strategy", values="fits")
print(f"{N_GPUS} x {GPU} ({GPUS[GPU].memory_bytes / GIB:.0f} GiB each): does it fit? (micro-batch 1, full sequence length)")
verdict

# %% [markdown]
# ## 6. "Max model size" claims, checked
#
# Blog posts often carry a table like this one, for 8 × A100 40GB: *DDP 1.4B, ZeRO-1 6B, ZeRO-2 12B,
# ZeRO-3 40B+, ZeRO-3 + offload 100B+ parameters*. `max_model_size` searches for the largest model
# that fits, two ways: counting model states only (what the ZeRO paper counts), and counting
# everything for a GPT shape of that size at sequence 2048 (what you would actually run). For offload,
# the CPU RAM of the node is the limit too; we assume 1 TB.

# %%
from shardlab.estimate.fits import max_model_size

claimed = {"ddp": 1.4, "zero1": 6, "zero2": 12, "zero3": 40, "zero3+offload": 100}  # billions, as the table says
base = Plan(framework="deepspeed", precision="bf16", grad_accum_steps=ACCUM, topology={"gpus_per_node": 8})

def verdict(claim, states_only, everything):
    if claim <= everything:
        return "holds, with room for activations"
    if claim <= states_only:
        return "holds for model states only"
    return "not reachable with mixed-precision Adam"

rows = []
for strategy, claim in claimed.items():
    kw = dict(strategy=strategy, cpu_memory=10**12)
    s_only = max_model_size(base, "a100-40gb", include="states", **kw) / 1e9
    every = max_model_size(base, "a100-40gb", include="all", **kw) / 1e9
    rows.append({"strategy": strategy, "claimed (B)": claim, "states only (B)": round(s_only, 1),
                 "everything, seq 2048 (B)": round(every, 1),
                 "verdict": verdict(claim, s_only, every) + (" (CPU RAM: 1 TB per node)" if "offload" in strategy else "")})
pd.DataFrame(rows).set_index("strategy")

# %% [markdown]
# Some claims hold, some need a generous reading, some cannot be true as stated. The ZeRO-3 claim is
# the instructive one: 16 bytes per parameter split over 8 GPUs is 2 bytes per parameter per GPU, and
# 40 GB / 2 bytes is 20B before a single activation. A claim like "40B+" assumes less state per
# parameter (a lighter optimizer, frozen weights as in LoRA) or more GPUs than it says. When you
# read a "max model size", ask what was counted.
#
# **Take away:** 16 bytes per parameter, divided by N for each state you shard; then add activations,
# which sharding does not touch. Notebook 04 measures the model states for real.
