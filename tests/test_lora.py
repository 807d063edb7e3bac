"""LoRA adapter FLOPs (serving_mfu.model.lora) against torch's FlopCounterMode on a peft adapter: the
FLOPs a forward pass gains when the adapter is enabled, counted from the aten ops torch dispatched."""

from __future__ import annotations

import json
import subprocess
import sys

import peft
import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from serving_mfu.model.errors import ConfigError
from serving_mfu.model.lora import LoRASpec, load_adapter, lora_flops
from serving_mfu.model.spec import ModelSpec
from serving_mfu.tools.tiny_models import TINY_CONFIGS

CASES = {
    "attention-and-mlp": dict(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    "all-linear-with-a-rank-pattern": dict(r=8, target_modules="all-linear", rank_pattern={"down_proj": 2}),
    "lm-head-and-embeddings": dict(r=4, target_modules=["q_proj", "lm_head", "embed_tokens"]),
    "some-layers": dict(r=6, target_modules=["o_proj", "up_proj"], layers_to_transform=[0, 2]),
}


def _peft_model(case: str, tmp_path):
    cfg = dict(TINY_CONFIGS["tiny-llama"])
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    lora = peft.LoraConfig(lora_dropout=0.0, init_lora_weights=False, **CASES[case])
    model = peft.get_peft_model(base, lora).eval()
    model.save_pretrained(tmp_path / case)  # adapter_config.json as peft writes it
    return cfg, model, tmp_path / case


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_flops_equal_flop_counter_mode(case: str, tmp_path) -> None:
    cfg, model, folder = _peft_model(case, tmp_path)
    q = 24
    ids = torch.randint(0, cfg["vocab_size"], (1, q))
    with torch.no_grad():
        with_adapter = _flops(lambda: model(input_ids=ids))
        with model.disable_adapter():
            base = _flops(lambda: model(input_ids=ids))
    lf = lora_flops(load_adapter(folder), ModelSpec.from_hf_config(cfg))
    assert lf.modules > 0
    # HF computes logits at every position: the lm_head adapter runs q times
    assert q * lf.per_token + q * lf.per_logit == with_adapter - base > 0


def test_padded_rank_is_the_executed_form(tmp_path) -> None:
    """vLLM multiplies at --max-lora-rank: executed FLOPs scale with it, useful ones with the adapter's rank."""
    _, _, folder = _peft_model("attention-and-mlp", tmp_path)
    spec = ModelSpec.from_hf_config(TINY_CONFIGS["tiny-llama"])
    adapter = load_adapter(folder)
    assert lora_flops(adapter, spec, rank=16).per_token == 4 * lora_flops(adapter, spec).per_token


def test_the_cli_adds_a_lora_component(tmp_path) -> None:
    cfg, _, folder = _peft_model("lm-head-and-embeddings", tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    args = ["--new-tokens", "8", "--context-len", "40", "--logits-tokens", "3", "--json"]
    run = [sys.executable, "-m", "serving_mfu.tools.cli", "flops", str(tmp_path / "model")]
    base = json.loads(subprocess.run(run + args, capture_output=True, text=True, check=True).stdout)
    got = json.loads(subprocess.run(run + args + ["--lora", str(folder)], capture_output=True, text=True,
                                    check=True).stdout)
    lf = lora_flops(load_adapter(folder), ModelSpec.from_hf_config(cfg))
    assert got["breakdown"]["lora"] == 8 * lf.per_token + 3 * lf.per_logit > 0
    assert got["total"] == base["total"] + got["breakdown"]["lora"]
    bad = subprocess.run(run + args + ["--lora", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode != 0 and "adapter_config.json" in bad.stderr


@pytest.mark.parametrize("cfg,message", [({"peft_type": "IA3", "r": 4}, "not LORA"),
                                          ({"r": 0, "target_modules": ["q_proj"]}, "positive integer"),
                                          ({"r": 4, "target_modules": 3}, "neither a list")])
def test_bad_adapter_configs_say_what_is_wrong(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoRASpec.from_adapter_config(cfg, "x")
