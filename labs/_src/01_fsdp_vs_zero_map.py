# %% [markdown]
# # 01 · FSDP vs ZeRO: the map
#
# PyTorch FSDP and DeepSpeed ZeRO solve one problem the same way. Plain data parallelism (DDP) gives
# every GPU a full copy of the weights, the gradients and the optimizer states. With Adam in mixed
# precision that is about 16 bytes per parameter on every GPU, so a 7B model needs 112 GB per GPU
# before a single activation is stored. Both frameworks cut that copy into N pieces, one per GPU,
# and gather a piece back only for the moment it is needed.
#
# They differ in names, knobs and what else they offer. This notebook lays the two side by side. Every
# table below comes from `shardlab`: the equivalences are read from what its exporters write for each
# framework, and each "cannot" is a plan that shardlab's validation refuses.

# %%
import json

import pandas as pd
import yaml

from shardlab import tables
from shardlab.export import export
from shardlab.plan import plan_from_dict

pd.set_option("display.max_colwidth", None)

def wrap(df):
    """Long text cells wrap instead of running off the page."""
    return df.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left", "vertical-align": "top"})

# %% [markdown]
# ## 1. One vocabulary, three spellings
#
# shardlab names each strategy once (`ddp`, `zero1`, `zero2`, `zero3`, `hybrid`). Below, for each one,
# is what the exporters write for FSDP1 (the `ShardingStrategy` in an accelerate config), FSDP2 (its
# `reshard_after_forward`) and DeepSpeed (`zero_optimization`). A dash means the framework has no
# such strategy; the message says why.

# %%
def spelled(framework, sharding):
    topo = {"nodes": 2, "gpus_per_node": 4} if sharding == "hybrid" else {"gpus_per_node": 4}
    d = {"framework": framework, "sharding": sharding, "topology": topo}
    if framework == "deepspeed" and sharding == "hybrid":
        d["zeropp"] = {"hpz_partition_size": 4}  # DeepSpeed's form of hybrid: hpZ over the GPUs of a node
    plan = plan_from_dict(d, check=False)
    if plan.errors():
        return "– " + plan.errors()[0].message.split(";")[0]
    if framework == "deepspeed":
        zero = json.loads(export(plan, "deepspeed"))["zero_optimization"]
        return ", ".join(f"{k}: {v}" for k, v in zero.items() if k in ("stage", "zero_hpz_partition_size"))
    fsdp = yaml.safe_load(export(plan, "accelerate"))["fsdp_config"]
    value = fsdp.get("fsdp_sharding_strategy", fsdp.get("fsdp_reshard_after_forward"))
    return f"{value}" if framework == "fsdp1" else f"reshard_after_forward={value}" + (" on a 2-D mesh" if sharding == "hybrid" else "")

equiv = pd.DataFrame(
    {fw: {s: spelled(fw, s) for s in ["ddp", "zero1", "zero2", "zero3", "hybrid"]} for fw in ["fsdp1", "fsdp2", "deepspeed"]}
)
equiv.index.name = "shardlab sharding"
wrap(equiv)

# %% [markdown]
# Read it as: **FULL_SHARD = ZeRO-3**, **SHARD_GRAD_OP = ZeRO-2**, **NO_SHARD = ZeRO-0 (DDP)**, and
# **HYBRID_SHARD** (full sharding inside a node, copies across nodes) = ZeRO-3 with ZeRO++'s hpZ
# partition the size of a node. ZeRO-1, which shards only the optimizer states, exists only in
# DeepSpeed. FSDP2 has no strategy enum at all: whether a unit's parameters are freed after forward
# (`reshard_after_forward`) and the shape of its device mesh say the same thing.

# %% [markdown]
# ## 2. Feature by feature
#
# How each framework expresses the things you configure. The `verified_by` column names the check
# shardlab ran for the row (usually a plan that must be refused), and `verified` its outcome.

# %%
wrap(tables.features()[["fsdp1", "fsdp2", "deepspeed", "note", "verified"]])

