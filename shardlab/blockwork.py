"""What one transformer block of a real model asks of the GPU's host and memory, counted from the model.

The step-time model (estimate/stepwork.py) prices a block by the kernels its forward launches (each
costs the host a launch), the elements its memory-bound kernels move (norms, activations, rotary,
residual adds, dropout: bound by bandwidth), and its modules and parameter tensors (the hooks FSDP and
DeepSpeed attach). For shardlab's own GPT/Llama those are known constants; a Hugging Face block or your
own differs (transformers' Llama normalises in fp32 and applies rotary embeddings in Python, GPT-2
computes its tanh GELU in eight elementwise kernels and has dropout): measured on an H200, a Hugging
Face Llama under DeepSpeed ZeRO-3 ran 49-79% slower than shardlab's Llama counts predicted
(benchmarks/results/fidelity_h200_hf.json #403, #404).

`BlockCounter` is a TorchDispatchMode that counts, while the first block's forward runs on the meta
device (describe.count_step's one-sample pass, the model in bf16 as a mixed-precision run computes),
every aten operator that launches a kernel (views, aliases and allocation-only operators launch none)
and the elements each memory-bound one reads and writes (GEMMs and attention are priced by their FLOPs
instead). With them, what the block saves for backward (torch.autograd.graph.saved_tensors_hooks, each
storage once): the activation-dtype elements and the bytes of everything else (fp32 norm statistics,
dropout masks), so activations.py prices the block as the model really holds it (transformers' GPT-2
keeps four [tokens, 4d] tensors of its tanh GELU: analytic peak 22% under on the H200 before, -0.1% with
the count, fidelity_h200_hf.json #405).
Scaled-dot-product attention is counted as the fused GPU kernel it is (one launch; saves q, k, v, its
output and a per-row fp32 log-sum-exp), not the unfused math the meta device runs.
Per token: the counts are for a one-sample batch of `seq_len` tokens.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from shardlab.estimate.activations import sdpa_call_runs_math

# operators that launch no kernel (metadata, allocation without a fill, host-side reads)
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "_unsafe_view", "detach", "alias", "lift_fresh",
              "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
              "_has_compatible_shallow_copy_type", "set_", "resize_", "_reshape_alias", "item"}
# operators priced by their FLOPs (stepwork's GEMMs and attention), not by the bytes they move
_COMPUTE = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "convolution", "_convolution",
            "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math", "_flash_attention_forward",
            "_efficient_attention_forward", "scaled_dot_product_attention"}


def launches_kernel(func) -> bool:
    """Whether an aten operator reaches a kernel: not a view, an alias or an allocation-only operator (_NO_KERNEL, named
    with or without its in-place underscore). The one rule for every count of launches (the block's forward and
    backward here, benchmarks/host_phase_probe.py on a device, the test that judges this count on the CPU)."""
    name = func.overloadpacket.__name__
    return not (func.is_view or name in _NO_KERNEL or name.rstrip("_") in _NO_KERNEL)


def _bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(y) for y in x)
    return 0


_SDPA = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def _backward_as_one_kernel(counter: "BlockCounter", out, qkv) -> None:
    """The backward of an SDPA call counted as the fused GPU kernel's one launch: the meta device runs the call's
    unfused math, and without this the backward count took in its autograd nodes (a Llama block's backward counted
    86 kernels on meta where CUDA launched about 73: H200, benchmarks/results/host_phase_h200_hf3.json). The math's
    nodes still run (FlopCounterMode counts their FLOPs); their hooks only pause the count."""
    fn = getattr(out, "grad_fn", None)
    if fn is None:
        return
    stop = {t.grad_fn for t in qkv if isinstance(t, torch.Tensor)}
    seen, todo = [], [fn]
    while todo:
        n = todo.pop()
        if n is None or n in stop or any(n is m for m in seen) or type(n).__name__ == "AccumulateGrad":
            continue
        seen.append(n)
        todo += [m for m, _ in n.next_functions]

    def pause(grad_outputs):
        counter.paused += 1

    def resume(grad_inputs, grad_outputs):
        counter.paused -= 1

    def fused(grad_outputs):
        if counter.in_backward and not counter.paused:
            counter.bwd_kernels += 1

    fn.register_prehook(fused)
    for n in seen:
        n.register_prehook(pause)
        n.register_hook(resume)


class _FusedAttention(TorchFunctionMode):
    """Scaled-dot-product attention is one fused kernel on a GPU, but on the meta device torch runs
    its unfused math (scores, softmax, T^2 elements): count the call once and nothing inside it."""

    def __init__(self, counter: "BlockCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in _SDPA:
            return func(*args, **(kwargs or {}))
        c = self.counter
        if sdpa_call_runs_math(args, kwargs):
            c.math_attention = c.math_attention or c.active
            return func(*args, **(kwargs or {}))  # CUDA runs this call unfused too: its math is counted as it runs
        inside, c.inside_attention = c.inside_attention, True
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            c.inside_attention = inside
        if c.active and not inside:
            c.kernels += 1
            kw = kwargs or {}
            qkv = list(args[:3]) + [kw[n] for n in ("query", "key", "value")[len(args[:3]):] if n in kw]
            _backward_as_one_kernel(c, out, qkv)
            q = args[0] if args else kwargs["query"]
            for t in (*args[:3], out):  # the flash kernel's backward reads q, k, v and the output
                c.save(t)
            c.saved_other += 4 * q.shape[-3] * q.shape[-2] if q.dim() >= 3 else 0  # log-sum-exp, fp32, per head and row
        return out


class BlockCounter(TorchDispatchMode):
    """Counts kernels and memory-bound elements while `active` (set by the block's forward hooks).
    Use as a context manager: it enters _FusedAttention too."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.active = False
        self.inside_attention = False
        self.kernels = 0
        self.in_backward = False  # between the gradients of the block's output and of its input (hooked)
        self.bwd_kernels = 0  # kernels of the block's backward (its own autograd nodes, as the meta device runs them)
        self.paused = 0  # inside the autograd nodes of an attention call counted as one fused kernel
        self.elements = 0
        self.dtype = dtype  # the activation dtype the model was counted in
        self._dtype_size = dtype.itemsize
        self.math_attention = False  # an attention call that CUDA runs unfused (activations.cuda_sdpa_math) ran here
        # the model's top, from the last block's output to the logits (final norm, LM head, transformers' Gemma-2 logit
        # soft-capping): bytes it saves for backward while `head` is set (hooked_head)
        self.head = False
        self.head_saved = 0
        self.saved_lowp = 0  # elements of `dtype` saved for backward
        self.saved_other = 0  # bytes of other dtypes saved (fp32 statistics, bool masks)
        self._storages: set[int] = set()
        self._refs: list = []  # weak references to the counted storages (see save)
        self._attention = _FusedAttention(self)
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def ignore(self, tensors) -> None:
        """Tensors not to count as saved activations: the parameters (the memory model has them)."""
        self._storages.update(t.untyped_storage()._cdata for t in tensors)

    def save(self, t) -> None:
        """Count a tensor autograd keeps, once per storage, for as long as it lives in the block's
        forward: a tensor saved by a graph branch that is dropped again (freed when the cyclic garbage
        collector gets to it) is taken back off, so its address, reused by a later tensor, cannot
        hide that one (keyed by address alone the count varied with PYTHONHASHSEED: transformers'
        GPT-2 block 29,696 or 33,792 elements per token, 2026-12-01)."""
        if not isinstance(t, torch.Tensor) or not (self.active or self.head) or self.inside_attention:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._storages:
            return
        self._storages.add(key)
        if self.head:  # after the last block: bytes, whatever the dtype (head_saved)
            nbytes = st.nbytes()
            self.head_saved += nbytes

            def gone_head(_, key=key, n=nbytes):
                if self.head:
                    self._storages.discard(key)
                    self.head_saved -= n

            self._refs.append(weakref.ref(st, gone_head))
            return
        lowp = t.dtype == self.dtype
        n = st.nbytes() // t.element_size() if lowp else st.nbytes()
        self._count(lowp, n)

        def gone(_, key=key, lowp=lowp, n=n):
            if self.active:  # once the block's forward is over the counts stand
                self._storages.discard(key)
                self._count(lowp, -n)

        self._refs.append(weakref.ref(st, gone))

    def _count(self, lowp: bool, n: int) -> None:
        if lowp:
            self.saved_lowp += n
        else:
            self.saved_other += n

    def _pack(self, t):
        self.save(t)
        return t

    def __enter__(self):
        self._attention.__enter__()
        self._saved.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._saved.__exit__(*exc)
            self._attention.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.in_backward and not self.paused and launches_kernel(func):
            self.bwd_kernels += 1
        if self.active and not self.inside_attention and launches_kernel(func):
            self.kernels += 1
            if func.overloadpacket.__name__.rstrip("_") not in _COMPUTE:
                moved = _bytes(args) + _bytes(list((kwargs or {}).values())) + _bytes(out)
                self.elements += moved / self._dtype_size  # in elements of the activation dtype: an fp32 pass weighs two
        return out


def _first_tensor(*xs):
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, (list, tuple)) and x:
            t = _first_tensor(*x)
            if t is not None:
                return t
        if isinstance(x, dict) and x:
            t = _first_tensor(*x.values())
            if t is not None:
                return t
    return None


