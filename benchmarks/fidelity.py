"""GPU fidelity matrix (issue 13): the memory estimators against what torch measures through the runner.

Each configuration (model shape x framework x sharding x precision x micro-batch x accumulation x
activation checkpointing x offload x torch.compile) is one run through `shardlab.launch` (torchrun,
the worker, world size 1), a few steps long. Per row it records what the worker measured (rank 0):
peak allocated and reserved (max over the steps), the allocated bytes at the end of forward,
backward and the optimizer step, the model-state bytes by category (GPU and offloaded), and the
steady step time and tokens/s (median over the steps after the first two).

Predictions are added here on a CPU afterwards (`--predict FILE`): the analytical estimate and the
traced one (shardlab.estimate, method="analytic" / "trace"), with per-category differences, so a
GPU call spends its time measuring only.

    # on the GPU machine (benchmarks/on_gpu.sh installs the carried wheels first):
    bash benchmarks/on_gpu.sh benchmarks/fidelity.py --out $OUT/f --jobs 3
    # here: add the predictions and print the table
    .venv/bin/python benchmarks/fidelity.py --predict benchmarks/results/fidelity_h200.json
    # a CPU dry run of the script itself (tiny shapes, what runs on a CPU):
    .venv/bin/python benchmarks/fidelity.py --out /tmp/f --device cpu --tiny --only 1,12,42

`--jobs N` runs N configurations at once on the one GPU (memory is per process, so peaks are
unaffected; a row's `concurrent` says how many others ran beside it, and its timings are then not
clean step times). The scheduler starts a run only while the sum of the runs' generous memory
guesses stays under `--mem-gib`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
# Shapes (100M-1B, small enough for a few-second step; each exercises a different term)
MODELS = {
    "gpt125": "gpt-125m",                     # 12 x 768, GPT-2 vocab, T=2048
    "gpt350": "gpt-350m",                     # 24 x 1024, T=2048
    "gpt1b": "gpt-1b",                        # the shape the estimator was first fitted to
    "gptT1k": {"name": "gptT1k", "family": "gpt", "layers": 12, "hidden": 1536, "heads": 12, "vocab": 50257, "seq_len": 1024},
    "llama300": {"name": "llama300", "family": "llama", "layers": 16, "hidden": 1024, "heads": 16, "kv_heads": 4,
                 "ffn_hidden": 2816, "vocab": 32000, "seq_len": 2048},
    "llama128k": {"name": "llama128k", "family": "llama", "layers": 8, "hidden": 1024, "heads": 8, "kv_heads": 2,
                  "ffn_hidden": 3584, "vocab": 128256, "seq_len": 4096},
    "llama1b": {"name": "llama1b", "family": "llama", "layers": 16, "hidden": 2048, "heads": 16, "kv_heads": 8,
                "ffn_hidden": 5632, "vocab": 32000, "seq_len": 2048},
}
# shapes for the check set (--set check): none of them was used to find or fit a mechanism
MODELS.update({
    "gpt1280": {"name": "gpt1280", "family": "gpt", "layers": 20, "hidden": 1280, "heads": 20, "vocab": 50257, "seq_len": 1536},
    "llama65k": {"name": "llama65k", "family": "llama", "layers": 12, "hidden": 1536, "heads": 12, "kv_heads": 4,
                 "ffn_hidden": 4096, "vocab": 65536, "seq_len": 3072},
    "llama152k": {"name": "llama152k", "family": "llama", "layers": 24, "hidden": 768, "heads": 12, "kv_heads": 12,
                  "ffn_hidden": 2048, "vocab": 151936, "seq_len": 2048},
})
HF_FACTORY = "benchmarks.fidelity_hf:llama"

# (model, framework, sharding, precision, micro-batch, grad accum, AC, offload, compile, hf)
# offload: none | opt (optimizer only) | both (optimizer + params; FSDP offloads everything)
# hf: the row's model goes through benchmarks/fidelity_hf.py's factory (a models' "hf:" source needs no flag)
C = lambda m, fw, sh, pr="bf16", mb=4, ga=1, ac=False, off="none", comp=False, hf=False, lmi=False, g=1: (m, fw, sh, pr, mb, ga, ac, off, comp, hf, lmi, g)  # noqa: E731
CONFIGS = [
    C("llama300", "fsdp2", "zero3"), C("llama300", "fsdp2", "zero3", ac=True), C("llama300", "fsdp2", "zero2", mb=2),
    C("llama300", "fsdp2", "ddp", mb=2), C("llama300", "fsdp1", "zero3"), C("llama300", "fsdp1", "zero2", ac=True),
    C("llama300", "fsdp1", "ddp", mb=2), C("llama300", "deepspeed", "zero1"), C("llama300", "deepspeed", "zero2", ac=True),
    C("llama300", "deepspeed", "zero3"), C("llama300", "deepspeed", "ddp", mb=2),
    C("gpt350", "fsdp2", "ddp", "fp32", mb=2), C("gpt350", "fsdp2", "zero3", "fp32", mb=2),
    C("gpt350", "fsdp1", "zero3", "fp32", mb=2, ac=True), C("gpt350", "deepspeed", "zero1", "fp32", mb=2),
    C("gpt350", "deepspeed", "zero3", "fp32", mb=2), C("gpt125", "deepspeed", "ddp", "fp32"), C("gpt125", "fsdp1", "ddp", "fp32"),
    C("gpt350", "fsdp2", "zero3", "fp16"), C("gpt350", "fsdp1", "zero3", "fp16", ac=True), C("gpt350", "deepspeed", "zero2", "fp16"),
    C("gpt350", "deepspeed", "zero3", "fp16", ac=True),
    C("llama128k", "fsdp2", "zero3", mb=2), C("llama128k", "fsdp2", "zero3", mb=2, ac=True), C("llama128k", "fsdp1", "zero3", mb=1),
    C("llama128k", "deepspeed", "zero3", mb=2), C("llama128k", "deepspeed", "zero2", mb=1, ac=True),
    C("gptT1k", "fsdp2", "zero3", mb=8), C("gptT1k", "deepspeed", "zero3", mb=8, ac=True),
    C("llama300", "fsdp2", "zero3", mb=2, ga=4), C("llama300", "fsdp1", "zero2", mb=2, ga=2), C("llama300", "deepspeed", "zero1", mb=2, ga=4),
    C("llama300", "deepspeed", "zero3", mb=1, ga=2),
    C("llama300", "deepspeed", "zero2", off="opt"), C("llama300", "deepspeed", "zero3", off="both"),
    C("llama1b", "deepspeed", "zero3", mb=2, ac=True, off="both"), C("llama300", "fsdp2", "zero3", off="both"),
    C("llama300", "fsdp1", "zero3", mb=2, ac=True, off="both"),
    C("llama300", "fsdp2", "zero3", comp=True), C("gpt350", "fsdp1", "zero3", comp=True), C("llama300", "deepspeed", "zero3", comp=True),
    C("llama300", "fsdp2", "zero3", hf=True), C("llama300", "deepspeed", "zero3", hf=True), C("llama300", "deepspeed", "zero2", mb=2, ac=True, hf=True),
    C("llama1b", "fsdp2", "zero3", mb=8), C("llama1b", "deepspeed", "zero3"), C("gpt1b", "fsdp2", "zero3"), C("llama1b", "deepspeed", "zero1", mb=1),
]
CHECK_CONFIGS = [  # numbered from 101
    C("gpt1280", "fsdp2", "zero3", mb=3), C("gpt1280", "fsdp1", "zero2", "fp16", mb=2, ac=True), C("gpt1280", "deepspeed", "zero3", mb=4),
    C("gpt1280", "fsdp2", "ddp", "fp32", mb=1), C("gpt1280", "deepspeed", "zero1", "fp32", mb=1, ga=2),
    C("llama65k", "fsdp2", "zero3", mb=2), C("llama65k", "fsdp2", "zero3", mb=1, ac=True, ga=3), C("llama65k", "deepspeed", "zero3", mb=1),
    C("llama65k", "fsdp1", "zero3", mb=2, off="both"), C("llama65k", "deepspeed", "zero2", mb=2, off="opt"),
    C("llama152k", "fsdp2", "zero2", mb=4), C("llama152k", "fsdp1", "zero3", "fp16", mb=2), C("llama152k", "deepspeed", "zero3", mb=2, ac=True),
    C("llama152k", "deepspeed", "zero2", mb=6), C("llama152k", "fsdp2", "zero3", mb=5, comp=True), C("llama152k", "fsdp2", "zero3", mb=2, hf=True),
    C("llama65k", "deepspeed", "zero3", mb=2, off="both", ac=True), C("gpt1280", "deepspeed", "ddp", mb=2),
]
# the host probe (--set host, numbered from 201): one small-shape model at two widths with the same
# tensor count (hostA: the GPU's work negligible; hostB: 16x the bytes per tensor), under every
# framework and stage, so per-tensor host costs (hooks, bucketing) separate from per-byte ones
MODELS.update({
    "hostA": {"name": "hostA", "family": "gpt", "layers": 16, "hidden": 256, "heads": 4, "vocab": 8192, "seq_len": 256},
    "hostB": {"name": "hostB", "family": "gpt", "layers": 16, "hidden": 1024, "heads": 8, "vocab": 8192, "seq_len": 256},
})
HOST_CONFIGS = [C(m, fw, sh, mb=1) for m in ("hostA", "hostB") for fw, sh in (
    ("deepspeed", "ddp"), ("deepspeed", "zero1"), ("deepspeed", "zero2"), ("deepspeed", "zero3"),
    ("fsdp1", "ddp"), ("fsdp1", "zero3"), ("fsdp2", "ddp"), ("fsdp2", "zero2"), ("fsdp2", "zero3"))] + [
    C("hostB", "fsdp1", "zero2", "fp16", mb=1), C("hostB", "deepspeed", "zero2", "fp16", mb=1), C("hostB", "fsdp2", "zero3", mb=1, ga=4)]
# the validation set (--set val, numbered from 301): shapes and settings chosen after the host probe's
# changes, run on a machine calibrated in the same call, to judge the model and the calibration
MODELS.update({
    "gpt1152": {"name": "gpt1152", "family": "gpt", "layers": 28, "hidden": 1152, "heads": 18, "vocab": 50257, "seq_len": 1024},
    "llama100k": {"name": "llama100k", "family": "llama", "layers": 20, "hidden": 1792, "heads": 14, "kv_heads": 2,
                  "ffn_hidden": 4864, "vocab": 100352, "seq_len": 2048},
    "llamawide6": {"name": "llamawide6", "family": "llama", "layers": 6, "hidden": 3072, "heads": 24, "kv_heads": 8,
                   "ffn_hidden": 8192, "vocab": 32000, "seq_len": 4096},
})
VAL_CONFIGS = [
    C("gpt1152", "fsdp2", "zero3", mb=4), C("gpt1152", "deepspeed", "zero2", mb=4), C("gpt1152", "fsdp1", "zero3", "fp32", mb=1),
    C("llama100k", "fsdp2", "zero3", mb=2, ac=True), C("llama100k", "deepspeed", "zero3", mb=2), C("llama100k", "deepspeed", "zero1", mb=1, ga=2),
    C("llama100k", "fsdp1", "zero2", mb=2), C("llama100k", "fsdp2", "zero3", mb=2, off="both"), C("llama100k", "deepspeed", "zero3", mb=2, off="opt"),
    C("llamawide6", "fsdp2", "zero3", mb=1), C("llamawide6", "deepspeed", "zero3", mb=1), C("llamawide6", "fsdp1", "ddp", mb=1, ac=True),
]
# Hugging Face models the way a user gives them (--set hf, numbered from 401; issue 17): `hf:<type> key=value`
# sources, built by transformers from the config alone, wrap unit found by shardlab, each with
# low_memory_init off and on (FSDP: meta device + rank-0 broadcast; ZeRO-3: deepspeed.zero.Init through
# transformers' HfDeepSpeedConfig). Shapes chosen for this set, none used to fit anything.
MODELS.update({
    "hf-llama": "hf:llama hidden_size=1536 intermediate_size=4096 num_hidden_layers=12 num_attention_heads=12 "
                "num_key_value_heads=4 vocab_size=32000 seq_len=2048",
    "hf-gpt2": "hf:gpt2 n_embd=1024 n_layer=16 n_head=16 vocab_size=50257 seq_len=1024",
    "hf-qwen2": "hf:qwen2 hidden_size=896 intermediate_size=4864 num_hidden_layers=24 num_attention_heads=14 "
                "num_key_value_heads=2 vocab_size=151936 seq_len=2048",
})
HF_CONFIGS = [C("hf-llama", fw, "zero3", lmi=lmi) for fw in ("fsdp2", "deepspeed") for lmi in (False, True)] + [
    C("hf-gpt2", "fsdp2", "zero3", mb=8, lmi=True), C("hf-gpt2", "deepspeed", "zero3", mb=8, ac=True, lmi=True),
    C("hf-qwen2", "deepspeed", "zero3", mb=2, lmi=True), C("hf-qwen2", "fsdp1", "zero3", mb=2, ac=True, lmi=True)]
# held out for issue 14's step-time model (--set held, numbered from 501): shapes and settings written down
# before they ran (session 7), after the ZeRO-3 serialisation / recompute / offload-accumulation changes
MODELS.update({
    "gpt1792": {"name": "gpt1792", "family": "gpt", "layers": 18, "hidden": 1792, "heads": 14, "vocab": 50304, "seq_len": 1024},
    "llama80k": {"name": "llama80k", "family": "llama", "layers": 14, "hidden": 2304, "heads": 18, "kv_heads": 6,
                 "ffn_hidden": 6144, "vocab": 80000, "seq_len": 2048},
    "llama32L": {"name": "llama32L", "family": "llama", "layers": 32, "hidden": 1024, "heads": 16, "kv_heads": 4,
                 "ffn_hidden": 2816, "vocab": 49152, "seq_len": 2048},
})
HELD_CONFIGS = [
    C("llama80k", "deepspeed", "zero3", mb=2), C("llama32L", "deepspeed", "zero3", mb=4, ac=True),
    C("gpt1792", "deepspeed", "zero3", mb=2, ga=2), C("gpt1792", "deepspeed", "zero2", mb=4, ga=2, off="opt"),
    C("llama32L", "deepspeed", "zero3", mb=4, off="opt"), C("llama80k", "fsdp2", "zero3", mb=2),
    C("gpt1792", "fsdp1", "zero3", mb=4, ac=True), C("llama32L", "deepspeed", "zero1", mb=4)]
# the reserved set (--set res, numbered from 601; issue 13's reserved memory): shapes used nowhere before,
# run after cachesim.py and the traced reserved were written, to judge them (and the analytical reserved)
MODELS.update({
    "gpt896": {"name": "gpt896", "family": "gpt", "layers": 14, "hidden": 896, "heads": 14, "vocab": 50257, "seq_len": 1536},
    "llama48k": {"name": "llama48k", "family": "llama", "layers": 10, "hidden": 1280, "heads": 10, "kv_heads": 2,
                 "ffn_hidden": 3456, "vocab": 48000, "seq_len": 2560},
})
RES_CONFIGS = [
    C("gpt896", "fsdp2", "zero3", mb=3), C("gpt896", "fsdp2", "zero2", mb=4, ac=True), C("gpt896", "fsdp2", "ddp", "fp32", mb=1),
    C("gpt896", "fsdp1", "zero3", mb=2), C("gpt896", "deepspeed", "zero2", mb=2), C("gpt896", "deepspeed", "ddp", mb=3),
    C("llama48k", "fsdp2", "zero3", mb=2), C("llama48k", "fsdp2", "zero3", "fp16", mb=1, ga=2), C("llama48k", "fsdp1", "ddp", mb=3, ac=True),
    C("llama48k", "deepspeed", "zero3", mb=2), C("llama48k", "deepspeed", "zero1", mb=1, ga=2), C("llama48k", "fsdp2", "ddp", mb=2, ac=True),
]
# the unseen set of session 11 (--set new, numbered from 701; issues 13 and 14): shapes and settings written
# down before they ran (2026-12-02 11:19 UTC), none used to find or fit anything: a deep narrow gpt (host-bound),
# a wide shallow llama, multi-query attention with narrow heads and a 128k vocabulary, T=4096, a Qwen2 model
# through transformers; every framework, fp32 / fp16 / bf16, accumulation, checkpointing, offload, compile
MODELS.update({
    "gpt640x32": {"name": "gpt640x32", "family": "gpt", "layers": 32, "hidden": 640, "heads": 10, "vocab": 50257, "seq_len": 1024},
    "llama2560": {"name": "llama2560", "family": "llama", "layers": 8, "hidden": 2560, "heads": 20, "kv_heads": 4,
                  "ffn_hidden": 6912, "vocab": 64000, "seq_len": 2048},
    "llamaMQA": {"name": "llamaMQA", "family": "llama", "layers": 18, "hidden": 1536, "heads": 24, "kv_heads": 1,
                 "ffn_hidden": 4096, "vocab": 128256, "seq_len": 1024},
    "gptT4k": {"name": "gptT4k", "family": "gpt", "layers": 12, "hidden": 1024, "heads": 8, "vocab": 32768, "seq_len": 4096},
    "hf-qwen2b": "hf:qwen2 hidden_size=1280 intermediate_size=3584 num_hidden_layers=16 num_attention_heads=10 "
                 "num_key_value_heads=2 vocab_size=64000 seq_len=2048",
})
NEW_CONFIGS = [
    C("gpt640x32", "fsdp2", "zero3", mb=4), C("gpt640x32", "fsdp1", "zero3", mb=8, ac=True),
    C("gpt640x32", "deepspeed", "zero1", mb=4, ga=2), C("gpt640x32", "fsdp2", "ddp", "fp16", mb=2),
    C("llama2560", "fsdp2", "zero3", mb=2), C("llama2560", "deepspeed", "zero3", mb=1, ga=4, ac=True),
    C("llama2560", "deepspeed", "zero2", mb=2, off="opt"), C("llama2560", "fsdp1", "zero3", "fp32", mb=1),
    C("llamaMQA", "fsdp2", "zero3", mb=4, ac=True), C("llamaMQA", "deepspeed", "zero3", mb=2),
    C("llamaMQA", "fsdp2", "zero2", mb=2, comp=True), C("llamaMQA", "deepspeed", "ddp", "fp32", mb=1),
    C("gptT4k", "fsdp2", "zero3", mb=1, ga=2), C("gptT4k", "deepspeed", "zero3", mb=2, ac=True),
    C("gptT4k", "fsdp1", "ddp", "fp16", mb=2), C("hf-qwen2b", "fsdp2", "zero3", mb=2),
    C("hf-qwen2b", "deepspeed", "zero3", mb=2, ac=True), C("llama2560", "fsdp2", "zero3", mb=2, off="both"),
]
# the second unseen set of session 11 (--set new3, numbered from 801): written down 2026-12-02 11:49 UTC, after
# i14's allocator-cap and offload changes landed, before it ran; judges them and the session's later changes
MODELS.update({
    "gpt1536x10": {"name": "gpt1536x10", "family": "gpt", "layers": 10, "hidden": 1536, "heads": 12, "vocab": 50257, "seq_len": 2048},
    "llama24L": {"name": "llama24L", "family": "llama", "layers": 24, "hidden": 1280, "heads": 10, "kv_heads": 5,
                 "ffn_hidden": 3584, "vocab": 32000, "seq_len": 3072},
    "llama96k": {"name": "llama96k", "family": "llama", "layers": 12, "hidden": 2048, "heads": 32, "kv_heads": 8,
                 "ffn_hidden": 5504, "vocab": 96000, "seq_len": 1024},
})
NEW3_CONFIGS = [
    C("gpt1536x10", "fsdp2", "zero3", mb=4), C("gpt1536x10", "deepspeed", "zero2", mb=2, ga=2),
    C("gpt1536x10", "fsdp1", "zero3", mb=8, ac=True), C("llama24L", "fsdp2", "zero2", mb=2, ac=True),
    C("llama24L", "deepspeed", "zero3", mb=2), C("llama24L", "deepspeed", "zero1", "fp32", mb=1),
    C("llama96k", "fsdp2", "zero3", mb=4), C("llama96k", "deepspeed", "zero3", mb=4, ac=True),
    C("llama96k", "fsdp1", "ddp", mb=2, ga=2), C("llama96k", "fsdp2", "ddp", "fp16", mb=2),
]
# the unseen set of session 13 (--set new4, numbered from 901): written down 2026-12-03 06:40 UTC, after session 12's
# DeepSpeed ZeRO-3 offload replay and FSDP1 offload start-up landed, before it ran; none of its shapes was used to find
# or fit anything: a 16 x 1024 GPT (head_dim 64), a 14-layer Llama with 2 KV heads and a 100k vocabulary, T=8192,
# a Mistral model through transformers; every framework and sharding, fp32 / fp16 / bf16, offload both ways, compile
MODELS.update({
    "gpt1024x16": {"name": "gpt1024x16", "family": "gpt", "layers": 16, "hidden": 1024, "heads": 16, "vocab": 50257, "seq_len": 2048},
    "llama1792": {"name": "llama1792", "family": "llama", "layers": 14, "hidden": 1792, "heads": 14, "kv_heads": 2,
                  "ffn_hidden": 4864, "vocab": 100000, "seq_len": 2048},
    "llamaT8k": {"name": "llamaT8k", "family": "llama", "layers": 8, "hidden": 1024, "heads": 16, "kv_heads": 4,
                 "ffn_hidden": 2816, "vocab": 32000, "seq_len": 8192},
    "hf-mistral": "hf:mistral hidden_size=1536 intermediate_size=4608 num_hidden_layers=12 num_attention_heads=12 "
                  "num_key_value_heads=4 vocab_size=32768 seq_len=2048",
})
NEW4_CONFIGS = [
    C("gpt1024x16", "fsdp2", "zero3", mb=4), C("gpt1024x16", "deepspeed", "zero3", "fp16", mb=2, ga=2),
    C("gpt1024x16", "fsdp1", "zero2", "fp32", mb=2), C("gpt1024x16", "deepspeed", "zero1", mb=8, ac=True),
    C("llama1792", "fsdp2", "zero2", mb=2, ac=True), C("llama1792", "deepspeed", "zero3", mb=1, off="both"),
    C("llama1792", "fsdp1", "zero3", mb=2, off="both"), C("llama1792", "deepspeed", "ddp", mb=2, ga=2),
    C("llamaT8k", "fsdp2", "zero3", mb=1, ac=True), C("llamaT8k", "deepspeed", "zero2", mb=1),
    C("llamaT8k", "fsdp2", "ddp", "fp32", mb=1), C("llamaT8k", "fsdp1", "ddp", "fp16", mb=1, ga=2),
    C("hf-mistral", "fsdp2", "zero3", mb=2), C("hf-mistral", "deepspeed", "zero2", mb=2, ac=True),
    C("gpt1024x16", "fsdp2", "zero3", mb=4, comp=True), C("llama1792", "deepspeed", "zero3", "fp32", mb=1, off="opt"),
    # added after #901-908 ran (not unseen): #907's FSDP2 twin, to tell on one host whether FSDP2's CPU AdamW
    # runs slower per parameter than FSDP1's (steptime.TORCH_CPU_ADAM_PARAMS_PER_S) or the hosts differ
    C("llama1792", "fsdp2", "zero3", mb=2, off="both"),
]
# the unseen set of session 16 (--set new5, numbered from 1001): written down 2026-12-04 01:55 UTC, before it ran, with
# the code of sessions 13-15; none of its shapes was used to find or fit anything: three transformers architectures
# not run before (Qwen3 with its q/k norms and head_dim 128 over hidden 1024; Gemma with head_dim 256, one KV head and
# a 256k vocabulary; Phi-3 with fused qkv and gate/up projections at T=3072), an 8 x 2048 GPT (head_dim 128), a
# multi-head Llama at T=6144 and a 200k-vocabulary Llama; micro-batch 1-6, accumulation 2-3, every framework
MODELS.update({
    "hf-qwen3": "hf:qwen3 hidden_size=1024 intermediate_size=3072 num_hidden_layers=12 num_attention_heads=16 "
                "num_key_value_heads=8 head_dim=128 vocab_size=151936 seq_len=2048",
    "hf-gemma": "hf:gemma hidden_size=1024 intermediate_size=4096 num_hidden_layers=8 num_attention_heads=8 "
                "num_key_value_heads=1 head_dim=256 vocab_size=256000 seq_len=2048",
    "hf-phi3": "hf:phi3 hidden_size=1536 intermediate_size=4096 num_hidden_layers=10 num_attention_heads=12 "
               "num_key_value_heads=4 vocab_size=32064 seq_len=3072",
    "gpt2048x8": {"name": "gpt2048x8", "family": "gpt", "layers": 8, "hidden": 2048, "heads": 16, "vocab": 50257, "seq_len": 1024},
    "llamaT6k": {"name": "llamaT6k", "family": "llama", "layers": 12, "hidden": 1280, "heads": 10, "kv_heads": 10,
                 "ffn_hidden": 3456, "vocab": 32000, "seq_len": 6144},
    "llama200k": {"name": "llama200k", "family": "llama", "layers": 6, "hidden": 1536, "heads": 12, "kv_heads": 4,
                  "ffn_hidden": 4096, "vocab": 200064, "seq_len": 2048},
})
NEW5_CONFIGS = [
    C("hf-qwen3", "fsdp2", "zero3", mb=2), C("hf-qwen3", "deepspeed", "zero3", mb=2, ac=True),
    C("hf-gemma", "fsdp2", "zero2", mb=2), C("hf-gemma", "deepspeed", "zero1", mb=1, ga=2),
    C("hf-phi3", "fsdp1", "zero3", mb=2, ac=True), C("hf-phi3", "deepspeed", "zero2", "fp16", mb=2),
    C("gpt2048x8", "fsdp2", "zero3", mb=6), C("gpt2048x8", "deepspeed", "zero3", mb=3, off="opt"),
    C("gpt2048x8", "fsdp1", "ddp", "fp32", mb=2), C("llamaT6k", "fsdp2", "zero3", mb=1, ga=3, ac=True),
    C("llamaT6k", "deepspeed", "zero2", mb=2, ac=True), C("llamaT6k", "fsdp2", "ddp", "fp16", mb=1),
    C("llama200k", "fsdp2", "zero3", mb=4, comp=True), C("llama200k", "deepspeed", "ddp", mb=3),
    C("llama200k", "fsdp1", "zero2", mb=5, off="both"), C("llama200k", "deepspeed", "zero3", "fp32", mb=1, off="both"),
    # added after #1001-1016 ran: #1015 as meant (its plan was refused: FSDP's CPU offload moves the parameters too,
    # which shardlab's rules allow with sharding zero3 only)
    C("llama200k", "fsdp1", "zero3", mb=5, off="both"),
]
# the unseen set of session 17 (--set new6, numbered from 1101): written down 2026-12-04 04:40 UTC, before it ran, with
# the code of session 16; eight transformers architectures never run on a GPU here, each with a mechanism the earlier
# sets lack: Falcon (one KV head passed to SDPA without enable_gqa, parallel attention and MLP), Gemma-2 (logit
# soft-capping, sliding window, four norms per block), Mixtral (a mixture of experts), GPT-NeoX (partial rotary,
# parallel residual), OLMo-2 (q/k norms after the projections, norms after attention and MLP), StarCoder2 (T=4096,
# biased GQA), GPT-BigCode (multi-query, learned positions), BLOOM (ALiBi, a 250k vocabulary)
MODELS.update({
    "hf-falcon": "hf:falcon hidden_size=2048 num_hidden_layers=8 num_attention_heads=16 vocab_size=65024 seq_len=2048",
    "hf-gemma2": "hf:gemma2 hidden_size=1536 intermediate_size=6144 num_hidden_layers=8 num_attention_heads=8 "
                 "num_key_value_heads=4 head_dim=256 vocab_size=256000 seq_len=2048",
    "hf-mixtral": "hf:mixtral hidden_size=1024 intermediate_size=2816 num_hidden_layers=8 num_attention_heads=16 "
                  "num_key_value_heads=4 num_local_experts=8 num_experts_per_tok=2 vocab_size=32000 seq_len=2048",
    "hf-neox": "hf:gpt_neox hidden_size=2048 intermediate_size=8192 num_hidden_layers=8 num_attention_heads=16 "
               "vocab_size=50304 seq_len=2048",
    "hf-olmo2": "hf:olmo2 hidden_size=1536 intermediate_size=4096 num_hidden_layers=12 num_attention_heads=12 "
                "num_key_value_heads=12 vocab_size=100352 seq_len=2048",
    "hf-starcoder2": "hf:starcoder2 hidden_size=1536 intermediate_size=6144 num_hidden_layers=10 num_attention_heads=12 "
                     "num_key_value_heads=2 vocab_size=49152 seq_len=4096",
    # n_positions 2048 added after #1113-1114 failed at the default 1024 (a device-side assert; now exit 2 before a run)
    "hf-bigcode": "hf:gpt_bigcode n_embd=1536 n_layer=12 n_head=12 n_positions=2048 vocab_size=49152 seq_len=2048",
    "hf-bloom": "hf:bloom hidden_size=1536 n_layer=12 n_head=12 vocab_size=250880 seq_len=2048",
    "hf-falcon-b": "hf:falcon hidden_size=1536 num_hidden_layers=12 num_attention_heads=12 vocab_size=65024 seq_len=1536",
    "hf-gemma2-b": "hf:gemma2 hidden_size=1024 intermediate_size=4096 num_hidden_layers=6 num_attention_heads=8 "
                   "num_key_value_heads=2 head_dim=128 vocab_size=256000 seq_len=4096",
})
NEW6_CONFIGS = [
    C("hf-falcon", "fsdp2", "zero3", mb=2), C("hf-falcon", "deepspeed", "zero2", mb=2, ac=True),
    C("hf-gemma2", "fsdp2", "zero2", mb=1), C("hf-gemma2", "deepspeed", "zero3", mb=1, ga=2, ac=True),
    C("hf-mixtral", "fsdp2", "zero3", mb=2), C("hf-mixtral", "deepspeed", "zero3", mb=2),
    C("hf-neox", "fsdp1", "zero3", mb=2, ac=True), C("hf-neox", "deepspeed", "zero1", mb=2),
    C("hf-olmo2", "fsdp2", "zero3", mb=2, ga=2), C("hf-olmo2", "deepspeed", "zero2", mb=4),
    C("hf-starcoder2", "fsdp2", "ddp", mb=1), C("hf-starcoder2", "deepspeed", "zero3", mb=1, ac=True),
    C("hf-bigcode", "fsdp1", "zero2", mb=2), C("hf-bigcode", "fsdp2", "zero3", "fp16", mb=4),
    C("hf-bloom", "fsdp2", "zero3", mb=1),
    # added 2026-12-04 05:32 UTC, after #1101-1115 ran and Falcon's math path and Gemma-2's soft-capped logits were
    # priced (d7f468b, 38b572f; judged on #1101-1104): other shapes of those two architectures, predicted before they run
    C("hf-falcon-b", "fsdp1", "zero3", mb=2, ac=True), C("hf-falcon-b", "deepspeed", "zero3", mb=1),
    C("hf-gemma2-b", "fsdp2", "zero3", mb=1, ac=True), C("hf-gemma2-b", "deepspeed", "zero1", mb=1),
]
# Session 18's unseen set (written 2026-12-04 after the host model by kernels and modules landed, ae35ba7, and before
# any of it ran): shardlab's own GPT and Llama at shapes not run before, and three transformers architectures at new
# shapes (Llama at 16 thin layers, a Qwen2-0.5B-like block with a 152k vocabulary, Gemma with one KV head).
MODELS.update({
    "gpt768x20": {"name": "gpt768x20", "family": "gpt", "layers": 20, "hidden": 768, "heads": 12, "vocab": 50257, "seq_len": 1024},
    "llama1280x14": {"name": "llama1280x14", "family": "llama", "layers": 14, "hidden": 1280, "heads": 10, "kv_heads": 2,
                     "ffn_hidden": 3456, "vocab": 32000, "seq_len": 2048},
    "llama2048x10": {"name": "llama2048x10", "family": "llama", "layers": 10, "hidden": 2048, "heads": 16, "kv_heads": 8,
                     "ffn_hidden": 5504, "vocab": 128256, "seq_len": 2048},
    "hf-llama-b": "hf:llama hidden_size=1024 intermediate_size=2816 num_hidden_layers=16 num_attention_heads=16 "
                  "num_key_value_heads=4 vocab_size=32000 seq_len=2048",
    "hf-qwen2-c": "hf:qwen2 hidden_size=896 intermediate_size=4864 num_hidden_layers=12 num_attention_heads=14 "
                  "num_key_value_heads=2 vocab_size=151936 seq_len=2048",
    "hf-gemma-b": "hf:gemma hidden_size=1024 intermediate_size=4096 num_hidden_layers=10 num_attention_heads=8 "
                  "num_key_value_heads=1 head_dim=128 vocab_size=256000 seq_len=2048",
})
NEW7_CONFIGS = [
    C("gpt768x20", "fsdp2", "zero3", mb=4), C("gpt768x20", "deepspeed", "zero2", mb=2, ga=2),
    C("gpt768x20", "fsdp1", "zero2", "fp16", mb=8, ac=True),
    C("llama1280x14", "fsdp2", "zero2", mb=2, ac=True), C("llama1280x14", "deepspeed", "zero3", mb=2),
    C("llama1280x14", "fsdp1", "zero3", mb=4),
    C("llama2048x10", "fsdp2", "zero3", mb=2), C("llama2048x10", "deepspeed", "zero1", mb=1, ga=2),
    C("hf-llama-b", "fsdp2", "zero3", mb=2), C("hf-llama-b", "deepspeed", "zero3", mb=2, ac=True),
    C("hf-qwen2-c", "fsdp2", "zero2", mb=2), C("hf-gemma-b", "deepspeed", "zero2", mb=1),
    # added 2026-12-04 07:35 UTC after #1201-1212 ran and the loss's bytes were taken from the profiles (a25ce57):
    # heavier steps of the same models, predicted before they run (with twins of #1201, #1204, #1209, #1211 on a second machine)
    C("llama2048x10", "fsdp2", "zero2", mb=4), C("hf-qwen2-c", "deepspeed", "zero3", mb=4, ac=True),
    C("gpt768x20", "fsdp2", "ddp", "fp32", mb=2), C("hf-llama-b", "fsdp1", "zero2", mb=8, ac=True),
    # added 2026-12-04 08:30 UTC after ci3 (8084824), no model change since: accumulation, fp16 and checkpointing on the
    # same models, predicted before they run, with twins of #1213, #1214, #1216 on a third machine
    C("llama1280x14", "deepspeed", "zero2", mb=4, ga=2), C("hf-gemma-b", "fsdp2", "zero3", mb=2, ac=True),
    C("gpt768x20", "deepspeed", "zero3", "fp16", mb=4),
]
# the unseen set of session 20 (--set new8, numbered from 1301): written down 2026-12-04 12:30 UTC, before it ran, with
# the code of session 19 (49b098b); sizes no set had: shardlab's presets gpt-760m, gpt-1.3b and gpt-2.7b, a Llama-3.2-3B
# shape at T=4096, transformers configs shaped like Llama-3.2-1B and Qwen2.5-0.5B (tied embeddings, T=4096), a small
# Llama at T=8192; fp32 and fp16, compile, DeepSpeed's optimizer offload of a 1.3B model, accumulation, micro-batch 1-8
MODELS.update({
    "gpt760": "gpt-760m", "gpt1.3b": "gpt-1.3b", "gpt2.7b": "gpt-2.7b",
    "llama3b": {"name": "llama3b", "family": "llama", "layers": 28, "hidden": 3072, "heads": 24, "kv_heads": 8,
                "ffn_hidden": 8192, "vocab": 128256, "seq_len": 4096},
    "llamaT8k-b": {"name": "llamaT8k-b", "family": "llama", "layers": 8, "hidden": 1536, "heads": 12, "kv_heads": 4,
                   "ffn_hidden": 4096, "vocab": 32000, "seq_len": 8192},
    "hf-llama32": "hf:llama hidden_size=2048 intermediate_size=8192 num_hidden_layers=16 num_attention_heads=32 "
                  "num_key_value_heads=8 vocab_size=128256 tie_word_embeddings=true rope_theta=500000 seq_len=4096",
    "hf-qwen25": "hf:qwen2 hidden_size=896 intermediate_size=4864 num_hidden_layers=24 num_attention_heads=14 "
                 "num_key_value_heads=2 vocab_size=151936 tie_word_embeddings=true seq_len=4096",
})
NEW8_CONFIGS = [
    C("gpt1.3b", "fsdp2", "zero3", mb=4), C("gpt2.7b", "deepspeed", "zero3", mb=2, ac=True),
    C("llama3b", "fsdp1", "zero3", mb=1, ac=True), C("gpt760", "fsdp2", "zero2", "fp32", mb=2),
    C("hf-llama32", "deepspeed", "zero3", mb=1, ga=2), C("hf-llama32", "fsdp2", "zero3", mb=2, ac=True),
    C("gpt760", "fsdp2", "zero3", mb=4, comp=True), C("llamaT8k-b", "deepspeed", "zero2", mb=1, ac=True),
    C("gpt1.3b", "deepspeed", "zero2", mb=4, off="opt"), C("hf-qwen25", "deepspeed", "zero1", "fp16", mb=2),
    C("llama3b", "fsdp2", "ddp", mb=1, ac=True), C("gpt125", "fsdp2", "zero3", "fp16", mb=8, ga=2),
    # added 2026-12-04 13:25 UTC, after the calibration's host unit was applied (2a4d404), predicted before they ran on a
    # machine calibrated in the same call: a TinyLlama-1.1B shape, a Mistral-style transformers config, a 12 x 1024 GPT
    C("tinyllama", "fsdp1", "zero2", mb=4), C("tinyllama", "deepspeed", "zero1", mb=2, ga=2),
    C("hf-mistral-b", "fsdp2", "zero3", mb=2), C("gpt1024x12", "deepspeed", "zero3", "fp16", mb=4, ac=True),
]
MODELS.update({
    "tinyllama": {"name": "tinyllama", "family": "llama", "layers": 22, "hidden": 2048, "heads": 32, "kv_heads": 4,
                  "ffn_hidden": 5632, "vocab": 32000, "seq_len": 2048},
    "hf-mistral-b": "hf:mistral hidden_size=1536 intermediate_size=4096 num_hidden_layers=12 num_attention_heads=12 "
                    "num_key_value_heads=4 vocab_size=32768 seq_len=2048",
    "gpt1024x12": {"name": "gpt1024x12", "family": "gpt", "layers": 12, "hidden": 1024, "heads": 16, "vocab": 50257, "seq_len": 2048},
})
# the first set on two GPUs (--set w2, numbered from 1401, run on nvidia-h200-x2): written down 2026-12-04 15:00 UTC,
# before it ran, with the code of session 20 (8390cd3). No earlier row had more than one GPU, so every collective, the
# sharded start-up and the hooks of a real shard (FSDP1 is NO_SHARD on one rank) are unseen here
W2_CONFIGS = [
    C("gpt1.3b", "fsdp2", "zero3", mb=4, g=2), C("gpt1.3b", "fsdp1", "zero3", mb=4, g=2),
    C("gpt1.3b", "deepspeed", "zero3", mb=4, g=2), C("gpt760", "fsdp1", "zero2", mb=4, g=2),
    C("gpt760", "deepspeed", "zero2", mb=4, ga=2, g=2), C("gpt760", "deepspeed", "zero1", mb=4, g=2),
    C("tinyllama", "fsdp2", "ddp", mb=2, g=2), C("hf-llama32", "fsdp2", "zero3", mb=1, ac=True, g=2),
    C("gpt125", "fsdp2", "zero3", mb=8, g=2), C("llama3b", "deepspeed", "zero3", mb=1, ac=True, g=2),
    C("gpt1.3b", "fsdp2", "zero2", "fp32", mb=2, g=2), C("gpt760", "fsdp2", "zero3", mb=4, comp=True, g=2),
    C("tinyllama", "fsdp1", "zero3", mb=2, ga=2, ac=True, g=2), C("gpt760", "deepspeed", "ddp", mb=4, g=2),
    C("gpt1.3b", "deepspeed", "zero2", mb=4, off="opt", g=2), C("hf-qwen25", "fsdp1", "zero3", mb=2, g=2),
]
# the unseen set of session 21 (--set new9, numbered from 1501): written down 2026-12-04 15:35 UTC, before it ran, with
# 752f029's step model (DeepSpeed ZeRO-0/1's serial share only where the GPU outlasts the host); shapes no set had
MODELS.update({
    "llama2048x24": {"name": "llama2048x24", "family": "llama", "layers": 24, "hidden": 2048, "heads": 16, "kv_heads": 8,
                     "ffn_hidden": 5632, "vocab": 32000, "seq_len": 2048},
    "gpt1024x24": {"name": "gpt1024x24", "family": "gpt", "layers": 24, "hidden": 1024, "heads": 16, "vocab": 50257, "seq_len": 1024},
    "hf-qwen2-d": "hf:qwen2 hidden_size=1024 intermediate_size=2816 num_hidden_layers=20 num_attention_heads=16 "
                  "num_key_value_heads=4 vocab_size=151936 seq_len=2048",
})
NEW9_CONFIGS = [
    C("llama2048x24", "deepspeed", "zero1", mb=2), C("gpt1024x24", "deepspeed", "ddp", mb=4),
    C("hf-qwen2-d", "deepspeed", "zero1", mb=4, ga=2), C("gpt760", "deepspeed", "zero2", mb=2),
    C("gpt350", "deepspeed", "zero1", "fp32", mb=2), C("llama2048x24", "fsdp2", "zero3", mb=2, ac=True),
    C("gpt1024x24", "fsdp1", "zero2", mb=8), C("gpt1.3b", "deepspeed", "zero3", mb=2, ga=2),
]
# the unseen set of session 23 (--set new10, numbered from 1601): written down 2026-12-04 20:40 UTC, before it ran, with
# the code of session 22 (16a5bb7); transformers types no set had (Granite, StableLM, SmolLM3), a one-KV-head Llama at
# T=3072, a 14 x 1408 GPT with 11 heads, a 6-layer 1600-wide GPT, a 128k-vocabulary Llama at T=4096
MODELS.update({
    "hf-granite": "hf:granite hidden_size=1536 intermediate_size=4096 num_hidden_layers=14 num_attention_heads=12 "
                  "num_key_value_heads=4 vocab_size=49152 seq_len=2048",
    "hf-stablelm": "hf:stablelm hidden_size=1280 intermediate_size=3584 num_hidden_layers=16 num_attention_heads=20 "
                   "num_key_value_heads=20 vocab_size=50304 seq_len=2048",
    "hf-smollm3": "hf:smollm3 hidden_size=1024 intermediate_size=2816 num_hidden_layers=18 num_attention_heads=16 "
                  "num_key_value_heads=4 vocab_size=128256 seq_len=3072",
    "llama1664x18": {"name": "llama1664x18", "family": "llama", "layers": 18, "hidden": 1664, "heads": 13, "kv_heads": 1,
                     "ffn_hidden": 4480, "vocab": 64000, "seq_len": 3072},
    "gpt1408x14": {"name": "gpt1408x14", "family": "gpt", "layers": 14, "hidden": 1408, "heads": 11, "vocab": 50257, "seq_len": 2048},
    "gpt1600x6": {"name": "gpt1600x6", "family": "gpt", "layers": 6, "hidden": 1600, "heads": 25, "vocab": 50257, "seq_len": 1024},
    "llama1024x12-128k": {"name": "llama1024x12-128k", "family": "llama", "layers": 12, "hidden": 1024, "heads": 8,
                          "kv_heads": 8, "ffn_hidden": 2816, "vocab": 128256, "seq_len": 4096},
})
NEW10_CONFIGS = [
    C("hf-granite", "fsdp2", "zero3", mb=2), C("hf-granite", "deepspeed", "zero2", mb=2, ga=2),
    C("hf-stablelm", "fsdp1", "zero3", mb=4, ac=True), C("hf-stablelm", "deepspeed", "zero3", mb=2),
    C("hf-smollm3", "fsdp2", "zero2", mb=1), C("llama1664x18", "fsdp1", "zero3", mb=2, ac=True),
    C("llama1664x18", "deepspeed", "zero1", mb=1, ga=4), C("gpt1408x14", "deepspeed", "zero3", mb=4, off="opt"),
    C("gpt1408x14", "fsdp2", "zero2", "fp16", mb=4, ga=2), C("gpt1600x6", "fsdp2", "ddp", "fp32", mb=8),
    C("gpt1600x6", "deepspeed", "zero3", "fp16", mb=8), C("llama1024x12-128k", "fsdp2", "zero3", mb=1, comp=True),
    C("llama1024x12-128k", "deepspeed", "zero2", mb=2, ac=True), C("gpt1408x14", "fsdp1", "ddp", mb=2),
]
SETS = {"matrix": (1, CONFIGS), "check": (101, CHECK_CONFIGS), "host": (201, HOST_CONFIGS), "val": (301, VAL_CONFIGS),
        "hf": (401, HF_CONFIGS), "held": (501, HELD_CONFIGS),
        "res": (601, RES_CONFIGS), "new": (701, NEW_CONFIGS),
        "new3": (801, NEW3_CONFIGS), "new4": (901, NEW4_CONFIGS), "new5": (1001, NEW5_CONFIGS),
        "new6": (1101, NEW6_CONFIGS), "new7": (1201, NEW7_CONFIGS), "new8": (1301, NEW8_CONFIGS),
        "w2": (1401, W2_CONFIGS), "new9": (1501, NEW9_CONFIGS),
        "new10": (1601, NEW10_CONFIGS)}
KEYS = ("model", "framework", "sharding", "precision", "micro_batch_size", "grad_accum_steps", "activation_checkpointing",
        "offload", "compile", "hf", "low_memory_init", "gpus_per_node")


def config_dict(i: int) -> dict:
    first, configs = max((v for v in SETS.values() if v[0] <= i), key=lambda v: v[0])
    return {"id": i, **dict(zip(KEYS, configs[i - first]))}


def plan_for(row: dict):
    """The Plan of one row (also used by tests/test_gpu_results.py to re-estimate it)."""
    from shardlab import Plan

    off = row["offload"]
    data = {"framework": row["framework"], "sharding": row["sharding"], "precision": row["precision"],
            "micro_batch_size": row["micro_batch_size"], "grad_accum_steps": row["grad_accum_steps"],
            "activation_checkpointing": row["activation_checkpointing"], "compile": row["compile"],
            "low_memory_init": bool(row.get("low_memory_init")),
            "optimizer": {"name": "adamw", "lr": 1e-4}, "topology": {"gpus_per_node": row.get("gpus_per_node", 1)},
            "offload": {"optimizer": "cpu" if off != "none" else "none", "params": "cpu" if off == "both" else "none"}}
    if row["hf"]:
        data["wrap"] = {"transformer_layer_cls": "LlamaDecoderLayer"}
    return Plan.model_validate(data)


def model_for(row: dict, tiny: bool = False):
    m = MODELS[row["model"]]
    if isinstance(m, str) and m.startswith("hf:"):  # a Hugging Face source: tiny keeps its family, shrinks its shape
        return m.split()[0] + TINY_HF[m.split()[0]] if tiny else m
    if row.get("hf") and isinstance(m, dict):  # built by transformers through fidelity_hf's factory
        m = {**m, "layout": "transformers"}
    if tiny:  # same family, CPU-sized
        fam = m["family"] if isinstance(m, dict) else "gpt"  # a preset's name: the gpt presets
        m = {"name": "tiny-" + row["model"], "family": fam, "layers": 2, "hidden": 64, "heads": 4, "vocab": 512, "seq_len": 64}
        if fam == "llama":
            m.update(kv_heads=2, ffn_hidden=160)
    return m


_TINY_GQA = " hidden_size=64 intermediate_size=160 num_hidden_layers=2 num_attention_heads=4 num_key_value_heads=2 vocab_size=512 seq_len=64"
TINY_HF = {"hf:llama": _TINY_GQA, "hf:qwen2": _TINY_GQA, "hf:mistral": _TINY_GQA, "hf:phi3": _TINY_GQA + " pad_token_id=0",
           "hf:qwen3": _TINY_GQA + " head_dim=16", "hf:gemma": _TINY_GQA + " head_dim=16",
           "hf:gpt2": " n_embd=64 n_layer=2 n_head=4 vocab_size=512 seq_len=64",
           "hf:falcon": " hidden_size=64 num_hidden_layers=2 num_attention_heads=4 vocab_size=512 seq_len=64",
           "hf:gemma2": _TINY_GQA + " head_dim=16", "hf:mixtral": _TINY_GQA + " num_local_experts=4",
           "hf:gpt_neox": " hidden_size=64 intermediate_size=160 num_hidden_layers=2 num_attention_heads=4 vocab_size=512 seq_len=64",
           "hf:olmo2": _TINY_GQA, "hf:starcoder2": _TINY_GQA,
           "hf:gpt_bigcode": " n_embd=64 n_layer=2 n_head=4 vocab_size=512 seq_len=64",
           "hf:bloom": " hidden_size=64 n_layer=2 n_head=4 vocab_size=512 seq_len=64",
           "hf:granite": _TINY_GQA, "hf:stablelm": _TINY_GQA, "hf:smollm3": _TINY_GQA + " pad_token_id=0"}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def measured(run, status: str) -> dict:
    """Rank 0's figures from a finished run."""
    m = run.metrics
    res = {"status": status}
    if status != "completed" or m is None or len(m) == 0:
        res["error"] = (run.info or {}).get("error")
        return res
    r0 = m[m["rank"] == 0].sort_values("step")
    rows = r0.to_dict("records")
    prof = [r for r in rows if r.get("profile.step_s") == r.get("profile.step_s") and r.get("profile.step_s") is not None]
    if prof:  # --profile-step: that step's split (run/profile.py); its time is the profiler's too, not a step's
        res["profile"] = {k[len("profile."):]: v for k, v in prof[0].items() if k.startswith("profile.") and "." not in k[8:] and v == v}
        for top in ("top_kernels", "top_kernel_s", "top_ops", "gpu_kind_s"):  # Run.metrics made each name a dotted column
            res["profile"][top] = {k[len(f"profile.{top}."):]: (int(v) if top in ("top_kernels", "top_ops") else float(v))
                                   for k, v in prof[0].items() if k.startswith(f"profile.{top}.") and v == v}
        res["profile"]["step"] = int(prof[0]["step"])
    later = [r for r in rows if r["step"] > 2 and r not in prof] or rows
    res["step_time_s"] = _median(r["step_time_s"] for r in later)
    res["tokens_per_s"] = _median(r["tokens_per_s"] for r in later)
    def nested(r, prefix):  # Run.metrics turns nested dicts into dotted columns
        d = {k[len(prefix) + 1:]: v for k, v in r.items() if k.startswith(prefix + ".") and v == v and v is not None}
        return {k: int(v) for k, v in d.items()} or None

    res["steps"] = [{**{k: r.get(k) for k in ("step", "step_time_s", "tokens_per_s", "peak_allocated_bytes", "peak_reserved_bytes",
                                               "allocated_bytes")}, "mem_phases": nested(r, "mem_phases")} for r in rows]
    for key in ("peak_allocated_bytes", "peak_reserved_bytes"):
        vals = [r.get(key) for r in rows if r.get(key) == r.get(key) and r.get(key) is not None]
        res[key] = int(max(vals)) if vals else None
    last = rows[-1]
    res["state_bytes"] = nested(last, "state_bytes")
    res["state_bytes_cpu"] = nested(last, "state_bytes_cpu")
    return res


