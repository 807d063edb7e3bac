"""The estimator comparison (serving_mfu/tools/compare.py, `serving-mfu compare-estimators`).

- ours in the comparison is exactly `FlopModel.slice_breakdown`'s total;
- the other estimators' numbers are the estimator functions' own, and every relative error
  is recomputed here from the numbers;
- ours equals FlopCounterMode on the scaled-down copies of the public shapes (the oracle of
  tests/flop_oracle.py agrees with compare.py's own, term by term);
- the scaled-down copies keep the structure of the shapes they copy;
- the CLI's --json and --markdown run, and bad input exits 2.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from serving_mfu.cost.flops import ATTENTION_SCORES, LM_HEAD, FlopModel
from serving_mfu.model.spec import ModelSpec
from serving_mfu.tools.compare import (
    DEFAULT_POINTS,
    ESTIMATORS,
    Comparison,
    compare_estimators,
    comparison_markdown,
    oracle_check,
    oracle_elsewhere,
    parse_points,
    rel_error,
    scaled_down_config,
)
from serving_mfu.tools.estimators import s2_attention_flops, six_nd_flops, vllm_perf_flops
from serving_mfu.tools.public_configs import PUBLIC_CONFIGS

EXE = str(Path(sys.executable).with_name("serving-mfu"))
ESTIMATORS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "estimators.md"
#: Shapes the scaled-down oracle checks (the others' attention kinds are checked in test_families.py).
PLAIN = [n for n, cfg in PUBLIC_CONFIGS.items() if oracle_elsewhere(cfg) is None]
POINTS = ((4096, 4096), (1, 4096), (512, 8192))


@lru_cache(maxsize=None)
def comparison() -> Comparison:
    return compare_estimators(points=POINTS, oracle=False)


@lru_cache(maxsize=None)
def check(name: str):
    return oracle_check(name)


def test_rows_cover_every_model_and_point() -> None:
    cmp = comparison()
    assert [(r.model, r.new_tokens, r.context_len) for r in cmp.rows] == [
        (m, q, c) for m in PUBLIC_CONFIGS for q, c in POINTS]
    assert [r.kind for r in cmp.rows[:3]] == ["prefill", "decode", "chunk"]


@pytest.mark.parametrize("name", list(PUBLIC_CONFIGS))
def test_ours_is_flop_model(name: str) -> None:
    fm = FlopModel(ModelSpec.from_hf_config(PUBLIC_CONFIGS[name]))
    for row in (r for r in comparison().rows if r.model == name):
        total = sum(fm.slice_breakdown(row.new_tokens, row.context_len, 1).values())
        assert row.ours == total
        assert row.ours_per_token == total / row.new_tokens


@pytest.mark.parametrize("name", list(PUBLIC_CONFIGS))
def test_estimates_and_relative_errors_from_the_numbers(name: str) -> None:
    cfg = PUBLIC_CONFIGS[name]
    cmp = comparison()
    for row in (r for r in cmp.rows if r.model == name):
        q, c = row.new_tokens, row.context_len
        want = {"2n": six_nd_flops(cfg, q, c, 1), "s2": s2_attention_flops(cfg, q, c, 1),
                "vllm": vllm_perf_flops(cfg, q, c, 1) if cmp.vllm_available else None}
        assert set(row.estimates) == set(ESTIMATORS) == set(want)
        for key, flops in want.items():
            e = row.estimates[key]
            assert e.flops == flops
            if flops is None:
                assert e.rel_error is None and e.flops_per_token is None
                continue
            assert e.flops_per_token == flops / q
            assert e.rel_error == pytest.approx((flops - row.ours) / row.ours, rel=1e-12, abs=1e-15)


def test_known_gaps_have_the_expected_sign() -> None:
    """What docs/estimators.md says the table shows: 2N undercounts a long decode, the textbook s²
    overcounts a dense prefill (no causal discount), vLLM's estimator overcounts prefill."""
    rows = {(r.model, r.new_tokens, r.context_len): r for r in comparison().rows}
    for m in PUBLIC_CONFIGS:
        assert rows[(m, 1, 4096)].estimates["2n"].rel_error < 0
    for m in ("llama-3-8b", "llama-3-70b", "mixtral-8x7b"):
        assert rows[(m, 4096, 4096)].estimates["s2"].rel_error > 0
    if comparison().vllm_available:
        for m in PLAIN:
            assert rows[(m, 4096, 4096)].estimates["vllm"].rel_error > 0
        # vLLM counts every layer as full attention: far over on a long decode of a hybrid, a sparse
        # or a chunked model (ours: 36 of 48 layers recurrent; 2048 keys; 8192-key chunks)
        long = compare_estimators(["qwen3-next-80b-a3b", "deepseek-v3.2", "llama-4-scout"], ((1, 32768),),
                                  oracle=False)
        assert all(r.estimates["vllm"].rel_error > 0.1 for r in long.rows)


