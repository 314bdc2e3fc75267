"""Deterministic synthetic batches, the same in every framework and every rank layout.

For each optimizer step the global batch (micro_batch x grad_accum x world sequences) is a pure
function of (seed, step); rank r's micro-batch k is a fixed slice of it. So two runs with the same
seed and the same global layout see exactly the same tokens whichever framework shards the model,
which is what lets tests compare their losses.

The sequences are learnable: token i of a sequence is perm[(start + i) mod vocab] for a permutation
fixed by the seed, so each token has one likely successor (a bigram a model picks up quickly), with a
little noise. The loss visibly falls within a few dozen steps instead of sitting at log(vocab).
"""

from __future__ import annotations

import torch

_NOISE = 0.05  # share of tokens replaced by random ones


def global_batch(seed: int, step: int, sequences: int, seq_len: int, vocab: int) -> torch.Tensor:
    """All sequences of one optimizer step: int64 [sequences, seq_len + 1] (inputs + shifted targets)."""
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
    start = torch.randint(0, vocab, (sequences, 1), generator=g)
    tokens = perm[(start + torch.arange(seq_len + 1).unsqueeze(0)) % vocab]
    noise = torch.rand(tokens.shape, generator=g) < _NOISE
    tokens[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    return tokens


def micro_batch(seed: int, step: int, micro: int, *, rank: int, world_size: int, micro_batch_size: int,
                grad_accum_steps: int, seq_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s micro-batch `micro` (0-based) of optimizer step `step` (1-based): (inputs, targets).

    Rows are laid out [micro][rank][sequence], so a run with more accumulation and fewer ranks sees
    the same global set of sequences per step.
    """
    total = micro_batch_size * grad_accum_steps * world_size
    tokens = global_batch(seed, step, total, seq_len, vocab)
    first = (micro * world_size + rank) * micro_batch_size
    rows = tokens[first:first + micro_batch_size]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class Batches:
    """A batch function bound to one rank's layout: batches(step, micro) -> (inputs, targets) on `device`."""

    def __init__(self, *, seed: int, rank: int, world_size: int, micro_batch_size: int, grad_accum_steps: int,
                 seq_len: int, vocab: int, device: str | torch.device = "cpu"):
        self.seed, self.rank, self.world = seed, rank, world_size
        self.mbs, self.accum, self.seq_len, self.vocab = micro_batch_size, grad_accum_steps, seq_len, vocab
        self.device = torch.device(device)
        self._cache: tuple[int, torch.Tensor] | None = None

    def __call__(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        # One global batch per step, cut into micro-batches (saves regenerating it per micro-step).
        if self._cache is None or self._cache[0] != step:
            total = self.mbs * self.accum * self.world
            self._cache = (step, global_batch(self.seed, step, total, self.seq_len, self.vocab))
        first = (micro * self.world + self.rank) * self.mbs
        rows = self._cache[1][first:first + self.mbs]
        x, y = rows[:, :-1], rows[:, 1:]
        return x.to(self.device, non_blocking=True).contiguous(), y.to(self.device, non_blocking=True).contiguous()
