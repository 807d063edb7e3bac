"""GPU-Util and SM activity beside MFU (serving_mfu.runtime.gpu_util), against a fake NVML: means over windows
are differences of cumulative sums, GPM is optional, every failure is a reason or a count, never an
exception, and the section reaches /metrics/mfu, /metrics/mfu/counters, Prometheus and loadgen results."""

from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest

from serving_mfu.cost.counters import Counters
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.spec import PeakSpec
from serving_mfu.runtime import gpu_util as gu
from serving_mfu.runtime.aggregate import SnapshotReader
from serving_mfu.runtime.gpu_util import (
    GpuUtilSampler,
    aggregate_status,
    engine_device_ids,
    parse_interval,
    sampler_for_engine,
)
from serving_mfu.runtime.publish import SnapshotWriter
from serving_mfu.runtime.settings import Settings
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.schema.report import GPU_UTIL_NOTE, GpuUtilStatus, MFUReport, ModelReport, PeakReport, gpu_util_report
from serving_mfu.schema.snapshot import EngineSnapshot, Totals, decode_snapshot, encode_snapshot
from tests.test_accounting import LLAMA

PEAK = PeakSpec(device="t", dtype="bf16", flops_per_s=1e12, bandwidth_bytes_per_s=1e11, source="test")


# ---------------------------------------------------------------------------------------------- fake NVML
class FakeNVMLError(Exception):
    pass


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.t

    def advance(self, dt: float) -> None:
        with self.lock:
            self.t += dt


class FakeDevice:
    """Levels the test sets; SM activity is integrated so GPM metrics are exact interval means."""

    def __init__(self, clock, index: int, name: str, util: float, sm: float | None):
        self.clock, self.index, self.name = clock, index, name
        self.uuid = f"GPU-fake-{index}"
        self.util, self.sm = util, sm
        self.gpm = sm is not None
        self._integral, self._t = 0.0, clock()
        self.fail_util = 0  # the next n utilization reads raise
        self.fail_gpm = 0

    def set(self, util: float | None = None, sm: float | None = None) -> None:
        if sm is not None:
            self._integral = self.integral()
            self._t = self.clock()
            self.sm = sm
        if util is not None:
            self.util = util

    def integral(self) -> float:
        return self._integral + (self.sm or 0.0) * (self.clock() - self._t)


class FakeNVML:
    """The slice of pynvml the sampler uses."""

    NVML_SUCCESS = 0
    NVML_GPM_METRICS_GET_VERSION = 1
    NVML_GPM_METRIC_SM_UTIL = 2
    NVMLError = FakeNVMLError

    def __init__(self, clock=time.monotonic, devices: list[tuple[str, float, float | None]] = (("NVIDIA H100", 0, 0),),
                 init_error: str | None = None):
        self.clock = clock
        self.devices = [FakeDevice(clock, i, n, u, s) for i, (n, u, s) in enumerate(devices)]
        self.init_error = init_error
        self.inits = self.shutdowns = 0
        self.allocated: set[int] = set()
        self.util_reads = 0
        self.lock = threading.Lock()

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeDevice:
        if not 0 <= i < len(self.devices):
            raise FakeNVMLError("Invalid Argument")
        return self.devices[i]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeDevice:
        for d in self.devices:
            if d.uuid == uuid:
                return d
        raise FakeNVMLError("Not Found")

    def nvmlDeviceGetName(self, h: FakeDevice) -> bytes:
        return h.name.encode()

    def nvmlDeviceGetUtilizationRates(self, h: FakeDevice):
        with self.lock:
            self.util_reads += 1
            if h.fail_util:
                h.fail_util -= 1
                raise FakeNVMLError("GPU is lost")
        return SimpleNamespace(gpu=h.util, memory=0)

    def nvmlGpmQueryDeviceSupport(self, h: FakeDevice):
        return SimpleNamespace(version=1, isSupportedDevice=int(h.gpm))

    def nvmlGpmSampleAlloc(self):
        s = SimpleNamespace(t=None, integral=None)
        self.allocated.add(id(s))
        return s

    def nvmlGpmSampleFree(self, s) -> None:
        self.allocated.discard(id(s))

    def nvmlGpmSampleGet(self, h: FakeDevice, s) -> None:
        if h.fail_gpm:
            h.fail_gpm -= 1
            raise FakeNVMLError("Unknown Error")
        s.t, s.integral = self.clock(), h.integral()

    @staticmethod
    def c_nvmlGpmMetricsGet_t():
        return SimpleNamespace(version=0, numMetrics=0, sample1=None, sample2=None,
                               metrics=[SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0)])

    def nvmlGpmMetricsGet(self, get) -> None:
        assert get.version == 1 and get.numMetrics == 1 and get.metrics[0].metricId == 2
        a, b = get.sample1, get.sample2
        get.metrics[0].value = (b.integral - a.integral) / (b.t - a.t)
        get.metrics[0].nvmlReturn = 0