def test_rel_error_and_points_parsing() -> None:
    assert rel_error(110, 100) == pytest.approx(0.1)
    assert rel_error(None, 100) is None
    assert rel_error(5, 0) is None
    assert parse_points("4096:4096, 1:32768") == [(4096, 4096), (1, 32768)]
    for bad in ("4096", "0:10", "10:5", "a:b", ""):
        with pytest.raises(ValueError):
            parse_points(bad)


# ------------------------------------------------------------------------------ scaled-down shapes
def test_scaled_down_shapes_keep_the_structure() -> None:
    for name in PLAIN:
        cfg = PUBLIC_CONFIGS[name]
        small = scaled_down_config(cfg)
        assert small["model_type"] == cfg["model_type"]
        assert small["hidden_size"] <= 256 and small["vocab_size"] == 512
        heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        assert small["num_attention_heads"] // small["num_key_value_heads"] == heads // kv  # GQA ratio
        assert ("head_dim" in small) == ("head_dim" in cfg)
        experts = next((k for k in ("num_experts", "num_local_experts", "n_routed_experts") if cfg.get(k)), None)
        if experts:
            k, e = cfg["num_experts_per_tok"], cfg[experts]
            assert small[experts] / small["num_experts_per_tok"] == e / k  # top-k / E kept
            assert 2 <= small["num_experts_per_tok"] <= k
        sp_small, sp = ModelSpec.from_hf_config(small), ModelSpec.from_hf_config(cfg)
        assert sp_small.model_type == sp.model_type
        assert bool(sp_small.moe_layer_indices) == bool(sp.moe_layer_indices)
    ds = scaled_down_config(PUBLIC_CONFIGS["deepseek-v3"])
    assert ds["first_k_dense_replace"] == 1 and ds["n_shared_experts"] == 1
    assert ds["kv_lora_rank"] and ds["q_lora_rank"] and ds["qk_rope_head_dim"] < ds["qk_nope_head_dim"]
    sp = ModelSpec.from_hf_config(ds)
    assert sp.moe_layer_indices and 0 not in sp.moe_layer_indices  # the dense-first layer


# ------------------------------------------------------------------------------ oracle
def test_the_oracle_leaves_out_only_the_attention_kinds_it_cannot_check() -> None:
    assert set(PUBLIC_CONFIGS) - set(PLAIN) == {"deepseek-v3.2", "llama-4-scout", "qwen3-next-80b-a3b"}
    cmp = compare_estimators(["llama-3-8b", "qwen3-next-80b-a3b"], POINTS[:1], use_vllm=False)
    assert [o.model for o in cmp.oracle] == ["llama-3-8b"]
    assert "linear attention" in cmp.oracle_elsewhere["qwen3-next-80b-a3b"]
    assert "qwen3-next-80b-a3b: linear attention" in comparison_markdown(cmp)


@pytest.mark.parametrize("name", PLAIN)
def test_oracle_exact_on_scaled_down_shapes(name: str) -> None:
    pytest.importorskip("transformers")
    o = check(name)
    s = o.prompt_len
    assert o.unexplained_flops == {}
    assert o.prefill_linear.oracle == o.prefill_linear.ours
    assert o.prefill_lm_head.oracle == o.prefill_lm_head.ours > 0
    assert o.prefill_attention.oracle * (s + 1) == o.prefill_attention.ours * 2 * s
    assert o.decode_lm_head.oracle == o.decode_lm_head.ours
    assert o.decode_attention.oracle == o.decode_attention.ours
    assert o.prefill_match and o.decode_match
    if name == "deepseek-v3":  # MLA: transformers re-runs kv_b_proj over the c cached latents
        assert o.note and o.decode_linear.oracle > o.decode_linear.ours
    else:
        assert o.note is None and o.decode_linear.oracle == o.decode_linear.ours


