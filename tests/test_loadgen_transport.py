"""The lean HTTP/1.1 transport and the SSE parser, against raw sockets that send exact bytes."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from loadgen.sse import SSEParser
from loadgen.transport import FastTransport


def test_sse_parser_handles_split_lines_crlf_and_comments():
    p = SSEParser()
    assert p.feed(b'data: {"a"') == []
    assert p.feed(b': 1}\r\n\r\n: keep-alive\n\nevent: x\ndata: [DONE]\n') == [b'{"a": 1}', b"[DONE]"]
    assert p.feed(b"data: tail") == [] and p.pending() == b"data: tail"


class RawServer:
    """Answers each request on a connection with the next canned response (bytes, then action)."""

    def __init__(self, responses: list[tuple[bytes, str]]):
        self.responses = responses
        self.connections = 0
        self.requests: list[bytes] = []
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
                data, action = self.responses.pop(0)
                for part in data.split(b"|"):  # '|' marks separate writes
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


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n|5\r\nhello\r\n|6;ext=1\r\n world\r\n0\r\n\r\n"
LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab|c"


async def test_chunked_and_length_bodies_on_one_kept_alive_connection():
    raw = RawServer([(CHUNKED, "keep"), (LENGTH, "keep"), (b"HTTP/1.1 204 No Content\r\n\r\n", "keep")])
    async with raw as url, httpx.AsyncClient(transport=FastTransport()) as client:
        r1 = await client.post(url + "/a?q=1", json={"x": 1})
        r2 = await client.get(url + "/b")
        r3 = await client.get(url + "/c")
    assert (r1.status_code, r1.content, r2.content, r3.status_code) == (200, b"hello world", b"abc", 204)
    assert raw.connections == 1
    assert raw.requests[0].startswith(b"POST /a?q=1 HTTP/1.1\r\n") and raw.requests[0].endswith(b'{"x":1}')
    assert b"Content-Length: 7" in raw.requests[0]


async def test_close_delimited_body_and_connection_close():
    raw = RawServer([(b"HTTP/1.0 200 OK\r\n\r\nuntil|close", "close"),
                     (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", "close")])
    async with raw as url, httpx.AsyncClient(transport=FastTransport()) as client:
        assert (await client.get(url)).content == b"untilclose"
        assert (await client.get(url)).content == b"ok"
    assert raw.connections == 2


async def test_a_body_cut_short_is_a_remote_protocol_error():
    raw = RawServer([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "close")])
    async with raw as url, httpx.AsyncClient(transport=FastTransport()) as client:
        async with client.stream("GET", url) as resp:
            with pytest.raises(httpx.RemoteProtocolError):
                async for _ in resp.aiter_bytes():
                    pass


async def test_a_stale_kept_alive_connection_is_retried_once():
    raw = RawServer([(LENGTH, "close"), (LENGTH, "close")])  # the server closes after each answer
    async with raw as url, httpx.AsyncClient(transport=FastTransport()) as client:
        assert (await client.get(url)).content == b"abc"
        assert (await client.get(url)).content == b"abc"
    assert raw.connections == 2


async def test_read_timeout_and_connection_refused():
    writers = []

    async def silent(reader, writer):
        writers.append(writer)  # answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with httpx.AsyncClient(transport=FastTransport(), timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"http://127.0.0.1:{port}/")
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_max_connections_limits_concurrent_requests():
    in_flight = peak = 0

    async def handle(reader, writer):
        nonlocal in_flight, peak
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0.02)
                in_flight -= 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    async with httpx.AsyncClient(transport=FastTransport(max_connections=2)) as client:
        results = await asyncio.gather(*(client.get(url) for _ in range(8)))
    await asyncio.sleep(0.05)  # the handlers see the client's close
    server.close()
    await server.wait_closed()
    assert all(r.status_code == 200 for r in results) and peak == 2


def test_output_chunks_include_empty_text_but_not_the_role_announcement():
    from loadgen.client import _is_output
    assert _is_output({"text": ""}) and _is_output({"text": " a"})
    assert _is_output({"delta": {"content": ""}})  # vLLM: a skipped special token still took a step
    assert _is_output({"delta": {"reasoning_content": "hm"}})
    assert not _is_output({"delta": {"role": "assistant", "content": ""}})
    assert not _is_output({"delta": {}, "finish_reason": "stop"})  # OpenAI's empty closing delta


async def test_both_transports_give_the_same_figures():
    from loadgen import RunConfig, run_benchmark
    from loadgen.stub import StubConfig
    from loadgen.stub_server import StubThread
    with StubThread(StubConfig(tokens_per_chunk=2)) as s:
        runs = [await run_benchmark(RunConfig(base_url=s.url, http_transport=t, num_prompts=5, output={"mean": 7},
                                              input={"mean": 9}, mfu=False, quiet=True)) for t in ("fast", "httpx")]
    for r in runs:
        assert (r.completed, r.total_output_tokens, r.mean_input_tokens, r.itl_s.count) == (5, 35, 9, 15)
