"""One frontend connection: frames in, permits checked, answers out."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque

from sendooway_shared.log import Tally
from sendooway_shared.protocol import (
    REQUESTS, VERSION, AuthFail, AuthOk, AuthRequest, Error, FrameDecoder, Hello, Message,
    NoRoute, ProtocolError, RouteOk, RouteRequest, Welcome, encode,
)

from ._logfmt import field
from ._permits import Outcome, Permits, State, Violation
from ._service import AuthService, Peer

log = logging.getLogger("sendooway-auth")
READ_SIZE = 65536
CLOSE_WAIT = 1.0  # seconds a closing connection may take to flush our last answer
HELLO_WITHIN = 30.0   # seconds at most (`timeout` if lower): a frontend sends it as it connects
LOGIN_IDLE = 4        # x `timeout` between requests before a login (a client's way to AUTH)
# Connections closed by those limits: a process of the frontend user's that
# hoards connections would otherwise write a line for each
SILENT = Tally(log, "silent connection closed: %s %s: %s; %d closed since the last such line")


def sendable(route) -> RouteOk:
    """The route_ok for `route`, checked to fit the wire; when only the
    user's CA certificates make it too big, without them (the frontend then
    opens `ca_file` itself, or fails TLS: a temporary 454, not a 550).
    Raises ProtocolError when it cannot be sent at all."""
    return sendable_frame(route)[0]


def sendable_frame(route) -> tuple[RouteOk, bytes]:
    """sendable's route_ok and its frame: the encoding that checked it is
    the one sent (it was encoded again to be sent, ~17 us a route answer)."""
    reply = RouteOk.from_route(route)
    try:
        frame = encode(reply)
    except ProtocolError as exc:
        if not route.ca_pem:
            raise
        log.warning("route of %s: %s; its sslCA certificates are left out",
                    field(route.source), exc)
        reply = dataclasses.replace(reply, ca_pem="")
        frame = encode(reply)
    return reply, frame


class Connection:
    def __init__(self, service: AuthService, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, origin: str, limit_silence: bool = False) -> None:
        self.service = service
        # the daemon's connections (anyone running as the frontend user may
        # open them); not --fd's socketpair, whose hello waits for the client
        # (a PROXY header, a TLS handshake) and which nobody else can reach
        self.limit_silence = limit_silence
        self.reader = reader
        self.writer = writer
        self.origin = origin  # "uid=N pid=N" or "fd=N", for logs
        self.permits = Permits(service.cfg.maxAuthFailures)
        self.peer = Peer()
        self.user = None
        # loop times the silence limits count from (see _silence_limit)
        self._opened = self._answered = 0.0
        self._frame_began: float | None = None

    async def run(self) -> None:
        decoder = FrameDecoder(REQUESTS)
        pending: deque[Message] = deque()
        loop = asyncio.get_running_loop()
        self._opened = self._answered = loop.time()
        try:
            while not self.permits.closed:
                if not pending:
                    # (a broken frame read behind good ones: refused once
                    # they are answered, as when it comes in a read of its own)
                    data = b"" if decoder.held else await self._read()
                    if not data and not decoder.held:
                        return
                    try:
                        pending.extend(decoder.feed(data))
                    except ProtocolError as exc:
                        await self._refuse(f"protocol error: {exc}")
                        return
                    if not decoder.pending:
                        self._frame_began = None
                    elif self._frame_began is None:
                        self._frame_began = loop.time()
                    continue
                msg = pending.popleft()
                try:
                    self.permits.admit(msg)
                except Violation as exc:
                    await self._refuse(f"not permitted: {exc}")
                    return
                await self._answer(msg)
                self._answered = loop.time()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            await self._close()

    async def _close(self) -> None:
        """Close, and take the close's own error (EPIPE: the frontend left
        first): left in its future, it could be logged at garbage collection
        as "Future exception was never retrieved" with a traceback (seen
        once under load, a log review). Bounded: a frontend that reads
        nothing would hold the close while our last answer waits to go."""
        self.writer.close()
        try:
            async with asyncio.timeout(CLOSE_WAIT):  # (no task per connection, unlike wait_for)
                await self.writer.wait_closed()
        except (OSError, asyncio.TimeoutError):
            pass

    def _silence_limit(self) -> tuple[float | None, str]:
        """When (loop time) the peer's time is up, and what it then failed to
        do: the earliest of the limits that apply. Each counts from the
        connection's start, the frame's first octet or our last answer, not
        from the peer's last octet: one octet per `timeout` trickled into a
        frame held a connection for ever (a frames review). A logged-in
        connection is the frontend's SMTP session, whose length the
        frontend bounds (its reads are timed); none of ours then."""
        if not self.limit_silence:
            return None, ""
        timeout = float(self.service.cfg.timeout)
        limits = []
        if self._frame_began is not None:
            limits.append((self._frame_began + timeout,
                           f"a frame left unfinished for {timeout:g}s"))
        if self.permits.state is State.EXPECT_HELLO:
            limit = min(timeout, HELLO_WITHIN)
            limits.append((self._opened + limit, f"no hello within {limit:g}s"))
        elif self.permits.state is State.EXPECT_AUTH:
            limits.append((self._answered + LOGIN_IDLE * timeout,
                           f"no login request within {LOGIN_IDLE * timeout:g}s"))
        return min(limits, default=(None, ""))

    async def _read(self) -> bytes:
        """The next bytes from the frontend, or b"" when it closed or its
        time ran out (then told, without waiting for it to read)."""
        deadline, what = self._silence_limit()
        try:
            async with asyncio.timeout_at(deadline):
                return await self.reader.read(READ_SIZE)
        except TimeoutError:
            SILENT.note(self.origin, self.peer.fields(), what)
            self.writer.write(encode(Error(f"closed: {what}")))
            return b""

    async def _answer(self, msg: Message) -> None:
        if isinstance(msg, Hello):
            self.peer = Peer(msg.session, msg.client)
            if self.permits.hello(msg) is Outcome.HELLO_BAD_VERSION:
                await self._refuse(f"unsupported protocol version {msg.version}"
                                   f" (this is version {VERSION})")
                return
            await self._send(Welcome(VERSION))
        elif isinstance(msg, AuthRequest):
            result = await self.service.authenticate(msg.user, msg.password, self.peer)
            if result.temporary:
                self.permits.auth_unavailable()
                await self._refuse("temporary failure: authentication is unavailable")
            elif result.ok:
                assert result.user is not None
                self.user = result.user
                self.permits.auth_ok(result.user.name)
                await self._send(AuthOk(result.user.name))
            else:
                outcome = self.permits.auth_failed()
                await self._send(AuthFail())
                if outcome is Outcome.AUTH_FAILED_LAST:
                    log.warning("auth closed: user=%s client=%s reason=too-many-failures"
                                " failures=%d session=%s", field(msg.user),
                                self.peer.client_field, self.permits.failures,
                                field(self.peer.session))
        elif isinstance(msg, RouteRequest):
            assert self.user is not None and self.user.name == self.permits.user
            route, temporary = await self.service.route(self.user, msg.sender, self.peer)
            if temporary:
                self.permits.route_failed()
                await self._refuse("temporary failure: the user's files could not be read")
                return
            self.permits.route_answered()
            frame = None
            if route is not None:
                try:
                    _reply, frame = sendable_frame(route)
                except ProtocolError as exc:  # e.g. a 300-character server name in a user file
                    log.warning("route unusable: user=%s source=%s reason=\"%s\"",
                                field(self.user.name), field(route.source), exc)
            await self._send_frame(frame if frame is not None else encode(NoRoute()))
        else:  # pragma: no cover - admit() lets nothing else through
            raise AssertionError(f"bug: no handler for {msg.TYPE}")

    async def _send(self, msg: Message) -> None:
        await self._send_frame(encode(msg))

    async def _send_frame(self, frame: bytes) -> None:
        self.writer.write(frame)
        await self.writer.drain()

    async def _refuse(self, reason: str) -> None:
        reason = "".join(c if c.isprintable() and c != '"' else "?" for c in reason)[:300]
        log.warning('connection closed: %s %s reason="%s"', self.origin, self.peer.fields(),
                    reason)
        try:
            await self._send(Error(reason))
        except (ConnectionError, ProtocolError):
            pass
