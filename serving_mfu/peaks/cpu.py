"""Theoretical CPU peak from the ISA: usable cores × FLOPs per cycle of the widest units × max clock (DESIGN §7).

This is the physical limit a CPU engine cannot beat, so it is both the default CPU peak (when no
calibration is cached) and the ceiling a measured calibration is held against.  Every input
carries its source: the core count says whether affinity or a cgroup quota bounded it, the
FLOPs per cycle name the microarchitecture row (or the flag fallback) they came from, the clock
says whether sysfs or the microarchitecture table gave it.

Everything reads from text and paths handed in (`read_machine(root=...)`), so tests run on
fixture files of other CPUs, whatever CPU they run on.
"""

from __future__ import annotations

import math
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

_G = 1e9

_AMD_ZEN1 = "AMD Software Optimization Guide for Family 17h Processors (pub. 55723): 2 x 128-bit FMA pipes"
_AMD_ZEN2 = ("AMD Software Optimization Guide for Family 17h Models 30h and Greater (pub. 56305): "
             "2 x 256-bit FMA pipes")
_AMD_ZEN3 = "AMD Software Optimization Guide for Family 19h Processors (pub. 56665): 2 x 256-bit FMA pipes"
_AMD_ZEN4 = ("AMD Software Optimization Guide for Family 19h Models 10h+ (Zen 4, pub. 57647): AVX-512 "
             "executes on 2 x 256-bit FMA pipes (double-pumped)")
_AMD_ZEN5 = ("AMD Software Optimization Guide for the Zen 5 Microarchitecture (pub. 58455): 2 x 512-bit "
             "FMA pipes on desktop and server parts")
_INTEL_ORM = "Intel 64 and IA-32 Architectures Optimization Reference Manual (execution ports per microarchitecture)"
_INTEL_AVX512 = ("Intel ARK '# of AVX-512 FMA Units' (2 on Xeon Platinum/Gold 6xxx, 1 on Gold 5xxx/Silver/Bronze; "
                 "the table assumes 2, an upper bound, unless the model name says otherwise)")
_INTEL_AMX = ("Intel AMX: 1,024 BF16 (AMX-FP16: FP16) FLOPs and 2,048 INT8 ops per cycle per core "
              "(Intel, 'Accelerate AI Workloads with Intel AMX', 4th Gen Xeon Scalable)")


@dataclass(frozen=True, slots=True)
class Microarch:
    """One row of the table: a CPUID family/model range, FP32 FLOPs per cycle per core, max boost clock."""

    name: str
    vendor: str  # "AuthenticAMD" / "GenuineIntel"
    family: int
    models: tuple[range, ...]
    fp32_flops_per_cycle: int  # FMA units × lanes × 2
    max_boost_ghz: float  # highest boost of any part with this family/model
    source: str
    clock_source: str


