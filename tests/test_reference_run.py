"""`serving-mfu reference-run` on the CPU (issue 28): a Llama with random weights measured directly, no engine.

One `--device cpu --quick --json` run (a few seconds) is shared: each phase has 0 < MFU <= HFU <= 1 and the
speed-of-light bounds of DESIGN §11; ours equals FlopCounterMode exactly, and both equal a count written by
hand from the shape and one this test takes itself; NVML's absence is stated with its reason.  The GPU side
(NVML GPU-Util, GPM SM and tensor-pipe activity) is driven by a fake NVML; bad input exits 2 with one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving_mfu.runtime.settings import Settings
from serving_mfu.tools.cli import main
from serving_mfu.tools.reference_model import SHAPES, model_config
from serving_mfu.tools.reference_run import NO_GPU, GpuMeter, ReferenceRun, gpu_line, pick_oracle_batch
from tests.test_gpu_util import FakeClock, FakeNVML

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[int, dict, Path]:
    """`serving-mfu reference-run --device cpu --quick --json --plot run.png` in this process, as on a fresh
    clone: no SERVING_MFU_* setting and an empty calibration cache (so the peak is the CPU's ISA peak)."""
    tmp = tmp_path_factory.mktemp("reference-run")
    png = tmp / "run.png"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("SERVING_MFU_")]:
            mp.delenv(name)
        mp.setenv("SERVING_MFU_CACHE_DIR", str(tmp / "cache"))
        with contextlib.redirect_stdout(out):
            rc = main(["reference-run", "--device", "cpu", "--quick", "--json", "--plot", str(png)])
    return rc, json.loads(out.getvalue()), png


def _phases(run: dict):
    for b in run["batches"]:
        for phase in ("prefill", "decode"):
            yield b["batch"], phase, b[phase]


def test_each_phase_is_within_the_invariants(quick_run) -> None:
    rc, run, _ = quick_run
    assert rc == 0
    p, d = run["run"]["prompt_len"], run["run"]["decode_steps"]
    assert run["prefill"] == run["batches"][0]["prefill"] and run["decode"] == run["batches"][0]["decode"]
    assert [b["batch"] for b in run["batches"]] == run["run"]["batches"] and len(run["batches"]) >= 2
    for batch, phase, ph in _phases(run):
        assert 0 < ph["mfu"] <= ph["hfu"] <= 1, (batch, phase, ph)
        assert 0 < ph["mbu"] <= 1, (batch, phase, ph)
        # DESIGN §11: max(HFU, MBU) <= SOL <= HFU + MBU, and SOL <= 1 under a credible peak
        assert max(ph["hfu"], ph["mbu"]) <= ph["sol"] * (1 + 1e-9) and ph["sol"] <= (ph["hfu"] + ph["mbu"]) * (1 + 1e-9)
        assert ph["sol"] <= 1
        assert ph["tokens"] == batch * (p if phase == "prefill" else d)
        assert ph["steps"] == (1 if phase == "prefill" else d) and ph["time_s"] > 0
        assert ph["useful_flops"] == ph["executed_flops"]  # a static batch wastes nothing
    assert run["peak"]["flops_per_s"] and run["peak"]["source"] and run["peak"]["credible"] is True
    assert run["device"].startswith("cpu") and run["run"]["cache"] == "DynamicCache"
    assert run["run"]["attention"] == "sdpa" and run["run"]["timer"] == "time.perf_counter"


def _hand_count(run: dict) -> tuple[int, int, int]:
    """(weight matmuls per position, LM head per logit row, attention per (query, key) pair) of the shape,
    written from the Llama architecture: q, k, v, o projections, a SwiGLU MLP, QKᵀ and scores·V."""
    s = run["model"]["shape"]
    h, layers, heads, kv, hd, inter = (s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"],
                                       s["num_key_value_heads"], s["head_dim"], s["intermediate_size"])
    linear = 2 * layers * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter)
    return linear, 2 * h * s["vocab_size"], 2 * layers * heads * 2 * hd


