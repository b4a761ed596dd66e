"""Tests written from a mutation-testing review: each pins down behaviour
that a small change to the security-critical code (the authenticator's
permit table and protocol checks, route matching, the backoff, the session
core's DATA handling, the relay's "never 250 unless the upstream said 250")
left unnoticed by the rest of the suite. Each test names what it guards."""

from __future__ import annotations

import asyncio
import logging
import socket
import types

import pytest

from sendooway_auth._connection import Connection
from sendooway_auth._service import AuthResult
from sendooway_auth._users import UserInfo
from sendooway_shared.protocol import (
    REPLIES, VERSION, AsyncChannel, AuthFail, AuthOk, AuthRequest, Error, Hello, NoRoute,
    RouteOk, RouteRequest,
)
from sendooway_shared.types import Route, Secret, TlsMode

from .auth_helpers import raw_frame

ALICE = UserInfo("alice", 1000, 1000, "/home/alice", (1000,))
ROUTE = Route("smtp.example.org", 587, TlsMode.STARTTLS, user="a", password=Secret("Up-pw-93"),
              source="/home/alice/.sendoowayrc:1")


# ------------------------------------------------------------ the authenticator's connection


class ScriptedService:
    """Stands in for AuthService: answers logins and routes from lists."""

    def __init__(self, logins: list[AuthResult], routes: list[tuple[Route | None, bool]],
                 max_failures: int = 3) -> None:
        self.cfg = types.SimpleNamespace(maxAuthFailures=max_failures)
        self.logins = list(logins)
        self.routes = list(routes)
        self.asked: list[str] = []

    async def authenticate(self, user, password, peer):
        self.asked.append(f"auth {user}")
        return self.logins.pop(0)

    async def route(self, user, sender, peer):
        self.asked.append(f"route {user.name} {sender}")
        return self.routes.pop(0)


OK = AuthResult(True, ALICE)
WRONG = AuthResult(False, None, "wrong-password")
DOWN = AuthResult(False, None, "pam-unavailable", temporary=True)


async def _serve(service: ScriptedService, talk) -> tuple[list, BaseException | None]:
    """Run one Connection over a socketpair; `talk(channel, sock)` is the
    frontend's side. Returns (what talk returned, the exception run() raised)."""
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    conn = Connection(service, reader, writer, "test")
    task = asyncio.ensure_future(conn.run())
    creader, cwriter = await asyncio.open_connection(sock=b)
    channel = AsyncChannel(creader, cwriter, REPLIES)
    try:
        result = await asyncio.wait_for(talk(channel, creader), 5)
    finally:
        cwriter.close()
    try:
        await asyncio.wait_for(task, 5)
        raised = None
    except Exception as exc:  # noqa: BLE001 - what the daemon would log as an internal error
        raised = exc
    return result, raised


async def _eof_within(reader: asyncio.StreamReader, seconds: float = 1.0) -> bool:
    """The authenticator closed the connection (nothing more came)."""
    try:
        data = await asyncio.wait_for(reader.read(65536), seconds)
    except (TimeoutError, asyncio.TimeoutError):
        return False
    except ConnectionError:  # (our last write met the closed socket)
        return True
    return data == b""


async def _send_regardless(ch, msg) -> None:
    """Send as a frontend that goes on whatever it was told (the
    authenticator may have closed already)."""
    try:
        await ch.send(msg)
    except ConnectionError:
        pass


def _run(service, talk):
    return asyncio.run(_serve(service, talk))


def test_a_temporary_route_failure_closes_the_connection_at_once():
    """Temporary route failure: one error, then the connection is closed
    (no further route is answered on it, and nothing breaks inside)."""
    service = ScriptedService([OK], [(None, True), (ROUTE, False)])

    async def talk(ch, reader):
        await ch.request(Hello(VERSION, "s", "192.0.2.7"))
        assert isinstance(await ch.request(AuthRequest("alice", Secret("pw"))), AuthOk)
        reply = await ch.request(RouteRequest("alice@example.org"))
        await _send_regardless(ch, RouteRequest("alice@example.org"))
        return reply, await _eof_within(reader)

    (reply, closed), raised = _run(service, talk)
    assert isinstance(reply, Error) and reply.reason.startswith("temporary failure")
    assert closed
    assert raised is None
    assert service.asked == ["auth alice", "route alice alice@example.org"]


def test_an_unavailable_backend_closes_the_connection_and_no_second_password_is_tried():
    """auth_unavailable closes: the frontend cannot keep trying passwords
    on a connection whose backend said it cannot decide."""
    service = ScriptedService([DOWN, OK], [])

    async def talk(ch, reader):
        await ch.request(Hello(VERSION, "s", "192.0.2.7"))
        reply = await ch.request(AuthRequest("alice", Secret("pw")))
        await _send_regardless(ch, AuthRequest("alice", Secret("pw")))
        return reply, await _eof_within(reader)

    (reply, closed), raised = _run(service, talk)
    assert isinstance(reply, Error) and "temporary failure" in reply.reason
    assert closed and raised is None
    assert service.asked == ["auth alice"]


def test_the_last_allowed_failure_closes_the_connection():
    service = ScriptedService([WRONG, WRONG, OK], [], max_failures=2)

    async def talk(ch, reader):
        await ch.request(Hello(VERSION, "s", "192.0.2.7"))
        first = await ch.request(AuthRequest("alice", Secret("x")))
        second = await ch.request(AuthRequest("alice", Secret("y")))
        await _send_regardless(ch, AuthRequest("alice", Secret("pw")))
        return first, second, await _eof_within(reader)

    (first, second, closed), raised = _run(service, talk)
    assert isinstance(first, AuthFail) and isinstance(second, AuthFail)
    assert closed and raised is None
    assert service.asked == ["auth alice", "auth alice"]


def test_a_refusal_reason_cannot_close_the_quoted_log_field(caplog):
    """The log's reason="..." must stay one field: a message type chosen by
    the peer (quoted into the reason) has its double quotes replaced."""
    service = ScriptedService([], [])

    async def talk(ch, reader):
        ch.writer.write(raw_frame({"type": 'x" user=root ok="'}))
        return await ch.receive()

    with caplog.at_level(logging.WARNING, logger="sendooway-auth"):
        reply, raised = _run(service, talk)
    assert isinstance(reply, Error) and raised is None
    [line] = [r.getMessage() for r in caplog.records if "connection closed" in r.getMessage()]
    reason = line.split('reason="', 1)[1]
    assert reason.endswith('"') and '"' not in reason[:-1], line
