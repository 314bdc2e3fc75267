"""Traced memory estimate: one real training step on fake tensors, live bytes counted by category.

`traced_memory(plan, model)` builds the model under torch's `FakeTensorMode` (tensors with shapes and
dtypes but no storage, so a model too big for any machine still traces, on a CPU, in seconds), wraps
it as the runner does (`shardlab.run.wrap.wrap`, the same code a real run uses) on an in-process fake
process group of the plan's world size, and runs two optimizer steps of the plan's micro-batches:
forward, the runner's loss (fp32 cross-entropy), backward, optimizer step, zero_grad. torch's
`MemTracker` (`FSDPMemTracker` for FSDP2) follows every storage and records the peak of live bytes
and what it was made of (parameters, gradients, optimizer states, activations, temporaries).

What is traced, by framework:
- FSDP1 / FSDP2: everything (sharded parameters, gathered units, gradients, reduce buffers, optimizer
  states and the foreach AdamW temporaries a CUDA run makes).
- DeepSpeed: its engine does not run on fake tensors (it allocates flat buffers on the accelerator at
  start-up), so the model alone runs in DeepSpeed's model dtype, with activation checkpointing, and
  each gradient is dropped as soon as it is complete (DeepSpeed copies it into its reduce bucket):
  the trace gives the forward/backward working set; DeepSpeed's model states, buffers and step
  temporaries come from the analytical model (memory.py). The result's `traced` says which parts.
- FSDP with CPU offload: the same (the model alone in the compute dtype, gradients dropped as they are
  complete, as FSDP reduces and copies them to the CPU). On the fake CPU device the offloaded states
  cannot be told from the GPU's: a whole-step trace counted them all as GPU memory (a 4-layer llama,
  FSDP2 ZeRO-3 with offload: 471 MiB traced, the same as without offload, against 242 MiB analytical),
  and FSDP1's offload refuses to wrap off a GPU. Its states and gathered units stay analytical.
Reserved: replayed (below) only for a whole-step trace; the model-only traces give the analytical
allocator model's figure on their peak (allocator.py).

Differences from a CUDA run that the trace stands in for: tensors live on a fake CPU device, so the
attention kernel is the CPU's flash attention (it keeps the same tensors for backward as CUDA's flash
/ memory-efficient kernels: q, k, v, output, log-sum-exp), and the optimizer is told foreach=True as
on CUDA. A model built by transformers sees the runner's unpacked rows as on real tensors (no causal
mask, k/v at their kv heads: `_unpacked_hf_batches`). With `compile`, each unit the runner compiles is
partitioned as Inductor does (AOTAutograd's min-cut decides what is saved) and run op by op on the
fake tensors (`_compile_without_codegen`): what a compiled block keeps is traced, and only the tensors
that outlive a compiled graph's call reach the allocator replay (Inductor's fused kernels never
allocate the intermediates). Every storage the step makes and frees is also replayed through cachesim.py (torch's caching
allocator rules: 512-byte rounding, small/large pools, best-fit splitting, segment sizes) on the stream
the framework made it on (FSDP enters its unshard / all-gather / reduce-scatter streams through the
device handle, torch.cpu's here, which keeps the current stream object), so an FSDP trace also gives
the reserved bytes (`reserved`): the order and sizes of the requests decide it, not the peak alone.
What the replay cannot know: a CUDA run frees a tensor used on another stream only when that stream's
work is done (record_stream), later than the CPU's free, so FSDP1's reserved varies from run to run
(H200 #7, #25, #109: 8-14% between two runs of the same configuration).

Models: a ModelSpec (a preset or a shape; built with `shardlab.run.gpt.build_model`'s architecture),
or a dict {"module": zero-argument callable returning an nn.Module whose forward(ids [B, T]) returns
logits [B, T, vocab], "spec": a ModelSpec or shape dict giving vocab and seq_len for the batch} for
a user's or a Hugging Face model built from its config (no weights are loaded: it is built under
FakeTensorMode). `estimate(..., method="trace")` is the public entry point.
"""

from __future__ import annotations

import contextlib

from shardlab.plan import Plan, PlanError

