"""Adversarial review of the upstream connection cache (smarthostCache,
sendooway_front/_pool.py and its use in _relay.py / _server.py) and of the
PROXY protocol reader. Each test states a finding and fails against the
code as it was reviewed."""

from __future__ import annotations

import asyncio

from sendooway_shared.types import Route, Secret, TlsMode
from sendooway_front import _upstream
from sendooway_front._pool import MAX_IDLE, UpstreamPool
from sendooway_front._relay import Relay
from sendooway_front._relay_api import MailParams
from tests.upstream import capture_log, config, info, run


class _QuitBlackhole:
    """A plain upstream (no AUTH) that answers every command but never
    answers QUIT and never closes: a user's own upstream (any host a user
    names in ~/.sendoowayrc or ~/.fetchmailrc) can behave like this.
    Counts the connections still open on its side."""

    def __init__(self) -> None:
        self.open = 0
        self.accepted = 0

    async def handle(self, reader, writer):
        self.open += 1
        self.accepted += 1
        try:
            writer.write(b"220 blackhole ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-blackhole\r\n250 PIPELINING\r\n")
                elif verb == b"QUIT":
                    continue  # never answered, never closed by us
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.open -= 1
            writer.close()


def _route(port: int) -> Route:
    return Route("127.0.0.1", port, TlsMode.PLAIN, auth=False, password=Secret(""),
                 source="u.rc:1")


def test_connections_over_the_idle_cap_stay_open_outside_any_bound(monkeypatch):
    """Finding: the idle cap (MAX_IDLE = 32, 4 per key) does not bound the
    upstream sockets the pool holds. Every connection released past the
    per-key (or global) cap is 'evicted' by starting a QUIT in a background
    task (_pool.py _evict -> _background), and that QUIT keeps the socket
    open for QUIT_WAIT (5 s) plus aclose's 2 s when the upstream does not
    answer. Nothing limits how many such tasks run: one user whose upstream
    ignores QUIT and who ends sessions quickly (or changes route in one
    session: MAIL for route A, MAIL for route B releases A...) makes the
    frontend hold N upstream sockets for ~7 s each, outside the per-session
    descriptor budget of session_limit() ((NOFILE - 64) / 3 per session):
    the process runs into EMFILE and every user's accept() and authenticator
    link fails. Here 48 sessions of one user end at once: 44 connections
    past the cap are still open on the upstream's side 0.5 s later, 48 in
    all, above the 32 the cap promises."""
    monkeypatch.setattr(_upstream, "QUIT_WAIT", 3.0)  # (keeps the test short; 5 s in production)
    hole = _QuitBlackhole()
    n = 48

    async def go():
        server = await asyncio.start_server(hole.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        log, _ = capture_log()
        pool = UpstreamPool(30, log)
        relays = [Relay(config(smarthostCache=30, timeout=30), log, pool) for _ in range(n)]
        try:
            replies = await asyncio.gather(*(r.mail(info(), _route(port), f"s{i}@x.y", MailParams())
                                             for i, r in enumerate(relays)))
            assert all(r.code == 250 for r in replies)
            for r in relays:
                await r.close()   # the end of each client session: back to the pool
            await asyncio.sleep(0.5)
            return pool.idle_count(), hole.open, len(pool._tasks)
        finally:
            for task in list(pool._tasks):
                task.cancel()
            for entries in list(pool._idle.values()):
                for e in entries:
                    e.client.abort()
            server.close()

    idle, still_open, quitting = run(go(), timeout=60)
    assert idle == 4
    assert still_open <= MAX_IDLE, (
        f"{still_open} upstream connections still open after the sessions ended"
        f" ({idle} kept, {quitting} waiting for a QUIT reply in the background)")


class _DeadAfterFirstMessage:
    """A plain upstream (PIPELINING, no SMTPUTF8) whose every connection
    goes silent after its first message: the link of a kept connection that
    a NAT or firewall forgot while it was idle. A new connection works."""

    def __init__(self) -> None:
        self.connections = 0

    async def handle(self, reader, writer):
        self.connections += 1
        messages = 0
        try:
            writer.write(b"220 up ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if messages and verb != b"QUIT":
                    await asyncio.sleep(3600)  # black-holed: never answers again
                if verb == b"EHLO":
                    writer.write(b"250-up\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    await reader.readuntil(b"\r\n.\r\n")
                    messages += 1
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def test_a_kept_connection_escapes_its_probe_after_a_local_smtputf8_refusal(monkeypatch):
    """Finding: a kept connection is meant to be probed (RSET, answered
    within PROBE_TIMEOUT = 5 s) before its first use, so a link that went
    silently dead while idle costs 5 s, not the whole `timeout` (300 s by
    default). In Relay._mail (_relay.py, the `isinstance(command, Reply)`
    return) a connection just taken from the pool is handed back to the
    session unprobed when the MAIL is refused locally (553 5.6.7: SMTPUTF8
    asked, the upstream does not offer it). The client's next MAIL (the same
    sender without SMTPUTF8, the obvious retry) then goes straight onto it:
    `from_pool` is recomputed as False on the next call, so no probe, no
    5 s bound, and a dead link is only noticed after the full `timeout`
    (here 15 s) before the transparent reconnect."""
    import time

    from sendooway_front import _relay

    monkeypatch.setattr(_relay, "PROBE_TIMEOUT", 1.0)  # (5 s in the product)
    up = _DeadAfterFirstMessage()

    async def go():
        server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        log, _ = capture_log()
        pool = UpstreamPool(30, log)
        cfg = config(smarthostCache=30, timeout=15, addReceivedField=False)
        try:
            first = Relay(cfg, log, pool)
            replies = await first.mail_group(info(), _route(port), "a@x.y", MailParams(),
                                             ["r@x.y"], True)
            assert [r.code for r in replies] == [250, 250]
            assert (await first.data_start()).code == 354
            await first.data_chunk(b"hello")
            assert (await first.data_end()).code == 250
            await first.close()
            assert pool.idle_count() == 1   # kept; its link now silently dead

            relay = Relay(cfg, log, pool)
            refused = await relay.mail(info(), _route(port), "b@x.y", MailParams(smtputf8=True))
            t0 = time.monotonic()
            again = await relay.mail(info(), _route(port), "b@x.y", MailParams())
            took = time.monotonic() - t0
            relay._drop()
            await pool.close_all()
            return refused, again, took
        finally:
            server.close()

    refused, again, took = run(go(), timeout=60)
    assert refused.code == 553
    assert again.code == 250   # (transparent either way, once it reconnects)
    assert took < 4, f"the retry's MAIL answered after {took:.1f}s: the kept connection was never probed"
