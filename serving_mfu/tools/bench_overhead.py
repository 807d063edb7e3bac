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
from serving_mfu.runtime.settings import Settings
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.serve.format import si
from serving_mfu.tools.engine_models import CORPUS, ensure_model
from serving_mfu.tools.envutil import environ as _environ

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
    kind: Literal["prefill", "decode", "mixed"]
    batch: int  # requests scheduled in the iteration
    iterations: int
    tokens_per_iteration: float
    ours_us: float  # offline replay through MFUHook + MFUTracker, µs per iteration
    vllm_us: float  # offline ModelMetrics.get_step_perf_stats_per_gpu, µs per iteration
    ours_in_engine_us: float  # the hook's callbacks as timed inside the engine


class AccountingResult(BaseModel):
    scheduler_path: str
    engine_start_s: float
    max_num_seqs: int
    iterations: int
    ours_iterations: int
    vllm_iterations: int
    passes: int
    replay_matches_engine: bool
    ours_us_per_iteration: float
    vllm_us_per_iteration: float
    ours_in_engine_us_per_iteration: float
    groups: list[CostGroup]
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
    return dict(model=model_path, scheduler_cls=scheduler, enforce_eager=True, seed=0,
                gpu_memory_utilization=0.3, kv_cache_memory_bytes=kv_cache_mib << 20,
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
def bench_throughput(model_path: str, requests: int, prompt_len: int, output_len: int, repeats: int,
                     kv_cache_mib: int, steps: _Steps, concurrent: bool = True,
                     min_run_s: float = 5.0) -> ThroughputResult:
    """Output tokens/s of the plain and the hooked engine, alternating plain/hooked per repetition.

    Each timed run repeats the workload back to back (`rounds`, the same for every run, chosen
    from the warm-up) so that it lasts at least `min_run_s`: one round of the default workload
    takes a fraction of a second on the tiny model, too short to time.
    """
    from vllm import LLM, SamplingParams

    prompts = workload_prompts(model_path, requests, prompt_len)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    schedulers = {"plain": PLAIN_SCHEDULER, "hooked": HOOKED_SCHEDULER}
    max_len = prompt_len + output_len + 64

    def start(variant: str) -> tuple[Any, float]:
        t0 = time.perf_counter()
        llm = LLM(**_engine_args(model_path, schedulers[variant], max_len, max(requests, 1), kv_cache_mib,
                                 enable_prefix_caching=False))
        return llm, time.perf_counter() - t0

    starts: dict[str, list[float]] = {"plain": [], "hooked": []}
    runs: list[ThroughputRun] = []
    engines: dict[str, Any] = {}
    warm: list[float] = []
    rounds = 0

    def warm_up(variant: str, llm: Any) -> None:
        with steps.step(f"warm-up, {variant}"):
            _generate(llm, prompts, params)  # the first round carries one-off costs
            warm.append(_generate(llm, prompts, params)[0])

    def rounds_for(seconds: float) -> int:
        return max(1, math.ceil(min_run_s / max(seconds, 1e-6)))

    mode: Literal["concurrent", "restarted"] = "concurrent" if concurrent else "restarted"
    try:
        if concurrent:
            try:
                for variant in ("plain", "hooked"):
                    with steps.step(f"starting the {variant} engine"):
                        engines[variant], dt = start(variant)
                        starts[variant].append(dt)
            except Exception as exc:  # the second engine does not fit beside the first: one at a time
                steps.check()
                if not engines:
                    raise
                print(f"bench-overhead: two engines do not fit at once ({exc!r}); restarting per run",
                      file=sys.stderr)
                for llm in engines.values():
                    _shutdown(llm)
                engines.clear()
                mode = "restarted"
            else:
                for variant in ("plain", "hooked"):
                    warm_up(variant, engines[variant])
                rounds = rounds_for(min(warm))
        for rep in range(repeats):
            for variant in ("plain", "hooked"):
                llm = engines.get(variant)
                if mode == "restarted":
                    with steps.step(f"starting the {variant} engine (run {rep + 1})"):
                        llm, dt = start(variant)
                        engines[variant] = llm
                        starts[variant].append(dt)
                    warm_up(variant, llm)
                    rounds = rounds or rounds_for(warm[-1])
                with steps.step(f"run {rep + 1}/{repeats}, {variant} ({rounds} rounds)"):
                    dt, tokens = 0.0, 0
                    for _ in range(rounds):
                        d, k = _generate(llm, prompts, params)
                        dt, tokens = dt + d, tokens + k
                runs.append(ThroughputRun(variant=variant, repeat=rep, rounds=rounds, seconds=dt,
                                          output_tokens=tokens, tokens_per_s=tokens / dt))
                if mode == "restarted":
                    _shutdown(engines.pop(variant))
    finally:
        steps.disarm()
        for llm in engines.values():
            _shutdown(llm)
        engines.clear()
        gc.collect()
    plain = [r.tokens_per_s for r in runs if r.variant == "plain"]
    hooked = [r.tokens_per_s for r in runs if r.variant == "hooked"]
    ps, hs = _variant_stats("plain", PLAIN_SCHEDULER, plain), _variant_stats("hooked", HOOKED_SCHEDULER, hooked)
    per_rep = [h / p for p, h in zip(plain, hooked)]
    return ThroughputResult(requests=requests, prompt_tokens=prompt_len, output_tokens_per_request=output_len,
                            repeats=repeats, rounds_per_run=rounds, min_run_s=min_run_s, engines=mode,
                            engine_start_s=starts, runs=runs, plain=ps, hooked=hs,
                            ratio=hs.mean_tokens_per_s / ps.mean_tokens_per_s, ratio_per_repeat=per_rep,
                            ratio_min=min(per_rep), ratio_max=max(per_rep))


# ----------------------------------------------------------------------------- 2. capture
@dataclass
class CapturedIteration:
    """One engine step, as the hook saw it."""

    out: Any  # SchedulerOutput
    runner_out: Any = None  # ModelRunnerOutput
    result: Any = None  # what update_from_output returned (EngineCoreOutputs by client)
    sampled_lengths: list[int] | None = None  # len of each sampled list before vLLM trimmed them
    record: Any = None  # the IterationRecord the engine's hook produced
    hook_ns: int = 0  # on_schedule + before_output + after_output, inside the engine


class _Capture:
    """The observer of a live MFUHook (its `observer` seam): keeps every recorded iteration — what the
    hook read at each callback, the record it made — and the time spent inside its callbacks."""

    def __init__(self, hook: Any):
        self.iterations: list[CapturedIteration] = []
        self.active = False
        self._pending: dict[int, CapturedIteration] = {}
        self._tokens: dict[int, CapturedIteration] = {}
        self._by_step: dict[int, CapturedIteration] = {}  # after_output done, record not yet built
        self._hook = hook
        self._clock = time.perf_counter_ns
        self._t0 = 0
        self._cap: CapturedIteration | None = None
        hook.observer = self

    def enter(self, kind: str, *args: Any) -> None:
        cap = None
        if kind == "schedule":
            sched, out = args
            if self.active and out.total_num_scheduled_tokens:
                cap = CapturedIteration(out=out)
                self._pending[id(out)] = cap
        elif kind == "output":
            sched, out, runner_out = args
            cap = self._pending.pop(id(out), None)
            if cap is not None:
                cap.runner_out = runner_out
                sampled = runner_out.sampled_token_ids
                cap.sampled_lengths = list(map(len, sampled)) if sampled else None
        elif kind == "after":
            token, result = args
            cap = self._tokens.pop(id(token), None)
            if cap is not None:
                cap.result = result
        self._cap = cap
        self._t0 = self._clock()  # last: the hook's own time starts here

    def exit(self, kind: str, result: Any) -> None:
        dt = self._clock() - self._t0  # first: the hook's own time ends here
        cap, self._cap = self._cap, None
        if cap is None:
            return
        cap.hook_ns += dt
        if kind == "output" and result is not None:
            self._tokens[id(result)] = cap
        elif kind == "after":
            self._by_step[self._hook.step] = cap  # its record is built on the accounting thread

    def recorded(self, rec: Any) -> None:
        """Called on the accounting thread, in step order, with each record the hook built."""
        cap = self._by_step.pop(rec.step, None)
        if cap is not None:
            cap.record = rec
            self.iterations.append(cap)


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


def capture_iterations(model_path: str, requests: int, prompt_len: int, output_len: int, capture_batch: int,
                       kv_cache_mib: int, steps: _Steps) -> tuple[list[CapturedIteration], Any, float, int]:
    """Run the workload (and a wave of `capture_batch` requests) on an in-process hooked engine.

    Returns the captured iterations, the engine's VllmConfig, its start time and max_num_seqs.
    """

    waves = [requests] + ([capture_batch] if capture_batch > 0 else [])
    prompts = workload_prompts(model_path, max(waves), prompt_len)
    max_num_seqs = max(waves)
    llm = None
    with tempfile.TemporaryDirectory(prefix="serving-mfu-bench-") as publish, _in_process_engine_env(publish):
        from vllm import LLM, SamplingParams

        try:
            with steps.step("starting the in-process hooked engine"):
                t0 = time.perf_counter()
                # the EngineCore (scheduler and hook) lives here; the model runs in a worker process
                llm = LLM(**_engine_args(model_path, HOOKED_SCHEDULER, prompt_len + output_len + 64, max_num_seqs,
                                         kv_cache_mib, distributed_executor_backend="mp", enable_prefix_caching=True))
                start_s = time.perf_counter() - t0
            sched = find_scheduler(llm)
            if not isinstance(sched, MFUScheduler) or sched._mfu is None:
                raise RuntimeError(f"expected a working MFUScheduler at {SCHEDULER_PATH}, found {type(sched)}")
            vllm_config = sched.vllm_config
            params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
            capture = _Capture(sched._mfu)
            with steps.step("capturing iterations"):
                llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                             use_tqdm=False)  # warm-up: first calls are not representative
                capture.active = True
                for n in waves:
                    llm.generate(prompts[:n], params, use_tqdm=False)
                capture.active = False
                sched._mfu.flush()  # every captured step's record built on the accounting thread
        finally:
            steps.disarm()
            _shutdown(llm)
            del llm
            gc.collect()
    return capture.iterations, vllm_config, start_s, max_num_seqs


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
                tracker_cls: type[MFUTracker] = MFUTracker) -> Any:
    """An MFUHook with a fresh tracker, built as the engine builds it, accounting inline, publishing
    nothing, and reading the engine's own t_sched / t_end in order as its clock — so the replayed
    records carry the engine's timestamps and busy time, the time split and MFU / HFU follow the same
    code paths as in the engine (not microsecond-long steps with HFU > 1)."""
    stamps = [t for it in iterations for t in (it.record.t_sched_s, it.record.t_end_s)]
    settings = Settings(dir=Path(publish_dir), sync_accounting=True)
    return MFUHook.from_vllm_config(vllm_config, settings=settings, clock=iter(stamps).__next__, publish=False,
                                    tracker_cls=tracker_cls)


