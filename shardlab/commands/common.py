"""What the subcommand handlers share: the plan argument, -o output, notes on stderr, --model.

Bad flag values raise `UsageError` (a ValueError); `shardlab.cli.main` prints it and exits 2, as it
does for `PlanError`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from shardlab.plan import load_plan

PLAN_FILE_HELP = """\
A plan file is YAML or JSON naming only what differs from the defaults, e.g.

    framework: deepspeed      # fsdp1 | fsdp2 | deepspeed
    sharding: zero3           # ddp | zero1 (DeepSpeed) | zero2 | zero3 | hybrid
    precision: bf16           # fp32 | bf16 | fp16
    offload: {optimizer: cpu} # none | cpu | nvme (params: zero3 only)
    topology: {nodes: 1, gpus_per_node: 8}

Other fields: activation_checkpointing, micro_batch_size, grad_accum_steps, zeropp. `shardlab validate
PLAN` checks one; `shardlab import ds_config.json` makes one from a DeepSpeed or accelerate config."""

MODEL_HELP = ("preset (gpt-tiny, gpt-1.3b, llama-8b, ...), a YAML/JSON shape file, or your own model: "
              "hf:<model_type> [key=value ...] (e.g. hf:llama hidden_size=2048 num_hidden_layers=16 seq_len=1024), "
              "a Hugging Face config.json [key=value ...], or module:function (a factory returning an nn.Module)")


class UsageError(ValueError):
    """A bad flag or argument value: printed and exit 2."""


def check_output(out: str | None) -> None:
    """Refuse an output path that cannot be written before any work is done (exit 2, no traceback)."""
    if not out:
        return
    from shardlab.safe_input import label

    p = Path(out)
    if p.is_dir() or out.endswith(("/", "\\")):
        raise UsageError(f"-o {label(out)} is a directory; give a file name, e.g. -o {label(str(p / 'out.yaml'))}.")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"-o {label(out)}: the folder {label(str(parent))} does not exist. Create it first (mkdir -p {label(str(parent))}) or write elsewhere.")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"-o {label(out)} cannot be written (no permission). Choose a path you can write.")


def plan_arg(path: str):
    """The plan file named on the command line (always a path, never YAML text), not yet checked."""
    return load_plan(Path(path), check=False)


def write_out(text: str, out: str | None) -> None:
    """`text` to the -o file (saying so on stderr), or to stdout."""
    if out:
        try:
            Path(out).write_text(text)
        except OSError as e:
            raise UsageError(f"-o {out}: cannot write it ({e.strerror}). Choose another path.") from None
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def say(message: str) -> None:
    """One message to stderr, at most safe_input.MAX_MESSAGE characters (a note may list keys an input named)."""
    from shardlab.safe_input import cap

    print(cap(message), file=sys.stderr)


def print_findings(findings) -> None:
    for f in findings:
        say(str(f))


def print_notes(notes) -> None:
    for n in notes:
        say(f"note: {n}")


def say_assumed(plan) -> None:
    """Settings left to the training script ('auto'): which value an estimate or run assumed."""
    if plan.auto:
        said = ", ".join(f"{k}={v}" for k, v in plan.assumed().items())
        say(f"note: 'auto' (left to the training script) assumed as {said}")


def model_text(words: list[str] | None) -> str | None:
    """--model's words as one source text (`--model hf:llama hidden_size=64` needs no quotes)."""
    if words is None:
        return None
    import shlex

    return words[0] if len(words) == 1 else " ".join(shlex.quote(w) for w in words)


def model_names() -> str:
    from shardlab.models import PRESETS

    return ", ".join(PRESETS)


def describe_model(spec) -> str | None:
    """One line about a model built from a source (Hugging Face config or factory), for stderr."""
    if spec.source is None:
        return None
    from shardlab.models import flops_per_token

    unit = (f"wrap unit {spec.wrap_cls} x {spec.wrap_unit_count} (found in the model)" if spec.wrap_cls else
            "no repeated block found (name one in wrap.transformer_layer_cls)")
    return f"model {spec.name}: {spec.params:,} parameters, {unit}, {flops_per_token(spec) / 1e6:,.2f} MFLOP per token"
