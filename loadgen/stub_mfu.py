"""A fake engine's cumulative MFU counters for the stub's `/metrics/mfu/counters`.

Every streamed chunk is one "iteration" costing 2 × params FLOPs per token and the stub's
pacing delay as its busy time; each request is accounted as if it ran alone, so figures are
only plumbing checks (token counts exact, utilization made up).
"""

from __future__ import annotations

import time

from serving_mfu.cost.counters import Counters
from serving_mfu.schema.report import ModelReport, PeakReport
from serving_mfu.schema.snapshot import Totals


class FakeEngine:
    """Accumulates `Counters` as the stub streams; `totals()` is what the real endpoint serves."""

    def __init__(self, params: float, peak_flops_per_s: float, bandwidth_bytes_per_s: float = 1e12):
        self.params = params
        self.counters = Counters()
        self.peak = PeakReport(device="stub", flops_per_s=peak_flops_per_s, bandwidth_bytes_per_s=bandwidth_bytes_per_s,
                               dtype="bf16", source="mfu-loadgen stub (fake)", devices=1)
        self.model = ModelReport(name="stub", model_type="stub", approximate=False)

    def chunk(self, prompt_tokens: int, out_tokens: int, time_s: float, tokens_per_chunk: int) -> None:
        """One streamed chunk: the prefill of `prompt_tokens` (first chunk only) or decode steps."""
        c, flops_per_token = self.counters, 2.0 * self.params
        peak, bw = self.peak.flops_per_s, self.peak.bandwidth_bytes_per_s
        c.iterations += 1
        c.busy_s += time_s
        c.wall_s += time_s
        c.busy_capacity_flops += time_s * peak
        c.wall_capacity_flops += time_s * peak
        c.busy_capacity_bytes += time_s * bw
        if prompt_tokens:  # the first token comes from the prefill step
            c.prefill_tokens += prompt_tokens
            c.prefill_useful_flops += flops_per_token * prompt_tokens
            c.prefill_executed_flops += flops_per_token * prompt_tokens
            c.prefill_bytes += 2 * self.params
            c.prefill_time_s += time_s
            c.prefill_capacity_flops += time_s * peak
            c.prefill_capacity_bytes += time_s * bw
            out_tokens -= 1
        else:
            c.decode_time_s += time_s
            c.decode_capacity_flops += time_s * peak
            c.decode_capacity_bytes += time_s * bw
            c.decode_bytes += 2 * self.params
            if tokens_per_chunk > 1:  # a verify step: k − 1 drafts, all but the rejected ones kept
                c.draft_tokens += tokens_per_chunk - 1
                c.accepted_tokens += out_tokens - 1
        c.decode_tokens += out_tokens
        c.decode_useful_flops += flops_per_token * out_tokens
        c.decode_executed_flops += flops_per_token * out_tokens

    def totals(self) -> Totals:
        now = time.time()
        return Totals(at=now, updated_at=now, engines=1, counters=self.counters.copy(), peak=self.peak,
                      model=self.model, time_split="stub")
