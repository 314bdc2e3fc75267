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

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

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
    # Set by count_module for a user nn.Module: its repeated block (FSDP/ZeRO-3 gather unit).
    wrap_unit_params: int | None = field(default=None, compare=False)
    wrap_unit_count: int = field(default=0, compare=False)
    # Set for models counted from a real nn.Module (shardlab/usermodel.py: Hugging Face configs and
    # factories): how to build it again, its wrap class, its parameter tensors, FLOPs it was counted at.
    source: str | None = field(default=None, compare=False)
    wrap_cls: str | None = field(default=None, compare=False)
    shapes: "ParamShapes | None" = field(default=None, compare=False)
    counted_flops_per_token: int | None = field(default=None, compare=False)
    block_work: dict | None = field(default=None, compare=False)  # blockwork.py's counts of one real block
    tree: object = field(default=None, compare=False, repr=False)  # frameworks.units.Node of the real module
    # Whose code runs the blocks, for the activation arithmetic (estimate/activations.py): "shardlab"
    # (shardlab.run.gpt) or "transformers" (a model transformers builds from its config: its Python
    # RMSNorm and rotary embedding keep other tensors than the runner's).
    layout: str = field(default="shardlab", compare=False)
    # The width of one attention head where the model sets it apart from hidden / heads (a Hugging Face
    # config's head_dim: Qwen3 1024 / 16 heads of 128, Gemma 256, Mistral-Nemo): its q projection is then
    # hidden -> heads x head_dim, not hidden -> hidden. None: hidden / heads (shardlab's own model).
    head_size: int | None = None
    # Whether each attention head's queries and keys are normalised before RoPE (a `q_norm` / `k_norm` in the
    # block: Qwen3, Gemma 3): transformers' RMSNorm then keeps their fp32 copies for backward.
    qk_norm: bool = False
    # Whether one projection makes q, k and v together (a `qkv_proj` in the block: Phi-3): v, a view of its output,
    # then keeps the whole output alive for attention's backward.
    fused_qkv: bool = False

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        """Width of the attention's queries (and of the out projection's input): heads x head_dim."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    @property
    def is_bare(self) -> bool:
        """No transformer shape (a count, or a module without one): model states only, no activations."""
        return self.params_override is not None and self.layers == 0

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block (the FSDP wrap unit of a transformer policy)."""
        d, f, kv, q = self.hidden, self.ffn, self.kv_dim, self.q_dim
        if self.family == "gpt":
            attn = d * (q + 2 * kv) + (q + 2 * kv) + q * d + d
            mlp = d * f + f + f * d + d
            norms = 4 * d
        else:
            attn = d * (q + 2 * kv) + q * d
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
        return {k: v for k, v in asdict(self).items() if k != "tree"}


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

# Largest shape values taken (the biggest published models use ~100-200 layers, hidden 16-25k,
# vocab 256k, contexts of 1M): far above any real model, small enough to estimate instantly.
SHAPE_LIMITS = {"layers": 10_000, "hidden": 1_000_000, "heads": 100_000, "vocab": 100_000_000,
                "seq_len": 100_000_000, "kv_heads": 100_000, "ffn_hidden": 10_000_000}
_SHAPE_KEYS = {"layers", "hidden", "heads", "vocab", "seq_len", "kv_heads", "ffn_hidden", "family", "name", "layout"}
LAYOUTS = ("shardlab", "transformers")


def bare(params: int | float | str) -> ModelSpec:
    """A bare parameter count: model states only (no shape, so no activations)."""
    from shardlab.safe_input import MAX_PARAMS, short

    try:
        n = int(float(params))
    except (TypeError, ValueError, OverflowError):
        raise bad_input("--params", f"--params={short(params)} is not a finite number. Give a parameter count such as 7e9 or 1300000000.") from None
    if n <= 0:
        raise bad_input("--params", f"--params={short(params)} must be positive. Give a parameter count such as 7e9.")
    if n > MAX_PARAMS:
        raise bad_input("--params", f"--params={short(params)} is beyond what shardlab models (at most {MAX_PARAMS:.0e} parameters). Give a real model's size, e.g. 7e9.")
    return ModelSpec(f"{n / 1e9:g}B params", layers=0, hidden=0, heads=1, vocab=0, seq_len=0, params_override=n)


