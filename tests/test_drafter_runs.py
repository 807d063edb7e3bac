"""The drafter as vLLM 0.32 runs it (serving_mfu.cost.drafter.drafter_work), against hand-computed costs.

Tiny Llama draft: hidden 64, intermediate 128, 2 layers, 4 heads (2 KV), head_dim 16, vocab 100, bf16.
Per position, linear L = 2 layers x 2 x (64*64 + 2*64*32 + 64*64 + 3*64*128) = 147456 FLOPs; per
(query, key) pair A = 2 layers x 2 x 4 heads x (16 + 16) = 512; per logit row H = 2 x 64 x 100 = 12800.
A position p attends p + 1 keys, so positions [a, b) hold T(b) - T(a) pairs, T(n) = n(n + 1)/2.
Bytes: weights W = 2 x 36864 x 2 layers = 147456, LM head 2 x 64 x 100 = 12800, KV 2 x 2 x 32 x 2 = 256 per
position.
"""

from __future__ import annotations

import pytest

from serving_mfu.cost.accounting import CostModel
from serving_mfu.cost.drafter import DrafterWork, DraftRequest, drafter_cost, drafter_work
from serving_mfu.model.spec import ModelSpec

TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "torch_dtype": "bfloat16",
}
L, A, H = 147456, 512, 12800
W, LM, KV = 147456, 12800, 256
K = 3


def T(n: int) -> int:
    return n * (n + 1) // 2


@pytest.fixture(scope="module")
def draft() -> CostModel:
    return CostModel(ModelSpec.from_hf_config(TINY))


def test_coefficients(draft: CostModel) -> None:
    fm, bm = draft.flop_model, draft.byte_model
    assert fm.linear_flops_per_token_total == L
    assert [g.flops_per_pair for g in fm.attention_groups] == [A]
    assert fm.lm_head_flops_per_logit == H
    assert (bm.dense_weight_bytes, bm.lm_head_bytes, bm.kv_bytes_per_token) == (W, LM, KV)


# A decode verifying 3 drafts at n0 = 10 (q = 4: positions 10..13), one accepted: 2 rejected, kept_end = 12.
DECODE = DraftRequest(computed_before=10, new_tokens=4, prompt_len=5, draft_tokens=3, accepted_tokens=1)


def test_decode_padded_runs_every_scheduled_position(draft: CostModel) -> None:
    w = drafter_work(draft, K, [DECODE], padded=True)
    # first pass [10, 14) with one logit row; steps at 12 and 13 (contexts 13, 14), one row each
    first = 4 * L + A * (T(14) - T(10)) + H
    steps = 2 * L + A * (13 + 14) + 2 * H
    assert w.flops == first + steps
    assert (w.first_pass_positions, w.step_positions, w.logit_rows, w.forwards) == (4, 2, 3, 3)
    assert w.rejected_positions == 2 and w.unsampled_positions == 0
    assert w.bytes == 3 * (W + LM) + 6 * KV


def test_decode_unpadded_runs_only_kept_positions(draft: CostModel) -> None:
    w = drafter_work(draft, K, [DECODE], padded=False)
    first = 2 * L + A * (11 + 12) + H  # [10, 12)
    steps = 2 * L + A * (13 + 14) + 2 * H
    assert w.flops == first + steps
    assert (w.first_pass_positions, w.step_positions, w.rejected_positions) == (2, 2, 0)
    assert w.bytes == 3 * (W + LM) + 4 * KV
    # the old model's kept run [10, 12) is exactly this
    assert drafter_cost(draft, K, [(10, 12)]) == (w.flops, w.bytes)


def test_decode_draft_model_adds_the_bonus_slot_and_is_always_padded(draft: CostModel) -> None:
    w = drafter_work(draft, K, [DECODE], method="draft_model")
    # first pass: q + 1 = 5 query positions over [10, 15); steps at kept_end + 1 = 13 and 14 (contexts 14, 15)
    first = 5 * L + A * (T(15) - T(10)) + H
    steps = 2 * L + A * (14 + 15) + 2 * H
    assert w.flops == first + steps
    assert (w.first_pass_positions, w.step_positions, w.rejected_positions) == (5, 2, 2)
    # vLLM's V1 draft model refuses the unpadded batch and V2 always pads: padded=False changes nothing
    assert drafter_work(draft, K, [DECODE], padded=False, method="draft_model") == w


