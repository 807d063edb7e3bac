"""What each request and tenant cost on `vllm.LLM` with a KV connector and LoRA (DESIGN §12): per-request tokens
equal vLLM's own (RequestOutput, its counters), the requests add up to the window's report, and tenants come
from vllm_xargs (SamplingParams.extra_args), the LoRA adapter or the served model.

It runs on the shared KV+LoRA engine after test_engine_kv and test_engine_lora (file order): an engine
started later in this process takes over vLLM's Prometheus registry, which their counter deltas read."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving_mfu.runtime.request_log import RequestLogReader
from serving_mfu.tools.engine_models import CORPUS
from tests.engine_util import measured_generate, model_path, vllm_counters
from tests.test_engine_attribution import _wait_for


@pytest.fixture(scope="module")
def offline(tmp_path_factory, connector_lora_engine):
    import peft
    import torch
    import transformers
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    folder = tmp_path_factory.mktemp("attribution-adapter")
    torch.manual_seed(1)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_path())
    peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    llm, publish, _ = connector_lora_engine
    adapter = LoRARequest("attr adapter", 2, str(folder))
    prompts = [CORPUS[2500 + i * 80: 2500 + i * 80 + 180 + 13 * i] for i in range(4)]
    lora = [adapter if i % 2 else None for i in range(4)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, extra_args={"tenant": "batch-jobs"})
    plain = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    runs = []
    for p in (plain, params):  # the first computes and stores the prompts, the second loads them (KV connector)
        before = vllm_counters(llm)
        outputs = llm.generate(prompts, p, lora_request=lora, use_tqdm=False)
        after = vllm_counters(llm)
        runs.append((outputs, {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}))
    report, _, window_outputs, _ = measured_generate(llm, publish, prompts[:3], plain)
    reader = RequestLogReader(Path(publish))
    found = _wait_for(reader.find, [o.request_id for outs, _ in runs for o in outs] +
                      [o.request_id for o in window_outputs])
    return runs, report, window_outputs, found


def test_offline_tokens_kv_and_tenants(offline) -> None:
    runs, _, _, found = offline
    for n, (outputs, delta) in enumerate(runs):
        received = 0
        for i, o in enumerate(outputs):
            (r,) = found[o.request_id]
            assert r.prompt_tokens == len(o.prompt_token_ids)
            assert r.output_tokens == len(o.outputs[0].token_ids)
            assert r.cached_tokens + r.received_tokens == o.num_cached_tokens
            received += r.received_tokens
            if i % 2:  # the adapter's requests: its name, unless vllm_xargs says otherwise
                assert r.adapter == "attr adapter"
                assert r.tenant == ("batch-jobs" if n else "attr_adapter")
            else:
                assert r.adapter is None and r.tenant == ("batch-jobs" if n else model_path())
        assert received == delta.get("vllm:external_prefix_cache_hits", 0.0)
    assert sum(r.received_tokens for o in runs[1][0] for r in found[o.request_id]) > 0  # loaded the second time


def test_offline_requests_add_up_to_the_window(offline) -> None:
    _, report, outputs, found = offline
    recs = [r for o in outputs for r in found[o.request_id]]
    assert sum(r.useful_flops for r in recs) == pytest.approx(
        report.prefill.useful_flops + report.decode.useful_flops, rel=1e-9)
    assert sum(r.executed_flops for r in recs) == pytest.approx(
        report.prefill.executed_flops + report.decode.executed_flops, rel=1e-9)
    assert sum(r.device_seconds for r in recs) == pytest.approx(report.overall.busy_s * report.peak.devices,
                                                                rel=1e-9)