# Highest boost clocks: AMD and Intel product pages of the fastest part of each family/model.
MICROARCHS: tuple[Microarch, ...] = (
    Microarch("Zen / Zen+", "AuthenticAMD", 23, (range(0x00, 0x30),), 16, 4.4, _AMD_ZEN1,
              "Ryzen Threadripper 2950X, 4.4 GHz"),
    Microarch("Zen 2", "AuthenticAMD", 23, (range(0x30, 0x100),), 32, 4.7, _AMD_ZEN2,
              "Ryzen 9 3950X, 4.7 GHz (EPYC 7002: 3.9 GHz)"),
    Microarch("Zen 3", "AuthenticAMD", 25, (range(0x00, 0x10), range(0x20, 0x60)), 32, 4.9, _AMD_ZEN3,
              "Ryzen 9 5950X, 4.9 GHz (EPYC 7003: 4.1 GHz)"),
    Microarch("Zen 4 (EPYC 9004 Genoa/Genoa-X)", "AuthenticAMD", 25, (range(0x10, 0x18),), 32, 4.4, _AMD_ZEN4,
              "EPYC 9174F, 4.4 GHz"),
    Microarch("Zen 4", "AuthenticAMD", 25, (range(0x18, 0x20), range(0x60, 0x80), range(0xA0, 0xB0)), 32, 5.7,
              _AMD_ZEN4, "Ryzen 9 7950X, 5.7 GHz"),
    Microarch("Zen 5", "AuthenticAMD", 26, (range(0x00, 0x100),), 64, 5.7, _AMD_ZEN5,
              "Ryzen 9 9950X, 5.7 GHz (EPYC 9005: 5.0 GHz)"),
    Microarch("Sandy/Ivy Bridge", "GenuineIntel", 6, (range(42, 43), range(45, 46), range(58, 59), range(62, 63)),
              16, 4.0, _INTEL_ORM + ": 1 x 256-bit add + 1 x 256-bit multiply, no FMA", "Core i7-4960X, 4.0 GHz"),
    Microarch("Haswell/Broadwell", "GenuineIntel", 6,
              (range(60, 61), range(63, 64), range(69, 72), range(61, 62), range(79, 80), range(86, 87)),
              32, 4.4, _INTEL_ORM + ": 2 x 256-bit FMA", "Core i7-4790K, 4.4 GHz"),
    Microarch("Skylake-SP/Cascade Lake/Cooper Lake", "GenuineIntel", 6, (range(85, 86),), 64, 4.8,
              _INTEL_AVX512, "Core i9-10980XE, 4.8 GHz"),
    Microarch("Ice Lake-SP", "GenuineIntel", 6, (range(106, 107), range(108, 109)), 64, 4.0, _INTEL_AVX512,
              "Xeon W-3375, 4.0 GHz"),
    Microarch("Sapphire/Emerald Rapids", "GenuineIntel", 6, (range(143, 144), range(207, 208)), 64, 4.8,
              _INTEL_AVX512, "Xeon w9-3495X, 4.8 GHz"),
    Microarch("Granite Rapids", "GenuineIntel", 6, (range(173, 175),), 64, 4.0, _INTEL_AVX512,
              "Xeon 6980P, 3.9 GHz"),
    Microarch("Sierra Forest (E-cores)", "GenuineIntel", 6, (range(175, 176), range(221, 222)), 16, 3.6,
              _INTEL_ORM + ": Crestmont, 2 x 128-bit FMA", "Xeon 6780E, 3.0 GHz"),
    Microarch("Intel client (Skylake…Arrow Lake)", "GenuineIntel", 6,
              (range(78, 79), range(94, 95), range(142, 143), range(158, 159), range(165, 167), range(151, 155),
               range(183, 184), range(186, 187), range(191, 192), range(170, 171), range(197, 199), range(189, 190)),
              32, 6.2, _INTEL_ORM + ": 2 x 256-bit FMA per P-core", "Core i9-14900KS, 6.2 GHz"),
    Microarch("Ice/Tiger Lake client", "GenuineIntel", 6, (range(125, 127), range(140, 142)), 32, 5.0,
              _INTEL_ORM + ": 1 x 512-bit FMA", "Core i9-11900KB, 4.9 GHz"),
)

# Fallbacks: FP32 FLOPs per cycle from the widest vector flags (2 FMA units assumed: an upper bound),
# and the highest clock of any part when neither sysfs nor the table knows this CPU.
FALLBACK_CLOCK_GHZ = {"x86_64": 6.2, "aarch64": 4.5}
FALLBACK_CLOCK_SOURCE = {"x86_64": "highest boost of any x86 part (Core i9-14900KS, 6.2 GHz)",
                         "aarch64": "highest clock of any Arm server/desktop core (Apple M4, 4.5 GHz)"}


