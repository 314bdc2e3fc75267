"""Which SDPA backend CUDA torch picks for the runner's attention, and what it keeps for backward.

For each shape (the recorded fp32 rows' attention, and a few neighbours), builds shardlab.run.gpt's
Attention in the model dtype on the GPU, and at its F.scaled_dot_product_attention call records
torch._fused_sdp_choice (the dispatcher's pick), the reasons can_use_{flash,efficient,cudnn}_attention
give with debug on, q/k/v strides and storage offsets, and the tensors autograd saves inside the SDPA
call (saved_tensors_hooks, one count per storage). Prints one JSON line per case. Needs a CUDA GPU;
imports only torch and shardlab/run/gpt.py (no pydantic), so it runs on a bare torch install:

    python benchmarks/sdpa_backend_probe.py [--dtype fp32] [--cpu] > out.jsonl

Not yet run on a GPU (session 11, i13b: no device time left); on the CPU (--cpu, torch 2.13) every case
picks the CPU's flash kernel, which takes fp32 and grouped-query heads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {-1: "error", 0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}

# (label, family, hidden, heads, kv_heads, T, micro-batch, ffn): the recorded fp32 rows' attention
CASES = [
    ("#806 llama24L", "llama", 1280, 10, 5, 3072, 1, 3584),
    ("#708 llama2560", "llama", 2560, 20, 4, 2048, 1, 6912),
    ("#712 llamaMQA", "llama", 1536, 24, 1, 1024, 1, 4096),
    ("#104/#105 gpt1280", "gpt", 1280, 20, 20, 1536, 1, 5120),
    ("#12-16 gpt350 mb2", "gpt", 1024, 16, 16, 2048, 2, 4096),
    ("#17/#18 gpt125 mb4", "gpt", 768, 12, 12, 2048, 4, 3072),
    ("#603 gpt896", "gpt", 896, 14, 14, 1536, 1, 3584),
    ("#303 gpt1152", "gpt", 1152, 18, 18, 1024, 1, 4608),
    # neighbours of #806: T, the group, the head count
    ("806@T1024", "llama", 1280, 10, 5, 1024, 1, 3584),
    ("806@T2048", "llama", 1280, 10, 5, 2048, 1, 3584),
    ("806@T4096", "llama", 1280, 10, 5, 4096, 1, 3584),
    ("806 kv10 (no gqa)", "llama", 1280, 10, 10, 3072, 1, 3584),
    ("806 kv2", "llama", 1280, 10, 2, 3072, 1, 3584),
    ("806 kv1", "llama", 1280, 10, 1, 3072, 1, 3584),
    ("806 mb2", "llama", 1280, 10, 5, 3072, 2, 3584),
    ("708@T3072", "llama", 2560, 20, 4, 3072, 1, 6912),
    ("712@T3072", "llama", 1536, 24, 1, 3072, 1, 4096),
    ("806 gpt-family", "gpt", 1280, 10, 10, 3072, 1, 3584),
    ("806 H20 hd64", "llama", 1280, 20, 10, 3072, 1, 3584),
]


def _runner():
    """shardlab/run/gpt.py without importing the shardlab package (its plan module needs pydantic)."""
    pkg = types.ModuleType("shardlab")
    pkg.__path__ = []
    models = types.ModuleType("shardlab.models")
    models.ModelSpec = object
    sys.modules.setdefault("shardlab", pkg)
    sys.modules.setdefault("shardlab.models", models)
    spec = importlib.util.spec_from_file_location("shardlab_run_gpt", ROOT / "shardlab/run/gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _reasons(fn, params) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = fn(params, True)
    return ["ok"] if ok else [str(w.message).split("\n")[0][:300] for w in caught]


def probe(gpt, label, family, d, heads, kv_heads, t, b, ffn, dtype, device="cuda") -> dict:
    hd = d // heads
    spec = SimpleNamespace(family=family, hidden=d, heads=heads, kv_heads=kv_heads, n_kv_heads=kv_heads,
                           head_dim=hd, kv_dim=kv_heads * hd, ffn_hidden=ffn)
    attn = gpt.Attention(spec).to(device, dtype)
    x = torch.randn(b, t, d, device=device, dtype=dtype, requires_grad=True)
    out = {"case": label, "B": b, "T": t, "heads": heads, "kv_heads": kv_heads, "head_dim": hd, "dtype": str(dtype)}
    orig = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, **kw):
        gqa = kw.get("enable_gqa", False)
        out["choice"] = BACKENDS.get(int(torch._fused_sdp_choice(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True,
                                                                   enable_gqa=gqa)), "?")
        if q.is_cuda:
            p = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, True, gqa)
            out["flash"] = _reasons(torch.backends.cuda.can_use_flash_attention, p)
            out["efficient"] = _reasons(torch.backends.cuda.can_use_efficient_attention, p)
            if hasattr(torch.backends.cuda, "can_use_cudnn_attention"):
                out["cudnn"] = _reasons(torch.backends.cuda.can_use_cudnn_attention, p)
        out["qkv"] = [{"shape": list(z.shape), "stride": list(z.stride()), "offset": z.storage_offset(),
                       "ptr_mod16": z.data_ptr() % 16} for z in (q, k, v)]
        saved, seen = [], set()

        def pack(z):
            key = (z.untyped_storage().data_ptr(), z.dtype)
            if key not in seen:
                seen.add(key)
                saved.append({"shape": list(z.shape), "dtype": str(z.dtype).replace("torch.", ""),
                              "storage_bytes": z.untyped_storage().nbytes(),
                              "is_input": any(z.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for w in (q, k, v))})
            return z

        before = torch.cuda.memory_allocated() if q.is_cuda else 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda z: z):
            y = orig(q, k, v, **kw)
        if q.is_cuda:
            out["sdpa_kept_bytes"] = torch.cuda.memory_allocated() - before - y.untyped_storage().nbytes()
        out["saved"] = saved
        out["saved_new_bytes"] = sum(s["storage_bytes"] for s in saved if not s["is_input"])
        return y

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        y = attn(x)
        y.sum().backward()
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    out["tokens"] = b * t
    out["new_bytes_per_token"] = out["saved_new_bytes"] / (b * t)
    out["heads_T_fp32_per_token"] = heads * t * 4
    del attn, x, y
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--cpu", action="store_true", help="the CPU's dispatcher instead (its own fused kernels), small T only")
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    gpt = _runner()
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                      "cudnn": torch.backends.cudnn.version()}))
    for case in CASES:
        if args.cpu:  # the same heads and head_dim at T = 256
            case = (*case[:5], 256, *case[6:])
        try:
            print(json.dumps(probe(gpt, *case, dtype, device)), flush=True)
        except Exception as e:  # noqa: BLE001 - one case failing must not hide the others
            print(json.dumps({"case": case[0], "error": repr(e)[:500]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
