"""`serving-mfu bench-overhead`: what the MFU hook costs a real vLLM engine, and what it costs per iteration.

Two measurements, one command:

1. Throughput with and without the hook.  The same fixed workload (N requests of P-token
   prompts cut from `engine_models.CORPUS`, M output tokens each, greedy, `ignore_eos`) runs on
   the vLLM CPU engine with vLLM's plain `Scheduler` and with `scheduler_hooks.MFUScheduler`,
   alternating plain / hooked / plain / hooked after one warm-up run per engine.  Both engines
   stay alive for the whole comparison when they fit (they are started once each); if the
   second one cannot start, every run starts and stops its own engine instead.  Prefix caching
   is off so that every repetition does the same prefill work.

2. Per-iteration accounting cost on the same SchedulerOutputs.  A third engine runs in this
   process (VLLM_ENABLE_V1_MULTIPROCESSING=0; the model itself still runs in a worker
   process), its scheduler is found at `llm.llm_engine.engine_core.engine_core.scheduler`, and
   the hook's callbacks are wrapped to keep, per iteration, the SchedulerOutput, the
   ModelRunnerOutput, the request state the hook reads and the IterationRecord it produced (and
   how long the hook took inside the engine).  Offline, every captured iteration is then
   replayed through (a) a fresh `MFUHook` (building the slices and recording them into a fresh
   `MFUTracker`: per-phase useful / executed FLOPs, bytes, time split, spec-decode, prefix
   cache, recompute) and (b) vLLM's `ModelMetrics(vllm_config).get_step_perf_stats_per_gpu`
   (total FLOPs, read and write bytes), timing each call.

vLLM is imported only inside the functions: the accounting core stays free of it (DESIGN §8).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import msgspec
from pydantic import BaseModel

from scheduler_hooks.hook import MFUHook
from scheduler_hooks.scheduler import MFUScheduler
from serving_mfu.format import si
from serving_mfu.model.spec import ModelSpec
from serving_mfu.runtime.settings import Settings
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.tools.engine_models import CORPUS, ensure_model
from serving_mfu.tools.envutil import environ as _environ
from serving_mfu.tools.server import CPU_MEMORY_FRACTION

HOOKED_SCHEDULER = "scheduler_hooks.MFUScheduler"
PLAIN_SCHEDULER = "vllm.v1.core.sched.scheduler.Scheduler"
SCHEDULER_PATH = "llm.llm_engine.engine_core.engine_core.scheduler"
# A fixed peak for the CPU engine when none is configured, so every run does the same full work (MFU,
# MBU, HFU checks) and skips the CPU default's engine-start bandwidth reading; it only has to exist,
# its value does not change the cost.
DEFAULT_PEAK = {"SERVING_MFU_PEAK_FLOPS": "1e12", "SERVING_MFU_PEAK_BANDWIDTH": "4e10"}
PEAK_SETTINGS = ("SERVING_MFU_DEVICE", "SERVING_MFU_PEAK_FLOPS", "SERVING_MFU_PEAK_BANDWIDTH",
                 "SERVING_MFU_CALIBRATION")

OURS_COMPUTES = [
    "per-slice classification: prefill / decode kept / decode rejected / discarded / recompute",
    "useful and executed FLOPs per phase (prefill, decode) incl. attention over the KV context",
    "bytes moved per phase (weights once per step, KV reads and writes, activations)",
    "busy / wall time of the step and its split between prefill and decode (shapley)",
    "spec-decode drafts, accepted and rejected tokens, drafter FLOPs",
    "prefix-cache hit tokens and saved FLOPs; recompute after preemption",
    "MFU / HFU / MBU of the step against the peak; cumulative and windowed counters",
]
VLLM_COMPUTES = [
    "one ExecutionContext per step: prefill vs decode by scheduled tokens (>1 = prefill)",
    "total FLOPs per GPU (attention, FFN, unembedding)",
    "total read and write bytes per GPU",
]


# ----------------------------------------------------------------------------- report models
class MachineInfo(BaseModel):
    cpu_model: str
    logical_cores: int
    usable_cores: int
    memory_gib: float | None
    platform: str
    python: str
    vllm: str
    torch: str
    accelerator: str | None


class ThroughputRun(BaseModel):
    variant: Literal["plain", "hooked"]
    repeat: int
    rounds: int  # the workload ran this many times back to back in this run
    seconds: float
    output_tokens: int
    tokens_per_s: float


class VariantStats(BaseModel):
    variant: Literal["plain", "hooked"]
    scheduler: str
    tokens_per_s: list[float]
    mean_tokens_per_s: float
    min_tokens_per_s: float
    max_tokens_per_s: float
    stdev_tokens_per_s: float


class ThroughputResult(BaseModel):
    requests: int
    prompt_tokens: int
    output_tokens_per_request: int
    repeats: int
    rounds_per_run: int  # workload rounds per timed run, so that a run lasts >= min_run_s
    min_run_s: float
    engines: Literal["concurrent", "restarted"]
    engine_start_s: dict[str, list[float]]
    runs: list[ThroughputRun]
    plain: VariantStats
    hooked: VariantStats
    ratio: float  # hooked mean / plain mean
    ratio_per_repeat: list[float]  # hooked_i / plain_i
    ratio_min: float
    ratio_max: float


class CostGroup(BaseModel):
    kind: str  # prefill / mixed / decode (dense engine), spec decode, moe prefill / moe decode ...
    batch: int  # requests scheduled in the iteration
    iterations: int
    tokens_per_iteration: float
    ours_us: float  # offline replay through MFUHook + MFUTracker inline, µs per iteration
    ours_no_attribution_us: float | None = None  # the same with attribution off (SERVING_MFU_ATTRIBUTION=0)
    vllm_us: float  # offline ModelMetrics.get_step_perf_stats_per_gpu, µs per iteration
    vllm_live_us: float  # live: vLLM's estimator on the engine thread after schedule(), thread CPU time
    engine_cpu_us: float  # live: the hook's callbacks on the engine thread, thread CPU time
    engine_hot_us: float  # offline: on_schedule + before_output in the hot replay loop (what the engine thread runs
    #                       but the O(1) hand-over of after_output), µs per iteration
    engine_wall_us: float  # live: the same callbacks' wall time (GIL waits included)
    accounting_cpu_us: float  # live: building and costing the record, accounting thread CPU time
    live_cpu_us: float  # engine_cpu_us + accounting_cpu_us: the hook's whole CPU time per step
    live_over_vllm: float | None  # live_cpu_us / vllm_live_us (target ≤ 0.5)
    ours_over_vllm: float | None  # ours_us / vllm_us
    at_requested_batch: bool  # batch is one of --batches (other sizes: waves filling up or draining)


class OfflineTarget(BaseModel):
    """One cell of target 1: offline ours / vLLM for a kind at a batch, against its limit."""

    kind: str
    batch: int
    ratio: float
    limit: float
    met: bool


#: Target 1's limits on offline ours / vLLM, at batches 256 and 1,024 (MoE counts routed experts, which
#: vLLM's estimator does not: a looser limit).
OFFLINE_LIMITS = {"decode": 0.5, "prefill": 0.5, "spec decode": 0.5, "moe prefill": 1.0, "moe decode": 1.0}
OFFLINE_TARGET_BATCHES = (256, 1024)


class AccountingResult(BaseModel):
    scheduler_path: str
    engines: list[str]
    engine_start_s: dict[str, float]
    batches: list[int]
    iterations: int
    passes: int
    replay_matches_engine: dict[str, bool]
    ours_us_per_iteration: float
    vllm_us_per_iteration: float
    engine_cpu_us_per_iteration: float
    accounting_cpu_us_per_iteration: float
    groups: list[CostGroup]
    worst_live_over_vllm: float | None  # live (engine + accounting) / vLLM, worst at a requested batch
    worst_live_group: str | None
    worst_offline_over_vllm: float | None
    worst_offline_group: str | None
    offline_targets: list["OfflineTarget"] = []  # target 1: offline ours / vLLM at the large batches, per kind
    #: per engine, offline: ours with attribution / without, over all its captured steps (the per-request
    #: accounts settle groups of steps at once, so single rows carry other steps' share of that work)
    attribution_ratio: dict[str, float] = {}
    engine_growth: dict[str, float]  # target 2: engine_cpu_us at the largest batch / at 16, per kind (≤ 2)
    engine_hot_growth: dict[str, float]  # the same for engine_hot_us: the callbacks' own work, caches warm
    engine_growth_batches: tuple[int, int]
    ours_computes: list[str]
    vllm_computes: list[str]
    ours_totals: dict[str, float]
    vllm_totals: dict[str, float]


class OverheadReport(BaseModel):
    machine: MachineInfo
    model: str
    peak: str
    throughput: ThroughputResult
    accounting: AccountingResult | None
    wall_s: float


# ----------------------------------------------------------------------------- machine
def machine_info() -> MachineInfo:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    import torch

    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # pragma: no cover - vllm is required to run the benchmark at all
        vllm_version = "not installed"
    accel = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return MachineInfo(cpu_model=cpu, logical_cores=os.cpu_count() or 1, usable_cores=usable, memory_gib=mem,
                       platform=platform.platform(), python=platform.python_version(), vllm=vllm_version,
                       torch=torch.__version__, accelerator=accel)


# ----------------------------------------------------------------------------- plumbing
@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to fd 1 (vLLM's logs, its engine processes') to stderr meanwhile.

    Engine processes started inside inherit the redirected fd, so `--json` output stays clean.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    os.dup2(2, 1)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class _Steps:
    """A progress display (stderr) of the benchmark's phases, and Ctrl-C bookkeeping.

    A Ctrl-C also reaches the engine processes (same process group).  vLLM can swallow the
    KeyboardInterrupt in the main process (an engine that dies while starting becomes a plain
    RuntimeError, or a wait for its READY message that only times out after minutes), so the first
    Ctrl-C also arms a 1-second alarm that raises KeyboardInterrupt again until the benchmark's own
    clean-up (`disarm`) takes over and shuts the engines down.
    """

    def __init__(self, total: int, enabled: bool):
        self.progress = None
        self.interrupted = False
        self._armed = False
        self._handlers: dict[int, Any] = {}
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                     console=Console(stderr=True), transient=True)
            self.task = self.progress.add_task("bench-overhead", total=total)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if not self.interrupted:
            self.interrupted = self._armed = True
            signal.setitimer(signal.ITIMER_REAL, 1.0, 1.0)
        raise KeyboardInterrupt

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self._armed:
            raise KeyboardInterrupt

    def disarm(self) -> None:
        """Stop re-raising: called first thing by the code that shuts engines down."""
        if self._armed:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def __enter__(self) -> "_Steps":
        if threading.current_thread() is threading.main_thread():
            self._handlers = {signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint),
                              signal.SIGALRM: signal.signal(signal.SIGALRM, self._on_alarm)}
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()
        if self.progress is not None:
            self.progress.stop()
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)

    def check(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        self.check()
        if self.progress is not None:
            self.progress.update(self.task, description=description)
        yield
        self.check()
        if self.progress is not None:
            self.progress.advance(self.task)


def resolve_model(model: str | None) -> str:
    """A local model folder: the given path, or the embedded tiny model (built on first use)."""
    if model:
        if not Path(model).exists():
            raise FileNotFoundError(f"model folder {model} not found")
        return str(model)
    return str(ensure_model("tiny-llama-engine"))


def workload_prompts(model_path: str, requests: int, prompt_len: int) -> list[dict[str, list[int]]]:
    """`requests` prompts of exactly `prompt_len` token ids, cut from the corpus at distinct offsets."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(CORPUS, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{model_path}: the tokenizer produced no tokens for the corpus")
    stride = 37  # distinct starting points: no two prompts share a prefix
    return [{"prompt_token_ids": [ids[(i * stride + j) % len(ids)] for j in range(prompt_len)]}
            for i in range(requests)]


