"""Peak table, device-name matching, peak resolution precedence and CPU calibration."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from serving_mfu.peaks import resolve as hardware
from serving_mfu.peaks.calibrate import (
    CALIBRATION_METHOD,
    CalibrationFileError,
    calibrate,
    load_calibration,
    save_calibration,
)
from serving_mfu.peaks.calibrate import (
    peak_json as calibrate_peak_json,
)
from serving_mfu.peaks.resolve import resolve_peak
from serving_mfu.peaks.spec import PeakResolutionError, PeakSpec, UnknownDeviceError, UnsupportedDtypeError
from serving_mfu.peaks.table import canonical_device, known_devices, lookup_peak, peak_json

ENV_VARS = ("SERVING_MFU_DEVICE", "SERVING_MFU_PEAK_FLOPS", "SERVING_MFU_PEAK_BANDWIDTH", "SERVING_MFU_CALIBRATION")
EXPECTED_DEVICES = {
    "a100-40gb", "a100-80gb", "a100-80gb-pcie", "h100-sxm", "h100-pcie", "h100-nvl", "h200",
    "b200", "gb200", "l40s", "l4", "a10g", "mi300x", "mi325x",
}


def _dtypes(device: str) -> set[str]:
    out = set()
    for dt in ("bf16", "fp16", "tf32", "fp8", "int8", "fp4"):
        try:
            lookup_peak(device, dt)
            out.add(dt)
        except UnsupportedDtypeError:
            pass
    return out


@pytest.fixture
def clean_env(monkeypatch):
    """No peak env vars and no local accelerator, whatever machine the tests run on."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hardware, "detect_device", lambda: None)
    return monkeypatch


# --- the table -------------------------------------------------------------------------


def test_known_devices_are_the_required_set():
    assert set(known_devices()) == EXPECTED_DEVICES


@pytest.mark.parametrize("device", sorted(EXPECTED_DEVICES))
def test_every_row_cites_a_datasheet_url_and_has_positive_numbers(device):
    spec = lookup_peak(device, "bf16")
    assert re.search(r"https://\S+\.\S+", spec.source), spec.source
    assert len(spec.source.split("https://")[0].strip()) > 5  # a document title before the URL
    assert spec.device == device and spec.dtype == "bf16"
    assert spec.flops_per_s > 1e13 and spec.bandwidth_bytes_per_s > 1e11


@pytest.mark.parametrize("device", sorted(EXPECTED_DEVICES))
def test_tensor_core_rate_relations(device):
    """Same-width formats run at the same rate; tf32 at half the 16-bit rate (within datasheet rounding)."""
    bf16 = lookup_peak(device, "bf16").flops_per_s
    assert lookup_peak(device, "fp16").flops_per_s == bf16
    assert lookup_peak(device, "tf32").flops_per_s == pytest.approx(bf16 / 2, rel=0.03)
    have = _dtypes(device)
    assert {"bf16", "fp16", "tf32", "int8"} <= have
    if "fp8" in have:
        assert lookup_peak(device, "int8").flops_per_s == lookup_peak(device, "fp8").flops_per_s
    # 8-bit runs at twice the 16-bit rate (datasheets round each figure separately; L40S is 1.2 % off).
    assert lookup_peak(device, "int8").flops_per_s == pytest.approx(2 * bf16, rel=0.015)


FP8_DEVICES = ["h100-sxm", "h100-pcie", "h100-nvl", "h200", "l40s", "l4", "mi300x", "mi325x", "b200", "gb200"]


@pytest.mark.parametrize("device", FP8_DEVICES)
def test_fp8_is_twice_bf16_where_supported(device):
    bf16 = lookup_peak(device, "bf16").flops_per_s
    assert lookup_peak(device, "fp8").flops_per_s == pytest.approx(2 * bf16, rel=0.015)


@pytest.mark.parametrize("device", ["a100-40gb", "a100-80gb", "a100-80gb-pcie", "a10g"])
def test_fp8_absent_on_ampere_with_a_helpful_message(device):
    with pytest.raises(UnsupportedDtypeError) as err:
        lookup_peak(device, "fp8")
    msg = str(err.value)
    assert device in msg and "fp8" in msg
    for dt in ("bf16", "fp16", "tf32", "int8"):
        assert dt in msg  # says which dtypes the device does have


def test_fp4_only_on_blackwell():
    for device in EXPECTED_DEVICES:
        has_fp4 = "fp4" in _dtypes(device)
        assert has_fp4 == (device in {"b200", "gb200"}), device
    for device in ("b200", "gb200"):
        assert lookup_peak(device, "fp4").flops_per_s == pytest.approx(2 * lookup_peak(device, "fp8").flops_per_s)