def _run(sampler: GpuUtilSampler, clock: FakeClock, seconds: float, step: float = 0.5) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)
        sampler.tick()


def _sums(sampler: GpuUtilSampler) -> Counters:
    return sampler.add_to(Counters())


# ---------------------------------------------------------------------------------------------- sampler
def test_window_means_are_differences_of_cumulative_sums() -> None:
    clock = FakeClock()
    nvml = FakeNVML(clock, [("NVIDIA H100 80GB HBM3", 20, 10)])
    s = GpuUtilSampler([0], 0.5, nvml, start=False, clock=clock)
    st = s.status()
    assert st.available and st.devices == 1 and st.sm_active_devices == 1 and st.sm_active_reason is None
    assert st.device_names == ["NVIDIA H100 80GB HBM3"]
    _run(s, clock, 10)
    first = _sums(s)
    nvml.devices[0].set(util=80, sm=40)
    _run(s, clock, 10)
    total = _sums(s)
    assert total.gpu_sampled_s == pytest.approx(20) and total.gpu_sm_sampled_s == pytest.approx(20)
    since_start = gpu_util_report(total, st)
    assert since_start.gpu_util == pytest.approx(0.5) and since_start.sm_active == pytest.approx(0.25)
    window = gpu_util_report(total - first, st)  # the second half only
    assert window.available and window.reason is None
    assert window.gpu_util == pytest.approx(0.8) and window.sm_active == pytest.approx(0.4)
    assert window.sampled_s == pytest.approx(10) and window.sample_errors == 0
    assert window.note == GPU_UTIL_NOTE and "not how much math" in window.note
    s.stop()
    assert nvml.shutdowns == nvml.inits == 1 and not nvml.allocated


def test_gpm_pairs_are_at_least_100ms_apart_and_exact() -> None:
    """Ticks faster than GPM's minimum fold into one GPM interval; the SM mean stays exact."""
    clock = FakeClock()
    nvml = FakeNVML(clock, [("H100", 50, 30)])
    gets = []
    nvml.nvmlGpmSampleGet = lambda h, smp, get=nvml.nvmlGpmSampleGet: (gets.append(clock()), get(h, smp))
    s = GpuUtilSampler([0], 1 / 32, nvml, start=False, clock=clock)
    for i in range(32):  # 1 s in 31.25 ms ticks; SM activity changes mid-way
        if i == 16:
            nvml.devices[0].set(sm=70)
        clock.advance(1 / 32)
        s.tick()
    assert len(gets) == 1 + 8  # the first sample, then one every 4 ticks (125 ms >= 100 ms)
    assert min(b - a for a, b in zip(gets, gets[1:])) >= gu.GPM_MIN_INTERVAL_S
    c = _sums(s)
    assert c.gpu_sampled_s == pytest.approx(1.0)
    assert c.gpu_sm_sampled_s == pytest.approx(1.0)
    assert c.gpu_sm_active_s / c.gpu_sm_sampled_s == pytest.approx(0.5)
    s.stop()


def test_gpm_unsupported_leaves_sm_active_null_with_reason() -> None:
    clock = FakeClock()
    nvml = FakeNVML(clock, [("NVIDIA A100-SXM4-80GB", 60, None)])
    s = GpuUtilSampler([0], 0.5, nvml, start=False, clock=clock)
    _run(s, clock, 5)
    r = gpu_util_report(_sums(s), s.status())
    assert r.available and r.gpu_util == pytest.approx(0.6)
    assert r.sm_active is None and r.sm_active_devices == 0
    assert "GPM not supported on NVIDIA A100-SXM4-80GB" in r.sm_active_reason and "Hopper" in r.sm_active_reason
    s.stop()
    assert not nvml.allocated


