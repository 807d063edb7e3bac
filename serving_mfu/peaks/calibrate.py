"""Measure this machine's achievable matmul FLOP/s and memory bandwidth (DESIGN §7).

A CPU peak must be an upper bound of what the engine can reach, so `calibrate` takes the
MAXIMUM over every kernel an engine may run the compute dtype with — `torch.mm`, `F.linear` at
model-like shapes (tokens × hidden · hidden × 2·hidden), the GEMM vLLM's CPU linear layers
dispatch to (where vLLM is importable), and on a CPU for bf16/fp16 also the fp32 path (engines
up-convert where the ISA has no native support) — each over sizes until throughput stops rising.
The result is a `PeakSpec` whose `source` names the winning kernel, dtype and shape; on a CPU it
is held against the ISA peak (serving_mfu.peaks.cpu) and flagged when above it.

The bandwidth is an upper bound the same way: the maximum over a streaming read, a copy and the
engine's own weight-streaming pattern (a GEMV `F.linear(x[1,k], W)` in the compute dtype), each
over buffers several times the last-level cache, so what they move is DRAM traffic.  Calibrations
carry `CALIBRATION_METHOD`; a cached one of an older method is measured again.

`save_calibration` writes it as JSON; `serving-mfu calibrate` also caches it once per machine
(`cache_path`), where a CPU engine with no SERVING_MFU_* setting finds it.  torch is imported
only inside functions; the clock is passed in, so the bookkeeping is tested with a fake one.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import ValidationError

from serving_mfu.files import folder_refusal, read_own, write_atomic
from serving_mfu.peaks.cpu import last_level_cache_bytes, machine_isa_peak, machine_key, read_machine
from serving_mfu.peaks.spec import BandwidthResult, KernelResult, PeakSpec, normalize_dtype
from serving_mfu.peaks.table import canonical_device, peak_json

__all__ = [
    "CalibrationFileError", "Kernel", "KernelResult", "calibrate", "save_calibration", "load_calibration",
    "peak_json", "cache_path", "cached_calibration", "sweep_kernel", "best_result", "quick_copy_bandwidth",
    "CALIBRATION_METHOD", "BandwidthKernel", "BandwidthResult", "bandwidth_kernels", "measure_bandwidth",
    "quick_bandwidth", "method_note",
]

# The calibration method: a cached calibration of another method is measured again.  1 (files without
# the field): bandwidth from copies only.  2: bandwidth = max over streaming read, copy and GEMV.
CALIBRATION_METHOD = 2

_MiB = 1 << 20
Clock = Callable[[], float]
CPU_SIZES = (128, 256, 512, 1024, 2048)
GPU_SIZES = (1024, 2048, 4096, 8192, 16384)
RISE = 1.03  # a size "raises" throughput when it beats the best so far by 3 %
PATIENCE = 2  # stop a kernel's sweep after this many sizes in a row that did not raise it
ASSUMED_LLC_BYTES = 32 * _MiB  # sizes the buffers where sysfs does not say (a large EPYC CCD / Xeon socket)
GEMV_K = 4096  # the GEMV's input width: a model-like hidden size


class CalibrationFileError(ValueError):
    """A calibration file that cannot be read or is not a PeakSpec JSON; the message names the file."""


# ------------------------------------------------------------------------------ files and cache
def save_calibration(peak: PeakSpec, path: str | Path) -> Path:
    """Write `peak` as JSON to `path` (parent folders created; a fresh temporary renamed over it, so a
    symlink planted at `path` is replaced, not written through); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(p, peak.model_dump_json(indent=2) + "\n")


def load_calibration(path: str | Path) -> PeakSpec:
    """Read a calibration JSON written by `save_calibration`; CalibrationFileError names a bad file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise CalibrationFileError(f"cannot read calibration file {str(p)!r}: {exc}") from exc
    return parse_calibration(text, p)


def parse_calibration(text: str | bytes, p: Path) -> PeakSpec:
    """A calibration JSON's PeakSpec; CalibrationFileError names the file `p` and what is wrong."""
    try:
        return PeakSpec.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<file>'}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise CalibrationFileError(
            f"calibration file {str(p)!r} is not a serving-mfu calibration JSON "
            f"(device, dtype, flops_per_s, bandwidth_bytes_per_s, source): {problems}"
        ) from exc