def test_fp32_is_not_in_the_table_and_says_how_to_get_it():
    with pytest.raises(UnsupportedDtypeError, match="calibrat"):
        lookup_peak("h100-sxm", "fp32")


def test_same_silicon_same_compute_more_bandwidth():
    for dt in ("bf16", "fp16", "tf32", "fp8", "int8"):
        assert lookup_peak("h200", dt).flops_per_s == lookup_peak("h100-sxm", dt).flops_per_s
        assert lookup_peak("mi325x", dt).flops_per_s == lookup_peak("mi300x", dt).flops_per_s
    assert lookup_peak("h200", "bf16").bandwidth_bytes_per_s > lookup_peak("h100-sxm", "bf16").bandwidth_bytes_per_s
    assert lookup_peak("mi325x", "bf16").bandwidth_bytes_per_s > lookup_peak("mi300x", "bf16").bandwidth_bytes_per_s
    for dt in ("bf16", "fp8", "fp4"):  # GB200 runs the Blackwell GPU at a higher power limit than HGX B200
        assert lookup_peak("gb200", dt).flops_per_s > lookup_peak("b200", dt).flops_per_s
    # The A100 variants share compute and differ only in memory.
    a100 = {d: lookup_peak(d, "bf16") for d in ("a100-40gb", "a100-80gb", "a100-80gb-pcie")}
    assert len({s.flops_per_s for s in a100.values()}) == 1
    bw = {d: s.bandwidth_bytes_per_s for d, s in a100.items()}
    assert bw["a100-40gb"] < bw["a100-80gb-pcie"] < bw["a100-80gb"]
    # PCIe < NVL < SXM for H100 compute.
    h = [lookup_peak(d, "bf16").flops_per_s for d in ("h100-pcie", "h100-nvl", "h100-sxm")]
    assert h == sorted(h) and len(set(h)) == 3


# Datasheet figures printed WITH 2:4 sparsity (the asterisked numbers): the table must hold half.
SPARSE_DATASHEET = [
    ("a100-80gb", "bf16", 624e12), ("a100-40gb", "int8", 1248e12), ("a100-80gb", "tf32", 312e12),
    ("h100-sxm", "bf16", 1979e12), ("h100-sxm", "fp8", 3958e12), ("h100-sxm", "tf32", 989e12),
    ("h100-pcie", "bf16", 1513e12), ("h100-pcie", "fp8", 3026e12),
    ("h100-nvl", "bf16", 1671e12), ("h100-nvl", "fp8", 3341e12),
    ("h200", "fp8", 3958e12),
    ("l40s", "fp8", 1466e12),
    ("l4", "bf16", 242e12), ("l4", "fp8", 485e12),
    ("b200", "fp4", 18e15), ("b200", "fp8", 9e15), ("b200", "bf16", 4.5e15),
    ("gb200", "fp4", 20e15), ("gb200", "fp8", 10e15), ("gb200", "bf16", 5e15),
    ("mi300x", "fp8", 5229.8e12), ("mi300x", "bf16", 2614.9e12), ("mi325x", "fp8", 5229.8e12),
]


@pytest.mark.parametrize("device,dtype,sparse", SPARSE_DATASHEET)
def test_table_holds_dense_half_of_the_sparse_datasheet_figure(device, dtype, sparse):
    assert lookup_peak(device, dtype).flops_per_s == pytest.approx(sparse / 2, rel=0.005)


@pytest.mark.parametrize("device,bandwidth", [
    ("a100-40gb", 1.555e12), ("a100-80gb", 2.039e12), ("a100-80gb-pcie", 1.935e12),
    ("h100-sxm", 3.35e12), ("h100-pcie", 2.0e12), ("h100-nvl", 3.9e12), ("h200", 4.8e12),
    ("l40s", 864e9), ("l4", 300e9), ("a10g", 600e9), ("mi300x", 5.3e12), ("mi325x", 6.0e12),
])
def test_datasheet_bandwidths(device, bandwidth):
    assert lookup_peak(device, "bf16").bandwidth_bytes_per_s == pytest.approx(bandwidth)


def test_l40s_uses_the_dense_figure_its_datasheet_prints():
    """The L40S sheet prints dense and sparse side by side (362.05 | 733*): the printed dense wins."""
    assert lookup_peak("l40s", "bf16").flops_per_s == pytest.approx(362.05e12)
    assert lookup_peak("l40s", "tf32").flops_per_s == pytest.approx(183e12)


