"""Data loading and figures for `notebooks/mfu_analysis.ipynb` (one function per figure).

Inputs are what `serving-mfu demo` (`make demo`) writes, or any load-generator output:

- a demo folder: `results.json` (all scenarios), `sweep/summary.json` + `sweep/point-*.json`,
  `trace.jsonl` (one `IterationRecord` per engine step, led by a header with the model config
  and peak), `peak.json`;
- a single load-generator results file (`mfu-loadgen ... --out run.json`);
- a sweep folder (`summary.json` and its point files).

Per-iteration figures (utilization over time, roofline, per-iteration acceptance) replay the
trace through `MFUTracker`, the same accounting the engine hook runs, so every point is the
cost of one engine step: useful and executed FLOPs and bytes per phase, the phase's share of
the step's busy time, rejected drafts, drafter, recompute and prefix-cache savings.

Every `plot_*` function returns a `matplotlib.figure.Figure` and never calls `plt.show()`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from serving_mfu.files import write_figure
from serving_mfu.format import pct as _pct
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.spec import PeakSpec
from serving_mfu.runtime.trace import TraceLineError, read_trace
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.tools.compare import ESTIMATORS, point_label

PHASES = ("prefill", "decode")
PHASE_COLORS = {"prefill": "tab:blue", "decode": "tab:orange"}
KIND_COLORS = {"prefill": "tab:blue", "decode": "tab:orange", "mixed": "tab:green"}


class MissingResults(FileNotFoundError):
    """The results folder or file does not exist (run `make demo` first)."""


# ----------------------------------------------------------------------------- loading
@dataclass
class Run:
    """One load-generator run: its name, the scenario that produced it (if any), its RunResult JSON."""

    name: str
    result: dict[str, Any]
    scenario: dict[str, Any] | None = None

    @property
    def mfu(self) -> dict[str, Any]:
        return self.result.get("mfu") or {}


@dataclass
class Sweep:
    """A load sweep: mode (`concurrency` or `rate`) and its points, each with its full RunResult."""

    mode: str
    points: list[dict[str, Any]]
    runs: list[Run]

    @property
    def loads(self) -> list[float]:
        return [float(p["load"]) for p in self.points]


@dataclass
class Results:
    """Everything the notebook reads, found from one path."""

    source: Path
    runs: list[Run] = field(default_factory=list)
    sweep: Sweep | None = None
    trace_path: Path | None = None
    peak: dict[str, Any] | None = None
    model: str | None = None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _load_sweep(folder: Path) -> Sweep:
    summary = _read_json(folder / "summary.json")
    points = sorted(summary["points"], key=lambda p: float(p["load"]))
    runs = []
    for p in points:
        f = folder / p["file"]
        runs.append(Run(name=f"{summary['mode']} {float(p['load']):g}", result=_read_json(f) if f.is_file() else {}))
    return Sweep(mode=summary["mode"], points=points, runs=runs)


def load_results(path: str | Path, trace: str | Path | None = None) -> Results:
    """Load a demo folder, a sweep folder, or one loadgen results file (and the iteration trace).

    `trace` defaults to `trace.jsonl` in the folder (or beside the file) when it exists.
    Raises `MissingResults` (saying how to make them) when `path` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise MissingResults(f"{path} does not exist: run `make demo` (or `serving-mfu demo --out-dir {path}`) "
                             "to generate the sample, or point MFU_RESULTS_DIR at a results folder or file")
    folder = path if path.is_dir() else path.parent
    res = Results(source=path)
    if path.is_dir():
        if (path / "results.json").is_file():
            demo = _read_json(path / "results.json")
            res.model = demo.get("model")
            res.runs = [Run(name=s["scenario"]["name"], result=s["result"], scenario=s["scenario"])
                        for s in demo.get("scenarios", [])]
        if (path / "summary.json").is_file():
            res.sweep = _load_sweep(path)
        elif (path / "sweep" / "summary.json").is_file():
            res.sweep = _load_sweep(path / "sweep")
        if not res.runs and res.sweep is None:
            raise MissingResults(f"{path} holds neither results.json nor a sweep summary.json")
    else:
        obj = _read_json(path)
        if "scenarios" in obj:
            res.model = obj.get("model")
            res.runs = [Run(name=s["scenario"]["name"], result=s["result"], scenario=s["scenario"])
                        for s in obj["scenarios"]]
        elif "points" in obj and "mode" in obj:
            res.sweep = _load_sweep(path.parent)
        else:
            res.runs = [Run(name=path.stem, result=obj)]
    trace_path = Path(trace) if trace is not None else folder / "trace.jsonl"
    if trace is not None and not trace_path.is_file():
        raise MissingResults(f"trace {trace_path} does not exist")
    res.trace_path = trace_path if trace_path.is_file() else None
    if (folder / "peak.json").is_file():
        res.peak = _read_json(folder / "peak.json")
    else:
        for run in res.runs + (res.sweep.runs if res.sweep else []):
            if run.mfu.get("peak", {}).get("flops_per_s"):
                res.peak = run.mfu["peak"]
                break
    return res


