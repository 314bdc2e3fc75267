# %% [markdown]
# # 08 · Bring your own model
#
# So far every run trained shardlab's own tiny GPT. The model you will shard is most likely a Hugging
# Face transformers model, or an `nn.Module` of your own. shardlab takes both wherever it takes a model:
# `--model` on the command line, `model=` in Python, and the model box of the app.
#
# This lab uses a small Llama-style config shipped next to the notebooks, `tiny_llama_config.json`,
# exactly as transformers' `save_pretrained` writes one. shardlab builds the model from the config with
# random weights: nothing is downloaded. We estimate it, train it under FSDP2 and DeepSpeed ZeRO-3, and
# compare what the ranks held with the estimate.

# %%
import json
from pathlib import Path

import shardlab
from labkit import lab_device, runs_dir
from shardlab import compare
from shardlab.estimate import estimate
from shardlab.models import flops_per_token, resolve_model

DEVICE, NPROC = lab_device()
# the config sits next to the notebooks (labs/); a copy of the notebook elsewhere finds it in the repository
CONFIG = next(p for p in (Path("tiny_llama_config.json"), Path(shardlab.__file__).resolve().parents[1] / "labs" / "tiny_llama_config.json")
              if p.exists())
cfg = json.loads(CONFIG.read_text())
print(f"device={DEVICE}, {NPROC} ranks; config {CONFIG}:")
print({k: cfg[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                           "intermediate_size", "vocab_size")})

# %% [markdown]
# ## 1. What shardlab reads from your model
#
# A model source is a string: the config file's path, optionally followed by `key=value` overrides of
# the config (and `seq_len=N`, the length of the synthetic sequences). shardlab builds the model on
# PyTorch's *meta* device (shapes, no memory) and reads from it:
#
# - the parameters, counted exactly (tied weights once);
# - the **wrap unit**: the block FSDP shards as one unit and ZeRO-3 gathers as one, from the model's
#   own `_no_split_modules` (here `LlamaDecoderLayer`), else the module class that repeats;
# - FLOPs per token, counted by `torch.utils.flop_counter` on one forward and backward, so every run
#   reports TFLOPS (and MFU on a GPU).

# %%
MODEL = f"{CONFIG} seq_len=64"
spec = resolve_model(MODEL)
n = spec.params - spec.vocab * spec.hidden  # the embedding lookup is not a matmul
print(f"{spec.params:,} parameters; wrap unit {spec.wrap_cls} x {spec.wrap_unit_count}")
print(f"FLOPs per token: counted {flops_per_token(spec):,}; the 6N + 12·L·d·T rule of thumb {6 * n + 12 * spec.layers * spec.hidden * spec.seq_len:,}")

# %% [markdown]
# ## 2. Estimate it under FSDP2 and DeepSpeed ZeRO-3
#
# The estimate works from what was read: the real parameter tensors (for FSDP2's per-tensor padding and
# ZeRO-3's persistence threshold), the transformer shape from the config (for activations).

# %%
plans = {"FSDP2": {"framework": "fsdp2", "sharding": "zero3", "precision": "bf16"},
         "DeepSpeed ZeRO-3": {"framework": "deepspeed", "sharding": "zero3", "precision": "bf16"}}
topo = {"topology": {"gpus_per_node": NPROC}}
ests = {name: estimate({**p, **topo}, MODEL).to_dict()["per_gpu"] for name, p in plans.items()}
for name, e in ests.items():
    print(f"{name:17s} per rank: params {e['params']:,} B, grads {e['grads']:,} B, optimizer {e['optimizer']:,} B, activations {e['activations']:,} B")

# %% [markdown]
# ## 3. Train it for real
#
# Both runs start at once; each rank builds the model from the config, shardlab finds its block class
# and writes it into the run's plan (`wrap.transformer_layer_cls: LlamaDecoderLayer`), and the batches
# are synthetic token ids of the config's vocabulary.