def test_sm_activity_on_some_devices_says_so() -> None:
    clock = FakeClock()
    nvml = FakeNVML(clock, [("H100", 100, 20), ("A100", 50, None)])
    s = GpuUtilSampler([0, 1], 0.5, nvml, start=False, clock=clock)
    _run(s, clock, 4)
    r = gpu_util_report(_sums(s), s.status())
    assert r.devices == 2 and r.sm_active_devices == 1
    assert r.gpu_util == pytest.approx(0.75)  # device-time weighted over both
    assert r.sm_active == pytest.approx(0.2)  # the device that has GPM
    assert r.sm_active_reason.startswith("SM activity of 1 of 2 devices")
    s.stop()


def test_nvml_init_failure_is_a_reason_and_starts_no_thread() -> None:
    nvml = FakeNVML(init_error="Driver Not Loaded")
    before = threading.active_count()
    s = GpuUtilSampler([0], 0.1, nvml)
    assert not s.available and s._thread is None and not s.running
    assert threading.active_count() == before
    st = s.status()
    assert st.available is False and "NVML unavailable" in st.reason and "Driver Not Loaded" in st.reason
    r = gpu_util_report(_sums(s), st)
    assert r.available is False and r.gpu_util is None and r.sm_active is None
    assert r.reason == st.reason and r.sm_active_reason == st.reason
    s.stop()
    assert nvml.shutdowns == 0  # never initialised


def test_missing_nvidia_ml_py_is_a_reason(monkeypatch) -> None:
    def no_module():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(gu, "_import_nvml", no_module)
    s = GpuUtilSampler([0], 0.1)
    assert not s.available and "nvidia-ml-py is not installed" in s.status().reason


def test_device_not_found_and_uuid_lookup() -> None:
    nvml = FakeNVML(devices=[("H100", 10, 5)])
    s = GpuUtilSampler([5], 0.1, nvml)
    assert not s.available and "device 5 not found" in s.status().reason and s._thread is None
    assert nvml.shutdowns == nvml.inits == 1  # NVML released when nothing can be sampled
    s = GpuUtilSampler(["GPU-fake-0", 7], 0.1, nvml, start=False)
    assert s.available and [d.ident for d in s.devices] == ["GPU-fake-0"]  # the missing one is skipped, logged
    s.stop()


def test_disabled_by_setting() -> None:
    s = sampler_for_engine(SimpleNamespace(world_size=1), settings=Settings(gpu_sample_s="0"), nvml=FakeNVML())
    assert not s.available and s.status().reason == f"disabled ({gu.ENV_INTERVAL}=0)" and s._thread is None


def test_errors_mid_run_are_counted_and_drop_their_time() -> None:
    clock = FakeClock()
    nvml = FakeNVML(clock, [("H100", 40, 20)])
    s = GpuUtilSampler([0], 0.5, nvml, start=False, clock=clock)
    _run(s, clock, 2)
    nvml.devices[0].fail_util = 2
    nvml.devices[0].fail_gpm = 1
    _run(s, clock, 3)  # two failed GPU-Util reads (1 s dropped), one failed GPM sample (folded into the next)
    c = _sums(s)
    assert c.gpu_sample_errors == 3
    assert c.gpu_sampled_s == pytest.approx(4.0)
    assert c.gpu_util_s / c.gpu_sampled_s == pytest.approx(0.4)
    assert c.gpu_sm_sampled_s == pytest.approx(5.0)  # GPM intervals are exact even across a failed sample
    assert c.gpu_sm_active_s / c.gpu_sm_sampled_s == pytest.approx(0.2)
    assert gpu_util_report(c, s.status()).sample_errors == 3
    s.stop()


def test_thread_samples_survives_errors_and_stops_cleanly() -> None:
    nvml = FakeNVML(devices=[("H100", 70, 35)])
    s = GpuUtilSampler([0], 0.01, nvml)
    nvml.devices[0].fail_util = 3
    assert s.running
    deadline = time.monotonic() + 5
    while _sums(s).gpu_sampled_s < 0.1 and time.monotonic() < deadline:
        time.sleep(0.02)
    s.stop()
    assert not s.running and s._thread is not None and not s._thread.is_alive()
    c = _sums(s)
    assert c.gpu_sample_errors == 3  # counted, the thread kept going
    assert c.gpu_util_s / c.gpu_sampled_s == pytest.approx(0.7)
    assert c.gpu_sm_sampled_s > 0 and c.gpu_sm_active_s / c.gpu_sm_sampled_s == pytest.approx(0.35, rel=0.05)
    assert nvml.shutdowns == 1 and not nvml.allocated
    reads = nvml.util_reads
    time.sleep(0.05)
    assert nvml.util_reads == reads  # stopped means stopped
    s.stop()  # idempotent
    assert nvml.shutdowns == 1