# %% [markdown]
# ## 3. Offloading and precision: where they really differ
#
# FSDP moves parameters, gradients and optimizer step to the CPU together or not at all. DeepSpeed can
# move the optimizer alone, the parameters alone (ZeRO-3), and can go to NVMe as well as CPU RAM.

# %%
wrap(tables.offloading()[["fsdp1", "fsdp2", "deepspeed", "verified"]])

# %% [markdown]
# The precision table matters more than it looks. FSDP keeps the sharded parameters in the dtype the
# model was built in (usually fp32) and casts a copy for compute; DeepSpeed keeps 16-bit weights and a
# separate fp32 master copy inside its optimizer. Same algorithm, different bytes: notebook 03 counts
# them, notebook 05 shows the effect on the loss.

# %%
wrap(tables.precision()[["fsdp1", "fsdp2", "deepspeed", "verified"]])

# %% [markdown]
# ## 4. What each one cannot do
#
# Each plan below asks a framework for something it does not have. shardlab refuses it with a
# message that names the field, says why, and suggests the fix. These are the same messages the
# ConfigBuilder (notebook 02) shows beside its controls.

# %%
attempts = {
    "ZeRO-1 in FSDP2": {"framework": "fsdp2", "sharding": "zero1"},
    "optimizer-only offload in FSDP1": {"framework": "fsdp1", "offload": {"optimizer": "cpu"}},
    "NVMe offload in FSDP2": {"framework": "fsdp2", "offload": {"optimizer": "nvme", "params": "nvme", "nvme_path": "/nvme"}},
    "parameter offload with ZeRO-2": {"framework": "deepspeed", "sharding": "zero2", "offload": {"params": "cpu"}},
    "ZeRO++ hpZ in FSDP2": {"framework": "fsdp2", "zeropp": {"hpz_partition_size": 2}, "topology": {"gpus_per_node": 2}},
    "hybrid sharding on one node": {"framework": "fsdp2", "sharding": "hybrid"},
}
rows = []
for what, d in attempts.items():
    found = plan_from_dict(d, check=False).findings()
    f = next((f for f in found if f.level == "error"), found[0] if found else None)
    rows.append({"asked for": what, "level": f.level if f else "ok", "field": f.field if f else "", "shardlab says": f.message if f else ""})
wrap(pd.DataFrame(rows).set_index("asked for"))

# %% [markdown]
# ## 5. Launchers
#
# Any of the three can be started by `torchrun`; DeepSpeed has its own launcher (ssh to each node),
# and accelerate reads one YAML for all of them. The last column is the command shardlab builds for
# two nodes of eight GPUs.

# %%
wrap(tables.launchers()[["runs", "multi_node", "config", "verified_by"]])

# %% [markdown]
# ## 6. When to use which
#
# A rule of thumb per situation. Where a row rests on a number (bytes moved, bytes held) the estimator
# recomputes it; `verified` says whether it agrees.

# %%
wrap(tables.when_to_use()[["choose", "why", "verified"]])

# %% [markdown]
# ## 7. Published numbers, recomputed
#
# Papers and blog posts make precise claims: "ZeRO-3 moves 1.5× the bytes of DDP", "16 bytes per
# parameter", "ZeRO-2 needs 16.6 GB per GPU for a 7.5B model on 64 GPUs". shardlab's estimator
# recomputes each one from its own arithmetic. Where `agrees` is False, read `verified_by`: the claim
# and shardlab count different things, and finding out which is the lesson (notebook 03 digs in).

# %%
claims = tables.claims()
wrap(claims.set_index("id")[["claim", "claimed", "shardlab", "agrees"]])

# %% [markdown]
# **Take away:** pick the strategy by what must be sharded (nothing, optimizer, + gradients,
# + parameters) and by your network; pick the framework by the extras you need (ZeRO-1, optimizer-only
# or NVMe offload, ZeRO++ → DeepSpeed; PyTorch-native code, `torch.compile`, composing with other
# parallelisms → FSDP2). Next: build a plan and export it for either one.
