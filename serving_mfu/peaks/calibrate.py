"""Measure this machine's achievable matmul FLOP/s and copy bandwidth (DESIGN §7).

A CPU peak must be an upper bound of what the engine can reach, so `calibrate` takes the
MAXIMUM over every kernel an engine may run the compute dtype with — `torch.mm`, `F.linear` at
model-like shapes (tokens × hidden · hidden × 2·hidden), the GEMM vLLM's CPU linear layers
dispatch to (where vLLM is importable), and on a CPU for bf16/fp16 also the fp32 path (engines
up-convert where the ISA has no native support) — each over sizes until throughput stops rising.
The result is a `PeakSpec` whose `source` names the winning kernel, dtype and shape; on a CPU it
is held against the ISA peak (serving_mfu.peaks.cpu) and flagged when above it.

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
from serving_mfu.peaks.cpu import machine_isa_peak, machine_key, read_machine
from serving_mfu.peaks.spec import KernelResult, PeakSpec, normalize_dtype
from serving_mfu.peaks.table import canonical_device, peak_json

__all__ = [
    "CalibrationFileError", "Kernel", "KernelResult", "calibrate", "save_calibration", "load_calibration",
    "peak_json", "cache_path", "cached_calibration", "sweep_kernel", "best_result", "quick_copy_bandwidth",
]

_MiB = 1 << 20
Clock = Callable[[], float]
CPU_SIZES = (128, 256, 512, 1024, 2048)
GPU_SIZES = (1024, 2048, 4096, 8192, 16384)
RISE = 1.03  # a size "raises" throughput when it beats the best so far by 3 %
PATIENCE = 2  # stop a kernel's sweep after this many sizes in a row that did not raise it


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
        return parse_calibration(text, path), path
    except CalibrationFileError as exc:
        logging.getLogger(__name__).warning("serving-mfu: ignoring the cached calibration: %s", exc)
        return None


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


def measure_copy(torch: Any, dev: Any, budget_s: float, clock: Clock = time.perf_counter,
                 nbytes: int | None = None, min_reps: int = 3) -> tuple[float, int, int]:
    """Best copy bandwidth (bytes/s, counting read + write) of a cache-busting tensor within `budget_s`."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if nbytes is None:
        if dev.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(dev)
            nbytes = min(1024 * _MiB, free_bytes // 4)
        else:
            nbytes = 256 * _MiB
    src = torch.ones(nbytes // 4, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up, pages in dst
    start = clock()
    best_s, reps = math.inf, 0
    while reps < min_reps or clock() - start < budget_s:
        sync()
        t0 = clock()
        dst.copy_(src)
        sync()
        best_s = min(best_s, clock() - t0)
        reps += 1
    return 2.0 * src.nbytes / best_s, src.nbytes, reps


def quick_copy_bandwidth() -> tuple[float, str]:
    """A ~0.1 s copy-bandwidth reading (64 MiB, best of 5) for a CPU engine with no cached calibration."""
    import torch

    bw, nbytes, reps = measure_copy(torch, torch.device("cpu"), 0.0, nbytes=64 * _MiB, min_reps=5)
    return bw, f"copy bandwidth measured at engine start: best of {reps} copies of {nbytes // _MiB} MiB"


def _cpu_name() -> str:
    try:
        return read_machine()[0].model_name
    except OSError:  # no /proc/cpuinfo (not Linux)
        return platform.processor() or platform.machine() or "unknown cpu"


def calibrate(
    dtype: str = "bf16", duration_s: float = 5.0, device: str | None = None,
    on_event: Callable[[str, Any], None] | None = None,
    kernels: Sequence[Kernel] | None = None, clock: Clock = time.perf_counter, include_vllm: bool = True,
    isa_flops_per_s: float | None = None,
    measure_bandwidth: Callable[[], tuple[float, int, int]] | None = None,
) -> PeakSpec:
    """Achievable matmul FLOP/s at `dtype` (max over `kernels`, default `engine_kernels`) and copy bandwidth.

    About 80 % of `duration_s` goes to the kernels (shared evenly), 20 % to copies.  On a CPU the
    result is compared with the ISA peak (`isa_flops_per_s`, default: this machine's).  Progress
    goes to `on_event(kind, payload)`: ("finding", None), ("kernel", (Kernel, sizes)),
    ("result", KernelResult), ("skipped", (Kernel, exception)), ("copy", None) — the CLI draws it.
    `kernels`, `clock` and `measure_bandwidth` are seams for tests and benchmarks.
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
        bandwidth, nbytes, bw_reps = (measure_bandwidth or (
            lambda: measure_copy(torch, dev, 0.2 * duration_s, clock=clock)))()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32

    top = best_result(results)
    tried = sorted({f"{r.kernel} {r.dtype}" for r in results})
    source = (
        f"measured by serving-mfu calibrate on {name} at {when}: {top.kernel} in {top.dtype} at {top.shape} "
        f"(best of {top.reps} timed runs of {top.calls} calls) was the fastest of {len(results)} "
        f"measurements over {', '.join(tried)}; best of {bw_reps} copies of {nbytes // _MiB} MiB "
        f"(2 x size bytes each); torch {torch.__version__}"
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
    return PeakSpec(device=label, dtype=dt, flops_per_s=top.flops_per_s, bandwidth_bytes_per_s=bandwidth,
                    source=source, isa_flops_per_s=isa, measurements=results)
