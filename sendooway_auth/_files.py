"""Reading one user file safely (in the reader child, already as the user)."""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass

MAX_FILE = 1 << 20          # bytes of one file
MAX_TOTAL = 4 << 20         # bytes of all files of one lookup
MAX_FILES = 32              # distinct files one lookup may read
MAX_PATH = 4096
# An empty file written less than this long ago is read again once, this
# long after: an editor that saves in place (nano; vim with backupcopy=yes)
# truncates first, and a lookup in between found no account at all: a
# permanent 550 for a message sent while the user saved (a soak test).
SETTLE = 0.5


@dataclass(frozen=True)
class FileRead:
    """The outcome of reading one path as the user.

    status: ok | missing | unreadable | not-regular | too-large. `data` is
    only there inside the reader child; `size` travels back. `detail` says
    why it failed, or for a file read what --check should know of it."""

    path: str
    status: str
    detail: str = ""
    mode: int = 0
    owner: int = -1
    size: int = 0
    data: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        if self.ok:
            return (f"found, {self.size} bytes, mode {self.mode & 0o7777:04o}"
                    + (f"; {self.detail}" if self.detail else ""))
        return self.status + (f" ({self.detail})" if self.detail else "")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


class Budget:
    """What one lookup may still read, in bytes."""

    def __init__(self, total: int = MAX_TOTAL) -> None:
        self.left = total


def read_one(path: str, budget: Budget) -> FileRead:
    """Read `path` with the rights of the calling process: never follow it
    into a FIFO or device (O_NONBLOCK, then fstat), at most MAX_FILE bytes.
    An empty file that was written just now is read again once (SETTLE)."""
    read = _read_one(path, budget)
    if read.ok and read.size == 0:
        try:
            age = time.time() - os.stat(path).st_mtime
        except (OSError, ValueError):
            return read
        if -SETTLE < age < SETTLE:
            time.sleep(SETTLE - max(age, 0.0))
            return _read_one(path, budget)
    return read


def _read_one(path: str, budget: Budget) -> FileRead:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return FileRead(path, "missing")
        return FileRead(path, "unreadable", exc.strerror or str(exc))
    except ValueError:  # e.g. NUL in the path: the user's mistake, not ours
        return FileRead(path, "unreadable", "invalid path")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return FileRead(path, "not-regular", _kind(st.st_mode), st.st_mode, st.st_uid)
        limit = min(MAX_FILE, budget.left)
        if st.st_size > limit:
            why = (f"{st.st_size} bytes, limit {MAX_FILE}" if st.st_size > MAX_FILE
                   else f"the lookup's budget of {MAX_TOTAL} bytes is used up")
            return FileRead(path, "too-large", why, st.st_mode, st.st_uid, st.st_size)
        chunks = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            return FileRead(path, "too-large", f"more than {limit} bytes", st.st_mode, st.st_uid)
        budget.left -= total
        return FileRead(path, "ok", "", st.st_mode, st.st_uid, total, b"".join(chunks))
    except OSError as exc:
        return FileRead(path, "unreadable", exc.strerror or str(exc))
    finally:
        os.close(fd)