def _engine_args(model_path: str, scheduler: str, max_model_len: int, max_num_seqs: int, kv_cache_mib: int,
                 **extra: Any) -> dict[str, Any]:
    # stats on, as the API server runs (`LLM` turns them off): the hook then reads a draft step's
    # accepted counts on the accounting thread, not the engine's
    return dict(model=model_path, scheduler_cls=scheduler, enforce_eager=True, seed=0, disable_log_stats=False,
                gpu_memory_utilization=CPU_MEMORY_FRACTION, kv_cache_memory_bytes=kv_cache_mib << 20,
                max_model_len=max_model_len, max_num_seqs=max_num_seqs, **extra)


def _shutdown(llm: Any) -> None:
    """Stop an LLM's engine (its processes, or the in-process EngineCore); never raises."""
    if llm is None:
        return
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


def _generate(llm: Any, prompts: list, params: Any) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    return dt, sum(len(o.outputs[0].token_ids) for o in outs)


def _variant_stats(variant: str, scheduler: str, values: list[float]) -> VariantStats:
    return VariantStats(variant=variant, scheduler=scheduler, tokens_per_s=values,
                        mean_tokens_per_s=statistics.fmean(values), min_tokens_per_s=min(values),
                        max_tokens_per_s=max(values),
                        stdev_tokens_per_s=statistics.stdev(values) if len(values) > 1 else 0.0)


# ----------------------------------------------------------------------------- 1. throughput
_SCHEDULERS = {"plain": PLAIN_SCHEDULER, "hooked": HOOKED_SCHEDULER}


