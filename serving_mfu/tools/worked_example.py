"""The docs' worked example (docs/estimators.md): Llama-3-70B at a 4k context, by component, and other estimators.

`serving-mfu example` prints it; a test checks that docs/estimators.md carries exactly this output,
so the documentation cannot drift from the code.
"""

from __future__ import annotations

from serving_mfu.cost.flops import FlopModel
from serving_mfu.format import giga as _g
from serving_mfu.format import signed_pct
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.table import lookup_peak
from serving_mfu.tools.estimators import s2_attention_flops, six_nd_flops, vllm_perf_flops
from serving_mfu.tools.public_configs import PUBLIC_CONFIGS

MODEL = "llama-3-70b"
CONTEXT = 4096


def _err(x: float | None, ref: float) -> str:
    return signed_pct(None if x is None else (x - ref) / ref)


def component_table() -> str:
    """Per-token GFLOPs by component: prefill of a 4096-token prompt (average) and decode at 4096."""
    fm = FlopModel(ModelSpec.from_hf_config(PUBLIC_CONFIGS[MODEL]))
    pre = fm.slice_breakdown(CONTEXT, CONTEXT, 1)
    dec = fm.slice_breakdown(1, CONTEXT, 1)
    lines = ["| component | prefill GFLOP/token | decode GFLOP/token |", "|---|---:|---:|"]
    for name in pre:
        lines.append(f"| `{name}` | {_g(pre[name] / CONTEXT)} | {_g(dec[name])} |")
    tp, td = sum(pre.values()) / CONTEXT, sum(dec.values())
    lines.append(f"| **total** | **{_g(tp)}** | **{_g(td)}** |")
    peak = lookup_peak("h100-sxm", "bf16")
    lines.append("")
    lines.append(
        f"On one H100 SXM ({peak.flops_per_s / 1e12:,.1f} TFLOP/s dense BF16), 100% MFU would be "
        f"{peak.flops_per_s / tp:,.0f} prefill tokens/s or {peak.flops_per_s / td:,.0f} decode tokens/s "
        "at this context."
    )
    return "\n".join(lines)


def estimator_table() -> str:
    """Other estimators' FLOPs per token for the same two slices, and their error against ours."""

    cfg = PUBLIC_CONFIGS[MODEL]
    fm = FlopModel(ModelSpec.from_hf_config(cfg))
    ours_p = sum(fm.slice_breakdown(CONTEXT, CONTEXT, 1).values())
    ours_d = sum(fm.slice_breakdown(1, CONTEXT, 1).values())
    rows = [
        ("serving-mfu (exact, causal)", ours_p, ours_d),
        ("2N per token (\"6ND\" for inference)", six_nd_flops(cfg, CONTEXT, CONTEXT, 1),
         six_nd_flops(cfg, 1, CONTEXT, 1)),
        ("2N + textbook s² attention", s2_attention_flops(cfg, CONTEXT, CONTEXT, 1),
         s2_attention_flops(cfg, 1, CONTEXT, 1)),
        ("vLLM `perf.py` estimator", vllm_perf_flops(cfg, CONTEXT, CONTEXT, 1),
         vllm_perf_flops(cfg, 1, CONTEXT, 1)),
    ]
    lines = ["| estimator | prefill GFLOP/token | error | decode GFLOP/token | error |",
             "|---|---:|---:|---:|---:|"]
    for name, p, d in rows:
        ps = "n/a" if p is None else _g(p / CONTEXT)
        ds = "n/a" if d is None else _g(d)
        lines.append(f"| {name} | {ps} | {_err(p, ours_p)} | {ds} | {_err(d, ours_d)} |")
    return "\n".join(lines)


def worked_example_markdown() -> str:
    return component_table() + "\n\n" + estimator_table()