def test_exact_hopper_dense_figures():
    """H100 SXM5 at 1830 MHz boost: 132 SMs x 4 tensor cores x 512 dense FP16 FMA x 2 FLOP."""
    per_clock = 132 * 4 * 512 * 2
    assert lookup_peak("h100-sxm", "bf16").flops_per_s == pytest.approx(per_clock * 1.83e9, rel=0.001)
    assert lookup_peak("h100-sxm", "fp8").flops_per_s == pytest.approx(1978.9e12)
    assert lookup_peak("mi300x", "bf16").flops_per_s == pytest.approx(1307.4e12)


# --- device names ------------------------------------------------------------------------

REAL_NAMES = [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA H200 141GB HBM3e", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ("NVIDIA B200", "b200"),
    ("NVIDIA GB200", "gb200"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA A10G", "a10g"),
    ("AMD Instinct MI300X", "mi300x"),
    ("AMD Instinct MI325X", "mi325x"),
    ("H100", "h100-sxm"),
    ("h100 80gb hbm3", "h100-sxm"),
    ("nvidia l40s", "l40s"),
]


@pytest.mark.parametrize("name,key", REAL_NAMES)
def test_canonical_device_on_real_names(name, key):
    assert canonical_device(name) == key
    assert lookup_peak(name, "bf16").device == key


@pytest.mark.parametrize("name", [
    "NVIDIA GH200 480GB",        # Grace Hopper: other bandwidth, not H200
    "NVIDIA H200 NVL",           # lower power limit than H200 SXM
    "NVIDIA L40",                # no fp8, lower clocks than L40S
    "NVIDIA A10",                # not the AWS A10G
    "NVIDIA GeForce RTX 4090",
    "AMD Instinct MI300A",
    "A100",                      # ambiguous: 40 GB or 80 GB bandwidth
    "",
    "cpu",
])
def test_canonical_device_rejects_other_parts(name):
    assert canonical_device(name) is None


def test_canonical_keys_map_to_themselves():
    for key in known_devices():
        assert canonical_device(key) == key
        assert canonical_device(key.upper()) == key


def test_unknown_device_lists_known_devices():
    with pytest.raises(UnknownDeviceError) as err:
        lookup_peak("NVIDIA GeForce RTX 4090", "bf16")
    assert isinstance(err.value, ValueError)
    for key in known_devices():
        assert key in str(err.value)


def test_dtype_spellings():
    assert lookup_peak("h100", "torch.bfloat16").dtype == "bf16"
    assert lookup_peak("h100", "float16").dtype == "fp16"
    assert lookup_peak("h100", "float8_e4m3fn").dtype == "fp8"
    with pytest.raises(ValueError, match="unknown compute dtype"):
        lookup_peak("h100", "int3")


def test_peak_json_matches_lookup():
    d = peak_json("NVIDIA L4", "fp8")
    spec = lookup_peak("l4", "fp8")
    assert d == {"flops_per_s": spec.flops_per_s, "bandwidth_bytes_per_s": spec.bandwidth_bytes_per_s,
                 "source": spec.source}
    assert json.loads(json.dumps(d)) == d
    assert calibrate_peak_json is peak_json
    with pytest.raises(UnknownDeviceError):
        peak_json("tpu-v5e", "bf16")


# --- resolution precedence ---------------------------------------------------------------


def _calib(tmp_path, dtype="bf16", flops=1.23e12, bw=4.5e10, method=CALIBRATION_METHOD):
    spec = PeakSpec(device="cpu (test)", dtype=dtype, flops_per_s=flops, bandwidth_bytes_per_s=bw, method=method,
                    source="measured by serving-mfu calibrate on test at 2025-01-01T00:00:00+00:00")
    return save_calibration(spec, tmp_path / "sub" / "calib.json"), spec


def test_resolve_on_a_cpu_machine_is_the_cpu_default(clean_env, tmp_path):
    """No setting, no accelerator: the ISA peak (physical limit) of this CPU, labelled, with a bandwidth."""
    spec = resolve_peak("bf16", cache_dir=tmp_path)  # an empty calibration cache
    assert spec is not None and spec.source.startswith("ISA peak of ")
    assert spec.isa_flops_per_s == spec.flops_per_s and spec.bandwidth_bytes_per_s > 0
    assert "serving-mfu calibrate --dtype bf16" in spec.source


def test_cpu_default_prefers_this_machines_cached_calibration(clean_env, tmp_path):
    from serving_mfu.peaks.calibrate import cache_path
    from serving_mfu.peaks.cpu import IsaPeak

    isa = IsaPeak(dtype="bf16", flops_per_s=5e11, cores=2, flops_per_cycle=64, clock_ghz=4.0, cpu="t", source="ISA t")
    probe = lambda: (3e10, "probe")  # noqa: E731
    first = hardware.cpu_default_peak("bf16", tmp_path, bandwidth_probe=probe, isa=lambda dt: isa)
    assert (first.flops_per_s, first.bandwidth_bytes_per_s, first.isa_flops_per_s) == (5e11, 3e10, 5e11)
    _, calibrated = _calib(tmp_path, flops=2e11, bw=4e10)
    save_calibration(calibrated, cache_path("bf16", tmp_path))
    second = hardware.cpu_default_peak("bf16", tmp_path, bandwidth_probe=probe, isa=lambda dt: isa)
    assert second.flops_per_s == 2e11 and second.source.startswith("measured by serving-mfu calibrate")
    assert str(cache_path("bf16", tmp_path)) in second.source
    assert hardware.cpu_default_peak("fp32", tmp_path, bandwidth_probe=probe, isa=lambda dt: isa).flops_per_s == 5e11
    cache_path("bf16", tmp_path).write_text("{broken")  # an unreadable cache falls back on the ISA peak, never raises
    assert hardware.cpu_default_peak("bf16", tmp_path, bandwidth_probe=probe, isa=lambda dt: isa).flops_per_s == 5e11


def test_a_cached_calibration_of_an_older_method_counts_as_absent(clean_env, tmp_path, caplog):
    """A cache written before bandwidth was the max over read, copy and GEMV (no method field: method 1) is
    measured again: cached_calibration says absent, once in the log, and the engine falls back on the ISA peak."""
    import logging

    from serving_mfu.peaks.calibrate import cache_path, cached_calibration
    from serving_mfu.peaks.cpu import IsaPeak

    isa = IsaPeak(dtype="bf16", flops_per_s=5e11, cores=2, flops_per_cycle=64, clock_ghz=4.0, cpu="t", source="ISA t")
    _, old = _calib(tmp_path, flops=2e11, bw=4e10, method=None)
    path = cache_path("bf16", tmp_path)
    save_calibration(old, path)
    assert "method" in json.loads(path.read_text()) and load_calibration(path).method is None  # old files load
    with caplog.at_level(logging.WARNING, logger="serving_mfu.peaks.calibrate"):
        assert cached_calibration("bf16", tmp_path) is None
        peak = hardware.cpu_default_peak("bf16", tmp_path, bandwidth_probe=lambda: (3e10, "probe"), isa=lambda dt: isa)
        assert cached_calibration("bf16", tmp_path) is None
    assert (peak.flops_per_s, peak.bandwidth_bytes_per_s) == (5e11, 3e10)
    stale = [r for r in caplog.records if "calibration method 1" in r.getMessage()]
    assert len(stale) == 1 and str(path) in stale[0].getMessage()  # logged once, naming the file
    save_calibration(old.model_copy(update={"method": CALIBRATION_METHOD + 1}), path)  # a newer method: also stale
    assert cached_calibration("bf16", tmp_path) is None
    save_calibration(old.model_copy(update={"method": CALIBRATION_METHOD}), path)
    spec, got_path = cached_calibration("bf16", tmp_path)
    assert (spec.flops_per_s, spec.method, got_path) == (2e11, CALIBRATION_METHOD, path)


def test_an_explicit_calibration_file_of_an_older_method_is_used_and_says_so(clean_env, tmp_path):
    """SERVING_MFU_CALIBRATION / --calibration: the user chose the file, so its figures stand; the source warns."""
    path, old = _calib(tmp_path, method=None)
    got = resolve_peak("bf16", calibration_file=path)
    assert (got.flops_per_s, got.bandwidth_bytes_per_s) == (old.flops_per_s, old.bandwidth_bytes_per_s)
    assert got.source.startswith(old.source) and "calibration method 1" in got.source and str(path) in got.source
    current, spec = _calib(tmp_path)
    assert resolve_peak("bf16", calibration_file=current).source == spec.source


def test_resolve_table_for_given_device(clean_env):
    spec = resolve_peak("bf16", device="NVIDIA H100 80GB HBM3")
    assert spec == lookup_peak("h100-sxm", "bf16")


def test_resolve_unknown_given_device_raises(clean_env):
    with pytest.raises(UnknownDeviceError):
        resolve_peak("bf16", device="tpu-v5e")


def test_resolve_detected_device(clean_env):
    clean_env.setattr(hardware, "detect_device", lambda: "NVIDIA H100 80GB HBM3")
    assert resolve_peak("fp8") == lookup_peak("h100-sxm", "fp8")
    clean_env.setattr(hardware, "detect_device", lambda: "NVIDIA GeForce RTX 4090")
    assert resolve_peak("bf16") is None  # unknown local GPU: a missing peak, not a crash


def test_calibration_beats_table(clean_env, tmp_path):
    path, spec = _calib(tmp_path)
    got = resolve_peak("bf16", device="h100-sxm", calibration_file=path)
    assert got == spec
    assert got.source.startswith("measured by serving-mfu calibrate")


def test_override_beats_calibration_and_table(clean_env, tmp_path):
    path, _ = _calib(tmp_path)
    got = resolve_peak(
        "bf16", device="h100-sxm", flops_per_s=5e14, bandwidth_bytes_per_s=1e12, calibration_file=path
    )
    assert (got.flops_per_s, got.bandwidth_bytes_per_s, got.source) == (5e14, 1e12, "override")
    assert got.device == "h100-sxm"
    no_device = resolve_peak("bf16", flops_per_s=5e14, bandwidth_bytes_per_s=1e12)
    assert no_device.source == "override" and no_device.device == "unknown"


def test_half_override_is_completed_from_table(clean_env):
    table = lookup_peak("l40s", "bf16")
    got = resolve_peak("bf16", device="l40s", flops_per_s=3e14)
    assert (got.flops_per_s, got.bandwidth_bytes_per_s) == (3e14, table.bandwidth_bytes_per_s)
    assert got.source.startswith("override") and "l40s" in got.source.lower()
    got = resolve_peak("bf16", device="l40s", bandwidth_bytes_per_s=8e11)
    assert (got.flops_per_s, got.bandwidth_bytes_per_s) == (table.flops_per_s, 8e11)
    assert got.source.startswith("override")


def test_half_override_without_known_device_raises(clean_env):
    with pytest.raises(PeakResolutionError, match="both"):
        resolve_peak("bf16", flops_per_s=3e14)


def test_env_vars_are_honoured(clean_env, tmp_path):
    """SERVING_MFU_* reach resolve_peak through the one Settings object (Settings.peak_inputs)."""
    from serving_mfu.runtime.settings import read_settings

    def from_env(dtype, **given):
        return resolve_peak(dtype, **{**read_settings().peak_inputs(), **given})

    clean_env.setenv("SERVING_MFU_DEVICE", "NVIDIA L4")
    assert from_env("fp8") == lookup_peak("l4", "fp8")
    assert from_env("fp8", device="h200") == lookup_peak("h200", "fp8")  # argument beats env
    path, spec = _calib(tmp_path)
    clean_env.setenv("SERVING_MFU_CALIBRATION", str(path))
    assert from_env("bf16") == spec
    clean_env.setenv("SERVING_MFU_PEAK_FLOPS", "2e14")
    clean_env.setenv("SERVING_MFU_PEAK_BANDWIDTH", "3e11")
    got = from_env("bf16")
    assert (got.flops_per_s, got.bandwidth_bytes_per_s, got.source) == (2e14, 3e11, "override")
    assert from_env("bf16", flops_per_s=1e14).flops_per_s == 1e14  # argument beats env
    clean_env.setenv("SERVING_MFU_PEAK_FLOPS", "fast")
    with pytest.raises(ValueError, match="SERVING_MFU_PEAK_FLOPS"):
        from_env("bf16")


def test_calibration_for_another_dtype_is_refused(clean_env, tmp_path):
    path, _ = _calib(tmp_path, dtype="fp32")
    with pytest.raises(PeakResolutionError, match="fp32"):
        resolve_peak("bf16", calibration_file=path)
    assert resolve_peak("fp32", calibration_file=path).dtype == "fp32"


def test_fp32_on_a_gpu_needs_calibration_or_override(clean_env):
    with pytest.raises(UnsupportedDtypeError, match="calibrat"):
        resolve_peak("fp32", device="a100-80gb")
    assert resolve_peak("fp32", device="a100-80gb", flops_per_s=19.5e12).flops_per_s == 19.5e12


def test_override_must_be_positive(clean_env):
    with pytest.raises(ValueError):
        resolve_peak("bf16", flops_per_s=-1.0, bandwidth_bytes_per_s=1e12)


# --- detection and import hygiene -------------------------------------------------------


def test_detect_device_never_raises(monkeypatch):
    import torch

    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    assert hardware.detect_device() is None


def test_detect_device_on_cpu_only_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has an accelerator")
    assert hardware.detect_device() is None


def test_modules_import_and_detect_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import serving_mfu.peaks.table as h, serving_mfu.peaks.resolve as r, serving_mfu.peaks.calibrate as c\n"
        "assert r.detect_device() is None\n"
        "assert h.lookup_peak('h100', 'bf16').flops_per_s > 0\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- calibration on this CPU -------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_calibration():
    return calibrate(dtype="fp32", duration_s=0.5, device="cpu")


def test_calibrate_cpu_gives_sane_numbers(cpu_calibration):
    spec = cpu_calibration
    assert spec.dtype == "fp32" and spec.device.startswith("cpu")
    # A few CPU cores (possibly shared with other jobs): positive, far below any datacenter GPU.
    assert 0 < spec.flops_per_s < 1e14
    assert 1e8 < spec.bandwidth_bytes_per_s < 2e12  # no CPU socket copies at 2 TB/s
    assert spec.source.startswith("measured by serving-mfu calibrate on cpu")
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", spec.source)  # ISO time
    assert re.search(r" in fp32 at \S*\d+", spec.source)  # winning kernel, dtype, shape
    # bandwidth: the max over the three memory kernels, the winner named with its shape
    assert [r.kernel for r in spec.bandwidth_measurements] == ["streaming read", "copy", "GEMV"]
    assert spec.bandwidth_bytes_per_s == max(r.bytes_per_s for r in spec.bandwidth_measurements)
    assert re.search(r"bandwidth [\d.,]+ GB/s: (streaming read|copy|GEMV) \(", spec.source)
    assert spec.method == CALIBRATION_METHOD


class _FakeClock:
    """A clock that only moves when a fake kernel says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_kernel(clock, name, dtype, rate_at, calls=None, slow_every=0):
    """A Kernel whose op at size n takes 2n³ / rate_at[n] seconds on `clock` (every `slow_every`-th call 5x)."""
    from serving_mfu.peaks.calibrate import Kernel

    calls = calls if calls is not None else []

    def build(n):
        def op():
            calls.append(n)
            slow = 5.0 if slow_every and len(calls) % slow_every == 0 else 1.0
            clock.now += slow * 2 * n**3 / rate_at[n]
        return op, 2.0 * n**3, f"{n}x{n}x{n}"
    return Kernel(name, dtype, build)


SIZES = (128, 256, 512, 1024, 2048)


def test_sweep_reports_the_true_rate_and_the_best_repetition_wins():
    """A device doing exactly RATE FLOP/s: every size reports RATE although every 4th call is preempted."""
    from serving_mfu.peaks.calibrate import sweep_kernel

    clock, rate = _FakeClock(), 3.7e11
    k = _fake_kernel(clock, "torch.mm", "fp32", {n: rate for n in SIZES}, slow_every=4)
    got = sweep_kernel(k, SIZES, 10.0, clock=clock, target_s=0.0)  # one call per repetition
    assert got and all(r.flops_per_s == pytest.approx(rate, rel=1e-9) for r in got)
    assert [r.n for r in got] == [128, 256, 512]  # flat: stops after PATIENCE sizes that did not raise it


def test_sweep_goes_on_while_throughput_rises_and_sees_a_late_jump():
    """Like torch.mm bf16 on an AVX-512 EPYC: flat at 1024, doubles at 2048 — one flat size is not the end."""
    from serving_mfu.peaks.calibrate import best_result, sweep_kernel

    clock = _FakeClock()
    rates = {128: 1e10, 256: 4e10, 512: 5e10, 1024: 5.05e10, 2048: 9e10}
    got = sweep_kernel(_fake_kernel(clock, "torch.mm", "bf16", rates), SIZES, 100.0, clock=clock)
    assert [r.n for r in got] == list(SIZES)
    assert best_result(got).n == 2048 and best_result(got).flops_per_s == pytest.approx(9e10)


def test_sweep_stops_before_a_size_that_would_not_fit_the_budget():
    """An emulated path at 0.1 GFLOP/s: 128³ takes 42 ms, 256³ would take 4 x 335 ms > the 0.5 s budget."""
    from serving_mfu.peaks.calibrate import sweep_kernel

    clock = _FakeClock()
    got = sweep_kernel(_fake_kernel(clock, "torch.mm", "bf16", {n: 1e8 for n in SIZES}), SIZES, 0.5, clock=clock)
    assert [r.n for r in got] == [128]
    assert clock.now < 0.5


def test_cpu_kernel_set_covers_the_fp32_path_for_bf16_and_fp16():
    import torch

    from serving_mfu.peaks.calibrate import engine_kernels

    for dt in ("bf16", "fp16"):
        names = {(k.name, k.dtype) for k in engine_kernels(torch, torch.device("cpu"), dt, include_vllm=False)}
        assert names == {("torch.mm", dt), ("F.linear", dt), ("torch.mm", "fp32"), ("F.linear", "fp32")}
    fp32 = {(k.name, k.dtype) for k in engine_kernels(torch, torch.device("cpu"), "fp32", include_vllm=False)}
    assert fp32 == {("torch.mm", "fp32"), ("F.linear", "fp32")}


def test_calibrate_takes_the_max_over_kernels_and_names_it():
    """bf16 emulated (slow) beside a fast fp32 F.linear: the peak is the fp32 figure, and the source says so."""
    clock = _FakeClock()
    kernels = [
        _fake_kernel(clock, "torch.mm", "bf16", {n: 2e9 for n in SIZES}),
        _fake_kernel(clock, "F.linear", "bf16", {n: 1.1e10 for n in SIZES}),
        _fake_kernel(clock, "torch.mm", "fp32", {128: 5e10, 256: 8e10, 512: 1.05e11, 1024: 1.0e11, 2048: 9e10}),
        _fake_kernel(clock, "F.linear", "fp32", {128: 6e10, 256: 9e10, 512: 1.3e11, 1024: 1.2e11, 2048: 1.1e11}),
    ]
    spec = calibrate("bf16", duration_s=40.0, device="cpu", kernels=kernels, clock=clock,
                     isa_flops_per_s=2.816e11, memory_kernels=[_fake_memory_kernel(clock, "copy", 4e10)])
    assert spec.flops_per_s == pytest.approx(1.3e11)
    assert spec.flops_per_s == max(r.flops_per_s for r in spec.measurements)
    assert "F.linear in fp32 at 512x512x512" in spec.source
    assert spec.isa_flops_per_s == 2.816e11 and "ABOVE" not in spec.source
    assert {r.kernel + " " + r.dtype for r in spec.measurements} == {
        "torch.mm bf16", "F.linear bf16", "torch.mm fp32", "F.linear fp32"}
    assert spec.bandwidth_bytes_per_s == pytest.approx(4e10)
    assert spec.method == CALIBRATION_METHOD


def test_a_measurement_above_the_isa_peak_is_flagged():
    clock = _FakeClock()
    kernels = [_fake_kernel(clock, "torch.mm", "fp32", {n: 5e11 for n in SIZES})]
    spec = calibrate("fp32", duration_s=10.0, device="cpu", kernels=kernels, clock=clock,
                     isa_flops_per_s=2e11, memory_kernels=[_fake_memory_kernel(clock, "copy", 4e10)])
    assert "ABOVE the ISA peak 200.0 GFLOP/s" in spec.source


def _fake_memory_kernel(clock, name, rate, nbytes=256 << 20, dtype="fp32", slow_every=0):
    """A BandwidthKernel moving `nbytes` per call at `rate` bytes/s on `clock` (every `slow_every`-th call 3x)."""
    from serving_mfu.peaks.calibrate import BandwidthKernel

    calls = []

    def build():
        def op():
            calls.append(1)
            slow = 3.0 if slow_every and len(calls) % slow_every == 0 else 1.0
            clock.now += slow * nbytes / rate
        return op, float(nbytes), f"{name} of {nbytes >> 20} MiB"
    return BandwidthKernel(name, dtype, build)


def test_bandwidth_bookkeeping_with_a_fake_clock():
    """A kernel moving S bytes per call on memory doing R bytes/s takes S/R: the result is R, although every
    other call is preempted; the budget is shared between the kernels and each gets at least min_reps calls."""
    from serving_mfu.peaks.calibrate import measure_bandwidth

    clock = _FakeClock()
    kernels = [_fake_memory_kernel(clock, "copy", 4.2e10, slow_every=2), _fake_memory_kernel(clock, "read", 3e10)]
    got = measure_bandwidth(kernels, 0.5, clock=clock)
    assert [r.kernel for r in got] == ["copy", "read"]
    assert got[0].bytes_per_s == pytest.approx(4.2e10, rel=1e-9) and got[1].bytes_per_s == pytest.approx(3e10)
    assert all(r.reps >= 3 and r.bytes == 256 << 20 for r in got)
    assert clock.now == pytest.approx(0.5, abs=0.05)  # the 0.5 s budget, shared, plus one call over


def test_calibrated_bandwidth_is_the_max_over_read_copy_and_gemv_and_names_the_winner():
    """The engine's GEMV streams faster than a copy on this fake machine: the bandwidth is the GEMV's figure,
    the source names it with its shape and lists every kernel; a kernel that fails is left out, not fatal."""
    from serving_mfu.peaks.calibrate import BandwidthKernel

    clock = _FakeClock()
    flops = [_fake_kernel(clock, "torch.mm", "fp32", {n: 1e11 for n in SIZES})]

    def broken():
        raise RuntimeError("no such kernel here")

    memory = [_fake_memory_kernel(clock, "streaming read", 2.1e10), _fake_memory_kernel(clock, "copy", 1.8e10),
              _fake_memory_kernel(clock, "GEMV", 2.6e10, dtype="bf16"), BandwidthKernel("broken", "fp32", broken)]
    spec = calibrate("fp32", duration_s=10.0, device="cpu", kernels=flops, clock=clock, isa_flops_per_s=1e12,
                     memory_kernels=memory)
    assert spec.bandwidth_bytes_per_s == pytest.approx(2.6e10)
    assert [(r.kernel, round(r.bytes_per_s / 1e9, 1)) for r in spec.bandwidth_measurements] == [
        ("streaming read", 21.0), ("copy", 18.0), ("GEMV", 26.0)]
    assert "bandwidth 26.0 GB/s: GEMV (GEMV of 256 MiB, best of" in spec.source
    assert "fastest of streaming read 21.0, copy 18.0, GEMV 26.0 GB/s" in spec.source
    assert f"calibration method {CALIBRATION_METHOD};" in spec.source


def test_the_real_memory_kernels_move_the_bytes_they_count():
    """Streaming read (size), copy (2 x size) and GEMV (W's bytes) over one small buffer, in bf16 and fp32."""
    import torch

    from serving_mfu.peaks.calibrate import bandwidth_kernels, buffer_bytes, measure_bandwidth

    for dt, gemv_dt, rows in (("bf16", "bf16", 1024), ("fp32", "fp32", 512), ("int8", "bf16", 1024)):
        got = measure_bandwidth(bandwidth_kernels(torch, torch.device("cpu"), dt, 8 << 20), 0.0, min_reps=1)
        assert [(r.kernel, r.dtype, r.bytes) for r in got] == [
            ("streaming read", "fp32", 8 << 20), ("copy", "fp32", 16 << 20), ("GEMV", gemv_dt, 8 << 20)]
        assert all(r.bytes_per_s > 0 for r in got) and f"W[{rows},4096]" in got[2].shape
    # buffers: 8x the last-level cache within 256 MiB…2 GiB; the quick reading 4x within 64…256 MiB
    assert buffer_bytes(32 << 20) == 256 << 20 and buffer_bytes(96 << 20) == 768 << 20
    assert buffer_bytes(None) == 256 << 20 and buffer_bytes(1 << 30) == 2 << 30
    assert buffer_bytes(32 << 20, quick=True) == 128 << 20 and buffer_bytes(8 << 20, quick=True) == 64 << 20


def test_bandwidth_text_says_when_the_buffer_is_not_far_above_the_cache():
    from serving_mfu.peaks.calibrate import bandwidth_text
    from serving_mfu.peaks.spec import BandwidthResult

    r = [BandwidthResult(kernel="copy", dtype="fp32", bytes=2 << 30, shape="c", bytes_per_s=5e10, reps=3)]
    assert "8.0x the 32 MiB last-level cache" in bandwidth_text(r, 256 << 20, 32 << 20)
    assert "BELOW 4x" in bandwidth_text(r, 2 << 30, 1152 << 20)
    assert "cache size unknown" in bandwidth_text(r, 256 << 20, None)


def test_a_real_bf16_calibration_is_at_least_each_kernel_it_measured():
    """On this CPU, in one run: bf16 and fp32 torch.mm and F.linear are all measured, and the peak is their max."""
    spec = calibrate("bf16", duration_s=1.5, device="cpu", include_vllm=False)
    kinds = {(r.kernel, r.dtype) for r in spec.measurements}
    assert {("torch.mm", "bf16"), ("F.linear", "bf16"), ("torch.mm", "fp32"), ("F.linear", "fp32")} <= kinds
    assert spec.flops_per_s == max(r.flops_per_s for r in spec.measurements)


def test_calibration_round_trips(cpu_calibration, tmp_path):
    path = save_calibration(cpu_calibration, tmp_path / "c.json")
    assert load_calibration(path) == cpu_calibration
    assert json.loads(path.read_text())["flops_per_s"] == cpu_calibration.flops_per_s


def test_calibrate_bf16_default_on_cpu():
    spec = calibrate(duration_s=0.3)
    assert spec.dtype == "bf16" and 0 < spec.flops_per_s < 1e14


@pytest.mark.parametrize("dtype", ["fp4", "tf32"])
def test_calibrate_rejects_dtypes_this_cpu_cannot_run(dtype):
    with pytest.raises(ValueError):
        calibrate(dtype=dtype, duration_s=0.1, device="cpu")


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"device": "cpu", "dtype": "bf16"}),
    json.dumps({"device": "cpu", "dtype": "bf16", "flops_per_s": -5, "bandwidth_bytes_per_s": 1, "source": "x"}),
    "",
])
def test_malformed_calibration_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken-calibration.json"
    path.write_text(content)
    with pytest.raises(CalibrationFileError, match="broken-calibration.json"):
        load_calibration(path)


def test_missing_calibration_file_names_the_file(tmp_path):
    with pytest.raises(CalibrationFileError, match="nowhere.json"):
        load_calibration(tmp_path / "nowhere.json")
