"""Iteration traces: JSONL of `IterationRecord`s, optionally led by a header, and their replay.

A header line `{"header": {...}}` carries the model config and peak so that a trace replays
on its own; a malformed line is reported with its line number and skipped, never silently.  Lines
`{"requests": {...}}` are finished requests' costs (`FinishedRequests`, DESIGN §12); replay skips them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any, Iterator

import msgspec
from pydantic import BaseModel, Field, ValidationError

from serving_mfu.cost.records import IterationRecord, decode_record, encode_record
from serving_mfu.derived import load_spec
from serving_mfu.files import open_own_for_writing
from serving_mfu.model.spec import ModelSpec
from serving_mfu.peaks.spec import PeakSpec
from serving_mfu.runtime.tracker import MFUTracker
from serving_mfu.schema.report import MFUReport
from serving_mfu.schema.requests import FinishedRequests

TRACE_FORMAT = "serving-mfu-trace/1"
REQUEST_LINE = '{"requests":'  # how a line of finished requests starts


class TraceHeader(BaseModel):
    """What a trace needs to replay by itself: the model's HF config and the hardware."""

    format: str = TRACE_FORMAT
    hf_config: dict[str, Any] | None = None
    peak: PeakSpec | None = None
    devices: int = Field(default=1, ge=1)
    kv_cache_dtype: str | None = None


class TraceLineError(BaseModel):
    """A trace line that could not be read, with its 1-based line number."""

    line: int
    error: str


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors()[:3])
    return str(exc)


def read_trace(path: str | Path) -> tuple[TraceHeader | None, Iterator[tuple[int, IterationRecord | TraceLineError]]]:
    """Open a trace: its header (if the first line is one) and an iterator over its records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace not found: {path}")
    header: TraceHeader | None = None
    with path.open() as fh:
        first = fh.readline()
    try:
        obj = json.loads(first) if first.strip() else None
        if isinstance(obj, dict) and "header" in obj:
            header = TraceHeader.model_validate(obj["header"])
    except (json.JSONDecodeError, ValidationError):
        header = None

    def records() -> Iterator[tuple[int, IterationRecord | TraceLineError]]:
        with path.open() as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip() or (lineno == 1 and header is not None) or line.startswith(REQUEST_LINE):
                    continue
                try:
                    yield lineno, decode_record(line)
                except (ValidationError, ValueError) as exc:
                    yield lineno, TraceLineError(line=lineno, error=_short(exc))

    return header, records()


class TraceWriter:
    """Appends records to a JSONL trace, writing the header first."""

    def __init__(self, path: str | Path, header: TraceHeader | None = None):
        # line-buffered: an engine killed at shutdown still leaves every finished line on disk
        # never through a link planted at the path, never into another user's file (DESIGN §10)
        self._fh: IO[str] = open_own_for_writing(Path(path), buffering=1)
        if header is not None:
            self._fh.write(json.dumps({"header": header.model_dump(mode="json")}) + "\n")

    def write(self, record: IterationRecord) -> None:
        self._fh.write(encode_record(record).decode() + "\n")

    def write_requests(self, batch: FinishedRequests) -> None:
        """Requests that finished together (DESIGN §12), one `{"requests": {...}}` line (replay skips it)."""
        self._fh.write(f"{REQUEST_LINE}{msgspec.json.encode(batch).decode()}}}\n")

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replay(
    path: str | Path,
    spec: ModelSpec | None = None,
    peak: PeakSpec | None = None,
    devices: int | None = None,
    time_split: str = "shapley",
    window_s: float | None = None,
    on_error: Any = None,
) -> tuple[MFUReport, list[TraceLineError]]:
    """Replay a trace through a fresh tracker; returns the report and the lines that were skipped.

    `spec`, `peak` and `devices` override the header's; `on_error(TraceLineError)` is called for
    each bad line as it is met.
    """
    header, records = read_trace(path)
    if spec is None:
        if header is None or header.hf_config is None:
            raise ValueError(f"{path}: the trace has no header with the model config; pass one (--config)")
        spec = load_spec(header.hf_config)
    peak = peak or (header.peak if header else None)
    devices = devices or (header.devices if header else 1)
    tracker = MFUTracker(spec, peak, devices, kv_cache_dtype=header.kv_cache_dtype if header else None,
                         time_split=time_split, clock=None, max_window_s=max(3600.0, window_s or 0))
    errors: list[TraceLineError] = []
    for _, item in records:
        if isinstance(item, TraceLineError):
            errors.append(item)
            tracker.note_anomaly("malformed_trace_lines", f"line {item.line}: {item.error}")
            if on_error:
                on_error(item)
            continue
        tracker.record(item)
    return tracker.report(window_s), errors