def shape_from_dict(data: dict, name: str = "custom") -> ModelSpec:
    """A hand-given shape (layers, hidden, heads, vocab, seq_len; optional kv_heads, ffn_hidden, family)."""
    if not isinstance(data, dict):
        raise bad_input("model", f"a model shape must be a mapping with layers, hidden, heads, vocab, seq_len; got {type(data).__name__}.")
    from shardlab.safe_input import short

    unknown = {str(k) for k in data} - _SHAPE_KEYS
    if unknown:
        raise bad_input("model", f"model shape has unknown keys {short(sorted(unknown))}; valid keys are {sorted(_SHAPE_KEYS)}.")
    missing = {"layers", "hidden", "heads", "vocab", "seq_len"} - set(data)
    if missing:
        raise bad_input("model", f"model shape lacks {sorted(missing)}. Add them (e.g. layers: 24, hidden: 2048, heads: 16, vocab: 50257, seq_len: 2048).")
    vals = {"name": str(data.get("name", name))[:100], "family": data.get("family", "gpt")}
    for k in ("layers", "hidden", "heads", "vocab", "seq_len", "kv_heads", "ffn_hidden"):
        v = data.get(k)
        if v is None and k in ("kv_heads", "ffn_hidden"):
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad_input(f"model.{k}", f"model.{k}={short(v)} must be a positive whole number.")
        if v > SHAPE_LIMITS[k]:
            # the estimate walks the layers and multiplies sizes: bounded, so it runs in constant memory
            raise bad_input(f"model.{k}", f"model.{k}={short(v)} is beyond what shardlab models (at most {SHAPE_LIMITS[k]:,}). Give a real model's shape.")
        vals[k] = v
    if vals["family"] not in ("gpt", "llama"):
        raise bad_input("model.family", f"model.family={short(vals['family'])} must be gpt or llama.")
    if data.get("layout", "shardlab") not in LAYOUTS:
        raise bad_input("model.layout", f"model.layout={short(data.get('layout'))} must be one of {', '.join(LAYOUTS)} "
                        "(transformers: the model is built by Hugging Face transformers from its config).")
    vals["layout"] = data.get("layout", "shardlab")
    if vals["hidden"] % vals["heads"]:
        raise bad_input("model.heads", f"model.heads={vals['heads']} must divide model.hidden={vals['hidden']} (head size = hidden / heads).")
    if vals["family"] == "llama" and vals["hidden"] // vals["heads"] % 2:
        # rotary embeddings turn pairs of a head's channels (its two halves): an odd head size has no pairs, and the
        # model's forward fails in every run (found by a random search of shapes through --trace, session 22)
        raise bad_input("model.heads", f"model.hidden / model.heads = {vals['hidden']} / {vals['heads']} = {vals['hidden'] // vals['heads']} "
                        "is odd; a llama-family head rotates pairs of channels (RoPE), so its size must be even. Change heads "
                        "or hidden, or use family: gpt.")
    if vals["heads"] % vals.get("kv_heads", vals["heads"]):
        raise bad_input("model.kv_heads", f"model.kv_heads={vals['kv_heads']} must divide model.heads={vals['heads']} (grouped-query attention).")
    return ModelSpec(**vals)


# The served app (`shardlab app`) turns this off: there a model named in the browser may be a preset,
# an `hf:` source or a number, never a file on the server or a module:function to import (issue 19).
SERVER_SOURCES_ALLOWED = True


def _served_check(s: str) -> None:
    t = s.strip()
    if t in PRESETS or t.startswith("hf:"):
        return
    try:
        float(t)
        return
    except ValueError:
        pass
    from shardlab.safe_input import short

    raise bad_input("model", f"model={short(t)}: the served app takes a preset, hf:<model_type> [key=value ...] or a parameter count; "
                    "a file path or module:function would be read or run on the server, so they are off here. Use them from a notebook or the CLI.")