class _ThroughputBench:
    """One plain-vs-hooked comparison: the workload, the engines alive, their start times and the timed runs.

    `mode` starts as "concurrent" (both engines kept alive) and becomes "restarted" (one engine per run)
    when asked to or when the second engine does not fit beside the first.
    """

    def __init__(self, model_path: str, requests: int, prompt_len: int, output_len: int, kv_cache_mib: int,
                 steps: _Steps, concurrent: bool, min_run_s: float):
        from vllm import LLM, SamplingParams

        self.llm_cls = LLM
        self.model_path, self.requests, self.kv_cache_mib = model_path, requests, kv_cache_mib
        self.steps, self.min_run_s = steps, min_run_s
        self.prompts = workload_prompts(model_path, requests, prompt_len)
        self.params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self.max_len = prompt_len + output_len + 64
        self.starts: dict[str, list[float]] = {"plain": [], "hooked": []}
        self.runs: list[ThroughputRun] = []
        self.engines: dict[str, Any] = {}
        self.warm: list[float] = []
        self.rounds = 0
        self.mode: Literal["concurrent", "restarted"] = "concurrent" if concurrent else "restarted"

    def start(self, variant: str) -> tuple[Any, float]:
        """A fresh engine with the variant's scheduler (prefix caching off), and how long it took to start."""
        t0 = time.perf_counter()
        llm = self.llm_cls(**_engine_args(self.model_path, _SCHEDULERS[variant], self.max_len, max(self.requests, 1),
                                          self.kv_cache_mib, enable_prefix_caching=False))
        return llm, time.perf_counter() - t0

    def warm_up(self, variant: str, llm: Any) -> None:
        """Two untimed rounds; the second one's time (kept in `warm`) sizes `rounds`."""
        with self.steps.step(f"warm-up, {variant}"):
            _generate(llm, self.prompts, self.params)  # the first round carries one-off costs
            self.warm.append(_generate(llm, self.prompts, self.params)[0])

    def rounds_for(self, seconds: float) -> int:
        """Workload rounds per timed run so that a run of `seconds` per round lasts at least `min_run_s`."""
        return max(1, math.ceil(self.min_run_s / max(seconds, 1e-6)))

    def start_both(self) -> None:
        """Start and warm up both engines; if the second does not fit, stop the first and switch to restarted."""
        try:
            for variant in ("plain", "hooked"):
                with self.steps.step(f"starting the {variant} engine"):
                    self.engines[variant], dt = self.start(variant)
                    self.starts[variant].append(dt)
        except Exception as exc:  # the second engine does not fit beside the first: one at a time
            self.steps.check()
            if not self.engines:
                raise
            print(f"bench-overhead: two engines do not fit at once ({exc!r}); restarting per run",
                  file=sys.stderr)
            for llm in self.engines.values():
                _shutdown(llm)
            self.engines.clear()
            self.mode = "restarted"
        else:
            for variant in ("plain", "hooked"):
                self.warm_up(variant, self.engines[variant])
            self.rounds = self.rounds_for(min(self.warm))

    def timed_run(self, rep: int, repeats: int, variant: str) -> None:
        """One timed run of one variant, kept in `runs`; when restarted, its engine is started and stopped here."""
        llm = self.engines.get(variant)
        if self.mode == "restarted":
            with self.steps.step(f"starting the {variant} engine (run {rep + 1})"):
                llm, dt = self.start(variant)
                self.engines[variant] = llm
                self.starts[variant].append(dt)
            self.warm_up(variant, llm)
            self.rounds = self.rounds or self.rounds_for(self.warm[-1])
        with self.steps.step(f"run {rep + 1}/{repeats}, {variant} ({self.rounds} rounds)"):
            dt, tokens = 0.0, 0
            for _ in range(self.rounds):
                d, k = _generate(llm, self.prompts, self.params)
                dt, tokens = dt + d, tokens + k
        self.runs.append(ThroughputRun(variant=variant, repeat=rep, rounds=self.rounds, seconds=dt,
                                       output_tokens=tokens, tokens_per_s=tokens / dt))
        if self.mode == "restarted":
            _shutdown(self.engines.pop(variant))

    def shut_down(self) -> None:
        """Stop re-raising Ctrl-C, then stop every engine still alive; never raises."""
        self.steps.disarm()
        for llm in self.engines.values():
            _shutdown(llm)
        self.engines.clear()
        gc.collect()

    def result(self, prompt_len: int, output_len: int, repeats: int) -> ThroughputResult:
        """Per-variant statistics of the timed runs and the hooked / plain ratios, per repetition and overall."""
        plain = [r.tokens_per_s for r in self.runs if r.variant == "plain"]
        hooked = [r.tokens_per_s for r in self.runs if r.variant == "hooked"]
        ps, hs = _variant_stats("plain", PLAIN_SCHEDULER, plain), _variant_stats("hooked", HOOKED_SCHEDULER, hooked)
        per_rep = [h / p for p, h in zip(plain, hooked)]
        return ThroughputResult(requests=self.requests, prompt_tokens=prompt_len, output_tokens_per_request=output_len,
                                repeats=repeats, rounds_per_run=self.rounds, min_run_s=self.min_run_s,
                                engines=self.mode, engine_start_s=self.starts, runs=self.runs, plain=ps, hooked=hs,
                                ratio=hs.mean_tokens_per_s / ps.mean_tokens_per_s, ratio_per_repeat=per_rep,
                                ratio_min=min(per_rep), ratio_max=max(per_rep))


def bench_throughput(model_path: str, requests: int, prompt_len: int, output_len: int, repeats: int,
                     kv_cache_mib: int, steps: _Steps, concurrent: bool = True,
                     min_run_s: float = 5.0) -> ThroughputResult:
    """Output tokens/s of the plain and the hooked engine, alternating plain/hooked per repetition.

    Each timed run repeats the workload back to back (`rounds`, the same for every run, chosen
    from the warm-up) so that it lasts at least `min_run_s`: one round of the default workload
    takes a fraction of a second on the tiny model, too short to time.
    """
    bench = _ThroughputBench(model_path, requests, prompt_len, output_len, kv_cache_mib, steps, concurrent, min_run_s)
    try:
        if concurrent:
            bench.start_both()
        for rep in range(repeats):
            for variant in ("plain", "hooked"):
                bench.timed_run(rep, repeats, variant)
    finally:
        bench.shut_down()
    return bench.result(prompt_len, output_len, repeats)


# ----------------------------------------------------------------------------- 2. capture
@dataclass
class CapturedIteration:
    """One engine step, as the hook saw it."""

    engine: str  # the ENGINE_KINDS entry it ran on
    out: Any  # SchedulerOutput
    runner_out: Any = None  # ModelRunnerOutput
    result: Any = None  # what update_from_output returned (EngineCoreOutputs by client)
    sampled_lengths: list[int] | None = None  # len of each sampled list before vLLM trimmed them
    trimmed_lengths: list[int] | None = None  # and after (what the accounting thread reads with stats on)
    log_stats: bool = False  # the scheduler's log_stats: which path the hook's before_output took
    record: Any = None  # the IterationRecord the engine's hook produced
    vllm_cpu_ns: int = 0  # CPU time of vLLM's estimator on the same step, on the engine thread, live
    engine_cpu_ns: int = 0  # CPU time (time.thread_time) of the three callbacks on the engine thread
    engine_wall_ns: int = 0  # the same callbacks' wall time (GIL waits included)
    accounting_cpu_ns: int = 0  # CPU time of building and costing the record on the accounting thread


