"""GPU-Util and SM activity beside MFU: an optional NVML sampler (nvidia-ml-py's `pynvml`).

Why: GPU-Util (what `nvidia-smi` shows, NVML `nvmlDeviceGetUtilizationRates().gpu`) is the
fraction of time *at least one kernel was running*, not how much math it did: a memory-bound
decode step keeps it near 100% at a few percent MFU.  SM activity (NVML GPM
`NVML_GPM_METRIC_SM_UTIL`, Hopper and newer) is the fraction of SMs that were busy — closer to
the truth, still not FLOPs.  Served beside MFU, the three show where the gap is.

`GpuUtilSampler` runs one daemon thread per engine that every `interval_s` (default 0.1 s,
`SERVING_MFU_GPU_SAMPLE_S`; 0 turns it off) reads, per device:

* `nvmlDeviceGetUtilizationRates(handle).gpu` — a percentage over the driver's last sample
  period; integrated as a step function: `util × dt` over the time since the previous read;
* where `nvmlGpmQueryDeviceSupport(handle).isSupportedDevice`, a GPM sample
  (`nvmlGpmSampleGet`) at least 0.1 s after the previous one, and `nvmlGpmMetricsGet` over the
  pair gives the exact mean SM activity in between: `sm × dt`.

It accumulates *additive* sums (device-seconds) that travel in the engine's cumulative
`Counters` (`gpu_sampled_s`, `gpu_util_s`, `gpu_sm_sampled_s`, `gpu_sm_active_s`,
`gpu_sample_errors`), so any window is a difference of two snapshots and data-parallel engines
add up, exactly like the FLOP counters: mean GPU-Util = Δgpu_util_s / Δgpu_sampled_s.

When it cannot sample it says why (`GpuUtilStatus.reason`): nvidia-ml-py missing, NVML
initialisation failed (no NVIDIA driver — every CPU machine), device not found, GPU-Util not
supported (MIG instances); SM activity alone can be missing (`sm_active_reason`: no GPM before
Hopper, or an nvidia-ml-py/driver without GPM).  It never raises into its caller: NVML errors
while running are counted (`gpu_sample_errors`) and logged once.  Without NVML no thread starts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from serving_mfu.cost.counters import COUNTERS, Counters
from serving_mfu.runtime.settings import Settings, load_settings
from serving_mfu.schema.report import GpuUtilStatus

log = logging.getLogger(__name__)

ENV_INTERVAL = "SERVING_MFU_GPU_SAMPLE_S"
ENV_DEVICES = "SERVING_MFU_GPU_DEVICES"
DEFAULT_INTERVAL_S = 0.1
GPM_MIN_INTERVAL_S = 0.1  # GPM metrics need samples at least ~100 ms apart to be meaningful

# The Counters fields this module fills: the counter table's rows that no step adds to (device-seconds; errors).
COUNTER_FIELDS = tuple(r.name for r in COUNTERS if r.step is None)


def _err(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _name(raw: Any) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


@dataclass
class _Device:
    """One sampled device: its handle, GPM buffers and cumulative sums."""

    ident: int | str
    handle: Any
    name: str
    t_util: float | None = None  # time of the last GPU-Util read
    gpm: bool = False
    gpm_prev: Any = None  # the last GPM sample
    gpm_next: Any = None  # the buffer the next sample goes into
    gpm_get: Any = None  # a reusable nvmlGpmMetricsGet_t
    t_gpm: float | None = None
    sampled_s: float = 0.0
    util_s: float = 0.0
    sm_sampled_s: float = 0.0
    sm_active_s: float = 0.0
    errors: int = 0


def _import_nvml() -> Any:
    import pynvml  # nvidia-ml-py

    return pynvml


def parse_interval(raw: str | None) -> tuple[float | None, str | None]:
    """The sampling interval from SERVING_MFU_GPU_SAMPLE_S (`Settings.gpu_sample_s`): (seconds, None)
    or (None, why it is off)."""
    raw = (raw or "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S, None
    if raw.lower() in ("0", "off", "false", "no", "none"):
        return None, f"disabled ({ENV_INTERVAL}={raw})"
    try:
        value = float(raw)
    except ValueError:
        return None, f"disabled: {ENV_INTERVAL}={raw!r} is not a number of seconds"
    if not value > 0 or value != value or value == float("inf"):
        return None, f"disabled ({ENV_INTERVAL}={raw})"
    return max(value, 0.01), None


def engine_device_ids(parallel_config: Any = None, environ: Mapping[str, str] | None = None,
                      explicit: str | None = None) -> tuple[list[int | str], str]:
    """The NVML identities of the devices this engine process drives, and how they were chosen.

    In order: `explicit` (SERVING_MFU_GPU_DEVICES: comma-separated NVML indices or UUIDs); vLLM's
    `parallel_config.assigned_physical_gpu_ids` (physical ids, what vLLM itself hands NVML);
    the first `local_world_size` entries of CUDA_VISIBLE_DEVICES (vLLM maps logical ids to those,
    and restricts it per data-parallel rank); else devices 0 … local_world_size − 1.
    Integers are NVML indices, other entries UUIDs ("GPU-…", "MIG-…").
    """
    env = os.environ if environ is None else environ

    def ident(text: str) -> int | str:
        text = text.strip()
        return int(text) if text.isdigit() else text

    explicit = (explicit or "").strip()
    if explicit:
        return [ident(x) for x in explicit.split(",") if x.strip()], ENV_DEVICES
    pc = parallel_config
    world = int(getattr(pc, "world_size", 0) or 0) or (
        int(getattr(pc, "tensor_parallel_size", 1) or 1) * int(getattr(pc, "pipeline_parallel_size", 1) or 1))
    local = int(getattr(pc, "local_world_size", 0) or 0) or world
    assigned = getattr(pc, "assigned_physical_gpu_ids", None)
    if assigned:
        return [int(x) for x in list(assigned)[:local]], "vLLM assigned_physical_gpu_ids"
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return [ident(x) for x in visible.split(",") if x.strip()][:local], "CUDA_VISIBLE_DEVICES"
    return list(range(local)), "default"


class GpuUtilSampler:
    """Samples GPU-Util (and SM activity where NVML GPM exists) of some devices from a daemon thread.

    `device_ids`: NVML indices or UUIDs.  `nvml`: the pynvml module, or a fake for tests (default:
    import nvidia-ml-py's).  `start=False` leaves the thread off (tests call `tick()`).  Every public
    method is safe to call from any thread and never raises.
    """

    def __init__(self, device_ids: Iterable[int | str], interval_s: float | None = DEFAULT_INTERVAL_S,
                 nvml: Any = None, *, start: bool = True, clock: Callable[[], float] = time.monotonic,
                 disabled_reason: str | None = None):
        self.interval_s = interval_s
        self.clock = clock
        self.nvml: Any = None
        self.devices: list[_Device] = []
        self.reason: str | None = None
        self.sm_reasons: list[str] = []
        self.device_names: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._initialised = False
        self._logged: set[str] = set()
        self._closed = False
        try:
            self._open(list(device_ids), nvml, disabled_reason)
        except Exception as exc:  # a bug here must not reach the engine
            self.reason = f"GPU sampling failed to start: {_err(exc)}"
            self._release()
        if self.devices and start:
            self._thread = threading.Thread(target=self._run, name="serving-mfu-gpu-sampler", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ set-up
    def _open(self, ids: list[int | str], nvml: Any, disabled_reason: str | None) -> None:
        if disabled_reason or self.interval_s is None:
            self.reason = disabled_reason or "disabled"
            return
        if not ids:
            self.reason = "no devices to sample"
            return
        if nvml is None:
            try:
                nvml = _import_nvml()
            except ImportError as exc:
                self.reason = f"nvidia-ml-py is not installed (pip install nvidia-ml-py): {_err(exc)}"
                return
        self.nvml = nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:
            text = _err(exc)
            hint = (" (no NVIDIA driver on this machine: a CPU machine?)"
                    if "Library Not Found" in text or "Driver Not Loaded" in text else "")
            self.reason = f"NVML unavailable: {text}{hint}"
            self.nvml = None
            return
        self._initialised = True
        problems: list[str] = []
        for ident in ids:
            try:
                handle = (nvml.nvmlDeviceGetHandleByIndex(int(ident)) if isinstance(ident, int)
                          else nvml.nvmlDeviceGetHandleByUUID(str(ident)))
            except Exception as exc:
                problems.append(f"device {ident} not found: {_err(exc)}")
                continue
            try:
                name = _name(nvml.nvmlDeviceGetName(handle))
            except Exception:
                name = "unknown"
            try:
                nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception as exc:
                problems.append(f"device {ident} ({name}): GPU-Util not readable (MIG instance?): {_err(exc)}")
                continue
            dev = _Device(ident=ident, handle=handle, name=name, t_util=self.clock())
            self._open_gpm(dev)
            self.devices.append(dev)
            self.device_names.append(name)
        if not self.devices:
            self.reason = "; ".join(problems) or "no devices to sample"
            self._release()
            return
        if problems:
            self._log_once("device_problems", "serving-mfu: GPU sampling skips: " + "; ".join(problems))
        log.info("serving-mfu: sampling GPU-Util of %s every %.3g s (SM activity on %d)",
                 ", ".join(f"{d.ident} ({d.name})" for d in self.devices), self.interval_s,
                 sum(d.gpm for d in self.devices))

    def _open_gpm(self, dev: _Device) -> None:
        nvml = self.nvml
        try:
            support = nvml.nvmlGpmQueryDeviceSupport(dev.handle)
        except AttributeError:
            self._sm_reason("this nvidia-ml-py has no NVML GPM API (upgrade nvidia-ml-py)")
            return
        except Exception as exc:
            self._sm_reason(f"NVML GPM not available on {dev.name}: {_err(exc)}")
            return
        if not getattr(support, "isSupportedDevice", 0):
            self._sm_reason(f"NVML GPM not supported on {dev.name} (SM activity needs Hopper or newer)")
            return
        try:
            dev.gpm_prev = nvml.nvmlGpmSampleAlloc()
            dev.gpm_next = nvml.nvmlGpmSampleAlloc()
            get = nvml.c_nvmlGpmMetricsGet_t()
            get.version = nvml.NVML_GPM_METRICS_GET_VERSION
            get.numMetrics = 1
            get.metrics[0].metricId = nvml.NVML_GPM_METRIC_SM_UTIL
            dev.gpm_get = get
            nvml.nvmlGpmSampleGet(dev.handle, dev.gpm_prev)
            dev.t_gpm = self.clock()
            dev.gpm = True
        except Exception as exc:
            self._sm_reason(f"NVML GPM sampling failed on {dev.name}: {_err(exc)}")
            self._free_gpm(dev)

    def _sm_reason(self, text: str) -> None:
        if text not in self.sm_reasons:
            self.sm_reasons.append(text)

    # ------------------------------------------------------------------ sampling
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception as exc:  # tick() counts its own errors; this is a bug guard
                self._log_once("tick", f"serving-mfu: GPU sampler error: {_err(exc)}")

    def tick(self) -> None:
        """One sampling pass over the devices (the thread calls it every `interval_s`)."""
        nvml = self.nvml
        for dev in self.devices:
            now = self.clock()
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(dev.handle).gpu) / 100.0
                ok = True
            except Exception as exc:
                ok = False
                self._error(dev, "GPU-Util", exc)
            with self._lock:
                if ok and dev.t_util is not None:
                    dt = max(now - dev.t_util, 0.0)
                    dev.sampled_s += dt
                    dev.util_s += util * dt
                dev.t_util = now  # a failed read drops its interval: coverage, not the mean, suffers
            if dev.gpm and dev.t_gpm is not None and now - dev.t_gpm >= GPM_MIN_INTERVAL_S:
                self._gpm_tick(dev, self.clock())

    def _gpm_tick(self, dev: _Device, now: float) -> None:
        nvml = self.nvml
        try:
            nvml.nvmlGpmSampleGet(dev.handle, dev.gpm_next)
        except Exception as exc:
            self._error(dev, "GPM sample", exc)
            return  # keep the previous sample: the next success covers the whole span
        get = dev.gpm_get
        sm = None
        try:
            get.sample1, get.sample2 = dev.gpm_prev, dev.gpm_next
            nvml.nvmlGpmMetricsGet(get)
            metric = get.metrics[0]
            status = getattr(metric, "nvmlReturn", 0)
            if status != getattr(nvml, "NVML_SUCCESS", 0):
                raise RuntimeError(f"SM activity metric returned NVML status {status}")
            sm = float(metric.value) / 100.0
        except Exception as exc:
            self._error(dev, "GPM metrics", exc)
        with self._lock:
            if sm is not None:
                dt = max(now - dev.t_gpm, 0.0)
                dev.sm_sampled_s += dt
                dev.sm_active_s += sm * dt
            dev.gpm_prev, dev.gpm_next = dev.gpm_next, dev.gpm_prev
            dev.t_gpm = now

    def _error(self, dev: _Device, what: str, exc: BaseException) -> None:
        with self._lock:
            dev.errors += 1
        self._log_once(what, f"serving-mfu: {what} read failed on device {dev.ident} ({dev.name}): {_err(exc)} "
                             "(further errors are counted in gpu_sample_errors)")

    def _log_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning(message)

    # ------------------------------------------------------------------ reading
    @property
    def available(self) -> bool:
        return bool(self.devices)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> dict[str, Any]:
        """Cumulative sums so far: totals over the devices, and per device."""
        with self._lock:
            per = [dict(device=d.ident, name=d.name, sampled_s=d.sampled_s, util_s=d.util_s,
                        sm_sampled_s=d.sm_sampled_s, sm_active_s=d.sm_active_s, errors=d.errors)
                   for d in self.devices]
        return dict(
            gpu_sampled_s=sum(p["sampled_s"] for p in per),
            gpu_util_s=sum(p["util_s"] for p in per),
            gpu_sm_sampled_s=sum(p["sm_sampled_s"] for p in per),
            gpu_sm_active_s=sum(p["sm_active_s"] for p in per),
            gpu_sample_errors=sum(p["errors"] for p in per),
            devices=per,
        )

    def add_to(self, counters: Counters) -> Counters:
        """Add the cumulative GPU sums into `counters` (the engine's snapshot); never raises."""
        try:
            snap = self.snapshot()
            for f in COUNTER_FIELDS:
                setattr(counters, f, getattr(counters, f) + snap[f])
        except Exception as exc:
            self._log_once("add_to", f"serving-mfu: cannot add GPU samples to the snapshot: {_err(exc)}")
        return counters

    def status(self) -> GpuUtilStatus:
        """What this sampler measures, or why not (travels in the engine's snapshot)."""
        n = len(self.devices)
        sm = sum(1 for d in self.devices if d.gpm)
        return GpuUtilStatus(available=n > 0, reason=None if n else (self.reason or "not sampled"),
                             devices=n, sm_active_devices=sm,
                             sm_active_reason=("; ".join(self.sm_reasons) or None) if sm < n or not n else None,
                             interval_s=self.interval_s if n else None, device_names=list(self.device_names))

    # ------------------------------------------------------------------ shutdown
    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread, free GPM samples, shut NVML down (its init is reference-counted)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout_s)
            if thread.is_alive():  # an NVML call hangs: leave its buffers alone
                self._log_once("stop", "serving-mfu: GPU sampler did not stop in time")
                return
        self._release()

    def _free_gpm(self, dev: _Device) -> None:
        for attr in ("gpm_prev", "gpm_next"):
            sample = getattr(dev, attr)
            if sample is not None:
                try:
                    self.nvml.nvmlGpmSampleFree(sample)
                except Exception:
                    pass
                setattr(dev, attr, None)
        dev.gpm = False

    def _release(self) -> None:
        try:
            for dev in self.devices:
                if dev.gpm_prev is not None or dev.gpm_next is not None:
                    gpm = dev.gpm
                    self._free_gpm(dev)
                    dev.gpm = gpm  # the status still says what was measured
            if self._initialised and self.nvml is not None:
                self._initialised = False
                self.nvml.nvmlShutdown()
        except Exception as exc:
            self._log_once("release", f"serving-mfu: NVML shutdown: {_err(exc)}")

    def __enter__(self) -> "GpuUtilSampler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sampler_for_engine(parallel_config: Any = None, environ: Mapping[str, str] | None = None, nvml: Any = None,
                       start: bool = True, settings: Settings | None = None) -> GpuUtilSampler:
    """The sampler of one engine process's local devices (see `engine_device_ids`); never raises.

    On a machine without an NVIDIA driver it comes back unavailable, with the reason, and no thread.
    """
    try:
        settings = settings if settings is not None else load_settings()[0]
        interval, off = parse_interval(settings.gpu_sample_s)
        ids, source = engine_device_ids(parallel_config, environ, explicit=settings.gpu_devices)
        sampler = GpuUtilSampler(ids, interval, nvml, start=start, disabled_reason=off)
        if sampler.reason and not sampler.available and source != "default" and "not found" in sampler.reason:
            sampler.reason += f" (devices from {source})"
        return sampler
    except Exception as exc:
        return GpuUtilSampler([], None, disabled_reason=f"GPU sampling failed to start: {_err(exc)}")


def aggregate_status(statuses: Sequence[GpuUtilStatus | None]) -> GpuUtilStatus | None:
    """One status for several engines: devices add up; reasons are kept, each once."""
    known = [s for s in statuses if s is not None]
    if not known:
        return None
    if len(known) == 1 and len(statuses) == 1:
        return known[0]
    missing = len(statuses) - len(known)

    def joined(texts: Iterable[str | None]) -> str | None:
        out: list[str] = []
        for t in texts:
            if t and t not in out:
                out.append(t)
        return "; ".join(out) or None

    available = any(s.available for s in known)
    devices = sum(s.devices for s in known)
    sm = sum(s.sm_active_devices for s in known)
    reasons = [s.reason for s in known if not s.available]
    if missing:
        reasons.append(f"{missing} engine(s) did not report GPU sampling")
    return GpuUtilStatus(
        available=available,
        reason=None if available else joined(reasons),
        devices=devices,
        sm_active_devices=sm,
        sm_active_reason=None if sm == devices and available else joined(
            [s.sm_active_reason for s in known] + ([] if available else [joined(reasons)])),
        interval_s=max((s.interval_s for s in known if s.interval_s), default=None),
        device_names=[n for s in known for n in s.device_names],
    )
