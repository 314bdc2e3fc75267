"""Models that are not shardlab's own GPT: Hugging Face configs and your own nn.Module.

A *source* is a string saying how to build a model, so the CLI (`--model`), `launch` / `estimate`
(`model=`), the widgets and the worker processes can all pass the same thing around:

  hf:<model_type> [key=value ...]       transformers' config for that model type, its defaults
                                        overridden by the keys (hf:llama hidden_size=2048 num_hidden_layers=16)
  path/to/config.json [key=value ...]   a Hugging Face config file (one with "model_type")
  module:function [key=value ...]       your factory: returns an nn.Module, or (model, batch_fn)

`seq_len=N` sets the length of the synthetic sequences (and of the estimate); for a factory
`vocab=N` declares its vocabulary, and any other key is passed to the factory as a keyword argument.
Hugging Face models get random weights from their config: nothing is downloaded (HF_HUB_OFFLINE=1).

`resolve(text)` gives a UserModel: `.spec` is the ModelSpec the estimator uses, counted on the meta
device (exact parameters, parameter tensors grouped into the wrap units FSDP and ZeRO-3 gather, the
transformer shape read from the config, FLOPs per token from torch's FLOP counter); `.build()` gives
the nn.Module for the worker, `.batches(...)` its deterministic synthetic batches. What a model takes
as input is read from the model: Hugging Face's `main_input_name`, else its first layer (an
Embedding takes token ids, a Linear takes features). How the wrap unit is found: blocks.py.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from shardlab.models import ModelSpec
from shardlab.plan import PlanError, bad_input

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
DEFAULT_SEQ_LEN = 2048  # a Hugging Face model's sequence length when its context is longer and seq_len is not given
FACTORY_SEQ_LEN = 128  # a token model from a factory that declares no sequence length
_OURS = ("seq_len", "vocab")  # source keys shardlab reads itself


def _offline() -> None:
    """No hub access while building models from configs (and no telemetry)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _split(text: str) -> tuple[str, dict]:
    """'hf:llama hidden_size=64 seq_len=32' -> ('hf:llama', {'hidden_size': 64, 'seq_len': 32})."""
    import yaml

    try:
        head, *rest = shlex.split(text)
    except ValueError as e:
        raise bad_input("--model", f"--model={text!r} cannot be split into words ({e}). Quote it as one argument: --model 'hf:llama hidden_size=64'.") from None
    kw = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise bad_input("--model", f"--model={text!r}: {item!r} is not key=value. Write overrides as key=value, e.g. hf:llama num_hidden_layers=2.")
        try:
            kw[key] = yaml.safe_load(value) if value else value
        except yaml.YAMLError:
            kw[key] = value
        if isinstance(kw[key], str) and _EXPONENT.fullmatch(value):  # YAML 1.1 reads 1e6 as a word; rope_theta=1e6 means a number
            kw[key] = float(value)
    return head, kw


_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _is_config_file(head: str) -> bool:
    return head.endswith(".json") and (Path(head).name == "config.json" or _json_has(head, "model_type", "architectures"))


def _json_has(path: str, *keys: str) -> bool:
    from shardlab.safe_input import load_json, read_file

    try:  # the one reader: a regular file of bounded size (a FIFO or a link to /dev/zero is not read)
        data = load_json(read_file(path, "model config"), path)
    except (PlanError, ValueError):
        return False
    return isinstance(data, dict) and any(k in data for k in keys)


def is_source(text: str) -> bool:
    """True for hf:..., a Hugging Face config.json (with overrides or not) and module:function."""
    words = str(text).strip().split()
    if not words:
        return False
    head = words[0]
    return head.startswith("hf:") or bool(_FACTORY.match(head)) or _is_config_file(head) or (len(words) > 1 and head.endswith(".json"))


def load_factory(target: str):
    """'module:function' -> the function (the module imported from the current directory or sys.path)."""
    import sys

    mod, _, fn = target.partition(":")
    if not mod or not fn:
        raise bad_input("model", f"model={target!r} must look like 'module:function'.")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # as `python -m` does: a console script (shardlab app) starts without it
    try:
        obj = importlib.import_module(mod)
        for part in fn.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError) as e:
        raise bad_input("model", f"model={target!r} cannot be loaded ({e}). Check that the module is importable from the "
                        f"current directory (or PYTHONPATH) and defines {fn}.") from None


def user_frame(exc: BaseException) -> str | None:
    """Where in the user's own code `exc` was raised: "file.py, line N (`code`)" for the last frame of its traceback
    outside torch, shardlab and contextlib, or None when every frame is theirs. A message that names the user's line
    needs no traceback (used by a factory that fails here and by estimate/trace.py's failed step)."""
    import contextlib
    import traceback

    import torch

    skip = (str(Path(torch.__file__).parent), str(Path(__file__).parent), contextlib.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(skip)]
    if not frames:
        return None
    f = frames[-1]
    return f"{Path(f.filename).name}, line {f.lineno} (`{(f.line or '').strip()}`)"


