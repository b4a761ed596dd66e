"""The reader child: a user's lookup runs in a process that is that user.

Every lookup happens in a short-lived child that first drops to the user's
uid, gid and groups (so NFS root_squash, symlinks to /etc/shadow and files
the user may not read behave as they would for the user), changes to the
user's home, reads the files (regular files only, bounded, see _files),
parses them and sends back the result (routes.to_wire), then exits. It dies
by SIGALRM after TIME_LIMIT. Hostile files are thus parsed with the user's
rights and CPU, never in the root process, which checks the answer like
protocol input.

The daemon has PAM threads, and forking a threaded process is fragile, so it
starts a tiny single-threaded *fork server* before any thread exists; the fork
server only forks readers. `lookup_direct` forks in place and is for the
single-threaded --check.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket

import msgpack

from sendooway_shared.config import Config

from ._files import Budget, read_one
from ._users import UserInfo
from .routes import MAX_WIRE, UserRoutes, WireError, from_wire, run_plan, to_wire

TIME_LIMIT = 5  # seconds a reader child may live
_CONTROL_MAX = 64 * 1024


def _user_to_wire(user: UserInfo) -> bytes:
    return msgpack.packb([user.name, user.uid, user.gid, list(user.groups), user.home])


def _user_from_wire(data: bytes) -> UserInfo:
    name, uid, gid, groups, home = msgpack.unpackb(data, raw=False)
    return UserInfo(name=str(name), uid=int(uid), gid=int(gid), home=str(home),
                    groups=tuple(int(g) for g in groups))


def _failed(user: UserInfo, why: str) -> UserRoutes:
    return UserRoutes(user, errors=[f"lookup failed: {why}"], failure=why)


# ------------------------------------------------------------ in the child


def _become(user: UserInfo) -> None:
    """Drop to the user for good, or raise."""
    if os.getresuid() == (user.uid,) * 3 and user.uid != 0:
        return  # already the user (authBackend = none, --check of oneself)
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (user.gid,) * 3:
        raise PermissionError("could not switch to the user")
    if user.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PermissionError("could regain root")


def _child(cfg: Config, user: UserInfo, out_fd: int) -> None:
    """Runs in the forked reader; never returns."""
    code = 70
    try:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(TIME_LIMIT)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _become(user)
        try:
            os.chdir(user.home)
        except OSError:
            os.chdir("/")
        budget = Budget()
        found = run_plan(cfg, user, lambda paths: [read_one(p, budget) for p in paths])
        view = memoryview(to_wire(found))
        while view:
            view = view[os.write(out_fd, view):]
        code = 0
    except BaseException:  # noqa: BLE001 - the child must never return
        code = 70
    finally:
        os._exit(code)


def _decode(data: bytes, user: UserInfo) -> UserRoutes:
    if not data:
        return _failed(user, "reader child died")
    try:
        return from_wire(data, user)
    except WireError as exc:
        return _failed(user, f"reader child answered garbage: {exc}")


# ------------------------------------------------------------ --check


def lookup_direct(cfg: Config, user: UserInfo) -> UserRoutes:
    """Fork a reader here and wait for it (single-threaded callers only)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(cfg, user, w)
    os.close(w)
    chunks = []
    total = 0
    with os.fdopen(r, "rb") as f:
        while total <= MAX_WIRE:
            chunk = f.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    os.waitpid(pid, 0)
    return _decode(b"".join(chunks), user)


# ------------------------------------------------------------ the fork server


def _max_fd() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY and soft < 1 << 20 else 1 << 16


class ForkServer:
    """A single-threaded child of the daemon that forks reader children."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
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
                _serve(self.cfg, theirs)
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

    async def lookup(self, user: UserInfo, timeout: float = TIME_LIMIT + 1) -> UserRoutes:
        """The user's routes, from a reader child running as the user."""
        if self._sock is None:
            return _failed(user, "reader not running")
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)  # the child's end stays blocking
        try:
            socket.send_fds(self._sock, [_user_to_wire(user)], [w])
        except OSError as exc:
            os.close(r)
            return _failed(user, f"reader fork server not reachable ({exc.strerror or exc})")
        finally:
            os.close(w)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        chunks: list[bytes] = []
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
            if (not chunk or size > MAX_WIRE) and not done.done():
                done.set_result(None)

        loop.add_reader(r, readable)
        try:
            await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            return _failed(user, f"reader timed out after {timeout:.0f} s")
        finally:
            loop.remove_reader(r)
            os.close(r)
        return _decode(b"".join(chunks), user)


def _serve(cfg: Config, sock: socket.socket) -> None:
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
            user = _user_from_wire(data)
        except Exception:  # noqa: BLE001
            os.close(out_fd)
            continue
        pid = os.fork()
        if pid == 0:
            sock.close()
            _child(cfg, user, out_fd)
        os.close(out_fd)
