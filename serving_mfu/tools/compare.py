"""Estimator comparison: FLOPs per token by serving-mfu and by the estimators people use.

For each public model config (`serving_mfu.tools.public_configs`, numbers written into the project)
and each slice point (`q` new tokens at KV context `c`), `compare_estimators` gives the FLOPs
of one forward pass over that slice by

- **ours**: `FlopModel(spec).slice_breakdown(q, c, 1)` (causal, context-aware, DESIGN §3);
- **2N**: `estimators.six_nd_flops` (the "2N per token" rule, inference half of 6ND);
- **s²**: `estimators.s2_attention_flops` (2N plus the textbook `4·L·d·q·c` attention);
- **vLLM**: `estimators.vllm_perf_flops` (vLLM's own `perf.py` estimator, where vLLM imports),

each as FLOPs per new token, with its relative error against ours, `(theirs − ours) / ours`.

`oracle_check` checks ours against `torch.utils.flop_counter.FlopCounterMode` on a
scaled-down copy of each public shape (`scaled_down_config`: same architecture and
structure — GQA ratio, MoE top-k/E ratio, shared experts, dense-first layers, MLA ranks — with
small widths so the Hugging Face model instantiates and runs on a CPU in well under a second).
It splits the counted FLOPs by aten op (weight matmuls are `mm`/`addmm`, eager attention's
4-D matmuls are `bmm`) and by module (the `lm_head`, MLA's `kv_b_proj`), independently of
`serving_mfu.cost.flops`.  Expected, as in `tests/test_flops_oracle.py`:

- prefill (a `s`-token prompt, `logits_to_keep=1`): weight matmuls and the LM head exactly
  equal; attention scores: the eager kernel computes the full `s×s` square, ours counts the
  causal `s(s+1)/2` pairs, so `oracle·(s+1) == ours·2s`, as integers;
- decode (one token on the prefill's KV cache, context `s+1`): everything exactly equal,
  except MLA's `kv_b_proj`, which transformers re-runs over all `c` cached latents every
  step (oracle = ours × c for that projection; a serving engine caches the decompressed K/V
  or absorbs the projection, at ours' per-token cost).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

from pydantic import BaseModel, Field

from serving_mfu.cost.flops import ATTENTION_SCORES, LM_HEAD, FlopModel
from serving_mfu.format import giga as _g
from serving_mfu.format import signed_pct as _err
from serving_mfu.model.spec import ModelSpec
from serving_mfu.tools.estimators import s2_attention_flops, six_nd_flops, vllm_perf_flops
from serving_mfu.tools.public_configs import PUBLIC_CONFIGS
from serving_mfu.tools.tiny_models import build_hf_model

#: (new tokens, context) points of the default comparison.
DEFAULT_POINTS: tuple[tuple[int, int], ...] = ((4096, 4096), (1, 4096), (1, 32768))
#: Estimator keys (besides "ours") and how tables name them.
ESTIMATORS: dict[str, str] = {
    "2n": "2N per token",
    "s2": "2N + s² attention",
    "vllm": "vLLM perf.py",
}
#: Short column names for the terminal table.
SHORT_NAMES: dict[str, str] = {"2n": "2N", "s2": "s² attn", "vllm": "vLLM"}
ORACLE_PROMPT_LEN = 13

LINEAR_OPS = frozenset({"aten.mm", "aten.addmm"})
ATTENTION_OPS = frozenset({
    "aten.bmm", "aten.baddbmm",
    "aten._scaled_dot_product_attention_math",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
})


# ------------------------------------------------------------------------------- models
class Estimate(BaseModel):
    """One estimator's FLOPs for one slice; None where the estimator is unavailable."""

    flops: int | None
    flops_per_token: float | None
    rel_error: float | None = Field(description="(estimate − ours) / ours")


class ComparisonRow(BaseModel):
    """One model at one (new tokens, context) point."""

    model: str
    kind: str = Field(description="prefill (q == c), decode (q == 1) or chunk")
    new_tokens: int
    context_len: int
    logits_tokens: int = 1
    ours: int
    ours_per_token: float
    estimates: dict[str, Estimate]


class OracleTerm(BaseModel):
    """One part of a forward pass: FlopCounterMode's count, ours, and the relation checked."""

    oracle: int
    ours: int
    relation: str
    match: bool


