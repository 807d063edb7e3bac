"""The ISA peak on fixture CPUs (cpuinfo, cgroup and cpufreq files of real machine types), whatever CPU runs the tests.

Expected figures are worked out by hand from the vendors' documents named in serving_mfu.peaks.cpu:
cores × (FMA units × lanes × 2) × clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serving_mfu.peaks.cpu import (
    isa_peak,
    last_level_cache_bytes,
    machine_isa_peak,
    machine_key,
    parse_cpuinfo,
    read_cgroup_quota,
    read_machine,
    usable_cores,
    weights_fit_in_cache,
)

CPUS = Path(__file__).parent / "fixtures" / "cpus"
G = 1e9


@pytest.mark.parametrize("fixture, dtype, cores, flops_per_cycle, ghz", [
    # issue 8's machine: Zen 4 host, AVX-512 hidden by the VM → AVX2: 2 x 256-bit FMA = 32 fp32 FLOPs/cycle;
    # no bf16 units exposed → engines up-convert → the fp32 rate; no cpufreq → EPYC 9004's top boost, 4.4 GHz.
    ("epyc-avx2-kvm", "bf16", 2, 32, 4.4),
    ("epyc-avx2-kvm", "fp32", 2, 32, 4.4),
    # Cascade Lake Platinum: 2 x 512-bit FMA = 64; hyperthreads share a core (4 CPUs, 2 cores); no avx512_bf16.
    ("xeon-8259cl-avx512", "bf16", 2, 64, 4.8),
    # Sapphire Rapids: AMX-BF16 1,024 FLOPs/cycle; cgroup v2 quota 3 CPUs of 4 cores; intel_pstate max 3.8 GHz.
    ("xeon-8488c-amx", "bf16", 3, 1024, 3.8),
    ("xeon-8488c-amx", "fp16", 3, 128, 3.8),  # avx512_fp16: 32 lanes x 2 units x 2
    ("xeon-8488c-amx", "fp32", 3, 64, 3.8),
    ("xeon-8488c-amx", "int8", 3, 2048, 3.8),
    # Silver 4214: one AVX-512 FMA unit (Intel ARK) = 32; acpi-cpufreq's max is the base clock, not an upper bound.
    ("xeon-silver-4214", "fp32", 2, 32, 4.8),
    # Graviton3: not in the table → flag fallback (SVE: 64, an upper bound), bf16 BFMMLA 4x; Arm fallback clock.
    ("graviton3-arm", "fp32", 2, 64, 4.5),
    ("graviton3-arm", "bf16", 2, 256, 4.5),
])
def test_isa_peak_of_fixture_machines(fixture, dtype, cores, flops_per_cycle, ghz):
    peak = machine_isa_peak(dtype, root=CPUS / fixture)
    assert (peak.cores, peak.flops_per_cycle) == (cores, flops_per_cycle)
    assert peak.clock_ghz == pytest.approx(ghz)
    assert peak.flops_per_s == pytest.approx(cores * flops_per_cycle * ghz * G)
    assert peak.source.startswith("ISA peak of ")
    assert f"{cores} cores x {flops_per_cycle} {dtype} FLOPs/cycle" in peak.source


def test_the_avx2_epyc_peak_is_above_what_issue_8_measured_there():
    """Issue 8 measured fp32 F.linear at 130 GFLOP/s and the engine at ~11 GFLOP/s on that machine: the
    physical limit must be above both, and the clock must say it is not cpuinfo's nominal 2.6 GHz."""
    peak = machine_isa_peak("bf16", root=CPUS / "epyc-avx2-kvm")
    assert peak.flops_per_s > 130 * G
    assert "cpu MHz' 2595" in peak.source and "4.4 GHz" in peak.source
    assert "no native bf16" in peak.source


def test_a_vm_that_hides_avx512_caps_the_table_row():
    """Sapphire Rapids silicon behind a hypervisor that exposes only AVX2: 2 x 256-bit FMA = 32, not 64."""
    text = (CPUS / "xeon-8488c-amx" / "proc" / "cpuinfo").read_text()
    hidden = " ".join(f for f in text.split(" ") if not f.startswith(("avx512", "amx")))
    peak = isa_peak(parse_cpuinfo(hidden), "fp32")
    assert peak.flops_per_cycle == 32 and "capped by the exposed ISA" in peak.source
    assert isa_peak(parse_cpuinfo(hidden), "bf16").flops_per_cycle == 32  # no bf16 units left either


def test_hyperthreads_count_once_and_affinity_limits_cores():
    info, _, _, _ = read_machine(CPUS / "xeon-8488c-amx")
    assert usable_cores(info, None, None)[0] == 4  # 8 CPUs, 4 cores
    assert usable_cores(info, {0, 4}, None)[0] == 1  # two threads of core 0
    assert usable_cores(info, {0, 1, 2}, None)[0] == 3
    n, why = usable_cores(info, None, 1.5)
    assert n == 2 and "cgroup CPU quota 1.5" in why


def test_cgroup_quota_v1_and_v2(tmp_path):
    assert read_cgroup_quota(CPUS / "xeon-8259cl-avx512" / "sys" / "fs" / "cgroup") == pytest.approx(1.5)
    assert read_cgroup_quota(CPUS / "xeon-8488c-amx" / "sys" / "fs" / "cgroup") == pytest.approx(3.0)
    assert read_cgroup_quota(CPUS / "xeon-silver-4214" / "sys" / "fs" / "cgroup") is None  # "max"
    assert read_cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert read_cgroup_quota(tmp_path) is None


