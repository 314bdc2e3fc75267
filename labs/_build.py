"""Build the lab notebooks (labs/NN_*.ipynb) from their sources in labs/_src/NN_*.py.

The sources are plain Python in the "percent" format: `# %%` starts a code cell, `# %% [markdown]`
a Markdown cell whose lines are comments (`# ` is stripped). Editing .py files keeps diffs readable;
the .ipynb files are what people open, and they are written without outputs (execution_count null,
outputs []), so a committed notebook never carries one machine's results.

    python labs/_build.py          # rewrite every notebook from its source
    python labs/_build.py --check  # exit 1 if a notebook differs from what its source builds,
                                   # or a source breaks a rule below

Every notebook ends with the same closing cell (CLOSING, added here, not written in the sources): close
and shut down before opening the next lab, and wait for the kernel before Run All. Both come from a
failed workshop sitting (2026-12-01, docs/facilitator_guide.md, Troubleshooting): JupyterLab silently
skips every cell of a Run All clicked while the kernel is still starting, and a page holding many open
labs starts the next one's kernel slowly.

Rules every source keeps, because breaking them only shows in a browser (never in nbclient):
- offline display: a notebook that displays panel / HoloViz output calls `pn.extension(inline=True)`
  before it imports hvplot or holoviews (their import loads BokehJS from a CDN otherwise, and the
  plots stay empty without internet).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

LABS = Path(__file__).resolve().parent
SRC = LABS / "_src"
KERNEL = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
CLOSING = """---
**Done with this lab?** Use *File > Close and Shut Down Notebook* before you open the next one: it stops
this notebook's kernel and frees the memory it holds. In the next lab, wait until the status bar at the
bottom says `Python 3 (ipykernel) | Idle` before *Run > Run All Cells*: cells run while the kernel is
still starting are skipped (JupyterLab says so in a notification when started by `make lab`)."""


def cells_of(text: str) -> list:
    """Split a percent-format source into notebook cells (outputs empty)."""
    cells, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind is not None and body:
            if kind == "markdown":
                md = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in body.splitlines())
                cells.append(nbformat.v4.new_markdown_cell(md))
            else:
                cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": KERNEL, "language_info": {"name": "python"}}
    nb.cells = [*cells_of(src.read_text()), nbformat.v4.new_markdown_cell(CLOSING)]
    for i, c in enumerate(nb.cells):
        c.id = f"{src.stem[:2]}-{i:02d}"  # stable ids: rebuilding an unchanged source changes nothing
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


_INLINE = re.compile(r"^pn\.extension\([^)]*inline=True", re.M)
_HOLOVIZ_IMPORT = re.compile(r"^\s*(import (hvplot|holoviews)|from (hvplot|holoviews)\b)", re.M)
_DISPLAYS = re.compile(r"\bpn\.panel\(|\bshardlab_widgets\b|\.hvplot\b|\bplots\.")


def rule_breaks(text: str) -> list[str]:
    """The offline-display rule (module docstring) checked on one source's text: what is wrong, if anything."""
    inline = _INLINE.search(text)
    problems = []
    if _DISPLAYS.search(text) and not inline:
        problems.append("displays panel/HoloViz output but never calls pn.extension(inline=True)")
    first_import = _HOLOVIZ_IMPORT.search(text)
    if first_import and (not inline or first_import.start() < inline.start()):
        problems.append(f"{first_import.group(0).strip()!r} comes before pn.extension(inline=True): plots would load BokehJS from a CDN")
    return problems


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for src in sorted(SRC.glob("[0-9][0-9]_*.py")):
        out = LABS / f"{src.stem}.ipynb"
        for problem in rule_breaks(src.read_text()):
            stale.append(f"{src.name}: {problem}")
        text = text_of(build(src))
        if check:
            if not out.exists() or out.read_text() != text:
                stale.append(out.name)
        else:
            out.write_text(text)
            print(f"wrote {out.relative_to(LABS.parent)}")
    if stale:
        print(f"out of date or breaking a rule (see labs/_build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