def flag_fallback_fp32(flags: frozenset[str], arch: str) -> tuple[int, str]:
    """FP32 FLOPs/cycle from ISA flags alone, assuming two FMA units of the widest width (an upper bound)."""
    if arch == "aarch64":
        if "sve" in flags:
            return 64, "flags: SVE, assumed 4 x 128-bit FMA pipes ... up to 2 x 512-bit (upper bound)"
        return 32, "flags: NEON (asimd), assumed 4 x 128-bit FMA pipes (Neoverse V1/V2; upper bound)"
    if "avx512f" in flags:
        return 64, "flags: avx512f, assumed 2 x 512-bit FMA units (upper bound)"
    if "fma" in flags and "avx2" in flags:
        return 32, "flags: avx2+fma, assumed 2 x 256-bit FMA units"
    if "avx" in flags:
        return 16, "flags: avx, 1 x 256-bit add + 1 x 256-bit multiply"
    return 8, "flags: sse2, 1 x 128-bit add + 1 x 128-bit multiply"


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says that the peak depends on."""

    arch: str
    vendor: str
    family: int | None
    model: int | None
    model_name: str
    flags: frozenset[str]
    mhz: float | None
    # logical CPU number → (physical package id, core id): hyperthreads share a core's FMA units
    cores: dict[int, tuple[int, int]] = field(default_factory=dict)


def parse_cpuinfo(text: str, arch: str | None = None) -> CpuInfo:
    """Parse /proc/cpuinfo text (x86 or Arm) into a CpuInfo."""
    if arch is None:
        arch = ("aarch64" if re.search(r"^CPU implementer", text, re.M)
                else "x86_64" if re.search(r"^vendor_id", text, re.M) else platform.machine())
    arch = _norm_arch(arch)
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    first: dict[str, str] = {}
    cores: dict[int, tuple[int, int]] = {}
    mhz: float | None = None
    for block in blocks:
        kv: dict[str, str] = {}
        for line in block.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                kv[k.strip().lower()] = v.strip()
        if "processor" in kv and kv["processor"].isdigit():
            cpu = int(kv["processor"])
            cores[cpu] = (int(kv.get("physical id", "0") or 0), int(kv.get("core id", cpu) or cpu))
            if not first:
                first = kv
        elif not first and kv:
            first = kv
        if "cpu mhz" in kv:
            try:
                mhz = max(mhz or 0.0, float(kv["cpu mhz"]))
            except ValueError:
                pass
    flags = frozenset((first.get("flags") or first.get("features") or "").split())
    if not flags:  # Arm kernels print Features per processor block; a header block may come first
        for block in blocks:
            m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", block, re.M)
            if m:
                flags = frozenset(m.group(1).split())
                break
    return CpuInfo(
        arch=arch,
        vendor=first.get("vendor_id") or first.get("cpu implementer", "unknown"),
        family=_int(first.get("cpu family")),
        model=_int(first.get("model")),
        model_name=first.get("model name") or first.get("hardware") or "unknown cpu",
        flags=flags,
        mhz=mhz,
        cores=cores,
    )


def _int(v: str | None) -> int | None:
    try:
        return int(v, 0) if v is not None else None
    except ValueError:
        return None


def _norm_arch(arch: str) -> str:
    a = arch.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(a, a)


def microarch(info: CpuInfo) -> Microarch | None:
    """The table row for this CPU's vendor/family/model; None if the table does not know it."""
    if info.family is None or info.model is None:
        return None
    for row in MICROARCHS:
        if row.vendor == info.vendor and row.family == info.family and any(info.model in r for r in row.models):
            return row
    return None