_TRACKERS: list = []  # the LiveBytes counting now (compiled graphs report their calls to it)
TRACED_STEPS = 2  # the second step has the optimizer states present during forward (the steady state)
MAX_TRACED_MICRO = 2  # the third micro-batch of an accumulation looks like the second


def _storages(t) -> list:
    """The untyped storages behind a tensor (a DTensor's local shard, a subclass's inner tensors)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    out, todo = [], [t]
    while todo:
        x = todo.pop()
        if is_traceable_wrapper_subclass(x):
            attrs, _ = x.__tensor_flatten__()
            todo.extend(v for v in (getattr(x, a) for a in attrs) if hasattr(v, "untyped_storage"))
        elif hasattr(x, "untyped_storage"):
            out.append(x.untyped_storage())
    return out


class LiveBytes:
    """Live storage bytes by category, and their peak (what torch.cuda.max_memory_allocated sees).

    A TorchDispatchMode sees every tensor an operator returns; each new storage is counted under the
    current phase's category (forward -> activations, backward -> temporaries, step -> step) until
    it is garbage collected (a weakref callback), and storage resizes (how FSDP frees and refills
    its unsharded parameters) are followed. `label` moves known tensors (parameters, gradients,
    optimizer states) to their own category. O(1) per operator, unlike MemTracker's per-module
    bookkeeping (which took minutes for a 300M model here).
    """

    def __init__(self):
        import weakref

        from .cachesim import CachingAllocator

        self._weakref = weakref
        self.sim = CachingAllocator()  # the same storages through torch's caching allocator rules
        self.streams: dict[int, int] = {}  # id(stream object) -> 0 (the default), 1, 2, ...
        self.cat = "params"
        self.info: dict[int, list] = {}  # id(storage) -> [category, bytes, weakref]
        self.totals: dict[str, int] = {}
        self.peak, self.at_peak = 0, {}
        self.live = 0
        self.fused: dict | None = None  # inside a compiled graph: key -> (bytes, stream) not yet requested

    def _add(self, cat: str, n: int) -> None:
        self.totals[cat] = self.totals.get(cat, 0) + n
        self.live += n
        if self.live > self.peak:
            self.peak, self.at_peak = self.live, dict(self.totals)

    def track(self, t, cat: str | None = None) -> None:
        for st in _storages(t):
            key = id(st)
            got = self.info.get(key)
            if got is not None:
                if cat is not None and got[0] != cat:
                    self.totals[got[0]] -= got[1]
                    self.totals[cat] = self.totals.get(cat, 0) + got[1]
                    got[0] = cat
                continue
            n = st.nbytes()
            c = cat or self.cat

            def gone(_, key=key):
                rec = self.info.pop(key, None)
                if rec is not None:
                    self._add(rec[0], -rec[1])
                    if self.fused is None or self.fused.pop(key, None) is None:
                        self.sim.free(key)

            self.info[key] = [c, n, self._weakref.ref(st, gone)]
            self._add(c, n)
            if n and self.fused is not None:
                self.fused[key] = (n, self._stream())
            elif n:
                self.sim.alloc(key, n, self._stream())

    @contextlib.contextmanager
    def compiled_graph(self):
        """One call of a compiled graph: Inductor fuses its pointwise chains into kernels that never
        allocate their intermediates, so only the tensors that outlive the call (outputs, saved
        tensors) are requested from the allocator, in the order they were made."""
        outer, self.fused = self.fused, {}
        try:
            yield
        finally:
            done, self.fused = self.fused, outer
            for key, (n, stream) in done.items():
                self.sim.alloc(key, n, stream)

    def _stream(self) -> int:
        """The stream a CUDA run would allocate on: FSDP enters its unshard / all-gather / reduce
        streams through the device handle, which on the fake CPU device is torch.cpu's, and that one
        keeps the current stream object. Each stream has its own cached blocks in the allocator."""
        import torch

        cur = torch.cpu.current_stream()
        if not self.streams:
            self.streams[id(torch.cpu._default_cpu_stream)] = 0
        return self.streams.setdefault(id(cur), len(self.streams))

    def resized(self, st) -> None:
        rec = self.info.get(id(st))
        if rec is not None:
            n = st.nbytes()
            self._add(rec[0], n - rec[1])
            rec[1] = n
            self.sim.free(id(st))
            if n:
                self.sim.alloc(id(st), n, self._stream())

    def mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            @classmethod
            def ignore_compile_internals(cls) -> bool:
                # torch.compile runs with this mode on (dynamo skips a frame under any other mode) and
                # compiles with it off: the compiled step's own allocations are counted, not its tracing
                return True

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if hasattr(t, "untyped_storage"):
                        tracker.track(t)
                return out

        return _Mode()

    @contextlib.contextmanager
    def active(self):
        import torch

        orig = torch.UntypedStorage.resize_

        def resize_(st, size):
            r = orig(st, size)
            self.resized(st)
            return r

        torch.UntypedStorage.resize_ = resize_
        _TRACKERS.append(self)
        try:
            with self.mode():
                yield self
        finally:
            _TRACKERS.remove(self)
            torch.UntypedStorage.resize_ = orig

    def label_module(self, module, optimizer=None) -> None:
        for p in module.parameters():
            self.track(p, "params")
            if p.grad is not None:
                self.track(p.grad, "grads")
        for b in module.buffers():
            self.track(b, "params")
        for state in (optimizer.state.values() if optimizer is not None and hasattr(optimizer, "state") else ()):
            for v in state.values():
                if hasattr(v, "untyped_storage") and v.numel() > 1:
                    self.track(v, "optimizer")


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """An in-process fake process group of `world_size` ranks (this process is rank 0). init_process_group
    installs an excepthook that prefixes "[rank0]:" to every line of an uncaught traceback and
    destroy_process_group leaves it: the process's own hook is put back."""
    import sys

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    hook = sys.excepthook
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