def cache_path(dtype: str, cache_dir: Path, key: str | None = None) -> Path:
    """Where this machine's CPU calibration for `dtype` is cached under `cache_dir` (key: CPU model,
    family/model, cores; the folder is Settings.calibration_cache_dir())."""
    return Path(cache_dir) / "peaks" / f"{key or machine_key()}-{normalize_dtype(dtype)}.json"


def cached_calibration(dtype: str, cache_dir: Path) -> tuple[PeakSpec, Path] | None:
    """This machine's cached CPU calibration for `dtype`, or None (absent, unreadable, or not trusted:
    a link, another user's file, or a folder others may write to; logged)."""
    try:
        path = cache_path(dtype, cache_dir)
    except OSError:
        return None
    if not os.path.lexists(path):
        return None
    # the cache sets the engine's peak: a file another user could have planted or swapped is not trusted
    refusal = folder_refusal(path.parent, "calibration cache folder", "Fix: chmod go-w {folder}, or set "
                             "SERVING_MFU_CACHE_DIR to a folder of your own.")
    try:
        if refusal is not None:
            raise CalibrationFileError(refusal)
        try:
            text = read_own(path)
        except OSError as exc:
            raise CalibrationFileError(f"cannot read calibration file {str(path)!r}: {exc}") from exc
        spec = parse_calibration(text, path)
    except CalibrationFileError as exc:
        logging.getLogger(__name__).warning("serving-mfu: ignoring the cached calibration: %s", exc)
        return None
    note = method_note(spec)
    if note is not None:  # an older method's figures (a copy-only bandwidth): absent, so measured again
        _log_once(f"serving-mfu: ignoring the cached calibration {str(path)!r}: {note}; it counts as absent "
                  f"until measured again (`serving-mfu calibrate --dtype {spec.dtype}`)")
        return None
    return spec, path


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logging.getLogger(__name__).warning(message)


def method_note(spec: PeakSpec) -> str | None:
    """None for a calibration of the current method; else what is stale about it (for a log line or a source)."""
    if spec.method == CALIBRATION_METHOD:
        return None
    return (f"written by calibration method {spec.method or 1}, not the current {CALIBRATION_METHOD} (whose "
            "bandwidth is the maximum over streaming read, copy and a GEMV over a weight larger than the "
            "last-level cache), so its bandwidth may be below what the engine streams")


# ------------------------------------------------------------------------------ kernels
@dataclass(frozen=True)
class Kernel:
    """One way an engine may run a matmul: `build(n)` → (zero-argument op, FLOPs per call, shape text)."""

    name: str
    dtype: str  # the dtype it computes in
    build: Callable[[int], tuple[Callable[[], Any], float, str]]


def _torch_dtype(torch: Any, dt: str) -> Any:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dt, torch.float32)


def _mm_kernel(torch: Any, dev: Any, dt: str) -> Kernel:
    def build(n: int):
        tdt = _torch_dtype(torch, dt)
        a, b = torch.randn(n, n, device=dev, dtype=tdt), torch.randn(n, n, device=dev, dtype=tdt)
        c = torch.empty(n, n, device=dev, dtype=tdt)
        return (lambda: torch.mm(a, b, out=c)), 2.0 * n**3, f"{n}x{n}x{n}"
    return Kernel("torch.mm", dt, build)


def _linear_kernel(torch: Any, dev: Any, dt: str) -> Kernel:
    """F.linear at a model-like shape: n tokens × n hidden → 2n outputs (an MLP up-projection)."""
    import torch.nn.functional as F

    def build(n: int):
        tdt = _torch_dtype(torch, dt)
        x, w = torch.randn(n, n, device=dev, dtype=tdt), torch.randn(2 * n, n, device=dev, dtype=tdt)
        return (lambda: F.linear(x, w)), 2.0 * n * n * 2 * n, f"x[{n},{n}]·W[{2 * n},{n}]^T"
    return Kernel("F.linear", dt, build)