def fp32_flops_per_cycle(info: CpuInfo) -> tuple[int, str]:
    """FP32 FLOPs per cycle per core and where the figure came from.

    The table row is capped by what the flags expose: a VM that hides AVX-512 on an AVX-512 host
    runs AVX2 code, whatever the silicon could do.
    """
    row = microarch(info)
    if row is not None:
        fpc = row.fp32_flops_per_cycle
        cap, cap_why = flag_fallback_fp32(info.flags, info.arch)
        if info.arch == "x86_64" and cap < fpc:
            return cap, f"{row.name} capped by the exposed ISA ({cap_why.replace('assumed ', '')})"
        if row.family == 6 and row.vendor == "GenuineIntel" and fpc == 64:
            # Xeon Gold 5xxx (but 5122), Silver and Bronze have one AVX-512 FMA unit (Intel ARK).
            if re.search(r"\b(Silver|Bronze)\b|\bGold 5(?!122)\d{3}", info.model_name):
                return 32, f"{row.name}, one AVX-512 FMA unit ({info.model_name}): {_INTEL_AVX512}"
        return fpc, f"{row.name}: {row.source}"
    fpc, why = flag_fallback_fp32(info.flags, info.arch)
    return fpc, f"microarchitecture not in the table ({info.vendor} family {info.family} model {info.model}); {why}"


def dtype_flops_per_cycle(info: CpuInfo, dtype: str) -> tuple[int, str]:
    """FLOPs per cycle per core at compute `dtype` (bf16/fp16/fp32/int8): native units, else the fp32 path.

    Without native bf16/fp16 arithmetic engines up-convert to fp32, so the fp32 rate is the bound.
    """
    fp32, why = fp32_flops_per_cycle(info)
    f = info.flags
    if dtype == "fp32":
        return fp32, why
    if dtype == "bf16":
        if "amx_bf16" in f:
            return max(1024, 2 * fp32), f"AMX-BF16 tiles: {_INTEL_AMX}"
        if "avx512_bf16" in f:
            return 2 * fp32, f"{why}; avx512_bf16 (VDPBF16PS): 2x the fp32 rate"
        if info.arch == "aarch64" and "bf16" in f:
            return 4 * fp32, f"{why}; Arm BFMMLA: 4x the fp32 rate (upper bound)"
        return fp32, f"{why}; no native bf16: engines up-convert, so the fp32 rate"
    if dtype == "fp16":
        if "amx_fp16" in f:
            return max(1024, 2 * fp32), f"AMX-FP16 tiles: {_INTEL_AMX}"
        if "avx512_fp16" in f:
            return 2 * fp32, f"{why}; avx512_fp16: 2x the fp32 rate"
        if info.arch == "aarch64" and ("asimdhp" in f or "fphp" in f):
            return 2 * fp32, f"{why}; Arm FP16 arithmetic: 2x the fp32 rate"
        return fp32, f"{why}; no native fp16 arithmetic: engines up-convert, so the fp32 rate"
    if dtype == "int8":
        if "amx_int8" in f:
            return max(2048, 4 * fp32), f"AMX-INT8 tiles: {_INTEL_AMX}"
        return 4 * fp32, f"{why}; int8 dot products (VNNI/VPMADDUBSW): at most 4x the fp32 rate"
    raise ValueError(f"no CPU peak for compute dtype {dtype!r} (bf16, fp16, fp32, int8)")


def usable_cores(info: CpuInfo, affinity: set[int] | None, quota_cpus: float | None) -> tuple[int, str]:
    """Physical cores this process may run on: distinct (package, core) of the allowed CPUs, capped by the
    cgroup CPU quota.  Hyperthreads of one core share its FMA units, so they count once."""
    allowed = sorted(affinity) if affinity else sorted(info.cores) or [0]
    known = [info.cores[c] for c in allowed if c in info.cores]
    physical = len(set(known)) + (len(allowed) - len(known))
    why = f"{physical} physical core(s) of {len(allowed)} CPU(s) in this process's affinity"
    if quota_cpus is not None and math.ceil(quota_cpus) < physical:
        return math.ceil(quota_cpus), f"cgroup CPU quota {quota_cpus:g} CPUs (affinity: {why})"
    return physical, why


