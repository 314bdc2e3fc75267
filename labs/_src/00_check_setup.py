# %% [markdown]
# # 00 · Check your setup
#
# Before the workshop starts, make sure this machine can do what the labs ask of it. This notebook
# reads the installed versions, looks for GPUs, and ends with a two-process training run of a tiny
# GPT. If the last cell says **completed**, every other lab will run here too.
#
# Nothing in these labs needs a GPU. On a laptop they train `gpt-tiny` with 2 CPU processes talking
# over gloo; where two or more CUDA GPUs are present they use those instead, with no edits.
#
# **How to run every lab:** open it, wait until the status bar at the bottom says
# `Python 3 (ipykernel) | Idle` (it says `Initializing`, then `Connecting`, while the kernel starts),
# then *Run > Run All Cells*. When you are done, *File > Close and Shut Down Notebook* before opening
# the next lab. A Run All clicked while the kernel is still starting runs nothing: every cell stays
# `[ ]`. Run it again once the status bar says `Idle`.

# %% [markdown]
# ## 1. The software
#
# The versions below are the ones pinned in `requirements.txt`. A mismatch is worth fixing before
# the workshop (`make lab` reinstalls the pinned set into `.venv`).

# %%
import platform

import pandas as pd

import shardlab
from shardlab import doctor

# "ok" follows pip's rule: a local build label is the same release (2.13.0+cpu satisfies the pin 2.13.0)
print(f"Python {platform.python_version()} on {platform.system()} {platform.machine()}; shardlab {shardlab.__version__}")
pd.DataFrame(doctor.version_rows()).set_index("package")

# %% [markdown]
# ## 2. The hardware
#
# shardlab asks NVIDIA's management library (NVML) how many GPUs there are, without starting CUDA.
# The CPU count and memory matter too: on a CPU run every rank is a process with its own copy of
# PyTorch (about 300–400 MB each).

# %%
import os

import psutil

from labkit import gpu_count, lab_device, runs_dir

n_gpus = gpu_count()
print(f"CPU cores: {os.cpu_count()}, memory: {psutil.virtual_memory().total / 2**30:.1f} GiB (GiB = 2^30 bytes)")
print(f"CUDA GPUs found: {n_gpus}")
if n_gpus:
    import torch

    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB")

DEVICE, NPROC = lab_device()
print(f"\nThe labs will run on: device={DEVICE!r} with {NPROC} processes; runs are stored in {runs_dir()!r}")

# %% [markdown]
# ## 3. The first-run builds, done now rather than mid-lab
#
# DeepSpeed compiles two small C++ operators the first time a run needs them: its shared-memory
# collectives (every DeepSpeed run on a CPU) and CPU Adam (optimizer offload). On a 2-core laptop that
# takes a minute or two, and a run would sit at step 0 meanwhile. This cell checks the C++ compiler and
# builds both once, into this environment's own folder (`.venv/torch_extensions`); later runs load them
# in a second. It also checks that everything the notebooks and the app display comes from this
# machine, so the labs work without internet. The same check runs from a terminal: `shardlab doctor`.

# %%
checks = doctor.run_checks(warm=True)
failed = [c for c in checks if c.ok is False]
assert not failed, "fix the FAIL lines above (or ask the facilitator) before going on"

# %% [markdown]
# ## 4. What this machine could train
#
# The estimator (notebook 03 opens it up) predicts memory per GPU for a plan and a model. Here it
# answers a practical question for the GPU kind in this machine, or for an H100 80GB if there is
# none: for each model preset, the fewest GPUs that hold it with full sharding (ZeRO-3) in bf16.

# %%
from shardlab.estimate import GPUS
from shardlab.estimate.fits import min_gpus
from shardlab.plan import Plan


def table_gpu():
    """The GPU table's entry closest to this machine's first GPU (h100-80gb when there is none)."""
    if not n_gpus:
        return "h100-80gb"
    import torch

    name = torch.cuda.get_device_name(0).lower().replace(" ", "")
    for key in ("h200", "h100", "a100", "l4", "a10g", "4090"):
        if key in name:
            return {"h100": "h100-80gb", "a100": "a100-80gb", "4090": "rtx4090"}.get(key, key)
    return "h100-80gb"

GPU = table_gpu()
plan = Plan(framework="fsdp2", sharding="zero3", precision="bf16", topology={"gpus_per_node": 8})
def fewest(model):
    n = min_gpus(plan, model, GPU)
    # None: no GPU count helps, because activations (which sharding does not split) exceed one GPU
    return n if n is not None else "none: activations alone exceed one GPU"

need = pd.DataFrame(
    [{"model": m, "fewest GPUs (zero3, bf16, micro-batch 1)": fewest(m)}
     for m in ["gpt-125m", "gpt-1.3b", "gpt-6.7b", "gpt-13b", "llama-8b", "llama-70b"]]
).set_index("model")
print(f"GPU kind assumed: {GPU} ({GPUS[GPU].memory_bytes / 2**30:.0f} GiB)")
need

# %% [markdown]
# ## 5. A real sharded run
#
# The final check starts the same kind of run the later labs use: `gpt-tiny` (170 thousand
# parameters), FSDP2 with full sharding, a few optimizer steps. `shardlab.launch` starts `torchrun`,
# which starts one process per rank; `wait()` blocks until they are done, and the progress bar names
# each start-up phase (rendezvous, building the model, ...) until the first step is done.

# %%
run = shardlab.launch(
    {"framework": "fsdp2", "sharding": "zero3", "precision": "bf16"},
    model="gpt-tiny", steps=3, nproc=NPROC, device=DEVICE, out=runs_dir(), timeout_s=120, progress=True,
)
status = run.wait()
print(f"run {run.id}: {status}")
if status != "completed":
    print(run.info.get("error"))
    print(run.log(0)[-2000:])
assert status == "completed", "the setup check failed: read the error above, or ask the facilitator"

# %% [markdown]
# **completed** means PyTorch, the process group and the run store all work. The run's losses, one
# line per step and rank:

# %%
run.metrics[["step", "rank", "loss", "step_time_s"]]
