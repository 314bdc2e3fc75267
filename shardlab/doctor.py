"""`shardlab doctor`: the first-run check for a machine (and a workshop room) before anyone waits on it.

It answers what lab 00 and a facilitator need to know up front: are the pinned versions installed
(a local build tag such as `2.13.0+cpu` satisfies the pin `2.13.0`), is there a C++ compiler (DeepSpeed
JIT-builds its CPU ops on first use), builds those ops once now -- the shm comm op every DeepSpeed CPU run
loads and CPU Adam for optimizer offload -- into this environment's own extensions folder (so a run
never sits silently at step 0 for minutes, and another environment sharing ~/.cache cannot force a
rebuild), checks that the notebooks and the app have every asset they need without internet, and
prints the machine's facts (cores, memory, GPUs, where runs go, how to reset them).

Each check is a `Check` (name, ok: True / False / None for information, detail); `run_checks` prints
them as they finish, naming each long phase before it starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from shardlab.units import GIB

# the packages whose versions a workshop depends on (pins read from requirements.txt)
PACKAGES = ("torch", "deepspeed", "accelerate", "pydantic", "pandas", "panel", "bokeh", "holoviews", "hvplot",
            "jupyterlab", "ipywidgets", "jupyter_bokeh")
# JupyterLab extensions the labs' widgets and plots need, served from the environment (no CDN)
LAB_EXTENSIONS = ("@jupyter-widgets/jupyterlab-manager", "@pyviz/jupyterlab_pyviz", "@bokeh/jupyter_bokeh")
# DeepSpeed CPU ops (name in the accelerator's op builder table -> what needs it)
DS_CPU_OPS = (("ShareMemCommBuilder", "every DeepSpeed run on a CPU (shm collectives)"),
              ("CPUAdamBuilder", "DeepSpeed optimizer offload (CPU Adam)"))
RESET_COMMAND = "make reset-runs   (or: rm -rf labs/runs runs)"
# JupyterLab 4 skips every cell of a Run All clicked while the kernel starts, silently unless the setting
# `make lab` turns on (labs/_jupyter); seen as "lab 06 never ran" in a sitting with six labs open (2026-12-01).
JUPYTERLAB_ADVICE = ("Run All only once the status bar says 'Python 3 (ipykernel) | Idle' (earlier, every cell is skipped); "
                     "File > Close and Shut Down Notebook before opening the next lab")


@dataclass
class Check:
    name: str
    ok: bool | None  # None: information, not a pass/fail
    detail: str
    seconds: float | None = None

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "info"}[self.ok]
        took = f" ({self.seconds:.1f} s)" if self.seconds is not None and self.seconds >= 0.1 else ""
        return f"[{mark}] {self.name}: {self.detail}{took}"


# --------------------------------------------------------------------------------------------
# Versions


def pins(req: Path | None = None) -> dict[str, str]:
    """name (lower case) -> pinned version from requirements.txt next to the package's checkout ({} if none)."""
    req = req or Path(__file__).resolve().parents[1] / "requirements.txt"
    out = {}
    if req.is_file():
        for line in req.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, ver = line.split("==", 1)
                out[name.strip().lower().replace("-", "_")] = ver.strip()
    return out


