"""The training program torchrun starts: `python -m shardlab.run.worker RUN_DIR`.

It reads RUN_DIR/plan.yaml (a shardlab Plan) and RUN_DIR/run.json ({"model", "steps", "device",
"seed", "factory", "trace_memory", "instrument"}, and "profile_step" when one step is profiled), trains `steps` optimizer steps on deterministic
synthetic batches, and after each step every rank appends one JSON line to RUN_DIR/metrics.jsonl
(phase timestamps, loss, throughput, the model-state bytes it holds, its collective traffic, memory).
RUN_DIR/events.jsonl gets start / done / oom / error lines, and a "phase" line (with `what`, in words)
as each start-up phase begins -- rendezvous, building the model, DeepSpeed's ops, wrapping, the first
step -- so every progress display can name what a run at step 0 is waiting for. Exit codes: 0 done, EXIT_OOM (3) when the
rank ran out of memory, 1 on any other failure.

A metrics line is a `StepRecord` (run/metrics.py: the schema, its fields and units). With
"instrument": false the loop is the same but only loss and timings are logged: the overhead benchmark
compares the two. With "instrument": "alternate" odd steps are measured and even steps run bare in the
same process (each line says which in "instrumented"): GPU validation compares the two kinds of step
without the run-to-run spread that separate processes show (up to ±15% between identical DeepSpeed
ZeRO-3 runs on an H100).

"model" is a preset, a shape dict, or a model source (shardlab/usermodel.py: `hf:<type> ...`, a Hugging
Face config.json, `module:function`), which is built here with random weights and fed synthetic
batches made for its inputs. The older "factory": "module:function" replaces the GPT: the function
returns (model, batch_fn) where the model maps token ids [B, T] to logits [B, T, vocab] and
batch_fn(step, micro) gives (inputs, targets).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from shardlab.constants import EXIT_FAILED as EXIT_ERROR  # exit codes have one home
from shardlab.constants import EXIT_OK, EXIT_OOM
from shardlab.estimate.gpus import gpu_table_name, peak_tflops  # noqa: F401 (importable from here, as before)
from shardlab.run.files import RunFiles

STATE_EVERY = 10  # steps between full re-measurements of the (fixed-size) sharded model states
RUN_DEFAULTS = {"steps": 3, "device": "cpu", "seed": 0, "factory": None, "trace_memory": False, "instrument": True,
                "profile_step": None}


def _prepare_env(device: str) -> None:
    """Environment fixes that must happen before torch / deepspeed are imported."""
    from shardlab.export.launch import sanitize_arch_list

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = sanitize_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import warnings

    # DeepSpeed calls the old collective names on every step; the warning would flood the run log
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.")


class Log:
    """Appends JSON lines with one O_APPEND write each, so ranks never interleave inside a line."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, obj: dict) -> None:
        os.write(self.fd, (json.dumps(obj, separators=(",", ":"), default=_jsonable) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def _jsonable(o):
    try:
        return float(o)
    except Exception:
        return str(o)


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower())


class Worker:
    """One rank's run: set-up, the training loop, the per-step records."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.files = RunFiles(run_dir)
        cfg = {**RUN_DEFAULTS, **json.loads(self.files.config.read_text())}
        self.cfg = cfg
        self.device = cfg["device"]
        # True: every step measured; False: the bare loop; "alternate": odd steps measured, even bare
        self.alternate = cfg.get("instrument") == "alternate"
        self.instrument = self.alternate or bool(cfg.get("instrument", True))
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.phase = "init"
        self.events = Log(self.files.events)
        self.metrics = Log(self.files.metrics)
        self.counter = None

    def event(self, event: str, **extra) -> None:
        self.events.write({"t": time.time(), "rank": self.rank, "event": event, "phase": self.phase, **extra})

    def startup(self, phase: str, what: str) -> None:
        """Enter a start-up phase and say so in events.jsonl (the progress displays show `what`)."""
        self.phase = phase
        self.event("phase", what=what)

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        _prepare_env(self.device)
        if self.instrument:
            from shardlab.run.measure import CommCounter

            # before the frameworks bind torch.distributed's functions (DeepSpeed does at init)
            self.counter = CommCounter().install()
        import torch
        import torch.distributed as dist

        from shardlab.models import flops_per_token
        from shardlab.plan import load_plan

        self.plan = load_plan(self.files.plan)
        self.startup("rendezvous", f"rendezvous: waiting for all {self.world} ranks")
        if self.device == "cuda":
            torch.cuda.set_device(self.local_rank)
            if self.cfg.get("trace_memory"):
                # Python frames only: symbolising C++ frames at the dump takes minutes
                torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
        dist.init_process_group("nccl" if self.device == "cuda" else "gloo",
                                device_id=torch.device("cuda", self.local_rank) if self.device == "cuda" else None)
        # the GPU's name in shardlab's table lets compare() predict for the GPU the run really used
        gpu = gpu_table_name(torch.cuda.get_device_name()) if self.device == "cuda" else None
        self.event("start", world_size=self.world, pid=os.getpid(), host=os.uname().nodename,
                   framework=self.plan.framework, sharding=self.plan.sharding, gpu=gpu)
        self.startup("build", "building the model")
        from shardlab.run.build import model_for_rank

        self.plan, model, self.batches, self.loss, self.spec = model_for_rank(self.plan, self.cfg, self.rank, self.world, self.device)
        if self.plan.framework == "deepspeed":
            self.startup("ops", "loading DeepSpeed's C++ ops (the first run in an environment builds them: about a minute on 2 cores)")
            from shardlab.frameworks.deepspeed import load_ops

            load_ops(self.plan, self.device)
        self.startup("wrap", f"wrapping the model ({self.plan.framework} {self.plan.sharding})")
        from shardlab.run.wrap import wrap

        self.trainer = wrap(self.plan, model, self.device, self.loss)
        self.peak = None
        if self.device == "cuda" and self.spec is not None:
            from shardlab.estimate.gpus import peak_tflops

            self.peak = peak_tflops(torch.cuda.get_device_name(), self.plan.precision)
        self.fpt = flops_per_token(self.spec) if self.spec is not None else None

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        import contextlib

        self.pause = self.counter.pause if self.counter is not None else contextlib.nullcontext
        self.startup("first_step", "first step")
        for step in range(1, int(self.cfg["steps"]) + 1):
            inst = self.instrument and not (self.alternate and step % 2 == 0)
            with contextlib.ExitStack() as bare_step:
                if self.counter is not None and not inst:
                    bare_step.enter_context(self.pause())  # a bare step of an alternating run counts nothing
                if step == self.cfg.get("profile_step"):  # run/profile.py: where this step's time went
                    from shardlab.run.profile import profiled

                    with profiled(self.device) as prof:
                        rec = self._step(step, inst)
                    rec.add(profile=prof)
                else:
                    rec = self._step(step, inst)
                self.metrics.write(rec.to_json())
        self.phase = "done"

    def _step(self, step: int, inst: bool):
        """One optimizer step; its StepRecord (measured figures only when `inst`)."""
        import torch

        from shardlab.run import measure

        t = self.trainer
        if inst:
            measure.reset_peaks(self.device)
            self.counter.reset()
        mem_phases: dict[str, int | None] = {}
        # durations from the monotonic clock, placed on the timeline's epoch clock from t_start: a clock that
        # NTP adjusts stretches time.time() differences (CI saw a step timed 0.45 ms longer by time.time()
        # than the profiler's perf_counter span around it)
        t_start, clock = time.time(), time.perf_counter()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if self.device == "cuda" and inst else None
        if ev:
            ev[0].record()
        losses, tokens, fwd_s, bwd_s = self._micro_batches(step, ev, mem_phases if inst else None)
        if ev:
            ev[2].record()
        times = [t_start, t_start + fwd_s, t_start + fwd_s + bwd_s]
        # The sizes of sharded states are fixed once the first step has created the optimizer
        # states, so walking every tensor each step would only add overhead: measure on the first
        # two steps, every STATE_EVERY-th and the last, and carry the figures in between.
        fresh = inst and (step <= 2 or step % STATE_EVERY == 0 or step == int(self.cfg["steps"]))
        if inst:
            mem_phases["bwd"] = measure.allocated(self.device)
        before = self._states() if fresh else None  # grads exist now (after backward, before zero_grad)
        self.phase = "optimizer"
        t.step()
        t.zero_grad()
        if ev:
            ev[3].record()
        if inst:
            mem_phases["opt"] = measure.allocated(self.device)
        if fresh:
            self._keep_states(before, self._states(), step)
        self.phase = "log"
        comm = self.counter.snapshot() if inst else ({}, {})
        loss_value = self._global_loss(losses)
        times.append(t_start + time.perf_counter() - clock)
        if ev:
            f_ms, b_ms = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
            times[1] = t_start + f_ms / 1e3
            times[2] = times[1] + b_ms / 1e3
        return self._record(step, inst, loss_value, times, tokens, comm, mem_phases)

    def _micro_batches(self, step: int, ev, mem_phases: dict | None):
        """Forward and backward of each micro-batch: (losses, tokens, forward seconds, backward seconds)."""
        from shardlab.run import measure
        from shardlab.usermodel import tokens_in

        t, accum = self.trainer, self.plan.grad_accum_steps
        losses, tokens, fwd_s, bwd_s = [], 0, 0.0, 0.0
        for micro in range(accum):
            x, y = self.batches(step, micro)
            tokens += tokens_in(x)
            self.phase = "forward"
            t0 = time.perf_counter()
            loss = t.forward(x, y)
            t1 = time.perf_counter()
            if ev and micro == accum - 1:
                ev[1].record()
            if mem_phases is not None and micro == accum - 1:
                mem_phases["fwd"] = measure.allocated(self.device)
            self.phase = "backward"
            t.backward(loss, accum)
            t2 = time.perf_counter()
            fwd_s += t1 - t0
            bwd_s += t2 - t1
            losses.append(loss.detach().float())
            if t.engine is not None and micro < accum - 1:
                t.engine.step()  # DeepSpeed: a no-op step between micro-batches
        return losses, tokens, fwd_s, bwd_s

    def _states(self):
        """(state bytes, their CPU share) as this rank holds them now, not counted as communication."""
        from shardlab.run import measure

        with self.pause():
            return measure.state_bytes(self.trainer.module, self.trainer.zero_optimizer, self.plan.framework)

    def _keep_states(self, before, after, step: int) -> None:
        """Optimizer states appear lazily at the first step, and params are at rest (resharded) only
        after it: take those two from after the step, the grads from before it."""
        (state, state_cpu), (now, now_cpu) = before, after
        state.update(params=now["params"], optimizer=now["optimizer"])
        state_cpu.update(params=now_cpu["params"], optimizer=now_cpu["optimizer"])
        self._state = (state, state_cpu, step)

    def _global_loss(self, losses) -> float:
        """The step's loss summed over micro-batches and ranks (the caller divides by their count)."""
        import torch
        import torch.distributed as dist

        loss_sum = torch.stack(losses).sum()
        with self.pause():
            dist.all_reduce(loss_sum)
        # NCCL's all_reduce returns once queued: wait for the GPU so the step's time is the GPU's
        # work, not the host's queueing (measured on an H100: without it step times swung ±15%
        # and gave up to 575 TFLOPS for a 470 TFLOPS loop)
        return loss_sum.item()

    def _record(self, step: int, inst: bool, loss_value: float, times: list, tokens: int, comm, mem_phases: dict):
        """The StepRecord of one step: timings always, measured figures when `inst`."""
        from shardlab.run import measure
        from shardlab.run.metrics import StepRecord

        t_start, t_fwd_end, t_bwd_end, t_opt_end = times
        step_time = t_opt_end - t_start
        rec = StepRecord(step=step, rank=self.rank, world_size=self.world,
                         loss=loss_value / (self.plan.grad_accum_steps * self.world),
                         t_start=t_start, t_fwd_end=t_fwd_end, t_bwd_end=t_bwd_end, t_opt_end=t_opt_end,
                         step_time_s=step_time, tokens=tokens, tokens_per_s=tokens / step_time)
        if self.alternate:
            rec.instrumented = inst
        if inst:
            tflops = self.fpt * tokens / step_time / 1e12 if self.fpt else None
            state, state_cpu, measured = self._state
            rec.add(tflops=tflops, mfu=(tflops / self.peak if tflops and self.peak else None),
                    state_bytes=state, state_measured_step=measured, comm_bytes=comm[0], comm_count=comm[1],
                    **measure.memory(self.device))
            if self.device == "cuda":
                rec.add(mem_phases=mem_phases, state_bytes_cpu=state_cpu)  # state_bytes_cpu: the offloaded part
        return rec

    def finish(self) -> None:
        import torch
        import torch.distributed as dist

        if self.device == "cuda" and self.cfg.get("trace_memory"):
            torch.cuda.memory._dump_snapshot(str(self.dir / f"memory_snapshot_rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.event("done")
        if dist.is_initialized():
            # Drop the wrapped model and optimizer (and their communication hooks) while the process
            # group still exists: tearing them down after it aborted FSDP2 `replicate` runs at exit
            # ("terminate called without an active exception", 4 of 6 CPU runs).
            import gc

            self.trainer = None
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


def _memory_at_failure(device: str) -> dict:
    try:
        from shardlab.run.measure import memory

        return memory(device)
    except Exception:
        return {}


def _stop(w: "Worker", why: str) -> None:
    """This rank's parents are gone (watchdog.watch_parents): say so, and end the process now."""
    try:
        w.event("error", message=f"rank {w.rank} stopped: {why}", kind="orphaned")
    finally:
        os._exit(EXIT_ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m shardlab.run.worker RUN_DIR", file=sys.stderr)
        return 2
    w = Worker(Path(argv[0]))
    from shardlab.run.watchdog import watch_parents

    watch_parents(lambda why: _stop(w, why))
    try:
        w.setup()
        w.run()
        w.finish()
        return EXIT_OK
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, then reported by exit code
        if isinstance(e, KeyboardInterrupt):
            w.event("error", message="interrupted")
            return EXIT_ERROR
        if _is_oom(e):
            w.event("oom", message=str(e).splitlines()[0][:500] if str(e) else type(e).__name__, **_memory_at_failure(w.device))
            if w.device == "cuda" and w.cfg.get("trace_memory"):
                try:
                    import torch

                    torch.cuda.memory._dump_snapshot(str(w.dir / f"memory_snapshot_rank{w.rank}.pickle"))
                except Exception:
                    pass
            return EXIT_OOM
        from shardlab.plan import PlanError

        if isinstance(e, PlanError):  # bad input: the message says what to change; no traceback
            w.event("error", message=str(e), kind="bad_input", fields=[f.field for f in e.findings])
            print(f"shardlab worker: {e}", file=sys.stderr)
            return EXIT_ERROR
        w.event("error", message=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
        traceback.print_exc()
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
