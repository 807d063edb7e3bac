"""`RequestRecord`: what happened to one request (one line of `--requests-out`).

Times ending in `_s` are seconds; `*_at_s` are offsets from the run's start (its first
scheduled issue).  ITL is per streamed chunk: an engine that emits several tokens in one
chunk (speculative decoding) gives one gap per chunk, not per token.  `request_id` is the
`X-Request-Id` header it was sent with; `cost` is what the server attributed to it, joined by
that id (`loadgen/costs.py`).
"""

from __future__ import annotations

from pydantic import BaseModel, Field, computed_field

ERROR_KINDS = ("http_<status>", "timeout", "dropped_stream", "connection_error", "stream_error", "client_error")


class Cost(BaseModel):
    """What the server attributed to one request (DESIGN §12): the sum of the finished-request records
    its X-Request-Id matched (several with n > 1)."""

    tenant: str = Field(description="the tenant label the server charged it to (sanitised)")
    records: int = Field(description="server records joined to it (one per choice: n > 1 gives several)")
    request_ids: list[str] = Field(description="vLLM's internal ids of those records")
    prompt_tokens: int
    output_tokens: int
    useful_flops: float
    executed_flops: float
    prefill_device_seconds: float
    decode_device_seconds: float
    device_seconds: float


class RequestRecord(BaseModel):
    index: int
    request_id: str | None = Field(None, description="the X-Request-Id header it was sent with")
    tenant: str | None = Field(None, description="the tenant it declared (vllm_xargs.tenant), if any")
    scheduled_at_s: float = Field(description="when the arrival process scheduled it")
    issued_at_s: float = Field(description="when the generator started issuing it")
    sent_at_s: float = Field(description="when it was sent (after waiting for a concurrency slot)")
    finished_at_s: float | None = Field(None, description="when it completed or failed")
    input_len: int = Field(description="requested prompt tokens (client-side estimate)")
    output_len: int = Field(description="requested max_tokens")
    ok: bool = False
    error: str | None = Field(None, description="kind: " + ", ".join(ERROR_KINDS))
    error_detail: str | None = None
    ttft_s: float | None = Field(None, description="send → first output chunk")
    e2e_s: float | None = Field(None, description="send → end of stream")
    tpot_s: float | None = Field(None, description="(e2e − ttft) / (completion_tokens − 1)")
    itl_s: list[float] = Field(default_factory=list, description="gaps between output chunks")
    chunks: int = Field(0, description="output chunks received (a chunk may hold several tokens)")
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_from_server: bool = False
    finish_reason: str | None = None
    cost: Cost | None = Field(None, description="what the server says it cost (null: not looked up, or missing)")

    @computed_field
    @property
    def lateness_s(self) -> float:
        """Issued − scheduled: how far behind its schedule the generator was."""
        return self.issued_at_s - self.scheduled_at_s

    @computed_field
    @property
    def queue_wait_s(self) -> float:
        """Sent − issued: time spent waiting for a concurrency slot."""
        return self.sent_at_s - self.issued_at_s