class _Capture:
    """The observer of a live MFUHook (its `observer` seam): keeps every recorded iteration — what the
    hook read at each callback, the record it made — and the CPU time spent inside its callbacks on the
    engine thread and in its accounting thread (`time.thread_time_ns`: each thread's own CPU, so a
    wait for the GIL held by the other thread counts for neither).  Right after each schedule() it
    also times vLLM's own estimator on that SchedulerOutput, on the engine thread, where vLLM's
    scheduler calls it when its MFU metrics are on: both are then measured in the same live
    conditions (a loaded machine, caches shared with the model), not only in a hot offline loop."""

    def __init__(self, hook: Any, engine: str, metrics: Any):
        self.iterations: list[CapturedIteration] = []
        self.active = False
        self.engine = engine
        self._pending: dict[int, CapturedIteration] = {}
        self._tokens: dict[int, CapturedIteration] = {}
        self._by_step: dict[int, CapturedIteration] = {}  # handed to the accounting thread, not yet accounted
        self._hook = hook
        self._cap: CapturedIteration | None = None
        self._t0 = self._w0 = 0
        self._acct: CapturedIteration | None = None
        self._a0 = 0
        self._metrics = metrics
        self._after: CapturedIteration | None = None
        hook.observer = self
        hand_over = hook.sink

        def sink(step: int, capture: Any, result: Any) -> None:  # which step each captured iteration became
            if self._after is not None:
                self._by_step[step], self._after = self._after, None
            hand_over(step, capture, result)

        hook.sink = sink

    def enter(self, kind: str, *args: Any) -> None:
        if kind == "account":  # on the accounting thread
            self._acct = self._by_step.pop(args[0][0], None)
            self._a0 = time.thread_time_ns()
            return
        cap = None
        if kind == "schedule":
            sched, out = args
            if self.active and out.total_num_scheduled_tokens:
                cap = CapturedIteration(engine=self.engine, out=out)
                self._pending[id(out)] = cap
        elif kind == "output":
            sched, out, runner_out = args
            cap = self._pending.pop(id(out), None)
            if cap is not None:
                cap.runner_out = runner_out
                cap.log_stats = bool(getattr(sched, "log_stats", False))
                sampled = runner_out.sampled_token_ids
                cap.sampled_lengths = list(map(len, sampled)) if sampled else None
        elif kind == "after":
            token, result = args
            cap = self._tokens.pop(id(token), None)
            if cap is not None:
                cap.result = result
                sampled = cap.runner_out.sampled_token_ids if cap.runner_out is not None else None
                cap.trimmed_lengths = list(map(len, sampled)) if sampled else None
                self._after = cap  # numbered by the hook's sink, before the accounting thread can see it
        self._cap = cap
        self._w0 = time.perf_counter_ns()
        self._t0 = time.thread_time_ns()  # last: the hook's own time starts here

    def exit(self, kind: str, result: Any) -> None:
        if kind == "account":
            dt = time.thread_time_ns() - self._a0
            cap, self._acct = self._acct, None
            if cap is not None and result is not None:
                cap.record, cap.accounting_cpu_ns = result, dt
                self.iterations.append(cap)
            return
        dt = time.thread_time_ns() - self._t0  # first: the hook's own time ends here
        wall = time.perf_counter_ns() - self._w0
        cap, self._cap = self._cap, None
        if cap is None:
            return
        cap.engine_cpu_ns += dt
        cap.engine_wall_ns += wall
        if kind == "schedule":
            t0 = time.thread_time_ns()
            self._metrics.get_step_perf_stats_per_gpu(cap.out)
            cap.vllm_cpu_ns = time.thread_time_ns() - t0
        elif kind == "output" and result is not None:
            self._tokens[id(result)] = cap


@contextlib.contextmanager
def _in_process_engine_env(publish_dir: str) -> Iterator[None]:
    """VLLM_ENABLE_V1_MULTIPROCESSING=0 for one engine; vLLM's env cache is reset after (and before)."""
    import vllm.envs as envs

    was_cached = envs._is_envs_cache_enabled()
    envs.disable_envs_cache()  # an in-process EngineCore turns the cache on; a cached "1" would win
    # the accounting on its own thread, as in a real engine: `engine µs` is the engine thread's share
    settings: dict[str, str | None] = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "SERVING_MFU_DIR": publish_dir,
                                       "SERVING_MFU_TRACE": None, "SERVING_MFU_FAIL_AT_STEP": None,
                                       "SERVING_MFU_SYNC_ACCOUNTING": None}
    try:
        with _environ(settings):
            yield
    finally:
        envs.disable_envs_cache()
        if was_cached:
            envs.enable_envs_cache()


def find_scheduler(llm: Any) -> Any:
    """The live scheduler of an in-process LLM: llm.llm_engine.engine_core (InprocClient).engine_core.scheduler."""
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    if core is None:
        raise RuntimeError(f"engine core is not in this process ({type(client).__name__}); "
                           "VLLM_ENABLE_V1_MULTIPROCESSING=0 was not honoured")
    return core.scheduler


#: The engines the accounting cost is captured on: the dense tiny model (prefill, decode and mixed
#: steps), the same model with n-gram speculation (k = 3 drafts verified per decode), and the tiny
#: MoE model, whose steps are replayed with routed-expert rows (the CPU engine cannot capture
#: routing: that needs Model Runner V2 on a GPU) so the routing counts are in the timed path.
ENGINE_KINDS: dict[str, dict[str, Any]] = {
    "dense": {"model": "tiny-llama-engine", "extra": {}},
    "spec": {"model": "tiny-llama-engine",
             "extra": {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                              "prompt_lookup_max": 4, "prompt_lookup_min": 2}}},
    "moe": {"model": "tiny-qwen3-moe-engine", "extra": {}, "routing": True},
}
CAPTURE_PROMPT_LEN, CAPTURE_OUTPUT_LEN = 24, 8


def waves_for(batch: int) -> int:
    """Waves of `batch` requests per engine: enough steps of each kind at small batches, a few at large."""
    return max(3, min(16, math.ceil(64 / batch)))


def capture_prompts(model_path: str, n: int, prompt_len: int, repeat_prompt: bool) -> list[dict[str, list[int]]]:
    """`n` prompts of `prompt_len` tokens; with `repeat_prompt` each repeats an 6-token phrase, so that
    n-gram speculation finds matches and proposes drafts."""
    base = workload_prompts(model_path, n, prompt_len)
    if not repeat_prompt:
        return base
    return [{"prompt_token_ids": [p["prompt_token_ids"][j % 6] for j in range(prompt_len)]} for p in base]


def capture_engine(engine: str, model_path: str, batches: list[int], kv_cache_mib: int,
                   steps: _Steps) -> tuple[list[CapturedIteration], Any, float]:
    """Run waves of each batch size on an in-process hooked engine of kind `engine`; return the captured
    iterations, the engine's VllmConfig and its start time."""
    kind = ENGINE_KINDS[engine]
    p_len, o_len = CAPTURE_PROMPT_LEN, CAPTURE_OUTPUT_LEN
    top = max(batches)
    prompts = capture_prompts(model_path, top, p_len, engine == "spec")
    llm = None
    with tempfile.TemporaryDirectory(prefix="serving-mfu-bench-") as publish, _in_process_engine_env(publish):
        from vllm import LLM, SamplingParams

        try:
            with steps.step(f"starting the in-process hooked engine ({engine})"):
                t0 = time.perf_counter()
                # the EngineCore (scheduler and hook) lives here; the model runs in a worker process.  The
                # token budget fits a whole wave's prompts, so each wave starts with one prefill step.
                llm = LLM(**_engine_args(model_path, HOOKED_SCHEDULER, p_len + o_len + 16, top, kv_cache_mib,
                                         distributed_executor_backend="mp", enable_prefix_caching=False,
                                         max_num_batched_tokens=max(top * p_len, 2048), **kind["extra"]))
                start_s = time.perf_counter() - t0
            sched = find_scheduler(llm)
            if not isinstance(sched, MFUScheduler) or sched.mfu_hook is None:
                raise RuntimeError(f"expected a working MFUScheduler at {SCHEDULER_PATH}, found {type(sched)}")
            vllm_config = sched.vllm_config
            params = SamplingParams(max_tokens=o_len, temperature=0.0, ignore_eos=True)
            from vllm.v1.metrics.perf import ModelMetrics

            capture = _Capture(sched.mfu_hook, engine, ModelMetrics(vllm_config))
            with steps.step(f"capturing iterations ({engine}: batches {', '.join(map(str, batches))})"):
                llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                             use_tqdm=False)  # warm-up: first calls are not representative
                sched.mfu_hook.flush()
                capture.active = True
                for batch in batches:
                    for _ in range(waves_for(batch)):
                        llm.generate(prompts[:batch], params, use_tqdm=False)
                        steps.check()
                capture.active = False
                sched.mfu_hook.flush()  # every captured step's record built on the accounting thread
        finally:
            steps.disarm()
            _shutdown(llm)
            del llm
            gc.collect()
    return capture.iterations, vllm_config, start_s


