"""What a training step's forward and backward cost the host, per model, against the kernels and modules it has.

Times a model at a width where the kernels' work is negligible (8 blocks at width 32), forward and backward
apart, and counts the aten operators each pass sends to a kernel (blockwork's rule) and the model's modules:
shardlab's own GPT and Llama (run/gpt.py, `--layers N` blocks) and, with `--hf`, fifteen transformers
architectures (HF_TINY). The models run in bf16, as the runner's mixed-precision steps compute. The GPU
figures are what hostcost.py's host model (kernels plus MODULE_KERNELS per module) and stepwork's
KERNELS_PER_BLOCK come from; stepwork's own counts of each model are printed beside them.

    bash benchmarks/on_gpu.sh benchmarks/host_phase_probe.py --device cuda --hf --rounds 3 --steps 100 [--json OUT]
    bash benchmarks/on_gpu.sh benchmarks/host_phase_probe.py --device cuda --layers 4 [--json OUT]
    .venv/bin/python benchmarks/host_phase_probe.py [--json OUT]   (the CPU: thread time; bf16 is slow there)

On CUDA the backward runs in autograd's device thread while the calling thread waits, so the two passes are
timed by the wall clock (the GPU's work at this width is a few microseconds a kernel, and the queue is
drained between steps, outside the timing): what the host takes to issue each pass. `--rounds` measures every
model again in another order, so that a slow spell of the host does not fall on one model alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _op_counter():
    """A dispatch mode counting the aten operators that reach a kernel (blockwork.launches_kernel) in `.n`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from shardlab.blockwork import launches_kernel

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.n += launches_kernel(func)
            return out

    return Ops()


TINY = " hidden_size=32 intermediate_size=96 num_hidden_layers=8 num_attention_heads=4 num_key_value_heads=2 vocab_size=256 seq_len=32"
HF_TINY = {"llama": TINY, "qwen2": TINY, "mistral": TINY, "qwen3": TINY + " head_dim=8", "gemma": TINY + " head_dim=8",
           "gemma2": TINY + " head_dim=8", "olmo2": TINY, "starcoder2": TINY, "phi3": TINY + " pad_token_id=0",
           "mixtral": TINY + " num_local_experts=4", "gpt2": " n_embd=32 n_layer=8 n_head=4 vocab_size=256 seq_len=32",
           "gpt_neox": " hidden_size=32 intermediate_size=96 num_hidden_layers=8 num_attention_heads=4 vocab_size=256 seq_len=32",
           "falcon": " hidden_size=32 num_hidden_layers=8 num_attention_heads=4 vocab_size=256 seq_len=32",
           "gpt_bigcode": " n_embd=32 n_layer=8 n_head=4 vocab_size=256 seq_len=32",
           "bloom": " hidden_size=32 n_layer=8 n_head=4 vocab_size=256 seq_len=32"}


def spec_of(name: str, layers: int = 8, hidden: int = 32):
    """The ModelSpec of a probed model: "gpt" / "llama" at `layers` x `hidden`, or "hf:TYPE" at HF_TINY's shape (counted
    from the model on the meta device; tests/test_steptime.py prices the probe's rows from these)."""
    from shardlab.models import ModelSpec

    if name.startswith("hf:"):
        from shardlab.usermodel import resolve

        return resolve(name + HF_TINY[name[3:]]).spec
    kw = {"kv_heads": 2, "ffn_hidden": 3 * hidden} if name == "llama" else {}
    return ModelSpec("host-phase", layers=layers, hidden=hidden, heads=4, vocab=256, seq_len=32, family=name, **kw)


def _model(name: str, layers: int, hidden: int, device: str):
    """(module in bf16 on `device`, ModelSpec, loss of logits and tokens) for "gpt" / "llama" (the runner's own
    model) or "hf:TYPE" (transformers at HF_TINY's shape, 8 layers at width 32)."""
    import torch

    from shardlab.describe import logits_of
    from shardlab.run.gpt import build_model, loss_fn

    if not name.startswith("hf:"):
        spec = spec_of(name, layers, hidden)
        return build_model(spec, device="cpu").to(torch.bfloat16).to(device), spec, loss_fn
    from shardlab.usermodel import resolve

    um = resolve(name + HF_TINY[name[3:]])
    model, _ = um.build("cpu")

    def loss(out, tok):
        return loss_fn(logits_of(out), tok)

    return model.to(torch.bfloat16).to(device), um.spec, loss


def measure(family: str, layers: int = 8, hidden: int = 32, steps: int = 150, device: str = "cpu") -> dict:
    import torch

    from shardlab.estimate.stepwork import work

    model, spec, loss_fn = _model(family, layers, hidden, device)
    model.train()
    w = work(spec, 1, spec.seq_len, 2, False)
    tok = torch.randint(0, spec.vocab, (1, spec.seq_len), device=device)
    with _op_counter() as ops:
        loss = loss_fn(model(tok), tok)
    ops_f = ops.n
    with _op_counter() as ops:
        loss.backward()
    ops_b = ops.n
    model.zero_grad(set_to_none=True)
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
            "forward_kernels": k_f, "backward_kernels": k_b, "ratio": (f / k_f) / (b / k_b),
            "forward_ops": ops_f, "backward_ops": ops_b, "modules": sum(1 for _ in model.modules())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--rounds", type=int, default=1, help="measure every model this many times, each round in another order")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--layers", type=int, default=8, help="blocks of the runner's own models (transformers' stay at 8)")
    ap.add_argument("--hf", action="store_true", help="also transformers' architectures (HF_TINY) next to the runner's two")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    names = ["gpt", "llama"] + (["hf:" + t for t in HF_TINY] if a.hf else [])
    rows = []
    for k in range(a.rounds):  # each round in another order, so that a slow spell of the host does not fall on one model
        for name in names[k % len(names):] + names[:k % len(names)]:
            try:
                rows.append({**measure(name, layers=a.layers, device=a.device, steps=a.steps), "round": k})
            except Exception as e:  # noqa: BLE001 - a model this torch / transformers cannot build: say so, go on
                print(f"{name}: {type(e).__name__}: {e}"[:300])
    for r in rows:
        print(f"{r['round']} {r['family']:14} forward {r['forward_s'] * 1e3:6.2f} ms / {r['forward_kernels']} kernels ({r['forward_ops']} ops), backward "
              f"{r['backward_s'] * 1e3:6.2f} ms / {r['backward_kernels']} ({r['backward_ops']} ops): forward/backward per kernel {r['ratio']:.2f}; "
              f"step per counted kernel {(r['forward_s'] + r['backward_s']) / (r['forward_kernels'] + r['backward_kernels']) * 1e6:.1f} us")
    if a.json:
        out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
               "command": f"benchmarks/host_phase_probe.py --device {a.device}{' --hf' if a.hf else ''} --rounds {a.rounds} --steps {a.steps} --layers {a.layers}", "rows": rows}
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
