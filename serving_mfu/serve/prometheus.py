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
serving_mfu.schema.verdict): its MFU is not trustworthy; `serving_mfu:peak_credible:min` (by model)
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

from serving_mfu.cost.counters import PHASES, TYPES, CounterTypes
from serving_mfu.schema.requests import TENANT_COUNTERS, TENANT_FIELD_DOCS
from serving_mfu.schema.snapshot import EngineSnapshot
from serving_mfu.schema.verdict import peak_verdict

log = logging.getLogger(__name__)

BASE_LABELS = ("engine", "model", "kv_role")
PEAK_LABELS = BASE_LABELS + ("device", "dtype", "source")
SOURCE_MAX_CHARS = 64
# Exposed at 0 until they happen, so that increase() sees the first one.
KNOWN_ANOMALIES = ("accounting_error", "hook_errors", "missing_peak", "moe_routing_shape_mismatch")

# Counter families come from the table (serving_mfu.cost.counters.COUNTERS: each row with a `prom` name is
# one family, with a `phase` label when the row is phased); the MoE sums are summaries, anomalies a family.
STRUCTURED_FIELDS = frozenset({"moe_active_experts_sum", "anomalies"})
SUMMARY_FIELDS = frozenset({"moe_iterations", "moe_measured_iterations", "moe_imbalance_sum"})


def counter_fields(types: CounterTypes = TYPES) -> set[str]:
    """Every Counters field this module exposes (a table row with a Prometheus family, or a summary's)."""
    names = {n for r in types.rows if r.prom for n in r.names()}
    return names | SUMMARY_FIELDS | STRUCTURED_FIELDS


class SnapshotSource(Protocol):
    def refresh(self) -> list[EngineSnapshot]: ...


def _unit(name: str) -> str:
    return next((u for u in ("seconds", "bytes") if name.endswith("_" + u)), "")


def source_label(source: str | None) -> str:
    """The peak's provenance, short: up to the first URL or ', ' / '; ' / ': ', at most 64 chars."""
    if not source:
        return "unknown"
    text = re.split(r"https?://|[,;:]\s", source, maxsplit=1)[0].strip() or source.strip()
    return text if len(text) <= SOURCE_MAX_CHARS else text[: SOURCE_MAX_CHARS - 1] + "…"


class MFUCollector:
    """Custom collector: reads `reader.refresh()` on every scrape; never raises."""

    def __init__(self, reader: SnapshotSource, types: CounterTypes = TYPES):
        self.reader = reader
        self.types = types  # the counter table and the Counters type it makes
        self.errors = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ families
    def _families(self) -> dict[str, Metric]:
        fams: dict[str, Metric] = {}
        for row in self.types.rows:
            if row.prom:
                labels = BASE_LABELS + ("phase",) if row.phased else BASE_LABELS
                fams[row.prom] = CounterMetricFamily(row.prom, row.help, labels=labels, unit=_unit(row.prom))
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
        for name in TENANT_COUNTERS:  # per tenant label (DESIGN §12), accrued at every step
            prom = f"serving_mfu_tenant_{name}"
            fams[prom] = CounterMetricFamily(prom, TENANT_FIELD_DOCS[name], labels=BASE_LABELS + ("tenant",),
                                             unit=_unit(prom))
        return fams

    def family_labels(self) -> dict[str, tuple[str, ...]]:
        """Each family's label names, as the families declare them (the docs' series table reads these)."""
        fams = {**self._families(), "serving_mfu_collector_errors": self._errors_family()}
        return {name: tuple(getattr(fam, "_labelnames", ())) for name, fam in fams.items()}

    def describe(self) -> Iterator[Metric]:
        """The families (no samples), so registering reads no snapshot."""
        yield from self._families().values()
        yield self._errors_family()

    def _errors_family(self) -> CounterMetricFamily:
        return CounterMetricFamily("serving_mfu_collector_errors",
                                   "Scrape-time errors of the serving-mfu collector (snapshots skipped)",
                                   value=self.errors)

    # ------------------------------------------------------------------ samples
    def _rows(self, snap: EngineSnapshot) -> list[tuple[str, tuple[str, ...], Any]]:
        """(family, label values, value) of one engine; raises on a malformed snapshot."""
        c = snap.counters
        base = (str(snap.engine_id), str(snap.model.name), str(snap.kv_role))
        rows: list[tuple[str, tuple[str, ...], Any]] = []
        for row in self.types.rows:
            if not row.prom:
                continue
            if row.phased:
                for phase, name in zip(PHASES, row.names()):
                    rows.append((row.prom, base + (phase,), float(getattr(c, name))))
            else:
                rows.append((row.prom, base, float(getattr(c, row.name))))
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
        for t in snap.tenants:
            for name in TENANT_COUNTERS:
                rows.append((f"serving_mfu_tenant_{name}", base + (str(t.tenant),), float(getattr(t, name))))
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
            snaps = list(self.reader.refresh())
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