def source_of(factory) -> str:
    """A factory function -> its 'module:function' source, so worker processes can import it."""
    mod, qual = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not mod or mod == "__main__" or "<" in qual:
        raise bad_input("model", f"model={factory!r} is defined in a notebook or script ({mod}), which the training processes cannot import. "
                        "Put the factory in a .py file next to the notebook and pass model='file_module:function'.")
    return f"{mod}:{qual}"


@dataclass
class UserModel:
    """A parsed source. `kind` is "hf" or "factory"; `target` the model type, config path or module:function."""

    text: str
    kind: str
    target: str
    overrides: dict
    file: bool = False
    _described: tuple | None = field(default=None, repr=False)
    _hf_ds: object = field(default=None, repr=False)

    @property
    def declared_seq_len(self) -> int | None:
        return self.overrides.get("seq_len")

    # -- building --------------------------------------------------------------------------------
    def hf_config(self):
        from shardlab.hfmodels import config_from

        return config_from(self)

    def build(self, device: str = "cpu", seed: int = 0, zero_init: dict | None = None):
        """(nn.Module on `device` ("meta": no memory), the factory's own batch_fn or None).

        zero_init: a DeepSpeed ZeRO-3 config: build the model already partitioned (deepspeed.zero.Init).
        A Hugging Face model is handed to transformers' own ZeRO-3 path (HfDeepSpeedConfig), which
        also runs the model's weight initialisation on gathered parameters; inside a bare zero.Init
        it would act on empty partitions and leave torch's defaults (measured: GPT-2's first loss 40
        instead of 6.3, its tied embedding left at N(0, 1)).
        """
        import torch

        ctx = torch.device("meta") if str(device) == "meta" else contextlib.nullcontext()
        torch.manual_seed(seed)
        if self.kind == "hf":
            from shardlab.hfmodels import build_hf

            cfg = self.hf_config()
            if zero_init is not None:
                from transformers.integrations import HfDeepSpeedConfig

                self._hf_ds = HfDeepSpeedConfig(zero_init)  # transformers holds it weakly: keep it alive
            with ctx:
                return build_hf(cfg), None
        fn = load_factory(self.target)
        if not callable(fn):  # `module:name` naming a constant: was "TypeError: 'int' object is not callable", exit 1
            raise bad_input("model", f"model={self.target!r} names a value of type {type(fn).__name__}, not a function. Name the function "
                            "that builds the model (module:function), returning an nn.Module or (model, batch_fn).")
        kwargs = {k: v for k, v in self.overrides.items() if k not in _OURS}
        if zero_init is not None:
            import deepspeed

            ctx = deepspeed.zero.Init(config_dict_or_path=zero_init)
        try:
            with ctx:
                out = fn(**kwargs)
        except PlanError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's own code failed: said with its line, not a traceback (was exit 1)
            where = user_frame(e)
            given = f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else ""
            raise bad_input("model", f"the factory {self.target}{given} failed{' at ' + where if where else ''}: "
                            f"{type(e).__name__}: {str(e)[:300]}. Fix the factory, or the settings given to it.") from None
        return _model_and_batches(out, self.target)

    # -- describing ------------------------------------------------------------------------------
    def _describe(self) -> tuple[ModelSpec, dict]:
        if self._described is None:
            from shardlab.describe import describe

            model, batch_fn = self.build("meta")
            cfg = getattr(model, "config", None) if self.kind == "hf" else None
            inputs = input_spec(model, batch_fn, cfg, self.overrides)
            self._described = (describe(model, inputs, cfg, name=self.text, source=self.text), inputs)
        return self._described

    @property
    def spec(self) -> ModelSpec:
        return self._describe()[0]

    @property
    def inputs(self) -> dict:
        return self._describe()[1]

    def for_trace(self) -> dict:
        """What the traced estimate (estimate/trace.py) takes for a model that is not shardlab's GPT:
        {"module": a zero-argument callable building the model (under the caller's FakeTensorMode or
        device) whose forward(ids) returns logits, "spec": the ModelSpec (vocab, seq_len)}."""
        if self.inputs.get("kind") != "tokens":
            raise bad_input("model", f"model={self.text!r} does not take token ids, and the traced estimate feeds token ids. Use the analytical estimate.")

        def build():
            model, _ = self.build("cpu")
            return _LogitsOnly(model) if self.kind == "hf" else model

        # a factory's module has no config shape, so its ModelSpec carries no vocab or seq_len (it is estimated by its
        # parameters); the traced step feeds it the token batches its inputs declare (until session 17 it fed
        # vocab 0: `--model tests.usermodels:tiny_lm --trace` crashed in torch.randint)
        spec = replace(self.spec, vocab=self.inputs["vocab"], seq_len=self.inputs["seq_len"]) if not self.spec.vocab else self.spec
        return {"module": build, "spec": spec}

    def batches(self, batch_fn, *, seed: int, rank: int, world_size: int, micro_batch_size: int,
                grad_accum_steps: int, device: str):
        """batches(step, micro) -> (inputs, targets) on `device` for this model."""
        from shardlab.run.data import Batches

        if batch_fn is not None:
            return _OnDevice(batch_fn, device)
        i = self.inputs
        common = dict(seed=seed, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                      grad_accum_steps=grad_accum_steps, device=device)
        if i["kind"] == "tokens":
            return Batches(seq_len=i["seq_len"], vocab=i["vocab"], **common)
        return FloatBatches(shape=tuple(i["shape"]), classes=i["classes"], **common)


