"""Model specs: GPT / Llama-style shapes, presets, bare parameter counts.

A ModelSpec is pure data (no torch). The runner's training model (shardlab/run/gpt.py) is built from
the same spec and a test checks its real parameter count equals `ModelSpec.params`, so the estimator
and the runs talk about the same model.

Architectures (untied input embedding and LM head in both):
- family "gpt": learned position embedding [seq_len, d]; per block LayerNorm (weight+bias) before
  attention and MLP; fused qkv Linear(d, d + 2*kv_dim) with bias; out proj Linear(d, d) with bias;
  MLP Linear(d, ffn) + GELU + Linear(ffn, d), with biases; final LayerNorm; lm_head Linear(d, vocab)
  without bias.
- family "llama": RoPE (no position parameters); RMSNorm (weight only); no biases; SwiGLU MLP with
  gate and up Linear(d, ffn) and down Linear(ffn, d); final RMSNorm; lm_head without bias.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from shardlab.plan import bad_input


@dataclass(frozen=True)
class ModelSpec:
    """A transformer's shape. `params_override` set means a bare parameter count (model states only)."""

    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq_len: int
    kv_heads: int | None = None
    ffn_hidden: int | None = None
    family: Literal["gpt", "llama"] = "gpt"
    params_override: int | None = field(default=None, compare=False)

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    @property
    def is_bare(self) -> bool:
        return self.params_override is not None

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block (the FSDP wrap unit of a transformer policy)."""
        d, f, kv = self.hidden, self.ffn, self.kv_dim
        if self.family == "gpt":
            attn = d * (d + 2 * kv) + (d + 2 * kv) + d * d + d
            mlp = d * f + f + f * d + d
            norms = 4 * d
        else:
            attn = d * (d + 2 * kv) + d * d
            mlp = 3 * d * f
            norms = 2 * d
        return attn + mlp + norms

    @property
    def embedding_params(self) -> int:
        """Input token embedding (+ learned positions for gpt)."""
        return self.vocab * self.hidden + (self.seq_len * self.hidden if self.family == "gpt" else 0)

    @property
    def head_params(self) -> int:
        """Final norm + LM head."""
        return (2 if self.family == "gpt" else 1) * self.hidden + self.hidden * self.vocab

    @property
    def params(self) -> int:
        if self.params_override is not None:
            return self.params_override
        return self.embedding_params + self.layers * self.block_params + self.head_params

    def to_dict(self) -> dict:
        return asdict(self)


def _gpt(name, layers, hidden, heads, vocab=50257, seq_len=2048) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, vocab, seq_len)


def _llama(name, layers, hidden, heads, kv_heads, ffn, vocab, seq_len) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, vocab, seq_len, kv_heads=kv_heads, ffn_hidden=ffn, family="llama")


PRESETS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        # Trains on a CPU in seconds.
        ModelSpec("gpt-tiny", layers=2, hidden=64, heads=4, vocab=512, seq_len=64),
        ModelSpec("gpt-small", layers=4, hidden=256, heads=8, vocab=4096, seq_len=128),
        # GPT-3 paper shapes (Brown et al. 2020, Table 2.1), GPT-2 vocabulary.
        _gpt("gpt-125m", 12, 768, 12),
        _gpt("gpt-350m", 24, 1024, 16),
        _gpt("gpt-760m", 24, 1536, 16),
        _gpt("gpt-1.3b", 24, 2048, 16),
        _gpt("gpt-2.7b", 32, 2560, 32),
        _gpt("gpt-6.7b", 32, 4096, 32),
        _gpt("gpt-13b", 40, 5120, 40),
        # The GPU validation model (about 0.94B): d=2048, 16 layers, 16 heads, T=2048.
        _gpt("gpt-1b", 16, 2048, 16, vocab=32000),
        # Llama-style shapes.
        _llama("llama-7b", 32, 4096, 32, 32, 11008, 32000, 4096),
        _llama("llama-8b", 32, 4096, 32, 8, 14336, 128256, 8192),
        _llama("llama-70b", 80, 8192, 64, 8, 28672, 128256, 8192),
    )
}

_SHAPE_KEYS = {"layers", "hidden", "heads", "vocab", "seq_len", "kv_heads", "ffn_hidden", "family", "name"}


def bare(params: int | float | str) -> ModelSpec:
    """A bare parameter count: model states only (no shape, so no activations)."""
    try:
        n = int(float(params))
    except (TypeError, ValueError):
        raise bad_input("--params", f"--params={params!r} is not a number. Give a parameter count such as 7e9 or 1300000000.") from None
    if n <= 0:
        raise bad_input("--params", f"--params={params!r} must be positive. Give a parameter count such as 7e9.")
    return ModelSpec(f"{n / 1e9:g}B params", layers=0, hidden=0, heads=1, vocab=0, seq_len=0, params_override=n)


def shape_from_dict(data: dict, name: str = "custom") -> ModelSpec:
    """A hand-given shape (layers, hidden, heads, vocab, seq_len; optional kv_heads, ffn_hidden, family)."""
    if not isinstance(data, dict):
        raise bad_input("model", f"a model shape must be a mapping with layers, hidden, heads, vocab, seq_len; got {type(data).__name__}.")
    unknown = set(data) - _SHAPE_KEYS
    if unknown:
        raise bad_input("model", f"model shape has unknown keys {sorted(unknown)}; valid keys are {sorted(_SHAPE_KEYS)}.")
    missing = {"layers", "hidden", "heads", "vocab", "seq_len"} - set(data)
    if missing:
        raise bad_input("model", f"model shape lacks {sorted(missing)}. Add them (e.g. layers: 24, hidden: 2048, heads: 16, vocab: 50257, seq_len: 2048).")
    vals = {"name": str(data.get("name", name)), "family": data.get("family", "gpt")}
    for k in ("layers", "hidden", "heads", "vocab", "seq_len", "kv_heads", "ffn_hidden"):
        v = data.get(k)
        if v is None and k in ("kv_heads", "ffn_hidden"):
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad_input(f"model.{k}", f"model.{k}={v!r} must be a positive whole number.")
        vals[k] = v
    if vals["family"] not in ("gpt", "llama"):
        raise bad_input("model.family", f"model.family={vals['family']!r} must be gpt or llama.")
    if vals["hidden"] % vals["heads"]:
        raise bad_input("model.heads", f"model.heads={vals['heads']} must divide model.hidden={vals['hidden']} (head size = hidden / heads).")
    if vals["heads"] % vals.get("kv_heads", vals["heads"]):
        raise bad_input("model.kv_heads", f"model.kv_heads={vals['kv_heads']} must divide model.heads={vals['heads']} (grouped-query attention).")
    return ModelSpec(**vals)


def resolve_model(spec: str | int | float | dict | ModelSpec) -> ModelSpec:
    """A preset name, a shape file path, a shape dict, or a bare count -> ModelSpec (PlanError if bad)."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, dict):
        return shape_from_dict(spec)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return bare(spec)
    s = str(spec)
    if s in PRESETS:
        return PRESETS[s]
    if s.endswith((".yaml", ".yml", ".json")) or Path(s).is_file():
        from shardlab.plan import parse_text, read_text

        return shape_from_dict(parse_text(read_text(s), s), name=Path(s).stem)
    try:
        return bare(float(s))
    except Exception:
        pass
    import difflib

    near = difflib.get_close_matches(s, list(PRESETS), n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise bad_input("--model", f"--model={s!r} is neither a preset nor a shape file.{hint} Presets: {', '.join(PRESETS)}.")


def with_seq_len(spec: ModelSpec, seq_len: int) -> ModelSpec:
    return replace(spec, seq_len=seq_len)
