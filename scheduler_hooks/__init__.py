"""vLLM integration: `MFUScheduler` (the scheduler hook) and the `/metrics/mfu` endpoint plugin.

Importing `scheduler_hooks.MFUScheduler` imports vLLM; the accounting core (`serving_mfu`) does not.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MFUScheduler"]


def __getattr__(name: str) -> Any:
    if name == "MFUScheduler":
        from scheduler_hooks.scheduler import MFUScheduler

        return MFUScheduler
    raise AttributeError(name)