class OracleCheck(BaseModel):
    """Ours against FlopCounterMode on a scaled-down copy of one public shape."""

    model: str
    shape: dict[str, Any] = Field(description="the scaled-down config's structural fields")
    prompt_len: int
    prefill_linear: OracleTerm
    prefill_lm_head: OracleTerm
    prefill_attention: OracleTerm
    decode_linear: OracleTerm
    decode_lm_head: OracleTerm
    decode_attention: OracleTerm
    prefill_match: bool
    decode_match: bool
    unexplained_flops: dict[str, int] = Field(default_factory=dict,
                                              description="FLOPs in ops that are neither weight matmuls nor attention")
    note: str | None = None
    seconds: float


class Comparison(BaseModel):
    points: list[tuple[int, int]]
    vllm_available: bool
    rows: list[ComparisonRow]
    oracle: list[OracleCheck] | None = None
    oracle_skipped: str | None = None
    oracle_elsewhere: dict[str, str] = Field(
        default_factory=dict, description="models whose attention the scaled-down square relation cannot check, "
                                          "and where their formula is held to FlopCounterMode instead")


# ------------------------------------------------------------------------------- estimates
def point_kind(q: int, c: int) -> str:
    return "prefill" if q == c else ("decode" if q == 1 else "chunk")


def rel_error(estimate: float | None, ours: float) -> float | None:
    """(estimate − ours) / ours, None when there is no estimate (or no reference)."""
    if estimate is None or not ours:
        return None
    return (estimate - ours) / ours


def parse_points(text: str) -> list[tuple[int, int]]:
    """`"4096:4096,1:4096"` -> [(4096, 4096), (1, 4096)]; q >= 1 and c >= q."""
    points = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            q_s, c_s = item.split(":")
            q, c = int(q_s), int(c_s)
        except ValueError:
            raise ValueError(f"bad point {item!r}: expected NEW_TOKENS:CONTEXT, e.g. 1:4096") from None
        if q < 1 or c < q:
            raise ValueError(f"bad point {item!r}: need new tokens >= 1 and context >= new tokens")
        points.append((q, c))
    if not points:
        raise ValueError("no points given")
    return points


def resolve_models(names: str | Sequence[str] | None) -> list[str]:
    """Public config names (comma-separated or a list); all of them by default."""
    if names is None:
        return list(PUBLIC_CONFIGS)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in PUBLIC_CONFIGS]
    if unknown:
        raise ValueError(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(PUBLIC_CONFIGS)}")
    return list(names)


def quiet_vllm_logs(level: int = logging.ERROR) -> None:
    """Keep vLLM's import-time platform notices (Triton, SSM cache dtype) out of tables and notebooks."""
    logging.getLogger("vllm").setLevel(level)
    warnings.filterwarnings("ignore", message="IProgress not found")


def _vllm_importable() -> bool:
    try:
        import vllm.v1.metrics.perf  # noqa: F401
    except Exception:
        return False
    return True


def compare_model(name: str, points: Iterable[tuple[int, int]], *, use_vllm: bool = True) -> list[ComparisonRow]:
    """Rows for one public config over `points`."""

    cfg = PUBLIC_CONFIGS[name]
    fm = FlopModel(ModelSpec.from_hf_config(cfg))
    rows = []
    for q, c in points:
        ours = sum(fm.slice_breakdown(q, c, 1).values())
        others = {
            "2n": six_nd_flops(cfg, q, c, 1),
            "s2": s2_attention_flops(cfg, q, c, 1),
            "vllm": vllm_perf_flops(cfg, q, c, 1) if use_vllm else None,
        }
        estimates = {
            key: Estimate(flops=v, flops_per_token=None if v is None else v / q, rel_error=rel_error(v, ours))
            for key, v in others.items()
        }
        rows.append(ComparisonRow(model=name, kind=point_kind(q, c), new_tokens=q, context_len=c, ours=ours,
                                  ours_per_token=ours / q, estimates=estimates))
    return rows