def hooked(counter: BlockCounter, block):
    """Forward hooks on `block` that switch `counter` on for the block's first forward only, and gradient hooks
    that switch its backward count on from the gradient of that forward's output to the gradient of its input:
    the block's own backward (the blocks after it have run theirs; the layers before it run after)."""
    state = {"done": False}

    def backward(on: bool):
        def hook(grad):
            counter.in_backward = on
        return hook

    def pre(module, args, kwargs):
        if not state["done"]:
            counter.active = True
            x = _first_tensor(args, kwargs)
            if x is not None and x.requires_grad:
                x.register_hook(backward(False))

    def post(module, args, out):
        gc.collect()  # graph branches the block dropped, freed now: what it saved is what stays (save)
        counter.active = False
        if not state["done"]:
            y = _first_tensor(out)
            if y is not None and y.requires_grad:
                y.register_hook(backward(True))
        state["done"] = True

    return [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]


def hooked_head(counter: BlockCounter, last_block, model):
    """Forward hooks that switch `counter.head` on when `last_block` has run and off when `model` returns its logits:
    what the model's top saves for backward (activations.head_peak_bytes). Counted because models differ there:
    transformers' Gemma-2 soft-caps its logits (tanh(logits / cap) x cap), which keeps a [tokens, vocab] tensor in the
    model's dtype for backward (H200 #1103 / #1104, fidelity_h200_new6.json: -5.9% / -5.5% without it)."""

    def after_last(module, args, out):
        counter.head = True

    def done(module, args, out):
        gc.collect()
        counter.head = False

    return [last_block.register_forward_hook(after_last), model.register_forward_hook(done)]


def block_work(counter: BlockCounter, block, model, blocks: int, seq_len: int) -> dict | None:
    """The counted block, per stepwork.py's terms: kernels of one forward, elements moved per token,
    modules and parameter tensors of one block and of the rest of the model."""
    if not counter.kernels or seq_len <= 0:
        return None
    per_m = sum(1 for _ in block.modules())
    per_p = sum(1 for _ in block.parameters())
    all_m = sum(1 for _ in model.modules())
    all_p = sum(1 for _ in model.parameters())
    return {"kernels": counter.kernels, "bwd_kernels": counter.bwd_kernels, "elems_per_token": counter.elements / seq_len,
            "saved_elems_per_token": counter.saved_lowp / seq_len, "saved_other_bytes_per_token": counter.saved_other / seq_len,
            "modules": per_m, "params": per_p, "math_attention": counter.math_attention,
            "head_saved_bytes_per_token": counter.head_saved / seq_len,
            "top_modules": max(0, all_m - blocks * per_m), "top_params": max(0, all_p - blocks * per_p)}