# ----------------------------------------------------------------------------- iterations
@dataclass
class Iterations:
    """Per engine step costs from a replayed trace (numpy arrays, one entry per iteration)."""

    t_s: np.ndarray  # end of the step, seconds since the trace's first step was scheduled
    busy_s: np.ndarray
    kind: np.ndarray  # "prefill", "decode", "mixed" or "empty"
    useful: dict[str, np.ndarray]  # per phase
    executed: dict[str, np.ndarray]
    bytes: dict[str, np.ndarray]
    time_s: dict[str, np.ndarray]
    tokens: dict[str, np.ndarray]
    rejected_flops: np.ndarray
    drafter_flops: np.ndarray
    recompute_flops: np.ndarray
    discarded_flops: np.ndarray
    saved_flops: np.ndarray
    draft_tokens: np.ndarray
    accepted_tokens: np.ndarray
    engine_peak_flops_per_s: float  # total over the engine's devices
    peak_bandwidth: float | None
    peak_source: str | None
    model: str | None
    skipped_lines: int = 0

    def __len__(self) -> int:
        return len(self.t_s)

    @property
    def executed_total(self) -> np.ndarray:
        return self.executed["prefill"] + self.executed["decode"]

    @property
    def bytes_total(self) -> np.ndarray:
        return self.bytes["prefill"] + self.bytes["decode"]


