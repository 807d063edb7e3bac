"""Peak FLOP/s and memory bandwidth per device and compute dtype (DESIGN §7).

The table holds DENSE tensor-core peaks (datasheets print 2:4-sparse figures with an
asterisk; those are halved here) and HBM/GDDR bandwidth, per device, each row citing the
datasheet it came from.  `resolve_peak` picks, in order: an explicit override, a
calibration file written by `serving-mfu calibrate`, the table row of the given or detected
device; on a machine without an accelerator, the CPU default (`cpu_default_peak`: this machine's
cached calibration, else the ISA peak); None when nothing applies (an unknown GPU: the caller
reports a missing peak).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ConfigDict, Field

T = 1e12  # tera
P = 1e15  # peta


class KernelResult(BaseModel):
    """One calibration measurement: the best throughput of one kernel at one size (serving_mfu.calibrate)."""

    kernel: str
    dtype: str
    n: int
    shape: str
    flops_per_s: float
    calls: int = 1  # calls per timed repetition
    reps: int = 0


class PeakSpec(BaseModel):
    """Peak compute and bandwidth of ONE device at one compute dtype, and where they came from."""

    model_config = ConfigDict(frozen=True)

    device: str
    dtype: str
    flops_per_s: float = Field(gt=0)
    bandwidth_bytes_per_s: float = Field(gt=0)
    source: str
    isa_flops_per_s: float | None = Field(
        default=None, description="CPU only: theoretical ISA peak (cores × FLOPs/cycle × max clock), the physical limit")
    measurements: list[KernelResult] | None = Field(
        default=None, description="calibration only: every kernel × size it timed (the peak is their max)")


class UnknownDeviceError(ValueError):
    """A device name with no table row; the message lists the known devices."""


class UnsupportedDtypeError(ValueError):
    """A compute dtype the device has no dense tensor-core peak for; the message says which it has."""


class PeakResolutionError(ValueError):
    """Peak inputs that contradict each other (e.g. a calibration file for another dtype)."""


@dataclass(frozen=True, slots=True)
class _Row:
    flops_per_s: Mapping[str, float]  # dense peak per compute dtype
    bandwidth_bytes_per_s: float
    source: str  # datasheet title + URL


_NV_A100 = (
    "NVIDIA A100 Tensor Core GPU datasheet, "
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
)
_NV_H100 = (
    "NVIDIA H100 Tensor Core GPU datasheet, "
    "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
    " (exact dense figures: NVIDIA H100 Tensor Core GPU Architecture whitepaper, "
    "https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper)"
)
_NV_H200 = (
    "NVIDIA H200 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h200/"
)
_NV_BLACKWELL = (
    "NVIDIA GB200 NVL72 specifications (GB200 NVL72 vs HGX B200, per-GPU rows), "
    "https://www.nvidia.com/en-us/data-center/gb200-nvl72/"
)
_NV_L40S = "NVIDIA L40S GPU datasheet, https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413"
_NV_L4 = "NVIDIA L4 Tensor Core GPU datasheet, https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet"
_A10G = (
    "AWS A10G (EC2 G5) figures as tabulated in 'NVIDIA A10 vs A10G for ML model inference', "
    "https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/ "
    "(NVIDIA publishes no A10G datasheet)"
)
_AMD_MI300X = (
    "AMD Instinct MI300X accelerator specifications, "
    "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html"
)
_AMD_MI325X = (
    "AMD Instinct MI325X accelerator specifications, "
    "https://www.amd.com/en/products/accelerators/instinct/mi300/mi325x.html"
)

_A100_FLOPS = {"bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "int8": 624 * T}
_H100_SXM_FLOPS = {
    "bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp8": 1978.9 * T, "int8": 1978.9 * T,
}
_MI300_FLOPS = {
    "bf16": 1307.4 * T, "fp16": 1307.4 * T, "tf32": 653.7 * T, "fp8": 2614.9 * T, "int8": 2614.9 * T,
}

# Sparse datasheet figures (with '*') halved; per single GPU.
_TABLE: dict[str, _Row] = {
    "a100-40gb": _Row(_A100_FLOPS, 1.555e12, _NV_A100 + " (A100 40GB SXM column)"),
    "a100-80gb": _Row(_A100_FLOPS, 2.039e12, _NV_A100 + " (A100 80GB SXM column)"),
    "a100-80gb-pcie": _Row(_A100_FLOPS, 1.935e12, _NV_A100 + " (A100 80GB PCIe column)"),
    "h100-sxm": _Row(_H100_SXM_FLOPS, 3.35e12, _NV_H100 + " (H100 SXM column)"),
    "h100-pcie": _Row(
        {"bf16": 756 * T, "fp16": 756 * T, "tf32": 378 * T, "fp8": 1513 * T, "int8": 1513 * T},
        2.0e12, _NV_H100 + " (H100 PCIe column)",
    ),
    "h100-nvl": _Row(
        {"bf16": 835.5 * T, "fp16": 835.5 * T, "tf32": 417.5 * T, "fp8": 1670.5 * T, "int8": 1670.5 * T},
        3.9e12, _NV_H100 + " (H100 NVL column, per GPU)",
    ),
    "h200": _Row(_H100_SXM_FLOPS, 4.8e12, _NV_H200 + " (H200 SXM column)"),
    "b200": _Row(
        {"bf16": 2.25 * P, "fp16": 2.25 * P, "tf32": 1.1 * P, "fp8": 4.5 * P, "int8": 4.5 * P, "fp4": 9 * P},
        7.7e12, _NV_BLACKWELL + " (HGX B200 column)",
    ),
    "gb200": _Row(
        {"bf16": 2.5 * P, "fp16": 2.5 * P, "tf32": 1.25 * P, "fp8": 5 * P, "int8": 5 * P, "fp4": 10 * P},
        8.0e12, _NV_BLACKWELL + " (GB200 NVL72 column, per Blackwell GPU)",
    ),
    "l40s": _Row(
        {"bf16": 362.05 * T, "fp16": 362.05 * T, "tf32": 183 * T, "fp8": 733 * T, "int8": 733 * T},
        864e9, _NV_L40S,
    ),
    "l4": _Row(
        {"bf16": 121 * T, "fp16": 121 * T, "tf32": 60 * T, "fp8": 242.5 * T, "int8": 242.5 * T},
        300e9, _NV_L4,
    ),
    "a10g": _Row({"bf16": 70 * T, "fp16": 70 * T, "tf32": 35 * T, "int8": 140 * T}, 600e9, _A10G),
    "mi300x": _Row(_MI300_FLOPS, 5.3e12, _AMD_MI300X),
    "mi325x": _Row(_MI300_FLOPS, 6.0e12, _AMD_MI325X),
}

_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "tf32": "tf32", "tensorfloat32": "tf32",
    "fp8": "fp8", "float8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
    "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "e4m3": "fp8", "e5m2": "fp8",
    "int8": "int8", "i8": "int8",
    "fp4": "fp4", "nvfp4": "fp4", "mxfp4": "fp4", "float4": "fp4",
}


def normalize_dtype(dtype: str) -> str:
    """Short compute-dtype name (bf16/fp16/fp32/tf32/fp8/int8/fp4) for common spellings."""
    key = str(dtype).strip().lower().removeprefix("torch.")
    try:
        return _DTYPE_ALIASES[key]
    except KeyError:
        raise ValueError(
            f"unknown compute dtype {dtype!r}; expected one of bf16, fp16, fp32, tf32, fp8, int8, fp4"
        ) from None


def known_devices() -> list[str]:
    """Canonical device keys of the peak table."""
    return list(_TABLE)


def canonical_device(name: str) -> str | None:
    """Table key for a torch/NVML device name or alias ("NVIDIA H100 80GB HBM3" → h100-sxm); None if unknown.

    Matching is on whole name tokens, so GH200 is not H200 and L40 is not L40S.  Variants
    with other peaks (H200 NVL, A10, L40, MI300A) are deliberately not matched.  A bare
    "A100" is ambiguous (40 vs 80 GB bandwidth) and returns None.
    """
    tokens = set(t for t in re.split(r"[^a-z0-9]+", str(name).lower()) if t)
    has = tokens.__contains__
    if has("gb200"):
        return "gb200"
    if has("b200"):
        return "b200"
    if has("h200"):
        return None if has("nvl") else "h200"
    if has("h100"):
        if has("nvl"):
            return "h100-nvl"
        return "h100-pcie" if has("pcie") else "h100-sxm"
    if has("a100"):
        if has("40gb"):
            return "a100-40gb"
        if has("80gb"):
            return "a100-80gb-pcie" if has("pcie") else "a100-80gb"
        return None
    for key in ("l40s", "l4", "a10g", "mi300x", "mi325x"):
        if has(key):
            return key
    return None


def _row(device: str) -> tuple[str, _Row]:
    key = canonical_device(device)
    if key is None:
        raise UnknownDeviceError(
            f"no peak table entry for device {device!r}; known devices: {', '.join(known_devices())}. "
            "Give --peak-flops/--peak-bandwidth or run `serving-mfu calibrate`."
        )
    return key, _TABLE[key]


def lookup_peak(device: str, dtype: str) -> PeakSpec:
    """Datasheet dense peak of `device` at compute `dtype`; raises UnknownDeviceError/UnsupportedDtypeError."""
    key, row = _row(device)
    dt = normalize_dtype(dtype)
    if dt not in row.flops_per_s:
        have = ", ".join(row.flops_per_s)
        hint = (
            "fp32 matmuls have no tensor-core peak in the table; calibrate (`serving-mfu calibrate "
            "--dtype fp32`) or override the peak FLOP/s"
            if dt == "fp32"
            else "override the peak FLOP/s or calibrate"
        )
        raise UnsupportedDtypeError(f"device {key} has no {dt} peak (it has: {have}); {hint}")
    return PeakSpec(
        device=key,
        dtype=dt,
        flops_per_s=row.flops_per_s[dt],
        bandwidth_bytes_per_s=row.bandwidth_bytes_per_s,
        source=row.source,
    )


def peak_json(device: str, dtype: str) -> dict:
    """Table peak as a plain dict for `serving-mfu peak --json`."""
    spec = lookup_peak(device, dtype)
    return {
        "flops_per_s": spec.flops_per_s,
        "bandwidth_bytes_per_s": spec.bandwidth_bytes_per_s,
        "source": spec.source,
    }


def detect_device() -> str | None:
    """Name of local accelerator 0 as torch reports it; None on a CPU-only machine.  Never raises."""
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001 - detection must never break the caller
        pass
    return None


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None


def resolve_peak(
    compute_dtype: str,
    device: str | None = None,
    flops_per_s: float | None = None,
    bandwidth_bytes_per_s: float | None = None,
    calibration_file: str | Path | None = None,
) -> PeakSpec | None:
    """The peak to divide by: override > calibration file > table (given or detected device) > None.

    Arguments left as None fall back to SERVING_MFU_DEVICE, SERVING_MFU_PEAK_FLOPS,
    SERVING_MFU_PEAK_BANDWIDTH and SERVING_MFU_CALIBRATION.  One override number alone is
    completed from the table row of the device.  Raises UnknownDeviceError for a GIVEN device
    not in the table, UnsupportedDtypeError for a dtype the device has no peak for (fp32).
    """
    dt = normalize_dtype(compute_dtype)
    device = device if device is not None else (os.environ.get("SERVING_MFU_DEVICE") or None)
    if flops_per_s is None:
        flops_per_s = _env_float("SERVING_MFU_PEAK_FLOPS")
    if bandwidth_bytes_per_s is None:
        bandwidth_bytes_per_s = _env_float("SERVING_MFU_PEAK_BANDWIDTH")
    if calibration_file is None:
        calibration_file = os.environ.get("SERVING_MFU_CALIBRATION") or None

    if flops_per_s is not None or bandwidth_bytes_per_s is not None:
        return _override(dt, device, flops_per_s, bandwidth_bytes_per_s)
    if calibration_file is not None:
        from serving_mfu.calibrate import load_calibration

        spec = load_calibration(calibration_file)
        if normalize_dtype(spec.dtype) != dt:
            raise PeakResolutionError(
                f"calibration file {str(calibration_file)!r} was measured for {spec.dtype}, "
                f"but the model computes in {dt}; re-run `serving-mfu calibrate --dtype {dt}`"
            )
        return spec
    if device is not None:
        return lookup_peak(device, dt)
    detected = detect_device()
    if detected is None:
        return cpu_default_peak(dt)
    if canonical_device(detected) is None:
        return None
    return lookup_peak(detected, dt)


def cpu_default_peak(
    dtype: str,
    bandwidth_probe: "Callable[[], tuple[float, str]] | None" = None,
    isa: "Callable[[str], Any] | None" = None,
) -> PeakSpec | None:
    """The peak of a CPU engine with no configuration: this machine's cached calibration
    (`serving-mfu calibrate`), else the ISA peak with a quick copy-bandwidth reading.

    Never a FLOP calibration at engine start: on a few cores it competes with the engine it
    measures, which is how a peak ends up below the engine.  None where no ISA peak can be
    formed (no /proc/cpuinfo) or the dtype has none (fp8, fp4 on a CPU).
    """
    from serving_mfu import calibrate, cpu_peak

    dt = normalize_dtype(dtype)
    cached = calibrate.cached_calibration(dt)
    if cached is not None:
        spec, path = cached
        return spec.model_copy(update={"source": f"{spec.source} (cached in {path})"})
    try:
        limit = (isa or cpu_peak.machine_isa_peak)(dt)
    except (OSError, ValueError):
        return None
    bandwidth, bw_source = (bandwidth_probe or calibrate.quick_copy_bandwidth)()
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
