"""`serving-mfu reference-run`: MFU, HFU, MBU and speed of light of a model measured directly, with no engine.

Why: the project's GPU side — the peak table, NVML/GPM sampling, the time split on a real device — had
only been tested with fakes, and vLLM's GPU wheel cannot be carried to the GPU machines we borrow.  Those
have torch, transformers and nvidia-ml-py, so this command runs a Llama-architecture model with random
weights (serving_mfu.tools.reference_model) as one static batch per batch size — a prefill of B prompts
of P tokens, then D decode steps on transformers' DynamicCache — and accounts for it exactly as an engine
is accounted for:

- each step becomes an `IterationRecord` (a `PrefillBatch` or a `DecodeBatch`) on the run's own timeline
  (CUDA events on a GPU, `time.perf_counter` on a CPU) and goes through `MFUTracker` — FLOP and byte
  models, time split, speed of light (DESIGN §11) — whose report gives the figures;
- the oracle: `FlopCounterMode` over one prefill and one decode step with eager attention, held to the
  tracker's cost of the same steps exactly (prefill attention by the causal rule, as
  `serving_mfu.tools.compare.oracle_check` does);
- beside MFU: NVML GPU-Util (serving_mfu.runtime.gpu_util's sampler) and, on Hopper and later, SM
  activity and tensor-pipe activity from one NVML GPM sample pair per phase; on a CPU, why not;
- the peak from detection with its source (serving_mfu.peaks.resolve), and a short calibration
  (matmul FLOP/s, memory bandwidth) held against it: above the peak is said loudly, never clamped.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel, Field

from serving_mfu.cost.flops import FlopModel
from serving_mfu.cost.records import DecodeBatch, IterationRecord, PrefillBatch
from serving_mfu.files import write_figure
from serving_mfu.format import pct, si
from serving_mfu.model.dtypes import normalize_dtype
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.calibrate import calibrate
from serving_mfu.peaks.cpu import read_machine
from serving_mfu.peaks.resolve import cpu_default_peak, resolve_peak
from serving_mfu.peaks.spec import PeakSpec
from serving_mfu.runtime.gpu_util import GPM_MIN_INTERVAL_S, GpuUtilSampler, engine_device_ids, parse_interval
from serving_mfu.runtime.settings import Settings, load_settings, read_settings
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.schema.report import PeakReport
from serving_mfu.tools.compare import OracleTerm, _Counted, _exact, _split_ours
from serving_mfu.tools.progress import calibration_progress
from serving_mfu.tools.reference_model import (
    build_model,
    count_oracle,
    model_config,
    release,
    run_batch,
    shape_summary,
    warm_up,
)

#: Defaults by where the run happens; each flag given overrides its entry.
DEFAULTS: dict[str, dict[str, Any]] = {
    "quick": {"shape": "tiny", "batches": (1, 4), "prompt_len": 32, "decode_steps": 8, "calibrate_s": 1.0},
    "cpu": {"shape": "tiny", "batches": (1, 8), "prompt_len": 256, "decode_steps": 32, "calibrate_s": 2.0},
    "cuda": {"shape": "8b", "batches": (1, 16, 64), "prompt_len": 2048, "decode_steps": 64, "calibrate_s": 3.0},
}
NO_GPU = "NVML: not available (no NVIDIA GPU)"


# ------------------------------------------------------------------------------- what the JSON holds
class ModelShape(BaseModel):
    """The model run: a named shape or a config file, its structure, parameters and dtype."""

    name: str
    dtype: str
    params: int
    shape: dict[str, Any] = Field(description="hidden size, layers, heads, KV heads, head_dim, MLP width, vocab")


class RunInfo(BaseModel):
    batches: list[int] = Field(description="batch sizes run, each a prefill then decode_steps decode steps")
    prompt_len: int = Field(description="P: tokens of every prompt (one length: no padding)")
    decode_steps: int
    attention: str = "sdpa"
    cache: str = Field(description="the KV cache class transformers used")
    timer: str
    logits_to_keep: int = 1
    torch: str
    transformers: str
    seconds: float = Field(description="wall time of the whole command")


class Calibration(BaseModel):
    """A short measurement of achievable matmul FLOP/s and bandwidth, held against the peak in use."""

    matmul_flops_per_s: float
    matmul_kernel: str
    bandwidth_bytes_per_s: float
    bandwidth_kernel: str
    matmul_of_peak: float | None = Field(description="matmul / peak FLOP/s (must be <= 1)")
    bandwidth_of_peak: float | None = Field(description="bandwidth / peak bandwidth (must be <= 1)")
    within_peak: bool | None = Field(description="both at or below the peak; null without a peak")
    duration_s: float
    source: str


class GpuFigures(BaseModel):
    """NVML figures over one phase of one batch; a null figure comes with its reason."""

    gpu_util: float | None = Field(description="mean NVML GPU-Util (0-1): a kernel was running")
    sm_active: float | None = Field(description="NVML GPM SM activity (0-1): fraction of SMs busy")
    tensor_active: float | None = Field(description="NVML GPM tensor-pipe activity (0-1), any tensor pipe")
    sampled_s: float = Field(description="seconds of GPU-Util samples in the phase")
    reason: str | None = Field(default=None, description="why gpu_util is null")
    gpm_reason: str | None = Field(default=None, description="why sm_active / tensor_active are null")


class GpuStatus(BaseModel):
    """What NVML measures in this run, or why not."""

    available: bool
    reason: str | None = Field(description="why GPU-Util is not sampled")
    device_names: list[str] = Field(default_factory=list)
    gpm: bool = Field(default=False, description="SM and tensor-pipe activity read (NVML GPM, Hopper+)")
    gpm_reason: str | None = None
    interval_s: float | None = None


class PhaseFigures(BaseModel):
    """One phase of one batch, from the tracker's report (fractions 0-1; null without a peak)."""

    batch: int
    steps: int
    tokens: int
    time_s: float
    mean_step_s: float
    mfu: float | None
    hfu: float | None
    mbu: float | None
    sol: float | None
    useful_flops: float
    executed_flops: float
    moved_bytes: float
    lever: str | None = Field(description="the largest loss, and what to do about it")
    gpu_util: GpuFigures