def _vllm_kernel(torch: Any, dt: str) -> Kernel | None:
    """The GEMM vLLM's CPU linear layers dispatch to (oneDNN, zentorch, sgl or F.linear); None without vLLM."""
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except Exception:  # noqa: BLE001 - vLLM absent or broken: the torch kernels still bound the peak
        return None
    chosen: list[str] = []

    class _Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "GEMM dispatch: using" in msg:
                chosen.append(msg.split("using", 1)[1].strip())

    def build(n: int):
        tdt = _torch_dtype(torch, dt)
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.randn(2 * n, n, dtype=tdt), requires_grad=False)
        vlog = logging.getLogger("vllm")
        grab, level = _Grab(), vlog.level
        vlog.addHandler(grab)
        vlog.setLevel(logging.DEBUG)
        try:
            dispatch_cpu_unquantized_gemm(layer, False)
        finally:
            vlog.removeHandler(grab)
            vlog.setLevel(level)
        x = torch.randn(n, n, dtype=tdt)
        return (lambda: layer.cpu_linear(x, layer.weight, None)), 2.0 * n * n * 2 * n, f"x[{n},{n}]·W[{2 * n},{n}]^T"

    label = "vLLM CPU linear (dispatch_cpu_unquantized_gemm)"
    kernel = Kernel(label, dt, build)
    try:  # learn which backend vLLM picks here, for the source text
        kernel.build(64)
    except Exception:  # noqa: BLE001
        return None
    if chosen:
        kernel = Kernel(f"vLLM CPU linear ({chosen[-1]})", dt, build)
    return kernel


def _lowp_kernel(torch: Any, dev: Any, dt: str) -> Kernel:
    if dt == "int8":
        def build(n: int):
            a = torch.randint(-64, 64, (n, n), device=dev, dtype=torch.int8)
            b = torch.randint(-64, 64, (n, n), device=dev, dtype=torch.int8)
            return (lambda: torch._int_mm(a, b)), 2.0 * n**3, f"{n}x{n}x{n}"
        return Kernel("torch._int_mm", dt, build)
    if dev.type != "cuda":
        raise ValueError("fp8 matmul calibration needs a CUDA device with fp8 tensor cores")

    def build8(n: int):
        a = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn).t()  # column-major
        one = torch.ones((), device=dev, dtype=torch.float32)
        return (lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)), 2.0 * n**3, \
            f"{n}x{n}x{n}"
    return Kernel("torch._scaled_mm", dt, build8)


def engine_kernels(torch: Any, dev: Any, dt: str, include_vllm: bool = True) -> list[Kernel]:
    """Every kernel an engine may run compute dtype `dt` with on `dev` (the set the peak is the max over)."""
    if dt in ("int8", "fp8"):
        return [_lowp_kernel(torch, dev, dt)]
    if dt not in ("bf16", "fp16", "fp32", "tf32"):
        raise ValueError(
            f"calibration of {dt} matmuls is not supported (supported: bf16, fp16, fp32, tf32, int8, fp8)"
        )
    dtypes = [dt]
    if dev.type == "cpu" and dt in ("bf16", "fp16"):
        dtypes.append("fp32")  # engines up-convert where the CPU has no native bf16/fp16 arithmetic
    out: list[Kernel] = []
    for d in dtypes:
        out += [_mm_kernel(torch, dev, d), _linear_kernel(torch, dev, d)]
        if dev.type == "cpu" and include_vllm:
            k = _vllm_kernel(torch, d)
            if k is not None:
                out.append(k)
    return out


# ------------------------------------------------------------------------------ the sweep
def sweep_kernel(kernel: Kernel, sizes: Sequence[int], budget_s: float, clock: Clock = time.perf_counter,
                 sync: Callable[[], None] = lambda: None, target_s: float = 0.02, reps: int = 3,
                 on_result: Callable[[KernelResult], None] = lambda r: None) -> list[KernelResult]:
    """Time `kernel` at growing sizes until throughput stops rising (PATIENCE sizes without a RISE)
    or the next size would not fit the budget; each size: a warm-up call, then the best of `reps`
    repetitions of enough calls to last `target_s`."""
    start = clock()
    out: list[KernelResult] = []
    best, flat, t_call = 0.0, 0, 0.0
    for i, n in enumerate(sizes):
        left = budget_s - (clock() - start)
        if i and (left <= 0 or (1 + reps) * t_call * (n / sizes[i - 1]) ** 3 > left):
            break  # the next size would not fit: what was measured stands
        op, flops, shape = kernel.build(n)
        sync()
        t0 = clock()
        op()  # warm-up: kernel selection, page faults, weight packing
        sync()
        t_call = max(clock() - t0, 1e-9)
        calls = max(1, math.ceil(target_s / t_call))
        best_s = math.inf
        for _ in range(reps):
            sync()
            t0 = clock()
            for _ in range(calls):
                op()
            sync()
            best_s = min(best_s, (clock() - t0) / calls)
        t_call = min(t_call, best_s)
        r = KernelResult(kernel=kernel.name, dtype=kernel.dtype, n=n, shape=shape, flops_per_s=flops / best_s,
                         calls=calls, reps=reps)
        out.append(r)
        on_result(r)
        if r.flops_per_s >= RISE * best:
            flat = 0
        else:
            flat += 1
        best = max(best, r.flops_per_s)
        if flat >= PATIENCE:
            break
    return out


