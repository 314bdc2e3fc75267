# %% [markdown]
# # 07 · Workshop exercises
#
# Eight questions, one per idea of the labs. Work each one out with the tools of the earlier notebooks
# (the estimator, the exporters, the plan rules, a run), write your answer in place of `None`, and run
# the cell: the check below it says whether you are right, and gives a hint when you are not.
#
# The checks do not hold the answers: each one asks shardlab for the figure at the moment you run it,
# so an answer is right when it agrees with what the estimator, the exporters or your run say.
# Numbers may be rounded the way the question asks.

# %%
import pandas as pd

from labkit import EXERCISES, check, lab_device, run_once, runs_dir
from shardlab.estimate import estimate, get_gpu
from shardlab.models import PRESETS, bare
from shardlab.plan import Plan, plan_from_dict

answers = {}

# %% [markdown]
# ## 1. Model states under ZeRO-2 (notebook 03)
#
# A 7.5B-parameter model, DeepSpeed ZeRO-2, fp16 mixed-precision Adam, 64 GPUs. How many **GB**
# (10^9 bytes) of model states (parameters + gradients + optimizer) does each GPU hold?
# Work it out on paper first (bytes per parameter, which ones are split 64 ways), then with
# `estimate(...)` if you like.

# %%
answers["states_zero2"] = None  # a number, in GB
check("states_zero2", answers["states_zero2"])

# %% [markdown]
# ## 2. The price of ZeRO-3 in bytes (notebooks 01 and 03)
#
# With the estimator, for `gpt-1.3b` on one node of 8 GPUs with FSDP2: divide ZeRO-3's communication
# bytes per step (`comm_per_step["total"]`) by DDP's. Two decimals. Compare it with the ZeRO paper's 1.5:
# where would a difference come from?

# %%
answers["comm_ratio"] = None  # a number, two decimals
check("comm_ratio", answers["comm_ratio"])

# %% [markdown]
# ## 3. The FSDP name for ZeRO-2 (notebook 01)
#
# Which FSDP1 `ShardingStrategy` does what ZeRO-2 does? Give its name as torch spells it.

# %%
answers["fsdp_zero2"] = None  # a name, e.g. "SOME_NAME"
check("fsdp_zero2", answers["fsdp_zero2"])

# %% [markdown]
# ## 4. Read the refusal (notebooks 01 and 02)
#
# `framework: fsdp2` with `sharding: zero1` is refused. Which plan field does shardlab blame? (Build the
# plan with `plan_from_dict(..., check=False)` and look at its `errors()`, or try it in the builder.)

# %%
answers["blamed_field"] = None  # a field name
check("blamed_field", answers["blamed_field"])

# %% [markdown]
# ## 5. How many GPUs? (notebook 03)
#
# What is the smallest number of H100 80GB GPUs (on one node) on which `llama-7b` trains with FSDP2
# full sharding, bf16, micro-batch 1, counting everything (activations, buffers, CUDA context)?

# %%
answers["min_gpus"] = None  # a whole number
check("min_gpus", answers["min_gpus"])

# %% [markdown]
# ## 6. A slow network (notebook 06)
#
# Two nodes of 8 × A100 80GB joined by 10 Gb/s Ethernet (1.25 GB/s per GPU between nodes). For
# `gpt-1.3b` with FSDP2, which sharding gives the shorter step: `zero3` or `hybrid`? Make the GPU with
# `dataclasses.replace(get_gpu("a100-80gb"), inter_node_bw=1.25e9)`.

# %%
answers["slow_network"] = None  # "zero3" or "hybrid"
check("slow_network", answers["slow_network"])

# %% [markdown]
# ## 7. Check a claim (notebook 03)
#
# A blog table says ZeRO-3 fits "40B+" parameters on 8 × A100 40GB. Counting model states only
# (16 bytes per parameter, no activations), what is the largest model, in **billions** of parameters,
# whose states fit on each GPU? Two decimals are plenty.

# %%
answers["max_model"] = None  # a number, in billions
check("max_model", answers["max_model"])

# %% [markdown]
# ## 8. Predict, then measure (notebook 04)
#
# Before looking: in a `gpt-tiny` run with FSDP2 full sharding, how many bytes of **parameters** does
# each rank hold? (`PRESETS["gpt-tiny"].params` gives the parameter count; think about the dtype FSDP
# keeps its shards in, and the number of ranks.) The check reads the answer from a real run: the one
# notebook 04 made if it is in the run store, otherwise it starts it now.

# %%
DEVICE, NPROC = lab_device()
run = run_once({"framework": "fsdp2", "sharding": "zero3", "precision": "bf16"}, model="gpt-tiny", steps=4,
               nproc=NPROC, device=DEVICE, out=runs_dir())
print(f"run {run.id}: {run.status}, {NPROC} ranks, gpt-tiny has {PRESETS['gpt-tiny'].params:,} parameters")

# %%
answers["param_bytes"] = None  # a whole number of bytes
check("param_bytes", answers["param_bytes"], run=run)

# %% [markdown]
# ## Your score

# %%
results = [check(ex, answers.get(ex), **({"run": run} if ex == "param_bytes" else {})) for ex in EXERCISES]
right = sum(r.ok is True for r in results)
print(f"{right} of {len(results)} right, {sum(r.ok is None for r in results)} not answered yet")
pd.DataFrame([{"exercise": r.id, "verdict": {True: "right", False: "not yet", None: "open"}[r.ok]} for r in results]).set_index("exercise")
