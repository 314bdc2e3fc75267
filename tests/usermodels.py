"""Factories the user-model tests pass as 'tests.usermodels:NAME' (importable from the repo root).

`tiny_lm` is the kind of model a person writes: an nn.Module of their own, token ids in, logits out,
no Hugging Face; shardlab reads its vocabulary from its Embedding and its sequence length from the
`seq_len` attribute. The others are the bad inputs the CLI must refuse with a clear message.
"""

from __future__ import annotations

import torch
from torch import nn


class MyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 32, layers: int = 2, seq_len: int = 16):
        super().__init__()
        self.seq_len = seq_len
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(MyBlock(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def tiny_lm(layers: int = 2) -> nn.Module:
    return TinyLM(layers=layers)


def not_a_model():
    return {"weights": [1, 2, 3]}


class Flat(nn.Module):
    """No repeated block: nothing for FSDP's transformer policy to wrap."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 64)

    def forward(self, ids):
        return self.head(self.emb(ids))


def flat() -> nn.Module:
    return Flat()


class TrainingOnlyBug(TinyLM):
    """Fine in evaluation mode, where shardlab counts a model's block; broken in a training step (a matmul of the
    wrong width there), which only the traced estimate runs: the trace must name this line, not crash."""

    def forward(self, ids):
        logits = super().forward(ids)
        return logits @ torch.ones(3, 3) if self.training else logits


def training_only_bug() -> nn.Module:
    return TrainingOnlyBug()


def fails_to_build() -> nn.Module:
    """A factory whose own code raises (session 19: a traceback, exit 1, where the user's line should be named)."""
    raise RuntimeError("no weights for this size")


NOT_A_FACTORY = 5  # `tests.usermodels:NOT_A_FACTORY` names a value, not a function


def all_frozen() -> nn.Module:
    """Every weight frozen: nothing to train (session 19: the run failed at its first backward, exit 1)."""
    m = TinyLM(layers=1)
    for p in m.parameters():
        p.requires_grad_(False)
    return m