def best_result(results: Sequence[KernelResult]) -> KernelResult:
    """The fastest measurement: the peak is the max over kernels, dtypes and sizes."""
    if not results:
        raise ValueError("no kernel could be timed")
    return max(results, key=lambda r: r.flops_per_s)


@dataclass(frozen=True)
class BandwidthKernel:
    """One memory kernel: `build()` → (zero-argument op, bytes one call moves, what it moves as text)."""

    name: str
    dtype: str
    build: Callable[[], tuple[Callable[[], Any], float, str]]


def bandwidth_kernels(torch: Any, dev: Any, dt: str, nbytes: int) -> list[BandwidthKernel]:
    """Streaming read, copy and the engine's weight-streaming GEMV over one `nbytes` buffer (allocated once,
    on first build, and written so every page is backed; the copy adds its destination)."""
    held: dict[str, Any] = {}

    def src() -> Any:
        if "x" not in held:
            held["x"] = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).fill_(1.0)
        return held["x"]

    size = f"{nbytes / _MiB:,.0f} MiB"

    def read():
        x = src()
        return (lambda: x.max()), float(x.nbytes), f"x.max() over {size} fp32 (bytes = size)"

    def copy():
        x = src()
        y = torch.empty_like(x)  # paged in by the warm-up call
        return (lambda: y.copy_(x)), 2.0 * x.nbytes, f"{size} fp32 into another {size} (bytes = 2 x size)"

    gdt = dt if dt in ("bf16", "fp16") else "fp32" if dt in ("fp32", "tf32") else "bf16"

    def gemv():
        import torch.nn.functional as F

        tdt = _torch_dtype(torch, gdt)
        w = src().view(tdt).view(-1, GEMV_K)  # the same bytes as a weight (1.0f reads as finite 16-bit values)
        v = torch.ones(1, GEMV_K, device=dev, dtype=tdt)
        return (lambda: F.linear(v, w)), float(w.nbytes), \
            f"F.linear(x[1,{GEMV_K}], W[{w.shape[0]},{GEMV_K}]) in {gdt}, W {size} (bytes = W)"

    return [BandwidthKernel("streaming read", "fp32", read), BandwidthKernel("copy", "fp32", copy),
            BandwidthKernel("GEMV", gdt, gemv)]


def measure_bandwidth(kernels: Sequence[BandwidthKernel], budget_s: float, clock: Clock = time.perf_counter,
                      sync: Callable[[], None] = lambda: None, min_reps: int = 3,
                      on_result: Callable[[BandwidthResult], None] = lambda r: None) -> list[BandwidthResult]:
    """Each kernel's best bytes/s: a warm-up call, then single timed calls until `min_reps` and its share
    of `budget_s` are both spent.  A kernel that fails is left out (the others still bound the peak)."""
    out: list[BandwidthResult] = []
    for k in kernels:
        try:
            op, nbytes, shape = k.build()
            sync()
            op()
            sync()
        except Exception:  # noqa: BLE001 - e.g. a GEMV dtype this build cannot run
            logging.getLogger(__name__).debug("serving-mfu: bandwidth kernel %s skipped", k.name, exc_info=True)
            continue
        start, best_s, reps = clock(), math.inf, 0
        while reps < min_reps or clock() - start < budget_s / len(kernels):
            t0 = clock()
            op()
            sync()
            best_s = min(best_s, max(clock() - t0, 1e-12))
            reps += 1
        r = BandwidthResult(kernel=k.name, dtype=k.dtype, bytes=int(nbytes), shape=shape,
                            bytes_per_s=nbytes / best_s, reps=reps)
        out.append(r)
        on_result(r)
    return out