# ----------------------------------------------------------------------------- 2. offline timing
class _KeepingTracker(MFUTracker):
    """An MFUTracker that also keeps every record it accounted, and its cost (to check the replay)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kept: list[tuple[Any, Any]] = []

    def record(self, rec: Any) -> Any:
        cost = super().record(rec)
        self.kept.append((rec, cost))
        return cost


def _fresh_hook(vllm_config: Any, publish_dir: str, iterations: list[CapturedIteration],
                tracker_cls: type[MFUTracker] = MFUTracker, attribution: bool = True) -> Any:
    """An MFUHook with a fresh tracker, built as the engine builds it, accounting inline, publishing
    nothing, and reading the engine's own t_sched / t_end in order as its clock — so the replayed
    records carry the engine's timestamps and busy time, the time split and MFU / HFU follow the same
    code paths as in the engine (not microsecond-long steps with HFU > 1)."""
    stamps = [t for it in iterations for t in (it.record.t_sched_s, it.record.t_end_s)]
    settings = Settings(dir=Path(publish_dir), sync_accounting=True, attribution=attribution)
    return MFUHook.from_vllm_config(vllm_config, settings=settings, clock=iter(stamps).__next__, publish=False,
                                    tracker_cls=tracker_cls)


class _RunnerOut:
    """The ModelRunnerOutput fields the hook reads."""

    __slots__ = ("req_ids", "req_id_to_index", "sampled_token_ids", "aux_output_connector_output")

    def __init__(self, req_ids: Any, req_id_to_index: Any, sampled_token_ids: Any, aux: Any):
        self.req_ids, self.req_id_to_index, self.sampled_token_ids, self.aux_output_connector_output = \
            req_ids, req_id_to_index, sampled_token_ids, aux


def _prepare(it: CapturedIteration, routing: tuple[int, int, int] | None, rng: Any) -> tuple[Any, Any]:
    """A scheduler stand-in with the engine's `log_stats` (the one field the hook reads from it) and a
    runner output whose sampled lists have the lengths the engine's hook read: with stats on, as the
    accounting thread found them after vLLM trimmed them in place; with stats off, as before_output
    copied them.  With `routing`
    (layers, experts, top_k) every scheduled request gets routed-expert rows for its step's positions,
    as vLLM's capture hands them over (AuxRequestOutput, [tokens, layers, top_k])."""
    runner_out = it.runner_out
    aux = getattr(runner_out, "aux_output_connector_output", None)
    if routing is not None:
        from vllm.distributed.aux_output_connector.connector import AuxRequestOutput

        layers, experts, top_k = routing
        out = it.out
        before = {nr.req_id: nr.num_computed_tokens for nr in out.scheduled_new_reqs}
        before.update(zip(out.scheduled_cached_reqs.req_ids, out.scheduled_cached_reqs.num_computed_tokens))
        aux = {rid: AuxRequestOutput(before[rid], rng.integers(0, experts, size=(q, layers, top_k), dtype="int32"))
               for rid, q in out.num_scheduled_tokens.items()}
    lengths = it.trimmed_lengths if it.log_stats else it.sampled_lengths
    sampled = [[0] * n for n in lengths] if lengths is not None else runner_out.sampled_token_ids
    return _Scheduler(it.log_stats), _RunnerOut(runner_out.req_ids, runner_out.req_id_to_index, sampled, aux)


class _Scheduler:
    """The Scheduler field the hook reads (`log_stats`: which path a draft step's capture takes)."""

    __slots__ = ("log_stats",)

    def __init__(self, log_stats: bool):
        self.log_stats = log_stats


def replay_ours(hook: Any, prepared: list, iterations: list[CapturedIteration],
                times_ns: list[int] | None = None, capture_ns: list[int] | None = None) -> None:
    """Run every captured iteration through `hook` (from `_fresh_hook`) as the engine did; add each one's
    ns to `times_ns`, and those of its capture callbacks (on_schedule + before_output) to `capture_ns`."""
    clock = time.perf_counter_ns
    for i, ((sched, runner_out), it) in enumerate(zip(prepared, iterations)):
        t0 = clock()
        hook.on_schedule(sched, it.out)
        token = hook.before_output(sched, it.out, runner_out)
        tc = clock()
        if token is not None:
            hook.after_output(token, it.result)
        t1 = clock()
        if times_ns is not None:
            times_ns[i] += t1 - t0
        if capture_ns is not None:
            capture_ns[i] += tc - t0
    if times_ns:  # the per-request accounts settle in groups of steps: the last group's work counts too
        t0 = clock()
        hook.flush()
        times_ns[-1] += clock() - t0


def _phase(rec: Any) -> Literal["prefill", "decode", "mixed"]:
    prefill = [s.computed_before < s.prompt_len for s in rec.all_slices()]
    return "prefill" if all(prefill) else "decode" if not any(prefill) else "mixed"


