"""The host's launch stream and the GPU's queue of one training step, simulated segment by segment.

A training step on one GPU is two clocks: the host (Python, autograd, the frameworks' hooks) issues
kernels, the GPU runs them in order. The GPU cannot start a kernel before the host has issued it, and
the host runs ahead of the GPU until something makes it wait: a synchronisation (`.item()`, an
`event.synchronize()`, `torch.cuda.synchronize()`). How much of the shorter clock the step hides is
therefore not one share per framework but follows from *where* each clock spends its time:

- a stretch where the host is slower than the GPU (a forward pass of small kernels, DeepSpeed's
  gradient hooks, an optimizer step launched tensor by tensor) leaves the GPU waiting;
- a stretch where the GPU is slower (large matmuls, the vocabulary's loss) lets the host run ahead,
  and that lead hides later host-heavy stretches only until the next synchronisation.

A step is a list of `Seg`s, each `n` identical pieces (a transformer block's forward, say) with the
host seconds to issue one piece, the GPU seconds to run it, and whether the host then waits for the
GPU (`sync`). A piece issued from host time `hs` to `hs + host` finishes on the GPU at
max(gpu_free + gpu, hs + max(host, gpu)): kernels issued at an even pace start as they arrive when the
GPU is idle, back to back when it is busy. For `n` identical pieces that recurrence has a closed form,
so a step of any length costs a few dozen operations (the estimate's 5 ms budget, widgets).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Seg:
    """`n` identical pieces of a step: host seconds to issue one, GPU seconds to run one."""

    name: str
    host: float
    gpu: float
    n: int = 1
    sync: bool = False  # after each piece the host waits for the GPU to finish everything issued so far


@dataclass
class Timeline:
    """Where the two clocks stand after the simulated step, and what each waited for."""

    host: float = 0.0  # when the host is done issuing (after its last wait)
    gpu: float = 0.0  # when the GPU finishes the last piece
    host_wait: float = 0.0  # host seconds spent waiting at synchronisations
    gpu_busy: float = 0.0  # GPU seconds of work

    @property
    def step(self) -> float:
        return max(self.host, self.gpu)

    @property
    def overlapped(self) -> float:
        """Seconds in which host and GPU both worked (host time issuing, not waiting)."""
        return max(0.0, self.gpu_busy + self.host - self.host_wait - self.step)

    @property
    def gpu_idle(self) -> float:
        """GPU seconds with nothing to run: the host's share of the step that the GPU does not hide."""
        return self.step - self.gpu_busy


def simulate(segs: list[Seg], t: Timeline | None = None) -> Timeline:
    """Run the segments on both clocks (each step starts with an empty queue: the previous step's
    synchronisation). Closed form of n pieces from host H0, GPU free at G0:
    G_n = max(G0 + n x gpu, H0 + n x max(host, gpu)), H_n = H0 + n x host."""
    t = t or Timeline()
    for s in segs:
        for n in ([1] * s.n if s.sync else [s.n] if s.n > 0 else []):
            h0 = t.host
            t.host = h0 + n * s.host
            t.gpu = max(t.gpu + n * s.gpu, h0 + n * max(s.host, s.gpu))
            t.gpu_busy += n * s.gpu
            if s.sync and t.gpu > t.host:
                t.host_wait += t.gpu - t.host
                t.host = t.gpu
    return t
