"""serving-mfu: Model FLOPs Utilization of LLM inference serving, separately for prefill and decode.

Layers, each importing only those below it (README, "Architecture"):
  model/    a model's shape from its config         cost/   FLOPs, bytes, classification, time split
  peaks/    datasheet table, ISA peak, calibration   runtime/ records, counters, tracker, snapshots, report
  serve/    HTTP API, Prometheus, monitor, formats   tools/  CLI, demo, benches, analysis (never imported here)
  files.py  (beneath them all) private folders, exclusive temporaries, no links followed (DESIGN §10)
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