def test_a_broken_nvml_never_raises_into_the_caller() -> None:
    class Broken(FakeNVML):
        def nvmlDeviceGetName(self, h):
            raise RuntimeError("boom")

        def nvmlGpmQueryDeviceSupport(self, h):
            raise AttributeError("no GPM in this nvidia-ml-py")

    s = GpuUtilSampler([0], 0.1, Broken(devices=[("x", 10, 10)]), start=False)
    assert s.available and s.devices[0].name == "unknown"
    assert "no NVML GPM API" in s.status().sm_active_reason
    s.stop()
    weird = GpuUtilSampler([0], 0.1, object())  # not an NVML at all
    assert not weird.available and weird.status().reason


# ---------------------------------------------------------------------------------------------- engine side
def test_cpu_engine_path_real_pynvml() -> None:
    """On this GPU-less machine the engine's sampler is unavailable with a clear reason and no thread."""
    before = threading.active_count()
    s = sampler_for_engine(SimpleNamespace(world_size=1, local_world_size=1, assigned_physical_gpu_ids=None),
                           environ={})
    if s.available:  # a machine with an NVIDIA driver
        s.stop()
        pytest.skip("NVML works here: this test is for machines without an NVIDIA driver")
    st = s.status()
    assert s._thread is None and threading.active_count() == before
    assert st.reason and ("NVML unavailable" in st.reason or "nvidia-ml-py is not installed" in st.reason)
    counters = s.add_to(Counters())
    assert counters.gpu_sampled_s == 0
    s.stop()


def test_engine_device_ids() -> None:
    pc = SimpleNamespace(world_size=4, local_world_size=2, assigned_physical_gpu_ids=None)
    assert engine_device_ids(pc, {}) == ([0, 1], "default")
    assert engine_device_ids(pc, {"CUDA_VISIBLE_DEVICES": "3,GPU-abc,5"}) == ([3, "GPU-abc"], "CUDA_VISIBLE_DEVICES")
    pc.assigned_physical_gpu_ids = [6, 7]
    assert engine_device_ids(pc, {"CUDA_VISIBLE_DEVICES": "0,1"}) == ([6, 7], "vLLM assigned_physical_gpu_ids")
    assert engine_device_ids(pc, {}, explicit="2, MIG-x") == ([2, "MIG-x"], gu.ENV_DEVICES)
    tp = SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=2)
    assert engine_device_ids(tp, {}) == ([0, 1, 2, 3], "default")
    assert engine_device_ids(None, {}) == ([0], "default")


def test_parse_interval() -> None:
    assert parse_interval(None) == (0.1, None)
    assert parse_interval("0.25") == (0.25, None)
    for off in ("0", "off", "-1", "nan"):
        value, why = parse_interval(off)
        assert value is None and gu.ENV_INTERVAL in why
    assert parse_interval("fast")[0] is None


def test_real_hook_on_the_cpu_engine_publishes_the_reason(tmp_path) -> None:
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    from scheduler_hooks.hook import MFUHook
    from tests.engine_util import DEFAULT_PEAK, environ, model_path

    config = EngineArgs(model=model_path(), enforce_eager=True, max_model_len=512).create_engine_config()
    with environ({**DEFAULT_PEAK, "SERVING_MFU_DIR": str(tmp_path)}):
        hook = MFUHook.from_vllm_config(config)
    try:
        if hook.gpu.available:
            pytest.skip("NVML works here")
        assert hook.gpu._thread is None
    finally:
        hook.close()
    snap = decode_snapshot(hook.writer.path.read_bytes())
    assert snap.gpu is not None and snap.gpu.available is False and snap.gpu.reason
    report = SnapshotReader(tmp_path).report()
    assert report.gpu_util.available is False and report.gpu_util.reason == snap.gpu.reason