def resolve_model(spec: str | int | float | dict | ModelSpec) -> ModelSpec:
    """A preset name, a shape file path, a shape dict, a bare count, an nn.Module or a factory, or a
    user model source (`hf:llama ...`, a Hugging Face config.json, `module:function`; see
    shardlab/usermodel.py) -> ModelSpec (PlanError if bad)."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str) and not spec.strip():  # a cleared model box: was read as the path "." ("is a directory")
        raise bad_input("--model", "no model given (the model is empty). Give a preset such as gpt-1.3b or llama-8b, a shape file, "
                        "or your own model: hf:<model_type> [key=value ...], a config.json, or module:function.")
    if isinstance(spec, str) and not SERVER_SOURCES_ALLOWED:
        _served_check(spec)
    if hasattr(spec, "named_parameters") or (callable(spec) and not isinstance(spec, str)):
        return count_module(spec)  # an nn.Module or a factory, counted without importing torch here
    from shardlab import usermodel

    if isinstance(spec, str) and usermodel.is_source(spec):
        return usermodel.resolve(spec).spec
    if isinstance(spec, dict):
        return shape_from_dict(spec)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return bare(spec)
    s = str(spec)
    if s in PRESETS:
        return PRESETS[s]
    from shardlab.plan import names_file, parse_text, read_text

    if s.endswith((".yaml", ".yml", ".json")) or names_file(s):
        return shape_from_dict(parse_text(read_text(s), s), name=Path(s).stem)
    try:
        n = float(s)
    except ValueError:
        pass
    else:
        return bare(n)
    import difflib

    near = difflib.get_close_matches(s[:100], list(PRESETS), n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    from shardlab.safe_input import short

    raise bad_input("--model", f"--model={short(s)} is neither a preset nor a shape file nor a model source.{hint} Presets: {', '.join(PRESETS)}; "
                    "or hf:<model_type> [key=value ...] (e.g. hf:llama), a Hugging Face config.json, or module:function.")


def with_seq_len(spec: ModelSpec, seq_len: int) -> ModelSpec:
    return replace(spec, seq_len=seq_len)



# --------------------------------------------------------------------------------------------
# Shape arithmetic for the estimators: tensor shapes, FLOPs, activations, wrap units.
#
# Everything here is cached on the shape (widgets call the estimator on every change), so the key
# must include the fields that ModelSpec's equality ignores (params_override, wrap unit).


def _key(spec: ModelSpec) -> tuple:
    return (spec.layers, spec.hidden, spec.heads, spec.vocab, spec.seq_len, spec.kv_heads, spec.ffn_hidden,
            spec.family, spec.params_override, spec.wrap_unit_params, spec.wrap_unit_count, spec.shapes, spec.source, spec.layout,
            spec.head_size, spec.qk_norm, spec.fused_qkv)


@dataclass(frozen=True)
class ParamShapes:
    """Parameter tensors as (dim0, numel // dim0), grouped as FSDP's transformer policy groups them.

    `embed` and `head` make up the root unit (input embeddings; final norm + LM head); `block` is one
    transformer block, repeated `layers` times. For a bare count the whole model is one head tensor.
    """

    embed: tuple[tuple[int, int], ...]
    block: tuple[tuple[int, int], ...]
    layers: int
    head: tuple[tuple[int, int], ...]

    @property
    def root_numel(self) -> int:
        return sum(a * b for a, b in self.embed + self.head)

    @property
    def block_numel(self) -> int:
        return sum(a * b for a, b in self.block)


_SHAPES: dict[tuple, ParamShapes] = {}


def param_shapes(spec: ModelSpec) -> ParamShapes:
    """The model's parameter tensors (for shard padding, persistence thresholds and wrap units)."""
    if spec.shapes is not None:
        return spec.shapes
    k = _key(spec)
    got = _SHAPES.get(k)
    if got is not None:
        return got
    d, f, kv, V, q = spec.hidden, spec.ffn, spec.kv_dim, spec.vocab, spec.q_dim
    if spec.is_bare:
        n = spec.params
        if spec.wrap_unit_params and spec.wrap_unit_count:
            u, c = spec.wrap_unit_params, spec.wrap_unit_count
            rest = max(n - u * c, 0)
            got = ParamShapes((), ((u, 1),), c, ((rest, 1),) if rest else ())
        else:
            got = ParamShapes((), (), 0, ((n, 1),))
    elif spec.family == "gpt":
        embed = ((V, d), (spec.seq_len, d))
        block = ((d, 1), (d, 1), (q + 2 * kv, d), (q + 2 * kv, 1), (d, q), (d, 1),
                 (d, 1), (d, 1), (f, d), (f, 1), (d, f), (d, 1))
        got = ParamShapes(embed, block, spec.layers, ((d, 1), (d, 1), (V, d)))
    else:
        block = ((d, 1), (q + 2 * kv, d), (d, q), (d, 1), (f, d), (f, d), (d, f))
        got = ParamShapes(((V, d),), block, spec.layers, ((d, 1), (V, d)))
    _SHAPES[k] = got
    return got


def flops_per_token(spec: ModelSpec, seq_len: int | None = None) -> int:
    """Training FLOPs per token as torchtitan counts them: 6·N + 12·L·d·T.

    N excludes the input embedding table (and GPT's learned positions): a lookup is no matmul. The
    LM head stays in N (it is a matmul). 12·L·q·T is attention's QK^T and AV, forward and backward (q: heads x
    head_dim, the hidden size unless the model sets head_dim apart).
    A bare count has no shape, so it gets 6·N only. Recomputation (activation checkpointing) is
    not counted, as in torchtitan's MFU; the step-time model adds it separately.
    A model counted from its nn.Module (usermodel.py) has its FLOPs counted by torch's FLOP counter at
    its own seq_len; another seq_len moves only the attention term.
    """
    if spec.counted_flops_per_token is not None:
        t = spec.seq_len if seq_len is None else seq_len
        extra = 12 * spec.layers * spec.q_dim * (t - spec.seq_len) if spec.layers and spec.seq_len else 0
        return spec.counted_flops_per_token + extra
    if spec.is_bare:
        return 6 * spec.params
    t = spec.seq_len if seq_len is None else seq_len
    return 6 * (spec.params - spec.embedding_params) + 12 * spec.layers * spec.q_dim * t


def wrap_units(spec: ModelSpec, policy: str = "transformer", min_num_params: int = 100_000_000) -> list[tuple[str, int]]:
    """FSDP units as (name, parameters it gathers), the root unit first, then the others in wrap order.

    The same choice the runner makes (frameworks/units.py) on the module tree of shardlab's GPT for
    this shape. transformer: one unit per block, the root keeps the rest; size: every module whose
    not-yet-wrapped parameters reach `min_num_params` (an embedding or LM head too); none: one unit.
    """
    key = (_key(spec), policy, min_num_params)
    if key not in _UNITS:
        from shardlab.frameworks.units import spec_tree, units

        # a model counted from its nn.Module (usermodel.py) has its own tree and block class
        one_block = spec.tree is None and not spec.is_bare and policy == "transformer"
        tree = spec.tree if spec.tree is not None else spec_tree(replace(spec, layers=1) if one_block else spec)
        names = (spec.wrap_cls,) if spec.tree is not None and spec.wrap_cls else ("Block",)
        if one_block:
            # shardlab's GPT: every block a unit, nothing in it one, the root keeps the rest (which does not depend on
            # the layers): worked out on a one-block tree instead of walking them all (a quarter of a new shape's
            # arithmetic around the replays: benchmarks/estimate_speed.py --outside)
            (_, block), (_, rest) = units(tree, policy, min_num_params, names)
            found = [(f"blocks.{i}", block) for i in range(spec.layers)] + [("", rest)]
        elif not spec.is_bare or spec.wrap_unit_params or spec.tree is not None:
            found = units(tree, policy, min_num_params, names)
        else:
            found = [("", spec.params)]
        _UNITS[key] = [("root", found[-1][1])] + found[:-1]
    return list(_UNITS[key])


_UNITS: dict[tuple, list[tuple[str, int]]] = {}


def largest_wrap_unit(spec: ModelSpec, policy: str = "transformer", min_num_params: int = 100_000_000) -> int:
    """Parameters of the largest unit FSDP / ZeRO-3 gathers at once (root unit included)."""
    return max(n for _, n in wrap_units(spec, policy, min_num_params))


def count_module(module, wrap_cls: str | None = None, name: str | None = None) -> ModelSpec:
    """Count a user nn.Module or a zero-argument factory (see shardlab.usermodel.count_module)."""
    from shardlab.usermodel import count_module as count

    return count(module, wrap_cls=wrap_cls, name=name)