def _prepare(it: CapturedIteration) -> tuple[None, Any]:
    """No scheduler (the hook reads nothing from it) and a runner output whose sampled lists have the
    lengths the engine's hook saw (vLLM trims them in place once it applies a step)."""
    runner_out = it.runner_out
    if it.sampled_lengths is not None and runner_out is not None:
        runner_out = _RunnerOut(runner_out.req_id_to_index, [[0] * n for n in it.sampled_lengths],
                                getattr(runner_out, "aux_output_connector_output", None))
    return None, runner_out


class _RunnerOut:
    """The ModelRunnerOutput fields the hook reads."""

    __slots__ = ("req_id_to_index", "sampled_token_ids", "aux_output_connector_output")

    def __init__(self, req_id_to_index: Any, sampled_token_ids: Any, aux: Any):
        self.req_id_to_index, self.sampled_token_ids, self.aux_output_connector_output = \
            req_id_to_index, sampled_token_ids, aux


def replay_ours(hook: Any, prepared: list, iterations: list[CapturedIteration],
                times_ns: list[int] | None = None) -> None:
    """Run every captured iteration through `hook` (from `_fresh_hook`) as the engine did; add each one's
    ns to `times_ns`."""
    _replay(hook, prepared, iterations, times_ns)


def _replay(hook: Any, prepared: list, iterations: list[CapturedIteration], times_ns: list[int] | None) -> None:
    clock = time.perf_counter_ns
    for i, ((sched, runner_out), it) in enumerate(zip(prepared, iterations)):
        t0 = clock()
        hook.on_schedule(sched, it.out)
        token = hook.before_output(sched, it.out, runner_out)
        if token is not None:
            hook.after_output(token, it.result)
        t1 = clock()
        if times_ns is not None:
            times_ns[i] += t1 - t0