def read_cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (v2 cpu.max or v1 cfs quota/period); None when unlimited or unknown."""
    try:
        v2 = root / "cpu.max"
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q, p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if q.exists() and p.exists():
            quota_us = int(q.read_text())
            return None if quota_us <= 0 else quota_us / int(p.read_text())
    except (OSError, ValueError):
        return None
    return None


# cpufreq drivers whose cpuinfo_max_freq is the boost maximum; acpi-cpufreq reports the base clock
# when boost is on, so its figure is not an upper bound.
_BOOST_AWARE_DRIVERS = ("intel_pstate", "intel_cpufreq", "amd-pstate", "amd-pstate-epp", "cppc_cpufreq")


def read_sysfs_max_clock(root: Path = Path("/sys/devices/system/cpu")) -> tuple[float, str] | None:
    """(max GHz, cpufreq driver) from sysfs cpufreq; None where there is no cpufreq folder (most VMs)."""
    freq = root / "cpu0" / "cpufreq" / "cpuinfo_max_freq"
    try:
        khz = int(freq.read_text())
    except (OSError, ValueError):
        return None
    driver = "unknown"
    try:
        driver = (root / "cpu0" / "cpufreq" / "scaling_driver").read_text().strip()
    except OSError:
        pass
    return khz / 1e6, driver


def max_clock(info: CpuInfo, sysfs: tuple[float, str] | None) -> tuple[float, str]:
    """The highest clock a core can run at, and where it came from (an upper bound wherever possible)."""
    row = microarch(info)
    if sysfs is not None and sysfs[1] in _BOOST_AWARE_DRIVERS:
        return sysfs[0], f"sysfs cpuinfo_max_freq {sysfs[0]:.3f} GHz ({sysfs[1]})"
    seen = []
    if sysfs is not None:
        seen.append(f"sysfs cpuinfo_max_freq {sysfs[0]:.3f} GHz ({sysfs[1]}: may exclude boost)")
    if info.mhz:
        seen.append(f"/proc/cpuinfo 'cpu MHz' {info.mhz:.0f} (current or nominal clock)")
    shown = max([sysfs[0] if sysfs else 0.0, (info.mhz or 0.0) / 1e3])
    if row is not None:
        bound, where = row.max_boost_ghz, f"highest boost of any {row.name} part ({row.clock_source})"
    else:
        bound = FALLBACK_CLOCK_GHZ.get(info.arch, 6.2)
        where = FALLBACK_CLOCK_SOURCE.get(info.arch, FALLBACK_CLOCK_SOURCE["x86_64"])
    if shown > bound:
        return shown, "; ".join(seen)
    note = f" (this machine shows only {'; '.join(seen)})" if seen else ""
    return bound, where + note


class IsaPeak(BaseModel):
    """Theoretical peak of the CPU cores this process may use, at one compute dtype."""

    model_config = ConfigDict(frozen=True)

    dtype: str
    flops_per_s: float
    cores: int
    flops_per_cycle: int
    clock_ghz: float
    cpu: str
    source: str


def isa_peak(info: CpuInfo, dtype: str, affinity: set[int] | None = None, quota_cpus: float | None = None,
             sysfs: tuple[float, str] | None = None) -> IsaPeak:
    """cores × FLOPs/cycle × clock: the physical limit of what a CPU engine can reach at `dtype`."""
    cores, cores_why = usable_cores(info, affinity, quota_cpus)
    fpc, fpc_why = dtype_flops_per_cycle(info, dtype)
    ghz, clock_why = max_clock(info, sysfs)
    flops = cores * fpc * ghz * _G
    source = (f"ISA peak of {info.model_name} (family {info.family} model {info.model}): {cores} cores x "
              f"{fpc} {dtype} FLOPs/cycle x {ghz:.2f} GHz = {flops / _G:.1f} GFLOP/s. Cores: {cores_why}. "
              f"FLOPs/cycle: {fpc_why}. Clock: {clock_why}")
    return IsaPeak(dtype=dtype, flops_per_s=flops, cores=cores, flops_per_cycle=fpc, clock_ghz=ghz,
                   cpu=info.model_name, source=source)


def read_machine(
    root: Path = Path("/"), arch: str | None = None, affinity: set[int] | None = None,
) -> tuple[CpuInfo, set[int] | None, float | None, tuple[float, str] | None]:
    """(cpuinfo, affinity, cgroup quota, sysfs clock) of the machine under `root` (a fixture folder in tests)."""
    info = parse_cpuinfo((root / "proc" / "cpuinfo").read_text(), arch)
    if affinity is None and root == Path("/") and hasattr(os, "sched_getaffinity"):
        affinity = set(os.sched_getaffinity(0))
    quota = read_cgroup_quota(root / "sys" / "fs" / "cgroup")
    sysfs = read_sysfs_max_clock(root / "sys" / "devices" / "system" / "cpu")
    return info, affinity, quota, sysfs


def machine_isa_peak(dtype: str, root: Path = Path("/")) -> IsaPeak:
    """ISA peak of this machine (or of the fixture tree under `root`) at compute `dtype`."""
    info, affinity, quota, sysfs = read_machine(root)
    return isa_peak(info, dtype, affinity, quota, sysfs)


def machine_key(root: Path = Path("/")) -> str:
    """A file-name-safe key for this machine's calibration cache: CPU model, family/model, usable cores."""
    info, affinity, quota, _ = read_machine(root)
    cores, _ = usable_cores(info, affinity, quota)
    name = re.sub(r"[^a-z0-9]+", "-", info.model_name.lower()).strip("-") or "cpu"
    return f"{name}-f{info.family}m{info.model}-{cores}c"


