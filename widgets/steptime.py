"""The predicted step's breakdown as a stacked bar: compute, exposed communication, host overhead, offload.

Numbers come from `estimate(...).to_dict()["step_breakdown"]` (shardlab/estimate/steptime.py); this
file only draws them, in the style of the memory bar (memory.py), with the GPU's work split into
matmul, attention, memory-bound kernels and the optimizer in the tooltip, and says whether the
estimate used a calibration of this GPU.
"""

from __future__ import annotations

import html
from typing import Any

PARTS = (
    ("compute", "#4c78a8", "GPU work: matmuls, attention, memory-bound kernels, optimizer"),
    ("host_overhead", "#e45756", "host time not hidden behind the GPU (launches, framework hooks)"),
    ("exposed_comm", "#f58518", "communication not overlapped with compute"),
    ("offload", "#54a24b", "PCIe traffic and the CPU optimizer"),
)


def step_bar_html(est: dict[str, Any]) -> str:
    """A stacked bar of the predicted step (ms) and its legend; '' when there is nothing to draw."""
    br = est.get("step_breakdown") or (est.get("time") or {}).get("breakdown")
    total = est.get("step_time_s")
    if "error" in est or not br or not total:
        return ""
    detail = (est.get("time") or {}).get("detail") or {}
    tip = ", ".join(f"{k[:-2].replace('_', ' ')} {v * 1e3:.1f} ms" for k, v in detail.items()
                    if k.endswith("_s") and k != "host_s" and isinstance(v, (int, float)))
    segs, legend = [], []
    for key, color, what in PARTS:
        v = float(br.get(key) or 0.0)
        if v <= 0:
            continue
        title = f"{key.replace('_', ' ')}: {v * 1e3:.1f} ms ({what})" + (f"; {tip}" if key == "compute" and tip else "")
        segs.append(f'<div title="{html.escape(title)}" style="width:{100 * v / total:.3f}%;background:{color}"></div>')
        legend.append(f'<span style="white-space:nowrap"><span style="display:inline-block;width:10px;height:10px;background:{color}"></span> '
                      f"{key.replace('_', ' ')} {v * 1e3:.1f}</span>")
    cal = est.get("calibrated")
    note = ("calibrated on this GPU" if cal else "uncalibrated: data sheet and default efficiencies (run `shardlab calibrate` on the GPU)")
    return (
        f'<div class="sl-step-bar" style="display:flex;height:14px;border:1px solid #999;background:#f3f3f3;margin-top:6px">{"".join(segs)}</div>'
        f'<div style="font-size:12px;margin-top:3px;display:flex;flex-wrap:wrap;gap:10px">{"".join(legend)} <span>(ms per step)</span></div>'
        f'<div class="sl-step-calibration" style="font-size:11px;color:#555">{html.escape(note)}</div>'
    )
