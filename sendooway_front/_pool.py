"""The smarthostCache: logged-in upstream connections kept for the next message.

A connection is only ever reused under the same upstream identity: the key
holds server, port, TLS mode and checks, upstream user and password, and the
EHLO name (which differs per client with cloneEhlo). One that spoke while
idle is dropped; the taker probes the others with RSET (pipelined with its
MAIL) and connects afresh when the probe fails.
Idle connections are capped and expire after `smarthostCache` seconds; all
of them are closed (QUIT) on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from sendooway_shared.types import Route, Secret, TlsMode

from ._stream import Lately
from ._upstream import UpstreamClient

MAX_IDLE = 32          # idle connections in all
MAX_IDLE_PER_KEY = 4   # idle connections for one identity
PROBE_TIMEOUT = 5.0    # seconds an RSET probe may take before the connection is given up
KEPT_IDLE = 10.0       # seconds a session's own connection may idle before its next MAIL probes it
# Messages one upstream connection carries before it is QUIT: Exim delivers
# only the first smtp_accept_queue_per_connection (default 10) messages of a
# connection at once and merely queues the rest until its next queue run.
MAX_MESSAGES = 10
# Seconds a login the upstream refused (535) is not tried again with the same
# credentials, and how many such refusals a process remembers (refused_logins).
LOGIN_REFUSED_FOR = 300.0
LOGIN_REFUSED_KEPT = 1024
# Pauses (s) before each new try after giving idle connections back to a
# server that refused a connection at its greeting (a limit per client host).
GIVE_BACK_PAUSES = (0.05, 0.2, 0.5)


@dataclass(frozen=True)
class PoolKey:
    server: str
    port: int
    tls: TlsMode
    cert_check: bool
    ca_file: str
    auth: bool
    user: str
    password: Secret
    ehlo_name: str

    @classmethod
    def of(cls, route: Route, ca_file: str, ehlo_name: str) -> "PoolKey":
        return cls(route.server.lower(), route.port, route.tls, route.cert_check, ca_file,
                   route.auth, route.user if route.auth else "",
                   route.password if route.auth else Secret(""), ehlo_name)

    def __repr__(self) -> str:  # never shows the password (Secret's repr is redacted anyway)
        return f"PoolKey({self.server}:{self.port} {self.tls.value} user={self.user!r} ehlo={self.ehlo_name!r})"


# Upstream logins refused lately (a 5xx to AUTH: wrong credentials), by
# PoolKey without the EHLO name (server, port, TLS, user, password...), with
# what the upstream said. While one is remembered, a MAIL for that route is
# answered 454 without connecting: a stale password in a user's file used
# to cost a failed login upstream for every retry of every client of that
# identity (a satellite MTA flushing its queue: one per message), and a
# smarthost counts failures per client address (fail2ban, Dovecot's auth
# penalty, Exim's ratelimits), which is the proxy's address for all its
# users. A changed password (another key) is tried at once; a login that
# succeeds forgets the refusal.
refused_logins = Lately(LOGIN_REFUSED_FOR, LOGIN_REFUSED_KEPT)


@dataclass
class _Idle:
    client: UpstreamClient
    since: float
    timer: asyncio.TimerHandle | None = None


class UpstreamPool:
    """Idle upstream connections of one process (one event loop)."""

    def __init__(self, ttl: float, log: logging.Logger | None = None,
                 max_idle: int = MAX_IDLE, max_per_key: int = MAX_IDLE_PER_KEY) -> None:
        self.ttl = ttl
        self.max_idle = max_idle
        self.max_per_key = max_per_key
        self.log = log or logging.getLogger("sendooway")
        self.loop = asyncio.get_running_loop()
        self._idle: dict[PoolKey, list[_Idle]] = {}
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self.hits = 0  # kept connections handed out (tests read it)

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and not self._closing

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def acquire(self, key: PoolKey) -> UpstreamClient | None:
        """A kept connection for `key`, the most recently used first, or None
        (connect afresh). Not probed: the caller sends RSET with its MAIL."""
        entries = self._idle.get(key)
        while entries:
            entry = entries.pop()  # the most recently used first
            if not entries:
                self._idle.pop(key, None)
            if entry.timer is not None:
                entry.timer.cancel()
            client = entry.client
            if not client.spoke_unasked():  # (a 421 before closing, a late reply)
                self.hits += 1
                return client
            self.log.info("upstream %s: cached connection went stale, reconnecting", client.address)
            client.abort(keep_session=True)  # (ended by the upstream while idle, or told so)
            entries = self._idle.get(key)
        return None

    async def release(self, key: PoolKey, client: UpstreamClient) -> None:
        """Keep `client` (out of any transaction) for `ttl` seconds, or QUIT it
        (also once it carried MAX_MESSAGES, or refused anything: `refused`)."""
        if not self.enabled or client.messages >= MAX_MESSAGES or client.refused:
            await client.quit()
            return
        entries = self._idle.setdefault(key, [])
        entry = _Idle(client, time.monotonic())
        entry.timer = self.loop.call_later(self.ttl, self._expire, key, entry)
        entries.append(entry)
        while len(entries) > self.max_per_key:
            self._evict(key, entries[0])
        while self.idle_count() > self.max_idle:
            oldest_key, oldest = min(((k, e[0]) for k, e in self._idle.items() if e),
                                     key=lambda ke: ke[1].since)
            self._evict(oldest_key, oldest)

    async def give_back(self, server: str) -> int:
        """QUIT every idle connection to `server` (any port, any identity) and
        wait for them: it refused a new connection at its greeting, maybe
        because of the ones we keep (a limit per client host). How many."""
        server = server.lower()
        entries = [(k, e) for k, v in self._idle.items() if k.server == server for e in v]
        await self._quit(entries)
        return len(entries)

    def _remove(self, key: PoolKey, entry: _Idle) -> bool:
        entries = self._idle.get(key)
        if not entries or entry not in entries:
            return False
        entries.remove(entry)
        if not entries:
            self._idle.pop(key, None)
        if entry.timer is not None:
            entry.timer.cancel()
        return True

    def _evict(self, key: PoolKey, entry: _Idle) -> None:
        if self._remove(key, entry):
            if self.idle_count() + len(self._tasks) >= self.max_idle:
                # kept plus QUITs under way as many as may be kept in all:
                # an upstream that never answers them must not pile sockets up
                entry.client.abort()
            else:
                self._background(entry.client.quit())

    def _expire(self, key: PoolKey, entry: _Idle) -> None:
        self._evict(key, entry)

    def _background(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_all(self) -> None:
        """QUIT every idle connection (SIGTERM, end of the process). No more are kept."""
        self._closing = True
        await self._quit([(k, e) for k, v in self._idle.items() for e in v], also=list(self._tasks))

    async def _quit(self, entries: list[tuple[PoolKey, _Idle]], also: list | None = None) -> None:
        """Take `entries` out of the pool and QUIT them, waiting (with the
        tasks `also`) 10 s at most: each QUIT waits QUIT_WAIT s for its
        reply; whatever is left then is cut."""
        for k, e in entries:
            self._remove(k, e)
        tasks = [self.loop.create_task(e.client.quit()) for _k, e in entries] + (also or [])
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
            for _k, e in entries:
                e.client.abort()  # (a no-op after a QUIT that finished)


_pools: dict[asyncio.AbstractEventLoop, UpstreamPool] = {}


def shared_pool(ttl: float, log: logging.Logger | None = None) -> UpstreamPool:
    """The process's pool for the running event loop (made on first use)."""
    loop = asyncio.get_running_loop()
    for other in [lp for lp in _pools if lp.is_closed()]:
        del _pools[other]
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = UpstreamPool(ttl, log)
    return pool


async def close_shared_pool() -> None:
    """Close the running loop's pool, if any (call on SIGTERM / at exit)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.close_all()
