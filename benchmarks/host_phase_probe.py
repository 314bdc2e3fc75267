"""How the host's cost per counted kernel divides between a training step's forward and backward (CPU, ~10 s).

hostcost.FWD_HOST_RATIO: the forward runs every operator through Python (nn.Module calls, the model's own
code) and records the autograd graph; the backward replays the graph in autograd's C++ engine. This times
the runner's own model (run/gpt.py) on the CPU at a width where the kernels' work is negligible, forward
and backward apart, in the calling thread's CPU time (immune to other processes taking the cores), and
divides by the kernels stepwork.py counts in each pass (the backward: twice the forward's blocks, plus the
loss's share). Prints one line per family and writes the figures as JSON.

    .venv/bin/python benchmarks/host_phase_probe.py [--json benchmarks/results/host_phase_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def measure(family: str, layers: int = 8, hidden: int = 32, steps: int = 150) -> dict:
    import torch

    from shardlab.estimate.stepwork import work
    from shardlab.models import ModelSpec
    from shardlab.run.gpt import build_model, loss_fn

    spec = ModelSpec("host-phase", layers=layers, hidden=hidden, heads=4, vocab=256, seq_len=32, family=family)
    w = work(spec, 1, spec.seq_len, 4, False)
    model, tok = build_model(spec, device="cpu"), torch.randint(0, spec.vocab, (1, spec.seq_len))
    fwd, bwd = [], []
    for i in range(steps):
        c0 = time.thread_time()
        loss = loss_fn(model(tok), tok)
        c1 = time.thread_time()
        loss.backward()
        c2 = time.thread_time()
        model.zero_grad(set_to_none=True)
        if i >= 10:
            fwd.append(c1 - c0)
            bwd.append(c2 - c1)
    f, b = statistics.median(fwd), statistics.median(bwd)
    k_f, k_b = w.fwd_kernels, w.kernels - w.fwd_kernels
    return {"family": family, "layers": layers, "hidden": hidden, "steps": len(fwd), "forward_s": f, "backward_s": b,
            "forward_kernels": k_f, "backward_kernels": k_b, "ratio": (f / k_f) / (b / k_b)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = [measure(f) for f in ("gpt", "llama")]
    for r in rows:
        print(f"{r['family']:6} forward {r['forward_s'] * 1e3:6.2f} ms / {r['forward_kernels']} kernels, backward "
              f"{r['backward_s'] * 1e3:6.2f} ms / {r['backward_kernels']}: forward/backward per kernel {r['ratio']:.2f}")
    if a.json:
        out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
               "command": "benchmarks/host_phase_probe.py", "rows": rows}
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