# ------------------------------------------------------------------------------ last-level cache
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _cache_size_bytes(text: str) -> int | None:
    """sysfs cache `size` text ("32768K", "1M", "512") in bytes; None when unreadable."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.I)
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()] if m else None


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu"),
                           cpus: set[int] | None = None) -> int | None:
    """Bytes of last-level cache the CPUs `cpus` can hold data in: the highest-level data/unified cache
    of sysfs `cpuN/cache/index*` (level 3 on most x86 servers), each instance counted once (CPUs listed
    in one `shared_cpu_list` share it; an EPYC has one per CCD).  `cpus` default: this process's
    affinity on the real sysfs, every `cpuN` folder under a fixture `root`.  None where unknown."""
    if cpus is None:
        if root == Path("/sys/devices/system/cpu") and hasattr(os, "sched_getaffinity"):
            cpus = set(os.sched_getaffinity(0))
        else:
            cpus = {int(p.name[3:]) for p in root.glob("cpu[0-9]*") if p.name[3:].isdigit()}
    found: dict[tuple[int, str], int] = {}  # (level, sharing CPUs) → bytes
    for cpu in sorted(cpus):
        for index in (root / f"cpu{cpu}" / "cache").glob("index[0-9]*"):
            try:
                level = int((index / "level").read_text())
                if (index / "type").read_text().strip() == "Instruction":
                    continue
                size = _cache_size_bytes((index / "size").read_text())
            except (OSError, ValueError):
                continue
            try:
                shared = (index / "shared_cpu_list").read_text().strip()
            except OSError:
                shared = f"cpu{cpu}"  # sharing unknown: one instance per CPU
            if size:
                found[(level, shared)] = size
    if not found:
        return None
    top = max(level for level, _ in found)
    return sum(size for (level, _), size in found.items() if level == top)


def weights_fit_in_cache(weight_bytes: float, cache_bytes: int | None) -> bool:
    """True when a model's weights (bytes) fit in the last-level cache (`last_level_cache_bytes`): then
    what a decode step streams can stay in cache, its bytes are not DRAM traffic, and MBU against the
    DRAM bandwidth overstates the memory system's load.  False where the cache size is unknown."""
    return cache_bytes is not None and cache_bytes > 0 and 0 < weight_bytes <= cache_bytes