@pytest.mark.parametrize("name", ["llama-3-8b", "mixtral-8x7b", "deepseek-v3"])
def test_oracle_agrees_with_the_test_suite_oracle(name: str) -> None:
    """compare.py's op-level oracle and tests/flop_oracle.py's module-level one count the same."""
    pytest.importorskip("transformers")
    from serving_mfu.tools.tiny_models import build_hf_model
    from tests.flop_oracle import oracle_prefill_decode

    cfg = scaled_down_config(PUBLIC_CONFIGS[name])
    o = check(name)
    ref = oracle_prefill_decode(build_hf_model(cfg), o.prompt_len)
    assert ref.prefill.linear == o.prefill_linear.oracle
    assert ref.prefill.lm_head == o.prefill_lm_head.oracle
    assert ref.prefill.attention_scores == o.prefill_attention.oracle
    assert ref.decode.linear == o.decode_linear.oracle
    assert ref.decode.attention_scores == o.decode_attention.oracle
    assert not ref.prefill.other and not ref.decode.other
    # and per component, the module-level oracle equals ours
    ours = FlopModel(ModelSpec.from_hf_config(cfg)).slice_breakdown(o.prompt_len, o.prompt_len, 1)
    assert {k: v for k, v in ref.prefill.components.items() if v} == {
        k: v for k, v in ours.items() if v and k not in (ATTENTION_SCORES, LM_HEAD)}


def test_oracle_catches_a_wrong_count(monkeypatch) -> None:
    """The check is not vacuous: a FLOP model one FLOP off in the MLP fails it."""
    pytest.importorskip("transformers")
    from serving_mfu.tools import compare

    class OffByOne(FlopModel):
        def slice_breakdown(self, new_tokens, context_len, logits_tokens=1):
            out = dict(super().slice_breakdown(new_tokens, context_len, logits_tokens))
            out["mlp"] += 1
            return out

    monkeypatch.setattr(compare, "FlopModel", OffByOne)
    o = oracle_check("llama-3-8b")
    assert not o.prefill_linear.match and not o.prefill_match and not o.decode_match


# ------------------------------------------------------------------------------ CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, "compare-estimators", *args], capture_output=True, text=True, timeout=300)


def test_cli_json() -> None:
    proc = _cli("--json", "--configs", "llama-3-8b,mixtral-8x7b", "--points", "4096:4096,1:4096",
                "--prompt-len", "7")
    assert proc.returncode == 0, proc.stderr
    out = Comparison.model_validate(json.loads(proc.stdout))
    assert [r.model for r in out.rows] == ["llama-3-8b"] * 2 + ["mixtral-8x7b"] * 2
    assert out.rows[0].ours == sum(FlopModel(ModelSpec.from_hf_config(PUBLIC_CONFIGS["llama-3-8b"]))
                                   .slice_breakdown(4096, 4096, 1).values())
    assert out.oracle and [o.model for o in out.oracle] == ["llama-3-8b", "mixtral-8x7b"]
    assert all(o.prefill_match and o.decode_match and o.prompt_len == 7 for o in out.oracle)


def test_cli_table_and_markdown_fast() -> None:
    proc = _cli("--no-oracle", "--no-vllm", "--configs", "qwen3-30b-a3b")
    assert proc.returncode == 0, proc.stderr
    assert "qwen3" in proc.stdout and "n/a" in proc.stdout
    md = _cli("--markdown", "--no-oracle", "--no-vllm")
    assert md.returncode == 0, md.stderr
    table = [line for line in md.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(PUBLIC_CONFIGS) * len(DEFAULT_POINTS)


@pytest.mark.parametrize("args", [["--configs", "gpt-9"], ["--points", "1:0"], ["--points", "x"]])
def test_cli_bad_input_exits_2(args) -> None:
    proc = _cli("--no-oracle", *args)
    assert proc.returncode == 2
    assert "error" in proc.stderr and "Traceback" not in proc.stderr


def test_readme_comparison_block_is_the_codes_output() -> None:
    """Once docs/estimators.md carries the comparison between its markers, it must be this code's output."""
    m = re.search(r"<!-- estimator-comparison:start -->\n(.*?)\n<!-- estimator-comparison:end -->",
                  ESTIMATORS_PAGE.read_text(), re.S)
    if not m:
        pytest.skip("docs/estimators.md has no estimator-comparison block yet")
    cmp = compare_estimators()
    if not cmp.vllm_available:
        pytest.skip("vLLM not importable: the page's vLLM column cannot be reproduced")
    assert m.group(1).strip() == comparison_markdown(cmp).strip()