def guess_bytes(row: dict, tiny: bool) -> int:
    """A generous guess of a run's GPU memory, for the scheduler only."""
    from shardlab.estimate import estimate

    e = estimate(plan_for(row), model_for(row, tiny), gpu="h200").per_gpu["total"]
    return int(1.7 * e + 3 * GIB)


def run_one(row: dict, a, out: Path, live: dict) -> dict:
    from shardlab import launch

    factory = HF_FACTORY if row["hf"] else None
    t0 = time.time()
    with live["lock"]:
        live["n"] += 1
        row["concurrent"] = live["n"] - 1
    try:
        run = launch(plan_for(row), model=model_for(row, a.tiny), steps=a.steps, device=a.device, out=out,
                     instrument=True, timeout_s=400, factory=factory, profile_step=a.profile_step)
        status = run.wait()
        row.update(measured(run, status))
    except Exception as e:  # noqa: BLE001 - a failed configuration is a row, not the end of the matrix
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
    finally:
        with live["lock"]:
            row["concurrent"] = max(row["concurrent"], live["n"] - 1)
            live["n"] -= 1
    row["wall_s"] = round(time.time() - t0, 1)
    return row


def run_matrix(a) -> list[dict]:
    import torch

    device = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    first, configs = SETS[a.set]
    ids = [int(x) for x in a.only.split(",")] if a.only else range(first, first + len(configs))
    rows = [dict(config_dict(i), device=device, steps_run=a.steps) for i in ids]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    budget, used, cv = a.mem_gib * GIB, [0], threading.Condition()
    live = {"n": 0, "lock": threading.Lock()}
    finished: list[dict] = []

    def job(row):
        try:
            need = min(guess_bytes(row, a.tiny), budget)
        except Exception:  # noqa: BLE001 - a plan the rules refuse: run_one records launch's error as the row
            need = 0
        with cv:
            cv.wait_for(lambda: used[0] + need <= budget)
            used[0] += need
        try:
            r = run_one(row, a, Path(a.runs), live)
        finally:
            with cv:
                used[0] -= need
                cv.notify_all()
        with live["lock"]:  # written after every row: a call cut short still brings back what ran
            finished.append(r)
            (out / "fidelity.json").write_text(json.dumps(sorted(finished, key=lambda x: x["id"]), indent=1, default=str))
        print(json.dumps({k: r.get(k) for k in ("id", "model", "framework", "sharding", "precision", "status", "peak_allocated_bytes",
                                                "peak_reserved_bytes", "step_time_s", "wall_s", "concurrent", "error")}), flush=True)
        return r

    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        done = list(ex.map(job, rows))
    return done


