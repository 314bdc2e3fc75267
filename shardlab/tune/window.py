"""How long a tune trial (or a grid row of benchmarks/tune_gpu.py) times, and how sure its figure is.

A trial runs `warmup` untimed steps, then enough timed steps to cover at least WINDOW_S seconds by the
estimate's predicted step time (bounded: MIN_TIMED..MAX_TIMED timed steps), and reports tokens/s as
the median step period with its spread: the interquartile range of the step periods, turned into a
tokens/s interval [tokens / q75, tokens / q25]. Two candidates whose intervals overlap are not told
apart by one trial each (`overlap`); the search then re-measures the top two when its budget allows,
pooling both runs' periods (`pooled`), and the result says when they are still not told apart.

Why by time: a fixed 8 steps (3 warm-up, 4 timed periods) on the H200 timed gpt-125m mb16x1 for 0.6 s,
and one slow period moved the figure: tune's trial 1 of fsdp1 ddp mb16x1 measured periods 0.148,
0.163, 0.207, 0.151 s (benchmarks/results/tune_h200_gpt125_tune.json, 2026-12-01), and the four
fastest gpt125 configurations lie within 7% of each other. The periods are not rare outliers around
one value: in the gpt125 grid timed alone (tune_h200_gpt125_grid.json) 24 of 36 rows have a period
over 15% above their fastest one. A few seconds of steps put several of those slow periods in every
window, so the median and quartiles describe the run rather than one unlucky step.
"""

from __future__ import annotations

import math

# At least this many seconds of timed steps per trial: ~20 periods of gpt-125m mb16x1 on the H200
# (0.148-0.207 s, tune_h200_gpt125_tune.json) where 4 were timed; it adds ~2.5 s to a trial whose
# start-up to the first step (processes, rendezvous, build, wrap) took 16-22 s there (its startup_s).
WINDOW_S = 3.0
# Fewest timed periods: quartiles of fewer than 5 values say little. A slow plan (gpt-350m ZeRO-3 on
# the capped H200: 1.08-1.75 s per step, tune_h200_gpt350cap_grid.json) times 5 periods, ~6-9 s.
MIN_TIMED = 5
# Most timed periods: a step the estimate prices at milliseconds (gpt-tiny on CPU processes) would
# otherwise ask for thousands; 60 periods resolve the median to a few percent however fast a step is.
MAX_TIMED = 60
# On CPU processes (the labs' small models) the estimate's step time can be far off: gpt-tiny mb4x4
# fsdp1 on this 2-core machine at load average 8 measured 278 tokens/s against 19,241 predicted
# (benchmarks/tune_gpu.py --device cpu --tiny, 2026-12-02), so 60 periods took 220 s. A CPU trial times
# at most this many.
MAX_TIMED_CPU = 12


def timed_steps(step_time_s: float | None, window_s: float = WINDOW_S, lo: int = MIN_TIMED, hi: int = MAX_TIMED) -> int:
    """Timed step periods covering `window_s` seconds at `step_time_s` per step, within [lo, hi]
    (`hi` when the step time is unknown or not positive: nothing says the steps are slow)."""
    if not step_time_s or step_time_s <= 0 or not math.isfinite(step_time_s):
        return hi
    return max(lo, min(hi, math.ceil(window_s / step_time_s)))


def trial_steps(step_time_s: float | None, warmup: int, window_s: float = WINDOW_S, device: str = "cuda") -> int:
    """Steps to launch for a trial on `device`: `warmup` untimed, then the timed ones. A step's period
    runs to the next step's start (Run.step_periods), so the last step adds the last period's end: +1."""
    hi = MAX_TIMED_CPU if device == "cpu" else MAX_TIMED
    return warmup + timed_steps(step_time_s, window_s, min(MIN_TIMED, hi), hi) + 1


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile of `xs` by linear interpolation between order statistics (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    i = math.floor(pos)
    return s[i] if i + 1 >= len(s) else s[i] + (s[i + 1] - s[i]) * (pos - i)


def spread(periods_s: list[float], tokens_per_step: float) -> dict:
    """tokens/s at the median step period, and the interval at the quartile periods (lo: the slower q75
    period, hi: the faster q25), with the periods' count and total (the timed window)."""
    p = [float(x) for x in periods_s if x and x > 0]
    if not p:
        return {}
    med, q25, q75 = quantile(p, 0.5), quantile(p, 0.25), quantile(p, 0.75)
    return {"step_time_s": med, "tokens_per_s": tokens_per_step / med, "tokens_per_s_lo": tokens_per_step / q75,
            "tokens_per_s_hi": tokens_per_step / q25, "step_time_iqr_s": [q25, q75], "timed_steps": len(p),
            "timed_s": round(sum(p), 4)}


def interval(measured: dict) -> tuple[float, float] | None:
    """(lo, hi) tokens/s of a measurement; the median alone when no spread was recorded; None without one."""
    t = measured.get("tokens_per_s") if measured else None
    if not t:
        return None
    return measured.get("tokens_per_s_lo") or t, measured.get("tokens_per_s_hi") or t


def overlap(a: dict, b: dict) -> bool:
    """True when two measurements' tokens/s intervals overlap: one trial each does not tell them apart."""
    ia, ib = interval(a), interval(b)
    return bool(ia and ib) and ia[0] <= ib[1] and ib[0] <= ia[1]


def pooled(first: dict, again: dict) -> dict:
    """One measurement from two runs of a configuration: the spread of both runs' periods together
    (a run-to-run difference widens the interval, as it should), the runs' own medians kept."""
    periods = list(first.get("step_times_s") or []) + list(again.get("step_times_s") or [])
    tokens = _tokens_per_step(first) or _tokens_per_step(again)
    if not periods or not tokens:
        return dict(again or first)
    out = {**first, **again, **spread(periods, tokens), "step_times_s": periods}
    out["runs"] = int(first.get("runs", 1)) + int(again.get("runs", 1))
    out["run_tokens_per_s"] = list(first.get("run_tokens_per_s") or [first.get("tokens_per_s")]) + [again.get("tokens_per_s")]
    return out


def _tokens_per_step(m: dict) -> float | None:
    return m["tokens_per_s"] * m["step_time_s"] if m.get("tokens_per_s") and m.get("step_time_s") else None


__all__ = ["WINDOW_S", "MIN_TIMED", "MAX_TIMED", "MAX_TIMED_CPU", "timed_steps", "trial_steps", "quantile", "spread", "interval", "overlap", "pooled"]