@contextlib.contextmanager
def _real_device_meshes():
    """A DeviceMesh is built from a real rank tensor (its .tolist() cannot run on a fake one): while
    tracing, torch's init_device_mesh (which fully_shard / replicate call for their default mesh and
    wrap.py for hybrid) runs with fake mode suspended. The meshes hold rank numbers, not memory."""
    import importlib

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    saved = []
    for name in ("torch.distributed.device_mesh", "torch.distributed.tensor", "torch.distributed.fsdp._fully_shard._fsdp_init"):
        try:
            mod = importlib.import_module(name)
        except ImportError:  # pragma: no cover - other torch layouts
            continue
        orig = getattr(mod, "init_device_mesh", None)
        if orig is None:
            continue

        def real(*a, _orig=orig, **k):
            with unset_fake_temporarily():
                return _orig(*a, **k)

        saved.append((mod, orig))
        mod.init_device_mesh = real
    try:
        yield
    finally:
        for mod, orig in saved:
            mod.init_device_mesh = orig


@contextlib.contextmanager
def _fsdp1_storage_checks():
    """FSDP1's storage checks answered from the storage itself: FSDP1 reads data pointers, and a fake
    tensor's is always 0.

    - `_data_ptr_allocated(t)` (data_ptr() > 0). With SHARD_GRAD_OP (zero2) and use_orig_params the
      gathered flat parameter stays in use from forward to backward ("skipped using sharded views"),
      and the pre-backward writeback asserts it is allocated: on fake tensors it never was, so every
      FSDP1 zero2 trace at world >= 2 failed there ("If skipped using sharded views, the unsharded
      flat parameter should be allocated"). FSDP frees a flat parameter by resizing its storage to 0,
      so the storage's size answers (torch's own `_storage_size_allocated`).
    - `_same_storage(a, b)` (equal data pointers): always true on fake tensors (0 == 0); the storage
      objects' identity answers instead (no traced figure changed: memory_accuracy.py --trace fsdp1, every row).
    - `_catch_all_reshard` compares `flat_param.data_ptr()` with its local shard's, 0 == 0 here: that
      says "already resharded", which is true once a unit's post-backward hook has run, as it has for
      every unit in the traces checked. Its FakeTensor data-pointer warning is not shown to the user.
    A CUDA run has real pointers and none of this applies: the runner is not affected."""
    import warnings

    import torch.distributed.fsdp._flat_param as flat_param

    orig = flat_param._data_ptr_allocated, flat_param._same_storage

    def same_storage(a, b):
        from torch.distributed.tensor import DTensor

        a, b = (x._local_tensor if isinstance(x, DTensor) else x for x in (a, b))
        return a.untyped_storage()._cdata == b.untyped_storage()._cdata

    # not warnings.catch_warnings: entering it resets which warnings were already shown, and torch's
    # once-a-process ones (FSDP's "switching to NO_SHARD") then came again with every trace
    show = warnings.showwarning

    def quiet(message, *a, **k):
        if "Accessing the data pointer of FakeTensor" not in str(message):
            show(message, *a, **k)

    flat_param._data_ptr_allocated = lambda t: t.untyped_storage().size() > 0
    flat_param._same_storage = same_storage
    warnings.showwarning = quiet
    try:
        yield
    finally:
        flat_param._data_ptr_allocated, flat_param._same_storage = orig
        warnings.showwarning = show


