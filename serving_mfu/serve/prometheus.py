"""Prometheus exposition: `serving_mfu_*` series read from the engines' snapshots at scrape time.

Every engine is one series (labels `engine`, `model`, `kv_role` = producer|consumer|both|none;
`phase` = prefill|decode where the figure is per phase).  Everything is a cumulative counter, denominators included: the
`*_capacity_*` counters are seconds × peak × devices of the engine that spent them, so a
utilization is a ratio of rates that stays right summed over data-parallel engines and
nodes.  Per phase (drop `phase` from `by` for both phases over busy time, with the
`serving_mfu_busy_capacity_*` denominators):

  MFU = sum by (model, phase) (rate(serving_mfu_useful_flops_total[1m]))
      / sum by (model, phase) (rate(serving_mfu_capacity_flops_total[1m]))
  HFU = same with serving_mfu_executed_flops_total
  MBU = sum by (model, phase) (rate(serving_mfu_moved_bytes_total[1m]))
      / sum by (model, phase) (rate(serving_mfu_capacity_bytes_total[1m]))
  wall MFU = sum by (model) (rate(serving_mfu_useful_flops_total[1m]))
           / sum by (model) (serving_mfu_peak_flops_per_second * serving_mfu_devices)

Wall MFU divides by the clock (idle included, 0 when idle), like the live window of
`/metrics/mfu`.  `serving_mfu_wall_capacity_flops_total` is the cumulative form (it accrues
at iteration ends, so trailing idle time counts only once the next iteration ends).  An
engine without a peak adds FLOPs but no capacity: watch `serving_mfu_anomalies_total`.
`serving_mfu_peak_credible` is 0 for an engine whose executed work exceeded its peak (HFU > 1,
serving_mfu.runtime.verdict): its MFU is not trustworthy; `serving_mfu:peak_credible:min` (by model)
is the one to alert on.

deploy/prometheus/serving_mfu_rules.yml records these as `serving_mfu:<figure>:ratio_rate1m`
(by model[, phase]), `serving_mfu_instance:…` (by instance too), `serving_mfu_role:…` (by KV role:
a disaggregated cluster's prefill pool and decode pool apart, e.g. `serving_mfu_role:mfu:ratio_rate1m
{kv_role="producer", phase="prefill"}`; `serving_mfu_role:kv_received_flops_per_second:rate1m` is the
work that KV loaded through connectors saved) and `serving_mfu_fleet:…` (all models together);
deploy/grafana/serving_mfu_dashboard.json plots them.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from typing import Any, Iterable, Iterator, Protocol

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from serving_mfu.runtime.counters import Counters
from serving_mfu.runtime.transport import EngineSnapshot
from serving_mfu.runtime.verdict import peak_verdict

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode")
BASE_LABELS = ("engine", "model", "kv_role")
PEAK_LABELS = BASE_LABELS + ("device", "dtype", "source")
SOURCE_MAX_CHARS = 64
# Exposed at 0 until they happen, so that increase() sees the first one.
KNOWN_ANOMALIES = ("accounting_error", "hook_errors", "missing_peak", "moe_routing_shape_mismatch")

# Counter families (name without `_total`, help, Counters field — or one field per phase).
PHASE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("serving_mfu_useful_flops", "FLOPs of work the users kept (first-time prompt positions, accepted "
     "decode positions)", "{phase}_useful_flops"),
    ("serving_mfu_executed_flops", "FLOPs the hardware executed (useful + recompute, rejected, discarded, "
     "drafter)", "{phase}_executed_flops"),
    ("serving_mfu_moved_bytes", "Bytes moved to and from device memory (weights, KV reads and writes)",
     "{phase}_bytes"),
    ("serving_mfu_tokens", "Useful positions: first-time prompt positions (prefill), kept positions (decode)",
     "{phase}_tokens"),
    ("serving_mfu_attributed_seconds", "Busy seconds attributed to the phase (mixed iterations split by "
     "the time-split model)", "{phase}_time_s"),
    ("serving_mfu_capacity_flops", "Peak FLOPs over the phase's seconds: seconds x peak FLOP/s x devices "
     "(MFU/HFU denominator)", "{phase}_capacity_flops"),
    ("serving_mfu_capacity_bytes", "Peak bytes over the phase's seconds: seconds x bandwidth x devices "
     "(MBU denominator)", "{phase}_capacity_bytes"),
)
ENGINE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("serving_mfu_busy_seconds", "Busy seconds (iteration time, idle excluded)", "busy_s"),
    ("serving_mfu_wall_seconds", "Wall seconds between iteration ends (idle included)", "wall_s"),
    ("serving_mfu_mixed_busy_seconds", "Busy seconds of mixed prefill+decode iterations (modelled split)",
     "mixed_busy_s"),
    ("serving_mfu_busy_capacity_flops", "Peak FLOPs over busy seconds (overall MFU/HFU denominator)",
     "busy_capacity_flops"),
    ("serving_mfu_wall_capacity_flops", "Peak FLOPs over wall seconds, accrued at iteration ends",
     "wall_capacity_flops"),
    ("serving_mfu_busy_capacity_bytes", "Peak bytes over busy seconds (overall MBU denominator)",
     "busy_capacity_bytes"),
    ("serving_mfu_iterations", "Engine iterations accounted", "iterations"),
    ("serving_mfu_mixed_iterations", "Iterations that mixed prefill and decode", "mixed_iterations"),
    ("serving_mfu_spec_draft_tokens", "Speculative draft tokens verified", "draft_tokens"),
    ("serving_mfu_spec_accepted_tokens", "Speculative draft tokens accepted", "accepted_tokens"),
    ("serving_mfu_spec_rejected_tokens", "Speculative positions rejected (KV rolled back)", "rejected_tokens"),
    ("serving_mfu_spec_rejected_flops", "FLOPs of rejected speculative positions", "rejected_flops"),
    ("serving_mfu_spec_drafter_flops", "FLOPs of the speculative drafter", "drafter_flops"),
    ("serving_mfu_discarded_tokens", "Kept decode positions never delivered (stop or max_tokens inside a "
     "verify step)", "discarded_tokens"),
    ("serving_mfu_discarded_flops", "FLOPs of discarded decode positions", "discarded_flops"),
    ("serving_mfu_prefix_cache_hit_tokens", "Prompt positions served by the prefix cache", "hit_tokens"),
    ("serving_mfu_prefix_cache_saved_flops", "FLOPs the prefix-cache hits would have cost", "saved_flops"),
    ("serving_mfu_kv_received_tokens", "Prompt positions whose KV a KV connector loaded (not computed here, not "
     "local prefix-cache hits)", "kv_received_tokens"),
    ("serving_mfu_kv_received_flops", "FLOPs the positions loaded through a KV connector would have cost",
     "kv_received_flops"),
    ("serving_mfu_kv_received_bytes", "KV bytes loaded through a KV connector (all layers)", "kv_received_bytes"),
    ("serving_mfu_kv_sent_tokens", "Positions whose KV a KV connector stored or sent for other engines",
     "kv_sent_tokens"),
    ("serving_mfu_kv_sent_bytes", "KV bytes stored or sent through a KV connector (all layers)", "kv_sent_bytes"),
    ("serving_mfu_lora_tokens", "Useful positions of requests that ran a LoRA adapter", "lora_tokens"),
    ("serving_mfu_lora_useful_flops", "LoRA adapter FLOPs of useful positions (part of useful_flops)",
     "lora_useful_flops"),
    ("serving_mfu_lora_executed_flops", "LoRA adapter FLOPs the kernels ran at the padded rank (part of "
     "executed_flops)", "lora_executed_flops"),
    ("serving_mfu_recompute_tokens", "Positions recomputed after preemption", "recompute_tokens"),
    ("serving_mfu_recompute_flops", "FLOPs of recomputation after preemption", "recompute_flops"),
    ("serving_mfu_hfu_over_1_iterations", "Iterations with HFU > 1 (FLOP model, peak or clock is off)",
     "hfu_over_1_iterations"),
    ("serving_mfu_repaired_iterations", "Mixed iterations whose split moved time to keep a phase at HFU <= 1",
     "repaired_iterations"),
    ("serving_mfu_repaired_seconds", "Seconds moved between phases by those repairs", "time_repaired_s"),
    ("serving_mfu_gpu_sampled_seconds", "Device-seconds over which NVML GPU-Util was sampled (summed over "
     "devices)", "gpu_sampled_s"),
    ("serving_mfu_gpu_util_seconds", "GPU-Util x sampled seconds: device-seconds with a kernel running; "
     "GPU-Util = rate(this) / rate(serving_mfu_gpu_sampled_seconds_total)", "gpu_util_s"),
    ("serving_mfu_gpu_sm_sampled_seconds", "Device-seconds over which SM activity (NVML GPM) was sampled",
     "gpu_sm_sampled_s"),
    ("serving_mfu_gpu_sm_active_seconds", "SM activity x sampled seconds; SM activity = rate(this) / "
     "rate(serving_mfu_gpu_sm_sampled_seconds_total)", "gpu_sm_active_s"),
    ("serving_mfu_gpu_sample_errors", "NVML reads of the GPU sampler that failed", "gpu_sample_errors"),
)
# Counters fields exposed some other way (summaries, the anomalies family).
OTHER_FIELDS = frozenset({"moe_iterations", "moe_measured_iterations", "moe_imbalance_sum",
                          "moe_active_experts_sum", "anomalies"})


def counter_fields() -> set[str]:
    """Every Counters field this module exposes."""
    names = {f for _, _, f in ENGINE_COUNTERS} | set(OTHER_FIELDS)
    names |= {f.format(phase=p) for _, _, f in PHASE_COUNTERS for p in PHASES}
    return names


class SnapshotSource(Protocol):
    def snapshots(self) -> list[EngineSnapshot]: ...


def _unit(name: str) -> str:
    return next((u for u in ("seconds", "bytes") if name.endswith("_" + u)), "")


def source_label(source: str | None) -> str:
    """The peak's provenance, short: up to the first URL or ', ' / '; ' / ': ', at most 64 chars."""
    if not source:
        return "unknown"
    text = re.split(r"https?://|[,;:]\s", source, maxsplit=1)[0].strip() or source.strip()
    return text if len(text) <= SOURCE_MAX_CHARS else text[: SOURCE_MAX_CHARS - 1] + "…"


