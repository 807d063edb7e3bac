"""Modelled cost of a speculative drafter (draft model, EAGLE/EAGLE3, MTP) in one iteration.

Two models live here.

`drafter_cost(draft, k, runs)` (the hook's model so far): for every request that sampled, one pass over
its newly kept positions `[start, end)` (context `end`, one logit row), then `k − 1` single-position steps
at contexts `end + 1 … end + k − 1`, each with a logit row.  FLOPs are additive over contiguous
positions, so a run costs one call: run_flops(s, e, 1) + Σ_{j=1..k−1} run_flops(e+j−1, e+j, 1) =
run_flops(s, e+k−1, logits=k).  Bytes: the draft weights once per forward (k), plus KV writes.

`drafter_work(draft, k, requests, padded=..., method=...)`: the drafter as vLLM 0.32 runs it, per
request of the step (`DraftRequest`).  Sources are vLLM 0.32.0 as installed; paths are under `vllm/`.

* When it runs.  After every target forward that scheduled tokens, for every request of the batch,
  whether it sampled or not: V1 calls `propose_draft_token_ids` from `sample_tokens`
  (v1/worker/gpu_model_runner.py:4380-4452, :4488), skipping it only when the longest sequence plus `k`
  does not fit the drafter's max_model_len (`_input_fits_in_drafter`, :4288-4301; `max_model_len` here);
  V2 calls `speculator.propose` unconditionally (v1/worker/gpu/model_runner.py:2225-2245).  A step where
  no request samples (only non-final prefill chunks) still drafts.  A step with no scheduled tokens runs
  no forward (gpu_model_runner.py:3989).
* Runners.  V2 (`v1/worker/gpu/`) is the default on GPU whenever Triton is present and the features are
  supported (config/vllm.py:703-739; medusa, suffix and parallel EAGLE fall back to V1, :2927-2943).  V2
  always pads the drafter batch: it ignores `disable_padded_drafter_batch` (only
  v1/worker/gpu/spec_decode/extract_hidden_states.py:33 reads it).  V1's draft-model proposer refuses
  the unpadded batch (`needs_extra_input_slots`, v1/spec_decode/llm_base_proposer.py:114-120, :226-227,
  :329-335).  So `padded=False` (V1 with `disable_padded_drafter_batch=True`) only changes EAGLE/MTP, and
  is ignored for `draft_model` here.
* First pass, EAGLE/EAGLE3/MTP (input ids shifted by one, target hidden states, positions unchanged).
  Padded: every scheduled position of every request, at the target's own positions and contexts — the
  rejected drafts and non-final prefill chunks included (V1: gpu_model_runner.py:4947-4958 when no
  request has drafts, :4976-4997 `prepare_inputs_padded`, llm_base_proposer.py:1099-1155, shift at
  :834-854; V2 reuses the target's attention metadata and slot mappings, v1/worker/gpu/spec_decode/
  target_dependent_ar/speculator.py:204-210, :276-294).  So request i runs [n0, n0 + q) with context n0 + q.
  Unpadded (V1 only): `prepare_inputs` drops each request's rejected drafts, r = drafts + 1 − sampled
  (gpu_model_runner.py:4959-4973, llm_base_proposer.py:1157-1259, :1184-1187), so request i runs
  [n0, n0 + q − r); requests without drafts — prefill chunks, final or not — keep all q positions.
* First pass, draft model (own token ids, no hidden states): one extra slot per request for the last
  sampled (bonus / correction) token; rejected slots stay in the query.  Request i runs q + 1 query
  positions with seq_len n0 + q + 1, so its attention covers [n0, n0 + q + 1) (V1: `set_inputs_first_pass`
  with `copy_and_expand_eagle_inputs`, llm_base_proposer.py:855-955, v1/spec_decode/utils.py:428-575,
  `extend_all_queries_by_N` :395-425; V2: `StandaloneARSpeculator._prefill`,
  v1/worker/gpu/spec_decode/standalone_ar/speculator.py:167-253 and its kernel :413-497).
* Logit rows of the first pass: one per request, at its last kept position (or the bonus slot) —
  every request of the batch, non-final chunks included (llm_base_proposer.py:615, :629-637, :438-448;
  V2 target_dependent_ar/speculator.py:463, standalone_ar/speculator.py:243-253).
* Then `k − 1` single-token steps for every request of the batch (batch_size = num_reqs,
  llm_base_proposer.py:534, :689-770; V2 target_dependent_ar/speculator.py:495-530, :599-672,
  standalone_ar/speculator.py:255-349), one logit row each, continuing from the last kept position
  kept_end = n0 + q − r (r = drafts − accepted for a request that sampled; 0 for a non-final chunk;
  V1 utils.py:191-228, V2 v1/worker/gpu/input_batch.py:507-533): EAGLE step j runs position
  kept_end − 1 + j at context kept_end + j (llm_base_proposer.py:680-686, utils.py:39-95; V2
  target_dependent_ar/speculator.py:796-846); the draft model runs position kept_end + j at context
  kept_end + j + 1 (its first pass already ran the bonus token at kept_end; standalone_ar/speculator.py:
  265-302).  A non-final chunk's steps run past its chunk (their KV is overwritten by the next chunk).
* CUDA-graph padding.  V1's drafter pads each forward to a PIECEWISE capture size
  (llm_base_proposer.py:421-436, :572, :670, :1771-1819); V2's EAGLE/MTP first pass runs the target's
  padded token count (target_dependent_ar/speculator.py:197, :258-268) and its steps a padded decode
  batch (:327-345); V2's draft model runs eagerly, unpadded (standalone_ar/speculator.py:67-71, :144).
  The caller passes the executed row counts (`first_pass_tokens`, `step_tokens`); a padding row costs
  the linear layers only (no attention, no logits, no KV write).

FLOPs via `FlopModel.run_flops(start, end, logits)` (positions [start, end) of one request, each at
context position + 1).  Bytes as in `drafter_cost`: the draft weights (dense + LM head + every expert)
once per drafter forward — k forwards when k ≥ 1 —, plus `kv_bytes_per_token` for every real position the
drafter runs (rejected slots included; V1's draft model masks its rejected slots' writes, utils.py:391,
V2's does not); KV reads are not counted.  All of it is executed work: waste under cause `drafter`.
n-gram and suffix drafters do no matmuls and cost nothing.  Not modelled: parallel drafting
(P-EAGLE, DFlash, DSpark: one pass with k slots), V2's multi-module MTP (k modules over the whole batch,
multi_module_mtp/speculator.py:384-470), Medusa (heads on one hidden state per request), Gemma4 MTP's
constant draft positions.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from serving_mfu.cost.accounting import CostModel

FREE_METHODS = frozenset({"ngram", "suffix", "ngram_gpu"})
#: Methods whose first pass appends one slot per request for the sampled token (no input shift).
EXTRA_SLOT_METHODS = frozenset({"draft_model"})


def drafter_cost(draft: CostModel | None, k: int, runs: Iterable[tuple[int, int]]) -> tuple[float, float]:
    """(FLOPs, bytes) of drafting `k` tokens after each kept run `[start, end)`."""
    if draft is None or k <= 0:
        return 0.0, 0.0
    fm, bm = draft.flop_model, draft.byte_model
    flops = 0.0
    requests = positions = 0
    for start, end in runs:
        if end <= start:
            continue
        requests += 1
        positions += end - start + k - 1
        flops += fm.run_flops(start, end + k - 1, logits=k)
    if not requests:
        return 0.0, 0.0
    weights = bm.dense_weight_bytes + bm.lm_head_bytes + sum(
        e * b for (e, _), b in zip(bm.moe_shape, bm.expert_bytes))
    return flops, k * weights + positions * bm.kv_bytes_per_token


class DraftRequest(NamedTuple):
    """One request of the step as the drafter sees it: `new_tokens` (q) scheduled positions after
    `computed_before` (n0), of which the last `draft_tokens` are drafts the target verified and
    `accepted_tokens` of them were kept.  `sampled`: whether the target sampled a token for it this
    step (None: n0 + q ≥ prompt_len; a recompute chunk after preemption that stops short of the
    request's output does not sample either)."""

    computed_before: int
    new_tokens: int
    prompt_len: int
    draft_tokens: int = 0
    accepted_tokens: int = 0
    sampled: bool | None = None

    @property
    def samples(self) -> bool:
        if self.sampled is None:
            return self.computed_before + self.new_tokens >= self.prompt_len
        return self.sampled

    @property
    def rejected(self) -> int:
        """Rejected draft positions as vLLM counts them: drafts − accepted for a request that sampled;
        a request that did not sample has no valid token (V1: drafts + 1 when it has drafts,
        utils.py:284-288, :219-220; V2: a chunked prefill has none, input_batch.py:520-531)."""
        if not self.draft_tokens:
            return 0
        if self.samples:
            return self.draft_tokens - min(self.accepted_tokens, self.draft_tokens)
        return self.draft_tokens + 1


class DrafterWork(NamedTuple):
    """The drafter's work in one step.  `flops` include the padding rows' linear FLOPs; positions count
    real (unpadded) query positions; `rejected_positions` and `unsampled_positions` are the first-pass
    positions over drafts the target rejected and over requests that did not sample (non-final chunks)."""

    flops: float = 0.0
    bytes: float = 0.0
    forwards: int = 0
    first_pass_positions: int = 0
    step_positions: int = 0
    logit_rows: int = 0
    rejected_positions: int = 0
    unsampled_positions: int = 0
    padding_positions: int = 0
    padding_flops: float = 0.0


def drafter_work(draft: CostModel | None, k: int, requests: Iterable[DraftRequest], *, padded: bool = True,
                 method: str = "eagle", first_pass_tokens: int | None = None, step_tokens: int | None = None,
                 max_model_len: int | None = None) -> DrafterWork:
    """The drafter's FLOPs and bytes in one step as vLLM 0.32 runs it (module docstring).

    `k`: num_speculative_tokens this step (0: dynamic speculation chose none — V1 still runs the first
    pass, without logits, llm_base_proposer.py:617-627).  `padded`: the runner pads the drafter batch
    (the default; always under V2; `not disable_padded_drafter_batch` under V1).  `method`: "draft_model"
    adds the bonus slot and shifts the steps by one; other model-based methods run EAGLE's shape; n-gram
    and suffix cost nothing.  `first_pass_tokens` / `step_tokens`: rows the first pass and each step really
    ran after CUDA-graph padding (None: unpadded).  `max_model_len`: V1's drafter skips the step when the
    longest sequence plus k exceeds it (gpu_model_runner.py:4288-4301)."""
    if draft is None or k < 0 or method in FREE_METHODS:
        return DrafterWork()
    reqs = [r for r in requests if r.new_tokens > 0]
    if not reqs:
        return DrafterWork()
    if max_model_len is not None and max(r.computed_before + r.new_tokens for r in reqs) + k > max_model_len:
        return DrafterWork()
    extra = 1 if method in EXTRA_SLOT_METHODS else 0
    trim = not padded and not extra  # V1's unpadded batch (EAGLE/MTP only) drops the rejected drafts
    steps = k - 1 if k > 1 else 0
    first_logits = 1 if k >= 1 else 0
    fm, bm = draft.flop_model, draft.byte_model
    flops = 0.0
    first = rejected_pos = unsampled = 0
    for r in reqs:
        n0, q = r.computed_before, r.new_tokens
        rej = r.rejected if r.rejected < q else q
        kept_end = n0 + q - rej
        end = (kept_end if trim else n0 + q) + extra  # the first pass's query [n0, end)
        first += end - n0
        if not trim:
            rejected_pos += rej
        if not r.samples:
            unsampled += q
        # steps: EAGLE at kept_end − 1 + j, the draft model at kept_end + j (j = 1 … k − 1)
        s0 = kept_end + extra
        if steps and s0 == end:  # contiguous with the first pass: one call (FLOPs are additive)
            flops += fm.run_flops(n0, end + steps, logits=first_logits + steps)
        else:
            flops += fm.run_flops(n0, end, logits=first_logits)
            if steps:
                flops += fm.run_flops(s0, s0 + steps, logits=steps)
    n = len(reqs)
    step_pos = steps * n
    pad = 0
    if first_pass_tokens is not None and first_pass_tokens > first:
        pad += first_pass_tokens - first
    if steps and step_tokens is not None and step_tokens > n:
        pad += steps * (step_tokens - n)
    pad_flops = float(fm.linear_flops_per_token_total * pad)
    forwards = 1 + steps
    weights = bm.dense_weight_bytes + sum(e * b for (e, _), b in zip(bm.moe_shape, bm.expert_bytes))
    lm_reads = forwards if k >= 1 else 0
    return DrafterWork(
        flops=flops + pad_flops,
        bytes=forwards * weights + lm_reads * bm.lm_head_bytes + (first + step_pos) * bm.kv_bytes_per_token,
        forwards=forwards,
        first_pass_positions=first,
        step_positions=step_pos,
        logit_rows=n * (first_logits + steps),
        rejected_positions=rejected_pos,
        unsampled_positions=unsampled,
        padding_positions=pad,
        padding_flops=pad_flops,
    )
