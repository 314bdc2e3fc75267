"""Worker factory for the fidelity matrix: a Hugging Face `LlamaForCausalLM` built from a config.

`benchmarks.fidelity_hf:llama` is given to `shardlab.launch(..., factory=...)`. The worker calls it
with no arguments, so it reads what it needs from the run folder the launcher made
(SHARDLAB_RUN_DIR): the run's `model` (a llama-family shape dict, the same one the estimator is given)
becomes a `LlamaConfig` (random init, no weights, no download) and plan.yaml gives the micro-batch.
The returned module maps token ids [B, T] to logits [B, T, vocab], as the worker's loss expects;
the plan names `LlamaDecoderLayer` as the wrap / checkpointing unit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn_hidden"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape.get("kv_heads") or shape["heads"], max_position_embeddings=shape["seq_len"],
                       rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)


def hf_module(shape: dict):
    """An nn.Module wrapping LlamaForCausalLM(config from `shape`) so that forward(ids) -> logits."""
    import torch
    from transformers import LlamaForCausalLM

    class HFCausalLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            cfg = _config(shape)
            cfg._attn_implementation = "sdpa"
            self.model = LlamaForCausalLM(cfg)

        def forward(self, tokens):
            return self.model(input_ids=tokens, use_cache=False).logits

    return HFCausalLM()


def llama():
    """(model, batch_fn) for the run in SHARDLAB_RUN_DIR."""
    import torch

    from shardlab.plan import load_plan
    from shardlab.run.data import Batches

    run_dir = Path(os.environ["SHARDLAB_RUN_DIR"])
    cfg = json.loads((run_dir / "run.json").read_text())
    plan = load_plan(run_dir / "plan.yaml")
    shape = cfg["model"]
    torch.manual_seed(cfg.get("seed", 0))
    model = hf_module(shape)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    batches = Batches(seed=cfg.get("seed", 0), rank=rank, world_size=world, micro_batch_size=plan.micro_batch_size,
                      grad_accum_steps=plan.grad_accum_steps, seq_len=shape["seq_len"], vocab=shape["vocab"],
                      device=cfg.get("device", "cpu"))
    return model, batches