@contextlib.contextmanager
def _cuda_kernels():
    """Stand-ins, for the fake CPU tensors, of CUDA kernels whose memory differs from the CPU path.

    torch.nn.RMSNorm on CUDA runs the fused `_fused_rms_norm` kernel, which keeps the input and a
    per-row rstd for backward; on the CPU it decomposes into fp32 ops that keep two fp32 copies of
    the input (12 bytes/element more per norm; measured: llama300 fsdp2 zero3 mb4 on the H200 peaks
    at 10.80 GiB, the composite-norm trace said 12.21, the fused stand-in 10.9; see docs/benchmarks.md).
    Attention with dropout runs fused on CUDA and unfused (T x T) on the CPU: the trace drops the
    dropout probability, which changes values only (see sdpa below). fp32 attention with grouped-query
    heads runs the other way round, unfused on CUDA (torch 2.11: activations.sdpa_math) and fused on
    the CPU: the trace forces the math path for it.
    """
    import torch
    import torch.nn.functional as F

    from .activations import sdpa_call_runs_math

    class FusedRMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, shape, eps):
            rstd = x.new_empty(x.shape[:-len(shape)] + (1,) * len(shape), dtype=torch.float32)
            ctx.save_for_backward(x, weight, rstd)
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, grad):
            x, weight, _ = ctx.saved_tensors
            return torch.empty_like(x), (torch.empty_like(weight) if weight is not None else None), None, None

    orig, orig_sdpa = F.rms_norm, F.scaled_dot_product_attention

    def rms_norm(x, normalized_shape, weight=None, eps=None):
        if torch.compiler.is_compiling():  # compiled: AOTAutograd's partitioner picks what is saved
            return orig(x, normalized_shape, weight, eps)
        return FusedRMSNorm.apply(x, weight, tuple(normalized_shape), eps)

    def sdpa(*args, **kwargs):
        # Attention dropout (transformers' GPT-2: attn_pdrop 0.1): CUDA's flash and memory-efficient
        # kernels draw the dropout inside the kernel from a seed and keep no mask, so a CUDA step keeps
        # what it keeps without dropout; the CPU sends any dropout_p > 0 to the math path, which keeps
        # the [B, heads, T, T] scores, their softmax and a dropout mask (#405, transformers GPT-2 mb8
        # T=1024 on the H200: traced +169% that way). Values do not matter on fake tensors.
        if len(args) > 4:
            args = (*args[:4], 0.0, *args[5:])
        elif kwargs.get("dropout_p"):
            kwargs["dropout_p"] = 0.0
        # Where CUDA runs the math path (activations.cuda_sdpa_math: fp32 with grouped-query heads, H200
        # #806) the CPU runs its own flash kernel: forced to the math path here, the same composite code
        # on either device.
        if sdpa_call_runs_math(args, kwargs) and not torch.compiler.is_compiling():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                return orig_sdpa(*args, **kwargs)
        return orig_sdpa(*args, **kwargs)

    F.rms_norm, F.scaled_dot_product_attention = rms_norm, sdpa
    try:
        yield
    finally:
        F.rms_norm, F.scaled_dot_product_attention = orig, orig_sdpa


