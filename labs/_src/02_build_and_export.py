# %% [markdown]
# # 02 · Build and export a config
#
# One plan, every tool's format. Below is shardlab's **ConfigBuilder**: pick a framework, a sharding
# strategy, precision, offload and the rest. Whatever you choose is checked as you go (the messages
# appear beside the control at fault, options that cannot apply are greyed out), exported live in the
# tabs on the right, and priced by the memory bar. Try `framework: fsdp2` with `offload.optimizer: cpu`,
# or `sharding: zero1`, and read what it says.

# %%
import panel as pn

pn.extension(inline=True)  # inline: the widgets work offline too

from shardlab_widgets import ConfigBuilder

builder = ConfigBuilder(model="gpt-1.3b", gpu="h100-80gb")
builder

# %% [markdown]
# ## 1. The same builder, from Python
#
# Everything the controls do can be done in code, which is handy to script a workshop step or to
# check what a learner sees. `set` changes a field the way its control would; `messages` returns
# what is shown beside a control.

# %%
builder.set("framework", "deepspeed")
builder.set("sharding", "zero2")
# With ZeRO-2 the parameters are not partitioned, so parameter offload is greyed out, with the reason:
for option, why in builder.unavailable("offload.params").items():
    print(f"offload.params={option} unavailable: {why}")
builder.set("sharding", "zero3")
builder.set("offload.params", "cpu")
builder.set("offload.optimizer", "cpu")
builder.set("sharding", "hybrid")  # one node only: valid, but worth a warning
print("\nmessages now:", builder.messages())
builder.set("sharding", "zero3")
print("after sharding=zero3:", builder.messages() or "none, the plan is valid")
plan = builder.plan
print()
print(plan.to_yaml(minimal=True))

# %% [markdown]
# `to_yaml(minimal=True)` writes only what differs from the defaults: that is a complete plan file.
# Save it and every `shardlab` command can use it. (This notebook keeps the files it writes in
# `my_files/`, next to the notebook.)

# %%
from pathlib import Path

FILES = Path("my_files")
FILES.mkdir(exist_ok=True)
(FILES / "my_plan.yaml").write_text(plan.to_yaml(minimal=True))
print((FILES / "my_plan.yaml").read_text())

# %% [markdown]
# ## 2. Export for the real tools
#
# `export(plan, target)` is what `shardlab export PLAN --to TARGET` prints. The DeepSpeed JSON and the
# accelerate YAML are the files those tools read; `torchrun` and `slurm` are the commands that start
# the program; `fsdp-code` is a short, runnable PyTorch program for the FSDP frameworks.

# %%
from shardlab.export import TARGETS, export

print("targets:", ", ".join(TARGETS))
print("\n--- deepspeed (ds_config.json) ---")
print(export(plan, "deepspeed"))
print("--- accelerate (accelerate_config.yaml) ---")
print(export(plan, "accelerate"))

# %% [markdown]
# The same plan on two nodes of eight GPUs, as a `torchrun` command per node and as a SLURM script.
# The launch line is built by the same function the runner uses to start real runs (notebook 04), so
# a command shardlab exports is one it has run itself.

# %%
from shardlab.plan import plan_from_dict

two_nodes = plan_from_dict({**plan.to_dict(), "topology": {"nodes": 2, "gpus_per_node": 8}})
print(export(two_nodes, "torchrun"))
print(export(two_nodes, "slurm"))

# %% [markdown]
# ## 3. Bring your own config
#
# Most teams already have a `ds_config.json` (often written for the Hugging Face Trainer, full of
# `"auto"`) or an accelerate YAML. `import_config` reads either into a plan and says, note by note,
# what did not carry over and what it assumed for each `"auto"`. Nothing is dropped silently.

# %%
from shardlab.load import import_config

(FILES / "ds_config.json").write_text("""{
  "train_micro_batch_size_per_gpu": "auto",
  "gradient_accumulation_steps": 4,
  "gradient_clipping": 1.0,
  "bf16": {"enabled": true},
  "zero_optimization": {
    "stage": 3,
    "overlap_comm": true,
    "offload_optimizer": {"device": "cpu", "pin_memory": true},
    "stage3_prefetch_bucket_size": "auto",
    "stage3_gather_16bit_weights_on_model_save": true
  },
  "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}},
  "wall_clock_breakdown": false
}""")
imported, notes = import_config(FILES / "ds_config.json")
print(imported.to_yaml(minimal=True))
for n in notes:
    print("note:", n)

# %% [markdown]
# An accelerate YAML for FSDP works the same way:

# %%
(FILES / "accelerate_fsdp.yaml").write_text("""compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: bf16
num_machines: 1
num_processes: 8
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_offload_params: false
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_activation_checkpointing: true
""")
fsdp_plan, notes = import_config(FILES / "accelerate_fsdp.yaml")
print(fsdp_plan.to_yaml(minimal=True))
for n in notes:
    print("note:", n)

# %% [markdown]
# Load an imported plan into the builder to keep editing it with the controls (the builder's
# *Import a config* box does the same from an uploaded file):

# %%
builder.import_config((FILES / "ds_config.json").read_text(), name="ds_config.json")  # the file's text, as an upload gives it
print(builder.plan.framework, builder.plan.sharding, builder.plan.offload)

# %% [markdown]
# ## 4. Translate between frameworks
#
# `translate(plan, to)` rewrites a plan for another framework and lists what does not carry over.
# The DeepSpeed config above offloads only the optimizer; FSDP cannot do that (all or nothing), so the
# translation has to choose, and tells you which way it went and why.

# %%
from shardlab.load import translate

for target in ("fsdp2", "fsdp1"):
    moved, notes = translate(imported, target)
    print(f"=== deepspeed -> {target}: {moved.framework} {moved.sharding}, offload {moved.offload.optimizer}/{moved.offload.params}")
    for n in notes:
        print("  note:", n)
    print("  valid:", not moved.errors())

# %% [markdown]
# And back the other way: the FSDP2 plan imported from accelerate, as DeepSpeed would run it.

# %%
back, notes = translate(fsdp_plan, "deepspeed")
for n in notes:
    print("note:", n)
print(export(back, "deepspeed"))

# %% [markdown]
# ## 5. The same from a terminal
#
# Every step above is one `shardlab` command. Run them in a terminal, or here:

# %%
import subprocess
import sys


def shardlab_cli(*args):
    """Run `shardlab ARGS` with this kernel's Python and show what it prints."""
    r = subprocess.run([sys.executable, "-m", "shardlab.cli", *args], capture_output=True, text=True)
    print(f"$ shardlab {' '.join(args)}   (exit {r.returncode})")
    print((r.stdout + r.stderr).strip(), "\n")

shardlab_cli("validate", "my_files/my_plan.yaml")
shardlab_cli("import", "my_files/ds_config.json", "-o", "my_files/imported.yaml")
shardlab_cli("translate", "my_files/imported.yaml", "--to", "fsdp2")
(FILES / "broken.yaml").write_text("framework: fsdp2\nsharding: zero1\n")
shardlab_cli("validate", "my_files/broken.yaml")

# %% [markdown]
# **Take away:** describe the setup once; let the tools' files be generated from it. When you move a
# config between frameworks, read the notes: they are exactly the places where FSDP and ZeRO differ.
