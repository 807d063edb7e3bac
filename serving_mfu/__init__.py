"""serving-mfu: Model FLOPs Utilization of LLM inference serving, separately for prefill and decode.

Layers, each importing only those below it (docs/architecture.md; tests/test_layout.py enforces it):
  files.py  private folders, safe writes          format.py  figures as text (tools, loadgen)
  model/    a model's shape from its config       derived.py a model's FLOPs read off its modules (torch, lazily)
  cost/     counters, FLOPs, bytes, classes, time split
  peaks/    datasheet table, ISA peak, calibration
  schema/   the report, the verdict, the snapshot (what crosses a boundary)
  runtime/  settings, tracker, GPU sampler, traces; publish → collect → aggregate
  serve/    HTTP API, Prometheus, monitor
  tools/    CLI, demo, server launcher, benches, analysis (never imported here)
"""

from serving_mfu.cost.accounting import CostModel
from serving_mfu.cost.records import DecodeBatch, IterationRecord, PrefillBatch, Slice
from serving_mfu.model import ConfigError, ModelSpec
from serving_mfu.peaks.resolve import resolve_peak
from serving_mfu.peaks.spec import PeakSpec
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.schema.report import MFUReport

__all__ = ["ConfigError", "CostModel", "DecodeBatch", "IterationRecord", "MFUReport", "MFUTracker", "ModelSpec",
           "PeakSpec", "PrefillBatch", "Slice", "resolve_peak"]