@contextlib.contextmanager
def _unpacked_hf_batches():
    """transformers' masks as a real run makes them, for a model built by transformers (if imported).

    A Hugging Face causal LM given no attention mask looks at its position ids for packed sequences
    (masking_utils.find_packed_sequence_indices); on real tensors the runner's rows (one sequence each,
    positions 0..T-1) are found unpacked, the mask is skipped and sdpa runs with is_causal=True and
    enable_gqa (k and v kept at their kv heads). transformers takes a fake tensor for a graph trace
    (is_tracing) and keeps the packed-sequence check, so the trace built a [B, 1, T, T] mask, a
    per-layer copy of it in the activation dtype, and repeated k/v to every head (H200 #401, hf-llama
    FSDP2 mb4 T=2048: 384 + 576 MiB at the peak, traced +5.5%). The runner never packs sequences.
    """
    import sys

    mu = sys.modules.get("transformers.masking_utils")
    orig = getattr(mu, "find_packed_sequence_indices", None)
    if orig is None:
        yield
        return
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = orig


def _partitioned(gm, example_inputs):
    """A torch.compile backend: Inductor's decompositions and min-cut partitioner (what
    `aot_eager_decomp_partition` does), each forward / backward graph run op by op inside
    LiveBytes.compiled_graph."""
    import functools
    from importlib import import_module

    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    def compiler(g, inputs):
        run = boxed_nop(g, inputs)

        def call(args):
            with _TRACKERS[-1].compiled_graph() if _TRACKERS else contextlib.nullcontext():
                return run(args)

        call._boxed_call = True
        return call

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler,
                        decompositions=lambda: import_module("torch._inductor.compile_fx").select_decomp_table(),
                        partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"))(gm, example_inputs)


@contextlib.contextmanager
def _compile_without_codegen():
    """torch.compile as Inductor partitions it, without Inductor's code generation (which needs real
    storage): the runner's `compile()` calls (FSDP2 each unit, FSDP1 the wrapped model) get the
    `_partitioned` backend, Inductor's decompositions and its min-cut partitioner, so what a compiled
    block saves for backward is what AOTAutograd decides (the SiLU recomputed from SwiGLU's gate,
    RoPE's tables recomputed), while its ops run one by one on the fake tensors. Eager, the trace kept
    a compiled run's dropped tensors (H200 #39, llama300 FSDP2 compiled mb4: +6.1%). The graphs'
    intermediates still count as live bytes while they exist (the peak is between blocks), but they
    are not requested from the allocator replay: with them #115's traced reserved was -14.4%, #39's
    -3.8%; without them +0.1%, +0.2% (LiveBytes.compiled_graph)."""
    import torch

    orig = torch.compile

    def compile_(model=None, *args, backend="inductor", **kwargs):
        if backend == "inductor":
            backend, kwargs = _partitioned, {k: v for k, v in kwargs.items() if k not in ("mode", "options")}
        return orig(model, *args, backend=backend, **kwargs)

    torch._dynamo.reset()  # a model compiled by an earlier trace in this process must not be reused
    torch.compile = compile_
    try:
        yield
    finally:
        torch.compile = orig
        torch._dynamo.reset()