# ---------------------------------------------------------------------------------------------
# predictions (on a CPU, after the GPU run)


def predictions(row: dict, methods=("analytic", "trace")) -> dict:
    """The estimators' per-GPU figures for one row: {method: per_gpu dict}."""
    from shardlab.estimate import estimate

    out = {}
    for method in methods:
        model = model_for(row)
        if row["hf"] and method == "trace":
            from benchmarks.fidelity_hf import hf_module

            spec = model
            model = {"module": (lambda s=spec: hf_module(s)), "spec": spec}
        try:
            out[method] = dict(estimate(plan_for(row), model, gpu="h200", method=method).per_gpu)
        except Exception as e:  # noqa: BLE001 - one method failing leaves the other's figures
            out[f"{method}_failed"] = f"{type(e).__name__}: {e}"[:300]
    return out


def add_predictions(path: Path, methods) -> list[dict]:
    rows = json.loads(path.read_text())
    for r in rows:
        if r.get("status") != "completed":
            continue
        path.write_text(json.dumps(rows, indent=1))  # a long --predict run keeps what it has done
        try:
            pred = predictions(r, methods)
        except Exception as e:  # noqa: BLE001 - one row's failure is recorded, the rest go on
            r["predict_error"] = f"{type(e).__name__}: {e}"[:300]
            continue
        for method, pg in pred.items():
            if isinstance(pg, str):
                r["predict_error"] = pg
                continue
            r.pop("predict_error", None)
            r[f"{method}_peak_allocated"] = pg["peak_allocated"]
            if "peak_reserved" in pg:
                r[f"{method}_peak_reserved"] = pg["peak_reserved"]
            r[f"{method}_error"] = pg["peak_allocated"] / r["peak_allocated_bytes"] - 1
            sb = r.get("state_bytes") or {}
            r[f"{method}_category_diff"] = {k: sb[k] - pg[k] for k in ("params", "grads", "optimizer") if k in sb}
            print(r["id"], method, f"{r[f'{method}_error']:+.1%}", flush=True)
    path.write_text(json.dumps(rows, indent=1))
    return rows


