"""The daemon's table of per-user reader workers (see _reader).

One worker per UserInfo (name, ids, groups and home: a changed group list
or home gets a new worker), one lookup at a time on each, at most IN_FLIGHT
lookups at once in all. A worker idle for `idle` seconds, older than
`max_age`, or least recently used when the table is full is closed (killed
through its pidfd, which cannot hit a recycled pid). A worker that is gone before it
takes a request (killed by its user, past its lifetime) is replaced and the
lookup asked again once; one that dies, answers garbage or times out after
taking it fails that lookup (temporary failure) and is replaced next time.
After a reload (`reconfigured`) no worker forked before it takes another
lookup: they hold the old config.
"""

from __future__ import annotations

import asyncio
import enum
import os
import select
import signal
import socket
from collections import OrderedDict

from ._reader import (
    ACK, LENGTH, MAX_SENDER, REQUEST, REQUEST_FOR, SENDER_LENGTH, TIME_LIMIT, WORKER_LIFETIME,
    ForkServer, _decode, _failed,
)
from ._users import UserInfo
from .routes import MAX_ACCOUNTS, MAX_WIRE, UserRoutes

IDLE = 60.0
MAX_WORKERS = 64
MAX_AGE = WORKER_LIFETIME - 30  # replaced before the worker's own limit strikes
IN_FLIGHT = 16  # lookups answered at once (each answer may be a few MiB)


class Outcome(enum.Enum):
    ANSWERED = "answered"
    GONE = "gone"  # never took the request: ask a fresh worker
    FAILED = "failed"  # took it and broke: the lookup failed


