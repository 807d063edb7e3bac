"""Shared fixtures: the short demo runs once per session; its output feeds the demo and notebook tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`serving-mfu demo --short` on the CPU engine: its output folder and the finished process."""
    out = tmp_path_factory.mktemp("demo") / "demo-results"
    import os

    # a fresh machine: no calibration cached yet, no peak setting (the demo calibrates once and caches it)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_MFU_")}
    env["SERVING_MFU_CACHE_DIR"] = str(tmp_path_factory.mktemp("demo-cache"))
    proc = subprocess.run([str(Path(sys.executable).with_name("serving-mfu")), "demo", "--short", "--out-dir",
                           str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="session")
def connector_lora_engine(tmp_path_factory):
    """One CPU engine for the KV-connector and the LoRA tests (an engine start is ~40 s): vLLM's disk-backed
    ExampleConnector as `kv_both`, prefix caching off, and --enable-lora.  Yields (llm, publish folder,
    kv store folder); each test measures its own generate() calls, on prompts the other does not send."""
    from tests.engine_util import llm_engine

    publish, store = tmp_path_factory.mktemp("publish"), tmp_path_factory.mktemp("kv-store")
    kv = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
          "kv_connector_extra_config": {"shared_storage_path": str(store)}}
    with llm_engine(publish, kv_transfer_config=kv, enable_prefix_caching=False, block_size=32, max_num_seqs=8,
                    max_model_len=512, enable_lora=True, max_lora_rank=16, max_loras=2) as llm:
        yield llm, publish, store
