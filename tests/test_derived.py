"""The derived path: linear FLOPs read from a model's modules on the meta device, checked against
FlopCounterMode on a tiny copy of each architecture's own default config (tests/any_architecture.py)."""

from __future__ import annotations

import pytest

from serving_mfu.cost.flops import FlopModel
from serving_mfu.runtime.derived import derive_spec, has_formula
from tests.any_architecture import build, oracle_linear_flops, tiny_config

TOKENS = 8
# No registered formula; hybrids (linear attention, Mamba-2, SSM), sparse-attention indexers, MoE,
# and an encoder-decoder's decoder (its idle cross-attention left out).
FAMILIES = ("qwen3_next", "qwen3_5_moe", "deepseek_v32", "jamba", "granitemoehybrid", "mamba2", "kimi_linear",
            "falcon_h1", "gemma4_text", "ministral3", "bart")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_derived_linear_flops_equal_flop_counter(model_type: str) -> None:
    assert not has_formula(model_type)
    config = tiny_config(model_type)
    spec = derive_spec(config)
    assert spec.flop_model == "derived"
    oracle = oracle_linear_flops(build(config), TOKENS)
    assert oracle > 0
    assert FlopModel(spec).linear_flops_per_token_total * TOKENS == oracle
