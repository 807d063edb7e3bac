"""Incremental parser for OpenAI-style server-sent events: yields each `data:` payload.

OpenAI-compatible servers send one `data:` line per event (a JSON chunk, or `[DONE]`), so
each data line is taken as one event; comments, `event:` and `id:` lines are skipped.
"""

from __future__ import annotations

DONE = b"[DONE]"


class SSEParser:
    """Feed it raw bytes as they arrive; it returns the complete data payloads so far."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        out = []
        for line in lines:
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data:
                    out.append(data)
        return out

    def pending(self) -> bytes:
        """Bytes of an unfinished last line (a stream that ended mid-line)."""
        return self._buf
