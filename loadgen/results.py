"""`RunResult`: the results JSON of one run (`--out`), with its latency and MFU sections."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loadgen.config import RunConfig
from loadgen.mfu import MFUPoint, RunMFU
from loadgen.records import RequestRecord
from serving_mfu.schema.report import (
    AnomalyReport,
    GpuUtilReport,
    ModelReport,
    MoEReport,
    OverallReport,
    PeakReport,
    PhaseReport,
    PrefixCacheReport,
    SpecDecodeReport,
)


class LatencyStats(BaseModel):
    """Distribution of one latency in seconds; None where there is no sample."""

    count: int = 0
    mean: float | None = None
    min: float | None = None
    max: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None


class MFUSection(BaseModel):
    """The server's /metrics/mfu report over exactly the run's window, and its per-second series."""

    window_s: float | None
    prefill: PhaseReport
    decode: PhaseReport
    overall: OverallReport
    spec_decode: SpecDecodeReport | None
    moe: MoEReport | None = None
    prefix_cache: PrefixCacheReport
    peak: PeakReport
    model: ModelReport
    anomalies: AnomalyReport
    series: list[MFUPoint]
    gpu_util: GpuUtilReport | None = Field(default=None, description="GPU-Util and SM activity over the run's "
                                           "window (NVML on the engines); available=false with the reason if not")

    @classmethod
    def from_run(cls, run: RunMFU) -> "MFUSection":
        r = run.report
        return cls(window_s=r.window_s, prefill=r.prefill, decode=r.decode, overall=r.overall,
                   spec_decode=r.spec_decode, moe=r.moe, prefix_cache=r.prefix_cache, peak=r.peak, model=r.model,
                   anomalies=r.anomalies, series=run.series, gpu_util=r.gpu_util)


class CostStats(LatencyStats):
    """Distribution of one per-request cost over the joined requests (numpy's linear percentiles), and its sum."""

    total: float = 0.0


class TenantCost(BaseModel):
    """One tenant's requests and what they cost: a run's joined requests, or `wrap`'s difference of the
    server's /metrics/mfu/tenants totals over the command."""

    tenant: str
    requests: int = Field(description="finished requests")
    useful_flops: float
    executed_flops: float
    device_seconds: float
    prompt_tokens: int
    output_tokens: int
    usd: float | None = Field(None, description="device_seconds / 3600 × the device-hour price")
    usd_per_1m_tokens: float | None = Field(None, description="usd / (prompt + output tokens) × 1e6")


class RequestCostSection(BaseModel):
    """What the run's completed requests cost on the server, joined to them by their X-Request-Id."""

    looked_up: int = Field(description="completed requests looked up")
    joined: int = Field(description="of those, requests the server had a record for")
    missing: int = Field(description="completed requests with no server record within cost_timeout_s")
    server_records: int = Field(description="server records joined (one per choice: n > 1 gives several)")
    useful_flops: CostStats
    executed_flops: CostStats
    prefill_device_seconds: CostStats
    decode_device_seconds: CostStats
    device_seconds: CostStats = Field(description="busy time × devices, shared among a step's requests by "
                                      "their roofline cost (DESIGN §12)")
    prompt_tokens: int = Field(description="Σ the joined records' prompt tokens (the whole prompt)")
    output_tokens: int = Field(description="Σ the joined records' output tokens")
    device_hour_price: float | None = Field(None, description="USD per device-hour (--device-hour-price)")
    usd_per_1m_input_tokens: float | None = Field(
        None, description="Σ prefill_device_seconds / 3600 × price / Σ prompt_tokens × 1e6")
    usd_per_1m_output_tokens: float | None = Field(
        None, description="Σ decode_device_seconds / 3600 × price / Σ output_tokens × 1e6")
    usd: float | None = Field(None, description="Σ device_seconds / 3600 × price")
    tenants: list[TenantCost] = Field(default_factory=list, description="the joined requests by tenant label")
    note: str | None = Field(None, description="the last unexpected answer to a lookup (a 5xx, a torn body)")


class Concurrency(BaseModel):
    """Requests in flight (sent, not finished) over the measured window."""

    max: int
    mean: float


class RunResult(BaseModel):
    """Everything one run measured; rates are per second of `duration_s`."""

    model_config = ConfigDict(ser_json_inf_nan="strings")

    config: RunConfig
    started_at: float = Field(description="wall-clock (Unix) seconds at the run's start")
    duration_s: float = Field(description="first scheduled issue → last request finished")
    completed: int
    failed: int
    warmup_requests: int
    prompt_source: str | None = Field(None, description="what the prompts were: token IDs (and whose), or text")
    prompt_len_mismatches: int | None = Field(None, description="completed requests whose server-reported "
                                              "prompt_tokens ≠ the requested input_len (null: lengths estimated)")
    errors: dict[str, int] = Field(description="failed requests by kind")
    ttft_s: LatencyStats
    tpot_s: LatencyStats
    itl_s: LatencyStats = Field(description="per streamed chunk (several tokens per chunk under spec decoding)")
    e2e_s: LatencyStats
    lateness_s: LatencyStats = Field(description="issued − scheduled: the generator's own delay (0 in a closed loop, "
                                     "which has no schedule)")
    queue_wait_s: LatencyStats = Field(description="time waiting for a max_concurrency slot")
    request_throughput: float = Field(description="completed requests/s")
    output_throughput: float = Field(description="completion tokens/s")
    input_throughput: float = Field(description="prompt tokens/s of completed requests")
    total_token_throughput: float
    requested_rate: float | None = Field(description="the arrival process's rate (null: closed loop or trace)")
    achieved_rate: float | None = Field(description="(issued − 1) / (last issue − first issue)")
    goodput: float | None = Field(description="completed requests meeting every SLO, per second; null without SLOs")
    good_requests: int | None
    total_input_tokens: int
    total_output_tokens: int
    mean_input_tokens: float | None = Field(description="server-reported prompt tokens per completed request")
    mean_output_tokens: float | None
    tokens_per_chunk: float | None = Field(description="completion tokens / output chunks")
    usage_missing: int = Field(description="completed requests without server usage (counts estimated)")
    concurrency: Concurrency
    mfu: MFUSection | None
    mfu_error: str | None = None
    request_costs: RequestCostSection | None = Field(None, description="per-request cost from the server "
                                                     "(null: see request_costs_error)")
    request_costs_error: str | None = None
    records: list[RequestRecord] = Field(default_factory=list, exclude=True,
                                         description="per-request records (API only; --requests-out writes them)")


# ---------------------------------------------------------------- sweeps (loadgen.sweep writes them)
Mode = Literal["request_rate", "concurrency"]


class SweepPoint(BaseModel):
    """One load point's headline figures (the full result is in `file`)."""

    load: float
    file: str
    completed: int
    failed: int
    request_throughput: float
    output_throughput: float
    goodput: float | None
    ttft_s: LatencyStats
    tpot_s: LatencyStats
    itl_s: LatencyStats
    e2e_s: LatencyStats
    utilization: dict[str, float | None]  # "<prefill|decode>_<mfu|hfu|mbu>"
    acceptance_rate: float | None


class SweepSummary(BaseModel):
    mode: Mode
    points: list[SweepPoint]