def pin_matches(installed: str, pinned: str) -> bool:
    """True when `installed` satisfies `==pinned` as pip judges it: '2.13.0+cpu' satisfies '2.13.0'
    (a local build label such as +cpu or +cu128 is the same release)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(installed) in SpecifierSet(f"=={pinned}")
    except (InvalidVersion, ValueError):
        return installed == pinned


def version_rows(packages=PACKAGES) -> list[dict]:
    """[{package, installed, pinned, ok}]: ok None when nothing is pinned for it."""
    from importlib.metadata import PackageNotFoundError, version

    want = pins()
    rows = []
    for name in packages:
        try:
            have = version(name)
        except PackageNotFoundError:
            have = "missing"
        pin = want.get(name.lower().replace("-", "_"), "")
        ok = (have != "missing" and pin_matches(have, pin)) if pin else (None if have != "missing" else False)
        rows.append({"package": name, "installed": have, "pinned": pin, "ok": ok})
    return rows


def check_versions() -> Check:
    rows = version_rows()
    bad = [f"{r['package']} {r['installed']} (pinned {r['pinned'] or '-'})" for r in rows if r["ok"] is False]
    if bad:
        return Check("versions", False, "not as pinned: " + ", ".join(bad) + ". Fix: make setup (reinstalls requirements.txt into .venv).")
    return Check("versions", True, ", ".join(f"{r['package']} {r['installed']}" for r in rows[:3]) + f" and {len(rows) - 3} more as pinned")


# --------------------------------------------------------------------------------------------
# Compiler and DeepSpeed's CPU ops


def check_compiler() -> Check:
    """DeepSpeed builds its CPU ops with the C++ compiler torch's extension builder uses ($CXX, else c++) and ninja."""
    cxx = os.environ.get("CXX") or "c++"
    path = shutil.which(cxx)
    ninja = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    if not path:
        return Check("C++ compiler", False, f"{cxx!r} not found: DeepSpeed cannot build its CPU ops. Fix: apt-get install g++ (or set CXX).")
    try:
        first = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return Check("C++ compiler", False, f"{path} does not run ({e}).")
    if not ninja:
        return Check("C++ compiler", False, f"{first}; ninja not found (torch's extension builder needs it). Fix: pip install ninja.")
    return Check("C++ compiler", True, f"{first}; ninja {ninja}")


_WARM = """
import os, sys, time
import deepspeed.ops
from deepspeed.accelerator import get_accelerator
b = get_accelerator().create_op_builder(sys.argv[1])
if b is None or not b.is_compatible():
    print("skipped: not available on this accelerator"); sys.exit(0)
t = time.time(); b.load(verbose=False)
print(f"built or loaded in {time.time() - t:.1f} s")
"""


def stale_locks(root: str | None = None, min_age_s: float = 60.0) -> list[Path]:
    """Build locks left by a build that was killed (a cancelled or timed-out first run): torch's extension
    builder waits for such a lock to go away, forever. A lock is stale when it is older than `min_age_s`
    and no process is working in its folder (ninja and the compiler run there)."""
    import psutil

    from shardlab.export.launch import extensions_dir

    base = Path(root or extensions_dir())
    found = [*base.glob("*/lock"), *base.glob("*/*/lock")] if base.is_dir() else []  # with or without a py311_cpu level
    locks = [p for p in found if time.time() - p.stat().st_mtime > min_age_s]
    if not locks:
        return []
    busy = set()
    for proc in psutil.process_iter(["cwd"]):
        try:
            if proc.info["cwd"]:
                busy.add(Path(proc.info["cwd"]))
        except (psutil.Error, OSError):
            continue
    return [p for p in locks if p.parent not in busy]


def clear_stale_locks() -> Check | None:
    gone = stale_locks()
    for p in gone:
        p.unlink(missing_ok=True)
    if gone:
        return Check("stale build locks", None, "removed (a killed build had left them; runs would wait on them forever): "
                     + ", ".join(str(p.parent.name) for p in gone))
    return None


def warm_op(builder: str) -> Check:
    """Build (first time) or load one DeepSpeed CPU op in a child process, with the env a run gets."""
    from shardlab.export.launch import extensions_dir, sanitized_env

    env = sanitized_env({"DS_ACCELERATOR": "cpu"})
    t = time.monotonic()
    # No time limit: a build under load can take many minutes, and killing it would leave a lock that
    # makes every later build wait (see stale_locks). Ctrl-C stops it like any command.
    p = subprocess.run([sys.executable, "-c", _WARM, builder], env=env, capture_output=True, text=True)
    took = time.monotonic() - t
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return Check(f"DeepSpeed {builder}", False, "build failed: " + " | ".join(tail), took)
    last = (p.stdout.strip().splitlines() or ["done"])[-1]
    return Check(f"DeepSpeed {builder}", True, f"{last}, in {extensions_dir()}", took)


