"""Every `SERVING_MFU_*` setting in one place (pydantic-settings), read once at the edge and passed in.

`Settings()` reads the environment strictly (a bad value raises, naming the variable);
`load_settings()` is what the engine uses: a bad value is reported and replaced by its default, so
a typo never stops the engine (the hook counts it as an anomaly).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "SERVING_MFU_"


class Settings(BaseSettings):
    """The engine's, the reader's and the tools' settings (environment variable = SERVING_MFU_ + NAME)."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True, env_ignore_empty=True)

    dir: Path | None = Field(None, description="folder engines publish snapshots to and readers read "
                             "(default: $XDG_RUNTIME_DIR/serving-mfu, else serving-mfu-<uid> in the temp "
                             "folder; it must be owned by this user and writable by no one else)")
    time_split: Literal["shapley", "flop_proportional"] = Field(
        "shapley", description="how a mixed iteration's time is split between prefill and decode")
    trace: Path | None = Field(None, description="also write every iteration record to this JSONL trace")
    device: str | None = Field(None, description="peak-table device name (overrides detection)")
    peak_flops: float | None = Field(None, gt=0, description="peak FLOP/s of one device (override)")
    peak_bandwidth: float | None = Field(None, gt=0, description="peak bytes/s of one device (override)")
    calibration: Path | None = Field(None, description="a calibration JSON (`serving-mfu calibrate --out`)")
    cache_dir: Path | None = Field(None, description="where `serving-mfu calibrate` caches this machine's CPU "
                                   "peak (default ~/.cache/serving-mfu)")
    gpu_sample_s: str | None = Field(None, description="GPU-Util sampling interval in seconds (default 0.1; "
                                     "0 or off: no sampling)")
    gpu_devices: str | None = Field(None, description="NVML indices or UUIDs to sample (default: the engine's)")
    sync_accounting: bool = Field(False, description="account each step on the engine thread (benchmarks, "
                                  "debugging) instead of the accounting thread")
    fail_at_step: int | None = Field(None, ge=0, description="testing aid: the hook raises once at this step, "
                                     "after recording it")
    models: Path | None = Field(None, description="where the tools build the tiny local models "
                                "(default ~/.cache/serving-mfu/models)")
    attribution: bool = Field(True, description="per-request and per-tenant cost (DESIGN §12): "
                              "/metrics/mfu/requests, /metrics/mfu/tenants, serving_mfu_tenant_* series")
    max_tenants: int = Field(20, ge=0, description="tenant labels: the first this many distinct tenants get "
                             "their own label for the engine's life, later ones `other`")
    tenants: str | None = Field(None, description="pinned tenant labels, comma-separated (every other tenant is "
                                "`other`): the same list on every engine of a fleet")
    requests_ring: int = Field(10_000, ge=1, description="finished requests the API server keeps for "
                               "/metrics/mfu/requests")

    @staticmethod
    def env_name(field: str) -> str:
        return PREFIX + field.upper()

    def snapshot_dir(self) -> Path:
        """Where engines publish: `dir`, else $XDG_RUNTIME_DIR/serving-mfu (a per-user tmpfs, 0700 by the
        login manager), else serving-mfu-<uid> in the temp dir.  Either way it must be private (DESIGN §10)."""
        if self.dir:
            return self.dir
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime and os.path.isabs(runtime):
            return Path(runtime) / "serving-mfu"
        return Path(tempfile.gettempdir()) / f"serving-mfu-{os.geteuid()}"

    def calibration_cache_dir(self) -> Path:
        """`cache_dir`, else $XDG_CACHE_HOME/serving-mfu or ~/.cache/serving-mfu."""
        if self.cache_dir:
            return self.cache_dir
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "serving-mfu"

    def peak_inputs(self) -> dict:
        """The keyword arguments of serving_mfu.peaks.resolve.resolve_peak these settings give."""
        return dict(device=self.device, flops_per_s=self.peak_flops, bandwidth_bytes_per_s=self.peak_bandwidth,
                    calibration_file=self.calibration, cache_dir=self.calibration_cache_dir())

    def pinned_tenants(self) -> tuple[str, ...]:
        """SERVING_MFU_TENANTS as a tuple (empty: none pinned)."""
        return tuple(t.strip() for t in (self.tenants or "").split(",") if t.strip())

    def models_dir(self) -> Path:
        return self.models if self.models else Path.home() / ".cache" / "serving-mfu" / "models"


class SettingsError(ValueError):
    """A SERVING_MFU_* variable with a value that does not parse; the message names the variable."""


def _messages(exc: ValidationError) -> list[str]:
    out = []
    for e in exc.errors():
        name = Settings.env_name(str(e["loc"][0])) if e.get("loc") else PREFIX + "*"
        out.append(f"{name}={os.environ.get(name)!r}: {e['msg']}")
    return out


def read_settings() -> Settings:
    """The settings from the environment; SettingsError naming every bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError("; ".join(_messages(exc))) from None


def load_settings() -> tuple[Settings, list[str]]:
    """The settings from the environment, and one message per bad value (replaced by its default)."""
    try:
        return Settings(), []
    except ValidationError as exc:
        bad = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")}
        errors = [m + " (ignored)" for m in _messages(exc)]
        defaults = {name: Settings.model_fields[name].default for name in bad if name in Settings.model_fields}
        return Settings(**defaults), errors