class BatchResult(BaseModel):
    batch: int
    prefill: PhaseFigures
    decode: PhaseFigures
    peak_credible: bool | None = Field(description="false: HFU or SOL above 1 — the peak is not an upper bound")


class OraclePhase(BaseModel):
    """Ours (the tracker's executed FLOPs of the timed step) against FlopCounterMode on the same step."""

    ours_flops: int
    flop_counter: int | float = Field(description="FlopCounterMode; prefill: its s×s attention square "
                                                  "halved to the causal s(s+1)/2 pairs")
    flop_counter_raw: int = Field(description="FlopCounterMode as counted (eager attention's full square)")
    equal: bool
    terms: dict[str, OracleTerm]
    other_ops: dict[str, int] = Field(default_factory=dict, description="FLOPs in ops neither matmul nor attention")


class Oracle(BaseModel):
    batch: int
    prompt_len: int
    attention: str = "eager"
    prefill: OraclePhase
    decode: OraclePhase


class ReferenceRun(BaseModel):
    """Everything `serving-mfu reference-run --json` prints.  `prefill` and `decode` are the first batch's."""

    device: str
    driver: str | None
    cuda: str | None
    model: ModelShape
    run: RunInfo
    peak: PeakReport
    calibration: Calibration | None
    prefill: PhaseFigures
    decode: PhaseFigures
    batches: list[BatchResult]
    oracle: Oracle
    gpu_util: GpuStatus
    warnings: list[str] = Field(default_factory=list, description="what breaks an invariant, loudly")


# ------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class RunOptions:
    device: str
    shape: str | None
    config: str | None
    batches: tuple[int, ...]
    prompt_len: int
    decode_steps: int
    dtype: str
    calibrate_s: float


def _torch_device(device: str | None) -> str:
    """`cpu` or `cuda` (the default where torch sees a GPU); ValueError for anything else, or a missing GPU."""
    if device is not None and device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: choose cpu or cuda")
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"reference-run needs torch and transformers: {exc}") from None
    has_gpu = torch.cuda.is_available()
    if device == "cuda" and not has_gpu:
        build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU ({build})")
    return device or ("cuda" if has_gpu else "cpu")


def parse_batches(text: str) -> tuple[int, ...]:
    """`"1,16,64"` → (1, 16, 64); ValueError for anything but positive integers."""
    try:
        batches = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise ValueError(f"bad --batch {text!r}: expected positive integers, e.g. 1,16,64")
    return batches


