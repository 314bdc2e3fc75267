"""A progress bar for a run, driven by its metrics lines (tqdm.auto: a text bar in a terminal, a widget
in a notebook).

The bar counts steps every rank has finished (the slowest rank sets the pace), and shows the latest
loss, step time and tokens/s of rank 0. Until the first step is done it names the start-up phase the
run is in (the worker's "phase" events: rendezvous, building the model, DeepSpeed's ops, wrapping, first
step), so a wait at 0/N always says what it is waiting for. It writes to stderr so `shardlab run --json`
keeps stdout clean.
"""

from __future__ import annotations

import sys


def phase_text(events) -> str | None:
    """What a run that has not finished a step is doing, from its event lines: the `what` of the latest
    start-up "phase" event (lowest rank first among equals), or "starting processes" before any."""
    latest = None
    for ev in events:
        if ev.get("event") == "phase" and ev.get("what"):
            if latest is None or (ev.get("t", 0), -int(ev.get("rank") or 0)) >= (latest.get("t", 0), -int(latest.get("rank") or 0)):
                latest = ev
    return latest["what"] if latest else None


class Progress:
    """Feed it metrics lines (dicts) with `update` and event lines with `event`; `close(status)` ends the
    bar with the run's status."""

    def __init__(self, total: int, world_size: int, desc: str = "run", *, file=None, disable: bool = False):
        from tqdm.auto import tqdm

        self.world_size = max(world_size, 1)
        self.done: dict[int, int] = {}  # rank -> steps finished
        self.desc = desc
        self.bar = tqdm(total=total, desc=f"{desc} [starting {self.world_size} processes]", unit="step",
                        file=file or sys.stderr, disable=disable, dynamic_ncols=True, leave=True)

    def event(self, ev: dict) -> None:
        """A worker event line: a start-up phase shows in the bar until the first step is done."""
        if ev.get("event") == "phase" and ev.get("what") and self.bar.n == 0 and ev.get("rank", 0) == 0:
            self.bar.set_description_str(f"{self.desc} [{ev['what']}]", refresh=True)

    def update(self, line: dict) -> None:
        try:
            rank = int(line["rank"])
        except (KeyError, TypeError, ValueError):
            return
        self.done[rank] = self.done.get(rank, 0) + 1
        # Step numbering is the worker's business; count lines per rank instead.
        count = min(self.done.values()) if len(self.done) >= self.world_size else 0
        count = min(count, self.bar.total or count)
        if count > self.bar.n:
            if self.bar.n == 0:
                self.bar.set_description_str(self.desc, refresh=False)
            self.bar.update(count - self.bar.n)
        if rank == 0:
            post = {}
            if line.get("loss") is not None:
                post["loss"] = f"{line['loss']:.4f}"
            if line.get("step_time_s") is not None:
                post["step"] = f"{line['step_time_s']:.3f}s"
            if line.get("tokens_per_s") is not None:
                post["tok/s"] = f"{line['tokens_per_s']:.0f}"
            if post:
                self.bar.set_postfix(post, refresh=False)

    def close(self, status: str | None = None) -> None:
        if status:
            self.bar.set_description_str(f"{self.desc} [{status}]", refresh=False)
        self.bar.close()
