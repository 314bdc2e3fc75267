"""Where the caching allocator's reserved memory comes from, row by row (issue 13, reserved).

Runs fidelity.py's configurations (by number) through the real runner with the worker's
`trace_memory` (torch.cuda.memory._record_memory_history) and reads the snapshot it dumps: every
segment the allocator made (cudaMalloc), with its size, stream and pool, the request that made it,
the bytes allocated at that moment, and the Python frames that asked (the first frame in
shardlab, DeepSpeed or torch.distributed / torch.optim / torch.utils.checkpoint). So a reserved figure
the estimate misses can be read as "N segments of X MiB made by <code> on stream S while Y GiB
were allocated" instead of guessed.

    # on the GPU machine:
    bash benchmarks/on_gpu.sh benchmarks/allocator_probe.py --only 38,109,36 --out $OUT/probe --jobs 3
    # here: print a results file again
    .venv/bin/python benchmarks/allocator_probe.py --show benchmarks/results/allocator_probe_h200.json

Recorded (2026-12-01, H200, torch 2.11.0+cu130, DeepSpeed 0.19.8): benchmarks/results/allocator_probe_h200.json,
and five rows' request sequences in allocator_events_h200.json.gz (tests/test_cachesim.py replays them).

Timings of traced runs are not clean step times; only the memory figures are kept.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pickle
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB, GIB = 2**20, 2**30
_OURS = ("shardlab/", "deepspeed/", "torch/distributed/", "torch/optim/", "torch/utils/checkpoint", "torch/nn/functional",
         "torch/_tensor", "torch/autograd/")


def _where(frames: list[dict]) -> str:
    """The innermost frames worth naming: up to three from the frameworks / shardlab, innermost first."""
    out = []
    for f in frames or []:
        fn = f.get("filename", "")
        if any(k in fn for k in _OURS):
            short = fn.split("site-packages/")[-1]
            out.append(f"{short}:{f.get('line')} {f.get('name')}")
        if len(out) == 3:
            break
    return " <- ".join(out) or (f"{frames[0].get('filename', '?')}:{frames[0].get('line')}" if frames else "?")


def summarize(snap: dict) -> dict:
    """Segments at the end, and the history of segment creation from the trace."""
    segs = snap.get("segments", [])
    by = Counter()
    for s in segs:
        by[f"stream {s.get('stream', 0):#x} {s.get('segment_type', '?')}"] += s["total_size"]
    trace = [e for dev in snap.get("device_traces", []) for e in dev]
    allocated, peak, made, frees_seg = 0, 0, [], 0
    pending = None
    for e in trace:
        a = e["action"]
        if a == "alloc":
            allocated += e["size"]
            peak = max(peak, allocated)
            if pending is not None:
                pending.update(request_mib=round(e["size"] / MIB, 3), where=_where(e.get("frames")))
                pending = None
        elif a in ("free_completed",):
            allocated -= e["size"]
        elif a == "segment_alloc":
            pending = {"mib": round(e["size"] / MIB, 1), "stream": f"{e.get('stream', 0):#x}", "allocated_gib": round(allocated / GIB, 3)}
            made.append(pending)
        elif a == "segment_free":
            frees_seg += 1
    return {"segments_end": len(segs), "reserved_end_gib": round(sum(s["total_size"] for s in segs) / GIB, 3),
            "allocated_end_gib": round(sum(s["allocated_size"] for s in segs) / GIB, 3),
            "by_stream_pool_gib": {k: round(v / GIB, 3) for k, v in by.items()},
            "trace_entries": len(trace), "trace_peak_allocated_gib_relative": round(peak / GIB, 3),
            "segment_frees": frees_seg, "segments_made": made}


def run_one(i: int, a) -> dict:
    import fidelity

    from shardlab import launch

    row = fidelity.config_dict(i)
    t0 = time.time()
    try:
        run = launch(fidelity.plan_for(row), model=fidelity.model_for(row, a.tiny), steps=a.steps, device=a.device,
                     out=Path(a.runs), instrument=True, timeout_s=400, trace_memory=True,
                     factory=fidelity.HF_FACTORY if row["hf"] else None)
        status = run.wait()
        m = fidelity.measured(run, status)
        row.update({k: m.get(k) for k in ("status", "error", "peak_allocated_bytes", "peak_reserved_bytes")})
        row["steps"] = [{k: s.get(k) for k in ("step", "peak_allocated_bytes", "peak_reserved_bytes", "mem_phases")} for s in m.get("steps", [])]
        snap = Path(run.dir) / "memory_snapshot_rank0.pickle"
        if snap.exists():
            with open(snap, "rb") as fh:
                data = pickle.load(fh)
            row["allocator"] = summarize(data)
            # the request sequence itself, for replaying through cachesim.py
            row["events"] = [[e["action"][0] + e["action"].split("_")[-1][0], e["addr"], e["size"], e.get("stream", 0)]
                             for dev in data.get("device_traces", []) for e in dev
                             if e["action"] in ("alloc", "free_completed", "segment_alloc", "segment_free")]
    except Exception as e:  # noqa: BLE001 - a failed configuration is a row
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
    row["wall_s"] = round(time.time() - t0, 1)
    return row


def show(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        al = r.get("allocator") or {}
        pa, pr = (r.get("peak_allocated_bytes") or 0) / GIB, (r.get("peak_reserved_bytes") or 0) / GIB
        lines.append(f"#{r['id']} {r['model']} {r['framework']} {r['sharding']} {r['precision']} mb{r['micro_batch_size']} ga{r['grad_accum_steps']}"
                     f" ac={int(r['activation_checkpointing'])} off={r['offload']}: {r.get('status')} allocated {pa:.2f} reserved {pr:.2f} GiB;"
                     f" {al.get('segments_end')} segments {al.get('by_stream_pool_gib')}, segment frees {al.get('segment_frees')}")
        big = sorted(al.get("segments_made", []), key=lambda s: -s["mib"])[:12]
        for s in big:
            lines.append(f"    {s['mib']:8.1f} MiB stream {s['stream']} at {s['allocated_gib']:.2f} GiB allocated, request {s.get('request_mib')} MiB: {s.get('where')}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma list of fidelity.py configuration numbers")
    ap.add_argument("--out", help="folder for allocator_probe.json")
    ap.add_argument("--runs", default="/tmp/allocator_probe_runs")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--show", help="print a results file")
    a = ap.parse_args()
    if a.show:
        doc = json.loads(Path(a.show).read_text())
        print(show(doc["rows"] if isinstance(doc, dict) else doc))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []

    events: dict[str, list] = {}

    def job(i):
        r = run_one(i, a)
        events[str(i)] = r.pop("events", [])
        done.append(r)
        (out / "allocator_probe.json").write_text(json.dumps(sorted(done, key=lambda x: x["id"]), indent=1, default=str))
        with gzip.open(out / "events.json.gz", "wt") as fh:  # every row's requests in one file
            json.dump(events, fh)
        print(show([r]), flush=True)

    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        list(ex.map(job, [int(x) for x in a.only.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