def compare_estimators(
    models: str | Sequence[str] | None = None,
    points: Sequence[tuple[int, int]] = DEFAULT_POINTS,
    *,
    oracle: bool = True,
    use_vllm: bool = True,
    prompt_len: int = ORACLE_PROMPT_LEN,
) -> Comparison:
    """The whole comparison: estimator rows for every model and point, and the oracle checks."""
    names = resolve_models(models)
    if prompt_len < 2:
        raise ValueError(f"the oracle's prompt needs at least 2 tokens, got {prompt_len}")
    vllm_ok = use_vllm and _vllm_importable()
    rows = [row for name in names for row in compare_model(name, points, use_vllm=vllm_ok)]
    elsewhere = {name: why for name in names if (why := oracle_elsewhere(PUBLIC_CONFIGS[name]))}
    checks, skipped = None, None
    if oracle:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except Exception as exc:  # pragma: no cover - torch/transformers are dev dependencies
            skipped = f"torch/transformers not importable: {exc}"
        else:
            checks = [oracle_check(name, prompt_len) for name in names if name not in elsewhere]
    return Comparison(points=[tuple(p) for p in points], vllm_available=vllm_ok, rows=rows, oracle=checks,
                      oracle_skipped=skipped, oracle_elsewhere=elsewhere)


def oracle_elsewhere(config: Mapping[str, Any]) -> str | None:
    """Why the scaled-down oracle does not apply to a config (None where it does): layers whose keys are
    not full or windowed, or that are linear-attention / state-space mixers, need their own oracle
    (tests/test_families.py holds those formulas to FlopCounterMode on tiny copies of their configs)."""
    spec = ModelSpec.from_hf_config(config)
    kinds = set()
    for layer in spec.layers:
        a = layer.attention
        if layer.mixer is not None or not a.num_heads:
            kinds.add("linear attention / SSM")
        if a.chunk_size:
            kinds.add("chunked attention")
        if a.top_k_keys:
            kinds.add("top-k sparse attention")
    if not kinds:
        return None
    return f"{', '.join(sorted(kinds))}: held to FlopCounterMode in tests/test_families.py"


# ------------------------------------------------------------------------------- scaled-down shapes
def _round_up(x: float, multiple: int = 8, minimum: int = 16) -> int:
    return max(minimum, int(math.ceil(x / multiple)) * multiple)