def table(rows: list[dict], methods) -> str:
    head = f"{'#':>3} {'model':<10}{'framework':<10}{'shard':<6}{'prec':<5}{'mb':>3}{'ga':>3}{'ac':>3}{'off':>5}{'cmp':>4}{'hf':>3}{'alloc GiB':>10}{'resv GiB':>9}"
    head += "".join(f"{m[:5] + ' err':>11}" for m in methods) + f"{'tok/s':>9}"
    lines = [head]
    for r in rows:
        g = lambda k, r=r: f"{r[k] / GIB:.2f}" if r.get(k) else "-"  # noqa: E731
        line = (f"{r['id']:>3} {r['model']:<10}{r['framework']:<10}{r['sharding']:<6}{r['precision']:<5}{r['micro_batch_size']:>3}"
                f"{r['grad_accum_steps']:>3}{'y' if r['activation_checkpointing'] else '-':>3}{r['offload']:>5}{'y' if r['compile'] else '-':>4}"
                f"{'y' if r['hf'] else '-':>3}{g('peak_allocated_bytes'):>10}{g('peak_reserved_bytes'):>9}")
        line += "".join(f"{r[m + '_error']:>+11.1%}" if r.get(m + "_error") is not None else f"{'-':>11}" for m in methods)
        line += f"{r['tokens_per_s']:>9.0f}" if r.get("tokens_per_s") else f"{r.get('status', '-'):>9}"
        lines.append(line)
    for m in methods:
        errs = [abs(r[m + "_error"]) for r in rows if r.get(m + "_error") is not None]
        if errs:
            lines.append(f"{m}: {len(errs)} rows, max |error| {max(errs):.1%}, median {statistics.median(errs):.1%}")
    return "\n".join(lines)