def kind_of(it: CapturedIteration) -> str:
    """The row a step is reported in: its phase, prefixed by the engine unless dense; decodes of the
    speculative engine that verified no draft at all are "spec decode, no drafts"."""
    phase = _phase(it.record)
    if it.engine == "spec" and phase == "decode" and not it.out.scheduled_spec_decode_tokens:
        return "spec decode, no drafts"
    return phase if it.engine == "dense" else f"{it.engine} {phase}"


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only errors from these loggers meanwhile (every fresh hook would log its start-up line again)."""
    import logging

    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclass
class _Timed:
    """One engine's captured steps with both estimators' offline µs per step."""

    engine: str
    iterations: list[CapturedIteration]
    ours_us: list[float]
    ours_off_us: list[float]  # attribution off
    vllm_us: list[float]
    matches: bool
    capture_us: list[float]
    ours_totals: dict[str, float]
    vllm_totals: dict[str, float]


def time_estimators(engine: str, iterations: list[CapturedIteration], vllm_config: Any, passes: int,
                    steps: _Steps) -> _Timed:
    """µs per iteration of our hook (replayed inline) and of vLLM's ModelMetrics on the same SchedulerOutputs."""
    import numpy as np
    from vllm.v1.metrics.perf import ModelMetrics

    if not iterations:
        raise RuntimeError(f"no iterations were captured on the {engine} engine")
    metrics = ModelMetrics(vllm_config)  # built as the Scheduler builds it (enable_mfu_metrics only gates that)
    if not metrics.is_enabled():
        raise RuntimeError("vLLM's ModelMetrics found no component it can cost for this model")
    routing = None
    if ENGINE_KINDS[engine].get("routing"):
        spec = ModelSpec.from_hf_config(vllm_config.model_config.hf_config.to_dict())
        layer = spec.layers[spec.moe_layer_indices[0]].moe
        routing = (len(spec.moe_layer_indices), layer.num_experts, layer.top_k)
    rng = np.random.default_rng(0)
    prepared = [_prepare(it, routing, rng) for it in iterations]
    n = len(iterations)
    ours_totals: dict[str, float] = {}
    vllm_totals = {"flops_per_gpu": 0.0, "read_bytes_per_gpu": 0.0, "write_bytes_per_gpu": 0.0}
    with _quiet("serving_mfu", "scheduler_hooks"), tempfile.TemporaryDirectory(prefix="serving-mfu-bench-") as publish:
        with steps.step(f"checking the replay against the engine ({engine})"):
            hook = _fresh_hook(vllm_config, publish, iterations, tracker_cls=_KeepingTracker)
            replay_ours(hook, prepared, iterations)
            replayed = [rec for rec, _ in hook.tracker.kept]
            # everything but the step number (the engine's counts its warm-up steps too) and, where the
            # replay adds routed-expert rows the CPU engine could not capture, the routing counts
            strip = {"step": 0, **({"moe_routing": None} if routing else {})}
            matches = len(replayed) == n and all(
                msgspec.structs.replace(a, **strip) == msgspec.structs.replace(it.record, **strip)
                for a, it in zip(replayed, iterations))
            for _, c in hook.tracker.kept:
                if c is None:
                    continue
                for phase in ("prefill", "decode"):
                    pc = getattr(c, phase)
                    for name in ("useful_flops", "executed_flops", "bytes", "tokens", "time_s"):
                        key = f"{phase}_{name}"
                        ours_totals[key] = ours_totals.get(key, 0.0) + getattr(pc, name)
                for name in ("busy_s", "hit_tokens", "saved_flops", "recompute_tokens", "rejected_tokens",
                             "draft_tokens", "accepted_tokens"):
                    ours_totals[name] = ours_totals.get(name, 0.0) + getattr(c, name)
            for it in iterations:
                stats = metrics.get_step_perf_stats_per_gpu(it.out)
                vllm_totals["flops_per_gpu"] += stats.num_flops_per_gpu
                vllm_totals["read_bytes_per_gpu"] += stats.num_read_bytes_per_gpu
                vllm_totals["write_bytes_per_gpu"] += stats.num_write_bytes_per_gpu

        with steps.step(f"timing both estimators ({engine}: {passes} passes × {n} iterations)"):
            ours_ns, off_ns, capture_ns, vllm_ns = _timing_passes(vllm_config, publish, iterations, prepared,
                                                                  metrics.get_step_perf_stats_per_gpu, passes)

    def per_iteration(samples: list[list[int]]) -> list[float]:  # median over passes, in µs
        return [statistics.median(s[i] for s in samples) / 1e3 for i in range(n)]

    return _Timed(engine, iterations, per_iteration(ours_ns), per_iteration(off_ns), per_iteration(vllm_ns),
                  matches,
                  per_iteration(capture_ns), ours_totals, vllm_totals)


def _timing_passes(vllm_config: Any, publish: str, iterations: list[CapturedIteration], prepared: list,
                   step_stats: Any, passes: int) -> tuple[list[list[int]], ...]:
    """ns per iteration in each pass: our hook (attribution on), our hook with attribution off, its capture
    callbacks, and vLLM's estimator — each pass on fresh hooks, with the garbage collector off."""
    n = len(iterations)
    ours_ns: list[list[int]] = []
    off_ns: list[list[int]] = []
    capture_ns: list[list[int]] = []
    vllm_ns: list[list[int]] = []
    clock = time.perf_counter_ns
    outs = [it.out for it in iterations]
    for _ in range(passes):
        hook = _fresh_hook(vllm_config, publish, iterations)
        off = _fresh_hook(vllm_config, publish, iterations, attribution=False)
        times, capture = [0] * n, [0] * n
        gc.collect()
        gc.disable()
        try:
            replay_ours(hook, prepared, iterations, times, capture)
            ours_ns.append(times)
            capture_ns.append(capture)
            times = [0] * n
            replay_ours(off, prepared, iterations, times)
            off_ns.append(times)
            times = [0] * n
            for i, out in enumerate(outs):
                t0 = clock()
                step_stats(out)
                times[i] = clock() - t0
            vllm_ns.append(times)
        finally:
            gc.enable()
    return ours_ns, off_ns, capture_ns, vllm_ns


KIND_ORDER = ("prefill", "mixed", "decode", "spec prefill", "spec mixed", "spec decode", "spec decode, no drafts",
              "moe prefill", "moe mixed", "moe decode")


def summarize(timed: list[_Timed], batches: list[int], passes: int, engine_start_s: dict[str, float]
              ) -> AccountingResult:
    """Rows per (kind, batch), the three targets of issue 10, and the totals."""
    groups: dict[tuple[str, int], list[tuple[_Timed, int]]] = {}
    for t in timed:
        for i, it in enumerate(t.iterations):
            groups.setdefault((kind_of(it), len(it.out.num_scheduled_tokens)), []).append((t, i))
    rows = []
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    for (kind, batch), members in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        its = [t.iterations[i] for t, i in members]
        ours = statistics.fmean(t.ours_us[i] for t, i in members)
        ours_off = statistics.fmean(t.ours_off_us[i] for t, i in members)
        vllm = statistics.fmean(t.vllm_us[i] for t, i in members)
        eng = statistics.fmean(it.engine_cpu_ns / 1e3 for it in its)
        acct = statistics.fmean(it.accounting_cpu_ns / 1e3 for it in its)
        live_vllm = statistics.fmean(it.vllm_cpu_ns / 1e3 for it in its)
        rows.append(CostGroup(kind=kind, batch=batch, iterations=len(its),
                              tokens_per_iteration=statistics.fmean(it.out.total_num_scheduled_tokens for it in its),
                              ours_us=ours, ours_no_attribution_us=ours_off, vllm_us=vllm, vllm_live_us=live_vllm,
                              engine_cpu_us=eng, engine_wall_us=statistics.fmean(it.engine_wall_ns / 1e3 for it in its),
                              engine_hot_us=statistics.fmean(t.capture_us[i] for t, i in members),
                              accounting_cpu_us=acct, live_cpu_us=eng + acct,
                              live_over_vllm=(eng + acct) / live_vllm if live_vllm else None,
                              ours_over_vllm=ours / vllm if vllm else None,
                              at_requested_batch=batch in batches))
    at = [r for r in rows if r.at_requested_batch and r.live_over_vllm is not None]
    worst = max(at, key=lambda r: r.live_over_vllm) if at else None
    worst_offline = max(at, key=lambda r: r.ours_over_vllm or 0.0) if at else None
    growth: dict[str, float] = {}
    hot_growth: dict[str, float] = {}
    small, large = (16 if 16 in batches else min(batches)), max(batches)
    for kind in {r.kind for r in rows}:
        by_batch = {r.batch: r for r in rows if r.kind == kind}
        if small in by_batch and large in by_batch and large != small and by_batch[small].engine_cpu_us:
            growth[kind] = by_batch[large].engine_cpu_us / by_batch[small].engine_cpu_us
            if by_batch[small].engine_hot_us:
                hot_growth[kind] = by_batch[large].engine_hot_us / by_batch[small].engine_hot_us
    ours_totals: dict[str, float] = {}
    vllm_totals: dict[str, float] = {}
    for t in timed:
        for k, v in t.ours_totals.items():
            ours_totals[k] = ours_totals.get(k, 0.0) + v
        for k, v in t.vllm_totals.items():
            vllm_totals[k] = vllm_totals.get(k, 0.0) + v
    ours_totals["executed_flops"] = ours_totals.get("prefill_executed_flops", 0.0) + \
        ours_totals.get("decode_executed_flops", 0.0)
    ours_totals["bytes"] = ours_totals.get("prefill_bytes", 0.0) + ours_totals.get("decode_bytes", 0.0)
    all_its = [it for t in timed for it in t.iterations]
    offline = [OfflineTarget(kind=r.kind, batch=r.batch, ratio=r.ours_over_vllm, limit=OFFLINE_LIMITS[r.kind],
                             met=r.ours_over_vllm <= OFFLINE_LIMITS[r.kind])
               for r in rows if r.kind in OFFLINE_LIMITS and r.batch in OFFLINE_TARGET_BATCHES
               and r.at_requested_batch and r.ours_over_vllm is not None]
    attribution = {t.engine: sum(t.ours_us) / sum(t.ours_off_us) for t in timed if sum(t.ours_off_us) > 0}
    return AccountingResult(offline_targets=offline, attribution_ratio=attribution,
        scheduler_path=SCHEDULER_PATH, engines=[t.engine for t in timed], engine_start_s=engine_start_s,
        batches=batches, iterations=len(all_its), passes=passes,
        replay_matches_engine={t.engine: t.matches for t in timed},
        ours_us_per_iteration=statistics.fmean(x for t in timed for x in t.ours_us),
        vllm_us_per_iteration=statistics.fmean(x for t in timed for x in t.vllm_us),
        engine_cpu_us_per_iteration=statistics.fmean(it.engine_cpu_ns / 1e3 for it in all_its),
        accounting_cpu_us_per_iteration=statistics.fmean(it.accounting_cpu_ns / 1e3 for it in all_its),
        groups=rows,
        worst_live_over_vllm=worst.live_over_vllm if worst else None,
        worst_live_group=f"{worst.kind} {worst.batch}" if worst else None,
        worst_offline_over_vllm=worst_offline.ours_over_vllm if worst_offline else None,
        worst_offline_group=f"{worst_offline.kind} {worst_offline.batch}" if worst_offline else None,
        engine_growth=growth, engine_hot_growth=hot_growth, engine_growth_batches=(small, large),
        ours_computes=OURS_COMPUTES, vllm_computes=VLLM_COMPUTES, ours_totals=ours_totals, vllm_totals=vllm_totals)