def test_a_sysfs_max_below_the_shown_clock_is_not_trusted(tmp_path):
    """A boost-aware driver's max is the clock; anything above the table's bound that the machine shows wins."""
    info = parse_cpuinfo((CPUS / "epyc-avx2-kvm" / "proc" / "cpuinfo").read_text())
    hot = isa_peak(info, "fp32", sysfs=(5.2, "acpi-cpufreq"))  # above the table's 4.4 GHz: the machine says so
    assert hot.clock_ghz == pytest.approx(5.2)
    trusted = isa_peak(info, "fp32", sysfs=(3.7, "amd-pstate"))
    assert trusted.clock_ghz == pytest.approx(3.7) and "amd-pstate" in trusted.source


def test_unknown_x86_cpu_falls_back_on_flags_and_the_highest_x86_clock():
    text = (CPUS / "epyc-avx2-kvm" / "proc" / "cpuinfo").read_text().replace("cpu family\t: 25", "cpu family\t: 99")
    peak = isa_peak(parse_cpuinfo(text), "fp32")
    assert peak.flops_per_cycle == 32 and peak.clock_ghz == pytest.approx(6.2)
    assert "not in the table" in peak.source


def test_machine_key_names_the_cpu_and_cores():
    assert machine_key(CPUS / "epyc-avx2-kvm") == "amd-epyc-f25m17-2c"
    assert machine_key(CPUS / "xeon-8488c-amx") == "intel-r-xeon-r-platinum-8488c-f6m143-3c"


def test_this_machine_has_an_isa_peak():
    """Whatever CPU runs the suite: a positive figure from its own files (no value asserted: it depends on the CPU)."""
    peak = machine_isa_peak("bf16")
    assert peak.flops_per_s > 0 and peak.cores >= 1


def _sysfs_cache(root, cpu, caches):
    """Write cpu<cpu>/cache/index<i>/{level,type,size,shared_cpu_list} under `root` from (level, type, size, shared)."""
    for i, (level, kind, size, shared) in enumerate(caches):
        d = root / f"cpu{cpu}" / "cache" / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
        if shared is not None:
            (d / "shared_cpu_list").write_text(f"{shared}\n")


def test_last_level_cache_from_a_fake_sysfs(tmp_path):
    """Level 3 of a 2-core VM whose cores share one 32 MiB L3: counted once; the L1i/L1d/L2 are not the LLC."""
    for cpu in (0, 1):
        _sysfs_cache(tmp_path, cpu, [(1, "Data", "32K", str(cpu)), (1, "Instruction", "32K", str(cpu)),
                                     (2, "Unified", "1024K", str(cpu)), (3, "Unified", "32768K", "0-1")])
    assert last_level_cache_bytes(tmp_path) == 32 << 20
    assert last_level_cache_bytes(tmp_path, cpus={1}) == 32 << 20


def test_last_level_cache_counts_each_instance_once(tmp_path):
    """An EPYC with one 32 MiB L3 per CCD: CPUs 0-1 on one CCD, 2-3 on another → 64 MiB the engine can hold;
    a process pinned to one CCD holds 32 MiB."""
    for cpu in range(4):
        ccd = "0-1" if cpu < 2 else "2-3"
        _sysfs_cache(tmp_path, cpu, [(2, "Unified", "1M", str(cpu)), (3, "Unified", "32M", ccd)])
    assert last_level_cache_bytes(tmp_path) == 64 << 20
    assert last_level_cache_bytes(tmp_path, cpus={0, 1}) == 32 << 20


def test_last_level_cache_falls_back_to_the_highest_level_and_to_none(tmp_path):
    arm = tmp_path / "arm"  # a core with L1 and a private L2 only: the L2 is its last level
    _sysfs_cache(arm, 0, [(1, "Data", "64K", "0"), (2, "Unified", "2048K", None)])
    assert last_level_cache_bytes(arm) == 2 << 20
    empty = tmp_path / "vm"  # no cache folders (some VMs, containers without sysfs)
    (empty / "cpu0").mkdir(parents=True)
    assert last_level_cache_bytes(empty) is None
    assert last_level_cache_bytes(tmp_path / "nowhere") is None
    garbage = tmp_path / "garbage"
    _sysfs_cache(garbage, 0, [(3, "Unified", "lots", "0")])
    assert last_level_cache_bytes(garbage) is None


def test_this_machines_last_level_cache_is_positive_or_unknown():
    llc = last_level_cache_bytes()
    assert llc is None or llc >= 1 << 16


@pytest.mark.parametrize("weight_bytes, cache_bytes, fits", [
    (16 << 20, 32 << 20, True),  # a tiny model under a 32 MiB L3: its weights are cache hits, not DRAM traffic
    (32 << 20, 32 << 20, True),
    (14e9, 32 << 20, False),  # a 7B bf16 model
    (33 << 20, 32 << 20, False),
    (16 << 20, None, False),  # cache size unknown: not flagged
    (0, 32 << 20, False),
])
def test_weights_fit_in_cache(weight_bytes, cache_bytes, fits):
    assert weights_fit_in_cache(weight_bytes, cache_bytes) is fits
