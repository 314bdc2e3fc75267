# %% [markdown]
# # 04 · Your first sharded run
#
# Time to train for real. We start a tiny GPT (`gpt-tiny`, 170 thousand parameters) with FSDP2 full
# sharding (ZeRO-3) on two ranks (or up to four GPUs), read what each rank really held, and watch memory over time. On a
# laptop the two ranks are CPU processes talking over gloo; with two or more GPUs they are GPUs
# talking over NCCL. The notebook picks for you.

# %%
import pandas as pd
import panel as pn

pn.extension(inline=True)  # inline: the widgets work offline too

import shardlab
from labkit import lab_device, runs_dir
from shardlab import compare, plots
from shardlab.models import PRESETS

DEVICE, NPROC = lab_device()
MODEL = "gpt-tiny"
print(f"device={DEVICE}, {NPROC} ranks, model {MODEL} ({PRESETS[MODEL].params:,} parameters), runs in {runs_dir()!r}")

# %% [markdown]
# ## 1. Launch
#
# `shardlab.launch(plan, model, steps, nproc, device)` starts the run and returns at once; `wait()`
# blocks until every rank is done. Under the hood it runs exactly the `torchrun` command that
# `shardlab export --to torchrun` prints, and records everything in a run folder.

# %%
plan = {"framework": "fsdp2", "sharding": "zero3", "precision": "bf16"}
run = shardlab.launch(plan, model=MODEL, steps=4, nproc=NPROC, device=DEVICE, out=runs_dir(), timeout_s=180, progress=True)
print(f"run {run.id} started in {run.dir}")
status = run.wait()
print("status:", status)
assert status == "completed", run.info.get("error")

# %% [markdown]
# The run folder is plain files: the plan as it ran, the exact launch command, a status file, one
# metrics line per step per rank, and a memory timeline. Anything can read them back later, even after
# a kernel restart (`shardlab.run.store.load_run(folder)`).

# %%
print(sorted(p.name for p in run.dir.iterdir()))
print((run.dir / "plan.yaml").read_text()[:300])
run.metrics[["step", "rank", "loss", "step_time_s", "tokens_per_s"]].head(6)

# %% [markdown]
# ## 2. Each rank holds 1/N of the model states
#
# The worker measures the tensors each rank really keeps between steps: its shard of the parameters,
# of the gradients, and of Adam's two states. FSDP keeps them in fp32, so the whole model's states are
# 4 + 4 + 8 = 16 bytes per parameter. Divide by the number of ranks and compare.

# %%
m = run.metrics
last = m[m["step"] == m["step"].max()].set_index("rank")
held = last[["state_bytes.params", "state_bytes.grads", "state_bytes.optimizer"]]
held.columns = ["params", "grads", "optimizer"]
held["total"] = held.sum(axis=1)
n_params = PRESETS[MODEL].params
full = {"params": 4 * n_params, "grads": 4 * n_params, "optimizer": 8 * n_params}
full["total"] = sum(full.values())
share = held / pd.Series(full)
print(f"whole model states: {full['total']:,} bytes (16 x {n_params:,}); each rank's share:")
share.round(3)

# %% [markdown]
# Each of the N ranks holds 1/N of every state: 0.5 with two ranks (a hair more where a tensor does not
# split evenly and FSDP pads it). Now the same model with plain data parallelism (`sharding: ddp`) for contrast: every rank keeps
# it all.

# %%
ddp = shardlab.launch({**plan, "sharding": "ddp"}, model=MODEL, steps=4, nproc=NPROC, device=DEVICE, out=runs_dir(), timeout_s=180, progress=True)
assert ddp.wait() == "completed", ddp.info.get("error")
both = compare.compare([run, ddp])
both[["world_size", "params_bytes", "grads_bytes", "optimizer_bytes", "state_bytes", "state_pred_bytes", "comm_bytes", "final_loss"]]

# %% [markdown]
# `state_pred_bytes` is the estimator's prediction for the same plan and model (notebook 03): measured
# and predicted should agree to the byte or close to it. The two runs see the same data and the same
# seed, so their losses agree too: sharding changes where the bytes live, not the arithmetic.

# %% [markdown]
# ## 3. Memory over time
#
# The launcher samples each rank's memory (process RSS on a CPU, the GPU's used memory with NVML on
# CUDA) many times a second. The bands mark forward (blue), backward (orange) and the optimizer step
# (green) of each step. On a CPU the curve is dominated by PyTorch itself (a few hundred MB per
# process), so the model's share is small; on GPUs with a real model the steps show as a saw-tooth:
# parameters gathered, activations built up in forward, freed in backward.

# %%
pn.panel(plots.memory_timeline(run))

# %% [markdown]
# ## 4. What went over the wire
#
# ZeRO-3 all-gathers parameters (forward and again in backward) and reduce-scatters gradients; DDP
# all-reduces gradients. The worker counts the bytes handed to each collective per step, and the
# estimator predicts them.

# %%
pn.panel(plots.comm_bytes([run, ddp]))

# %% [markdown]
# ## 5. Try it with the controls
#
# The RunLauncher widget does the same from buttons: pick a model, steps and processes, press
# **Start run**, and watch memory and throughput arrive live. (Not started automatically here.)

# %%
from shardlab_widgets import RunLauncher

RunLauncher(plan, model=MODEL, steps=10, nproc=NPROC, device=DEVICE, out=runs_dir())

# %% [markdown]
# **Take away:** with ZeRO-3 / FULL_SHARD each of N ranks holds 1/N of the parameters, gradients and
# optimizer states, and pays for it in all-gathers. Next: FSDP and DeepSpeed on the same run.