# ----------------------------------------------------------------------------- the whole benchmark
DEFAULT_BATCHES = (1, 16, 256, 1024)


def bench_overhead(model: str | None = None, requests: int = 16, prompt_len: int = 64, output_len: int = 64,
                   repeats: int = 3, batches: tuple[int, ...] | list[int] = DEFAULT_BATCHES,
                   engines: tuple[str, ...] | list[str] = tuple(ENGINE_KINDS), passes: int = 15,
                   kv_cache_mib: int = 512, min_run_s: float = 5.0, accounting: bool = True,
                   concurrent: bool = True, progress: bool = True) -> OverheadReport:
    """Both measurements; every engine it starts is shut down before it returns, or raises.

    `model` replaces the tiny dense model of the throughput runs and of the dense and speculative
    captures; the MoE capture always runs the embedded tiny MoE model.
    """
    if requests < 1 or prompt_len < 1 or output_len < 1 or repeats < 1 or passes < 1:
        raise ValueError("--requests, --prompt-len, --output-len, --repeats and --passes must be >= 1")
    batches = sorted(set(batches))
    if not batches or batches[0] < 1:
        raise ValueError(f"--batches must be positive request counts, got {batches}")
    unknown = [e for e in engines if e not in ENGINE_KINDS]
    if unknown or not engines:
        raise ValueError(f"unknown --engines {unknown or engines}; choose from {', '.join(ENGINE_KINDS)}")
    t_start = time.perf_counter()
    model_path = resolve_model(model)
    peak_env: dict[str, str | None] = {}
    if not any(os.environ.get(k) for k in PEAK_SETTINGS):
        peak_env = dict(DEFAULT_PEAK)
    peak = ("SERVING_MFU_PEAK_FLOPS=1e12, SERVING_MFU_PEAK_BANDWIDTH=4e10 (assumed, for the MFU path)"
            if peak_env else "from the SERVING_MFU_* settings")
    quiet = {} if os.environ.get("VLLM_LOGGING_LEVEL") else {"VLLM_LOGGING_LEVEL": "WARNING"}
    total = (2 + 2 * repeats if concurrent else 4 * repeats) + (4 * len(engines) if accounting else 0)
    with _stdout_to_stderr(), _environ({**peak_env, **quiet}), _Steps(total, progress) as steps, \
            tempfile.TemporaryDirectory(prefix="serving-mfu-bench-") as publish, \
            _environ({"SERVING_MFU_DIR": publish}):
        import logging

        vllm_logger = logging.getLogger("vllm")
        level = vllm_logger.level
        if quiet:
            vllm_logger.setLevel(logging.WARNING)
        try:
            throughput = bench_throughput(model_path, requests, prompt_len, output_len, repeats, kv_cache_mib,
                                          steps, concurrent=concurrent, min_run_s=min_run_s)
            acc = None
            if accounting:
                timed, starts = [], {}
                for engine in engines:
                    path = model_path if model and engine != "moe" else str(ensure_model(ENGINE_KINDS[engine]["model"]))
                    iterations, vllm_config, starts[engine] = capture_engine(engine, path, batches, kv_cache_mib,
                                                                             steps)
                    timed.append(time_estimators(engine, iterations, vllm_config, passes, steps))
                acc = summarize(timed, batches, passes, starts)
        finally:
            vllm_logger.setLevel(level)
    return OverheadReport(machine=machine_info(), model=model_path, peak=peak, throughput=throughput,
                          accounting=acc, wall_s=time.perf_counter() - t_start)


# ----------------------------------------------------------------------------- rendering
def _si(x: float) -> str:
    """SI prefix, then the caller's unit: 1.5e12 → '1.5 T'."""
    return si(x) if abs(x) >= 1e3 else f"{x:.3g} "


def print_overhead(report: OverheadReport, console: Any) -> None:
    """The tables people read; `--json` prints the report model instead."""
    _print_machine(report, console)
    _print_throughput(report.throughput, console)
    a = report.accounting
    if a is None:
        return
    _print_accounting(a, console)
    _print_targets(a, report.throughput, console)
    _print_totals(a, report.wall_s, console)


def _print_machine(report: OverheadReport, console: Any) -> None:
    """Which machine, software, model and peak the numbers below come from."""
    m = report.machine
    console.print(f"machine: {m.cpu_model}, {m.usable_cores}/{m.logical_cores} cores, "
                  f"{m.memory_gib} GiB; python {m.python}, vllm {m.vllm}, torch {m.torch}"
                  + (f", {m.accelerator}" if m.accelerator else ""))
    console.print(f"model: {report.model}; peak: {report.peak}")