class MFUCollector:
    """Custom collector: reads `reader.snapshots()` on every scrape; never raises."""

    def __init__(self, reader: SnapshotSource):
        self.reader = reader
        self.errors = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ families
    @staticmethod
    def _families() -> dict[str, Metric]:
        fams: dict[str, Metric] = {}
        for name, doc, _ in PHASE_COUNTERS:
            fams[name] = CounterMetricFamily(name, doc, labels=BASE_LABELS + ("phase",), unit=_unit(name))
        for name, doc, _ in ENGINE_COUNTERS:
            fams[name] = CounterMetricFamily(name, doc, labels=BASE_LABELS, unit=_unit(name))
        fams["serving_mfu_anomalies"] = CounterMetricFamily(
            "serving_mfu_anomalies", "Anomalies by kind (accounting errors, missing peak, hook errors...)",
            labels=BASE_LABELS + ("kind",))
        fams["serving_mfu_moe_active_experts"] = SummaryMetricFamily(
            "serving_mfu_moe_active_experts", "Distinct experts hit per MoE layer per iteration (mean over "
            "layers); measured from routing or expected under uniform routing", labels=BASE_LABELS)
        fams["serving_mfu_moe_imbalance_ratio"] = SummaryMetricFamily(
            "serving_mfu_moe_imbalance_ratio", "Max/mean routed tokens per expert, mean over layers, per "
            "iteration with measured routing", labels=BASE_LABELS)
        fams["serving_mfu_peak_flops_per_second"] = GaugeMetricFamily(
            "serving_mfu_peak_flops_per_second", "Dense peak FLOP/s of one device at the compute dtype",
            labels=PEAK_LABELS)
        fams["serving_mfu_peak_bandwidth_bytes_per_second"] = GaugeMetricFamily(
            "serving_mfu_peak_bandwidth_bytes_per_second", "Peak memory bandwidth of one device",
            labels=PEAK_LABELS)
        fams["serving_mfu_peak_credible"] = GaugeMetricFamily(
            "serving_mfu_peak_credible", "1 while the engine's executed work stays within its peak; 0 when HFU > 1 "
            "(in a phase, overall, or in over 1% of iterations): the peak is not an upper bound and MFU is not "
            "trustworthy (/metrics/mfu peak.verdict and peak.fix say why and what to do)", labels=PEAK_LABELS)
        fams["serving_mfu_devices"] = GaugeMetricFamily(
            "serving_mfu_devices", "Devices the engine runs on (TP x PP)", labels=PEAK_LABELS)
        fams["serving_mfu_engine"] = InfoMetricFamily(
            "serving_mfu_engine", "The engine's model and accounting settings",
            labels=BASE_LABELS + ("model_type", "approximate", "time_split"))
        fams["serving_mfu_engine_start_time_seconds"] = GaugeMetricFamily(
            "serving_mfu_engine_start_time_seconds", "When the engine started (unix seconds)",
            labels=BASE_LABELS, unit="seconds")
        fams["serving_mfu_snapshot_timestamp_seconds"] = GaugeMetricFamily(
            "serving_mfu_snapshot_timestamp_seconds", "When the engine last published its counters "
            "(unix seconds)", labels=BASE_LABELS, unit="seconds")
        fams["serving_mfu_engines"] = GaugeMetricFamily(
            "serving_mfu_engines", "Engines read at this scrape")
        return fams

    def describe(self) -> Iterator[Metric]:
        """The families (no samples), so registering reads no snapshot."""
        yield from self._families().values()
        yield self._errors_family()

    def _errors_family(self) -> CounterMetricFamily:
        return CounterMetricFamily("serving_mfu_collector_errors",
                                   "Scrape-time errors of the serving-mfu collector (snapshots skipped)",
                                   value=self.errors)

    # ------------------------------------------------------------------ samples
    @staticmethod
    def _rows(snap: EngineSnapshot) -> list[tuple[str, tuple[str, ...], Any]]:
        """(family, label values, value) of one engine; raises on a malformed snapshot."""
        known = Counters.__dataclass_fields__
        c = Counters.from_dict({k: v for k, v in snap.counters.items() if k in known})
        base = (str(snap.engine_id), str(snap.model.name), str(snap.kv_role))
        rows: list[tuple[str, tuple[str, ...], Any]] = []
        for name, _, field in PHASE_COUNTERS:
            for phase in PHASES:
                rows.append((name, base + (phase,), float(getattr(c, field.format(phase=phase)))))
        for name, _, field in ENGINE_COUNTERS:
            rows.append((name, base, float(getattr(c, field))))
        for kind, n in sorted({**dict.fromkeys(KNOWN_ANOMALIES, 0), **c.anomalies}.items()):
            rows.append(("serving_mfu_anomalies", base + (str(kind),), float(n)))
        if c.moe_iterations:
            acc = c.moe_active_experts_sum
            per_layer = sum(acc) / len(acc) if acc else 0.0
            rows.append(("serving_mfu_moe_active_experts", base, (float(c.moe_iterations), float(per_layer))))
            rows.append(("serving_mfu_moe_imbalance_ratio", base,
                         (float(c.moe_measured_iterations), float(c.moe_imbalance_sum))))
        p = snap.peak
        peak_labels = base + (p.device or "unknown", p.dtype or "unknown", source_label(p.source))
        if p.flops_per_s:
            rows.append(("serving_mfu_peak_flops_per_second", peak_labels, float(p.flops_per_s)))
        if p.bandwidth_bytes_per_s:
            rows.append(("serving_mfu_peak_bandwidth_bytes_per_second", peak_labels,
                         float(p.bandwidth_bytes_per_s)))
        rows.append(("serving_mfu_devices", peak_labels, float(p.devices)))
        verdict = peak_verdict(c, p.flops_per_s, p.source, p.dtype)
        if verdict.credible is not None:
            rows.append(("serving_mfu_peak_credible", peak_labels, 1.0 if verdict.credible else 0.0))
        rows.append(("serving_mfu_engine", base, {
            "model_type": str(snap.model.model_type), "approximate": str(bool(snap.model.approximate)).lower(),
            "time_split": str(snap.time_split)}))
        rows.append(("serving_mfu_engine_start_time_seconds", base, float(snap.started_at)))
        rows.append(("serving_mfu_snapshot_timestamp_seconds", base, float(snap.updated_at)))
        return rows

    def _error(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            first = self.errors == 1
        if first:
            log.warning("serving-mfu: Prometheus collector: %s: %r (further errors are counted in "
                        "serving_mfu_collector_errors_total)", what, exc, exc_info=exc)
        else:
            log.debug("serving-mfu: Prometheus collector: %s: %r", what, exc)

    def collect(self) -> Iterable[Metric]:
        """Families with one sample per engine; a bad snapshot is skipped, a failing reader yields none."""
        try:
            fams = self._families()
        except Exception as exc:  # a bug here must not take /metrics down
            self._error("building families", exc)
            yield self._errors_family()
            return
        try:
            snaps = list(self.reader.snapshots())
        except Exception as exc:
            self._error("reading snapshots", exc)
            snaps = None
        seen: set[str] = set()
        for snap in snaps or ():
            try:
                if str(snap.engine_id) in seen:  # the same engine twice would be a duplicate series
                    continue
                rows = self._rows(snap)
                seen.add(str(snap.engine_id))
                for name, labels, value in rows:
                    fam = fams[name]
                    if isinstance(fam, SummaryMetricFamily):
                        fam.add_metric(list(labels), count_value=value[0], sum_value=value[1])
                    else:
                        fam.add_metric(list(labels), value)
            except Exception as exc:
                self._error(f"engine {getattr(snap, 'engine_id', '?')}", exc)
        if snaps is not None:
            fams["serving_mfu_engines"].add_metric([], len(seen))
        yield from fams.values()
        yield self._errors_family()


_registered: "weakref.WeakKeyDictionary[CollectorRegistry, MFUCollector]" = weakref.WeakKeyDictionary()
_register_lock = threading.Lock()


def register(reader: SnapshotSource, registry: CollectorRegistry = REGISTRY) -> MFUCollector:
    """Register an `MFUCollector` on `registry` once; later calls return the first collector."""
    with _register_lock:
        existing = _registered.get(registry)
        if existing is not None:
            return existing
        collector = MFUCollector(reader)
        registry.register(collector)
        _registered[registry] = collector
        return collector
