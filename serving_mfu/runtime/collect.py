"""Reader side, first half: the snapshot files of a folder read into `EngineSnapshot`s, with no side effects.

Only files this user owns, opened without following a link, in a folder that passes the privacy check
(DESIGN §10); what was skipped, and why, is returned beside what was read (serving_mfu.runtime.aggregate
decides what to follow, retire and add up).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import NamedTuple

from serving_mfu.files import ForeignFile, folder_refusal, read_own
from serving_mfu.runtime.publish import FOLDER_FIX
from serving_mfu.schema.snapshot import EngineSnapshot, decode_snapshot


class Collected(NamedTuple):
    """One read of a snapshot folder."""

    snapshots: list[EngineSnapshot]  # every snapshot read, alive or not, in file-name order
    foreign: dict[str, str]  # file name → why it was skipped (a link, another user's file)
    unreadable: dict[str, str]  # file name → why it did not parse (half-written by an old writer, foreign format)
    refused: str | None  # why the whole folder is not trusted (nothing in it was read)


def collect(directory: Path) -> Collected:
    """Read every `engine-*.json` of `directory` (a missing folder reads as empty)."""
    refusal = folder_refusal(directory, "snapshot folder", FOLDER_FIX)
    if refusal is not None:
        return Collected([], {}, {}, refusal)
    snaps: list[EngineSnapshot] = []
    foreign: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    if not directory.is_dir():
        return Collected(snaps, foreign, unreadable, None)
    for path in sorted(directory.glob("engine-*.json")):
        try:
            snaps.append(decode_snapshot(read_own(path)))
        except ForeignFile as exc:  # never added to the totals
            foreign[path.name] = str(exc)
        except (OSError, ValueError) as exc:  # gone meanwhile, or not a snapshot of this version
            unreadable[path.name] = str(exc)
    return Collected(snaps, foreign, unreadable, None)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts: EPERM)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def folder_problem(directory: Path) -> str | None:
    """Why no engine could have published here, if the folder says so: refused (another user owns it or
    may write to it), missing, not a folder, or not writable (probed with an exclusive temporary, as the
    engines write; root passes permission bits but not these)."""
    refusal = folder_refusal(directory, "snapshot folder", FOLDER_FIX)
    if refusal is not None:
        return refusal
    try:
        mode = os.stat(directory).st_mode
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, exc.errno)
        return f"the snapshot folder {directory} cannot be used: {exc.strerror} ({code})"
    if not stat.S_ISDIR(mode):
        return f"the snapshot folder {directory} is not a directory"
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"the snapshot folder {directory} is not writable: {exc}"
    return None
