"""Fake upstream SMTP servers (aiosmtpd on loopback) that record what they get.

    up = FakeUpstream(world, tls="starttls", accounts={"u": "p"})
    up.start(); ...; up.stop()
    up.messages[0].mail_from, .rcpt_tos, .data (bytes), .login

tls: "plain" (no TLS offered), "starttls" (STARTTLS offered and, when
`require_tls`, required), "tls" (implicit TLS). accounts=None means no AUTH
is offered; otherwise AUTH PLAIN/LOGIN is offered and required.
Scripted rejections: reject_mail / reject_rcpt (addresses answered 550),
fail_data (text of a 554 answer to the final dot), temp_fail_rcpt (451).
"""

from __future__ import annotations

import ssl
import threading
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
    cert_file: str | None = None
    key_file: str | None = None
    messages: list[Received] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    failed_logins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    # aiosmtpd handler hooks ------------------------------------------------

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
                                          login, list(envelope.mail_options)))
        return "250 2.0.0 queued as FAKE%d" % len(self.messages)

    def _authenticator(self, server, session, envelope, mechanism, auth_data):
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
        if not self.port:
            self.port = free_port(self.host)
        kwargs: dict = dict(
            hostname=self.host, port=self.port, decode_data=False,
            authenticator=self._authenticator if self.accounts is not None else None,
            auth_required=self.accounts is not None,
            auth_require_tls=False,
            ready_timeout=10,
        )
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
                    with ctx.wrap_socket(sock, server_hostname="localhost") as tls_sock:
                        tls_sock.recv(1024)

            self._controller._trigger_server = trigger  # type: ignore[method-assign]
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
