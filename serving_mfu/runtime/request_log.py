"""Finished requests from the engines to the API server: an append-only log per engine (DESIGN §10, §12).

The engine appends the requests that finished (a `FinishedRequests` batch, column by column: one JSON line
per step that finished any) to `requests-<engine>.jsonl` in the snapshot folder when it publishes (about
every 0.5 s): only the new lines are written, never the whole ring.  When a segment holds
`segment_records` requests it is renamed to `requests-<engine>.1.jsonl`
(replacing the previous one) and a new segment starts, so an engine keeps at most two segments on disk.
The reader follows each log from where it stopped (its inode and offset; after a rotation, the rest of the
renamed segment first) into a bounded ring, indexed by the ids a client may use (`id_keys`).

Both sides check the folder (ours, 0700) and open files without following links, ours only, as the
snapshots are (serving_mfu.files).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from pathlib import Path

import msgspec

from serving_mfu.files import ForeignFile, check_own, folder_refusal, open_nofollow
from serving_mfu.schema.requests import FinishedRequests, RequestCost, id_keys

log = logging.getLogger(__name__)

SEGMENT_RECORDS = 50_000  # lines per segment: at most two segments (~2 × 20 MB) per engine on disk
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(FinishedRequests)


def log_paths(directory: Path, engine_id: str) -> tuple[Path, Path]:
    """The live segment and the previous one of an engine's request log."""
    return directory / f"requests-{engine_id}.jsonl", directory / f"requests-{engine_id}.1.jsonl"


class RequestLogWriter:
    """Engine side: `add` (accounting thread) queues finished requests, `flush` (publisher thread) appends them."""

    def __init__(self, directory: Path, engine_id: str, segment_records: int = SEGMENT_RECORDS):
        self.dir = Path(directory)
        self.path, self.previous = log_paths(self.dir, engine_id)
        self.segment_records = segment_records
        self._pending: list[FinishedRequests] = []
        self._pending_n = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._lines = 0
        self.written = 0  # requests appended so far
        self.dropped = 0  # requests lost to a refused folder or a failed write (counted, logged once)
        self._logged = False

    def add(self, batch: FinishedRequests) -> None:
        with self._lock:
            self._pending.append(batch)
            self._pending_n += len(batch)
            while self._pending_n > 4 * self.segment_records:  # a folder that refuses writes: keep the newest
                old = self._pending.pop(0)
                self._pending_n -= len(old)
                self.dropped += len(old)

    def flush(self) -> None:
        """Append what finished since the last flush; a refused folder or a failed write drops it (counted)."""
        with self._lock:
            batch, self._pending, n = self._pending, [], self._pending_n
            self._pending_n = 0
        if not batch:
            return
        try:
            refusal = folder_refusal(self.dir, "snapshot folder")
            if refusal is not None:
                raise ForeignFile(refusal)
            if self._fd is None:
                self._fd = open_nofollow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                check_own(self._fd, self.path)
                self._lines = 0
            os.write(self._fd, b"".join(_encoder.encode(b) + b"\n" for b in batch))
            self._lines += n
            self.written += n
            if self._lines >= self.segment_records:
                os.close(self._fd)
                self._fd = None
                os.replace(self.path, self.previous)
        except OSError as exc:
            self.dropped += n
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if not self._logged:
                self._logged = True
                log.warning("serving-mfu: cannot append finished requests to %s: %s (further losses are "
                            "counted)", self.path, exc)

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RequestLogReader:
    """API side: the newest `ring` finished requests of every engine's log in the folder, by id."""

    def __init__(self, directory: Path, ring: int = 10_000):
        self.dir = Path(directory)
        self.ring: deque[RequestCost] = deque()
        self.capacity = ring
        self.index: dict[str, list[RequestCost]] = {}
        self._at: dict[str, tuple[int, int]] = {}  # log name → (inode, offset read up to)
        self._lock = threading.Lock()
        self.bad_lines = 0

    def refresh(self) -> None:
        """Read what the engines appended since the last refresh (nothing from a refused folder)."""
        if folder_refusal(self.dir, "snapshot folder") is not None or not self.dir.is_dir():
            return
        with self._lock:
            for path in sorted(self.dir.glob("requests-*.jsonl")):
                if not path.name.endswith(".1.jsonl"):
                    self._follow(path)

    def _follow(self, path: Path) -> None:
        try:
            fd = open_nofollow(path, os.O_RDONLY)
        except OSError:
            return
        try:
            st = check_own(fd, path)
            ino, offset = self._at.get(path.name, (st.st_ino, 0))
            if ino != st.st_ino:  # rotated since: the rest of the segment we were reading, then this one
                self._rest_of_previous(path, ino, offset)
                offset = 0
            self._at[path.name] = (st.st_ino, offset + self._read_from(fd, offset))
        except (OSError, ForeignFile):
            pass
        finally:
            os.close(fd)

    def _rest_of_previous(self, path: Path, ino: int, offset: int) -> None:
        previous = path.with_name(path.name[:-len(".jsonl")] + ".1.jsonl")
        try:
            fd = open_nofollow(previous, os.O_RDONLY)
        except OSError:
            return
        try:
            if check_own(fd, previous).st_ino == ino:
                self._read_from(fd, offset)
        except (OSError, ForeignFile):
            pass
        finally:
            os.close(fd)

    def _read_from(self, fd: int, offset: int) -> int:
        """Add every complete line from `offset`; returns the bytes consumed."""
        data = os.pread(fd, os.fstat(fd).st_size - offset, offset) if os.fstat(fd).st_size > offset else b""
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            try:
                rows = _decoder.decode(line).rows()
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.bad_lines += 1
                continue
            for rec in rows:
                self._add(rec)
        return end

    def _add(self, rec: RequestCost) -> None:
        if len(self.ring) >= self.capacity:
            old = self.ring.popleft()
            for key in id_keys(old.request_id):
                same = self.index.get(key)
                if same is not None:
                    same.remove(old)
                    if not same:
                        del self.index[key]
        self.ring.append(rec)
        for key in id_keys(rec.request_id):
            self.index.setdefault(key, []).append(rec)

    def find(self, request_id: str) -> list[RequestCost]:
        """The finished requests `request_id` names (internal id, response id, or the client's X), newest first."""
        self.refresh()
        with self._lock:
            return list(reversed(self.index.get(request_id, ())))

    def newest(self, limit: int, tenant: str | None = None) -> list[RequestCost]:
        """The newest `limit` finished requests (of one tenant label), newest first."""
        self.refresh()
        out = []
        with self._lock:
            for rec in reversed(self.ring):
                if tenant is None or rec.tenant == tenant:
                    out.append(rec)
                    if len(out) >= limit:
                        break
        return out
