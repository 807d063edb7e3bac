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


FAIL_AT_STEP = 3  # the plugin server's hook raises once, after recording this step (test_endpoint checks it)


@pytest.fixture(scope="session")
def plugin_server(tmp_path_factory):
    """vLLM's OpenAI server with the plugin, n-gram speculation and an injected hook fault, after 8 requests.
    Shared by the endpoint, live-Prometheus, request-shape and `mfu-loadgen wrap` tests."""
    import time

    import httpx

    from serving_mfu.tools.engine_models import CORPUS
    from serving_mfu.tools.server import VLLMServer
    from tests.engine_util import DEFAULT_PEAK, NGRAM, model_path

    tmp = tmp_path_factory.mktemp("server")
    publish = tmp / "publish"
    env = {**DEFAULT_PEAK, "SERVING_MFU_DIR": str(publish), "SERVING_MFU_FAIL_AT_STEP": str(FAIL_AT_STEP)}
    with VLLMServer(model_path(), tmp / "server.log", env=env, speculative_config=NGRAM) as srv:
        base = srv.base_url
        prompts = [CORPUS[i * 90: i * 90 + 600] for i in range(3)] + ["the engine engine and the engine"]
        for _ in range(2):
            for p in prompts:
                r = httpx.post(base + "/v1/completions", timeout=120, json={
                    "model": "tiny", "prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
        time.sleep(1.5)  # let the engine publish its last snapshot
        yield {"base": base, "publish": publish, "log": srv.log_path, "model": "tiny", "model_path": model_path()}


@pytest.fixture(scope="session")
def bpe512_server(tmp_path_factory):
    """A second plugin server whose tokenizer (512 BPE tokens from the corpus alone) splits the load
    generator's words into several tokens: request shapes must not depend on the tokenizer."""
    from serving_mfu.tools.server import VLLMServer
    from tests.engine_util import DEFAULT_PEAK, model_path

    tmp = tmp_path_factory.mktemp("server-bpe512")
    path = model_path("tiny-llama-bpe512-engine")
    env = {**DEFAULT_PEAK, "SERVING_MFU_DIR": str(tmp / "publish")}
    with VLLMServer(path, tmp / "server.log", served_name="tiny-bpe512", env=env) as srv:
        yield {"base": srv.base_url, "log": srv.log_path, "model": "tiny-bpe512", "model_path": path}