@contextlib.contextmanager
def _default_dtype(dtype):
    """Build parameters in `dtype` (fake tensors cannot be converted in place by module.to)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def model_only(plan: Plan) -> bool:
    """Whether the trace runs the model alone (its working set; the states stay analytical): DeepSpeed,
    and FSDP with CPU offload (see the module docstring)."""
    offload = plan.offload.params != "none" or plan.offload.optimizer != "none"
    return plan.framework == "deepspeed" or (plan.framework in ("fsdp1", "fsdp2") and offload)


def _build(model, plan: Plan):
    """(nn.Module on the fake CPU device, vocab, seq_len). Call inside FakeTensorMode: parameters
    are fake from birth (their initialisation costs nothing)."""
    from shardlab.models import ModelSpec, resolve_model

    if isinstance(model, dict) and "module" in model:
        spec = resolve_model(model["spec"])
        return model["module"](), spec.vocab, spec.seq_len  # fake parameters: no memory, no weights
    from shardlab.run.gpt import GPT

    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    if spec.is_bare:
        from shardlab.plan import bad_input

        raise bad_input("model", f"model={spec.name!r} is a bare parameter count: a traced estimate needs a shape or an nn.Module. Give a preset, a shape, or a module factory.")
    return GPT(spec), spec.vocab, spec.seq_len


def _foreach(optimizer) -> None:
    """CUDA runs default to torch's foreach optimizer kernels (one temporary per parameter list); so
    does the trace, whose fake tensors are on the CPU where torch would pick the per-tensor loop."""
    if optimizer is None or not hasattr(optimizer, "param_groups"):
        return
    for g in optimizer.param_groups:
        if "foreach" in g:
            g["foreach"] = True


def _drop_grads_as_completed(module) -> None:
    """DeepSpeed copies each finished gradient into its bucket and frees the .grad: do the same."""
    for p in module.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))


def _step_fsdp(plan: Plan, module, vocab: int, seq_len: int) -> LiveBytes:
    import torch

    from shardlab.run.gpt import loss_fn
    from shardlab.run.wrap import wrap

    live = LiveBytes()
    with live.active():
        trainer = wrap(plan, module, "cpu", loss_fn)
        # fp16's loss scaler reads a value (found_inf.item()) that fake tensors do not have; its own
        # tensors are a few scalars and it unscales the gradients in place, so the step runs without it
        trainer.scaler = None
        _foreach(trainer.optimizer)
        live.label_module(trainer.module)
        micro = min(plan.grad_accum_steps, MAX_TRACED_MICRO)
        for _ in range(TRACED_STEPS):
            for _ in range(micro):
                x = torch.randint(0, vocab, (plan.micro_batch_size, seq_len))
                live.cat = "activations"
                loss = trainer.forward(x, x)
                live.cat = "temporaries"
                trainer.backward(loss, plan.grad_accum_steps)
                del loss
                live.label_module(trainer.module)
            live.cat = "step"
            trainer.step()
            trainer.zero_grad()
            live.label_module(trainer.module, trainer.optimizer)
    return live


def _step_model_only(plan: Plan, module, vocab: int, seq_len: int) -> LiveBytes:
    """Forward/backward of the bare model (built in DeepSpeed's model dtype), grads dropped as done."""
    import torch

    from shardlab.run.gpt import loss_fn
    from shardlab.run.wrap import block_class, set_activation_checkpointing

    if plan.activation_checkpointing:
        set_activation_checkpointing(module, block_class(module, plan.wrap.transformer_layer_cls), True)
    _drop_grads_as_completed(module)
    live = LiveBytes()
    live.label_module(module)
    with live.active():
        x = torch.randint(0, vocab, (plan.micro_batch_size, seq_len))
        live.cat = "activations"
        loss = loss_fn(module(x), x)
        live.cat = "temporaries"
        loss.backward()
    return live


@contextlib.contextmanager
def _model_errors():
    """An error raised by the model's own code during the traced step is bad input about the model, not a crash:
    the message names the model's line. Two kinds: a config the model cannot run (shapes that do not match), and a
    forward that reads a tensor's value in Python (transformers' LayerDrop in OPT, XGLM, BioGPT: `if
    torch.rand([]) < self.layerdrop` in training mode; data-dependent shapes): fake tensors have shapes, no values,
    so such a model cannot be traced, while the analytical estimate (which counts the block in evaluation mode)
    still can. The line named is the innermost frame of the failing call's stack that is neither torch's nor
    shardlab's (the model's code calls torch, whose dispatch passes through shardlab's counting mode); an error with
    no such frame rose in torch's or shardlab's own code: traced_memory raises it as TraceFailed, from the error (a bug to see). Torch's fake-tensor logger, which
    writes a failing meta kernel's traceback to stderr at ERROR before the error propagates, is off meanwhile: the
    CLI printed that traceback above its own message (found in session 18, when the test ran alone)."""
    import logging

    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    from .cachesim import AddressSpaceExceeded

    log = logging.getLogger("torch._subclasses.fake_tensor")
    was, log.disabled = log.disabled, True
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError, ArithmeticError, AssertionError) as e:
        from shardlab.plan import bad_input
        from shardlab.usermodel import user_frame

        where = user_frame(e)
        if where is None:
            raise
        if isinstance(e, AddressSpaceExceeded):
            why = (f"the traced step asks for more than 256 TiB per GPU there ({e.args[0] / 2**40:,.0f} TiB of segments), "
                   "more than any GPU holds and than the allocator replay addresses. Check the sizes in the model's "
                   "settings (vocab_size, hidden_size, seq_len); the analytical estimate (leave out --trace) still gives figures.")
        elif isinstance(e, (DataDependentOutputException, DynamicOutputShapeException)):
            why = ("its forward reads a tensor's value in Python there (or makes a shape from values); a traced "
                   "estimate runs on fake tensors, which have shapes but no values. Use the analytical estimate "
                   "(method='analytic', or leave out --trace).")
        else:
            why = f"the model's forward failed there in a training step ({type(e).__name__}: {str(e)[:300]}). Fix the setting it names."
        raise bad_input("--model", f"this model cannot be traced: {where}: {why}") from None
    finally:
        log.disabled = was


