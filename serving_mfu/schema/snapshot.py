"""What an engine publishes (`EngineSnapshot`, msgspec) and what readers serve of all engines (`Totals`).

A snapshot is one JSON file per engine: its identity, model, peak and cumulative `Counters` (typed
from the counter table, serving_mfu.cost.counters), one cumulative point a second of recent history,
and its last iterations' costs.  `decode_snapshot` checks a file against this type; a file of another
format version, or one that does not match, is a ValueError that names the problem.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from pydantic import BaseModel, Field, PlainSerializer, PlainValidator, WithJsonSchema

from serving_mfu.cost.counters import Counters
from serving_mfu.schema.report import GpuUtilStatus, ModelReport, PeakReport, build_report
from serving_mfu.schema.requests import TenantTotals

SNAPSHOT_FORMAT = "serving-mfu-snapshot/3"  # /2: counters typed from the table; /3: tenants

_PYDANTIC = (ModelReport, PeakReport, GpuUtilStatus)  # shared with the report: decoded by pydantic


class EngineSnapshot(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One engine's published state (the file's content)."""

    format: str = SNAPSHOT_FORMAT
    engine_id: str
    pid: int
    ppid: int
    started_at: float  # wall-clock seconds
    updated_at: float  # wall-clock seconds
    #: Wall-clock seconds: every step the engine finished before then is in these counters.
    as_of: float | None = None
    model: ModelReport
    peak: PeakReport
    time_split: str
    kv_role: str = "none"  # the engine's KV-connector role: producer, consumer, both or none
    kv_connector: str | None = None  # the KV connector's class name (None: none)
    counters: Counters
    history: list[tuple[float, Counters]] = msgspec.field(default_factory=list)  # (wall time, cumulative)
    recent: list[dict[str, Any]] = msgspec.field(default_factory=list)  # the last iterations' costs
    gpu: GpuUtilStatus | None = None  # the engine's GPU sampler (its sums are in the counters: gpu_*)
    tenants: list[TenantTotals] = msgspec.field(default_factory=list)  # each tenant label's sums (DESIGN §12)

    def peak_total_flops(self) -> float:
        return (self.peak.flops_per_s or 0.0) * self.peak.devices


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind in _PYDANTIC:
        return kind.model_validate(obj)
    raise NotImplementedError(f"cannot decode {kind}")


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_decoder = msgspec.json.Decoder(EngineSnapshot, dec_hook=_dec_hook)
_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def decode_snapshot(data: bytes | str) -> EngineSnapshot:
    """A snapshot file's content → EngineSnapshot; ValueError (another format, or a field that does not
    match its type) says what is wrong."""
    try:
        snap = _decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        fmt = _format_of(data)
        if fmt is not None and fmt != SNAPSHOT_FORMAT:
            raise ValueError(f"snapshot format {fmt!r}, this reader reads {SNAPSHOT_FORMAT!r}") from None
        raise ValueError(f"not a serving-mfu snapshot: {exc}") from None
    if snap.format != SNAPSHOT_FORMAT:
        raise ValueError(f"snapshot format {snap.format!r}, this reader reads {SNAPSHOT_FORMAT!r}")
    return snap


def _format_of(data: bytes | str) -> str | None:
    try:
        return msgspec.json.decode(data, type=dict).get("format")
    except (msgspec.DecodeError, msgspec.ValidationError, AttributeError):
        return None


def encode_snapshot(snap: EngineSnapshot) -> bytes:
    """The snapshot as JSON; pieces already serialized (`msgspec.Raw`) go in as they are."""
    return _encoder.encode(snap)


def _to_counters(value: Any) -> Counters:
    return value if isinstance(value, Counters) else Counters.from_dict(value)


#: Counters as a pydantic field: validated by msgspec, served as its JSON, with msgspec's JSON schema.
CountersField = Annotated[
    Counters, PlainValidator(_to_counters), PlainSerializer(msgspec.to_builtins, return_type=dict),
    WithJsonSchema(msgspec.json.schema_components([Counters], ref_template="{name}")[1]["Counters"]),
]


class Totals(BaseModel):
    """Cumulative counters over all engines at one moment: subtract two to report any interval."""

    at: float = Field(description="wall-clock seconds when read")
    updated_at: float = Field(description="oldest engine snapshot time among those added up")
    as_of: float | None = Field(default=None, description="wall-clock seconds: every step any engine finished "
                                "before then is counted (the oldest engine's); null from servers that predate it")
    age_s: float | None = Field(default=None, description="at − as_of: how old the newest complete data is")
    engines: int
    counters: CountersField
    peak: PeakReport
    model: ModelReport
    time_split: str
    gpu: GpuUtilStatus | None = Field(default=None, description="the engines' GPU sampling (null: not reported)")
    kv_roles: list[str] = Field(default_factory=list, description="the engines' KV-connector roles")

    def report_since(self, earlier: "Totals") -> Any:
        """The report of what happened between `earlier` and this reading (e.g. one benchmark run)."""
        span = max(self.updated_at - earlier.updated_at, 0.0)
        cap = (self.peak.flops_per_s or 0.0) * self.peak.devices * span
        return build_report(self.counters - earlier.counters, self.peak, self.model, self.time_split,
                            window_s=span, wall_s=span, wall_capacity_flops=cap, gpu=self.gpu,
                            kv_roles=self.kv_roles)