def plot(paths: list[Path], png: Path, methods) -> None:
    """Residuals (predicted / measured - 1 of peak allocated) per row, one marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.6))
    marks = {"analytic": "o", "trace": "x", "reserved": "^"}
    for path in paths:
        rows = [r for r in json.loads(path.read_text()) if r.get("status") == "completed"]
        for r in rows:  # analytic figures re-estimated with the code of today
            r["analytic_error"] = predictions(r, ("analytic",))["analytic"]["peak_allocated"] / r["peak_allocated_bytes"] - 1
        for m in methods:
            pts = [(r["id"], r[m + "_error"]) for r in rows if r.get(m + "_error") is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marks.get(m, "."), label=f"{m} ({path.stem})", s=22)
    ax.axhline(0, color="k", lw=0.6)
    for y in (-0.05, 0.05):
        ax.axhline(y, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("configuration (1-48: matrix, 101-118: check set, 201-221: host probe, 301-312: validation set)")
    ax.set_ylabel("predicted / measured - 1")
    ax.set_title("Peak allocated memory on one H200: estimate vs torch.cuda.max_memory_allocated")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for fidelity.json")
    ap.add_argument("--runs", default="/tmp/fidelity_runs", help="folder for the run folders")
    ap.add_argument("--only", help="comma list of configuration numbers (1-based)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--profile-step", type=int, default=None,
                    help="run this step under torch.profiler: the row gains `profile` (GPU busy, host busy and waits; benchmarks/host_split.py)")
    ap.add_argument("--set", default="matrix", choices=tuple(SETS), help="check: the shapes kept out of the fitting; host: the host-cost probe")
    ap.add_argument("--mem-gib", type=float, default=120.0)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny shapes of the same families")
    ap.add_argument("--predict", help="add the estimators' predictions to this results file and print the table")
    ap.add_argument("--methods", default="analytic,trace")
    ap.add_argument("--plot", help="write the residual plot of the --results files to this PNG")
    ap.add_argument("--results", default="benchmarks/results/fidelity_h200.json,benchmarks/results/fidelity_h200_check.json")
    a = ap.parse_args()
    methods = a.methods.split(",")
    if a.plot:
        plot([Path(p) for p in a.results.split(",")], Path(a.plot), methods)
        return 0
    if a.predict:
        print(table(add_predictions(Path(a.predict), methods), methods))
        return 0
    if not a.out:
        ap.error("--out is needed to run the matrix")
    rows = run_matrix(a)
    print(table(rows, []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