# ---------------------------------------------------------------------------------------------- transport
def _engine(tmp_path, engine_id: str, sampler: GpuUtilSampler | None):
    tracker = MFUTracker(ModelSpec.from_hf_config(LLAMA), PEAK, devices=1)

    def source():
        counters, recent = tracker.snapshot()
        return (sampler.add_to(counters) if sampler else counters), recent

    writer = SnapshotWriter(source, engine_id, tracker.model_report(), tracker.peak_report(), tracker.time_split,
                            directory=tmp_path, interval_s=60, gpu_status=sampler.status if sampler else None)
    return tracker, writer


def test_totals_report_since_gives_the_interval_mean_over_engines(tmp_path) -> None:
    clock = FakeClock()
    nvml = FakeNVML(clock, [("H100", 10, 5), ("H100", 30, 15), ("L4", 90, None)])
    s1 = GpuUtilSampler([0, 1], 0.5, nvml, start=False, clock=clock)  # engine 1: TP=2 on two H100s
    s2 = GpuUtilSampler([2], 0.5, nvml, start=False, clock=clock)  # engine 2: an L4 without GPM
    _, w1 = _engine(tmp_path, "e1", s1)
    _, w2 = _engine(tmp_path, "e2", s2)
    try:
        for _ in range(10):
            clock.advance(0.5)
            s1.tick()
            s2.tick()
        w1.write_now()
        w2.write_now()
        reader = SnapshotReader(tmp_path)
        start = reader.totals()
        assert start.gpu.devices == 3 and start.gpu.sm_active_devices == 2
        for d, (u, sm) in zip(nvml.devices, ((50, 40), (70, 60), (20, None))):
            d.set(util=u, sm=sm)
        for _ in range(10):
            clock.advance(0.5)
            s1.tick()
            s2.tick()
        time.sleep(0.01)
        w1.write_now()
        w2.write_now()
        end = reader.totals()
        # through JSON, as loadgen reads /metrics/mfu/counters
        end = Totals.model_validate_json(end.model_dump_json())
        interval = end.report_since(Totals.model_validate_json(start.model_dump_json())).gpu_util
        assert interval.available and interval.devices == 3 and interval.sampled_s == pytest.approx(15)
        assert interval.gpu_util == pytest.approx((50 + 70 + 20) / 300)
        assert interval.sm_active == pytest.approx((40 + 60) / 200)
        assert "SM activity of 2 of 3 devices" in interval.sm_active_reason
        assert "GPM not supported on L4" in interval.sm_active_reason
        since_start = reader.report().gpu_util
        assert since_start.gpu_util == pytest.approx((10 + 30 + 90 + 50 + 70 + 20) / 600)
    finally:
        w1.close()
        w2.close()
        s1.stop()
        s2.stop()


def test_reader_window_uses_the_engines_history(tmp_path) -> None:
    now = time.time()

    def c(sampled: float, util: float) -> Counters:
        return Counters(gpu_sampled_s=sampled, gpu_util_s=util)

    status = GpuUtilStatus(available=True, devices=1, sm_active_devices=0, sm_active_reason="no GPM here",
                           interval_s=0.1, device_names=["A10"])
    snap = EngineSnapshot(engine_id="e1", pid=os.getpid(), ppid=os.getppid(), started_at=now - 100, updated_at=now,
                          model=ModelReport(name="m", model_type="llama", approximate=False),
                          peak=PeakReport(**PEAK.model_dump(), devices=1), time_split="shapley",
                          counters=c(90, 30), history=[(now - 30, c(60, 10)), (now - 12, c(78, 18)),
                                                       (now - 5, c(85, 25))], gpu=status)
    (tmp_path / "engine-e1.json").write_bytes(encode_snapshot(snap))
    reader = SnapshotReader(tmp_path)
    window = reader.report(window_s=10).gpu_util  # baseline: the history point 12 s ago
    assert window.gpu_util == pytest.approx((30 - 18) / (90 - 78))
    assert window.sm_active is None and window.sm_active_reason == "no GPM here"
    assert reader.report().gpu_util.gpu_util == pytest.approx(30 / 90)