def _LogitsOnly(model):
    """`model` with a forward that returns the logits tensor (a Hugging Face model returns a ModelOutput)."""
    import torch

    from shardlab.describe import logits_of

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return logits_of(self.inner(x))

    return LogitsOnly(model)


def _model_and_batches(out, target: str):
    import torch

    if isinstance(out, torch.nn.Module):
        return out, None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module) and callable(out[1]):
        return out
    raise bad_input("model", f"the factory {target} returned {type(out).__name__}, not an nn.Module or (model, batch_fn). "
                    "Return the model, or a pair (model, batch_fn) where batch_fn(step, micro) gives (inputs, targets).")


@functools.lru_cache(maxsize=64)
def resolve(text: str) -> UserModel:
    """Parse a source (PlanError if it is not a usable one). Cached: widgets ask on every change."""
    _offline()
    text = str(text).strip()
    head, kw = _split(text)
    for k in _OURS:
        if k in kw and (not isinstance(kw[k], int) or isinstance(kw[k], bool) or kw[k] < 1):
            raise bad_input("--model", f"--model={text!r}: {k}={kw[k]!r} must be a positive whole number.")
    if head.startswith("hf:"):
        if not head[3:]:
            raise bad_input("--model", f"--model={text!r} names no model type. Write hf:<model_type>, e.g. hf:llama or hf:gpt2.")
        return UserModel(text, "hf", head[3:], kw)
    if head.endswith(".json"):
        if not Path(head).is_file():
            raise bad_input("--model", f"--model={text!r}: the file {head} does not exist. Give the path of a Hugging Face config.json.")
        path = str(Path(head).resolve())
        # the absolute path travels (run.json, compare from another folder): the same file wherever it is read
        text = " ".join([shlex.quote(path), *shlex.split(text)[1:]])
        return UserModel(text, "hf", path, kw, file=True)
    return UserModel(text, "factory", head, kw)


def _learned_positions(model, context: int, vocab: int) -> bool:
    """Whether the model looks positions up in a table of `context` rows (GPT-2, GPT-BigCode, OPT: an nn.Embedding of
    that many rows besides the token embedding), so that it cannot take longer sequences; rotary and ALiBi models
    compute positions and can (found when transformers' GPT-BigCode, n_positions 1024 by default, ran at T=2048 on
    the H200: a device-side assert, session 17)."""
    import torch

    return any(isinstance(m, torch.nn.Embedding) and m.num_embeddings in (context, context + 2) and m.num_embeddings != vocab
               for m in model.modules())


