"""Fake upstream SMTP servers (aiosmtpd on loopback) that record what they get.

    up = FakeUpstream(world, tls="starttls", accounts={"u": "p"})
    up.start(); ...; up.stop()
    up.messages[0].mail_from, .rcpt_tos, .data (bytes), .login

tls: "plain" (no TLS offered), "starttls" (STARTTLS offered and, when
`require_tls`, required), "tls" (implicit TLS). accounts=None means no AUTH
is offered; otherwise AUTH PLAIN/LOGIN is offered and required.
Scripted rejections: reject_mail / reject_rcpt (addresses answered 550),
fail_data (text of a 554 answer to the final dot), temp_fail_rcpt (451).
auth_mechanisms: the AUTH mechanisms offered (default PLAIN and LOGIN);
"CRAM-MD5" may be added (RFC 2195, checked against `accounts`).
"""

from __future__ import annotations

import errno
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from .fakeworld import World, free_port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    login: str | None
    mail_options: list[str]
    helo: str | None = None      # the EHLO/HELO name the relay gave
    tls: bool = False            # the message came over TLS


@dataclass
class FakeUpstream:
    world: World
    tls: str = "starttls"
    accounts: dict[str, str] | None = None
    require_tls: bool = True
    host: str = "127.0.0.1"
    port: int = 0
    reject_mail: set[str] = field(default_factory=set)
    reject_rcpt: set[str] = field(default_factory=set)
    temp_fail_rcpt: set[str] = field(default_factory=set)
    fail_data: str | None = None
    auth_mechanisms: tuple[str, ...] = ("LOGIN", "PLAIN")
    data_size_limit: int | None = None  # None: aiosmtpd's default (32 MiB); 0: no limit
    pipelining: bool = False  # advertise PIPELINING (aiosmtpd reads commands in order anyway)
    cert_file: str | None = None
    key_file: str | None = None
    messages: list[Received] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    failed_logins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._controller: Controller | None = None
        self.mechanisms_used: list[str] = []
        self.quits = 0  # QUIT commands received (a kept connection closed politely)
        self.tls_resumed: list[bool] = []  # per EHLO over TLS: session resumed?

    # aiosmtpd handler hooks ------------------------------------------------

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        tls = server.transport.get_extra_info("ssl_object") if server.transport else None
        if tls is not None:  # after the handshake: was the client's session resumed?
            with self._lock:
                self.tls_resumed.append(tls.session_reused)
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_QUIT(self, server, session, envelope):
        with self._lock:
            self.quits += 1
        return "221 2.0.0 Bye"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if address in self.reject_mail:
            return "550 5.7.1 sender refused by fake upstream"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.reject_rcpt:
            return "550 5.1.1 no such user here"
        if address in self.temp_fail_rcpt:
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.fail_data is not None:
            return f"554 5.6.0 {self.fail_data}"
        login = session.auth_data.login.decode() if session.auth_data else None
        raw = envelope.original_content or b""
        with self._lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), raw,
                                          login, list(envelope.mail_options),
                                          helo=session.host_name,
                                          tls=session.ssl is not None or self.tls == "tls"))
        return "250 2.0.0 queued as FAKE%d" % len(self.messages)

    async def auth_CRAM__MD5(self, server, args):
        """AUTH CRAM-MD5 (RFC 2195): challenge, then "user hex(hmac-md5(password, challenge))"."""
        import hashlib
        import hmac
        import os as _os

        challenge = f"<{_os.urandom(8).hex()}@fake.upstream>".encode()
        answer = await server.challenge_auth(challenge)
        if not isinstance(answer, bytes):
            return AuthResult(success=False, handled=True)
        user, _, digest = answer.decode("utf-8", "replace").rpartition(" ")
        pw = (self.accounts or {}).get(user)
        expected = hmac.new(pw.encode(), challenge, hashlib.md5).hexdigest() if pw is not None else None
        with self._lock:
            self.mechanisms_used.append("CRAM-MD5")
            if expected is not None and hmac.compare_digest(expected, digest):
                self.logins.append(user)
                return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
            self.failed_logins.append(user)
        return AuthResult(success=False, handled=False)

    def _authenticator(self, server, session, envelope, mechanism, auth_data):
        with self._lock:
            self.mechanisms_used.append(mechanism)
        if not isinstance(auth_data, LoginPassword) or self.accounts is None:
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        pw = auth_data.password.decode("utf-8", "replace")
        if self.accounts.get(user) == pw:
            with self._lock:
                self.logins.append(user)
            return AuthResult(success=True, auth_data=auth_data)
        with self._lock:
            self.failed_logins.append(user)
        return AuthResult(success=False, handled=False)

    # life cycle ---------------------------------------------------------------

    def _server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file or self.world.upstream_cert_file,
                            self.key_file or self.world.upstream_key_file)
        return ctx

    def start(self) -> "FakeUpstream":
        picked = not self.port
        for attempt in range(4):
            if picked:
                self.port = free_port(self.host)
            try:
                return self._start()
            except OSError as exc:
                # free_port()'s pick taken by another process before the bind
                # (aiosmtpd re-raises create_server's error after ready_timeout)
                self._controller = None
                if not picked or attempt == 3 or exc.errno != errno.EADDRINUSE:
                    raise
        raise AssertionError("unreachable")

    def _start(self) -> "FakeUpstream":
        kwargs: dict = dict(
            hostname=self.host, port=self.port, decode_data=False,
            authenticator=self._authenticator if self.accounts is not None else None,
            auth_required=self.accounts is not None,
            auth_require_tls=False,
            ready_timeout=10,
            # not socket.getfqdn() per connection: a name lookup that can stall 5 s
            server_hostname="upstream.test",
            auth_exclude_mechanism=[m for m in ("LOGIN", "PLAIN", "CRAM-MD5")
                                    if m not in self.auth_mechanisms],
        )
        if self.data_size_limit is not None:
            kwargs["data_size_limit"] = self.data_size_limit
        if self.tls == "tls":
            kwargs["ssl_context"] = self._server_context()
        elif self.tls == "starttls":
            kwargs["tls_context"] = self._server_context()
            kwargs["require_starttls"] = self.require_tls
            kwargs["auth_require_tls"] = self.require_tls
        self._controller = Controller(self, **kwargs)
        if self.tls == "tls":
            # The readiness probe must trust the world's CA: a plain TCP connect
            # is enough to make the server build its protocol object.
            def trigger(host=self.host, port=self.port):
                import socket as _s

                with _s.create_connection((host, port), 2.0) as sock:
                    ctx = ssl.create_default_context(cafile=self.world.ca_file)
                    if self.cert_file:  # a foreign certificate: the probe only needs a handshake
                        ctx.check_hostname = False
                        ctx.verify_mode = ssl.CERT_NONE
                    with ctx.wrap_socket(sock, server_hostname="localhost") as tls_sock:
                        tls_sock.recv(1024)

            self._controller._trigger_server = trigger  # type: ignore[method-assign]
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            server, loop = self._controller.server, self._controller.loop
            if server is not None and hasattr(server, "abort_clients"):
                # Python 3.12+: aiosmtpd's stop awaits Server.wait_closed(),
                # which now waits for every connection too (a relay's kept
                # one stays open): no more listening, those open aborted, as
                # an upstream that restarts (3.11 did not wait for them)
                def end(server=server) -> None:
                    server.close()
                    server.abort_clients()
                loop.call_soon_threadsafe(end)
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# Driving the relay directly (asyncio), for the relay tests and benchmarks.