def buffer_bytes(llc: int | None, quick: bool = False) -> int:
    """Bandwidth buffer size on a CPU: 8x the last-level cache (4x for the quick reading), within
    256 MiB…2 GiB (64…256 MiB quick)."""
    lo, hi, times = (64 * _MiB, 256 * _MiB, 4) if quick else (256 * _MiB, 2048 * _MiB, 8)
    return int(min(hi, max(lo, times * (llc or ASSUMED_LLC_BYTES))) // _MiB * _MiB)


def bandwidth_text(results: Sequence[BandwidthResult], nbytes: int, llc: int | None, on_cpu: bool = True) -> str:
    """The source text of a bandwidth maximum: the winner, every kernel's figure, the buffer against the cache."""
    top = max(results, key=lambda r: r.bytes_per_s)
    each = ", ".join(f"{r.kernel} {r.bytes_per_s / 1e9:,.1f}" for r in results)
    text = (f"bandwidth {top.bytes_per_s / 1e9:,.1f} GB/s: {top.kernel} ({top.shape}, best of {top.reps}) was the "
            f"fastest of {each} GB/s over {nbytes / _MiB:,.0f} MiB buffers")
    if not on_cpu:
        return text
    if llc is None:
        return text + f" (last-level cache size unknown; assumed {ASSUMED_LLC_BYTES // _MiB} MiB)"
    text += f", {nbytes / llc:.1f}x the {llc / _MiB:,.0f} MiB last-level cache"
    return text + (" (BELOW 4x: part of what was moved may have been cache hits)" if nbytes < 4 * llc else "")


def quick_bandwidth(dtype: str = "bf16", llc: int | None = None) -> tuple[float, str]:
    """A short (~0.3 s) CPU bandwidth reading at engine start: the max over streaming read, copy and GEMV
    on one buffer of 4x the last-level cache (64…256 MiB), best of 3 calls each."""
    import torch

    llc = last_level_cache_bytes() if llc is None else llc
    nbytes = buffer_bytes(llc, quick=True)
    results = measure_bandwidth(bandwidth_kernels(torch, torch.device("cpu"), normalize_dtype(dtype), nbytes), 0.0)
    if not results:
        raise RuntimeError("no bandwidth kernel could be timed")
    top = max(results, key=lambda r: r.bytes_per_s)
    return top.bytes_per_s, "measured at engine start: " + bandwidth_text(results, nbytes, llc)


def quick_copy_bandwidth() -> tuple[float, str]:
    """The engine-start reading (`quick_bandwidth`; the name of method 1, when it was a copy alone)."""
    return quick_bandwidth()


def _cpu_name() -> str:
    try:
        return read_machine()[0].model_name
    except OSError:  # no /proc/cpuinfo (not Linux)
        return platform.processor() or platform.machine() or "unknown cpu"


def calibrate(
    dtype: str = "bf16", duration_s: float = 5.0, device: str | None = None,
    on_event: Callable[[str, Any], None] | None = None,
    kernels: Sequence[Kernel] | None = None, clock: Clock = time.perf_counter, include_vllm: bool = True,
    isa_flops_per_s: float | None = None, memory_kernels: Sequence[BandwidthKernel] | None = None,
) -> PeakSpec:
    """Achievable matmul FLOP/s at `dtype` (max over `kernels`, default `engine_kernels`) and memory bandwidth
    (max over `memory_kernels`, default `bandwidth_kernels`: streaming read, copy, GEMV).

    About 80 % of `duration_s` goes to the matmul kernels (shared evenly), 20 % to the memory kernels.  On a
    CPU the result is compared with the ISA peak (`isa_flops_per_s`, default: this machine's).  Progress
    goes to `on_event(kind, payload)`: ("finding", None), ("kernel", (Kernel, sizes)),
    ("result", KernelResult), ("skipped", (Kernel, exception)), ("copy", None) before the memory kernels,
    ("bandwidth", BandwidthResult) — the CLI draws it.  `kernels`, `clock` and `memory_kernels` are seams
    for tests and benchmarks.
    """
    import torch

    emit = on_event or (lambda kind, payload: None)
    dt = normalize_dtype(dtype)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dt == "tf32" and dev.type != "cuda":
        raise ValueError("tf32 is a GPU tensor-core mode; on a CPU calibrate fp32 (or bf16)")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        label = canonical_device(name) or name
        sync: Callable[[], None] = torch.cuda.synchronize
    else:
        name = f"cpu ({_cpu_name()}, {torch.get_num_threads()} threads)"
        label = name
        sync = lambda: None  # noqa: E731
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")

    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dt == "tf32"
    results: list[KernelResult] = []
    try:
        if kernels is None:
            emit("finding", None)
            kernels = engine_kernels(torch, dev, dt, include_vllm=include_vllm)
        sizes = GPU_SIZES if dev.type == "cuda" else CPU_SIZES
        if dev.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(dev)
            sizes = tuple(n for n in sizes if 4 * n * n * 4 <= free_bytes // 2) or sizes[:1]
        per_kernel = 0.8 * duration_s / max(1, len(kernels))
        for k in kernels:
            emit("kernel", (k, sizes))
            try:
                results += sweep_kernel(k, sizes, per_kernel, clock=clock, sync=sync,
                                        target_s=0.02 if dev.type == "cuda" else min(0.02, per_kernel / 20),
                                        on_result=lambda r: emit("result", r))
            except Exception as exc:  # noqa: BLE001 - a kernel this build cannot run is skipped, said
                emit("skipped", (k, exc))
        emit("copy", None)
        bw_results, bw_text = _calibrate_bandwidth(torch, dev, dt, 0.2 * duration_s, clock, sync, memory_kernels,
                                                   lambda r: emit("bandwidth", r))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32

    top = best_result(results)
    tried = sorted({f"{r.kernel} {r.dtype}" for r in results})
    source = (
        f"measured by serving-mfu calibrate on {name} at {when}: {top.kernel} in {top.dtype} at {top.shape} "
        f"(best of {top.reps} timed runs of {top.calls} calls) was the fastest of {len(results)} measurements "
        f"over {', '.join(tried)}; {bw_text}; calibration method {CALIBRATION_METHOD}; torch {torch.__version__}"
    )
    isa = isa_flops_per_s
    if isa is None and dev.type == "cpu" and dt in ("bf16", "fp16", "fp32", "int8"):
        try:
            isa = machine_isa_peak(dt).flops_per_s
        except Exception:  # noqa: BLE001 - no /proc/cpuinfo (not Linux): no ISA figure to hold it against
            isa = None
    if isa is not None and top.flops_per_s > isa:
        source += (f"; ABOVE the ISA peak {isa / 1e9:.1f} GFLOP/s: the CPU table or the clock is wrong "
                   "for this machine (please report it)")
    return PeakSpec(device=label, dtype=dt, flops_per_s=top.flops_per_s,
                    bandwidth_bytes_per_s=max(r.bytes_per_s for r in bw_results), source=source,
                    isa_flops_per_s=isa, measurements=results, bandwidth_measurements=bw_results,
                    method=CALIBRATION_METHOD)


def _calibrate_bandwidth(torch: Any, dev: Any, dt: str, budget_s: float, clock: Clock, sync: Callable[[], None],
                         kernels: Sequence[BandwidthKernel] | None,
                         on_result: Callable[[BandwidthResult], None]) -> tuple[list[BandwidthResult], str]:
    """calibrate's bandwidth: the memory kernels over a buffer far larger than the last-level cache (CPU) or
    a quarter of free memory up to 1 GiB (GPU); their results and the source text."""
    on_cpu = dev.type != "cuda"
    llc = last_level_cache_bytes() if on_cpu else None
    if on_cpu:
        nbytes = buffer_bytes(llc)
    else:
        free_bytes, _ = torch.cuda.mem_get_info(dev)
        nbytes = int(min(1024 * _MiB, free_bytes // 4))
    if kernels is None:
        kernels = bandwidth_kernels(torch, dev, dt, nbytes)
    results = measure_bandwidth(kernels, budget_s, clock=clock, sync=sync, on_result=on_result)
    if not results:
        raise RuntimeError("no bandwidth kernel could be timed")
    return results, bandwidth_text(results, nbytes, llc, on_cpu=on_cpu)
