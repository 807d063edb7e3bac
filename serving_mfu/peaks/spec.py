"""Typed peak records: a device's peak at one compute dtype and where it came from, and calibration measurements."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from serving_mfu.model.dtypes import normalize_dtype  # noqa: F401 - re-exported for the peak modules


class KernelResult(BaseModel):
    """One calibration measurement: the best throughput of one kernel at one size (serving_mfu.peaks.calibrate)."""

    kernel: str
    dtype: str
    n: int
    shape: str
    flops_per_s: float
    calls: int = 1  # calls per timed repetition
    reps: int = 0


class BandwidthResult(BaseModel):
    """One bandwidth measurement: the best of `reps` calls of one memory kernel (streaming read, copy, GEMV)."""

    kernel: str
    dtype: str
    bytes: int  # bytes one call moves (a copy counts read + write)
    shape: str
    bytes_per_s: float
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
        default=None,
        description="CPU only: theoretical ISA peak (cores × FLOPs/cycle × max clock), the physical limit")
    measurements: list[KernelResult] | None = Field(
        default=None, description="calibration only: every kernel × size it timed (the peak is their max)")
    bandwidth_measurements: list[BandwidthResult] | None = Field(
        default=None, description="calibration only: every memory kernel it timed (the bandwidth is their max)")
    method: int | None = Field(
        default=None, description="calibration only: the calibration method version (serving_mfu.peaks.calibrate."
                                  "CALIBRATION_METHOD); None: written before methods were versioned (method 1)")


class UnknownDeviceError(ValueError):
    """A device name with no table row; the message lists the known devices."""


class UnsupportedDtypeError(ValueError):
    """A compute dtype the device has no dense tensor-core peak for; the message says which it has."""


class PeakResolutionError(ValueError):
    """Peak inputs that contradict each other (e.g. a calibration file for another dtype)."""