import asyncio  # noqa: E402
import logging  # noqa: E402
from dataclasses import replace  # noqa: E402

from sendooway_shared.config import Config  # noqa: E402
from sendooway_shared.types import Route, Secret, TlsMode  # noqa: E402
from sendooway_front._relay_api import MailParams, SessionInfo  # noqa: E402


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def capture_log(name: str = "relay-test") -> tuple[logging.Logger, ListHandler]:
    log = logging.getLogger(name)
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = ListHandler()
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    return log, handler


def config(**kw) -> Config:
    base = dict(localname="relay.test", timeout=5, smarthostCache=0)
    base.update(kw)
    return Config(**base)


def route_for(up, user: str | None = None, password: str | None = None, **kw) -> Route:
    """A route to a FakeUpstream: its TLS mode, the world's CA, its (first) account."""
    tls = {"plain": TlsMode.PLAIN, "starttls": TlsMode.STARTTLS, "tls": TlsMode.TLS}[up.tls]
    if up.accounts and user is None:
        user, password = next(iter(up.accounts.items()))
    fields = dict(server=up.host, port=up.port, tls=tls, ca_file=up.world.ca_file,
                  user=user or "", password=Secret(password or ""), auth=bool(up.accounts),
                  source="test.conf:1")
    fields.update(kw)
    return Route(**fields)


def info(**kw) -> SessionInfo:
    base = dict(session_id="S1", client_address="127.0.0.1:40000", client_ehlo="client.example",
                user="alice", tls=True, esmtp=True)
    base.update(kw)
    return SessionInfo(**base)


async def send(relay, route: Route, sender: str, rcpts: list[str], data: bytes,
               session: SessionInfo | None = None, params: MailParams | None = None,
               chunk: int = 65536):
    """One transaction as a session driver would run it; returns every reply."""
    replies = {"mail": await relay.mail(session or info(), route, sender, params or MailParams())}
    if not replies["mail"].is_positive:
        return replies
    replies["rcpt"] = [await relay.rcpt(r) for r in rcpts]
    if not any(r.is_positive for r in replies["rcpt"]):
        return replies
    replies["data"] = await relay.data_start()
    if replies["data"].code != 354:
        return replies
    for i in range(0, len(data), chunk):
        await relay.data_chunk(data[i:i + chunk])
    replies["end"] = await relay.data_end()
    return replies


def run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def body_after_received(raw: bytes) -> bytes:
    """The upstream's data with the Received: header (3 folded lines) cut off."""
    assert raw.startswith(b"Received: "), raw[:80]
    lines = raw.split(b"\r\n")
    i = 1
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def with_cfg(cfg: Config, **kw) -> Config:
    return replace(cfg, **kw)


class RawServer:
    """A plain-text server on 127.0.0.1 (a thread per connection) whose
    subclass's `_one(conn)` says, byte for byte, what an upstream does."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.sock.close()


def talk(port: int, lines: list[bytes], pause: float = 0.2, host: str = "127.0.0.1") -> bytes:
    """Send `lines` to a frontend, `pause` s apart, and return every byte it
    sent back until it closed (or stayed silent for 3 s)."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.settimeout(3)
        got = b""
        try:
            for line in lines:
                s.sendall(line)
                time.sleep(pause)
        except OSError:  # closed by the frontend (too many errors)
            pass
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
        return got