def input_spec(model, batch_fn, config, overrides: dict) -> dict:
    """What the model takes: {"kind": "tokens", "vocab", "seq_len"} or {"kind": "floats", "shape" (one
    sample), "classes"}, or {"kind": "custom"} when the factory gave its own batch_fn."""
    import torch

    if batch_fn is not None:
        return {"kind": "custom"}
    if config is not None:
        if getattr(model, "main_input_name", "input_ids") == "pixel_values":
            size = config.image_size
            return {"kind": "floats", "shape": [config.num_channels, size, size], "classes": config.num_labels}
        from shardlab.hfmodels import context_length

        ctx = context_length(config)
        seq = overrides.get("seq_len") or min(ctx or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
        if ctx and seq > ctx and _learned_positions(model, ctx, config.vocab_size):
            raise bad_input("--model", f"seq_len={seq} is longer than this model's {ctx} learned positions (a table of {ctx} "
                            "position embeddings: a longer sequence indexes past it, a device-side assert on a GPU). "
                            f"Give seq_len={ctx} or less, or raise the config's context (n_positions / max_position_embeddings).")
        return {"kind": "tokens", "vocab": config.vocab_size, "seq_len": seq}
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    declared_vocab = overrides.get("vocab") or getattr(model, "vocab_size", None)
    declared_seq = overrides.get("seq_len") or getattr(model, "seq_len", None) or getattr(model, "block_size", None)
    if isinstance(first, torch.nn.Embedding) or declared_vocab:
        return {"kind": "tokens", "vocab": int(declared_vocab or first.num_embeddings), "seq_len": int(declared_seq or FACTORY_SEQ_LEN)}
    if isinstance(first, torch.nn.Linear):
        shape = [int(declared_seq), first.in_features] if declared_seq else [first.in_features]
        return {"kind": "floats", "shape": shape, "classes": None}
    raise bad_input("model", f"cannot tell what inputs {type(model).__name__} takes (its first layer is {type(first).__name__}). "
                    "Declare them in the source (e.g. 'mymodule:make vocab=32000 seq_len=512'), or return (model, batch_fn) from the factory.")


def tokens_in(x) -> int:
    """Tokens in one batch of inputs: ids count one each; a float sample [.., features] counts per row
    of a [B, T, features] batch, else one per sample (an image is one sample)."""
    if not x.is_floating_point():
        return x.numel()
    return x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]


class FloatBatches:
    """Deterministic float inputs (features or images) and class targets, a pure function of (seed, step)."""

    def __init__(self, *, shape: tuple, classes: int | None, seed: int, rank: int, world_size: int,
                 micro_batch_size: int, grad_accum_steps: int, device: str):
        self.shape, self.classes, self.seed = shape, classes or shape[-1], seed
        self.rank, self.world, self.mbs = rank, world_size, micro_batch_size
        self.device = device

    def __call__(self, step: int, micro: int = 0):
        import torch

        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 131 + micro * 7919 + self.rank) & 0x7FFF_FFFF)
        x = torch.randn((self.mbs, *self.shape), generator=g)
        lead = (self.mbs, self.shape[0]) if len(self.shape) == 2 else (self.mbs,)
        y = torch.randint(0, self.classes, lead, generator=g)
        return x.to(self.device), y.to(self.device)


class _OnDevice:
    """A factory's batch_fn with its tensors moved to the run's device."""

    def __init__(self, fn, device: str):
        self.fn, self.device = fn, device

    def __call__(self, step: int, micro: int = 0):
        x, y = self.fn(step, micro)
        return x.to(self.device), y.to(self.device)


def count_module(module, wrap_cls: str | None = None, name: str | None = None) -> ModelSpec:
    """Count a user nn.Module (or a zero-argument factory, built on the meta device) for the estimator.

    Shared (tied) parameters count once. The wrap unit is the modules of class `wrap_cls` if given,
    else the block class blocks.find_block_class finds. A module counted this way is a bare count
    with wrap units (model states and gather buffers, no activations); with FLOPs per token when its
    inputs can be told from its first layer.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        if not callable(module):
            raise bad_input("model", f"model={module!r} is not an nn.Module or a function that builds one. Pass the module, or a zero-argument factory.")
        with torch.device("meta"):
            module = module()
        module, _ = _model_and_batches(module, getattr(module, "__qualname__", "the model factory"))
    from shardlab.describe import describe

    try:
        inputs = input_spec(module, None, None, {})
    except Exception:  # noqa: BLE001 - inputs unknown: no FLOPs, still a count
        inputs = {"kind": "custom"}
    return describe(module, inputs, None, name=name or type(module).__name__, wrap_cls=wrap_cls)


def with_wrap_class(plan, spec: ModelSpec):
    """The plan with wrap.transformer_layer_cls set to the model's block class, when the plan left the
    default ("Block", shardlab's GPT) or "auto". PlanError when the plan needs a block class (FSDP's
    transformer policy, activation checkpointing) and none was found."""
    if spec.source is None:
        return plan
    current = plan.wrap.transformer_layer_cls
    if current not in ("Block", "auto") or current == spec.wrap_cls:
        return plan
    if spec.wrap_cls is None:
        needs = plan.activation_checkpointing or (plan.framework != "deepspeed" and plan.wrap.policy == "transformer")
        if not needs:
            return plan
        raise bad_input("wrap.transformer_layer_cls", f"model {spec.name!r}: no transformer block class found (no _no_split_modules, no "
                        "module class repeated inside it), so FSDP's transformer wrap policy and activation checkpointing have no unit. "
                        "Name the block class in wrap.transformer_layer_cls (e.g. wrap: {transformer_layer_cls: MyBlock}), or use wrap.policy: size or none.")
    return plan.model_copy(update={"wrap": plan.wrap.model_copy(update={"transformer_layer_cls": spec.wrap_cls})})