def _kind(rec: Any) -> Literal["prefill", "decode", "mixed"]:
    prefill = [s.computed_before < s.prompt_len for s in rec.all_slices()]
    return "prefill" if all(prefill) else "decode" if not any(prefill) else "mixed"


def time_estimators(iterations: list[CapturedIteration], vllm_config: Any, passes: int, engine_start_s: float,
                    max_num_seqs: int, steps: _Steps) -> AccountingResult:
    """µs per iteration of our hook (replayed) and of vLLM's ModelMetrics on the same SchedulerOutputs."""
    from vllm.v1.metrics.perf import ModelMetrics

    if not iterations:
        raise RuntimeError("no iterations were captured")
    with _quiet("serving_mfu", "scheduler_hooks"):
        return _time_estimators(iterations, vllm_config, passes, engine_start_s, max_num_seqs, steps, ModelMetrics)


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


def _time_estimators(iterations: list[CapturedIteration], vllm_config: Any, passes: int, engine_start_s: float,
                     max_num_seqs: int, steps: _Steps, ModelMetrics: Any) -> AccountingResult:  # noqa: N803
    metrics = ModelMetrics(vllm_config)  # built as the Scheduler builds it (enable_mfu_metrics only gates that)
    if not metrics.is_enabled():
        raise RuntimeError("vLLM's ModelMetrics found no component it can cost for this model")
    n = len(iterations)
    prepared = [_prepare(it) for it in iterations]
    ours_totals: dict[str, float] = {}
    vllm_totals = {"flops_per_gpu": 0.0, "read_bytes_per_gpu": 0.0, "write_bytes_per_gpu": 0.0}
    with tempfile.TemporaryDirectory(prefix="serving-mfu-bench-") as publish:
        with steps.step("checking the replay against the engine"):
            hook = _fresh_hook(vllm_config, publish, iterations, tracker_cls=_KeepingTracker)
            replay_ours(hook, prepared, iterations)
            replayed = [rec for rec, _ in hook.tracker.kept]
            costs = [cost for _, cost in hook.tracker.kept]
            # everything but the step number (the engine's counts its warm-up steps too)
            matches = len(replayed) == n and all(
                msgspec.structs.replace(a, step=0) == msgspec.structs.replace(it.record, step=0)
                for a, it in zip(replayed, iterations))
            for c in costs:
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
            ours_totals["executed_flops"] = ours_totals.get("prefill_executed_flops", 0.0) + \
                ours_totals.get("decode_executed_flops", 0.0)
            ours_totals["bytes"] = ours_totals.get("prefill_bytes", 0.0) + ours_totals.get("decode_bytes", 0.0)
            for it in iterations:
                stats = metrics.get_step_perf_stats_per_gpu(it.out)
                vllm_totals["flops_per_gpu"] += stats.num_flops_per_gpu
                vllm_totals["read_bytes_per_gpu"] += stats.num_read_bytes_per_gpu
                vllm_totals["write_bytes_per_gpu"] += stats.num_write_bytes_per_gpu

        ours_ns: list[list[int]] = []
        vllm_ns: list[list[int]] = []
        clock = time.perf_counter_ns
        step_stats = metrics.get_step_perf_stats_per_gpu
        outs = [it.out for it in iterations]
        with steps.step(f"timing both estimators ({passes} passes × {n} iterations)"):
            for _ in range(passes):
                hook = _fresh_hook(vllm_config, publish, iterations)
                times = [0] * n
                gc.collect()
                gc.disable()
                try:
                    replay_ours(hook, prepared, iterations, times)
                    ours_ns.append(times)
                    times = [0] * n
                    for i, out in enumerate(outs):
                        t0 = clock()
                        step_stats(out)
                        times[i] = clock() - t0
                    vllm_ns.append(times)
                finally:
                    gc.enable()

    def per_iteration(samples: list[list[int]]) -> list[float]:  # median over passes, in µs
        return [statistics.median(s[i] for s in samples) / 1e3 for i in range(n)]

    ours_us, vllm_us = per_iteration(ours_ns), per_iteration(vllm_ns)
    engine_us = [it.hook_ns / 1e3 for it in iterations]
    groups: dict[tuple[str, int], list[int]] = {}
    for i, it in enumerate(iterations):
        groups.setdefault((_kind(it.record), len(it.record.all_slices())), []).append(i)
    order = {"prefill": 0, "mixed": 1, "decode": 2}
    rows = []
    for (kind, batch), idx in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        rows.append(CostGroup(kind=kind, batch=batch, iterations=len(idx),
                              tokens_per_iteration=statistics.fmean(
                                  iterations[i].out.total_num_scheduled_tokens for i in idx),
                              ours_us=statistics.fmean(ours_us[i] for i in idx),
                              vllm_us=statistics.fmean(vllm_us[i] for i in idx),
                              ours_in_engine_us=statistics.fmean(engine_us[i] for i in idx)))
    return AccountingResult(scheduler_path=SCHEDULER_PATH, engine_start_s=engine_start_s, max_num_seqs=max_num_seqs,
                            iterations=n, ours_iterations=len(ours_us), vllm_iterations=len(vllm_us),
                            passes=passes, replay_matches_engine=matches,
                            ours_us_per_iteration=statistics.fmean(ours_us),
                            vllm_us_per_iteration=statistics.fmean(vllm_us),
                            ours_in_engine_us_per_iteration=statistics.fmean(engine_us), groups=rows,
                            ours_computes=OURS_COMPUTES, vllm_computes=VLLM_COMPUTES, ours_totals=ours_totals,
                            vllm_totals=vllm_totals)


