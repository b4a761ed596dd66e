"""Reading users' files with the user's own rights.

Every read happens in a short-lived child that first drops to the user's
uid, gid and groups (so NFS root_squash, symlinks to /etc/shadow and files
the user may not read behave as they would for the user), refuses anything
but regular files (a FIFO would hang), reads at most MAX_FILE bytes and dies
by SIGALRM after the time limit. The child sends the bytes back; parsing
happens in the caller.

The daemon has PAM threads, and forking a threaded process is fragile, so it
starts a tiny single-threaded *fork server* before any thread exists; the fork
server only forks readers. `read_direct` forks in place and is for the
single-threaded --check.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import signal
import socket
import stat
from dataclasses import dataclass

import msgpack

MAX_FILE = 1 << 20
TIME_LIMIT = 5  # seconds a reader child may live
_CONTROL_MAX = 192 * 1024  # > MAX_FILES * MAX_PATH


MAX_FILES = 32  # distinct files one lookup may read
MAX_PATH = 4096


@dataclass(frozen=True)
class ReadRequest:
    """Read `paths` as uid/gid/groups; relative paths are taken from `home`
    (the original chdir()ed there too)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    paths: tuple[str, ...]
    home: str = "/"

    def to_wire(self) -> bytes:
        return msgpack.packb([self.uid, self.gid, list(self.groups), list(self.paths), self.home])

    @classmethod
    def from_wire(cls, data: bytes) -> "ReadRequest":
        uid, gid, groups, paths, home = msgpack.unpackb(data, raw=False)
        return cls(int(uid), int(gid), tuple(int(g) for g in groups),
                   tuple(str(p) for p in paths), str(home))


@dataclass(frozen=True)
class FileRead:
    """The outcome of reading one path as the user.

    status: ok | missing | unreadable | not-regular | too-large | failed
    """

    path: str
    status: str
    detail: str = ""
    mode: int = 0
    owner: int = -1
    data: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        if self.status == "ok":
            return f"found, {len(self.data)} bytes, mode {self.mode & 0o7777:04o}"
        return f"{self.status}" + (f" ({self.detail})" if self.detail else "")


def _failed(paths, detail: str) -> list[FileRead]:
    return [FileRead(p, "failed", detail) for p in paths]


# ------------------------------------------------------------ in the child


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def _read_one(path: str) -> FileRead:
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
        if st.st_size > MAX_FILE:
            return FileRead(path, "too-large", f"{st.st_size} bytes, limit {MAX_FILE}",
                            st.st_mode, st.st_uid)
        chunks = []
        total = 0
        while total <= MAX_FILE:
            chunk = os.read(fd, min(65536, MAX_FILE + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_FILE:
            return FileRead(path, "too-large", f"more than {MAX_FILE} bytes", st.st_mode, st.st_uid)
        return FileRead(path, "ok", "", st.st_mode, st.st_uid, b"".join(chunks))
    except OSError as exc:
        return FileRead(path, "unreadable", exc.strerror or str(exc))
    finally:
        os.close(fd)


def _become(req: ReadRequest) -> None:
    """Drop to the user for good, or raise."""
    if os.getresuid() == (req.uid,) * 3 and req.uid != 0:
        return  # already the user (authBackend = none, --check of oneself)
    os.setgroups(list(req.groups))
    os.setresgid(req.gid, req.gid, req.gid)
    os.setresuid(req.uid, req.uid, req.uid)
    if os.getresuid() != (req.uid,) * 3 or os.getresgid() != (req.gid,) * 3:
        raise PermissionError("could not switch to the user")
    if req.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PermissionError("could regain root")


def _child(req: ReadRequest, out_fd: int) -> None:
    """Runs in the forked reader; never returns."""
    code = 70
    try:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(TIME_LIMIT)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _become(req)
        try:
            os.chdir(req.home)
        except OSError:
            os.chdir("/")
        results = [_read_one(p) for p in req.paths]
        payload = msgpack.packb([[r.path, r.status, r.detail, r.mode, r.owner, r.data]
                                 for r in results], use_bin_type=True)
        view = memoryview(payload)
        while view:
            view = view[os.write(out_fd, view):]
        code = 0
    except BaseException:  # noqa: BLE001 - the child must never return
        code = 70
    finally:
        os._exit(code)


def _decode(data: bytes, paths) -> list[FileRead]:
    try:
        rows = msgpack.unpackb(data, raw=False)
        out = [FileRead(str(p), str(s), str(d), int(m), int(o), bytes(b))
               for p, s, d, m, o, b in rows]
    except Exception:  # noqa: BLE001 - a dead or broken child
        return _failed(paths, "reader child failed")
    if [r.path for r in out] != list(paths):
        return _failed(paths, "reader child answered for other files")
    return out


def _limit(paths) -> int:
    return len(paths) * (MAX_FILE + 4096) + 4096


# ------------------------------------------------------------ --check


def read_direct(req: ReadRequest) -> list[FileRead]:
    """Fork a reader here and wait for it (single-threaded callers only)."""
    if not req.paths:
        return []
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(req, w)
    os.close(w)
    chunks = []
    total = 0
    with os.fdopen(r, "rb") as f:
        while total <= _limit(req.paths):
            chunk = f.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    os.waitpid(pid, 0)
    return _decode(b"".join(chunks), req.paths)


# ------------------------------------------------------------ the fork server


class ForkServer:
    """A single-threaded child of the daemon that forks reader children."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self.pid = 0

    def start(self) -> "ForkServer":
        """Call before any thread exists."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                # keep nothing of the daemon's: not its listening socket, not
                # a frontend's connection, not the log file
                keep = theirs.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, _max_fd())
                _serve(theirs)
            except BaseException:  # noqa: BLE001
                code = 70
            finally:
                os._exit(code)
        theirs.close()
        self._sock, self.pid = ours, pid
        return self

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass

    async def read(self, req: ReadRequest, timeout: float = TIME_LIMIT + 1) -> list[FileRead]:
        if not req.paths:
            return []
        if self._sock is None:
            return _failed(req.paths, "reader not running")
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)  # the child's end stays blocking
        try:
            socket.send_fds(self._sock, [req.to_wire()], [w])
        except OSError as exc:
            os.close(r)
            return _failed(req.paths, f"reader fork server not reachable ({exc.strerror or exc})")
        finally:
            os.close(w)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        chunks: list[bytes] = []
        limit = _limit(req.paths)
        size = 0

        def readable() -> None:
            nonlocal size
            try:
                chunk = os.read(r, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if chunk:
                chunks.append(chunk)
                size += len(chunk)
            if (not chunk or size > limit) and not done.done():
                done.set_result(None)

        loop.add_reader(r, readable)
        try:
            await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            return _failed(req.paths, f"reader timed out after {timeout:.0f} s")
        finally:
            loop.remove_reader(r)
            os.close(r)
        return _decode(b"".join(chunks), req.paths)


def _max_fd() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY and soft < 1 << 20 else 1 << 16


def _serve(sock: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # readers are reaped by the kernel
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, _CONTROL_MAX, 1)
        except InterruptedError:
            continue
        if not data:
            return
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        out_fd = fds[0]
        try:
            req = ReadRequest.from_wire(data)
        except Exception:  # noqa: BLE001
            os.close(out_fd)
            continue
        pid = os.fork()
        if pid == 0:
            sock.close()
            _child(req, out_fd)
        os.close(out_fd)
