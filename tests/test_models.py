"""Model specs as the estimators use them: FLOPs per token, wrap units, and
counting a user's nn.Module (on the meta device, so no memory is spent)."""

import subprocess
import sys

import pytest

from shardlab.models import PRESETS, ModelSpec, bare, count_module, flops_per_token, largest_wrap_unit, resolve_model, wrap_units
from shardlab.plan import PlanError


def test_flops_per_token_follows_torchtitan():
    # gpt-1b: d=2048, 16 layers, T=2048, vocab 32000, learned positions; 6N excludes both
    # embedding tables (lookups) but keeps the LM head (a matmul).
    s = PRESETS["gpt-1b"]
    n_embedding = 32000 * 2048 + 2048 * 2048
    assert flops_per_token(s) == 6 * (s.params - n_embedding) + 12 * 16 * 2048 * 2048
    # a shorter sequence only changes the attention term
    assert flops_per_token(s) - flops_per_token(s, seq_len=1024) == 12 * 16 * 2048 * 1024


def test_llama_flops_exclude_only_the_token_table():
    s = PRESETS["llama-7b"]
    assert flops_per_token(s) == 6 * (s.params - 32000 * 4096) + 12 * 32 * 4096 * 4096


def test_bare_count_has_6n_flops():
    assert flops_per_token(bare(7e9)) == 42e9


def test_wrap_units_cover_the_model():
    s = PRESETS["gpt-1.3b"]
    units = wrap_units(s)
    assert units[0][0] == "root" and len(units) == 1 + s.layers
    assert sum(n for _, n in units) == s.params
    assert units[0][1] == s.embedding_params + s.head_params
    assert all(n == s.block_params for _, n in units[1:])
    assert wrap_units(s, "none") == [("root", s.params)]
    # the size policy wraps every module reaching the threshold: at one block's size that is each block
    # and the two 103M vocabulary matrices (torch's own policy agrees: tests/test_frameworks.py)
    assert [n for n, _ in wrap_units(s, "size", min_num_params=s.block_params)][1:] == [
        "tok_emb", *(f"blocks.{i}" for i in range(s.layers)), "lm_head"]
    assert [n for n, _ in wrap_units(s, "size", min_num_params=s.block_params + 1)] == ["root", "tok_emb", "lm_head"]


def test_largest_wrap_unit_is_the_root_for_big_vocabularies():
    tiny = PRESETS["gpt-tiny"]  # 512 x 64 embeddings twice + positions outweigh a 64-wide block
    assert largest_wrap_unit(tiny) == tiny.embedding_params + tiny.head_params
    big = ModelSpec("wide", 2, 4096, 32, 1000, 128)
    assert largest_wrap_unit(big) == big.block_params


def _toy():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.fc1 = nn.Linear(d, 4 * d)
            self.fc2 = nn.Linear(4 * d, d)

    class Toy(nn.Module):
        def __init__(self, d=64, n=3, vocab=100):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(Block(d) for _ in range(n))
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.emb.weight  # tied

    return Toy, Block


def test_count_module_counts_tied_weights_once_and_finds_the_block():
    Toy, _ = _toy()
    m = Toy()
    block = 64 * 256 + 256 + 256 * 64 + 64
    spec = count_module(m)
    assert spec.params == 100 * 64 + 3 * block  # head shares the embedding
    assert (spec.wrap_unit_params, spec.wrap_unit_count) == (block, 3)
    assert spec.is_bare
    assert resolve_model(m).params == spec.params


def test_count_module_takes_a_class_name_and_suggests_on_typos():
    Toy, _ = _toy()
    spec = count_module(Toy(), wrap_cls="Linear")
    assert spec.wrap_unit_params == 64 * 256 + 256 and spec.wrap_unit_count == 7  # 6 in blocks + the head
    with pytest.raises(PlanError, match="Did you mean 'Block'"):
        count_module(Toy(), wrap_cls="Blok")


def test_count_module_builds_a_factory_on_the_meta_device():
    import torch.nn as nn

    # about 4.3 billion parameters: only possible without allocating them
    spec = count_module(lambda: nn.Sequential(*[nn.Linear(16384, 16384) for _ in range(16)]))
    assert spec.params == 16 * (16384 * 16384 + 16384)
    assert spec.wrap_unit_count == 16


def test_count_module_rejects_non_modules():
    with pytest.raises(PlanError, match="nn.Module"):
        count_module(42)


def test_importing_models_does_not_import_torch():
    code = "import sys, shardlab.models, shardlab.estimate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
