"""`MFUScheduler`: vLLM's v1 scheduler with the serving-mfu recorder attached.

Use it with `--scheduler-cls scheduler_hooks.MFUScheduler` or `LLM(..., scheduler_cls=...)`.
vLLM uses a custom scheduler class as given, async scheduling or not, so `MFUScheduler`
becomes `MFUAsyncScheduler` (on vLLM's `AsyncScheduler`) when the engine runs with async
scheduling — the GPU default — and stays on the plain `Scheduler` otherwise.  Every call goes
to vLLM's own scheduler unchanged; the recorder only reads, and any exception inside it is
caught, counted (`anomalies.counts.hook_errors`) and logged once.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from scheduler_hooks.hook import MFUHook

log = logging.getLogger("serving_mfu.hook")


class _Recorder:
    """The recording around vLLM's scheduler methods, shared by both scheduler flavours."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mfu: MFUHook | None = None
        try:
            self._mfu = MFUHook.from_vllm_config(self.vllm_config)
        except Exception:  # a tracker that cannot start must not stop the engine
            log.exception("serving-mfu: MFU tracking disabled for this engine")

    @property
    def mfu_hook(self) -> MFUHook | None:
        """This engine's serving-mfu hook (None when tracking could not start): for in-process tools."""
        return self._mfu

    def schedule(self, *args: Any, **kwargs: Any):
        out = super().schedule(*args, **kwargs)
        hook = self._mfu
        if hook is not None:
            try:
                hook.on_schedule(self, out)
            except Exception as exc:
                hook.error("schedule", exc)
        return out

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any):
        hook = self._mfu
        token = None
        if hook is not None:
            try:
                token = hook.before_output(self, scheduler_output, model_runner_output)
            except Exception as exc:
                hook.error("update_from_output", exc)
        result = super().update_from_output(scheduler_output, model_runner_output)
        if token is not None:
            try:
                hook.after_output(token, result)
            except Exception as exc:
                hook.error("update_from_output", exc)
        return result

    def shutdown(self) -> None:
        if self._mfu is not None:
            try:
                self._mfu.close()
            except Exception:
                log.exception("serving-mfu: error while closing")
        super().shutdown()


class MFUScheduler(_Recorder, Scheduler):
    """A vLLM Scheduler that records every iteration; an `MFUAsyncScheduler` under async scheduling."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "MFUScheduler":
        if cls is MFUScheduler:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False):
                cls = MFUAsyncScheduler
        return super().__new__(cls)


class MFUAsyncScheduler(MFUScheduler, AsyncScheduler):
    """The recorder on vLLM's AsyncScheduler (overlapped scheduling, the GPU default)."""
