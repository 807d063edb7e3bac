"""Modelled cost of a speculative drafter (draft model, EAGLE/EAGLE3, MTP) in one iteration.

After the target's forward, the drafter proposes `k` tokens for every request that sampled:
one pass over the request's newly kept positions `[start, end)` (context `end`, one logit
row), then `k − 1` single-position steps at contexts `end + 1 … end + k − 1`, each with a
logit row.  FLOPs are additive over contiguous positions, so a run costs one call:
run_flops(s, e, 1) + Σ_{j=1..k−1} run_flops(e+j−1, e+j, 1) = run_flops(s, e+k−1, logits=k).  Bytes: the draft weights once per step, plus KV writes.  n-gram and suffix
drafters do no matmuls and cost nothing.
"""

from __future__ import annotations

from typing import Iterable

from serving_mfu.cost.accounting import CostModel

FREE_METHODS = frozenset({"ngram", "suffix", "ngram_gpu"})


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
