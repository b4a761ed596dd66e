"""An in-process relay harness for the review tests: the real session
driver, session core and Relay, a raw client on a socketpair, and a
scripted plain-text upstream on 127.0.0.1; only the authenticator link is
a stand-in (alice's password is "pw-alice", every sender is routed to the
upstream except those @unrouted.example)."""

from __future__ import annotations

import asyncio
import logging
import socket

from sendooway_front import _driver
from sendooway_front._driver import Frontend, SessionRunner
from sendooway_front._relay import Relay
from sendooway_front._stream import Stream
from sendooway_shared.config import Config
from sendooway_shared.types import Route, Secret, TlsMode

from .front_util import login_plain
from .upstream import ListHandler

LOGIN = f"EHLO c.test\r\nAUTH PLAIN {login_plain('alice', 'pw-alice')}\r\n".encode()
UP_USER = "u"
UP_PASSWORD = "Up-Pw-71kQ"
RELAY_LOG = "review-relay"  # the Relay's logger


class Conn:
    """One upstream connection as the scripted server sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    async def send(self, data: bytes) -> None:
        self.w.write(data)
        await self.w.drain()

    async def line(self) -> bytes:
        return await self.r.readline()

    async def message(self) -> bytes:
        body = b""
        while (part := await self.r.readline()) != b".\r\n":
            if not part:
                raise ConnectionError("end of input inside the message")
            body += part
        return body


class Upstream:
    """A scripted upstream: `script(up, conn)` runs each connection."""

    def __init__(self, script) -> None:
        self.script = script
        self.messages: list[bytes] = []
        self.lines: list[bytes] = []

    async def start(self) -> "Upstream":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer) -> None:
        try:
            await self.script(self, Conn(reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def careful(up: Upstream, c: Conn, ehlo: bytes = b"250-up.test\r\n250 PIPELINING\r\n",
                  data=None, mail=None, auth=None, answer=None) -> None:
    """A well-behaved upstream; `data(up, c)` (returning False ends the
    connection), `mail(line)` and `auth(up, c, line)` replace its handling
    of DATA, MAIL and AUTH; `answer(line)`, when it returns a reply, that
    of any command but EHLO and QUIT."""
    await c.send(b"220 up.test ESMTP\r\n")
    while line := await c.line():
        up.lines.append(line)
        verb = line[:4].upper()
        reply = answer(line) if answer is not None and verb not in (b"EHLO", b"QUIT") else None
        if reply is not None:
            await c.send(reply)
        elif verb == b"EHLO":
            await c.send(ehlo)
        elif verb == b"AUTH" and auth is not None:
            await auth(up, c, line)
        elif verb == b"MAIL":
            await c.send(mail(line) if mail else b"250 2.1.0 ok\r\n")
        elif verb == b"RCPT":
            await c.send(b"250 2.1.5 ok\r\n")
        elif verb == b"DATA" and data is not None:
            if await data(up, c) is False:
                return
        elif verb == b"DATA":
            await c.send(b"354 go ahead\r\n")
            up.messages.append(await c.message())
            await c.send(b"250 2.0.0 queued\r\n")
        elif verb == b"RSET":
            await c.send(b"250 2.0.0 reset\r\n")
        elif verb == b"QUIT":
            await c.send(b"221 2.0.0 bye\r\n")
            return
        else:
            await c.send(b"502 5.5.2 what?\r\n")


class _Link:
    broken = False  # never fails

    def __init__(self, route: Route) -> None:
        self._route = route

    async def auth(self, user, password):
        return user if password.reveal() == "pw-" + user else None

    async def route(self, sender):
        return None if sender.endswith("@unrouted.example") else self._route

    def close(self) -> None:
        pass


class Connector:
    def __init__(self, route: Route) -> None:
        self.route = route

    def describe(self) -> str:
        return "review"

    async def open(self, session_id, client):
        return _Link(self.route)


def codes(out: bytes) -> list[int]:
    return [int(line[:3]) for line in out.split(b"\r\n") if line[3:4] == b" "]


async def client(fe: Frontend, steps: list) -> bytes:
    """One client session: bytes are written (then 0.3 s for the replies),
    a number is a pause in seconds. Returns all the client read."""
    a, b = socket.socketpair()
    task = asyncio.ensure_future(
        SessionRunner(fe, await Stream.from_socket(a, fe.config.timeout), "192.0.2.1:4242").run())
    reader, writer = await asyncio.open_connection(sock=b)
    for step in steps:
        if isinstance(step, (int, float)):
            await asyncio.sleep(step)
            continue
        writer.write(step)
        await writer.drain()
        await asyncio.sleep(0.3)
    out = await asyncio.wait_for(reader.read(-1), 20)
    writer.close()
    await asyncio.wait_for(task, 20)
    return out


def converse(monkeypatch, script, steps: list, auth: bool = False, source: str = "review.conf:7",
             **cfg_kw):
    """One client session through the driver and Relay to a scripted
    upstream (`cfg_kw` over timeout 3, no cache, no Received:). Returns
    (what the client read, the upstream, the log text of the frontend and
    the relay)."""

    async def go():
        up = await Upstream(script).start()
        handler = ListHandler()
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        saved = []
        for name in ("sendooway", RELAY_LOG):
            lg = logging.getLogger(name)
            saved.append((lg, lg.level, lg.propagate))
            lg.addHandler(handler)
            lg.setLevel(logging.DEBUG)
            lg.propagate = False
        monkeypatch.setattr(_driver, "make_relay",
                            lambda cfg, log: Relay(cfg, logging.getLogger(RELAY_LOG), None))
        route = Route(server="127.0.0.1", port=up.port, tls=TlsMode.PLAIN, ca_file="",
                      user=UP_USER if auth else "", password=Secret(UP_PASSWORD if auth else ""),
                      auth=auth, source=source)
        cfg = Config(**{**dict(timeout=3, smarthostCache=0, localname="relay.test",
                               addReceivedField=False), **cfg_kw})
        fe = Frontend(cfg, connector=Connector(route), hostname="mx.test")
        try:
            out = await client(fe, steps)
        finally:
            up.server.close()
            for lg, level, propagate in saved:
                lg.removeHandler(handler)
                lg.setLevel(level)
                lg.propagate = propagate
        return out, up, handler.text

    return asyncio.run(go())


def plain_route(port: int) -> Route:
    """The route of these reviews: plain SMTP to 127.0.0.1:`port`, no AUTH."""
    return Route(server="127.0.0.1", port=port, tls=TlsMode.PLAIN, ca_file="",
                 user="", password=Secret(""), auth=False, source="review.conf:1")


def serve_on_loopback(fe: Frontend, grace: float) -> tuple[int, asyncio.Future]:
    """`serve_listening` (as `sendooway -b` runs it) for `fe` on a free
    loopback port, as a task: (the port, the task). Call in a coroutine."""
    from sendooway_front import _server

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.setblocking(False)
    server = asyncio.ensure_future(_server.serve_listening(fe, [lsock], grace=grace, max_sessions=10))
    return lsock.getsockname()[1], server


class ListeningFrontend:
    """`serve_listening` (as `sendooway -b` runs it) on a loopback port,
    relaying through the Relay to `up`; the relay's log lines are kept.
    Use in a coroutine: `async with ListeningFrontend(...) as lf`, then
    lf.port, lf.server (the serve_listening task)."""

    def __init__(self, monkeypatch, up: Upstream, timeout: int, grace: float) -> None:
        self.monkeypatch, self.up, self.timeout, self.grace = monkeypatch, up, timeout, grace
        self.handler = ListHandler()

    async def __aenter__(self) -> "ListeningFrontend":
        lg = logging.getLogger(RELAY_LOG)
        self._saved = (lg.level, lg.propagate)
        lg.addHandler(self.handler)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
        self.monkeypatch.setattr(_driver, "make_relay",
                                 lambda cfg, log: Relay(cfg, logging.getLogger(RELAY_LOG), None))
        cfg = Config(timeout=self.timeout, smarthostCache=0, localname="relay.test",
                     addReceivedField=False)
        fe = Frontend(cfg, connector=Connector(plain_route(self.up.port)), hostname="mx.test")
        self.port, self.server = serve_on_loopback(fe, self.grace)
        return self

    async def __aexit__(self, *exc) -> None:
        self.up.server.close()
        lg = logging.getLogger(RELAY_LOG)
        lg.removeHandler(self.handler)
        lg.setLevel(self._saved[0])
        lg.propagate = self._saved[1]


def greeted_message(monkeypatch, greeting: bytes) -> tuple[bytes, bytes, list[bytes]]:
    """alice sends one message after `greeting` (EHLO/HELO lines, or none)
    with cloneEhlo and the Received: header on, through `careful`: (what
    the client read, the message the upstream got, its EHLO lines)."""
    from tests.front_util import login_plain

    steps = [
        greeting + b"AUTH PLAIN " + login_plain("alice", "pw-alice").encode() + b"\r\n",
        b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n",
        b"Subject: greeted\r\n\r\nhello\r\n.\r\nQUIT\r\n",
    ]
    out, up, _log = converse(monkeypatch, careful, steps, cloneEhlo=True, addReceivedField=True)
    assert b"250 2.0.0 queued" in out, out
    [message] = up.messages
    return out, message, [line for line in up.lines if line[:4].upper() == b"EHLO"]
