"""The training model: a GPT / Llama-style transformer built from a `shardlab.models.ModelSpec`.

The architecture is exactly the one models.py describes, so that the estimator (which counts
`ModelSpec.params`) and the real runs talk about the same model; tests/test_worker.py checks the count
for several presets on the meta device. Each transformer block is a `Block`, the Plan's default FSDP
wrap unit (`wrap.transformer_layer_cls`). Attention is PyTorch's fused SDPA (causal); the llama family
uses rotary position embeddings computed on the fly (no buffers, so nothing to shard or broadcast).
Initialisation draws from a private generator seeded by `seed`, so every rank and every framework
starts from the same weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shardlab.models import ModelSpec


def _rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding over the last dim of x [B, H, T, Dh] (pairs of halves)."""
    t, dh = x.shape[-2], x.shape[-1]
    half = dh // 2
    inv = 1.0 / (10000.0 ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with one fused qkv projection (grouped-query when kv_heads < heads)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        bias = spec.family == "gpt"
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.n_kv_heads, spec.head_dim
        self.rope = spec.family == "llama"
        self.qkv = nn.Linear(spec.hidden, spec.hidden + 2 * spec.kv_dim, bias=bias)
        self.proj = nn.Linear(spec.hidden, spec.hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        kv = self.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split((d, kv, kv), dim=-1)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            q, k = _rope(q), _rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """GELU MLP (gpt, with biases) or SwiGLU (llama, no biases)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.swiglu = spec.family == "llama"
        if self.swiglu:
            self.gate = nn.Linear(spec.hidden, spec.ffn, bias=False)
            self.up = nn.Linear(spec.hidden, spec.ffn, bias=False)
            self.down = nn.Linear(spec.ffn, spec.hidden, bias=False)
        else:
            self.fc = nn.Linear(spec.hidden, spec.ffn)
            self.out = nn.Linear(spec.ffn, spec.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.out(F.gelu(self.fc(x)))


def _norm(spec: ModelSpec) -> nn.Module:
    return nn.LayerNorm(spec.hidden) if spec.family == "gpt" else nn.RMSNorm(spec.hidden, eps=1e-5)


class Block(nn.Module):
    """One pre-norm transformer block: the FSDP wrap unit and the activation-checkpointing unit."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.norm1 = _norm(spec)
        self.attn = Attention(spec)
        self.norm2 = _norm(spec)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token embedding (+ learned positions for gpt), `layers` Blocks, final norm, untied LM head."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.is_bare:
            raise ValueError(f"model {spec.name!r} is a bare parameter count without a shape; a run needs a preset or a shape")
        self.spec = spec
        self.tok_emb = nn.Embedding(spec.vocab, spec.hidden)
        self.pos_emb = nn.Embedding(spec.seq_len, spec.hidden) if spec.family == "gpt" else None
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.layers))
        self.norm = _norm(spec)
        self.lm_head = nn.Linear(spec.hidden, spec.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]."""
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """GPT-2 style init from a private generator: same seed -> same weights on any rank.

        Residual output projections get std 0.02/sqrt(2L) so activations keep their scale with depth.
        """
        g = torch.Generator().manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * max(1, self.spec.layers))
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if p.dim() == 1:
                # norm weights start at 1, biases at 0
                val = 1.0 if name.endswith("weight") else 0.0
                p.fill_(val)
                continue
            std = resid_std if name.endswith(("proj.weight", "out.weight", "down.weight")) else 0.02
            if p.dtype == torch.float32:
                p.normal_(0.0, std, generator=g)  # the same numbers as randn * std, without the copies
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))


def build_model(spec: ModelSpec, seed: int = 0, device: str | torch.device = "cpu") -> GPT:
    """A freshly initialised GPT on `device` ("meta" builds it without memory, for counting).

    Built on meta and then given empty storage, so torch's default initialisation (overwritten by
    init_weights anyway) is skipped: a third of the start-up of a 1B model.
    """
    with torch.device("meta"):
        model = GPT(spec)
    if str(device) != "meta":
        model.to_empty(device=device)
        model.init_weights(seed)
    return model


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (computed in fp32 whatever the compute dtype)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
