"""The drafter as vLLM runs it (DESIGN §11): on the CPU engine with a one-layer draft model
(`"method": "draft_model"`, the padded batch, vLLM's default), the positions the draft model's forward
receives, step by step, equal the positions our drafter model costs — its first pass over every
scheduled position with the bonus slot, then its k − 1 single-position steps."""

from __future__ import annotations

import pytest

from serving_mfu.runtime.trace import read_trace
from serving_mfu.tools.engine_models import CORPUS
from tests.engine_util import llm_engine, model_path

pytestmark = pytest.mark.engine
K = 3


def test_drafter_positions_equal_what_the_draft_model_executes(tmp_path) -> None:
    from vllm import SamplingParams

    trace = tmp_path / "trace.jsonl"
    spec = {"method": "draft_model", "model": model_path("tiny-llama-draft-engine"), "num_speculative_tokens": K}
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "SERVING_MFU_TRACE": str(trace)}  # in-process: the model is ours
    with llm_engine(tmp_path / "publish", env=env, speculative_config=spec, max_num_seqs=4,
                    enable_prefix_caching=False, long_prefill_token_threshold=64, max_num_batched_tokens=96) as llm:
        core = llm.llm_engine.engine_core.engine_core
        drafter = core.model_executor.driver_worker.worker.model_runner.drafter
        assert type(drafter).__name__ == "DraftModelProposer"
        calls: list[int] = []

        def count(module, args, kwargs):
            ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
            calls.append(int(ids.shape[0]))

        handle = drafter.model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            prompts = [CORPUS[i * 90: i * 90 + 400] for i in range(3)] + ["the engine engine and the engine"]
            llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
            hook = core.scheduler.mfu_hook
            hook.flush()
            hook.trace._fh.flush()
        finally:
            handle.remove()
        report = hook.tracker.report()
    records = [r for _, r in read_trace(trace)[1]]
    ours = [r.drafter.positions for r in records if r.drafter is not None and r.drafter.positions]
    engine = [sum(calls[i:i + K]) for i in range(0, len(calls), K)]  # each step: a first pass and K − 1 steps
    assert len(calls) == K * len(ours), (calls, ours)
    assert ours == engine
    # chunked prefill (a 96-token budget): steps whose prompts do not finish still draft, as vLLM runs it
    assert any(r.prefill is not None and any(e < p for e, p in zip(
        map(sum, zip(r.prefill.computed_before, r.prefill.new_tokens)), r.prefill.prompt_len)) and r.drafter.positions
               for r in records)
    assert report.spec_decode.drafter_flops > 0 and report.decode.waste_by_cause["drafter"] == \
        report.spec_decode.drafter_flops