class Worker:
    """One user's worker, seen from the daemon."""

    def __init__(self, user: UserInfo, sock: socket.socket, now: float,
                 generation: int = 0) -> None:
        self.user = user
        self.sock = sock
        self.generation = generation  # the pool's config generation when it was forked
        self.lock = asyncio.Lock()
        self.born = self.last_used = now
        self.pid = 0
        self.pidfd = -1
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.not_started = ""  # why the fork server could not fork it

    async def ask(self, timeout: float, sender: str | None = None) -> tuple[Outcome, bytes | str]:
        """One lookup (of the account for `sender` only, when given):
        (ANSWERED, answer) or (GONE or FAILED, why)."""
        if sender is None:
            request = REQUEST
        else:
            encoded = sender.encode("utf-8", "surrogatepass")[:MAX_SENDER]
            request = REQUEST_FOR + SENDER_LENGTH.pack(len(encoded)) + encoded
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                if not self.pid and not await self._started(loop):
                    return Outcome.GONE, self.not_started or "reader worker died before it started"
                try:
                    await loop.sock_sendall(self.sock, request)
                    ack = await loop.sock_recv(self.sock, 1)
                except OSError:
                    ack = b""
                if ack != ACK:
                    return Outcome.GONE, "reader worker gone"
                (size,) = LENGTH.unpack(await _recv_exactly(loop, self.sock, LENGTH.size))
                if size > MAX_WIRE:
                    return Outcome.FAILED, f"reader worker answered {size} bytes"
                return Outcome.ANSWERED, await _recv_exactly(loop, self.sock, size)
        except TimeoutError:
            return Outcome.FAILED, f"reader timed out after {timeout:.0f} s"
        except (EOFError, OSError):
            return Outcome.FAILED, "reader worker died during the lookup"

    async def _started(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Wait for the fork server's word: the worker's pid and pidfd."""
        while True:
            ready = loop.create_future()
            loop.add_reader(self.sock, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(self.sock)
            try:
                return self._take_pid()
            except BlockingIOError:
                continue

    def _take_pid(self) -> bool:
        # the pid, or 0 and the errno of a fork() that failed (nothing else
        # comes before the worker's ACK, which comes only after a request)
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 2 * LENGTH.size, 1)
        if fds:
            self.pidfd = fds[0]
        if len(data) < LENGTH.size:
            return False
        (self.pid,) = LENGTH.unpack(data[:LENGTH.size])
        if self.pid == 0 and len(data) == 2 * LENGTH.size:
            (code,) = LENGTH.unpack(data[LENGTH.size:])
            self.not_started = f"cannot fork a reader worker ({os.strerror(code)})"
        return self.pid > 0

    def kill(self) -> None:
        """SIGKILL the worker and close its socket (idempotent); the pidfd
        stays open, so its end can be awaited."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if not self.pid:
            try:  # never asked: the fork server's word may be waiting already
                self._take_pid()
            except OSError:
                pass  # not forked yet, or gone: it reads EOF and exits
        try:
            if self.pidfd >= 0:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            elif self.pid and not _hung_up(self.sock):  # no pidfd (Linux < 5.3), still alive
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # gone already
        except PermissionError:
            pass  # no CAP_KILL (a sandboxed authenticator): it reads EOF and exits
        self.sock.close()

    def close(self) -> None:
        self.kill()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def _hung_up(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, 0)
    return any(events & (select.POLLHUP | select.POLLERR) for _fd, events in poller.poll(0))


class WorkerPool:
    """The daemon's readers: `lookup` a user's routes, `prewarm` a worker."""

    def __init__(self, forks: ForkServer, idle: float = IDLE, cap: int = MAX_WORKERS,
                 max_age: float = MAX_AGE) -> None:
        self.forks = forks
        self.idle = idle
        self.cap = cap
        self.max_age = max_age
        self._workers: OrderedDict[UserInfo, Worker] = OrderedDict()  # least recently used first
        self._in_flight = asyncio.Semaphore(IN_FLIGHT)
        self.generation = 0  # one more with each reload of the config

    def reconfigured(self) -> None:
        """The fork server has a new config: close the idle workers now; a
        busy one finishes the lookup it took before the reload and is then
        closed. Lookups from now on go to workers forked afterwards."""
        self.generation += 1
        for worker in list(self._workers.values()):
            if not worker.lock.locked():
                self._drop(worker)

    def __len__(self) -> int:
        return len(self._workers)

    def prewarm(self, user: UserInfo) -> None:
        """Have the user's worker forked now (after a login), so the route
        request that follows finds it ready. Failures wait for the lookup."""
        self._worker_for(user)

    async def lookup(self, user: UserInfo, sender: str | None = None,
                     timeout: float = TIME_LIMIT + 1) -> UserRoutes:
        """The user's routes, read and parsed afresh by the user's worker;
        with `sender`, only the account chosen for it (and every error)."""
        retried = False
        while True:
            worker = self._worker_for(user)
            if isinstance(worker, str):
                return _failed(user, worker)
            try:
                async with asyncio.timeout(timeout):
                    await worker.lock.acquire()
            except TimeoutError:
                return _failed(user, f"reader busy for more than {timeout:.0f} s")
            try:
                if worker.closed or self._stale(worker):
                    self._drop(worker)
                    continue  # replaced or reloaded while we waited
                async with self._in_flight:
                    try:
                        outcome, answer = await worker.ask(timeout, sender)
                    except asyncio.CancelledError:
                        # its answer may still come: never read it as the next one's
                        self._drop(worker)
                        raise
                worker.last_used = asyncio.get_running_loop().time()
                if self._stale(worker):
                    self._drop(worker)  # a reload came during the lookup: no more from it
            finally:
                worker.lock.release()
            if outcome is Outcome.ANSWERED:
                assert isinstance(answer, bytes)
                # for one sender, the one account the worker chose for it
                return _decode(answer, user, 1 if sender is not None else MAX_ACCOUNTS)
            self._drop(worker)
            assert isinstance(answer, str)
            if outcome is Outcome.GONE and not retried:
                retried = True
                continue
            return _failed(user, answer)

    def close(self) -> None:
        """Kill every worker and wait (at most a second) until they are gone."""
        workers = list(self._workers.values())
        self._workers.clear()
        poller = select.poll()
        for worker in workers:
            worker.kill()
            if worker.pidfd >= 0:
                poller.register(worker.pidfd, select.POLLIN)  # readable once it exited
        left = sum(w.pidfd >= 0 for w in workers)
        while left and (events := poller.poll(1000)):
            for fd, _ in events:
                poller.unregister(fd)
                left -= 1
        for worker in workers:
            worker.close()

    # ------------------------------------------------------------ the table

    def _worker_for(self, user: UserInfo) -> Worker | str:
        """The user's live worker, or a new one (or why there is none)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        worker = self._workers.get(user)
        # a busy one is returned even when stale: its lookup ends, it is
        # closed, and whoever waited for its lock comes back here
        if worker is not None and (worker.lock.locked() or (
                now - worker.born < self.max_age and not self._stale(worker))):
            self._workers.move_to_end(user)
            return worker
        if worker is not None:
            self._drop(worker)
        self._make_room()
        try:
            sock = self.forks.spawn(user)
        except OSError as exc:
            # (no socketpair for it: out of descriptors; or the fork server is gone)
            return f"cannot ask the reader fork server for a worker ({exc.strerror or exc})"
        worker = Worker(user, sock, now, self.generation)
        worker.timer = loop.call_later(self.idle, self._expire, worker)
        self._workers[user] = worker
        return worker

    def _stale(self, worker: Worker) -> bool:
        return worker.generation != self.generation

    def _make_room(self) -> None:
        """Close least recently used idle workers until one more fits. Busy
        ones are not closed: while every worker is busy the table may grow
        past the cap, by at most the lookups under way."""
        for worker in list(self._workers.values()):
            if len(self._workers) < self.cap:
                return
            if not worker.lock.locked():
                self._drop(worker)

    def _expire(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        idle = loop.time() - worker.last_used
        if worker.closed:
            return
        if worker.lock.locked():
            worker.timer = loop.call_later(self.idle, self._expire, worker)
        elif idle < self.idle:
            worker.timer = loop.call_later(self.idle - idle, self._expire, worker)
        else:
            self._drop(worker)

    def _drop(self, worker: Worker) -> None:
        if self._workers.get(worker.user) is worker:
            del self._workers[worker.user]
        worker.close()
