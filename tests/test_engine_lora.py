"""LoRA on the real engine (--enable-lora): requests to the base model and to a peft adapter in the same
batches.  The adapter's work counts for its own requests only — at its rank as useful work, at vLLM's
padded --max-lora-rank as executed work — and the token counts still match vLLM's own counters."""

from __future__ import annotations

import pytest

from serving_mfu.model.lora import load_adapter, lora_flops
from serving_mfu.model.spec import ModelSpec
from serving_mfu.tools.engine_models import CORPUS
from tests.engine_util import assert_invariants, model_path, vllm_counters

pytestmark = pytest.mark.engine

RANK, MAX_RANK, OUT = 8, 16, 12


@pytest.fixture(scope="module")
def run(tmp_path_factory, connector_lora_engine):
    import peft
    import torch
    import transformers
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from serving_mfu.serve.monitor import MFUMonitor

    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_path())
    config = peft.LoraConfig(r=RANK, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(folder)
    llm, publish, _ = connector_lora_engine  # its KV connector stores these prompts too: not counted here
    prompts = [CORPUS[i * 70 + 1000: i * 70 + 1150 + 11 * i] for i in range(6)]
    adapter = LoRARequest("tiny-adapter", 1, str(folder))
    requests = [adapter if i % 2 else None for i in range(len(prompts))]  # base and adapter in one batch
    params = SamplingParams(max_tokens=OUT, temperature=0.0, ignore_eos=True)
    llm.generate([CORPUS[:40]], SamplingParams(max_tokens=2), lora_request=adapter, use_tqdm=False)  # load it
    before = vllm_counters(llm)
    with MFUMonitor(publish) as mon:
        outputs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
    after = vllm_counters(llm)
    report = mon.report()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return report, delta, outputs, requests, folder


def test_adapter_work_counts_for_its_requests_only(run) -> None:
    report, delta, outputs, requests, folder = run
    adapted = [o for o, r in zip(outputs, requests) if r is not None]
    assert adapted and len(adapted) < len(outputs)
    # an adapted request's useful positions: its prompt, then every generated token but the last
    positions = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in adapted)
    assert report.lora.tokens == positions
    spec = ModelSpec.from_hf_config(model_path())
    adapter = load_adapter(folder)
    assert adapter.rank == RANK
    useful, padded = lora_flops(adapter, spec), lora_flops(adapter, spec, rank=MAX_RANK)
    assert useful.per_logit == 0 and useful.per_token > 0
    assert report.lora.useful_flops == positions * useful.per_token
    assert report.lora.executed_flops == positions * padded.per_token == 2 * report.lora.useful_flops
    # the base model's counts are untouched: vLLM's own token counters
    assert report.prefill.tokens == delta["vllm:prompt_tokens"]
    assert report.kv_transfer.received_tokens == 0  # prompts the engine's KV store has not seen
    assert report.decode.tokens == delta["vllm:generation_tokens"] - len(outputs)
    assert report.prefill.executed_flops > report.prefill.useful_flops  # the padded rank ran
    assert_invariants(report)
