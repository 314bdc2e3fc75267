# %% [markdown]
# # 09 · Let shardlab choose: `tune`
#
# The question people bring is rarely "what does ZeRO-3 cost?" but "what should I run?". `shardlab
# tune` answers it the way you would by hand, only faster: it lists the plans worth considering
# (framework x sharding x offload x activation checkpointing x micro-batch x accumulation x compile),
# throws out those the plan rules refuse and those the memory estimate says will not fit, ranks the
# rest by the estimated speed, and then **runs the best few for real** to check. It stops when the
# measured best beats every plan not yet run, even if that plan were 25% faster than estimated (the
# step model's error bar), or when the budget of trial runs is spent.
#
# Here we tune `gpt-tiny` on this machine's CPU processes (a GPU works the same way, with bigger
# models) and look at what was predicted next to what was measured for each trial.

# %%
import panel as pn

pn.extension(inline=True)  # inline: the widgets and plots work offline too

from labkit import lab_device, runs_dir
from shardlab import plots
from shardlab.tune import Space, tune

DEVICE, NPROC = lab_device()
print(f"device={DEVICE}, trials on {NPROC if DEVICE == 'cuda' else 1} rank(s), runs in {runs_dir()!r}")

# %% [markdown]
# ## 1. First, estimate only (budget 0)
#
# A dry run prices every candidate for any GPU in the table, without running anything: here gpt-1.3b
# on 8 H100s. Count why candidates were rejected: a rule of the plan (e.g. zero1 has no FSDP
# equivalent), or "does not fit" (the predicted peak allocated, plus what the caching allocator cannot
# give back when it frees its cache at the limit, plus the CUDA context, above the GPU's memory). A
# "tight" candidate fits only if the estimate is not short by its measured error (10%): it is kept,
# and a trial decides. The `grp` column groups twins: one framework's predictions within 1%, which the
# step model cannot tell apart (e.g. forward prefetch on/off); the search runs at most one trial per group.

# %%
dry = tune("gpt-1.3b", gpus=8, gpu="h100-80gb", dry_run=True)
print(dry.summary(top=8))

# %% [markdown]
# ## 2. Tune for real, with a budget of two trial runs
#
# We keep the search small so it runs in about a minute: FSDP2, micro-batch 2 or 8, with and without
# activation checkpointing. Each trial is an ordinary run in the run store (`shardlab runs` lists it)
# of 6 steps, the first 2 not timed.

# %%
space = Space(frameworks=("fsdp2",), shardings=("zero2",), offloads=("none",), checkpointing=(False, True),
              micro_batches=(2, 8), compile=(False,), knobs=False)
result = tune("gpt-tiny", gpus=1, budget=2, device=DEVICE, space=space, out=runs_dir(), steps=6, warmup=2)
print(result.summary())

# %% [markdown]
# ## 3. Predicted vs measured, trial by trial
#
# On a CPU the estimate is priced for a rough stand-in device, so measured tokens/s can be far from the
# prediction in absolute terms. What the search relies on is the *ranking*: after the first trial it
# rescales the other candidates' predictions by what it measured (measured / predicted), then asks if
# any of them could still win.

# %%
t = result.table()
trials = t[t["trial"].notna()][["trial", "key", "status", "predicted_tokens_per_s", "measured_tokens_per_s",
                                 "measured_tokens_per_s_lo", "measured_tokens_per_s_hi", "tokens_per_s_error"]]
trials

# %% [markdown]
# A measured figure is the median step period of the trial, and `_lo` / `_hi` are tokens/s at the slow
# and fast quartile periods: how much the steps of that one run wandered. When two trials' ranges overlap,
# one run each did not tell them apart: `result.summary()` says so under the pick, and with budget to
# spare tune runs the two best again and pools their steps. On a GPU a trial times about 3 seconds of
# steps (a fixed `steps=` like ours here overrides that).

# %%
print("not told apart from the pick:", [c.key for c in result.not_told_apart] or "none")

# %% [markdown]
# The pick is a plan like any other: `result.plan` (export it with `shardlab export`, or write it with
# `result.write("tune-out")`, which also writes the ranked table and an HTML report). The plot shows
# memory against speed for every candidate that fits: grey the predictions, blue the measured trials,
# red the pick, and the Pareto front (nothing is both faster and smaller).

# %%
print(result.plan.to_yaml(minimal=True))
plots.tune_pareto(result.pareto())

# %% [markdown]
# ## 4. The same in a widget
#
# `TuneRunner` is the app's **Tune** tab: pick the model, goal and budget, press Start, watch the trials
# come in, Cancel at any time (the trial running is stopped and no process is left). Try the goals
# `largest-batch` and `least-memory`, or tick "estimate only".

# %%
from shardlab_widgets import TuneRunner

TuneRunner(model="gpt-tiny", budget="2", device=DEVICE, out=runs_dir(), space=space)
