"""The model picker the ConfigBuilder and the RunLauncher share: a preset, or your own model.

One text box with suggestions: shardlab's presets and Hugging Face examples, and free text for any
source `shardlab.models.resolve_model` takes (`hf:llama hidden_size=2048 num_hidden_layers=16`, a
config.json path, `mymodule:make_model`). The value changes when the person leaves the box (Tab; with
bokeh 3.9's autocomplete, Enter alone did not apply free text in a browser), so a model is counted once, not on every keystroke. What a source means is documented in
shardlab/usermodel.py; this file only offers it.
"""

from __future__ import annotations

import panel as pn

from shardlab.models import PRESETS

EXAMPLES = ("hf:llama", "hf:mistral", "hf:qwen2", "hf:gpt2", "hf:bert")
HELP = ("A preset, or your own model: hf:<model_type> key=value ... (random weights from a transformers config, "
        "nothing downloaded), the path of a Hugging Face config.json, or module:function (a factory returning an "
        "nn.Module, importable from the folder the app or notebook runs in). Leave the box (Tab) to apply.")


def model_input(value: str, *, label: str, css_class: str, width: int = 260) -> pn.widgets.AutocompleteInput:
    return pn.widgets.AutocompleteInput(label=label, value=value, options=[*PRESETS, *EXAMPLES], restrict=False,
                                        min_characters=1, search_strategy="includes", case_sensitive=False,
                                        width=width, description=HELP, css_classes=[css_class])


def model_note(est: dict) -> str:
    """One line under the memory bar about a model built from a source: its size and wrap unit."""
    m = est.get("model") or {}
    if not m.get("source"):
        return ""
    unit = f"wrap unit {m['wrap_class']} × {m['wrap_units']}" if m.get("wrap_class") else "no repeated block found"
    return f'<div class="sl-model-note">{m["params"]:,} parameters · {unit} (found in the model)</div>'
