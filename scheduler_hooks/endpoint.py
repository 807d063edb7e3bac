"""vLLM endpoint plugin (`vllm.endpoint_plugins`, name `serving_mfu`): `/metrics/mfu` on vLLM's own
API server, and `serving_mfu_*` series on its `/metrics`.

Enable with `VLLM_PLUGINS=serving_mfu` (or leave VLLM_PLUGINS unset to load all plugins).
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from typing import Any

from fastapi import FastAPI

from serving_mfu.runtime.aggregate import SnapshotReader
from serving_mfu.serve.api import build_router, mount_first
from serving_mfu.serve.prometheus import register

log = logging.getLogger("serving_mfu.endpoint")


class MFUEndpointPlugin:
    """Adds the serving-mfu routes and Prometheus collector to the OpenAI-compatible server."""

    name = "serving_mfu"
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        mount_first(app, build_router())

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        reader = SnapshotReader(parent_pid=os.getpid())
        state.serving_mfu_reader = reader
        try:
            register(reader)
        except Exception:  # metrics are extra: never stop the server for them
            log.exception("serving-mfu: Prometheus collector not registered")