def replay_iterations(trace_path: str | Path, peak: dict[str, Any] | None = None) -> Iterations:
    """Replay a trace through `MFUTracker` and keep every iteration's cost.

    The model comes from the trace header; the peak from the header, else `peak`
    (a `peak.json` / report `peak` dict).  Without either, a `ValueError`.
    """

    header, records = read_trace(trace_path)
    if header is None or header.hf_config is None:
        raise ValueError(f"{trace_path}: no header with the model config (write traces with SERVING_MFU_TRACE)")
    spec = ModelSpec.from_hf_config(header.hf_config)
    pk = header.peak
    if pk is None and peak and peak.get("flops_per_s"):
        pk = PeakSpec.model_validate({k: peak[k] for k in ("device", "dtype", "flops_per_s",
                                                            "bandwidth_bytes_per_s", "source") if k in peak})
    if pk is None:
        raise ValueError(f"{trace_path}: no peak in the header and none given: pass peak= (e.g. peak.json)")
    tracker = MFUTracker(spec, pk, header.devices, kv_cache_dtype=header.kv_cache_dtype, clock=None,
                         recent_iterations=1)
    rows = []
    t0 = None
    skipped = 0
    for _, rec in records:
        if isinstance(rec, TraceLineError):
            skipped += 1
            continue
        if t0 is None:
            t0 = rec.t_sched_s
        cost = tracker.record(rec)
        if cost is not None:
            rows.append(cost)
    n = len(rows)

    def arr(get) -> np.ndarray:
        return np.fromiter((get(c) for c in rows), dtype=float, count=n)

    kinds = np.array(["mixed" if c.mixed else "prefill" if c.prefill.tokens or c.recompute_tokens
                      else "decode" if c.decode.tokens or c.rejected_tokens or c.discarded_tokens else "empty"
                      for c in rows], dtype=object)
    return Iterations(
        t_s=arr(lambda c: c.t_end_s - (t0 or 0.0)), busy_s=arr(lambda c: c.busy_s), kind=kinds,
        useful={ph: arr(lambda c, ph=ph: getattr(c, ph).useful_flops) for ph in PHASES},
        executed={ph: arr(lambda c, ph=ph: getattr(c, ph).executed_flops) for ph in PHASES},
        bytes={ph: arr(lambda c, ph=ph: getattr(c, ph).bytes) for ph in PHASES},
        time_s={ph: arr(lambda c, ph=ph: getattr(c, ph).time_s) for ph in PHASES},
        tokens={ph: arr(lambda c, ph=ph: getattr(c, ph).tokens) for ph in PHASES},
        rejected_flops=arr(lambda c: c.rejected_flops), drafter_flops=arr(lambda c: c.drafter_flops),
        recompute_flops=arr(lambda c: c.recompute_flops), discarded_flops=arr(lambda c: c.discarded_flops),
        saved_flops=arr(lambda c: c.saved_flops), draft_tokens=arr(lambda c: c.draft_tokens),
        accepted_tokens=arr(lambda c: c.accepted_tokens),
        engine_peak_flops_per_s=pk.flops_per_s * header.devices,
        peak_bandwidth=pk.bandwidth_bytes_per_s * header.devices if pk.bandwidth_bytes_per_s else None,
        peak_source=pk.source, model=spec.name, skipped_lines=skipped,
    )


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(np.shape(num), np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def binned_utilization(it: Iterations, bin_s: float | None = None, bins: int = 60) -> dict[str, np.ndarray]:
    """Per time bin and phase: MFU, HFU, MBU over the time attributed to that phase in the bin.

    Keys: `t_s` (bin centres), `<phase>_<mfu|hfu|mbu>`; NaN where the phase had no time.
    """
    if len(it) == 0:
        raise ValueError("the trace has no iterations")
    span = float(it.t_s.max()) or 1.0
    bin_s = bin_s or span / bins
    idx = np.floor(it.t_s / bin_s).astype(int)
    nb = int(idx.max()) + 1
    out = {"t_s": (np.arange(nb) + 0.5) * bin_s}
    for ph in PHASES:
        t = np.bincount(idx, it.time_s[ph], nb)
        cap = t * it.engine_peak_flops_per_s
        out[f"{ph}_mfu"] = _ratio(np.bincount(idx, it.useful[ph], nb), cap)
        out[f"{ph}_hfu"] = _ratio(np.bincount(idx, it.executed[ph], nb), cap)
        if it.peak_bandwidth:
            out[f"{ph}_mbu"] = _ratio(np.bincount(idx, it.bytes[ph], nb), t * it.peak_bandwidth)
        else:
            out[f"{ph}_mbu"] = np.full(nb, np.nan)
    return out


# ----------------------------------------------------------------------------- tables
def runs_markdown(res: Results) -> str:
    """Per run: prefill / decode MFU, HFU, MBU, acceptance rate and busy time, as markdown."""
    lines = ["| run | prefill MFU | prefill HFU | prefill MBU | decode MFU | decode HFU | decode MBU | "
             "acceptance | busy s |", "|---|" + "---:|" * 8]
    for run in res.runs + (res.sweep.runs if res.sweep else []):
        m = run.mfu
        if not m:
            lines.append(f"| {run.name} | (no MFU section) |" + " |" * 7)
            continue
        p, d = m.get("prefill") or {}, m.get("decode") or {}
        acc = (m.get("spec_decode") or {}).get("acceptance_rate")
        busy = (m.get("overall") or {}).get("busy_s")
        busy_s = "—" if busy is None else f"{busy:.3f}"
        lines.append(f"| {run.name} | {_pct(p.get('mfu'))} | {_pct(p.get('hfu'))} | {_pct(p.get('mbu'))} | "
                     f"{_pct(d.get('mfu'))} | {_pct(d.get('hfu'))} | {_pct(d.get('mbu'))} | {_pct(acc)} | "
                     f"{busy_s} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "inline"):
        try:
            import IPython  # noqa: F401

            in_kernel = IPython.get_ipython() is not None
        except Exception:
            in_kernel = False
        if not in_kernel:
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="gray", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def series_utilization(res: Results) -> dict[str, np.ndarray]:
    """The runs' per-second series (`mfu.series`) back to back, in the shape of `binned_utilization`."""
    t0, cols = 0.0, {"t_s": []}
    for run in res.runs + (res.sweep.runs if res.sweep else []):
        series = run.mfu.get("series") or []
        for p in series:
            cols["t_s"].append(t0 + p["t_s"])
            for ph in PHASES:
                for m in ("mfu", "hfu", "mbu"):
                    v = p.get(f"{ph}_{m}")
                    cols.setdefault(f"{ph}_{m}", []).append(np.nan if v is None else v)
        if series:
            t0 += max(p["t_s"] for p in series) + 1.0
    if not cols["t_s"]:
        raise ValueError("no iteration trace and no per-second series in these results")
    return {k: np.asarray(v, dtype=float) for k, v in cols.items()}


def plot_utilization_over_time(it: Iterations | None, bin_s: float | None = None, bins: int = 60,
                               res: Results | None = None):
    """Prefill and decode MFU, HFU and MBU over time, from the replayed trace (one panel each).

    Each point is one time bin: the phase's useful (MFU) or executed (HFU) FLOPs, or its bytes
    (MBU), over the busy time attributed to that phase in the bin times the peak.  Gaps are bins
    where the phase did not run.  Without a trace (`it` None), the runs' per-second series
    from the server's reports (`res`) are drawn instead, runs back to back.
    """
    plt = _plt()
    if it is None:
        if res is None:
            raise ValueError("need the replayed trace or the results")
        b = series_utilization(res)
        title = "Prefill and decode utilization over time (per-second series from the run reports)"
    else:
        b = binned_utilization(it, bin_s, bins)
        width = float(b["t_s"][1] - b["t_s"][0]) if len(b["t_s"]) > 1 else float(2 * b["t_s"][0])
        title = f"Prefill and decode utilization over time ({len(it)} iterations, {width:.2g} s bins)"
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    for ax, metric, label in zip(axes, ("mfu", "hfu", "mbu"), ("MFU", "HFU", "MBU")):
        for ph in PHASES:
            y = 100 * b[f"{ph}_{metric}"]
            ax.plot(b["t_s"], y, marker="o", ms=3, lw=1.2, color=PHASE_COLORS[ph], label=ph)
        ax.set_ylabel(f"{label}, % of peak")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("seconds since the first iteration" if it is not None else "seconds (runs back to back)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_mfu_vs_load(res: Results):
    """MFU and HFU (left) and MBU (right) per phase against the sweep's load (concurrency or rate)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sw = res.sweep
    if sw is None or not sw.points:
        for ax in axes:
            _empty(ax, "no sweep in these results (mfu-loadgen sweep writes summary.json)")
        return fig
    x = np.array(sw.loads)
    for ph in PHASES:
        def col(key):
            return np.array([np.nan if p["utilization"].get(f"{ph}_{key}") is None
                             else 100 * p["utilization"][f"{ph}_{key}"] for p in sw.points])
        axes[0].plot(x, col("mfu"), "-o", color=PHASE_COLORS[ph], label=f"{ph} MFU")
        axes[0].plot(x, col("hfu"), "--", marker="x", color=PHASE_COLORS[ph], alpha=0.7, label=f"{ph} HFU")
        axes[1].plot(x, col("mbu"), "-o", color=PHASE_COLORS[ph], label=f"{ph} MBU")
    xlabel = "max concurrency (closed loop)" if sw.mode == "concurrency" else "request rate (req/s)"
    for ax, title in zip(axes, ("MFU / HFU", "MBU")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("% of peak")
        ax.set_title(f"{title} against load")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    tput = [p.get("output_throughput") for p in sw.points]
    if all(t is not None for t in tput):
        ax2 = axes[1].twinx()
        ax2.plot(x, tput, ":", color="gray", marker=".", label="output tokens/s")
        ax2.set_ylabel("output tokens/s", color="gray")
    fig.suptitle(f"Utilization against {sw.mode} ({len(sw.points)} sweep points)")
    fig.tight_layout()
    return fig


def plot_decode_mfu_vs_acceptance(res: Results, it: Iterations | None = None, bins: int = 5):
    """Decode MFU against speculative acceptance rate.

    Large labelled markers: whole runs (scenarios and sweep points; acceptance and decode MFU
    from the server's report).  Small dots: single iterations with drafts in the replayed
    trace (accepted / drafted in that step against that step's decode MFU); the line is their
    time-weighted mean per acceptance bin.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    if it is not None and len(it):
        has = (it.draft_tokens > 0) & (it.time_s["decode"] > 0)
        if has.any():
            acc = it.accepted_tokens[has] / it.draft_tokens[has]
            t_d = it.time_s["decode"][has]
            mfu = it.useful["decode"][has] / (t_d * it.engine_peak_flops_per_s)
            jitter = np.random.default_rng(0).uniform(-0.01, 0.01, acc.size)
            ax.scatter(100 * (acc + jitter), 100 * mfu, s=10, alpha=0.35, color="tab:gray",
                       label=f"iterations with drafts ({has.sum()})")
            edges = np.linspace(0, 1, bins + 1)
            which = np.clip(np.digitize(acc, edges) - 1, 0, bins - 1)
            num = np.bincount(which, it.useful["decode"][has], bins)
            den = np.bincount(which, t_d, bins) * it.engine_peak_flops_per_s
            mean = _ratio(num, den)
            at = _ratio(np.bincount(which, acc * t_d, bins), np.bincount(which, t_d, bins))  # bin's mean acceptance
            ok = ~np.isnan(mean)
            ax.plot(100 * at[ok], 100 * mean[ok], "-s", color="black", lw=1.5,
                    label=f"iterations, time-weighted mean per {100 / bins:.0f}-point bin")
    runs = res.runs + (res.sweep.runs if res.sweep else [])
    plotted = 0
    for i, run in enumerate(runs):
        sd = run.mfu.get("spec_decode") or {}
        acc, mfu = sd.get("acceptance_rate"), (run.mfu.get("decode") or {}).get("mfu")
        if acc is None or mfu is None:
            continue
        marker = "o" if run.scenario is not None else "D"
        ax.scatter([100 * acc], [100 * mfu], s=80, marker=marker, color=f"C{i % 10}", edgecolor="black",
                   zorder=3, label=f"run: {run.name}")
        plotted += 1
    if not plotted and not ax.collections:
        _empty(ax, "no speculative decoding in these results (no drafts)")
        return fig
    ax.set_xlabel("acceptance rate (accepted / drafted tokens), %")
    ax.set_ylabel("decode MFU, % of peak")
    ax.set_xlim(-5, 105)
    ax.set_title("Decode MFU against speculative acceptance rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


#: Executed-FLOP categories: (label, colour, useful?).
SHARE_CATEGORIES = (
    ("useful prefill", "tab:blue", True),
    ("useful decode", "tab:orange", True),
    ("rejected drafts", "tab:red", False),
    ("drafter", "tab:purple", False),
    ("recompute (preemption)", "tab:brown", False),
    ("discarded (past stop)", "tab:pink", False),
)


def flop_shares(res: Results, it: Iterations | None = None) -> list[tuple[str, dict[str, float], float]]:
    """Per run (and the whole trace): executed FLOPs by category, and prefix-cache saved FLOPs.

    From a run's report: recompute = prefill executed − useful; discarded = decode executed −
    useful − rejected − drafter.  Returns (name, {category: FLOPs}, saved FLOPs).
    """
    out = []
    for run in res.runs + (res.sweep.runs if res.sweep else []):
        m = run.mfu
        if not m:
            continue
        p, d = m["prefill"], m["decode"]
        sd = m.get("spec_decode") or {}
        rej, drafter = sd.get("rejected_flops", 0.0), sd.get("drafter_flops", 0.0)
        cats = {
            "useful prefill": p["useful_flops"], "useful decode": d["useful_flops"],
            "rejected drafts": rej, "drafter": drafter,
            "recompute (preemption)": max(p["executed_flops"] - p["useful_flops"], 0.0),
            "discarded (past stop)": max(d["executed_flops"] - d["useful_flops"] - rej - drafter, 0.0),
        }
        out.append((run.name, cats, (m.get("prefix_cache") or {}).get("saved_flops", 0.0)))
    if it is not None and len(it):
        cats = {
            "useful prefill": it.useful["prefill"].sum(), "useful decode": it.useful["decode"].sum(),
            "rejected drafts": it.rejected_flops.sum(), "drafter": it.drafter_flops.sum(),
            "recompute (preemption)": it.recompute_flops.sum(), "discarded (past stop)": it.discarded_flops.sum(),
        }
        out.append(("whole trace", {k: float(v) for k, v in cats.items()}, float(it.saved_flops.sum())))
    return out


def plot_wasted_saved(res: Results, it: Iterations | None = None):
    """Share of executed FLOPs that was useful or wasted (rejected drafts, drafter, recompute,
    discarded), per run and for the whole trace; and prefix-cache saved FLOPs as % of executed."""
    plt = _plt()
    rows = flop_shares(res, it)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 0.55 * max(len(rows), 3) + 1.8),
                                  gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    if not rows:
        _empty(ax, "no MFU sections and no trace")
        return fig
    names = [r[0] for r in rows]
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    executed = np.array([sum(r[1].values()) for r in rows])
    for label, color, useful in SHARE_CATEGORIES:
        share = 100 * _ratio(np.array([r[1][label] for r in rows]), executed)
        share = np.nan_to_num(share)
        ax.barh(y, share, left=left, color=color, label=label, hatch=None if useful else "//",
                edgecolor="white" if useful else "black", lw=0.3)
        left += share
    waste = 100 * np.nan_to_num(_ratio(np.array([sum(v for k, v in r[1].items() if not k.startswith("useful"))
                                                  for r in rows]), executed))
    for yi, w in zip(y, waste):
        ax.text(101, yi, f"{w:.1f}% wasted", va="center", fontsize=8)
    ax.set_xlim(0, 125)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("% of executed FLOPs")
    ax.set_title("Executed FLOPs: useful vs wasted")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / max(len(rows), 3)), ncol=3)
    saved = 100 * np.nan_to_num(_ratio(np.array([r[2] for r in rows]), executed))
    ax2.barh(y, saved, color="tab:green")
    for yi, s in zip(y, saved):
        ax2.text(s, yi, f" {s:.1f}%", va="center", fontsize=8)
    ax2.set_xlim(0, max(10.0, 1.3 * float(saved.max())))
    ax2.set_xlabel("% of executed FLOPs")
    ax2.set_title("Saved by the prefix cache")
    if not saved.any():
        ax2.text(0.5, 0.02, "no prefix-cache hits", transform=ax2.transAxes, ha="center", fontsize=8, color="gray")
    fig.suptitle("Where the executed FLOPs went")
    fig.tight_layout()
    return fig


WATERFALL = (("useful", "tab:green"), ("waste", "tab:red"), ("memory_bound", "tab:blue"),
             ("beyond_roofline", "tab:gray"))


def plot_waterfall(res: Results):
    """Where each run's prefill and decode time went (DESIGN §11): useful (= MFU), waste (= HFU − MFU),
    memory-bound and beyond the roofline, stacked to 100% of the phase's time; runs without a waterfall
    (no peak or bandwidth) are left out."""
    plt = _plt()
    rows = [(f"{run.name} · {phase}", ((run.result.get("mfu") or {}).get(phase) or {}).get("waterfall"))
            for run in res.runs for phase in ("prefill", "decode")]
    rows = [(name, w) for name, w in rows if w]
    fig, ax = plt.subplots(figsize=(11, 0.45 * max(len(rows), 3) + 1.6))
    if not rows:
        _empty(ax, "no waterfall in these results (they need a peak and a bandwidth)")
        return fig
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for part, color in WATERFALL:
        share = np.array([100 * (w.get(part) or 0.0) for _, w in rows])
        ax.barh(y, share, left=left, color=color, label=part.replace("_", " "), edgecolor="white")
        for yi, x0, v in zip(y, left, share):
            if v >= 6:
                ax.text(x0 + v / 2, yi, f"{v:.0f}%", ha="center", va="center", fontsize=7)
        left += share
    ax.set_yticks(y, [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_xlim(min(0.0, float(left.min())), max(100.0, float(left.max())))
    ax.set_xlabel("% of the phase's time")
    ax.set_title("Where each phase's time went")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    return fig


def plot_roofline(it: Iterations | None):
    """Roofline of iterations: arithmetic intensity (executed FLOPs / bytes moved) against
    achieved FLOP/s (executed FLOPs / busy time), under the compute and bandwidth ceilings."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    if it is None:
        _empty(ax, "no iteration trace: run the server with SERVING_MFU_TRACE=trace.jsonl")
        return fig
    ok = (it.busy_s > 0) & (it.bytes_total > 0) & (it.executed_total > 0)
    if not ok.any():
        _empty(ax, "no iterations with FLOPs, bytes and busy time")
        return fig
    ai = it.executed_total[ok] / it.bytes_total[ok]
    perf = it.executed_total[ok] / it.busy_s[ok]
    kinds = it.kind[ok]
    for k, color in KIND_COLORS.items():
        sel = kinds == k
        if sel.any():
            ax.scatter(ai[sel], perf[sel], s=14, alpha=0.6, color=color, label=f"{k} iterations ({sel.sum()})")
    peak, bw = it.engine_peak_flops_per_s, it.peak_bandwidth
    lo, hi = float(ai.min()) / 3, float(ai.max()) * 3
    if bw:
        ridge = peak / bw
        lo, hi = min(lo, ridge / 10), max(hi, ridge * 10)
        xs = np.geomspace(lo, hi, 200)
        ax.plot(xs, np.minimum(peak, xs * bw), "k-", lw=2, label="roofline")
        ax.axvline(ridge, color="k", ls=":", lw=0.8)
        ax.text(ridge, peak * 1.15, f" ridge {ridge:.3g} FLOP/B", fontsize=8)
        x_lab = lo * 3
        ax.annotate(f"{bw / 1e9:.3g} GB/s", (x_lab, x_lab * bw), xytext=(-4, 8), textcoords="offset points",
                    fontsize=8, ha="right")
    else:
        ax.axhline(peak, color="k", lw=2, label="compute peak (no bandwidth peak)")
    ax.text(hi / 1.2, peak * 1.15, f"{peak / 1e12:.3g} TFLOP/s", ha="right", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(min(float(perf.min()) / 3, peak / 1e4), peak * 2)
    ax.set_xlabel("arithmetic intensity, executed FLOPs / byte")
    ax.set_ylabel("achieved FLOP/s (executed / busy time)")
    ax.set_title("Roofline of engine iterations")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_estimator_errors(cmp: Any):
    """Relative error of 2N, s² attention and vLLM's estimator against ours, per model and point
    (`cmp` is a `serving_mfu.tools.compare.Comparison`)."""

    plt = _plt()
    points = [tuple(p) for p in cmp.points]
    models = list(dict.fromkeys(r.model for r in cmp.rows))
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 4.2), sharey=True, squeeze=False)
    width = 0.8 / len(ESTIMATORS)
    for ax, (q, c) in zip(axes[0], points):
        rows = {r.model: r for r in cmp.rows if (r.new_tokens, r.context_len) == (q, c)}
        for j, (key, label) in enumerate(ESTIMATORS.items()):
            errs = [rows[m].estimates[key].rel_error for m in models]
            vals = [np.nan if e is None else 100 * e for e in errs]
            ax.bar(np.arange(len(models)) + (j - (len(ESTIMATORS) - 1) / 2) * width, vals, width, label=label)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        ax.set_title(point_label(q, c))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("error against serving-mfu, %")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("FLOPs per token: other estimators against the exact causal count")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- docs figures
def write_readme_figures(results_dir: str | Path, out_dir: str | Path = "docs/figures",
                         names: Sequence[str] = ("roofline", "utilization_over_time")) -> list[Path]:
    """Render figures from a results folder to `out_dir/<name>.png` (the docs' figures)."""
    res = load_results(results_dir)
    it = replay_iterations(res.trace_path, res.peak) if res.trace_path else None
    makers = {
        "roofline": lambda: plot_roofline(it),
        "utilization_over_time": lambda: plot_utilization_over_time(it),
        "wasted_saved": lambda: plot_wasted_saved(res, it),
        "mfu_vs_load": lambda: plot_mfu_vs_load(res),
        "decode_mfu_vs_acceptance": lambda: plot_decode_mfu_vs_acceptance(res, it),
    }
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        fig = makers[name]()
        path = out / f"{name}.png"
        write_figure(fig, path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


if __name__ == "__main__":  # python -m serving_mfu.tools.analysis RESULTS_DIR [OUT_DIR]
    import sys

    args = sys.argv[1:] or ["demo-results"]
    for p in write_readme_figures(args[0], args[1] if len(args) > 1 else "docs/figures"):
        print(p)