def test_reports_without_sampling_say_so(tmp_path) -> None:
    tracker, writer = _engine(tmp_path, "old", None)  # an engine that reports no GPU status
    writer.write_now()
    try:
        r = SnapshotReader(tmp_path).report()
        assert r.gpu_util.available is False and r.gpu_util.reason.startswith("not sampled")
        assert r.gpu_util.gpu_util is None and r.gpu_util.sm_active is None
        assert tracker.report().gpu_util.available is False  # offline replay: no sampler
        old = Totals(at=1, updated_at=1, engines=1, counters=Counters().to_dict(), peak=tracker.peak_report(),
                     model=tracker.model_report(), time_split="shapley")
        assert old.gpu is None and old.report_since(old).gpu_util.available is False
        # a report from before this section still validates
        data = json.loads(r.model_dump_json())
        del data["gpu_util"]
        assert MFUReport.model_validate(data).gpu_util is None
    finally:
        writer.close()


def test_aggregate_status() -> None:
    on = GpuUtilStatus(available=True, devices=2, sm_active_devices=2, interval_s=0.1, device_names=["H100"] * 2)
    off = GpuUtilStatus(available=False, reason="NVML unavailable: x")
    assert aggregate_status([]) is None and aggregate_status([None]) is None
    assert aggregate_status([on]) is on
    both = aggregate_status([on, off])
    assert both.available and both.devices == 2 and both.sm_active_devices == 2 and both.reason is None
    none = aggregate_status([off, off, None])
    assert not none.available and none.reason == "NVML unavailable: x; 1 engine(s) did not report GPU sampling"


# ---------------------------------------------------------------------------------------------- surfaces
def test_endpoint_schema_and_prometheus_carry_the_gpu_section(tmp_path) -> None:
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from serving_mfu.serve.api import build_app

    clock = FakeClock()
    nvml = FakeNVML(clock, [("H100", 60, 30)])
    s = GpuUtilSampler([0], 0.5, nvml, start=False, clock=clock)
    _run(s, clock, 4)
    _, writer = _engine(tmp_path, "e1", s)
    writer.write_now()
    try:
        client = TestClient(build_app(lambda: SnapshotReader(tmp_path)))
        body = client.get("/metrics/mfu").json()
        g = body["gpu_util"]
        assert set(g) == {"available", "reason", "gpu_util", "sm_active", "sm_active_reason", "devices",
                          "sm_active_devices", "sampled_s", "sm_sampled_s", "sample_errors", "note"}
        assert g["available"] is True and g["gpu_util"] == pytest.approx(0.6) and g["sm_active"] == pytest.approx(0.3)
        counters = client.get("/metrics/mfu/counters").json()
        assert counters["gpu"]["devices"] == 1 and counters["counters"]["gpu_sampled_s"] == pytest.approx(4)
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
        assert "GpuUtilReport" in schemas and "gpu_util" in schemas["MFUReport"]["properties"]
        text = client.get("/metrics").text
        samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples["serving_mfu_gpu_util_seconds_total"] / samples["serving_mfu_gpu_sampled_seconds_total"] \
            == pytest.approx(0.6)
        assert samples["serving_mfu_gpu_sm_active_seconds_total"] / \
            samples["serving_mfu_gpu_sm_sampled_seconds_total"] == pytest.approx(0.3)
        assert samples["serving_mfu_gpu_sample_errors_total"] == 0
    finally:
        writer.close()
        s.stop()


def test_loadgen_results_carry_the_run_gpu_util() -> None:
    from loadgen.mfu import RunMFU, point
    from loadgen.results import MFUSection

    clock = FakeClock()
    nvml = FakeNVML(clock, [("H100", 25, 10)])
    s = GpuUtilSampler([0], 0.5, nvml, start=False, clock=clock)
    tracker = MFUTracker(ModelSpec.from_hf_config(LLAMA), PEAK, devices=1)

    def totals(at: float) -> Totals:
        return Totals(at=at, updated_at=at, engines=1, counters=s.add_to(tracker.counters).to_dict(),
                      peak=tracker.peak_report(), model=tracker.model_report(), time_split="shapley",
                      gpu=s.status())

    start = totals(1.0)
    _run(s, clock, 3)
    report = totals(4.0).report_since(start)
    section = MFUSection.from_run(RunMFU(report=report, series=[point(1.0, report)]))
    data = json.loads(section.model_dump_json())
    assert data["gpu_util"]["gpu_util"] == pytest.approx(0.25) and data["gpu_util"]["sm_active"] == pytest.approx(0.1)
    assert data["series"][0]["gpu_util"] == pytest.approx(0.25)
    assert data["series"][0]["sm_active"] == pytest.approx(0.1)
    s.stop()
