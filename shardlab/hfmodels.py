"""Hugging Face transformers models from a config alone: random weights, nothing downloaded.

`config_from(source)` turns `hf:<model_type> key=value ...` or a config.json (+ overrides) into a
transformers config (`AutoConfig.for_model`), refusing unknown model types and override keys the
config does not have (transformers would store a typo silently). `build_hf(config)` instantiates the
class the config names in "architectures", else the model type's causal-LM head, else its masked-LM
or image-classification head (an encoder such as BERT gets its masked-LM head), in torch's default dtype (fp32) with the KV
cache off. `shape_of(config)` reads the transformer shape the analytical estimator needs.
Only imported where a Hugging Face model is wanted: transformers takes seconds to import.
"""

from __future__ import annotations

import difflib

from shardlab.plan import bad_input

# shardlab's names for the shape -> the config attributes that hold it (first present wins; configs
# also answer the standard names through their attribute_map, e.g. GPT-2's n_embd as hidden_size)
_SHAPE_ATTRS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "ffn_hidden": ("intermediate_size", "n_inner", "ffn_dim"),
}


def _read_file(path: str) -> dict:
    from shardlab.safe_input import load_json, read_file

    text = read_file(path, "Hugging Face config.json")  # regular files of bounded size only; PlanError names the path
    try:
        data = load_json(text, path)
    except ValueError as e:
        raise bad_input("--model", f"--model={path!r} is not a Hugging Face config: it is not JSON ({e}). Give a config.json as "
                        "transformers writes it (save_pretrained), with a model_type key.") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise bad_input("--model", f"--model={path!r} is not a Hugging Face config: it has no model_type key. Give a config.json as "
                        "transformers writes it (e.g. {\"model_type\": \"llama\", \"hidden_size\": 2048, ...}).")
    return data


def _unknown_keys(model_type: str, defaults, over: dict) -> list[str]:
    """The override keys this config class does not have. A key the defaults lack may still be one transformers reads
    and converts (5.x folds a config.json's `rope_theta` / `rope_scaling` into `rope_parameters`): a key the class
    consumes is known; one it stores verbatim, as it stores any typo, is not."""
    from transformers import AutoConfig

    unknown = [k for k in over if not hasattr(defaults, k)]
    if not unknown:
        return []
    try:
        probe = AutoConfig.for_model(model_type, **{k: over[k] for k in unknown})
    except Exception:  # noqa: BLE001 - whatever it refuses, the caller names the first unknown key
        return unknown
    return [k for k in unknown if k in vars(probe)]


