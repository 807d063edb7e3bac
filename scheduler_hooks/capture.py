"""What the engine thread hands the accounting thread for one step: a `StepCapture`, built in O(1).

Two clock readings and references to what vLLM handed over (the SchedulerOutput, the ModelRunnerOutput,
the CUDA-graph stats), plus, on draft steps of an engine with its stats off, one sampled length per
request (vLLM trims those lists in place at a stop).  Nothing in it is read on the engine thread again.
"""

from __future__ import annotations

from typing import Any

import msgspec


class StepCapture(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One step as captured on the engine thread (scheduler_hooks.hook: `_before_output`).  Not tracked by the
    garbage collector (it refers to vLLM's objects, nothing refers back): building it cannot start a collection
    on the engine thread."""

    t_sched_s: float  # when schedule() returned the step (the hook's clock)
    t_end_s: float  # when its output reached update_from_output()
    out: Any  # vLLM's SchedulerOutput: built fresh per step, never changed after
    runner_out: Any  # vLLM's ModelRunnerOutput
    lengths: Any = None  # sampled lengths on draft steps: a list, FROM_STATS (read later), or None
    cudagraph_stats: Any = None  # ModelRunnerOutput.cudagraph_stats (None without --cudagraph-metrics)
