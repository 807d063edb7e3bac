"""Which peak an engine divides by: override > calibration file > datasheet row of the given or
detected device > on a machine without an accelerator, the CPU default (this machine's cached
calibration, else the ISA peak); None when nothing applies (an unknown GPU: the caller reports a
missing peak)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from serving_mfu.peaks import calibrate, cpu
from serving_mfu.peaks.spec import PeakResolutionError, PeakSpec, normalize_dtype
from serving_mfu.peaks.table import _row, canonical_device, lookup_peak


def detect_device() -> str | None:
    """Name of local accelerator 0 as torch reports it; None on a CPU-only machine.  Never raises."""
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001 - detection must never break the caller
        pass
    return None


def resolve_peak(
    compute_dtype: str,
    device: str | None = None,
    flops_per_s: float | None = None,
    bandwidth_bytes_per_s: float | None = None,
    calibration_file: str | Path | None = None,
    cache_dir: Path | None = None,
) -> PeakSpec | None:
    """The peak to divide by: override > calibration file > table (given or detected device) > CPU default.

    The arguments are the user's settings (`Settings.peak_inputs()` gives them from SERVING_MFU_*);
    nothing here reads the environment.  One override number alone is completed from the table row
    of the device.  `cache_dir` is where the CPU default looks for this machine's calibration.
    Raises UnknownDeviceError for a GIVEN device not in the table, UnsupportedDtypeError for a
    dtype the device has no peak for (fp32).
    """
    dt = normalize_dtype(compute_dtype)

    if flops_per_s is not None or bandwidth_bytes_per_s is not None:
        return _override(dt, device, flops_per_s, bandwidth_bytes_per_s)
    if calibration_file is not None:
        spec = calibrate.load_calibration(calibration_file)
        if normalize_dtype(spec.dtype) != dt:
            raise PeakResolutionError(
                f"calibration file {str(calibration_file)!r} was measured for {spec.dtype}, "
                f"but the model computes in {dt}; re-run `serving-mfu calibrate --dtype {dt}`"
            )
        note = calibrate.method_note(spec)
        if note is not None:  # the user chose this file: used as given, but the source says what is stale
            stale = (f"calibration file {str(calibration_file)!r} {note}; "
                     f"re-run `serving-mfu calibrate --dtype {dt} --out <file>`")
            spec = spec.model_copy(update={"source": f"{spec.source} [{stale}]"})
        return spec
    if device is not None:
        return lookup_peak(device, dt)
    detected = detect_device()
    if detected is None:
        return cpu_default_peak(dt, cache_dir)
    if canonical_device(detected) is None:
        return None
    return lookup_peak(detected, dt)


def cpu_default_peak(
    dtype: str,
    cache_dir: Path | None = None,
    bandwidth_probe: "Callable[[], tuple[float, str]] | None" = None,
    isa: "Callable[[str], Any] | None" = None,
) -> PeakSpec | None:
    """The peak of a CPU engine with no configuration: this machine's calibration cached under
    `cache_dir` (`serving-mfu calibrate`, current method only), else the ISA peak with a quick bandwidth
    reading (`calibrate.quick_bandwidth`: max over streaming read, copy and GEMV, ~0.3 s).

    Never a FLOP calibration at engine start: on a few cores it competes with the engine it
    measures, which is how a peak ends up below the engine.  None where no ISA peak can be
    formed (no /proc/cpuinfo) or the dtype has none (fp8, fp4 on a CPU).
    """
    dt = normalize_dtype(dtype)
    cached = calibrate.cached_calibration(dt, cache_dir) if cache_dir is not None else None
    if cached is not None:
        spec, path = cached
        return spec.model_copy(update={"source": f"{spec.source} (cached in {path})"})
    try:
        limit = (isa or cpu.machine_isa_peak)(dt)
    except (OSError, ValueError):
        return None
    bandwidth, bw_source = bandwidth_probe() if bandwidth_probe is not None else calibrate.quick_bandwidth(dt)
    return PeakSpec(device=f"cpu ({limit.cpu}, {limit.cores} cores)", dtype=dt, flops_per_s=limit.flops_per_s,
                    bandwidth_bytes_per_s=bandwidth, isa_flops_per_s=limit.flops_per_s,
                    source=f"{limit.source}. Bandwidth: {bw_source}. (No calibration cached for this machine: "
                           f"`serving-mfu calibrate --dtype {dt}` measures an achievable peak once.)")


def _override(
    dt: str, device: str | None, flops_per_s: float | None, bandwidth_bytes_per_s: float | None
) -> PeakSpec:
    """PeakSpec from user numbers; a missing one is taken from the device's table row."""
    name = device if device is not None else detect_device()
    if flops_per_s is not None and bandwidth_bytes_per_s is not None:
        label = (canonical_device(name) or name) if name else "unknown"
        return PeakSpec(
            device=label, dtype=dt, flops_per_s=flops_per_s,
            bandwidth_bytes_per_s=bandwidth_bytes_per_s, source="override",
        )
    missing = "bandwidth" if bandwidth_bytes_per_s is None else "FLOP/s"
    if name is None or canonical_device(name) is None:
        raise PeakResolutionError(
            f"peak override lacks the {missing} and device {name!r} has no table entry to fill it; "
            "give both --peak-flops and --peak-bandwidth"
        )
    if flops_per_s is None:
        table = lookup_peak(name, dt)
        return PeakSpec(
            device=table.device, dtype=dt, flops_per_s=table.flops_per_s,
            bandwidth_bytes_per_s=bandwidth_bytes_per_s,
            source=f"override (bandwidth); FLOP/s from {table.source}",
        )
    key, row = _row(name)
    return PeakSpec(
        device=key, dtype=dt, flops_per_s=flops_per_s,
        bandwidth_bytes_per_s=row.bandwidth_bytes_per_s,
        source=f"override (FLOP/s); bandwidth from {row.source}",
    )