def config_from(um):
    """The transformers config for a UserModel of kind "hf" (PlanError for bad input)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.utils import logging

    logging.set_verbosity_error()  # e.g. GPT-2's default bos/eos ids outside a small test vocabulary

    over = {k: v for k, v in um.overrides.items() if k not in ("seq_len",)}
    if um.file:
        data = _read_file(um.target)
        model_type = data.pop("model_type")
        for k in ("transformers_version", "_name_or_path"):
            data.pop(k, None)
    else:
        model_type, data = um.target, {}
    if model_type not in CONFIG_MAPPING:
        near = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise bad_input("--model", f"--model={um.text!r}: {model_type!r} is not a model type transformers knows.{hint} "
                        "Examples: hf:llama, hf:mistral, hf:qwen2, hf:gpt2, hf:bert, hf:vit.")
    defaults = CONFIG_MAPPING[model_type]()
    unknown = _unknown_keys(model_type, defaults, over)
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(defaults.to_dict()), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise bad_input("--model", f"--model={um.text!r}: {unknown[0]!r} is not a setting of {type(defaults).__name__}.{hint} "
                        "Use the config's own names (as in its config.json), or seq_len=N for the sequence length.")
    for k, v in over.items():  # a word where the config holds a number: transformers stores it and fails later, far away
        d = getattr(defaults, k, None)
        if d is None:  # transformers 5.x keeps rope_theta and the like in rope_parameters
            d = (getattr(defaults, "rope_parameters", None) or {}).get(k)
        if isinstance(d, (int, float)) and not isinstance(d, bool) and isinstance(v, str):
            raise bad_input("--model", f"--model={um.text!r}: {k}={v!r} is not a number ({type(defaults).__name__}'s default is {d!r}). "
                            f"Give {k} a number.")
    try:
        cfg = AutoConfig.for_model(model_type, **{**data, **over})
    except Exception as e:  # noqa: BLE001 - TypeError / ValueError, and huggingface_hub's StrictDataclassClassValidationError
        # (transformers 5.x validates a config's architecture there, e.g. hidden_size not a multiple of the heads)
        raise bad_input("--model", f"--model={um.text!r}: transformers refused the config ({e}). Fix the value it names.") from None
    pad, vocab = getattr(cfg, "pad_token_id", None), getattr(cfg, "vocab_size", None)
    if isinstance(pad, int) and isinstance(vocab, int) and not -vocab <= pad < vocab:  # nn.Embedding counts -1 from the end
        # the embedding's padding row must exist (nn.Embedding asserts it: Phi-3's default pad_token_id is 32000, so a
        # smaller vocab_size alone fails deep inside the build with "Padding_idx must be within num_embeddings")
        raise bad_input("--model", f"--model={um.text!r}: pad_token_id={pad} is not a row of the vocabulary (vocab_size={vocab}). "
                        f"Give a pad_token_id below {vocab} (e.g. pad_token_id=0) or a larger vocab_size.")
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False  # training: no KV cache
    return cfg


def model_class(cfg):
    """The class to instantiate: the config's architecture, else a head the training loop can drive."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForMaskedLM

    for arch in getattr(cfg, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    autos = (AutoModelForCausalLM, AutoModelForImageClassification)
    if type(cfg) in AutoModelForMaskedLM._model_mapping:
        autos = (AutoModelForMaskedLM, *autos)  # an encoder (BERT): its causal head is a side use
    for auto in autos:
        if type(cfg) in auto._model_mapping:
            return auto._model_mapping[type(cfg)]
    raise bad_input("--model", f"model type {cfg.model_type!r} has no causal-LM, masked-LM or image-classification head in transformers, "
                    "which is what shardlab's training loop drives. Pick such a model type, or wrap it in your own factory (module:function).")


def build_hf(cfg):
    """A randomly initialised model from `cfg` (on the current default device: meta when counting), in
    torch's default dtype (fp32 unless the caller set one: the traced estimate of a DeepSpeed plan builds
    in the model dtype DeepSpeed holds), never the config's own torch_dtype."""
    import warnings

    import torch

    cls = model_class(cfg)
    _refuse_no_layers(cfg)
    try:
        with warnings.catch_warnings():  # a zero-sized weight is refused below, with the setting named
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            model = cls._from_config(cfg, dtype=torch.get_default_dtype())
    except (ValueError, AssertionError, RuntimeError, ArithmeticError, IndexError, TypeError) as e:
        # the model's own __init__ doing arithmetic on the config (head_dim=0: a ZeroDivisionError in Qwen3's rotary)
        raise bad_input("--model", f"{cls.__name__} cannot be built from this config ({type(e).__name__}: {e}). Fix the setting it names.") from None
    # (under DeepSpeed's zero.Init a partitioned weight holds no elements here: its full size is ds_numel / ds_shape)
    empty = next(((name, list(getattr(w, "ds_shape", w.shape))) for name, w in model.named_parameters()
                  if getattr(w, "ds_numel", w.numel()) == 0), None)
    if empty is not None:  # transformers builds it (vocab_size=0, intermediate_size=0); it cannot train, and the estimate divided by 0
        raise bad_input("--model", f"{cls.__name__} built from this config has a weight with no elements ({empty[0]}, shape {empty[1]}): "
                        "a size in the config is 0. Set that size (vocab_size, intermediate_size, ...) to 1 or more.")
    return model


def _refuse_no_layers(cfg) -> None:
    """A config of zero or fewer layers builds an empty stack in transformers (range(-1) is empty), which then gave
    figures for the embedding and head alone (exit 0): refused, under the name the config itself uses."""
    for name in _SHAPE_ATTRS["layers"]:
        n = getattr(cfg, name, None)
        if isinstance(n, int) and not isinstance(n, bool):
            if n < 1:
                own = getattr(cfg, "attribute_map", {}).get(name, name)
                raise bad_input("--model", f"{own}={n}: the model would have no transformer layers to train or shard. "
                                f"Set {own} to 1 or more.")
            return


def context_length(cfg) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def shape_of(cfg, seq_len: int, vocab: int) -> dict | None:
    """ModelSpec shape fields for a transformer config (None when it is not one shardlab can describe).

    family "llama" for gated (SwiGLU-style, silu) MLPs, "gpt" for plain GELU MLPs: the activation
    arithmetic (estimate/activations.py) differs only there.
    """
    vals = {}
    for key, names in _SHAPE_ATTRS.items():
        vals[key] = next((getattr(cfg, n) for n in names if isinstance(getattr(cfg, n, None), int)), None)
    if not all(vals[k] for k in ("layers", "hidden", "heads")):
        return None
    # checked before any shape question: a config whose hidden size its heads do not divide has no shape here (it is
    # counted bare), and its bad grouping then went through as figures (session 18: hf:qwen2 num_attention_heads=14
    # num_key_value_heads=3 at the default hidden 4096, exit 0)
    if vals["kv_heads"] and vals["heads"] % vals["kv_heads"]:
        # each KV head serves heads / kv_heads query heads: transformers' attention cannot run otherwise (its
        # forward fails on the shapes), so a config that says so is bad input, not a shape to estimate
        from shardlab.plan import bad_input

        raise bad_input("--model", f"num_key_value_heads={vals['kv_heads']} does not divide num_attention_heads={vals['heads']}: "
                        "in grouped-query attention each key/value head serves an equal share of the query heads. "
                        f"Set num_key_value_heads to a divisor of {vals['heads']}.")
    head = getattr(cfg, "head_dim", None)  # set apart from hidden / heads by some models (Qwen3, Gemma)
    if isinstance(head, int) and head > 0 and head * vals["heads"] != vals["hidden"]:
        vals["head_size"] = head
    elif vals["hidden"] % vals["heads"]:
        return None
    act = str(getattr(cfg, "hidden_act", "") or getattr(cfg, "activation_function", ""))
    vals["family"] = "llama" if act in ("silu", "swish") and vals["ffn_hidden"] else "gpt"
    return {**vals, "vocab": vocab, "seq_len": seq_len}