def _print_throughput(t: ThroughputResult, console: Any) -> None:
    """The plain / hooked throughput table, then the hooked / plain ratio and the engines' start times."""
    from rich.table import Table

    table = Table(title=f"throughput: {t.requests} requests × {t.prompt_tokens} prompt + "
                        f"{t.output_tokens_per_request} output tokens, greedy; {t.repeats} runs each of "
                        f"{t.rounds_per_run} rounds, alternating; engines {t.engines}")
    for col in ("variant", "scheduler", "mean tok/s", "min–max", "stdev", "tok/s per run"):
        table.add_column(col, justify="left" if col in ("variant", "scheduler") else "right")
    for v in (t.plain, t.hooked):
        table.add_row(v.variant, v.scheduler.rsplit(".", 1)[-1], f"{v.mean_tokens_per_s:.0f}",
                      f"{v.min_tokens_per_s:.0f}–{v.max_tokens_per_s:.0f}", f"{v.stdev_tokens_per_s:.0f}",
                      " ".join(f"{x:.0f}" for x in v.tokens_per_s))
    console.print(table)
    starts = ", ".join(f"{k} " + "/".join(f"{s:.0f}" for s in v) + " s" for k, v in t.engine_start_s.items())
    console.print(f"hooked / plain = [bold]{t.ratio:.3f}[/bold] (per repetition "
                  f"{', '.join(f'{r:.3f}' for r in t.ratio_per_repeat)}; range {t.ratio_min:.3f}–{t.ratio_max:.3f})"
                  f"; engine start {starts}")


def _print_accounting(a: AccountingResult, console: Any) -> None:
    """The per-kind, per-batch accounting cost table (requested batches only) and what its columns measure."""
    from rich.table import Table

    table = Table(title=f"accounting cost per step on the same {a.iterations} SchedulerOutputs, engines "
                        f"{', '.join(a.engines)} (offline: median of {a.passes} passes; live: thread CPU time)")
    for col in ("kind", "batch", "steps", "vLLM µs", "ours µs", "×", "hot µs", "live vLLM", "engine µs", "acct µs",
                "live ×"):
        table.add_column(col, justify="left" if col == "kind" else "right", no_wrap=col == "kind")
    for g in a.groups:
        if not g.at_requested_batch:
            continue
        table.add_row(g.kind, str(g.batch), str(g.iterations), f"{g.vllm_us:.1f}", f"{g.ours_us:.1f}",
                      _ratio(g.ours_over_vllm, 0.5), f"{g.engine_hot_us:.1f}", f"{g.vllm_live_us:.1f}",
                      f"{g.engine_cpu_us:.1f}",
                      f"{g.accounting_cpu_us:.1f}", _ratio(g.live_over_vllm, 0.5))
    console.print(table)
    console.print("offline, hot loop over the captured steps: vLLM µs = ModelMetrics.get_step_perf_stats_per_gpu("
                  "scheduler_output); ours µs = a fresh MFUHook replaying each step inline (callbacks → "
                  "IterationRecord → MFUTracker.record); × = ours / vLLM; hot µs = its capture callbacks alone "
                  "(on_schedule + before_output; after_output hands over with one queue put).  live, in the engine, "
                  "thread CPU time "
                  "(time.thread_time): live vLLM = vLLM's estimator on the engine thread right after schedule(), "
                  "where vLLM calls it; engine µs = our three callbacks on the engine thread; acct µs = building "
                  "and costing the record on the accounting thread; live × = (engine + acct) / live vLLM.  Rows at "
                  "other batch sizes (waves filling up or draining) are in --json.")


def _print_targets(a: AccountingResult, t: ThroughputResult, console: Any) -> None:
    """Targets 1 and 2 (offline ours / vLLM's estimator at large batches, engine-thread growth with batch) met
    or not, and the throughput ratio with its spread."""
    small, large = a.engine_growth_batches
    if not a.offline_targets:
        console.print("target 1, offline ours / vLLM at batches " + " and ".join(map(str, OFFLINE_TARGET_BATCHES))
                      + ": not measured in this run (--batches must include them)")
    else:
        met = all(x.met for x in a.offline_targets)
        console.print("target 1, offline ours / vLLM at batches " + " and ".join(map(str, OFFLINE_TARGET_BATCHES))
                      + " (≤ 0.5; MoE ≤ 1.0): "
                      + ", ".join(f"{x.kind} {x.batch} {x.ratio:.2f}" + ("" if x.met else " ✗")
                                  for x in a.offline_targets)
                      + " — " + ("[green]met[/green]" if met else "[red]not met[/red]")
                      + (f"; live (engine + accounting) / vLLM worst {a.worst_live_over_vllm:.2f} "
                         f"({a.worst_live_group})" if a.worst_live_over_vllm is not None else ""))
    if a.engine_growth:
        worst_kind = max(a.engine_growth, key=a.engine_growth.get)
        met = a.engine_growth[worst_kind] <= 2.0
        console.print(f"target 2, engine-thread CPU at batch {large} ≤ 2× batch {small}: "
                      + ", ".join(f"{k} {v:.2f}×" for k, v in sorted(a.engine_growth.items()))
                      + " — " + ("[green]met[/green]" if met else f"[red]not met ({worst_kind})[/red]")
                      + "; the same callbacks in the hot loop: "
                      + ", ".join(f"{k} {v:.2f}×" for k, v in sorted(a.engine_hot_growth.items())))
    if a.attribution_ratio:
        console.print("attribution (per-request and per-tenant cost, SERVING_MFU_ATTRIBUTION): ours with / without, "
                      "offline over every captured step: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                        a.attribution_ratio.items())
                      + " (target ≤ 1.2)")
    console.print(f"throughput, hooked / plain: {t.ratio:.3f} (range {t.ratio_min:.3f}–{t.ratio_max:.3f} over "
                  f"{t.repeats} alternating runs)")


def _print_totals(a: AccountingResult, wall_s: float, console: Any) -> None:
    """What each side computed over the captured steps, whether the replay matched the engine, and the wall time."""
    o, v = a.ours_totals, a.vllm_totals
    console.print(f"ours (MFUHook → MFUTracker): prefill useful/executed {_si(o.get('prefill_useful_flops', 0))}/"
                  f"{_si(o.get('prefill_executed_flops', 0))}FLOPs, decode {_si(o.get('decode_useful_flops', 0))}/"
                  f"{_si(o.get('decode_executed_flops', 0))}FLOPs, {_si(o.get('bytes', 0))}B; "
                  f"time split, spec ({o.get('draft_tokens', 0):.0f} drafts, {o.get('accepted_tokens', 0):.0f} "
                  f"accepted), prefix ({o.get('hit_tokens', 0):.0f} hit tokens), recompute "
                  f"({o.get('recompute_tokens', 0):.0f} tokens)")
    console.print(f"vLLM (ModelMetrics.get_step_perf_stats_per_gpu): {_si(v['flops_per_gpu'])}FLOPs, "
                  f"{_si(v['read_bytes_per_gpu'])}B read, {_si(v['write_bytes_per_gpu'])}B written — totals only")
    starts = ", ".join(f"{k} {v:.0f} s" for k, v in a.engine_start_s.items())
    console.print("replay reproduces the engine's records: "
                  + ", ".join(f"{k} {v}" for k, v in a.replay_matches_engine.items())
                  + f"; scheduler found at {a.scheduler_path} (in-process engines, start {starts}); "
                  f"whole benchmark {wall_s:.0f} s")


def _ratio(x: float | None, limit: float | None = None) -> str:
    if x is None:
        return "—"
    text = f"{x:.2f}"
    if limit is not None and x > limit:
        return f"[red]{text}[/red]"
    return text
