"""What `shardlab tune` found: the pick, the ranked table, the Pareto data, and the files they go to.

`TuneResult.table()` has one row per candidate (rejected ones too, with why), ranked: trials first by
the goal's measured score (the median step period; its interquartile tokens/s interval beside it, and
`not_told_apart` the trials whose interval overlaps the pick's), then the unrun by expected score, then the rejected. Memory columns are
bytes (the JSON and CSV) and GiB (2^30 bytes) in the printed summary. `pareto()` holds the candidates
that fit, with memory per GPU (measured peak reserved where a GPU measured it, else predicted) and
tokens/s (measured where run, else predicted), and whether each is on the Pareto front (no other
candidate is both faster and smaller). `write(DIR)` writes pick.yaml (a plan file: `shardlab export
DIR/pick.yaml --to ...`), tune.json, table.csv and, with `report=True`, report.html with the Pareto
plot (PNG beside it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shardlab.units import GIB

from .search import TIE_RESOLUTION, expected, measured_score, not_told_apart
from .space import Candidate

COLUMNS = ["rank", "key", "status", "trial", "group", "framework", "sharding", "offload", "activation_checkpointing",
           "micro_batch_size", "grad_accum_steps", "compile", "predicted_tokens_per_s", "measured_tokens_per_s",
           "measured_tokens_per_s_lo", "measured_tokens_per_s_hi", "timed_steps", "runs", "tokens_per_s_error", "predicted_peak_reserved_bytes", "measured_peak_reserved_bytes",
           "predicted_peak_allocated_bytes", "measured_peak_allocated_bytes", "reason", "run_id"]


@dataclass
class TuneResult:
    candidates: list[Candidate]
    pick: Candidate | None
    goal: str
    stop: str
    settings: dict = field(default_factory=dict)
    wall_s: float = 0.0
    tune_id: str = ""

    @property
    def trials(self) -> list[Candidate]:
        return sorted((c for c in self.candidates if c.trial is not None), key=lambda c: c.trial)

    @property
    def plan(self):
        """The pick's plan (None when nothing fits)."""
        return self.pick.plan if self.pick else None

    @property
    def not_told_apart(self) -> list[Candidate]:
        """Trials whose measured tokens/s interval overlaps the pick's: not ranked against it (search.py, 4)."""
        return not_told_apart(self.candidates, self.goal) if self.pick is not None and self.pick.status == "completed" else []

    def _ordered(self) -> list[Candidate]:
        run = sorted((c for c in self.candidates if c.status == "completed"), key=lambda c: measured_score(c, self.goal), reverse=True)
        failed = [c for c in self.trials if c.status != "completed"]
        unrun = sorted((c for c in self.candidates if c.status == "unrun"), key=lambda c: expected(c, self.goal), reverse=True)
        rejected = [c for c in self.candidates if c.status == "rejected"]
        return run + failed + unrun + rejected

    def table(self):
        """The ranked table as a DataFrame (COLUMNS; bytes)."""
        import pandas as pd

        rows = []
        tried = {c.group: c.trial for c in sorted(self.trials, key=lambda c: -c.trial) if c.status == "completed" and c.group is not None}
        for i, c in enumerate(self._ordered(), 1):
            p, pr, me = c.plan, c.predicted, c.measured
            reason = c.reason
            if c.status == "unrun" and c.group in tried:  # the stop rule did not wait on it (search.py, Twins)
                reason = f"twin of trial {tried[c.group]}: predicted within {TIE_RESOLUTION:.0%}, the step model cannot tell them apart" + (
                    f"; {reason}" if reason else "")
            off = "none" if p is None else ("all" if p.offload.params != "none" else "optimizer" if p.offload.optimizer != "none" else "none")
            pt, mt = pr.get("tokens_per_s"), me.get("tokens_per_s")
            rows.append({"rank": i, "key": c.key, "status": ("pick" if c is self.pick else c.status), "trial": c.trial, "group": c.group,
                         "framework": p and p.framework, "sharding": p and p.sharding, "offload": off,
                         "activation_checkpointing": p and p.activation_checkpointing,
                         "micro_batch_size": p and p.micro_batch_size, "grad_accum_steps": p and p.grad_accum_steps,
                         "compile": p and p.compile, "predicted_tokens_per_s": pt, "measured_tokens_per_s": mt,
                         "measured_tokens_per_s_lo": me.get("tokens_per_s_lo"), "measured_tokens_per_s_hi": me.get("tokens_per_s_hi"),
                         "timed_steps": me.get("timed_steps"), "runs": me.get("runs", 1) if mt else None,
                         "tokens_per_s_error": (mt / pt - 1) if pt and mt else None,
                         "predicted_peak_reserved_bytes": pr.get("peak_reserved_bytes"),
                         "measured_peak_reserved_bytes": me.get("peak_reserved_bytes"),
                         "predicted_peak_allocated_bytes": pr.get("peak_allocated_bytes"),
                         "measured_peak_allocated_bytes": me.get("peak_allocated_bytes"),
                         "reason": reason, "run_id": c.run_id})
        return pd.DataFrame(rows, columns=COLUMNS)

    def pareto(self):
        """Candidates that fit: memory per GPU (bytes), tokens/s, whether measured, and the Pareto front."""
        import pandas as pd

        rows = []
        for c in self.candidates:
            if c.status == "rejected" or not c.predicted:
                continue
            me = c.measured if c.status == "completed" else {}
            rows.append({"key": c.key, "status": "pick" if c is self.pick else c.status,
                         "memory_bytes": me.get("peak_reserved_bytes") or c.predicted["peak_reserved_bytes"],
                         "tokens_per_s": me.get("tokens_per_s") or c.predicted["tokens_per_s"],
                         "measured": bool(me.get("tokens_per_s")), "framework": c.plan.framework})
        df = pd.DataFrame(rows, columns=["key", "status", "memory_bytes", "tokens_per_s", "measured", "framework"])
        ok = df["status"].isin(["pick", "completed", "unrun"])
        front = []
        for i, r in df.iterrows():
            front.append(bool(ok[i]) and not ((df["memory_bytes"] <= r["memory_bytes"]) & (df["tokens_per_s"] > r["tokens_per_s"]) & ok).any())
        return df.assign(front=front)

    def to_dict(self) -> dict:
        t = self.table()
        return {"tune_id": self.tune_id, "goal": self.goal, "stop": self.stop, "wall_s": self.wall_s, "settings": self.settings,
                "pick": None if self.pick is None else {"key": self.pick.key, "measured": self.pick.status == "completed",
                                                         "plan": self.pick.plan.model_dump(mode="json"), "run_id": self.pick.run_id,
                                                         "not_told_apart": [c.key for c in self.not_told_apart]},
                "trials": [{"trial": c.trial, "key": c.key, "status": c.status, "reason": c.reason, "run_id": c.run_id,
                            "predicted": c.predicted, "measured": c.measured,
                            "plan": c.plan.model_dump(mode="json")} for c in self.trials],
                "counts": {s: int((t["status"] == s).sum()) for s in sorted(set(t["status"]))},
                "table": json.loads(t.to_json(orient="records"))}

    def summary(self, top: int = 12) -> str:
        """The printed form: what was searched, the trials, the pick (GiB = 2^30 bytes)."""
        t = self.table()
        n_rej = int((t["status"] == "rejected").sum())
        s = self.settings
        lines = [f"tune {s.get('model')} on {s.get('target')} (goal {self.goal}, budget {s.get('budget')}): "
                 f"{len(t)} candidates, {n_rej} rejected (invalid or do not fit), {len(self.trials)} trial runs, "
                 f"stopped: {STOP_WHY.get(self.stop, self.stop)}; {self.wall_s:.1f} s", ""]
        gib = lambda b: "-" if b is None or b != b else f"{b / GIB:.2f}"  # noqa: E731
        num = lambda x: "-" if x is None or x != x else f"{x:,.0f}"  # noqa: E731
        lines.append(f"{'#':>3} {'status':<10} {'grp':>4} {'candidate':<44} {'pred tok/s':>11} {'meas tok/s':>11} {'pred GiB':>9} {'meas GiB':>9}  note")
        for r, twins in _distinct(t[t["status"] != "rejected"], top):
            note = (f"+{twins} twin{'s' if twins > 1 else ''} (group {_num(r['group'])}) " if twins else "") + _text(r["reason"])
            lines.append(f"{r['rank']:>3} {r['status']:<10} {_num(r['group']):>4} {r['key'][:44]:<44} {num(r['predicted_tokens_per_s']):>11} "
                         f"{num(r['measured_tokens_per_s']):>11} {gib(r['predicted_peak_reserved_bytes']):>9} "
                         f"{gib(r['measured_peak_reserved_bytes']):>9}  {note[:90]}")
        rej = t[t["status"] == "rejected"]
        if len(rej):
            why = rej["reason"].str.split(":").str[0].str.split(" on ").str[0].value_counts()
            lines.append("    rejected: " + ", ".join(f"{n} {w}" for w, n in why.items()) + " (all in the table)")
        tight = sum(c.predicted.get("fit") == "tight" and c.status != "rejected" for c in self.candidates)
        if tight:
            lines.append(f"    tight: {tight} kept that fit by the estimate but not with its error margin (a trial decides)")
        lines.append("")
        if self.pick is None:
            lines.append("no pick: nothing fits (see the rejected reasons)")
        else:
            how = "measured" if self.pick.status == "completed" else "by estimate only"
            lines.append(f"pick ({how}): {self.pick.key}" + (f", {_spread(self.pick.measured)}" if self.pick.status == "completed" else ""))
            for c in self.not_told_apart:
                lines.append(f"    not told apart from {c.key}, {_spread(c.measured)}: the intervals overlap, "
                             + ("even after re-measuring" if c.measured.get("runs", 1) > 1 else "one trial each does not rank them"))
        lines.append("tokens/s per GPU; memory: peak reserved per GPU in GiB (2^30 bytes); a CPU run measures no GPU memory; "
                     f"grp: predictions equal within {TIE_RESOLUTION:.0%} (twins: one row shown, all in the table)")
        return "\n".join(lines)

    def write(self, out_dir, report: bool = True, png: bool = True) -> dict:
        """Write pick.yaml, tune.json, table.csv (and report.html + PNG) under `out_dir`; return the paths."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        paths = {}
        if self.pick is not None:
            paths["plan"] = d / "pick.yaml"
            paths["plan"].write_text(self.pick.plan.to_yaml(minimal=True) or "{}\n")
        paths["json"] = d / "tune.json"
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1, default=str))
        paths["table"] = d / "table.csv"
        self.table().to_csv(paths["table"], index=False)
        if report:
            from .report import write_tune_report

            paths["report"] = write_tune_report(self, d / "report.html", png=png)
        return {k: str(v) for k, v in paths.items()}


def _distinct(t, top: int):
    """(row, number of unrun twins folded into it) for the first `top` rows, an unrun row folded into
    the first shown row of its group."""
    shown: list = []
    first: dict = {}
    for _, r in t.iterrows():
        g = r["group"]
        if r["status"] == "unrun" and g == g and g is not None and g in first:
            shown[first[g]][1] += 1
            continue
        if len(shown) >= top:
            continue
        if g == g and g is not None:
            first.setdefault(g, len(shown))
        shown.append([r, 0])
    return [(r, n) for r, n in shown]


def _spread(m: dict) -> str:
    """'209,199 tokens/s (interquartile 188,702-218,319; 4 timed steps, 1 run)'"""
    lo, hi, n = m.get("tokens_per_s_lo"), m.get("tokens_per_s_hi"), m.get("runs", 1)
    iqr = f"interquartile {lo:,.0f}-{hi:,.0f}; " if lo and hi else ""
    return f"{m['tokens_per_s']:,.0f} tokens/s ({iqr}{m.get('timed_steps', '?')} timed steps, {n} run{'s' if n > 1 else ''})"


def _num(v) -> str:
    return "-" if v is None or v != v else f"{int(v)}"


def _text(v) -> str:
    return v if isinstance(v, str) else ""


STOP_WHY = {"rule": "the measured best beats every unrun candidate's optimistic prediction",
            "budget": "budget spent", "exhausted": "every candidate that fits was tried",
            "cancelled": "cancelled", "estimate-only": "budget 0: ranked by estimate only, nothing run"}

__all__ = ["TuneResult", "COLUMNS", "STOP_WHY"]