def _flop_counter_by_hand(run: dict, batch: int, prompt_len: int) -> tuple[int, int]:
    """FlopCounterMode totals of a prefill (logits_to_keep=1) and one decode step, counted here on a model
    built by transformers itself (not by reference_model) with eager attention."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    s = run["model"]["shape"]
    cfg = LlamaConfig(**{k: v for k, v in SHAPES["tiny"].items() if k != "model_type"}, attn_implementation="eager")
    assert {k: getattr(cfg, k) for k in s} == s
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, s["vocab_size"], (batch, prompt_len))
    totals = []
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        totals.append(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        totals.append(counter.get_total_flops())
    return totals[0], totals[1]


def test_the_oracle_agrees_exactly_with_flop_counter_and_a_count_by_hand(quick_run) -> None:
    _, run, _ = quick_run
    o = run["oracle"]
    b, p = o["batch"], o["prompt_len"]
    assert b == max(run["run"]["batches"]) > 1  # the counts scale with the batch
    assert o["prefill"]["equal"] is True and o["decode"]["equal"] is True
    linear, lm_head, pair = _hand_count(run)
    # ours: the tracker's cost of the timed steps (its executed FLOPs), causal attention
    assert o["prefill"]["ours_flops"] == b * (p * linear + lm_head + pair * p * (p + 1) // 2)
    assert o["decode"]["ours_flops"] == b * (linear + lm_head + pair * (p + 1))
    timed = next(x for x in run["batches"] if x["batch"] == b)
    assert timed["prefill"]["executed_flops"] == o["prefill"]["ours_flops"]
    # FlopCounterMode as it counted (eager attention: the full p×p square), and halved to the causal pairs
    raw_prefill, raw_decode = _flop_counter_by_hand(run, b, p)
    assert o["prefill"]["flop_counter_raw"] == raw_prefill == b * (p * linear + lm_head + pair * p * p)
    assert o["prefill"]["flop_counter"] == o["prefill"]["ours_flops"]
    assert o["decode"]["flop_counter_raw"] == o["decode"]["flop_counter"] == raw_decode == o["decode"]["ours_flops"]
    for phase in ("prefill", "decode"):
        assert all(t["match"] for t in o[phase]["terms"].values()) and not o[phase]["other_ops"]


@pytest.mark.skipif(HAS_GPU, reason="states NVML's absence on a machine without an NVIDIA GPU")
def test_nvml_absence_is_stated_with_its_reason(quick_run) -> None:
    _, run, png = quick_run
    g = run["gpu_util"]
    assert g["available"] is False and g["gpm"] is False and run["driver"] is None and run["cuda"] is None
    assert g["reason"].startswith(NO_GPU + ": ") and len(g["reason"]) > len(NO_GPU) + 5  # and NVML's own words
    for _, _, ph in _phases(run):
        figures = ph["gpu_util"]
        assert figures["gpu_util"] is None and figures["sm_active"] is None and figures["tensor_active"] is None
        assert figures["reason"] == g["reason"] and figures["sampled_s"] == 0
    parsed = ReferenceRun.model_validate(run)
    assert gpu_line(parsed) == NO_GPU
    from rich.console import Console

    from serving_mfu.tools.reference_run import print_reference_run

    console = Console(record=True, width=200)
    print_reference_run(parsed, console)
    text = console.export_text()
    assert NO_GPU in text and text.count(": equal") == 2 and "MFU" in text and "ISA peak" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_line_error(capsys, *args: str) -> str:
    rc = main(["reference-run", *args])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(capsys) -> None:
    assert "unknown device 'tpu'" in _one_line_error(capsys, "--device", "tpu")
    assert "bad --batch" in _one_line_error(capsys, "--device", "cpu", "--batch", "1,x")
    assert "unknown shape '70b'" in _one_line_error(capsys, "--device", "cpu", "--shape", "70b")
    if not HAS_GPU:
        assert "no CUDA GPU" in _one_line_error(capsys, "--device", "cuda")


def test_the_gpu_plan_builds_llama_3_8b_and_its_oracle_fits() -> None:
    """The GPU run's model is Llama-3-8B (its parameter count, on the meta device), and the oracle's eager
    attention there runs at batch 1 (a 2k-token square per head fits; batch 64's would not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, cfg = model_config("8b", None, "bf16", 2048 + 64 + 1)
    hf = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")})
    with torch.device("meta"):
        model = LlamaForCausalLM(hf)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert pick_oracle_batch((1, 16, 64), cfg["num_attention_heads"], 2048) == 1
    assert pick_oracle_batch((1, 4), SHAPES["tiny"]["num_attention_heads"], 32) == 4


class TwoMetricNVML(FakeNVML):
    """The fake NVML of test_gpu_util, with the tensor-pipe metric and a driver version."""

    NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
    tensor = 0.0

    @staticmethod
    def c_nvmlGpmMetricsGet_t():
        return SimpleNamespace(version=0, numMetrics=0, sample1=None, sample2=None,
                               metrics=[SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(4)])

    def nvmlGpmMetricsGet(self, get) -> None:
        a, b = get.sample1, get.sample2
        for m in get.metrics[:get.numMetrics]:
            m.value = (b.integral - a.integral) / (b.t - a.t) if m.metricId == 2 else self.tensor

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"


def test_gpu_meter_reads_gpu_util_sm_and_tensor_activity_per_phase() -> None:
    """On a Hopper GPU: GPU-Util from the sampler over each phase, SM and tensor-pipe activity from one GPM
    pair per phase; a phase shorter than GPM's 0.1 s says so; close() frees every sample and NVML."""
    clock = FakeClock()
    nvml = TwoMetricNVML(clock, [("NVIDIA H100 80GB HBM3", 97, 60)])
    nvml.tensor = 35
    meter = GpuMeter(True, nvml=nvml, clock=clock, settings=Settings(gpu_sample_s="0.1", gpu_devices="0"),
                     start=False)
    meter.edge("prefill", "start")
    clock.advance(0.5)
    meter.edge("prefill", "end")
    meter.edge("decode", "start")
    nvml.devices[0].set(util=100, sm=20)
    clock.advance(0.05)
    meter.edge("decode", "end")
    pre, dec = meter.phase("prefill"), meter.phase("decode")
    assert pre.gpu_util == pytest.approx(0.97) and pre.sampled_s == pytest.approx(0.5)
    assert pre.sm_active == pytest.approx(0.60) and pre.tensor_active == pytest.approx(0.35) and pre.gpm_reason is None
    assert dec.gpu_util == pytest.approx(1.0) and dec.sm_active is None and "0.050 s" in dec.gpm_reason
    status = meter.status()
    assert status.available and status.gpm and status.device_names == ["NVIDIA H100 80GB HBM3"]
    assert meter.driver() == "550.54.15"
    meter.close()
    assert not nvml.allocated and nvml.shutdowns == nvml.inits == 1

    ampere = TwoMetricNVML(clock, [("NVIDIA A100-SXM4-80GB", 90, None)])  # no GPM before Hopper
    meter = GpuMeter(True, nvml=ampere, clock=clock, settings=Settings(gpu_sample_s="0.1"), start=False)
    meter.edge("decode", "start")
    clock.advance(1.0)
    meter.edge("decode", "end")
    dec = meter.phase("decode")
    assert dec.gpu_util == pytest.approx(0.9) and dec.sm_active is None and "Hopper" in dec.gpm_reason
    assert not meter.status().gpm
    meter.close()