# ----------------------------------------------------------------------------- the whole benchmark
def bench_overhead(model: str | None = None, requests: int = 16, prompt_len: int = 64, output_len: int = 64,
                   repeats: int = 2, capture_batch: int = 64, passes: int = 30, kv_cache_mib: int = 512,
                   min_run_s: float = 5.0, accounting: bool = True, concurrent: bool = True,
                   progress: bool = True) -> OverheadReport:
    """Both measurements; every engine it starts is shut down before it returns, or raises."""
    if requests < 1 or prompt_len < 1 or output_len < 1 or repeats < 1 or passes < 1:
        raise ValueError("--requests, --prompt-len, --output-len, --repeats and --passes must be >= 1")
    t_start = time.perf_counter()
    model_path = resolve_model(model)
    peak_env: dict[str, str | None] = {}
    if not any(os.environ.get(k) for k in PEAK_SETTINGS):
        peak_env = dict(DEFAULT_PEAK)
    peak = ("SERVING_MFU_PEAK_FLOPS=1e12, SERVING_MFU_PEAK_BANDWIDTH=4e10 (assumed, for the MFU path)"
            if peak_env else "from the SERVING_MFU_* settings")
    quiet = {} if os.environ.get("VLLM_LOGGING_LEVEL") else {"VLLM_LOGGING_LEVEL": "WARNING"}
    total = (2 + 2 * repeats if concurrent else 4 * repeats) + (4 if accounting else 0)
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
                iterations, vllm_config, start_s, max_seqs = capture_iterations(
                    model_path, requests, prompt_len, output_len, capture_batch, kv_cache_mib, steps)
                acc = time_estimators(iterations, vllm_config, passes, start_s, max_seqs, steps)
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
    from rich.table import Table

    m, t = report.machine, report.throughput
    console.print(f"machine: {m.cpu_model}, {m.usable_cores}/{m.logical_cores} cores, "
                  f"{m.memory_gib} GiB; python {m.python}, vllm {m.vllm}, torch {m.torch}"
                  + (f", {m.accelerator}" if m.accelerator else ""))
    console.print(f"model: {report.model}; peak: {report.peak}")
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
    a = report.accounting
    if a is None:
        return
    table = Table(title=f"accounting cost per iteration on the same {a.iterations} SchedulerOutputs "
                        f"(median of {a.passes} offline passes; max_num_seqs {a.max_num_seqs})")
    for col in ("kind", "batch", "steps", "tokens", "ours µs", "vLLM µs", "ours/vLLM", "engine µs"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for g in a.groups:
        table.add_row(g.kind, str(g.batch), str(g.iterations), f"{g.tokens_per_iteration:.0f}", f"{g.ours_us:.1f}",
                      f"{g.vllm_us:.1f}", f"{g.ours_us / g.vllm_us:.2f}" if g.vllm_us else "—",
                      f"{g.ours_in_engine_us:.1f}")
    table.add_row("all", "", str(a.iterations), "", f"{a.ours_us_per_iteration:.1f}", f"{a.vllm_us_per_iteration:.1f}",
                  f"{a.ours_us_per_iteration / a.vllm_us_per_iteration:.2f}",
                  f"{a.ours_in_engine_us_per_iteration:.1f}", style="bold")
    console.print(table)
    console.print("ours µs: a fresh MFUHook replays each step (slices → IterationRecord → MFUTracker.record); "
                  "vLLM µs: ModelMetrics.get_step_perf_stats_per_gpu(scheduler_output); engine µs: the hook's "
                  "three callbacks on the engine thread, timed inside the live engine (the accounting runs on its own "
                  "thread there; ours µs is engine + accounting inline); tokens: scheduled per step")
    o, v = a.ours_totals, a.vllm_totals
    console.print(f"ours (MFUHook → MFUTracker): prefill useful/executed {_si(o.get('prefill_useful_flops', 0))}/"
                  f"{_si(o.get('prefill_executed_flops', 0))}FLOPs, decode {_si(o.get('decode_useful_flops', 0))}/"
                  f"{_si(o.get('decode_executed_flops', 0))}FLOPs, {_si(o.get('bytes', 0))}B; "
                  f"time split, spec ({o.get('draft_tokens', 0):.0f} drafts), prefix ({o.get('hit_tokens', 0):.0f} "
                  f"hit tokens), recompute ({o.get('recompute_tokens', 0):.0f} tokens)")
    console.print(f"vLLM (ModelMetrics.get_step_perf_stats_per_gpu): {_si(v['flops_per_gpu'])}FLOPs, "
                  f"{_si(v['read_bytes_per_gpu'])}B read, {_si(v['write_bytes_per_gpu'])}B written — totals only")
    console.print(f"replay reproduces the engine's records: {a.replay_matches_engine}; scheduler found at "
                  f"{a.scheduler_path} (in-process engine, start {a.engine_start_s:.0f} s); "
                  f"whole benchmark {report.wall_s:.0f} s")
