"""Measure this machine's achievable matmul FLOP/s and copy bandwidth (DESIGN §7).

On a CPU no datasheet gives an honest peak, so `calibrate` measures one: the best of several
timed dense square matmuls (2·n³ FLOPs each) and the best of several large `copy_` calls
(2 × size bytes: read + write).  The result is a `PeakSpec` that `save_calibration` writes
as JSON for `resolve_peak(calibration_file=...)`.  torch is imported only inside functions.
"""

from __future__ import annotations

import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from serving_mfu.hardware import PeakSpec, canonical_device, normalize_dtype, peak_json

__all__ = [
    "CalibrationFileError", "calibrate", "save_calibration", "load_calibration", "peak_json",
]

_MiB = 1 << 20


class CalibrationFileError(ValueError):
    """A calibration file that cannot be read or is not a PeakSpec JSON; the message names the file."""


def save_calibration(peak: PeakSpec, path: str | Path) -> Path:
    """Write `peak` as JSON to `path` (parent folders created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(peak.model_dump_json(indent=2) + "\n")
    return p


def load_calibration(path: str | Path) -> PeakSpec:
    """Read a calibration JSON written by `save_calibration`; CalibrationFileError names a bad file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise CalibrationFileError(f"cannot read calibration file {str(p)!r}: {exc}") from exc
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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _matmul_op(torch: Any, dev: Any, dt: str, n: int) -> Callable[[], Any]:
    """A zero-argument callable doing one n×n×n matmul at compute dtype `dt` on `dev`."""
    if dt in ("bf16", "fp16", "fp32", "tf32"):
        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dt, torch.float32)
        a = torch.randn(n, n, device=dev, dtype=tdt)
        b = torch.randn(n, n, device=dev, dtype=tdt)
        c = torch.empty(n, n, device=dev, dtype=tdt)
        return lambda: torch.mm(a, b, out=c)
    if dt == "int8":
        a = torch.randint(-64, 64, (n, n), device=dev, dtype=torch.int8)
        b = torch.randint(-64, 64, (n, n), device=dev, dtype=torch.int8)
        return lambda: torch._int_mm(a, b)
    if dt == "fp8":
        if dev.type != "cuda":
            raise ValueError("fp8 matmul calibration needs a CUDA device with fp8 tensor cores")
        a = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn).t()  # column-major
        one = torch.ones((), device=dev, dtype=torch.float32)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    raise ValueError(
        f"calibration of {dt} matmuls is not supported (supported: bf16, fp16, fp32, tf32, int8, fp8)"
    )


def _measure_matmul(
    torch: Any, dev: Any, dt: str, budget_s: float, advance: Callable[[float], None]
) -> tuple[float, int, int, int]:
    """Best dense matmul FLOP/s within `budget_s`: grow n until one matmul is slow enough to time, then repeat."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(dev)
        n, n_max, target_s = 1024, int(math.sqrt(free_bytes / 8 / 4)), 0.02  # 3 fp32 matrices ≤ ~free/2
    else:
        n, n_max, target_s = 128, 4096, min(0.05, budget_s / 10)
    n_max = max(n, n_max // 256 * 256)
    start = time.perf_counter()

    def once(op: Callable[[], Any]) -> float:
        sync()
        t0 = time.perf_counter()
        op()
        sync()
        return time.perf_counter() - t0

    op = _matmul_op(torch, dev, dt, n)
    op()  # warm-up (kernel selection, page faults)
    t = min(once(op), once(op))  # two tries: one preempted call must not stop the growth
    # Grow while one matmul is too short to time well, and the next size (8x slower) still
    # leaves room for its warm-up plus three timed runs within the budget.
    while t < target_s and 8 * t <= budget_s / 6 and 2 * n <= n_max:
        n *= 2
        op = _matmul_op(torch, dev, dt, n)
        op()
        t = min(once(op), once(op))
    inner = max(1, math.ceil(target_s / max(t, 1e-9)))
    best_s, reps = math.inf, 0
    while reps < 3 or time.perf_counter() - start < budget_s:
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            op()
        sync()
        best_s = min(best_s, (time.perf_counter() - t0) / inner)
        reps += 1
        advance(min(1.0, (time.perf_counter() - start) / budget_s))
    return 2.0 * n**3 / best_s, n, inner, reps


def _measure_copy(
    torch: Any, dev: Any, budget_s: float, advance: Callable[[float], None]
) -> tuple[float, int, int]:
    """Best copy bandwidth (bytes/s, counting read + write) of a cache-busting tensor within `budget_s`."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(dev)
        nbytes = min(1024 * _MiB, free_bytes // 4)
    else:
        nbytes = 256 * _MiB
    src = torch.ones(nbytes // 4, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up, pages in dst
    start = time.perf_counter()
    best_s, reps = math.inf, 0
    while reps < 3 or time.perf_counter() - start < budget_s:
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best_s = min(best_s, time.perf_counter() - t0)
        reps += 1
        advance(min(1.0, (time.perf_counter() - start) / budget_s))
    return 2.0 * src.nbytes / best_s, src.nbytes, reps


def calibrate(
    dtype: str = "bf16", duration_s: float = 3.0, device: str | None = None, progress: bool = True
) -> PeakSpec:
    """Measure achievable matmul FLOP/s at `dtype` and copy bandwidth on a torch device (default cuda, else cpu).

    About 60 % of `duration_s` goes to matmuls, 40 % to copies; each reports its best repetition.
    """
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    dt = normalize_dtype(dtype)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dt == "tf32" and dev.type != "cuda":
        raise ValueError("tf32 is a GPU tensor-core mode; on a CPU calibrate fp32 (or bf16)")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        label = canonical_device(name) or name
    else:
        name = f"cpu ({_cpu_name()}, {torch.get_num_threads()} threads)"
        label = name
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")

    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dt == "tf32"
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), transient=True, disable=not progress) as bar:
            mm_task = bar.add_task(f"{dt} matmul on {name}", total=1.0)
            flops, n, inner, mm_reps = _measure_matmul(
                torch, dev, dt, 0.6 * duration_s, lambda f: bar.update(mm_task, completed=f)
            )
            bw_task = bar.add_task("copy bandwidth", total=1.0)
            bandwidth, nbytes, bw_reps = _measure_copy(
                torch, dev, 0.4 * duration_s, lambda f: bar.update(bw_task, completed=f)
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32

    source = (
        f"measured by serving-mfu calibrate on {name} at {when}: best of {mm_reps} timed runs of "
        f"{inner} dense {n}x{n}x{n} {dt} matmuls (2*n^3 FLOPs each) after warm-up; best of "
        f"{bw_reps} copies of {nbytes // _MiB} MiB (2 x size bytes each); torch {torch.__version__}"
    )
    return PeakSpec(
        device=label, dtype=dt, flops_per_s=flops, bandwidth_bytes_per_s=bandwidth, source=source
    )