# A prompt of 20 chunked: the first chunk [0, 8) does not finish it, the last one [12, 20) does.
PARTIAL = DraftRequest(computed_before=0, new_tokens=8, prompt_len=20)
FINISHED = DraftRequest(computed_before=12, new_tokens=8, prompt_len=20)


@pytest.mark.parametrize("padded", [True, False])
def test_non_final_prefill_chunk_drafts_in_both_modes(draft: CostModel, padded: bool) -> None:
    w = drafter_work(draft, K, [PARTIAL], padded=padded)
    # first pass [0, 8) (one logit row at position 7), then steps at 8 and 9 past the chunk: [0, 10), 3 rows
    assert w.flops == 10 * L + A * T(10) + 3 * H
    assert (w.first_pass_positions, w.unsampled_positions, w.logit_rows) == (8, 8, 3)
    assert w.bytes == 3 * (W + LM) + 10 * KV
    assert drafter_cost(draft, K, []) == (0.0, 0.0)  # the old model: nothing


def test_finished_prompt(draft: CostModel) -> None:
    w = drafter_work(draft, K, [FINISHED])
    assert w.flops == 10 * L + A * (T(22) - T(12)) + 3 * H  # [12, 20) then 20, 21
    assert drafter_work(draft, K, [FINISHED], padded=False) == w
    assert drafter_cost(draft, K, [(12, 20)]) == (w.flops, w.bytes)
    dm = drafter_work(draft, K, [FINISHED], method="draft_model")
    assert dm.flops == 11 * L + A * (T(23) - T(12)) + 3 * H  # [12, 21) with the bonus slot, then 21, 22


def test_step_where_nothing_samples_still_drafts(draft: CostModel) -> None:
    other = DraftRequest(computed_before=4, new_tokens=6, prompt_len=30)
    w = drafter_work(draft, K, [PARTIAL, other])
    assert w.flops == (10 * L + A * T(10) + 3 * H) + (8 * L + A * (T(12) - T(4)) + 3 * H)
    assert (w.forwards, w.logit_rows, w.unsampled_positions) == (3, 6, 14)
    assert w.bytes == 3 * (W + LM) + (14 + 4) * KV  # weights once per forward, not per request


def test_padded_at_least_old_model(draft: CostModel) -> None:
    # the hook's old runs: kept ranges of decodes and prompt-finishing chunks only
    decode_b = DraftRequest(computed_before=30, new_tokens=4, prompt_len=9, draft_tokens=3, accepted_tokens=3)
    step = [DECODE, decode_b, PARTIAL, FINISHED]
    old = drafter_cost(draft, K, [(10, 12), (30, 34), (12, 20)])
    new = drafter_work(draft, K, step, padded=True)
    assert new.flops >= old[0] and new.bytes >= old[1]
    assert new.flops > drafter_work(draft, K, step, padded=False).flops
    # without rejections nor partial chunks the models agree
    assert drafter_cost(draft, K, [(30, 34), (12, 20)]) == drafter_work(draft, K, [decode_b, FINISHED])[:2]


def test_k_one_and_k_zero(draft: CostModel) -> None:
    one = drafter_work(draft, 1, [DECODE])
    assert one.flops == 4 * L + A * (T(14) - T(10)) + H and one.forwards == 1
    assert one.bytes == W + LM + 4 * KV
    zero = drafter_work(draft, 0, [DECODE])  # dynamic speculation chose k = 0: the first pass, no logits
    assert zero.flops == 4 * L + A * (T(14) - T(10)) and zero.bytes == W + 4 * KV and zero.logit_rows == 0


def test_cuda_graph_padding_rows_cost_linear_only(draft: CostModel) -> None:
    base = drafter_work(draft, K, [DECODE, FINISHED])
    padded = drafter_work(draft, K, [DECODE, FINISHED], first_pass_tokens=16, step_tokens=4)
    assert padded.padding_positions == (16 - 12) + 2 * (4 - 2)
    assert padded.flops - base.flops == padded.padding_flops == 8 * L
    assert padded.bytes == base.bytes


def test_nothing_to_cost(draft: CostModel) -> None:
    assert drafter_work(None, K, [DECODE]) == DrafterWork()
    assert drafter_work(draft, K, []) == DrafterWork()
    assert drafter_work(draft, K, [DECODE], method="ngram") == DrafterWork()
    # V1 skips the drafter when the longest sequence plus k does not fit its max_model_len
    assert drafter_work(draft, K, [DECODE], max_model_len=16) == DrafterWork()
    assert drafter_work(draft, K, [DECODE], max_model_len=17).flops > 0
