"""`RunConfig`: everything one load-generator run needs, validated at the boundary (CLI or API)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Arrival = Literal["poisson", "gamma", "constant", "closed", "trace"]
Dataset = Literal["synthetic", "sharegpt", "shared-prefix", "repetitive"]
LengthDist = Literal["fixed", "uniform", "normal", "lognormal"]
Endpoint = Literal["completions", "chat"]
PromptFormat = Literal["auto", "token-ids", "text"]


class LengthSpec(BaseModel):
    """A token-length distribution: `mean` tokens, `spread` = uniform half-width, normal std or
    log-normal sigma, as a fraction of the mean (uniform, normal) or in log space (lognormal)."""

    dist: LengthDist = "fixed"
    mean: int = Field(128, ge=1)
    spread: float = Field(0.0, ge=0.0)


class SLOs(BaseModel):
    """Per-request service-level objectives for goodput; None = no bound on that figure."""

    ttft_s: float | None = Field(None, gt=0)
    tpot_s: float | None = Field(None, gt=0)
    e2e_s: float | None = Field(None, gt=0)

    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_s, self.tpot_s, self.e2e_s))


class RunConfig(BaseModel):
    """One run: server, traffic shape, workload, limits and outputs."""

    model_config = ConfigDict(ser_json_inf_nan="strings")  # inf rates survive a JSON round trip

    base_url: str = "http://127.0.0.1:8000"
    model: str = "default"
    endpoint: Endpoint = "completions"
    num_prompts: int | None = Field(None, ge=1,
                                    description="None: 100, all trace entries, or unbounded with duration_s")
    duration_s: float | None = Field(None, gt=0, description="stop issuing new requests after this many seconds")
    arrival: Arrival = "poisson"
    request_rate: float = Field(math.inf, gt=0, description="requests/s; inf = all at once")
    burstiness: float = Field(1.0, gt=0, description="gamma shape: 1 = Poisson, < 1 burstier, > 1 smoother")
    max_concurrency: int | None = Field(None, ge=1,
                                        description="cap on requests in flight; closed loop: its concurrency")
    trace_path: str | None = None
    trace_time_scale: float = Field(1.0, gt=0, description="multiply trace timestamps by this")
    dataset: Dataset = "synthetic"
    dataset_path: str | None = None
    sharegpt_output: Literal["dataset", "config"] = "dataset"
    input: LengthSpec = Field(default_factory=LengthSpec)
    output: LengthSpec = Field(default_factory=lambda: LengthSpec(mean=128))
    prefix_len: int = Field(256, ge=0, description="shared-prefix: tokens of the common system prompt")
    num_prefixes: int = Field(1, ge=1, description="shared-prefix: distinct common prompts")
    seed: int = 0
    warmup_requests: int = Field(1, ge=0, description="sent before the measured window, as vLLM's benchmark does")
    prompt_format: PromptFormat = Field("auto", description="auto: token IDs of the served model where the "
                                        "completions endpoint and /tokenize or `tokenizer` allow, else text; "
                                        "token-ids: fail without them; text: words (≈ 1 token each)")
    tokenizer: str | None = Field(None, description="a local Hugging Face tokenizer for the prompts' token IDs "
                                  "(default: the server's /tokenize)")
    ignore_eos: bool = True
    temperature: float | None = 0.0
    extra_body: dict[str, Any] = Field(default_factory=dict, description="merged into every request body")
    request_timeout_s: float = Field(600.0, gt=0)
    max_connections: int | None = Field(None, ge=1, description="HTTP pool size; default: max_concurrency or unlimited")
    slos: SLOs = Field(default_factory=SLOs)
    mfu: bool = True
    mfu_interval_s: float = Field(1.0, gt=0)
    mfu_fresh_timeout_s: float = Field(10.0, gt=0, le=30, description="longest wait for the server's counters to "
                                       "cover the run's start and end (engines publish about every 0.5 s)")
    tenant: str | None = Field(None, description="sent as vllm_xargs.tenant in every request body (a trace "
                               "entry's own tenant wins); the server charges the request's cost to it")
    request_costs: bool = Field(True, description="after the run, look up each request's cost on the server "
                                "(/metrics/mfu/requests/{X-Request-Id})")
    cost_timeout_s: float = Field(10.0, gt=0, le=120, description="longest wait for the server to publish the "
                                  "run's request records (engines publish about every 0.5 s)")
    cost_concurrency: int = Field(16, ge=1, description="request-cost lookups in flight at once")
    device_hour_price: float | None = Field(None, ge=0, description="USD per device-hour: prices the run's "
                                            "device-seconds per 1M input and output tokens")
    out: str | None = None
    requests_out: str | None = None
    quiet: bool = False

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.arrival == "closed" and self.max_concurrency is None:
            raise ValueError("arrival=closed needs max_concurrency (the number of closed-loop workers)")
        if self.arrival == "trace" and not self.trace_path:
            raise ValueError("arrival=trace needs trace_path")
        if self.arrival in ("poisson", "gamma", "constant") and math.isinf(self.request_rate) \
                and self.duration_s and not self.num_prompts:
            raise ValueError("an infinite request rate with a duration needs num_prompts (else it never ends)")
        if self.prompt_format == "token-ids" and self.endpoint == "chat":
            raise ValueError("prompt_format=token-ids needs the completions endpoint (chat messages are text)")
        if self.dataset == "sharegpt" and not self.dataset_path:
            raise ValueError("dataset=sharegpt needs dataset_path")
        return self

    def total_requests(self, trace_len: int | None = None) -> int | None:
        """How many measured requests to issue; None = until duration_s runs out."""
        if trace_len is not None:
            return min(trace_len, self.num_prompts) if self.num_prompts else trace_len
        if self.num_prompts:
            return self.num_prompts
        return None if self.duration_s else 100
