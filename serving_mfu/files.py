"""Files on a shared host: private folders, exclusive temporaries, no links followed (DESIGN §10).

Every file the project writes goes through here.  Another local user must not be able to redirect a
write (a symlink at a name we are about to write) or add to what we read (a file planted in our
folder).  So: a folder we publish into is ours and writable by nobody else (refused otherwise, never
silently replaced); a whole-file write is a fresh `mkstemp` temporary renamed over the target (the
rename replaces a link, never writes through it); a streamed file is opened without following a link
and only if it is ours; a read opens without following a link and reports a file that is not ours.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pwd
import stat
import tempfile
from pathlib import Path
from typing import IO, Any

__all__ = ["FolderRefused", "ForeignFile", "folder_refusal", "private_folder", "read_own", "write_atomic",
           "open_own_for_writing", "owner_name", "write_figure"]

PRIVATE_MODE = 0o700
_LINK_ERRNOS = (errno.ELOOP, errno.EMLINK)  # O_NOFOLLOW on a link: Linux says ELOOP, FreeBSD EMLINK
OPEN_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
OPEN_WRITE = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class FolderRefused(PermissionError):
    """A folder that another user owns or may write to; the message names it, its owner and mode, and the fix."""


class ForeignFile(PermissionError):
    """A file that is a link, not a regular file, or owned by another user: never read or written through."""


def owner_name(uid: int) -> str:
    """`name (uid N)`, or `uid N` where the uid has no passwd entry."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def folder_refusal(path: Path, what: str = "folder", fix: str = "") -> str | None:
    """Why `path` must not be used as a private folder, or None: it must be a directory owned by this
    process's effective uid and writable by neither group nor others.  A symlink to such a directory is
    accepted only if the link itself is ours (a link planted in /tmp by another user is refused).
    A missing folder is no refusal (the caller creates it, or reports it missing).  `fix` ends the
    message, with `{folder}` and `{user}` filled in."""
    path = Path(path)
    me = os.geteuid()
    try:
        link = os.lstat(path)
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"the {what} {path} cannot be checked: {exc.strerror}"
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(link.st_mode) and link.st_uid != me:
        why = (f"is a symlink owned by {owner_name(link.st_uid)}, not by this process ({owner_name(me)}): "
               "refused, since another user could point it anywhere.")
    elif not stat.S_ISDIR(st.st_mode):
        why = "is not a directory."
    elif st.st_uid != me or mode & 0o022:
        writers = {0o022: "group and others", 0o020: "group", 0o002: "others"}.get(mode & 0o022)
        why = ("is refused: it is "
               + (f"owned by {owner_name(st.st_uid)}, not by this process ({owner_name(me)})" if st.st_uid != me
                  else f"writable by {writers}")
               + f" (mode {mode:04o}), so another user could add files to it or replace ours.")
    else:
        return None  # the usual case, checked at every publish and read: no user lookup, no formatting
    fix = fix.format(folder=path, user=owner_name(me).split(" (")[0])
    return f"the {what} {path} {why} {fix}".rstrip()


def private_folder(path: Path, what: str = "folder", fix: str = "") -> Path:
    """`path`, created `0700` (parents as usual) if missing, once it passes `folder_refusal`;
    FolderRefused otherwise.  An existing folder of ours is used as it is (never chmod-ed)."""
    path = Path(path)
    try:
        os.mkdir(path, PRIVATE_MODE)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, PRIVATE_MODE)
    problem = folder_refusal(path, what, fix)
    if problem is not None:
        raise FolderRefused(problem)
    return path


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    """Write `data` to `path` whole: a fresh exclusive temporary in the same folder (`mkstemp`:
    O_CREAT|O_EXCL|O_NOFOLLOW, a random name), then a rename over `path`.  A symlink at `path` is
    replaced, never written through; a failed write leaves no temporary behind."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure to `path` as `write_atomic` writes (the format from the suffix)."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return write_atomic(path, buf.getvalue())


def check_own(fd: int, path: Path) -> os.stat_result:
    """The open file's stat; ForeignFile unless it is a regular file this process's user owns."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ForeignFile(f"{path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise ForeignFile(f"{path} is owned by {owner_name(st.st_uid)}, not by this process "
                          f"({owner_name(os.geteuid())})")
    return st


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open without following a last-component link (ForeignFile if it is one), close-on-exec;
    reads do not block on a FIFO planted at the path."""
    extra = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        return os.open(path, flags | extra, mode)
    except OSError as exc:
        if exc.errno in _LINK_ERRNOS:
            raise ForeignFile(f"{path} is a symlink") from None
        raise


def read_own(path: Path) -> bytes:
    """The content of `path`, opened without following a link; ForeignFile if it is a link (ELOOP),
    not a regular file, or owned by another uid."""
    try:
        fd = os.open(path, OPEN_READ)
    except OSError as exc:
        if exc.errno in _LINK_ERRNOS:  # the last component is a link
            raise ForeignFile(f"{path} is a symlink") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        check_own(fd, path)
        return fh.read()


def open_own_for_writing(path: Path, mode: int = 0o644, buffering: int = -1) -> IO[str]:
    """A text file at `path` to stream into (a trace): created, or truncated if it exists and is ours;
    never through a link, never another user's file (ForeignFile)."""
    path = Path(path)
    fd = None
    try:
        fd = os.open(path, OPEN_WRITE, mode)
    except OSError as exc:
        if exc.errno in _LINK_ERRNOS:
            raise ForeignFile(f"{path} is a symlink: refused (remove it, or write elsewhere)") from None
        raise
    try:
        check_own(fd, path)
        os.ftruncate(fd, 0)
        return os.fdopen(fd, "w", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise
