"""Send one streaming request to `/v1/completions` or `/v1/chat/completions` and time it.

TTFT is send → first chunk with output; ITL the gaps between output chunks (per chunk: an
engine that streams several tokens per chunk, as with speculative decoding, gives one gap per
chunk); TPOT = (e2e − TTFT) / (completion_tokens − 1).  Token counts come from the server's
`usage` (requested with `stream_options.include_usage`); without it, completion tokens fall
back to the number of output chunks.  Every failure becomes a record, never an exception.
HTTP is aiohttp's, as in `vllm bench serve`: one `aiohttp.ClientSession` shared by the run.
Each request carries its record's `request_id` as `X-Request-Id` (vLLM builds its own ids from it,
so the request's cost can be looked up by it) and its tenant as `vllm_xargs.tenant`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from loadgen.config import RunConfig
from loadgen.records import RequestRecord
from loadgen.sse import DONE, SSEParser
from loadgen.workload import RequestSpec

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
OUTPUT_KEYS = ("content", "reasoning_content", "reasoning", "tool_calls")


class Failure(Exception):
    """A request that failed in a known way: `kind` is its error kind."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(detail)
        self.kind = kind


def _is_output(choice: dict[str, Any]) -> bool:
    """Whether a streamed choice carries generated output.  Empty text counts (a token that
    detokenizes to nothing, e.g. a skipped special token, still took an engine step); the chat
    role announcement and an empty closing delta do not."""
    if "text" in choice:
        return choice["text"] is not None
    delta = choice.get("delta") or {}
    if delta.get("role") and not delta.get("content"):
        return False
    return any(delta.get(k) is not None for k in OUTPUT_KEYS)


class Sender:
    """Builds request bodies for one run and sends them through a shared session."""

    def __init__(self, session: aiohttp.ClientSession, config: RunConfig):
        self.session = session
        self.chat = config.endpoint == "chat"
        self.url = config.base_url.rstrip("/") + PATHS[config.endpoint]
        self.timeout_s = config.request_timeout_s
        base: dict[str, Any] = {"model": config.model, "stream": True,
                                "stream_options": {"include_usage": True}}
        if config.ignore_eos:
            base["ignore_eos"] = True
        if config.temperature is not None:
            base["temperature"] = config.temperature
        self.base = {**base, **config.extra_body}
        self.tenant = config.tenant

    def tenant_of(self, spec: RequestSpec) -> str | None:
        """The tenant a request declares: its own (a trace entry's), the run's, or one in --extra-body."""
        return spec.tenant or self.tenant or (self.base.get("vllm_xargs") or {}).get("tenant")

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        body = dict(self.base, max_tokens=spec.output_len)
        if tenant := spec.tenant or self.tenant:
            body["vllm_xargs"] = {**(self.base.get("vllm_xargs") or {}), "tenant": tenant}
        if self.chat:
            messages = [{"role": "system", "content": spec.system}] if spec.system else []
            body["messages"] = messages + [{"role": "user", "content": spec.prompt}]
        elif spec.prompt_token_ids is not None:
            body["prompt"] = spec.prompt_token_ids  # exact-length prompt, its system prefix included
        else:
            body["prompt"] = f"{spec.system}\n{spec.prompt}" if spec.system else spec.prompt
        return body

    async def send(self, spec: RequestSpec, rec: RequestRecord, t0: float) -> RequestRecord:
        """Fill `rec` (whose schedule fields are set) with the outcome; t0 = the run's clock origin."""
        sent = time.perf_counter()
        rec.sent_at_s = sent - t0
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._stream(spec, rec, sent)
            rec.ok = True
        except Failure as exc:
            rec.error, rec.error_detail = exc.kind, str(exc)[:300] or None
        except TimeoutError as exc:  # asyncio's, and aiohttp's ServerTimeoutError
            rec.error = "timeout"
            rec.error_detail = f"no complete answer within {self.timeout_s:g} s ({type(exc).__name__})"
        except aiohttp.ClientConnectionError as exc:  # before the response headers: connect, reset, closed
            rec.error, rec.error_detail = "connection_error", f"{type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # a failing request is recorded, never crashes the run
            rec.error, rec.error_detail = "client_error", f"{type(exc).__name__}: {exc}"[:300]
        end = time.perf_counter()
        rec.finished_at_s = end - t0
        if rec.ok:
            rec.e2e_s = end - sent
            if rec.completion_tokens is None:
                rec.completion_tokens = rec.chunks
            if rec.ttft_s is not None and rec.completion_tokens > 1:
                rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.completion_tokens - 1)
        return rec

    async def _stream(self, spec: RequestSpec, rec: RequestRecord, sent: float) -> None:
        headers = {"X-Request-Id": rec.request_id} if rec.request_id else None
        async with self.session.post(self.url, json=self.body(spec), headers=headers) as resp:
            if resp.status != 200:
                try:
                    text = (await resp.read()).decode(errors="replace")
                except aiohttp.ClientError as exc:  # the error body broke off: the status still says it all
                    text = f"({type(exc).__name__} reading the body)"
                raise Failure(f"http_{resp.status}", text)
            parser = SSEParser()
            last = sent
            finished = False
            itl = rec.itl_s
            try:
                async for raw in resp.content.iter_any():
                    now = time.perf_counter()
                    for data in parser.feed(raw):
                        if data == DONE:
                            finished = True
                            continue
                        try:
                            obj = json.loads(data)
                        except ValueError:
                            raise Failure("stream_error", f"malformed chunk: {data[:200]!r}") from None
                        if obj.get("error"):
                            raise Failure("stream_error", json.dumps(obj["error"]))
                        usage = obj.get("usage")
                        if usage:
                            rec.prompt_tokens = usage.get("prompt_tokens")
                            rec.completion_tokens = usage.get("completion_tokens")
                            rec.usage_from_server = True
                        for choice in obj.get("choices") or ():
                            if _is_output(choice):
                                if rec.chunks == 0:
                                    rec.ttft_s = now - sent
                                else:
                                    itl.append(now - last)
                                last = now
                                rec.chunks += 1
                            if choice.get("finish_reason"):
                                rec.finish_reason = choice["finish_reason"]
            except TimeoutError:
                raise
            except aiohttp.ClientError as exc:  # the connection broke mid-stream (ClientPayloadError)
                raise Failure("dropped_stream", f"{type(exc).__name__} after {rec.chunks} chunks: {exc}") from exc
            if parser.pending().startswith(b"data: [DONE]"):
                finished = True
            if not finished and rec.finish_reason is None:
                raise Failure("dropped_stream",
                              f"stream ended after {rec.chunks} chunks without [DONE] or finish_reason")
