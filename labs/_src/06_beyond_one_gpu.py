# %% [markdown]
# # 06 · Beyond one GPU
#
# So far everything fit comfortably. This notebook goes where the choices get hard: models that do
# not fit even fully sharded (offload to CPU RAM or NVMe), several nodes (hybrid sharding, ZeRO++),
# how to launch across nodes, and what a slow network between nodes does to each strategy.
#
# None of this needs the hardware: the estimator does the arithmetic, and the exporters write the
# configs and commands you would take to a cluster. (Offload and multi-node runs are real features of
# `shardlab.launch` too; they are left out here to keep the notebook within a laptop's minutes.)

# %%
from dataclasses import replace

import pandas as pd
import panel as pn

# inline, and before hvplot: importing hvplot sets up HoloViews' bokeh output, which would otherwise
# ask a CDN for BokehJS, and the plots below would stay empty on a machine without internet
pn.extension(inline=True)

import hvplot.pandas  # noqa: E402,F401  (registers .hvplot on DataFrames)

from shardlab.estimate import estimate, get_gpu
from shardlab.export import export
from shardlab.plan import plan_from_dict

GIB = 2**30

def row(name, plan, model, gpu):
    e = estimate(plan, model, gpu)
    c = e.comm_per_step
    return {"setup": name, "GPU (GiB)": round(e.per_gpu["total"] / GIB, 1), "fits": e.fits,
            "CPU per node (GiB)": round(e.cpu["total"] / GIB, 1), "NVMe per node (GiB)": round(e.nvme["total"] / GIB, 1),
            "intra-node (GB/step)": round(c["intra_node"] / 1e9, 1), "inter-node (GB/step)": round(c["inter_node"] / 1e9, 1),
            "step (s)": round(e.time["step_time_s"], 2)}

# %% [markdown]
# ## 1. Offload: trade step time for GPU memory
#
# `gpt-13b` on one node of 8 × A100 40GB: full sharding alone does not fit. DeepSpeed can move the
# optimizer (ZeRO-Offload), then the parameters too, to CPU RAM, or both to NVMe (ZeRO-Infinity).
# FSDP offloads all or nothing, to CPU only. Each step the offloaded states cross PCIe, and the
# optimizer step runs on the CPU: watch the step time.

# %%
MODEL, GPU = "gpt-13b", "a100-40gb"
base = {"framework": "deepspeed", "sharding": "zero3", "precision": "bf16", "topology": {"gpus_per_node": 8}}
setups = {
    "ZeRO-3": {},
    "ZeRO-3 + optimizer on CPU": {"offload": {"optimizer": "cpu"}},
    "ZeRO-3 + optimizer and params on CPU": {"offload": {"optimizer": "cpu", "params": "cpu"}},
    "ZeRO-3 + both on NVMe": {"offload": {"optimizer": "nvme", "params": "nvme", "nvme_path": "/local_nvme"}},
    "FSDP2 + CPU offload (all)": {"framework": "fsdp2", "offload": {"optimizer": "cpu", "params": "cpu"}},
}
pd.DataFrame([row(k, plan_from_dict({**base, **v}), MODEL, GPU) for k, v in setups.items()]).set_index("setup")

# %% [markdown]
# The DeepSpeed config for the NVMe setup. The `nvme_path` must be a fast local drive on every node;
# DeepSpeed reads and writes it with asynchronous I/O (a CUDA machine only).

# %%
print(export(plan_from_dict({**base, **setups["ZeRO-3 + both on NVMe"]}), "deepspeed"))

# %% [markdown]
# ## 2. Several nodes: hybrid sharding and ZeRO++
#
# Full sharding across 2 nodes × 8 GPUs gathers every parameter from all 16 GPUs, so most bytes cross
# the slow link between nodes. Hybrid sharding (FSDP's HYBRID_SHARD, or a 2-D mesh in FSDP2) shards
# inside a node and keeps a copy per node: only the gradient reduction crosses nodes. DeepSpeed's
# ZeRO++ gets there with a secondary copy of the weights per node (hpZ) and adds quantized
# collectives (qwZ: int8 weights, qgZ: int4 gradients; CUDA only).