def scaled_down_config(config: Mapping[str, Any], *, width_div: int = 64, head_div: int = 8,
                       max_top_k: int = 2, vocab: int = 512) -> dict[str, Any]:
    """A small copy of a public config with the same architecture and structure.

    Kept: `model_type`, the GQA ratio (heads / KV heads; MLA keeps KV heads = heads), whether
    `head_dim` is explicit or `hidden / heads`, MoE's top-k / experts ratio (top-k capped at
    `max_top_k`, experts scaled with it), shared experts, dense-first layers
    (`first_k_dense_replace` -> 1), `decoder_sparse_step`, MLA's q/kv LoRA ranks and its
    nope/rope/v head-dim proportions, tied embeddings, and the ratios of the MLP widths to the
    hidden size.  Widths are divided by `width_div`, head dims by `head_div`; 2 MoE/dense
    layers (plus one dense-first layer where the config has them); float32 for the CPU.
    """
    src = dict(config)
    cfg: dict[str, Any] = {k: v for k, v in src.items() if k not in ("torch_dtype", "dtype")}
    cfg["torch_dtype"] = "float32"
    heads = int(src["num_attention_heads"])
    kv = int(src.get("num_key_value_heads") or heads)
    group = heads // kv
    mla = bool(src.get("kv_lora_rank"))
    kv_small = min(kv, 2 if group > 1 else 4)
    heads_small = kv_small * group
    hidden = int(src["hidden_size"])
    hidden_small = _round_up(hidden / width_div)
    if mla:
        for key in ("q_lora_rank", "kv_lora_rank"):
            if src.get(key):
                cfg[key] = _round_up(src[key] / width_div, 8, 8)
        for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            cfg[key] = _round_up(src[key] / head_div, 2, 4)
    elif src.get("head_dim"):
        cfg["head_dim"] = _round_up(int(src["head_dim"]) / head_div, 8, 8)
    else:  # head_dim = hidden / heads: keep it implicit, make hidden divisible
        hidden_small = heads_small * max(8, _round_up(hidden / heads / head_div, 8, 8))
    scale = hidden_small / hidden
    cfg.update(hidden_size=hidden_small, num_attention_heads=heads_small, num_key_value_heads=kv_small,
               vocab_size=vocab)
    if src.get("intermediate_size"):
        cfg["intermediate_size"] = _round_up(src["intermediate_size"] * scale)
    if src.get("moe_intermediate_size"):
        cfg["moe_intermediate_size"] = _round_up(src["moe_intermediate_size"] * scale, 8, 8)
    expert_key = next((k for k in ("num_experts", "num_local_experts", "n_routed_experts") if src.get(k)), None)
    dense_first = int(src.get("first_k_dense_replace") or 0)
    layers = 2
    if expert_key:
        k = int(src["num_experts_per_tok"])
        k_small = min(k, max_top_k)
        cfg["num_experts_per_tok"] = k_small
        cfg[expert_key] = max(k_small + 1, int(src[expert_key]) * k_small // k)
        if dense_first:
            cfg["first_k_dense_replace"] = 1
            layers += 1
        if src.get("mlp_only_layers"):
            cfg["mlp_only_layers"] = [i for i in src["mlp_only_layers"] if i < layers]
        if src.get("n_group") or src.get("n_routed_experts"):  # DeepSeek group-limited routing
            groups = int(src.get("n_group") or 8)
            while cfg[expert_key] % groups or cfg[expert_key] // groups < 2:
                groups //= 2
            cfg["n_group"] = max(groups, 1)
            cfg["topk_group"] = max(1, min(int(src.get("topk_group") or 4), cfg["n_group"]))
    cfg["num_hidden_layers"] = layers
    if mla:
        cfg.setdefault("rope_interleave", True)
    return cfg


def _shape_summary(cfg: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts",
            "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace",
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def shape_label(shape: Mapping[str, Any]) -> str:
    """A short description of a scaled-down shape for tables."""
    parts = [f"d={shape['hidden_size']}", f"L={shape['num_hidden_layers']}",
             f"H={shape['num_attention_heads']}/{shape.get('num_key_value_heads', shape['num_attention_heads'])}"]
    experts = shape.get("num_experts") or shape.get("num_local_experts") or shape.get("n_routed_experts")
    if experts:
        parts.append(f"top-{shape['num_experts_per_tok']}/{experts}")
    if shape.get("n_shared_experts"):
        parts.append(f"{shape['n_shared_experts']} shared")
    if shape.get("first_k_dense_replace"):
        parts.append(f"{shape['first_k_dense_replace']} dense first")
    if shape.get("kv_lora_rank"):
        parts.append(f"MLA q/kv rank {shape.get('q_lora_rank')}/{shape['kv_lora_rank']}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------- oracle
class _Counted(BaseModel):
    linear: int
    lm_head: int
    attention: int
    kv_b_proj: int
    other: dict[str, int]


def _count(model: Any, **inputs: Any) -> tuple[_Counted, Any]:
    """Run `model(**inputs)` under FlopCounterMode; split its FLOPs by aten op and by module."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = model(**inputs)
    counts = counter.get_flop_counts()
    glob = {str(op): int(n) for op, n in counts.get("Global", {}).items() if n}
    root = type(model).__name__
    lm_head = sum(int(n) for n in counts.get(f"{root}.lm_head", {}).values())
    kv_b = sum(int(n) for name, ops in counts.items() if name.endswith(".self_attn.kv_b_proj")
               for n in ops.values())
    linear = sum(n for op, n in glob.items() if op in LINEAR_OPS) - lm_head
    attention = sum(n for op, n in glob.items() if op in ATTENTION_OPS)
    other = {op: n for op, n in glob.items() if op not in LINEAR_OPS | ATTENTION_OPS}
    return _Counted(linear=linear, lm_head=lm_head, attention=attention, kv_b_proj=kv_b, other=other), out


def _split_ours(breakdown: Mapping[str, int]) -> tuple[int, int, int]:
    """(weight matmuls without the LM head, LM head, attention scores) of a slice breakdown."""
    linear = sum(v for k, v in breakdown.items() if k not in (ATTENTION_SCORES, LM_HEAD))
    return linear, breakdown.get(LM_HEAD, 0), breakdown.get(ATTENTION_SCORES, 0)


def _exact(oracle: int, ours: int) -> OracleTerm:
    return OracleTerm(oracle=oracle, ours=ours, relation="oracle == ours", match=oracle == ours)


def oracle_check(name: str, prompt_len: int = ORACLE_PROMPT_LEN, seed: int = 0,
                 config: Mapping[str, Any] | None = None) -> OracleCheck:
    """Check ours against FlopCounterMode on the scaled-down copy of public config `name`.

    A prefill of `prompt_len` random tokens (`logits_to_keep=1`, as a server computes one
    logit row) and one decode step on the KV cache it left (context `prompt_len + 1`).
    `config` overrides the scaled-down config (tests use it).
    """
    import torch

    t0 = time.perf_counter()
    cfg = dict(config) if config is not None else scaled_down_config(PUBLIC_CONFIGS[name])
    model = build_hf_model(cfg, seed=seed)
    fm = FlopModel(ModelSpec.from_hf_config(cfg))
    s = int(prompt_len)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, int(cfg["vocab_size"]), (1, s), generator=gen)
    pre, out = _count(model, input_ids=ids, logits_to_keep=1, use_cache=True)
    next_id = out.logits[:, -1:].argmax(-1)
    dec, _ = _count(model, input_ids=next_id, past_key_values=out.past_key_values, use_cache=True,
                    logits_to_keep=1)

    ours_p = fm.slice_breakdown(s, s, 1)
    ours_d = fm.slice_breakdown(1, s + 1, 1)
    lin_p, lm_p, att_p = _split_ours(ours_p)
    lin_d, lm_d, att_d = _split_ours(ours_d)
    prefill_attention = OracleTerm(oracle=pre.attention, ours=att_p, relation="oracle·(s+1) == ours·2s",
                                   match=pre.attention * (s + 1) == att_p * 2 * s)
    note = None
    c = s + 1
    kv_b_ours = ours_d.get("kv_b_proj", 0)
    if kv_b_ours and dec.kv_b_proj == kv_b_ours * c and dec.kv_b_proj != kv_b_ours:
        # transformers' MLA caches the compressed latent and re-runs kv_b_proj over all c positions
        decode_linear = OracleTerm(oracle=dec.linear, ours=lin_d, relation="oracle == ours + (c−1)·kv_b_proj",
                                   match=dec.linear == lin_d + (c - 1) * kv_b_ours)
        note = (f"MLA decode: transformers re-runs kv_b_proj over all c={c} cached latents each step "
                f"(oracle kv_b_proj = ours × c); every other term is exact")
    else:
        decode_linear = _exact(dec.linear, lin_d)
    check = OracleCheck(
        model=name, shape=_shape_summary(cfg), prompt_len=s,
        prefill_linear=_exact(pre.linear, lin_p), prefill_lm_head=_exact(pre.lm_head, lm_p),
        prefill_attention=prefill_attention,
        decode_linear=decode_linear, decode_lm_head=_exact(dec.lm_head, lm_d),
        decode_attention=_exact(dec.attention, att_d),
        prefill_match=False, decode_match=False,
        unexplained_flops={op: pre.other.get(op, 0) + dec.other.get(op, 0) for op in {*pre.other, *dec.other}},
        note=note, seconds=time.perf_counter() - t0,
    )
    check.prefill_match = (check.prefill_linear.match and check.prefill_lm_head.match
                           and check.prefill_attention.match and not pre.other)
    check.decode_match = (check.decode_linear.match and check.decode_lm_head.match
                          and check.decode_attention.match and not dec.other)
    return check


# ------------------------------------------------------------------------------- rendering
def point_label(q: int, c: int) -> str:
    kind = point_kind(q, c)
    return f"{kind} {q}@{c}" if kind != "decode" else f"decode @{c}"


def _yes(ok: bool, starred: bool = False) -> str:
    return ("yes" + ("¹" if starred else "")) if ok else "**NO**"


def estimates_markdown(cmp: Comparison) -> str:
    """The estimator table in markdown (GFLOP per new token; error against ours)."""
    head = "| model | slice | serving-mfu | " + " | ".join(f"{v} | err" for v in ESTIMATORS.values()) + " |"
    lines = [head, "|---|---|---:|" + "---:|---:|" * len(ESTIMATORS)]
    for r in cmp.rows:
        cells = [f"{_g(r.estimates[k].flops_per_token)} | {_err(r.estimates[k].rel_error)}" for k in ESTIMATORS]
        lines.append(f"| {r.model} | {point_label(r.new_tokens, r.context_len)} | {_g(r.ours_per_token)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def oracle_markdown(cmp: Comparison) -> str:
    """The oracle table in markdown: does ours equal FlopCounterMode on the scaled-down shapes?"""
    if not cmp.oracle:
        return f"(oracle check skipped: {cmp.oracle_skipped or 'not requested'})"
    lines = ["| model | scaled-down shape | prefill linear + LM head | prefill attention (causal) | decode |",
             "|---|---|---|---|---|"]
    notes = []
    for o in cmp.oracle:
        starred = o.note is not None
        if starred:
            notes.append(o.note)
        lines.append(f"| {o.model} | {shape_label(o.shape)} | "
                     f"{_yes(o.prefill_linear.match and o.prefill_lm_head.match)} | "
                     f"{_yes(o.prefill_attention.match)} | {_yes(o.decode_match, starred)} |")
    if notes:
        lines.append("")
        lines.append("¹ " + notes[0] + ".")
    if cmp.oracle_elsewhere:
        lines.append("")
        lines.extend(f"{name}: {why}." for name, why in cmp.oracle_elsewhere.items())
    return "\n".join(lines)


def comparison_markdown(cmp: Comparison) -> str:
    """Both tables, as docs/estimators.md carries them."""
    s = cmp.oracle[0].prompt_len if cmp.oracle else ORACLE_PROMPT_LEN
    text = ("GFLOP per new token of one forward pass (`serving-mfu compare-estimators`; prefill is a whole "
            "prompt, decode one token at that context; err = (estimate − ours) / ours):\n\n" + estimates_markdown(cmp))
    if cmp.oracle is not None or cmp.oracle_skipped:
        text += (f"\n\nOurs against `FlopCounterMode` on a scaled-down copy of each shape (a {s}-token prefill "
                 f"with `logits_to_keep=1`, then one decode step; prefill attention: the eager kernel computes "
                 f"the s² square, so oracle·(s+1) = ours·2s):\n\n" + oracle_markdown(cmp))
    return text


def print_comparison(cmp: Comparison, console: Any) -> None:
    """Rich tables of the comparison (the CLI's default output)."""
    from rich.table import Table

    t = Table(title="FLOPs per new token (GFLOP), error against serving-mfu"
                    + ("" if cmp.vllm_available else " — vLLM not importable"))
    t.add_column("model")
    t.add_column("slice")
    t.add_column("ours", justify="right")
    for key in ESTIMATORS:
        t.add_column(SHORT_NAMES[key], justify="right")
        t.add_column("err", justify="right")
    prev = None
    for r in cmp.rows:
        cells = []
        for k in ESTIMATORS:
            e = r.estimates[k]
            cells += [_g(e.flops_per_token), _err(e.rel_error)]
        t.add_row(r.model if r.model != prev else "", point_label(r.new_tokens, r.context_len),
                  _g(r.ours_per_token), *cells, end_section=False)
        prev = r.model
    console.print(t)
    if cmp.oracle is None:
        if cmp.oracle_skipped:
            console.print(f"[yellow]oracle check skipped: {cmp.oracle_skipped}[/yellow]")
        return
    o_t = Table(title="serving-mfu against FlopCounterMode on scaled-down shapes "
                      f"(prefill of {cmp.oracle[0].prompt_len if cmp.oracle else '?'} tokens, then one decode step)")
    for col in ("model", "scaled-down shape", "prefill linear + LM head", "prefill attention (causal)", "decode",
                "seconds"):
        o_t.add_column(col, justify="right" if col == "seconds" else "left")
    notes = []
    for o in cmp.oracle:
        if o.note:
            notes.append(o.note)
        fmt = lambda ok, star=False: ("[green]yes" + ("¹" if star else "") + "[/green]") if ok else "[red]NO[/red]"  # noqa: E731
        o_t.add_row(o.model, shape_label(o.shape), fmt(o.prefill_linear.match and o.prefill_lm_head.match),
                    fmt(o.prefill_attention.match), fmt(o.decode_match, o.note is not None), f"{o.seconds:.2f}")
    console.print(o_t)
    for n in notes:
        console.print(f"¹ {n}")
    for name, why in cmp.oracle_elsewhere.items():
        console.print(f"{name}: {why}")