class TraceFailed(RuntimeError):
    """The traced step failed in torch's or shardlab's own code, not the model's (`_model_errors` makes those bad
    input naming the model's line): a limit or a bug of the trace, not of the plan. Raised from the original
    error, whose traceback a library caller still sees; its message is the CLI's one paragraph (exit 2:
    commands/estimating.py), where an uncaught error printed the fake process group's [rank0]: traceback."""

    def __init__(self, plan: Plan, exc: BaseException):
        import traceback

        where = ""
        tb = [f for f in traceback.extract_tb(exc.__traceback__) if f.name != "_p_assert"]  # FSDP's assert helper
        if tb:
            f = tb[-1].filename.replace("\\", "/")
            for root in ("site-packages/", "/shardlab/"):
                if root in f:
                    f = ("shardlab/" if root == "/shardlab/" else "") + f.rsplit(root, 1)[1]
                    break
            where = f" in {f}, line {tb[-1].lineno}"
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        setting = f"framework={plan.framework}, sharding={plan.sharding}, world size {plan.world_size}, precision={plan.precision}"
        setting += "".join(f", {k}=true" for k in ("activation_checkpointing", "compile") if getattr(plan, k))
        super().__init__(f"--trace could not trace this plan ({setting}): its training step on fake tensors failed{where} "
                         f"({type(exc).__name__}: {first}). This is a limit of the traced estimate, not an error in the "
                         "plan. Leave out --trace for the analytical estimate of the same plan.")


def traced_memory(plan: Plan, model) -> dict:
    """Peak live bytes of one rank in a traced training step.

    Returns {"peak": bytes, "at_peak": {category: bytes}, "traced": "all" | "activations"} and, for
    "all", "reserved": the peak of the caching allocator's segments for the step's requests. For
    "activations" (DeepSpeed, FSDP with CPU offload: model_only) `peak` is the forward/backward working
    set on top of the model's own parameters (activations, temporaries, gradients in flight).
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    # low_memory_init decides where the weights are first made (run/build.py), not what a step holds;
    # its meta-device build and rank-0 broadcast cannot run on fake tensors (FSDP1 refuses it off a GPU)
    plan = plan.model_copy(update={"low_memory_init": False})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[plan.precision]
    ds = model_only(plan)  # DeepSpeed holds the model itself in its dtype; FSDP offload computes in it
    compiled = _compile_without_codegen() if plan.compile else contextlib.nullcontext()
    try:
        with fake_process_group(plan.world_size), _real_device_meshes(), _fsdp1_storage_checks(), _cuda_kernels(), compiled, FakeTensorMode(allow_non_fake_inputs=True):
            with _default_dtype(dtype if ds else torch.float32):
                module, vocab, seq_len = _build(model, plan)
            with _unpacked_hf_batches(), _model_errors():  # after the build: transformers' modules are imported by then
                live = _step_model_only(plan, module, vocab, seq_len) if ds else _step_fsdp(plan, module, vocab, seq_len)
    except PlanError:
        raise
    except Exception as e:  # whatever torch or shardlab raised: see TraceFailed
        raise TraceFailed(plan, e) from e
    cats = {k: v for k, v in live.at_peak.items() if v}
    if ds:
        params = cats.pop("params", 0)
        return {"peak": live.peak - params, "at_peak": {"params": params, **cats}, "traced": "activations"}
    return {"peak": live.peak, "at_peak": cats, "traced": "all", "reserved": live.sim.peak_reserved}
