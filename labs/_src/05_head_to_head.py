# %% [markdown]
# # 05 · FSDP vs ZeRO, head to head
#
# Same model, same data, same seed, same two ranks: FSDP2 with full sharding and DeepSpeed ZeRO-3,
# once in bf16 mixed precision and once in plain fp32. Then we compare what the two really did:
# throughput, the bytes each rank held, the bytes each sent, and the losses step by step.
#
# Runs already in the run store with exactly the same setup (for example from notebook 04) are reused
# rather than started again; `run_once` says which. On a laptop the four runs take a minute or two; each
# shows a progress bar that names its start-up phase (the first DeepSpeed run in a new environment
# builds its C++ ops: notebook 00 does that ahead of time).

# %%
import pandas as pd
import panel as pn

pn.extension(inline=True)  # inline: the widgets work offline too

from labkit import lab_device, run_once, runs_dir
from shardlab import compare, plots

DEVICE, NPROC = lab_device()
MODEL, STEPS = "gpt-tiny", 4
runs = {}
for precision in ("bf16", "fp32"):
    for framework in ("fsdp2", "deepspeed"):
        plan = {"framework": framework, "sharding": "zero3", "precision": precision}
        runs[(framework, precision)] = r = run_once(plan, model=MODEL, steps=STEPS, nproc=NPROC, device=DEVICE, out=runs_dir())
        print(f"{framework:9} {precision}: run {r.id} {r.status}")

# %% [markdown]
# ## 1. The scoreboard
#
# `compare` puts each run's measurements next to the estimator's predictions (`*_pred`) for the same
# plan. Bytes are shown in the binary unit that fits each column (KiB = 2^10, MiB = 2^20, GiB = 2^30,
# named in the header); the best value of each column is highlighted. On a CPU the
# throughput mostly measures Python and gloo overheads of a tiny model (and DeepSpeed's engine does more
# bookkeeping per step), so read it as a smoke test; on GPUs with a real model it is the number that
# matters (see docs/benchmarks.md for an H100).

# %%
table = compare.compare(list(runs.values()))
compare.style_compare(table[["world_size", "tokens_per_s", "step_time_s", "params_bytes", "grads_bytes", "optimizer_bytes",
                             "state_bytes", "state_pred_bytes", "comm_bytes", "comm_pred_bytes", "final_loss", "loss_max_abs_diff"]])

# %%
pn.panel(plots.throughput(table))

# %% [markdown]
# ## 2. Memory: the same algorithm, different bytes
#
# Both shard everything, yet each rank holds different amounts. FSDP keeps its parameter shard in fp32
# and lets the optimizer update it directly (4 + 4 + 8 bytes per parameter, split in two). DeepSpeed
# in bf16 keeps a 16-bit parameter shard and a 16-bit gradient shard, and puts an fp32 master copy
# beside Adam's states (2 + 2 + 12 bytes). It also keeps very small parameters (biases, norms) whole on
# every rank, below its `stage3_param_persistence_threshold`. The estimator predicts all of it; the bars
# show predicted next to measured, in the unit that fits (gpt-tiny's states are a few hundred KiB).

# %%
pn.panel(plots.memory_breakdown(list(runs.values()), parts=compare.STATE_PARTS))

# %% [markdown]
# Those bars compare like with like: the model states a rank holds. The estimator's whole per-GPU
# prediction is much larger than anything measured here, and the table shows why. Its **buffers** are
# what a framework allocates on a *GPU* whatever the model's size (DeepSpeed's communication buckets and
# prefetch buffers, FSDP's all-gather buffers), and its **activations** are sized for the GPU's
# precision; a CPU run never allocates device buffers, so the measured side has nothing to set beside
# them. On a CPU the only measured total is the **process RSS**, and that is mostly PyTorch itself
# (about 300–400 MiB per process before any model exists), not the model. So on a CPU read the states
# row; the totals only meet on a GPU (notebook 06 and `docs/benchmarks.md`).

# %%
from shardlab.units import fmt_bytes

parts = compare.memory_breakdown(list(runs.values()))
pred = parts[parts["kind"] == "predicted"].pivot_table(index="run", columns="part", values="bytes", aggfunc="sum")
lesson = pd.DataFrame({
    "measured: model states per rank": table["state_bytes"],
    "predicted: model states per rank": table["state_pred_bytes"],
    "predicted: activations (GPU)": pred["activations"],
    "predicted: buffers (GPU only)": pred["buffers"],
    "predicted: total per GPU": table["peak_pred_bytes"],
    "measured: process RSS (CPU, mostly PyTorch)": table["peak_bytes"],
})
lesson.map(fmt_bytes)

# %% [markdown]
# ## 3. Communication
#
# ZeRO-3 all-gathers the parameters in forward and again in backward and reduce-scatters the gradients.
# In bf16 both gather 16-bit weights; in fp32 everything on the wire doubles. The counts below are the
# tensor bytes each rank handed to each collective per step.

# %%
pn.panel(plots.comm_bytes(list(runs.values())))

# %% [markdown]
# ## 4. Loss parity, and the bf16 difference
#
# Same seed, same batches, same model: the two frameworks should compute the same thing. In fp32 they
# agree exactly for the first steps and then differ only far down the decimals: the Adam steps are
# different implementations and floating-point sums are reduced in different orders. In bf16 they part
# earlier and by more, and that is not a bug either: FSDP rounds its fp32 parameters to bf16 for each
# forward, while DeepSpeed keeps bf16 weights that it refreshes from its fp32 master after every step,
# and the two reduce gradients in different dtypes. Where rounding happens shows in the loss.

# %%
losses = compare.loss_frame(list(runs.values()))
wide = losses.pivot_table(index="step", columns="run", values="loss")
diff = pd.DataFrame({
    f"|fsdp2 - deepspeed| {p}": (wide[f"fsdp2 zero3 {p}"] - wide[f"deepspeed zero3 {p}"]).abs() for p in ("fp32", "bf16")
})
display(wide.round(6))
for col in diff:
    d = diff[col]
    apart = d[d > 1e-6]
    same_until = int(apart.index.min()) - 1 if len(apart) else int(d.index.max())
    print(f"{col}: identical through step {same_until}, largest difference {d.max():.1e}")
diff

# %%
pn.panel(plots.loss_curves(list(runs.values())))

# %% [markdown]
# ## 5. Compare any runs with the controls
#
# The RunCompare widget lists the run store (every run of these labs is in it), and shows the same
# table and figures for whichever runs you pick. The four runs above are picked already; add the DDP
# run of notebook 04, or your own.

# %%
from shardlab_widgets import RunCompare

picker = RunCompare(runs_dir=runs_dir())
picker.select([r.id for r in runs.values()])
picker.compare()
picker

# %% [markdown]
# **Take away:** FULL_SHARD and ZeRO-3 are the same algorithm and train the same model; they differ in
# where the bytes live (fp32 shards vs 16-bit weights plus an fp32 master), in how many bytes move, and,
# in bf16, in where rounding happens. For a fair comparison of your own, fix the seed and the data,
# compare in fp32 first, then switch on mixed precision.
