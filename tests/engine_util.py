"""Helpers for tests that run the real vLLM CPU engine with the serving-mfu scheduler."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from serving_mfu.runtime.settings import Settings
from serving_mfu.tools.engine_models import ensure_model
from serving_mfu.tools.envutil import environ  # noqa: F401 (tests import it from here)
from serving_mfu.tools.server import CPU_MEMORY_FRACTION

MODELS_ROOT = Settings().models_dir()
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
# The engine tests run on the CPU default peak, as a new user's engine would: no peak setting, and an
# empty calibration cache, so the peak is this machine's ISA peak (serving_mfu.peaks.cpu), whatever the CPU.
DEFAULT_PEAK = {"SERVING_MFU_PEAK_FLOPS": None, "SERVING_MFU_PEAK_BANDWIDTH": None, "SERVING_MFU_DEVICE": None,
                "SERVING_MFU_CALIBRATION": None,
                "SERVING_MFU_CACHE_DIR": tempfile.mkdtemp(prefix="serving-mfu-empty-cache-")}


def model_path(name: str = "tiny-llama-engine") -> str:
    return str(ensure_model(name, MODELS_ROOT))


@contextlib.contextmanager
def llm_engine(publish_dir: Path, model: str = "tiny-llama-engine", env: dict[str, str] | None = None,
               **kwargs: Any) -> Iterator[Any]:
    """A `vllm.LLM` on the CPU with MFUScheduler, publishing to `publish_dir`; shut down after."""
    from vllm import LLM

    settings = {"SERVING_MFU_DIR": str(publish_dir), **DEFAULT_PEAK, **(env or {})}
    args = dict(model=model_path(model), scheduler_cls="scheduler_hooks.MFUScheduler", enforce_eager=True,
                gpu_memory_utilization=CPU_MEMORY_FRACTION, max_model_len=2048, disable_log_stats=False, seed=0)
    args.update(kwargs)
    with environ(settings):
        llm = LLM(**args)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm


# vLLM's token and request counters the tests hold the tracker's counts against
SERVER_COUNTERS = ("vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total",
                   "vllm:generation_tokens_total", "vllm:spec_decode_num_draft_tokens_total",
                   "vllm:spec_decode_num_accepted_tokens_total")


def prom_value(text: str, name: str) -> float:
    """A counter of a Prometheus text exposition, summed over its label sets (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def server_counters(base_url: str, names: tuple[str, ...] = SERVER_COUNTERS) -> dict[str, float]:
    """`names` as the server's `/metrics` shows them now."""
    import httpx

    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {name: prom_value(text, name) for name in names}


def vllm_counters(llm: Any) -> dict[str, float]:
    """vLLM's own Prometheus counters for this LLM (name → value, summed over label sets)."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        value = getattr(m, "value", None)
        if isinstance(value, (int, float)):
            out[m.name] = out.get(m.name, 0.0) + value
    return out


def measured_generate(llm: Any, publish_dir: Path, prompts: list[str], params: Any) -> tuple[Any, dict, Any, Any]:
    """Run `llm.generate` and return (our report of just that call, the increase of each of vLLM's
    own counters over it, the outputs, the monitor)."""
    from serving_mfu.serve.monitor import MFUMonitor

    before = vllm_counters(llm)
    with MFUMonitor(publish_dir) as mon:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    after = vllm_counters(llm)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return mon.report(), delta, outputs, mon


def assert_invariants(report: Any) -> None:
    """MFU ≤ HFU ≤ 1 in every section that has a figure."""
    for name in ("prefill", "decode", "overall"):
        section = getattr(report, name)
        if section.mfu is None:
            continue
        assert 0 <= section.mfu <= section.hfu + 1e-12, (name, section)
        assert section.hfu <= 1.0, (name, section)