# %%
MODEL, GPU = "gpt-6.7b", "h100-80gb"
two = {"sharding": "zero3", "precision": "bf16", "topology": {"nodes": 2, "gpus_per_node": 8}}
setups = {
    "FSDP2 full shard": {"framework": "fsdp2"},
    "FSDP2 hybrid": {"framework": "fsdp2", "sharding": "hybrid"},
    "DeepSpeed ZeRO-3": {"framework": "deepspeed"},
    "ZeRO++ hpZ": {"framework": "deepspeed", "zeropp": {"hpz_partition_size": 8}},
    "ZeRO++ hpZ + qwZ + qgZ": {"framework": "deepspeed", "zeropp": {"hpz_partition_size": 8, "quantized_weights": True, "quantized_gradients": True}},
}
multi = pd.DataFrame([row(k, plan_from_dict({**two, **v}), MODEL, GPU) for k, v in setups.items()]).set_index("setup")
multi

# %% [markdown]
# Hybrid costs memory (a full parameter shard per node instead of per cluster) and buys a large cut in
# inter-node bytes. ZeRO++ keeps most of ZeRO-3's memory saving and cuts the inter-node traffic
# through the secondary copy and quantization.

# %% [markdown]
# ## 3. Launching on several nodes
#
# The same plan, started four ways. `torchrun` and `accelerate launch` run once per node (each with
# its node rank); the `deepspeed` launcher runs once and reaches the other nodes over ssh with a
# hostfile; a SLURM batch script asks the scheduler to start one `torchrun` per node. shardlab's own
# runner starts runs with the same `torchrun` builder, so these are commands it has run (two "nodes"
# on one machine over loopback, in its tests).

# %%
hybrid = plan_from_dict({**two, "framework": "fsdp2", "sharding": "hybrid"})
zpp = plan_from_dict({**two, **setups["ZeRO++ hpZ"]})
for title, plan, target in (("torchrun (FSDP2 hybrid)", hybrid, "torchrun"), ("accelerate launch (FSDP2 hybrid)", hybrid, "accelerate-launch"),
                            ("deepspeed launcher (ZeRO++ hpZ)", zpp, "deepspeed-launch")):
    print(f"--- {title} ---")
    print(export(plan, target))

# %%
print(export(zpp, "slurm"))

# %% [markdown]
# ## 4. When the network is slow
#
# The estimator's GPU table assumes a fast fabric between nodes (400 Gb/s per H100). Many clusters
# have far less. Make a GPU with a slower inter-node link and sweep it from 400 Gb/s down to 10 Gb/s
# Ethernet: full sharding's step time climbs with every halving, while hybrid sharding and ZeRO++ barely
# notice until the link gets very slow.

# %%
rows = []
for gbits in (400, 200, 100, 50, 25, 10):
    gpu = replace(get_gpu(GPU), name=f"{GPU}@{gbits}Gb/s", inter_node_bw=gbits * 1e9 / 8)
    for name in ("FSDP2 full shard", "FSDP2 hybrid", "ZeRO++ hpZ", "ZeRO++ hpZ + qwZ + qgZ"):
        e = estimate(plan_from_dict({**two, **setups[name]}), MODEL, gpu)
        rows.append({"inter-node Gb/s": gbits, "setup": name, "step (s)": e.time["step_time_s"]})
sweep = pd.DataFrame(rows)
sweep.pivot(index="inter-node Gb/s", columns="setup", values="step (s)").round(2).sort_index(ascending=False)

# %%
pn.panel(sweep.hvplot.line(x="inter-node Gb/s", y="step (s)", by="setup", logx=True, logy=True, marker="o",
                           title=f"{MODEL} on 2 x 8 {GPU}: step time vs inter-node bandwidth", width=720, height=340))

# %% [markdown]
# **Take away:** on one node, shard fully and offload only when nothing else fits (it costs several
# times the step). Across nodes, let the network decide: with a fast fabric full sharding is fine;
# with a slow one, keep parameter traffic inside the node (hybrid, hpZ) and, on GPUs, quantize it.