# --------------------------------------------------------------------------------------------
# Offline assets


def check_offline() -> Check:
    """Every asset the labs and the app load comes from this environment: bokeh's JS inline, panel's
    bundled files, the JupyterLab extensions for widgets and HoloViz output."""
    missing = []
    try:
        from bokeh.resources import INLINE

        if not "".join(INLINE.js_raw):
            missing.append("bokeh inline JS")
    except Exception as e:  # noqa: BLE001 (report, do not crash the check)
        missing.append(f"bokeh ({e})")
    try:
        import panel

        if not (Path(panel.__file__).parent / "dist" / "panel.min.js").is_file():
            missing.append("panel/dist/panel.min.js")
    except Exception as e:  # noqa: BLE001
        missing.append(f"panel ({e})")
    share = Path(sys.prefix) / "share" / "jupyter" / "labextensions"
    missing += [ext for ext in LAB_EXTENSIONS if not (share / ext).is_dir()]
    if missing:
        return Check("offline assets", False, "missing: " + ", ".join(missing) + ". Fix: make setup.")
    return Check("offline assets", True, "bokeh JS inline, panel bundle, JupyterLab widget/HoloViz extensions all local")


# --------------------------------------------------------------------------------------------
# Facts


def facts(runs_dir: str | None = None) -> list[Check]:
    import platform

    import psutil

    from shardlab.export.launch import extensions_dir
    from shardlab.run.host import visible_gpus
    from shardlab.run.store import RUNS_DIR_ENV

    cores = os.cpu_count() or 1
    mem = psutil.virtual_memory().total
    gpus = visible_gpus()
    runs = runs_dir or os.environ.get(RUNS_DIR_ENV) or "runs (labs: labs/runs)"
    return [
        Check("python", None, f"{platform.python_version()} at {sys.executable}"),
        Check("machine", None, f"{cores} CPU cores, {mem / GIB:.1f} GiB memory (GiB = 2^30 bytes), {len(gpus)} CUDA GPU(s)"),
        Check("lab runs", None, ("CUDA, up to 4 ranks" if len(gpus) >= 2 else "CPU, 2 processes over gloo (gpt-tiny)")
              + f"; a CPU run of N ranks needs N cores to keep pace ({cores} here)"),
        Check("extensions", None, f"DeepSpeed ops build into {extensions_dir()} (TORCH_EXTENSIONS_DIR)"),
        Check("run store", None, f"{runs}; reset: {RESET_COMMAND}"),
        Check("in JupyterLab", None, JUPYTERLAB_ADVICE),
    ]


def checks(warm: bool = True) -> Iterator[tuple[str, Callable[[], Check | list[Check]]]]:
    """(phase name, check) in the order they run; the phase name is printed before a slow check starts."""
    yield "versions", check_versions
    yield "compiler", check_compiler
    if warm:
        yield "stale locks", lambda: [c for c in [clear_stale_locks()] if c is not None]
        for builder, why in DS_CPU_OPS:
            yield f"building DeepSpeed {builder} for {why} (first time: about a minute on 2 cores)", lambda b=builder: warm_op(b)
    yield "checking offline assets (imports bokeh and panel)", check_offline
    yield "facts", facts


def run_checks(warm: bool = True, out=None) -> list[Check]:
    """Run every check, printing each phase and result as it goes; returns the checks."""
    out = out or sys.stdout
    done: list[Check] = []
    for phase, fn in checks(warm):
        if phase.startswith(("building", "checking")):
            print(f"... {phase}", file=out, flush=True)
        t = time.monotonic()
        got = fn()
        for c in got if isinstance(got, list) else [got]:
            if c.seconds is None and c.ok is not None:
                c.seconds = time.monotonic() - t
            print(c.line(), file=out, flush=True)
            done.append(c)
    return done


def main(warm: bool = True) -> int:
    found = run_checks(warm)
    bad = [c for c in found if c.ok is False]
    print(f"\n{'all checks passed' if not bad else f'{len(bad)} check(s) failed: fix them before the workshop'}")
    return 0 if not bad else 1
