"""`mfu-loadgen wrap`: the MFU of a benchmark the user already runs — vLLM's own `vllm bench serve`
against the real CPU server — with token counts checked against vLLM's counters over the same window."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadgen.results import MFUSection
from loadgen.wrap import WrapResult
from tests.engine_util import SERVER_COUNTERS, server_counters

pytestmark = pytest.mark.engine
LOADGEN = str(Path(sys.executable).with_name("mfu-loadgen"))


@pytest.fixture(scope="module")
def wrapped(plugin_server, tmp_path_factory):
    """`mfu-loadgen wrap -- python -m loadgen.vllm_bench …` (= `vllm bench serve`), 6 random prompts."""
    base, tmp = plugin_server["base"], tmp_path_factory.mktemp("wrap")
    bench = [sys.executable, "-m", "loadgen.vllm_bench", "--base-url", base, "--model", plugin_server["model"],
             "--tokenizer", plugin_server["model_path"], "--dataset-name", "random", "--random-input-len", "48",
             "--random-output-len", "8", "--num-prompts", "6", "--request-rate", "inf", "--ignore-eos",
             "--save-result", "--result-dir", str(tmp), "--result-filename", "bench.json"]
    before = server_counters(base)
    proc = subprocess.run([LOADGEN, "wrap", "--base-url", base, "--out", str(tmp / "wrap.json"), "--", *bench],
                          capture_output=True, text=True, timeout=600)
    after = server_counters(base)
    return {"proc": proc, "bench": json.loads((tmp / "bench.json").read_text()) if proc.returncode == 0 else None,
            "wrap": WrapResult.model_validate_json((tmp / "wrap.json").read_text()),
            "delta": {k: after[k] - before[k] for k in SERVER_COUNTERS}}


def test_wrap_passes_the_benchmark_through_and_prints_the_mfu(wrapped) -> None:
    proc = wrapped["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Serving Benchmark Result" in proc.stdout  # vLLM's own output, untouched
    assert "MFU of the command" in proc.stdout and "prefill" in proc.stdout and "decode" in proc.stdout
    assert wrapped["bench"]["completed"] == 6


def test_wrap_window_counts_what_vllm_counted(wrapped) -> None:
    """The wrap window holds vLLM's benchmark (and its one test prompt): every token vLLM counted."""
    w, d = wrapped["wrap"], wrapped["delta"]
    assert w.returncode == 0 and w.mfu is not None, w.mfu_error
    m: MFUSection = w.mfu
    assert d["vllm:request_success_total"] >= 6
    assert m.prefill.tokens + m.prefix_cache.hit_tokens == d["vllm:prompt_tokens_total"]
    assert m.prefix_cache.hit_tokens == d["vllm:prefix_cache_hits_total"]
    assert m.decode.tokens == d["vllm:generation_tokens_total"] - d["vllm:request_success_total"]
    assert m.spec_decode.draft_tokens == d["vllm:spec_decode_num_draft_tokens_total"]
    assert m.spec_decode.accepted_tokens == d["vllm:spec_decode_num_accepted_tokens_total"]
    for phase in (m.prefill, m.decode):
        assert 0 < phase.mfu <= phase.hfu <= 1
    # vLLM's benchmark asked for 6 × 48 random input tokens (its own tokenizer: the server's)
    assert wrapped["bench"]["total_input_tokens"] <= d["vllm:prompt_tokens_total"]


def test_wrap_exits_with_the_commands_status(plugin_server, tmp_path) -> None:
    out = tmp_path / "w.json"
    proc = subprocess.run([LOADGEN, "wrap", "--base-url", plugin_server["base"], "--out", str(out), "--",
                           sys.executable, "-c", "import sys; sys.exit(3)"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    result = WrapResult.model_validate_json(out.read_text())
    assert result.returncode == 3 and result.mfu is not None  # the (idle) window is still reported


def test_wrap_without_a_command_or_a_server_says_why(tmp_path) -> None:
    proc = subprocess.run([LOADGEN, "wrap", "--base-url", "http://127.0.0.1:9"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "command" in proc.stderr
    out = tmp_path / "w.json"
    proc = subprocess.run([LOADGEN, "wrap", "--base-url", "http://127.0.0.1:9", "--out", str(out), "--",
                           sys.executable, "-c", "print('ran')"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ran" in proc.stdout
    assert "MFU: not available" in proc.stdout
    result = WrapResult.model_validate_json(out.read_text())
    assert result.mfu is None and "127.0.0.1:9" in result.mfu_error
