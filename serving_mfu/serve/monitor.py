"""In-process use with `vllm.LLM`: the report of the engines this process started, no server needed.

    llm = LLM(model=..., scheduler_cls="scheduler_hooks.MFUScheduler")
    with MFUMonitor() as run:
        llm.generate(prompts, params)
    print(run.report().decode.mfu)        # just this block
    print(MFUMonitor().report().prefill.mfu)  # since the engine started
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from serving_mfu.runtime.aggregate import SnapshotReader
from serving_mfu.schema.report import MFUReport
from serving_mfu.schema.snapshot import Totals


class MFUMonitor:
    """Reads the snapshots published by this process's engines (they publish every 0.5 s)."""

    def __init__(self, directory: str | Path | None = None, fresh_timeout_s: float = 3.0):
        self.reader = SnapshotReader(directory, parent_pid=os.getpid())
        self.fresh_timeout_s = fresh_timeout_s
        self._start: Totals | None = None
        self._end: Totals | None = None

    def totals(self) -> Totals:
        """Counters published after this call began (so work already returned to the caller is in)."""
        asked = time.time()
        deadline = asked + self.fresh_timeout_s
        while True:
            totals = self.reader.totals()
            if totals is not None and totals.updated_at >= asked:
                return totals
            if time.time() > deadline:
                if totals is None:
                    raise RuntimeError(f"no serving-mfu engine publishes in {self.reader.dir}: create the LLM with "
                                       "scheduler_cls='scheduler_hooks.MFUScheduler'")
                return totals
            time.sleep(0.05)

    def report(self, window_s: float | None = None) -> MFUReport:
        """Since the engine started (or over the last `window_s`); inside/after a `with` block, that block."""
        if self._start is not None:
            end = self._end or self.totals()
            return end.report_since(self._start)
        self.totals()  # wait for a fresh snapshot
        report = self.reader.report(window_s)
        assert report is not None
        return report

    def __enter__(self) -> "MFUMonitor":
        self._start = self.totals()
        self._end = None
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = self.totals()
