"""The memory timeline: the launcher samples each rank's memory at 20 Hz into `timeline.jsonl`.

Lines are {"t", "rank", "gpu", "source", "bytes"}: `source` "rss" is the resident set of the rank's
process (psutil; every run), "nvml" the memory used on the rank's GPU as NVML reports it (CUDA runs;
this includes the CUDA context and other processes on that GPU, so it is what nvidia-smi shows, not
what the caching allocator holds). `t` is time.time(), the clock the worker stamps its step phases
with (t_start, t_fwd_end, ...), so a sample falls inside a known phase of a known step.

The ranks are found as the torchrun agents' direct children; each one's RANK / LOCAL_RANK come from its
environment (/proc/<pid>/environ, readable because we started it). The sampler also keeps every
descendant it has seen, so the launcher can end them all: torchrun starts each worker in a session of
its own, out of reach of a signal to the agent's process group.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil

HZ = 20.0


class _Nvml:
    """NVML handles for the GPUs of this run, or nothing if NVML is missing (then no nvml lines)."""

    def __init__(self, indices: list[int]):
        self.ok = False
        self.handles: dict[int, object] = {}
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            n = pynvml.nvmlDeviceGetCount()
            self.handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices if i < n}
            self.ok = bool(self.handles)
        except Exception:
            self.ok = False

    def used(self) -> dict[int, int]:
        out = {}
        for i, h in self.handles.items():
            try:
                out[i] = int(self.nv.nvmlDeviceGetMemoryInfo(h).used)
            except Exception:
                pass
        return out

    def close(self) -> None:
        if self.ok:
            try:
                self.nv.nvmlShutdown()
            except Exception:
                pass


class Sampler(threading.Thread):
    """Samples every rank of the run until `stop()`; also the launcher's map of the run's processes.

    agents: {node index: psutil.Process of that node's torchrun agent}; nproc_per_node: ranks each
    agent starts. gpu_index: {(node, local rank): NVML GPU index} on CUDA runs (None on CPU: no NVML
    lines). A daemon thread: it never keeps the interpreter alive.
    """

    def __init__(self, path: str | Path, agents: dict[int, psutil.Process], *, nproc_per_node: int = 1,
                 gpu_index: dict[tuple[int, int], int] | None = None, hz: float = HZ):
        super().__init__(name=f"shardlab-timeline-{Path(path).parent.name}", daemon=True)
        self.path = Path(path)
        self.agents = agents
        self.interval = 1.0 / hz
        self.nproc_per_node = nproc_per_node
        self.gpu_index = gpu_index or {}
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self.ranks: dict[int, psutil.Process] = {}  # global rank -> worker process
        self.where: dict[int, tuple[int, int]] = {}  # global rank -> (node, local rank)
        self.seen: dict[int, psutil.Process] = {}  # every descendant ever seen, by pid
        self._classified: set[int] = set()  # pids known to be a rank, or known not to be one
        self.last: dict[int, int] = {}  # rank -> last rss bytes
        self.last_gpu: dict[int, int] = {}  # rank -> last NVML bytes
        self.gone: dict[int, float] = {}  # rank -> when its process was first seen gone
        self.samples = 0
        self.on_rank = None  # called with each rank's psutil.Process when it is found
        self._nvml = None

    # ---- discovery
    def _discover(self) -> None:
        for node, agent in self.agents.items():
            try:
                kids = agent.children(recursive=True)
            except psutil.Error:
                continue
            for p in kids:
                if p.pid in self._classified:
                    continue
                with self._lock:
                    self.seen.setdefault(p.pid, p)
                try:
                    if p.ppid() != agent.pid:
                        self._classified.add(p.pid)
                        continue  # a worker's own helper (compiler, dataloader): killed, not sampled
                    # Between fork and exec a child still has the agent's environment: no RANK yet,
                    # so it is looked at again on the next pass.
                    env = p.environ()
                    rank, local = int(env["RANK"]), int(env["LOCAL_RANK"])
                except (psutil.Error, KeyError, ValueError):
                    continue
                self._classified.add(p.pid)
                with self._lock:
                    self.ranks[rank] = p
                    self.where[rank] = (node, local)
                if self.on_rank is not None:
                    try:
                        self.on_rank(p)
                    except psutil.Error:
                        pass

    def rank_of_pid(self) -> dict[int, int]:
        with self._lock:
            return {p.pid: r for r, p in self.ranks.items()}

    def processes(self) -> list[psutil.Process]:
        """Every process of the run ever seen (agents first), alive or not."""
        with self._lock:
            return [*self.agents.values(), *self.seen.values()]

    # ---- sampling
    def _gpu_of(self, rank: int) -> int | None:
        return self.gpu_index.get(self.where.get(rank))

    def _sample(self, f) -> None:
        now = time.time()
        lines = []
        with self._lock:
            ranks = dict(self.ranks)
        for rank, p in sorted(ranks.items()):
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.NoSuchProcess(p.pid)
                rss = p.memory_info().rss
                if rss == 0:  # exited between the two calls
                    raise psutil.NoSuchProcess(p.pid)
            except psutil.Error:
                self.gone.setdefault(rank, now)
                continue
            self.last[rank] = rss
            lines.append({"t": now, "rank": rank, "gpu": self._gpu_of(rank), "source": "rss", "bytes": rss})
        if self._nvml is not None and self._nvml.ok:
            used = self._nvml.used()
            for rank in sorted(ranks):
                g = self._gpu_of(rank)
                if g in used:
                    self.last_gpu[rank] = used[g]
                    lines.append({"t": now, "rank": rank, "gpu": g, "source": "nvml", "bytes": used[g]})
        if lines:
            f.write("".join(json.dumps(x) + "\n" for x in lines))
            f.flush()
            self.samples += 1

    def run(self) -> None:
        if self.gpu_index:
            self._nvml = _Nvml(sorted(set(self.gpu_index.values())))
        next_discover = 0.0
        with open(self.path, "a") as f:
            while not self._halt.is_set():
                tick = time.monotonic()
                expected = len(self.agents) * self.nproc_per_node
                # Look for new processes often until every rank is known, then once a second
                # (compilers and helpers a worker starts later still get found for the final kill).
                if len(self.ranks) < expected or tick >= next_discover:
                    self._discover()
                    next_discover = tick + 1.0
                self._sample(f)
                self._halt.wait(max(0.0, self.interval - (time.monotonic() - tick)))
            self._discover()
        if self._nvml is not None:
            self._nvml.close()

    def stop(self, join: bool = True) -> None:
        self._halt.set()
        if join and self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)


PHASES = ("forward", "backward", "optimizer")


def label_phases(timeline, metrics):
    """The timeline with `step` and `phase` columns: what the sample's rank was doing at that moment.

    phase is forward / backward / optimizer inside a step (from the rank's own t_start, t_fwd_end,
    t_bwd_end, t_opt_end stamps), "setup" before its first step and "other" between or after steps
    (logging, teardown). Without phase stamps the frame comes back unchanged.
    """
    import pandas as pd

    need = {"rank", "step", "t_start", "t_fwd_end", "t_bwd_end", "t_opt_end"}
    if timeline.empty or metrics.empty or not need <= set(metrics.columns) or "rank" not in timeline:
        return timeline
    steps = metrics[list(need)].dropna().astype({"rank": int}).sort_values("t_start")
    tl = timeline.reset_index(drop=True).assign(_row=lambda d: range(len(d)))
    tl = tl[tl["rank"].notna()].astype({"rank": int}).sort_values("t")
    merged = pd.merge_asof(tl, steps, left_on="t", right_on="t_start", by="rank", direction="backward")
    t = merged["t"]
    phase = pd.Series("other", index=merged.index, dtype=object)
    phase[merged["t_start"].isna()] = "setup"
    phase[(t < merged["t_opt_end"])] = "optimizer"
    phase[(t < merged["t_bwd_end"])] = "backward"
    phase[(t < merged["t_fwd_end"])] = "forward"
    merged["phase"] = phase
    merged.loc[merged["phase"].isin(["setup", "other"]), "step"] = None
    out = merged.set_index("_row").sort_index()[[*timeline.columns, "step", "phase"]]
    return out.reset_index(drop=True)