# %%
runs = {name: shardlab.launch({**p, **topo}, model=MODEL, steps=3, nproc=NPROC, device=DEVICE, out=runs_dir(), timeout_s=400)
        for name, p in plans.items()}
for name, run in runs.items():
    status = run.wait()
    print(f"{name}: {status}, wrap class in its plan: {run.plan.wrap.transformer_layer_cls}")
    assert status == "completed", run.info.get("error")

# %% [markdown]
# ## 4. Measured against estimated
#
# Each rank measured the model states it really held (from the frameworks' own tensors). They should
# match the estimate within a few percent; the loss is the same model learning the same tokens.

# %%
for name, run in runs.items():
    m = run.metrics
    last = m[m["step"] == m["step"].max()].iloc[0]
    for part in ("params", "grads", "optimizer"):
        measured, predicted = last[f"state_bytes.{part}"], ests[name][part]
        print(f"{name:17s} {part:9s} measured {measured:>9,.0f} B, estimated {predicted:>9,.0f} B ({measured / predicted - 1:+.1%})")
    print(f"{name:17s} TFLOPS per rank {m['tflops'].mean():.6f}, final loss {m['loss'].iloc[-1]:.3f}")
both = compare.compare(list(runs.values()))
both[["framework", "world_size", "state_bytes", "state_pred_bytes", "final_loss"]]

# %% [markdown]
# ## 5. The same family at full size, on paper
#
# Overrides turn the toy config into a real one without touching the file: here a 7B Llama shape at
# 4096 tokens. Only the estimate: the model is built on the meta device, never in memory.

# %%
big = f"{CONFIG} hidden_size=4096 intermediate_size=11008 num_hidden_layers=32 num_attention_heads=32 num_key_value_heads=32 vocab_size=32000 seq_len=4096"
for name, p in plans.items():
    e = estimate({**p, "topology": {"gpus_per_node": 8}}, big, gpu="h100-80gb")
    print(f"{name:17s} 8 x H100 80GB: {e.per_gpu['total'] / 2**30:.1f} GiB per GPU, fits: {e.fits}")

# %% [markdown]
# ## Your own `nn.Module`
#
# A factory function in a `.py` file (so the training processes can import it) is a model source too:
# `module:function`. It returns the model, or `(model, batch_fn)` if you want to make the batches.
# shardlab reads what the model takes from its first layer (an `Embedding` takes token ids) and its
# sequence length from a `seq_len` attribute or `seq_len=N` in the source.

# %%
Path("my_model.py").write_text('''
import torch
from torch import nn

class MyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))

class MyLM(nn.Module):
    def __init__(self, vocab=1000, d=128, layers=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[MyBlock(d) for _ in range(layers)])
        self.head = nn.Linear(d, vocab)
    def forward(self, ids):
        return self.head(self.blocks(self.emb(ids)))

def make(layers=4):
    return MyLM(layers=layers)
''')
mine = resolve_model("my_model:make layers=6 seq_len=256")
print(f"{mine.params:,} parameters, wrap unit {mine.wrap_cls} x {mine.wrap_unit_count}, {flops_per_token(mine):,} FLOPs per token")
estimate(plans["FSDP2"], "my_model:make layers=6 seq_len=256").to_dict()["per_gpu"]["params"]

# %% [markdown]
# ## Everywhere else
#
# - Command line: `shardlab estimate plan.yaml --model hf:llama hidden_size=2048 num_hidden_layers=16`,
#   `shardlab run plan.yaml --model labs/tiny_llama_config.json --steps 3 --device cpu`,
#   `shardlab run plan.yaml --model my_model:make --steps 3`.
# - The widgets in a notebook (`ConfigBuilder()`, `RunLauncher(builder)`): type the source into the
#   model box and leave it (Tab): the estimate follows, and Start runs it. The served app
#   (`shardlab app`) takes presets and `hf:` sources there (not files or `module:function`, which would
#   be read or run on the server).
# - If shardlab cannot find a block class in your model, name it: `wrap: {transformer_layer_cls: MyBlock}`.