def resolve_options(device: str | None = None, quick: bool = False, shape: str | None = None,
                    config: str | None = None, batch: str | None = None, prompt_len: int | None = None,
                    decode_steps: int | None = None, dtype: str | None = None,
                    calibrate_s: float | None = None) -> RunOptions:
    """The run the flags ask for: each flag left out from DEFAULTS (quick, or by device)."""
    dev = _torch_device(device)
    base = DEFAULTS["quick" if quick else dev]
    dt = normalize_dtype(dtype or ("bf16" if dev == "cuda" else "fp32"))
    if dt not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"reference-run runs bf16, fp16 or fp32 weights, not {dt}")
    for flag, value in (("--prompt-len", prompt_len), ("--decode-steps", decode_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if shape is not None and config is not None:
        raise ValueError("give --shape or --config, not both")
    return RunOptions(device=dev, shape=None if config else (shape or base["shape"]), config=config,
                      batches=parse_batches(batch) if batch else base["batches"],
                      prompt_len=prompt_len or base["prompt_len"], decode_steps=decode_steps or base["decode_steps"],
                      dtype=dt, calibrate_s=base["calibrate_s"] if calibrate_s is None else calibrate_s)


# ------------------------------------------------------------------------------- peak and calibration
def run_peak(dtype: str, device: str, settings: Settings) -> PeakSpec | None:
    """The peak the tracker divides by: SERVING_MFU_* settings if any, else detection — on a CPU run the CPU's
    default peak even where a GPU is present (it is not the device doing the work)."""
    inputs = settings.peak_inputs()
    given = any(inputs[k] is not None for k in ("device", "flops_per_s", "bandwidth_bytes_per_s", "calibration_file"))
    if device == "cpu" and not given:
        return cpu_default_peak(dtype, inputs["cache_dir"])
    return resolve_peak(dtype, **inputs)


def calibration_check(peak: PeakSpec | None, dtype: str, device: str, duration_s: float,
                      progress: bool) -> Calibration | None:
    """`serving-mfu calibrate` for `duration_s` (torch's kernels, not vLLM's), held against the peak; None when
    `duration_s` is 0."""
    if duration_s <= 0:
        return None
    with calibration_progress(enabled=progress) as on_event:
        got = calibrate(dtype, duration_s, device, on_event=on_event, include_vllm=False)
    top = max(got.measurements or [], key=lambda r: r.flops_per_s)
    bw = max(got.bandwidth_measurements or [], key=lambda r: r.bytes_per_s)
    mm_ratio = got.flops_per_s / peak.flops_per_s if peak else None
    bw_ratio = got.bandwidth_bytes_per_s / peak.bandwidth_bytes_per_s if peak else None
    return Calibration(matmul_flops_per_s=got.flops_per_s, matmul_kernel=f"{top.kernel} {top.dtype} at {top.shape}",
                       bandwidth_bytes_per_s=got.bandwidth_bytes_per_s, bandwidth_kernel=f"{bw.kernel}: {bw.shape}",
                       matmul_of_peak=mm_ratio, bandwidth_of_peak=bw_ratio,
                       within_peak=None if peak is None else mm_ratio <= 1 and bw_ratio <= 1,
                       duration_s=duration_s, source=got.source)


# ------------------------------------------------------------------------------- NVML
class GpuMeter:
    """GPU-Util over each phase (the project's NVML sampler, ticked at the phase's edges) and, where NVML GPM
    exists (Hopper and later), SM and tensor-pipe activity from one GPM sample pair per phase.

    On a CPU run it starts nothing and says why.  `nvml`, `clock` and `start` (the sampler's thread) are seams
    for tests; nothing raises."""

    def __init__(self, on_gpu: bool, *, nvml: Any = None, clock: Callable[[], float] = time.monotonic,
                 settings: Settings | None = None, start: bool = True):
        self.clock = clock
        self.sampler: GpuUtilSampler | None = None
        self.reason: str | None = None
        self.gpm_reason: str | None = None
        self._pair: list[Any] = []  # two GPM samples: a phase's start and end
        self._gpm_start_error: str | None = None
        self._start: dict[str, tuple[float, dict[str, Any]]] = {}
        self.figures: dict[str, GpuFigures] = {}
        if not on_gpu:
            probe = GpuUtilSampler([0], nvml=nvml, start=False, clock=clock)
            probe.stop()
            self.reason = (f"not sampled: the model runs on the CPU (NVML sees {', '.join(probe.device_names)})"
                           if probe.available else f"{NO_GPU}: {probe.reason}")
            return
        settings = settings if settings is not None else load_settings()[0]
        interval, off = parse_interval(settings.gpu_sample_s)
        ids, _ = engine_device_ids(None, explicit=settings.gpu_devices)
        self.sampler = GpuUtilSampler(ids[:1], interval, nvml, start=start, clock=clock, disabled_reason=off)
        status = self.sampler.status()
        self.reason = status.reason
        if self.sampler.available and self.sampler.devices[0].gpm:
            try:
                self._pair = [self.sampler.nvml.nvmlGpmSampleAlloc(), self.sampler.nvml.nvmlGpmSampleAlloc()]
            except Exception as exc:  # noqa: BLE001 - said, not raised
                self.gpm_reason = f"NVML GPM samples could not be allocated: {exc}"
        else:
            self.gpm_reason = status.sm_active_reason or status.reason

    def edge(self, phase: str, edge: str) -> None:
        """A phase starts or ends (the device is synchronized): read GPU-Util, and a GPM sample."""
        s = self.sampler
        if s is None or not s.available:
            return
        s.tick()
        now, snap = self.clock(), s.snapshot()
        gpm_error = self._gpm_sample(0 if edge == "start" else 1)
        if edge == "start":
            self._start[phase] = (now, snap)
            self._gpm_start_error = gpm_error
            return
        t0, snap0 = self._start.pop(phase)
        sampled = snap["gpu_sampled_s"] - snap0["gpu_sampled_s"]
        util = (snap["gpu_util_s"] - snap0["gpu_util_s"]) / sampled if sampled > 0 else None
        sm, tensor, why = self._gpm_pair(now - t0, self._gpm_start_error or gpm_error)
        self.figures[phase] = GpuFigures(gpu_util=util, sm_active=sm, tensor_active=tensor, sampled_s=sampled,
                                         reason=None if util is not None else "no GPU-Util sample in the phase",
                                         gpm_reason=why)

    def _gpm_sample(self, which: int) -> str | None:
        if not self._pair:
            return None
        try:
            self.sampler.nvml.nvmlGpmSampleGet(self.sampler.devices[0].handle, self._pair[which])
        except Exception as exc:  # noqa: BLE001
            return f"NVML GPM sample failed: {exc}"
        return None

    def _gpm_pair(self, span_s: float, error: str | None) -> tuple[float | None, float | None, str | None]:
        """(SM activity, tensor-pipe activity, why not) over the phase's GPM sample pair."""
        if not self._pair or error:
            return None, None, error or self.gpm_reason
        if span_s < GPM_MIN_INTERVAL_S:
            return None, None, f"the phase lasted {span_s:.3f} s, under GPM's {GPM_MIN_INTERVAL_S} s minimum"
        nvml = self.sampler.nvml
        try:
            get = nvml.c_nvmlGpmMetricsGet_t()
            get.version, get.numMetrics = nvml.NVML_GPM_METRICS_GET_VERSION, 2
            get.metrics[0].metricId = nvml.NVML_GPM_METRIC_SM_UTIL
            get.metrics[1].metricId = nvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL
            get.sample1, get.sample2 = self._pair
            nvml.nvmlGpmMetricsGet(get)
            values = [m.value / 100.0 if getattr(m, "nvmlReturn", 0) == getattr(nvml, "NVML_SUCCESS", 0) else None
                      for m in (get.metrics[0], get.metrics[1])]
        except Exception as exc:  # noqa: BLE001
            return None, None, f"NVML GPM metrics failed: {exc}"
        return values[0], values[1], None if None not in values else "a GPM metric returned an NVML error"

    def phase(self, name: str) -> GpuFigures:
        """The figures of the last run of phase `name`, or nulls with the reason."""
        return self.figures.get(name) or GpuFigures(gpu_util=None, sm_active=None, tensor_active=None,
                                                    sampled_s=0.0, reason=self.reason, gpm_reason=self.gpm_reason
                                                    or self.reason)

    def status(self) -> GpuStatus:
        s = self.sampler
        if s is None or not s.available:
            return GpuStatus(available=False, reason=self.reason, gpm_reason=self.gpm_reason or self.reason)
        return GpuStatus(available=True, reason=None, device_names=list(s.device_names), gpm=bool(self._pair),
                         gpm_reason=self.gpm_reason, interval_s=s.interval_s)

    def driver(self) -> str | None:
        s = self.sampler
        try:
            raw = s.nvml.nvmlSystemGetDriverVersion() if s is not None and s.available else None
        except Exception:  # noqa: BLE001
            return None
        return raw.decode() if isinstance(raw, bytes) else raw

    def close(self) -> None:
        for sample in self._pair:
            with contextlib.suppress(Exception):
                self.sampler.nvml.nvmlGpmSampleFree(sample)
        self._pair = []
        if self.sampler is not None:
            self.sampler.stop()


# ------------------------------------------------------------------------------- the run
def step_records(steps: list[Any], batch: int, prompt_len: int, tag: str) -> list[IterationRecord]:
    """The run's steps as an engine's hook would record them: a prefill of `batch` whole prompts, then decode
    steps whose requests have `prompt_len + k` positions computed before step k."""
    ids = [f"{tag}-{i}" for i in range(batch)]
    out = []
    for n, s in enumerate(steps):
        prefill = decode = None
        if s.phase == "prefill":
            prefill = PrefillBatch(req_ids=ids, new_tokens=[prompt_len] * batch, computed_before=[0] * batch,
                                   prompt_len=[prompt_len] * batch)
        else:
            decode = DecodeBatch(req_ids=ids, computed_before=[prompt_len + n - 1] * batch)
        out.append(IterationRecord(step=n, t_sched_s=s.t_start_s, t_end_s=s.t_end_s, slices=[], prefill=prefill,
                                   decode=decode, engine=tag))
    return out


def _phase(ph: Any, batch: int, steps: int, gpu: GpuFigures) -> PhaseFigures:
    return PhaseFigures(batch=batch, steps=steps, tokens=ph.tokens, time_s=ph.time_s, mean_step_s=ph.time_s / steps,
                        mfu=ph.mfu, hfu=ph.hfu, mbu=ph.mbu, sol=ph.sol, useful_flops=ph.useful_flops,
                        executed_flops=ph.executed_flops, moved_bytes=ph.bytes,
                        lever=ph.lever.text if ph.lever else None, gpu_util=gpu)


@dataclass
class _Measured:
    result: BatchResult
    peak: PeakReport
    prefill_flops: float  # the tracker's executed FLOPs of the timed prefill step
    decode_flops: float  # ... and of the first decode step (context prompt_len + 1)


def measure_batch(model: Any, spec: ModelSpec, peak: PeakSpec | None, batch: int, opts: RunOptions,
                  meter: GpuMeter, on_step: Callable[[str], None]) -> tuple[_Measured, str]:
    """One batch through prefill and decode, each step recorded into a fresh tracker; its figures and the
    cache class transformers used."""
    steps, cache = run_batch(model, batch, opts.prompt_len, opts.decode_steps, on_phase=meter.edge,
                             on_step=on_step)
    tracker = MFUTracker(spec, peak, clock=None)  # the records carry the run's own clock
    costs = [tracker.record(rec) for rec in step_records(steps, batch, opts.prompt_len, f"b{batch}")]
    report = tracker.report()
    if any(c is None for c in costs):
        raise RuntimeError(f"the tracker could not account a step: {report.anomalies.counts}")
    release(opts.device)
    result = BatchResult(batch=batch, prefill=_phase(report.prefill, batch, 1, meter.phase("prefill")),
                         decode=_phase(report.decode, batch, opts.decode_steps, meter.phase("decode")),
                         peak_credible=report.peak.credible)
    return _Measured(result, report.peak, costs[0].prefill.executed_flops, costs[1].decode.executed_flops), cache


def pick_oracle_batch(batches: tuple[int, ...], heads: int, prompt_len: int, limit_bytes: int = 1 << 30) -> int:
    """The largest batch whose eager attention scores of one layer (batch × heads × P² in fp32) fit `limit_bytes`,
    else the smallest: the oracle counts FLOPs on that batch's prefill and first decode step."""
    fits = [b for b in batches if b * heads * prompt_len**2 * 4 <= limit_bytes]
    return max(fits) if fits else min(batches)


def _exact_int(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def oracle_phase(counted: _Counted, ours_flops: float, breakdown: dict[str, int], batch: int,
                 prompt_len: int | None) -> OraclePhase:
    """Ours against FlopCounterMode for one step of `batch` requests; `prompt_len` for a prefill (its attention
    square: oracle·(s+1) == ours·2s), None for a decode (every term exact)."""
    lin, lm, att = (batch * x for x in _split_ours(breakdown))
    terms = {"linear": _exact(counted.linear, lin), "lm_head": _exact(counted.lm_head, lm)}
    attention = counted.attention
    if prompt_len is None:
        terms["attention"] = _exact(counted.attention, att)
    else:
        s = prompt_len
        terms["attention"] = OracleTerm(oracle=counted.attention, ours=att, relation="oracle·(s+1) == ours·2s",
                                        match=counted.attention * (s + 1) == att * 2 * s)
        attention = _exact_int(counted.attention * (s + 1) / (2 * s))
    counter = counted.linear + counted.lm_head + attention
    equal = (all(t.match for t in terms.values()) and not counted.other
             and ours_flops == lin + lm + att == counter)
    return OraclePhase(ours_flops=int(ours_flops), flop_counter=counter,
                       flop_counter_raw=counted.linear + counted.lm_head + counted.attention, equal=equal,
                       terms=terms, other_ops=counted.other)


def _versions(device: str) -> tuple[str, str | None, str, str]:
    """(device name, CUDA version, torch version, transformers version)."""
    import torch
    import transformers

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        try:
            name = f"cpu ({read_machine()[0].model_name}, {torch.get_num_threads()} threads)"
        except OSError:
            name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return name, torch.version.cuda if device == "cuda" else None, torch.__version__, transformers.__version__


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    """A transient bar on stderr: `advance(text)` after each step."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not enabled) as bar:
        task = bar.add_task("reference-run", total=total)
        yield lambda text: bar.update(task, advance=1, description=text)


def reference_run(opts: RunOptions, progress: bool = True, settings: Settings | None = None) -> ReferenceRun:
    """Build the model, calibrate, run every batch, count the oracle, and gather the figures."""
    t0 = time.perf_counter()
    settings = settings if settings is not None else read_settings()
    name, cfg = model_config(opts.shape, opts.config, opts.dtype, opts.prompt_len + opts.decode_steps + 1)
    spec = ModelSpec.from_hf_config(cfg)
    peak = run_peak(opts.dtype, opts.device, settings)
    calibration = calibration_check(peak, opts.dtype, opts.device, opts.calibrate_s, progress)
    model = build_model(cfg, opts.device)
    meter = GpuMeter(opts.device == "cuda", settings=settings)
    oracle_batch = pick_oracle_batch(opts.batches, int(cfg["num_attention_heads"]), opts.prompt_len)
    try:
        with _progress(progress, len(opts.batches) * (1 + opts.decode_steps) + 1) as advance:
            warm_up(model, opts.batches[0], opts.prompt_len)
            runs = [measure_batch(model, spec, peak, b, opts, meter, lambda ph, b=b: advance(f"batch {b}: {ph}"))
                    for b in opts.batches]
            counted = count_oracle(model, oracle_batch, opts.prompt_len)
            advance("oracle (FlopCounterMode, eager attention)")
        status, driver = meter.status(), meter.driver()
    finally:
        meter.close()
    measured = [m for m, _ in runs]
    fm, s, at = FlopModel(spec), opts.prompt_len, measured[opts.batches.index(oracle_batch)]
    oracle = Oracle(batch=oracle_batch, prompt_len=s,
                    prefill=oracle_phase(counted[0], at.prefill_flops, fm.slice_breakdown(s, s, 1), oracle_batch, s),
                    decode=oracle_phase(counted[1], at.decode_flops, fm.slice_breakdown(1, s + 1, 1), oracle_batch,
                                        None))
    device, cuda, torch_version, tf_version = _versions(opts.device)
    results = [m.result for m in measured]
    run = ReferenceRun(
        device=device, driver=driver, cuda=cuda,
        model=ModelShape(name=name, dtype=opts.dtype, params=sum(p.numel() for p in model.parameters()),
                         shape=shape_summary(cfg)),
        run=RunInfo(batches=list(opts.batches), prompt_len=s, decode_steps=opts.decode_steps, cache=runs[0][1],
                    timer="CUDA events" if opts.device == "cuda" else "time.perf_counter",
                    torch=torch_version, transformers=tf_version, seconds=0.0),
        peak=measured[0].peak, calibration=calibration, prefill=results[0].prefill, decode=results[0].decode,
        batches=results, oracle=oracle, gpu_util=status)
    run.warnings = run_warnings(run)
    run.run.seconds = time.perf_counter() - t0
    return run


def run_warnings(run: ReferenceRun) -> list[str]:
    """What breaks an invariant or leaves a figure out, one sentence each (printed loudly, never clamped)."""
    out = []
    if run.peak.flops_per_s is None:
        out.append(f"no peak for {run.device}: MFU, HFU, MBU and SOL are null; set SERVING_MFU_DEVICE (a table "
                   "device) or SERVING_MFU_PEAK_FLOPS and SERVING_MFU_PEAK_BANDWIDTH")
    c = run.calibration
    if c is not None and c.within_peak is False:
        hint = (" (a CPU's default bandwidth is a short reading at start: `serving-mfu calibrate` caches a longer "
                "one as this machine's peak)" if run.device.startswith("cpu") else "")
        out.append(f"the calibration measured ABOVE the peak (matmul {pct(c.matmul_of_peak, 0)}, bandwidth "
                   f"{pct(c.bandwidth_of_peak, 0)} of it): the peak is not an upper bound on this machine{hint}")
    for b in run.batches:
        if b.peak_credible is False:
            out.append(f"batch {b.batch}: HFU or SOL above 1 — the peak is not an upper bound, or the clock is off")
    for phase in ("prefill", "decode"):
        if not getattr(run.oracle, phase).equal:
            out.append(f"oracle: {phase} FLOPs differ from FlopCounterMode — the FLOP model is wrong for this shape")
    return out


# ------------------------------------------------------------------------------- output
def _frac(x: float | None) -> str:
    """A fraction as a percentage with 3 significant digits where it is small (a CPU's MFU is a few in 10^4)."""
    return pct(x, digits=1 if x is None or abs(x) >= 0.01 else 3)


def gpu_line(run: ReferenceRun) -> str:
    """One line on NVML: what it read, or why not (on a CPU: `NVML: not available (no NVIDIA GPU)`)."""
    g = run.gpu_util
    if not g.available:
        reason = g.reason or "not sampled"
        return NO_GPU if reason.startswith(NO_GPU) else f"NVML: {reason}"
    gpm = "SM and tensor-pipe activity from NVML GPM" if g.gpm else f"no SM / tensor-pipe activity: {g.gpm_reason}"
    return f"NVML: {', '.join(g.device_names)}, driver {run.driver or '?'}; GPU-Util sampled; {gpm}"


def results_table(run: ReferenceRun) -> Any:
    from rich.table import Table

    m = run.model
    t = Table(title=f"serving-mfu reference-run: {m.name} ({si(m.params)} parameters, {m.dtype}) on {run.device}",
              caption=f"{run.run.prompt_len}-token prompts, {run.run.decode_steps} decode steps per batch; "
                      f"{run.run.attention} attention, {run.run.cache}, timed by {run.run.timer}")
    for col in ("batch", "phase", "tokens", "time", "per step", "MFU", "HFU", "MBU", "SOL", "GPU-Util", "SM active",
                "tensor active"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for b in run.batches:
        for phase in ("prefill", "decode"):
            ph = getattr(b, phase)
            g = ph.gpu_util
            t.add_row(str(b.batch), phase, str(ph.tokens), f"{ph.time_s:.4f} s", f"{1e3 * ph.mean_step_s:.2f} ms",
                      _frac(ph.mfu), _frac(ph.hfu), _frac(ph.mbu), _frac(ph.sol), _frac(g.gpu_util),
                      _frac(g.sm_active), _frac(g.tensor_active), end_section=phase == "decode")
    return t


def summary_lines(run: ReferenceRun) -> list[str]:
    """The lines under the table: peak and source, calibration, oracle, NVML, warnings (rich markup)."""
    from rich.markup import escape

    p = run.peak
    lines = [f"peak: {si(p.flops_per_s, 'FLOP/s')}, {si(p.bandwidth_bytes_per_s, 'B/s')} ({p.dtype}, {p.device}) — "
             f"{escape(p.source or 'no peak')}"]
    c = run.calibration
    if c is not None:
        style = "bold red" if c.within_peak is False else "green"
        lines.append(f"[{style}]calibrated here ({c.duration_s:g} s): matmul {si(c.matmul_flops_per_s, 'FLOP/s')} = "
                     f"{_frac(c.matmul_of_peak)} of the peak ({escape(c.matmul_kernel)}); bandwidth "
                     f"{si(c.bandwidth_bytes_per_s, 'B/s')} = {_frac(c.bandwidth_of_peak)} of the peak "
                     f"({escape(c.bandwidth_kernel)})[/{style}]")
    o = run.oracle
    for phase in ("prefill", "decode"):
        op = getattr(o, phase)
        verdict = "[green]equal[/green]" if op.equal else "[bold red]DIFFERENT[/bold red]"
        note = " (its attention square halved to the causal pairs)" if phase == "prefill" else ""
        lines.append(f"oracle, {phase} (batch {o.batch}, {o.prompt_len}-token prompts): ours {op.ours_flops:,} FLOPs, "
                     f"FlopCounterMode {op.flop_counter:,}{note}: {verdict}")
    lines.append(escape(gpu_line(run)))
    lines += [f"[bold red]{escape(w)}[/bold red]" for w in run.warnings]
    return lines


def print_reference_run(run: ReferenceRun, console: Any) -> None:
    console.print(results_table(run))
    for line in summary_lines(run):
        console.print(line, highlight=False)


PLOTTED = (("mfu", "MFU", "#2e7d32"), ("mbu", "MBU", "#1565c0"), ("sol", "SOL", "#6a1b9a"),
           ("gpu_util", "GPU-Util", "#9e9e9e"), ("sm_active", "SM active", "#ef6c00"),
           ("tensor_active", "tensor active", "#c62828"))
GPU_KEYS = ("gpu_util", "sm_active", "tensor_active")


def check_plot(path: str | None) -> None:
    """Before a long run: ValueError when `--plot` cannot be drawn (no matplotlib, e.g. on a bare GPU machine)."""
    import importlib.util

    if path is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (pip install matplotlib), or leave --plot out")


def plot_reference_run(run: ReferenceRun, path: Path) -> Path:
    """Two panels (prefill, decode): per batch, MFU, MBU and SOL beside GPU-Util, SM and tensor-pipe activity
    (log scale: a CPU's figures are fractions of a percent); a figure the run could not read is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value(b: BatchResult, phase: str, key: str) -> float | None:
        ph = getattr(b, phase)
        return getattr(ph.gpu_util if key in GPU_KEYS else ph, key)

    shown = [p for p in PLOTTED if any(value(b, ph, p[0]) for b in run.batches for ph in ("prefill", "decode"))]
    lowest = min((y for b in run.batches for ph in ("prefill", "decode") for key, *_ in shown
                  if (y := value(b, ph, key))), default=1.0)
    bottom = 10.0 ** math.floor(math.log10(min(lowest, 0.1)) - 0.5)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0), sharey=True)
    width = 0.8 / max(1, len(shown))
    for ax, phase in zip(axes, ("prefill", "decode")):
        for k, (key, label, color) in enumerate(shown):
            points = [(i + (k - (len(shown) - 1) / 2) * width, y) for i, b in enumerate(run.batches)
                      if (y := value(b, phase, key)) is not None and y > 0]
            if not points:
                continue
            bars = ax.bar([x for x, _ in points], [y for _, y in points], width, label=label, color=color)
            ax.bar_label(bars, [f"{100 * y:.2g}%" for _, y in points], fontsize=6, rotation=90, padding=2)
        ax.set_yscale("log")
        ax.set_ylim(bottom, 3.0)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(run.batches)), [f"batch {b.batch}" for b in run.batches])
        ax.set_title(phase, fontsize=10)
    axes[0].set_ylabel("fraction of peak / of time")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=len(shown), fontsize=7, loc="lower center")
    no_nvml = "" if run.gpu_util.available else f" — {gpu_line(run)}"
    fig.suptitle(f"reference-run: {run.model.name} ({run.model.dtype}, {run.run.prompt_len}-token prompts) on "
                 f"{run.device}{no_nvml}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    write_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
