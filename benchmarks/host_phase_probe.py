"""How the host's cost per counted kernel divides between a training step's forward and backward (CPU, ~10 s).

hostcost.FWD_HOST_RATIO: the forward runs every operator through Python (nn.Module calls, the model's own
code) and records the autograd graph; the backward replays the graph in autograd's C++ engine. This times
the runner's own model (run/gpt.py) on the CPU at a width where the kernels' work is negligible, forward
and backward apart, in the calling thread's CPU time (immune to other processes taking the cores), and
divides by the kernels stepwork.py counts in each pass (the backward: twice the forward's blocks, plus the
loss's share). Prints one line per family and writes the figures as JSON.

    .venv/bin/python benchmarks/host_phase_probe.py [--json benchmarks/results/host_phase_cpu.json]
    bash benchmarks/on_gpu.sh benchmarks/host_phase_probe.py --device cuda [--json OUT]

On CUDA the backward runs in autograd's device thread while the calling thread waits, so the two passes are
timed by the wall clock instead (the GPU's work at this width is a few microseconds a kernel, and the queue is
drained between steps, outside the timing): what the host takes to issue each pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def measure(family: str, layers: int = 8, hidden: int = 32, steps: int = 150, device: str = "cpu") -> dict:
    import torch

    from shardlab.estimate.stepwork import work
    from shardlab.models import ModelSpec
    from shardlab.run.gpt import build_model, loss_fn

    spec = ModelSpec("host-phase", layers=layers, hidden=hidden, heads=4, vocab=256, seq_len=32, family=family)
    w = work(spec, 1, spec.seq_len, 4, False)
    model, tok = build_model(spec, device="cpu").to(device), torch.randint(0, spec.vocab, (1, spec.seq_len), device=device)
    clock = time.thread_time if device == "cpu" else time.perf_counter
    fwd, bwd = [], []
    for i in range(steps):
        if device != "cpu":
            torch.cuda.synchronize()
        c0 = clock()
        loss = loss_fn(model(tok), tok)
        c1 = clock()
        loss.backward()
        c2 = clock()
        model.zero_grad(set_to_none=True)
        if i >= 10:
            fwd.append(c1 - c0)
            bwd.append(c2 - c1)
    f, b = statistics.median(fwd), statistics.median(bwd)
    k_f, k_b = w.fwd_kernels, w.kernels - w.fwd_kernels
    return {"family": family, "device": device, "layers": layers, "hidden": hidden, "steps": len(fwd), "forward_s": f, "backward_s": b,
            "forward_kernels": k_f, "backward_kernels": k_b, "ratio": (f / k_f) / (b / k_b)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = [measure(f, device=a.device) for f in ("gpt", "llama")]
    for r in rows:
        print(f"{r['family']:6} forward {r['forward_s'] * 1e3:6.2f} ms / {r['forward_kernels']} kernels, backward "
              f"{r['backward_s'] * 1e3:6.2f} ms / {r['backward_kernels']}: forward/backward per kernel {r['ratio']:.2f}")
    if a.json:
        out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
               "command": f"benchmarks/host_phase_probe.py --device {a.device}", "rows": rows}
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
