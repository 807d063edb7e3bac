"""The HTTP path (aiohttp) and the SSE parser, against raw sockets that send exact bytes: each
test sends through `Sender.send` and checks the record it fills."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from loadgen import RunConfig
from loadgen.client import Sender, _is_output
from loadgen.mfu import MFUProbe
from loadgen.records import RequestRecord
from loadgen.runner import make_session
from loadgen.sse import SSEParser
from loadgen.workload import RequestSpec


def test_sse_parser_handles_split_lines_crlf_and_comments():
    p = SSEParser()
    assert p.feed(b'data: {"a"') == []
    assert p.feed(b': 1}\r\n\r\n: keep-alive\n\nevent: x\ndata: [DONE]\n') == [b'{"a": 1}', b"[DONE]"]
    assert p.feed(b"data: tail") == [] and p.pending() == b"data: tail"


def test_output_chunks_include_empty_text_but_not_the_role_announcement():
    assert _is_output({"text": ""}) and _is_output({"text": " a"})
    assert _is_output({"delta": {"content": ""}})  # vLLM: a skipped special token still took a step
    assert _is_output({"delta": {"reasoning_content": "hm"}})
    assert not _is_output({"delta": {"role": "assistant", "content": ""}})
    assert not _is_output({"delta": {}, "finish_reason": "stop"})  # OpenAI's empty closing delta


class RawServer:
    """Answers each request with the next canned response: its bytes ('|' marks separate writes),
    then "keep" (the connection stays open), "close", or "hang" (no answer: waits for the client
    to leave).  Counts connections, and the requests received but not yet answered (`peak`)."""

    def __init__(self, responses: list[tuple[bytes, str]], delay_s: float = 0.0):
        self.responses = responses
        self.delay_s = delay_s
        self.connections = 0
        self.requests: list[bytes] = []
        self.in_flight = self.peak = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while self.responses:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                self.requests.append(head + await reader.readexactly(length))
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                await asyncio.sleep(self.delay_s)
                self.in_flight -= 1
                data, action = self.responses.pop(0)
                if action == "hang":
                    await reader.read()  # until the client closes the connection
                    break
                for part in data.split(b"|"):
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.005)
                if action == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()
        await asyncio.sleep(0.01)  # let the transports finish closing before the loop does


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


EVENTS = [b'data: {"choices":[{"index":0,"text":" a"}]}\n\n',
          b'data: {"choices":[{"index":0,"text":" b","finish_reason":"length"}]}\n\n',
          b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n', b"data: [DONE]\n\n"]
# an event split across two chunks, and a chunk split across two writes
SSE = (HEAD + chunk(EVENTS[0] + EVENTS[1][:9]) + b"|" + chunk(EVENTS[1][9:])[:12] + b"|"
       + chunk(EVENTS[1][9:])[12:] + chunk(EVENTS[2]) + b"|" + chunk(EVENTS[3]) + b"0\r\n\r\n")
SPEC = RequestSpec(prompt="hello there", input_len=2, output_len=2)


async def send(url: str, n: int = 1, concurrent: bool = True, **config) -> list[RequestRecord]:
    """Send SPEC n times through one session (all at once, or one after another)."""
    cfg = RunConfig(base_url=url, mfu=False, quiet=True, **config)
    async with make_session(cfg) as session:
        sender, t0 = Sender(session, cfg), time.perf_counter()
        recs = [RequestRecord(index=i, scheduled_at_s=0, issued_at_s=0, sent_at_s=0, input_len=2, output_len=2)
                for i in range(n)]
        if concurrent:
            return list(await asyncio.gather(*(sender.send(SPEC, r, t0) for r in recs)))
        return [await sender.send(SPEC, r, t0) for r in recs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


async def test_a_chunked_sse_stream_split_across_writes_is_parsed():
    raw = RawServer([(SSE, "keep")])
    async with raw as url:
        [rec] = await send(url)
    assert rec.ok and rec.error is None
    assert (rec.chunks, rec.prompt_tokens, rec.completion_tokens, rec.finish_reason) == (2, 3, 2, "length")
    assert rec.usage_from_server and len(rec.itl_s) == 1 and 0 < rec.ttft_s <= rec.e2e_s
    head, _, body = raw.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    sent = json.loads(body)
    assert (sent["prompt"], sent["max_tokens"], sent["stream"]) == ("hello there", 2, True)


async def test_a_kept_alive_connection_is_reused_for_sequential_requests():
    raw = RawServer([(SSE, "keep")] * 3)
    async with raw as url:
        recs = await send(url, 3, concurrent=False)
    assert [r.ok for r in recs] == [True] * 3
    assert raw.connections == 1


async def test_a_body_cut_short_mid_stream_is_a_dropped_stream():
    cut = HEAD + chunk(EVENTS[0]) + b"|" + b"40\r\ndata: {\"cho"
    async with RawServer([(cut, "close")]) as url:
        [rec] = await send(url)
    assert not rec.ok and rec.error == "dropped_stream" and rec.chunks == 1
    assert "ClientPayloadError after 1 chunks" in rec.error_detail


async def test_a_stream_that_ends_without_done_or_finish_reason_is_a_dropped_stream():
    ended = HEAD + chunk(EVENTS[0]) + b"0\r\n\r\n"  # a complete HTTP body, an unfinished completion
    async with RawServer([(ended, "keep")]) as url:
        [rec] = await send(url)
    assert rec.error == "dropped_stream" and "without [DONE]" in rec.error_detail


async def test_an_http_error_status_is_recorded_with_its_body():
    answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\noverload!"
    async with RawServer([(answer, "keep")]) as url:
        [rec] = await send(url)
    assert (rec.error, rec.error_detail, rec.ttft_s) == ("http_503", "overload!", None)


async def test_a_server_that_closes_before_answering_is_a_connection_error():
    async with RawServer([(b"", "close")]) as url:
        [rec] = await send(url)
    assert rec.error == "connection_error" and "ServerDisconnectedError" in rec.error_detail


async def test_nothing_listening_is_a_connection_error():
    [rec] = await send(f"http://127.0.0.1:{free_port()}")
    assert rec.error == "connection_error" and "ClientConnectorError" in rec.error_detail


async def test_a_slow_server_is_a_timeout_at_the_request_deadline():
    async with RawServer([(b"", "hang")]) as url:
        [rec] = await send(url, request_timeout_s=0.2)
    assert rec.error == "timeout" and "0.2 s" in rec.error_detail
    assert 0.2 <= rec.finished_at_s - rec.sent_at_s < 1.0


async def test_max_connections_limits_concurrent_requests():
    raw = RawServer([(SSE, "keep")] * 8, delay_s=0.02)
    async with raw as url:
        recs = await send(url, 8, max_connections=2)
    assert all(r.ok for r in recs)
    assert raw.peak == 2 and raw.connections == 2


async def test_without_a_cap_requests_go_out_in_parallel():
    raw = RawServer([(SSE, "keep")] * 8, delay_s=0.02)
    async with raw as url:
        recs = await send(url, 8)
    assert all(r.ok for r in recs) and raw.peak == 8


def test_exact_length_prompts_send_their_token_ids_to_completions_only():
    spec = RequestSpec(prompt="words", system="sys", input_len=4, output_len=3, prompt_token_ids=[7, 8, 9, 10])
    comp = Sender(None, RunConfig()).body(spec)
    assert comp["prompt"] == [7, 8, 9, 10] and comp["max_tokens"] == 3
    chat = Sender(None, RunConfig(endpoint="chat")).body(spec)
    assert chat["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "words"}]
    assert Sender(None, RunConfig()).body(SPEC)["prompt"] == "hello there"  # no ids: the text


async def test_the_mfu_probe_records_a_failure_and_closes_its_own_session():
    async with RawServer([(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope", "keep")]) as url:
        probe = MFUProbe(url)
        await probe.start()
        own = probe.session
        assert probe.available is False and "answered 404: nope" in probe.error
        assert await probe.stop() is None
    assert own.closed and probe.session is None


async def test_the_mfu_probe_never_raises_on_a_malformed_answer_or_no_server():
    async with RawServer([(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nnot json", "keep")]) as url:
        probe = MFUProbe(url)
        await probe.start()
        assert probe.available is False and "sent no counters" in probe.error
        await probe.stop()
    probe = MFUProbe(f"http://127.0.0.1:{free_port()}")
    await probe.start()
    assert probe.available is False and "cannot read" in probe.error and await probe.stop() is None


async def test_a_run_against_the_stub_gives_exact_figures():
    from loadgen import run_benchmark
    from loadgen.stub import StubConfig
    from loadgen.stub_server import StubThread
    with StubThread(StubConfig(tokens_per_chunk=2)) as s:
        r = await run_benchmark(RunConfig(base_url=s.url, num_prompts=5, output={"mean": 7}, input={"mean": 9},
                                          max_concurrency=2, mfu=False, quiet=True))
    assert (r.completed, r.total_output_tokens, r.mean_input_tokens, r.itl_s.count) == (5, 35, 9, 15)
