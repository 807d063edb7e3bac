"""Datasheet peaks: dense FLOP/s and memory bandwidth per device and compute dtype (DESIGN §7).

The table holds DENSE tensor-core peaks (datasheets print 2:4-sparse figures with an
asterisk; those are halved here) and HBM/GDDR bandwidth, per device, each row citing the
datasheet it came from.  Which peak an engine uses is decided in serving_mfu.peaks.resolve.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from serving_mfu.peaks.spec import PeakSpec, UnknownDeviceError, UnsupportedDtypeError, normalize_dtype

T = 1e12  # tera
P = 1e15  # peta


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
