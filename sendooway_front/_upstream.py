"""The SMTP client that talks to one upstream smarthost.

`open_upstream()` connects (every resolved address in turn), reads the
greeting, says EHLO (HELO when refused), does STARTTLS or implicit TLS as the
route says — never falling back to plain — and logs in per the smarthost*
tristates. After that `command()` sends one line and returns the upstream's
reply, parsed with hard bounds (line length, line count) so a hostile or
broken upstream cannot make us buffer without limit.

Anything that goes wrong before the upstream's own MAIL reply is an
UpstreamError carrying the reply the client should see (4xx) and a detail
for the log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass, field

from sendooway_shared.config import Config, Ext8BitMime, SmarthostAuth
from sendooway_shared.log import printable
from sendooway_shared.types import Route, TlsMode

from . import _loops, _tls
from ._relay_api import MailParams
from ._reply import Reply
from ._stream import ConnectError, Stream, open_tcp
from ._tls import TLSError, TLSVerifyError

MAX_REPLY_LINE = 4096   # octets of one reply line, CRLF included (RFC 5321 says 512)
MAX_REPLY_LINES = 100   # lines of one multi-line reply
READ_SIZE = 16 * 1024

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)(.*)", re.S)
# C0 controls but TAB, DEL, C1 controls (CSI U+009B, NEL U+0085...) and the
# Unicode line and paragraph separators: never repeated to the client.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
QUIT_WAIT = 5.0  # seconds a QUIT's reply is waited for (SIGTERM, cache expiry)
SURPLUS_WAIT = 1.0  # seconds for the rest of a reply that came unasked after EHLO/AUTH (a 421?)
REFUSED_QUIT_WAIT = 1.0  # the same after a refused login: the client waits for its 4xx meanwhile

# Local replies (the upstream could not be used); the log has the detail.
UNREACHABLE = Reply(451, ("4.4.1 Upstream server unreachable, try again later",))
TIMED_OUT = Reply(451, ("4.4.2 Upstream server timed out, try again later",))
DROPPED = Reply(451, ("4.4.2 Upstream connection lost, try again later",))
BAD_UPSTREAM = Reply(451, ("4.5.0 Upstream server answered nonsense, try again later",))
NOT_READY = Reply(451, ("4.3.0 Upstream server not ready, try again later",))
TLS_FAILED = Reply(454, ("4.7.0 TLS with the upstream server failed",))
NO_STARTTLS = Reply(454, ("4.7.0 Upstream server does not offer STARTTLS",))
AUTH_FAILED = Reply(454, ("4.7.0 Login at the upstream server failed",))
LOGIN_REFUSED_LATELY = Reply(454, ("4.7.0 Login at the upstream server failed lately, not tried again"
                                   " for a few minutes",))
# a route that leads back to this frontend (_loops): the user's file must change
ROUTE_LOOP = Reply(451, ("4.4.6 The route for this sender leads back to this server"
                         " (routing loop), try again later",))
NO_SMTPUTF8 = Reply(553, ("5.6.7 Upstream server does not support SMTPUTF8",))
NO_8BITMIME = Reply(550, ("5.6.3 Upstream server does not support 8BITMIME",))


class UpstreamError(Exception):
    """The upstream cannot be used: `reply` for the client, str() for the log."""

    def __init__(self, reply: Reply, detail: str, in_step: bool = False,
                 greeting: Reply | None = None, login_refused: bool = False) -> None:
        super().__init__(detail)
        self.reply = reply
        self.in_step = in_step  # a refusal in good order: QUIT before the close
        self.greeting = greeting  # the upstream's refusing greeting, when that was it
        # the upstream refused these credentials for good (a 5xx such as 535
        # to an AUTH it offered): the relay does not try them again at once
        self.login_refused = login_refused


class ReplyError(Exception):
    """The upstream broke the reply syntax or its bounds."""


class ReplyReader:
    """Parses SMTP replies from a Stream with hard bounds (sans-IO buffer + a read loop)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self.last_reply = time.monotonic()  # when the upstream last answered (or we connected)
        self.heard = False  # any byte at all came from the upstream

    @property
    def buffered(self) -> int:
        return len(self._buf)

    async def _line(self) -> bytes:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                if nl + 1 > MAX_REPLY_LINE:
                    raise ReplyError(f"reply line longer than {MAX_REPLY_LINE} octets")
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) >= MAX_REPLY_LINE:
                raise ReplyError(f"reply line longer than {MAX_REPLY_LINE} octets")
            data = await self.stream.read(READ_SIZE)
            if not data:
                raise ConnectionResetError("upstream closed the connection")
            self.heard = True
            self._buf += data

    async def read_reply(self) -> Reply:
        """One whole reply under one `timeout` (a reply trickled a byte at a
        time cannot stretch it)."""
        reply = await self.stream.bounded(self._read_reply())
        self.last_reply = time.monotonic()
        return reply

    async def _read_reply(self) -> Reply:
        code = None
        lines: list[str] = []
        while True:
            raw = await self._line()
            m = _REPLY_LINE.fullmatch(raw)
            if m is None:
                raise ReplyError(f"malformed reply line {_shorten(raw)!r}")
            this = int(m.group(1))
            if code is not None and this != code:
                raise ReplyError(f"reply code changed from {code} to {this} within one reply")
            code = this
            lines.append(_clean_text(m.group(3)))
            if len(lines) > MAX_REPLY_LINES:
                raise ReplyError(f"reply longer than {MAX_REPLY_LINES} lines")
            if m.group(2) != b"-":
                return Reply(code, tuple(lines))


def _clean_text(raw: bytes) -> str:
    """Reply text made safe to repeat to the client: no CR, LF, NUL or other controls."""
    return _UNPRINTABLE.sub("?", raw.decode("utf-8", "replace"))


def _shorten(raw: bytes, n: int = 60) -> bytes:
    return raw[:n] + (b"..." if len(raw) > n else b"")


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO reply → {KEYWORD: parameters}; the first line is the greeting."""
    ext: dict[str, str] = {}
    old_auth = ""
    for line in reply.lines[1:]:
        word, _, rest = line.strip().partition(" ")
        if word.upper().startswith("AUTH="):  # the pre-RFC 2554 form some servers still send
            old_auth = (word[5:] + " " + rest).strip()
        elif word:
            ext[word.upper()] = rest.strip()
    if old_auth and "AUTH" not in ext:
        ext["AUTH"] = old_auth
    return ext


@dataclass
class UpstreamClient:
    """A connected, greeted and (when the route says so) logged-in upstream."""

    route: Route
    stream: Stream
    reader: ReplyReader
    ehlo_name: str
    esmtp: bool = True
    extensions: dict[str, str] = field(default_factory=dict)
    auth_mechanism: str = ""   # "" = no AUTH done
    tls_problems: list[str] = field(default_factory=list)
    messages: int = 0          # messages the upstream accepted over this connection
    # a refusal (4xx/5xx) over this connection, ever: it may be the
    # connection's state (postscreen's test engine, Postfix's and chasquid's
    # error counts; chasquid's is not reset by a message it accepts), so the
    # pool keeps it for no other session (its own goes on with it, as a
    # client connected directly would)
    refused: bool = False

    @property
    def address(self) -> str:
        return self.route.where

    async def command(self, line: str | bytes) -> Reply:
        """Send one command line (CRLF added) and return the upstream's reply."""
        await self.send_lines([line])
        return await self.reader.read_reply()

    async def send_lines(self, lines: list[str | bytes]) -> None:
        """Send command lines (CRLF added) in one write, reading nothing: a
        pipelined group (RFC 2920) whose replies the caller reads in order."""
        out = []
        for line in lines:
            data = line.encode("utf-8") if isinstance(line, str) else line
            if b"\r" in data or b"\n" in data:
                raise ValueError("a command line must not contain CR or LF")
            out.append(data + b"\r\n")
        await self.stream.write(b"".join(out))

    async def read_reply(self) -> Reply:
        return await self.reader.read_reply()

    async def unasked_reply(self) -> Reply | None:
        """The reply that came behind the one asked for (its rest waited for
        SURPLUS_WAIT at most); None when it breaks off or is no reply."""
        try:
            with self.stream.timeout_at_most(SURPLUS_WAIT):
                return await self.read_reply()
        except (OSError, TimeoutError, ReplyError, TLSError):
            return None

    def spoke_unasked(self) -> bool:
        """Bytes arrived that no command asked for (or the end of them): a
        421 before closing, one reply too many. Such a connection must not
        be reused: the next command would read that reply as its own."""
        return bool(self.reader.buffered or self.stream.said_something())

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    def mail_command(self, sender: str, params: MailParams, config: Config) -> str | Reply:
        """MAIL FROM with the parameters the upstream understands, or a local
        refusal (SMTPUTF8 needed but not offered)."""
        parts = [f"MAIL FROM:<{sender}>"]
        if params.size is not None and self.supports("SIZE"):
            parts.append(f"SIZE={params.size}")
        if params.body_8bitmime:
            # BODY=8BITMIME goes on to an upstream that offers 8BITMIME. One
            # that does not cannot take the message (RFC 6152 3): force
            # refuses it (the original gave such an upstream up), ignore
            # sends the bytes anyway, as the original did. disable: the
            # client was never offered it.
            if self.supports("8BITMIME"):
                parts.append("BODY=8BITMIME")
            elif config.ext8BitMime is Ext8BitMime.FORCE:
                return NO_8BITMIME
        if params.smtputf8:
            if not self.supports("SMTPUTF8"):
                return NO_SMTPUTF8
            parts.append("SMTPUTF8")
        return " ".join(parts)

    async def quit(self) -> None:
        """QUIT politely (its reply waited for QUIT_WAIT s at most), then close."""
        if self.stream.timeout is None or self.stream.timeout > QUIT_WAIT:
            self.stream.timeout = QUIT_WAIT
        try:
            await self.stream.write(b"QUIT\r\n")
            await self.reader.read_reply()
        except (OSError, TimeoutError, ReplyError, TLSError):
            pass
        await self.stream.aclose()

    def abort(self, keep_session: bool = False) -> None:
        self.stream.abort(keep_session)


async def open_upstream(route: Route, config: Config, ehlo_name: str,
                        log: logging.Logger, session_id: str = "", who: str = "") -> UpstreamClient:
    """Connect, greet, secure and log in as `route` says. Raises UpstreamError."""
    try:
        return await _open_upstream(route, config, ehlo_name, log, session_id, who)
    except _ResumptionBroke:
        # the server failed a resumed handshake; it is not offered one again
        log.info("%supstream %s: TLS resumption refused, connecting afresh",
                 f"{session_id}: " if session_id else "", route.where)
        return await _open_upstream(route, config, ehlo_name, log, session_id, who)


class _ResumptionBroke(Exception):
    pass


async def _open_upstream(route: Route, config: Config, ehlo_name: str,
                         log: logging.Logger, session_id: str, who: str = "") -> UpstreamClient:
    where = route.where
    prefix = f"{session_id}: " if session_id else ""
    timeout = float(config.timeout)
    try:
        stream = await open_tcp(route.server, route.port, timeout, who)
    except ConnectError as e:
        raise UpstreamError(UNREACHABLE, f"cannot connect to {where}: {e.strerror or e}") from None
    if stream.connect_failures:
        # a broken path to one of the server's addresses (typically IPv6) is
        # worked around, but costs each new connection: the admin should know
        log.warning("%supstream %s: %s; connected to %s", prefix, where,
                    "; ".join(stream.connect_failures), stream.connected_to)
    if _loops.leads_back(stream.peername, stream.sockname):
        stream.abort()
        raise UpstreamError(ROUTE_LOOP, f"{where}: this route leads back to this server"
                            " (a routing loop): not used")
    _loops.outgoing(stream.sockname, stream.peername, stream)
    client = UpstreamClient(route, stream, ReplyReader(stream), ehlo_name)
    try:
        # each reply within `timeout`, and the whole login too: an upstream
        # answering every step just in time would keep the client's MAIL
        # waiting for several `timeout`s (RFC 5321 4.5.3.2: it gives up at 5 min)
        async with asyncio.timeout(timeout):
            await _establish(client, config, log, prefix)
    except UpstreamError as e:
        if e.in_step:
            # the upstream refused in good order (a 554 greeting, EHLO, STARTTLS
            # or AUTH refused): QUIT first (RFC 5321 4.1.1.10, 3.1); a reset
            # counts against our address at postscreen or fail2ban
            try:
                with client.stream.timeout_at_most(REFUSED_QUIT_WAIT):
                    await client.quit()
            finally:
                client.abort()  # (a no-op after quit; else a cancelled QUIT left it open)
        else:
            client.abort()
        raise
    except (TimeoutError,) as e:
        client.abort()
        if route.tls is not TlsMode.TLS and not client.reader.heard:
            # an implicit-TLS server (465) says nothing until the client's
            # TLS handshake: the usual mistake behind a silent server
            raise UpstreamError(TIMED_OUT, f"{where}: no greeting within {config.timeout}s; an"
                                " implicit-TLS port (465) waits silently for a TLS handshake:"
                                " use ssl, not tls, for one") from e
        raise UpstreamError(TIMED_OUT, f"{where}: no answer within {config.timeout}s") from e
    except ReplyError as e:
        client.abort()
        raise UpstreamError(BAD_UPSTREAM, f"{where}: {e}") from None
    except TLSVerifyError as e:
        client.abort()
        raise UpstreamError(TLS_FAILED, f"{where}: certificate refused: {e}") from None
    except TLSError as e:
        client.abort()
        if stream.resumption_failed:
            raise _ResumptionBroke() from None
        hint = ""
        if route.tls is TlsMode.TLS and "wrong version number" in str(e):
            # (OpenSSL's words for a first answer that is no TLS record)
            hint = ("; the server answered in plain text: a STARTTLS or plain port, not"
                    " implicit TLS (use tls, not ssl, or the implicit-TLS port, 465)")
        raise UpstreamError(TLS_FAILED, f"{where}: TLS handshake failed: {e}{hint}") from None
    except OSError as e:
        client.abort()
        raise UpstreamError(DROPPED, f"{where}: connection lost while logging in: {e}") from None
    except BaseException:  # a bug, a cancellation: never leave the connection open
        client.abort()
        raise
    return client


async def _establish(client: UpstreamClient, config: Config, log: logging.Logger, prefix: str) -> None:
    route = client.route
    where = client.address
    ca_file = route.ca_file or config.sslCA
    if route.tls is TlsMode.TLS:
        ctx = await _tls.client_context_for(ca_file, verify=route.cert_check,
                                            ca_pem=route.ca_pem)
        client.tls_problems = await client.stream.start_tls_client(ctx, route.server,
                                                                   resume=_resume_key(route))
    greeting = await client.read_reply()
    if greeting.code != 220:
        raise UpstreamError(NOT_READY, f"{where}: greeting {greeting}", in_step=True, greeting=greeting)
    await _no_surplus(client, "the greeting")
    await _hello(client, where)
    if route.tls is TlsMode.STARTTLS:
        if not client.supports("STARTTLS"):
            raise UpstreamError(NO_STARTTLS, f"{where}: STARTTLS not offered, refusing to go on"
                                " in plain text", in_step=True)
        reply = await client.command("STARTTLS")
        if reply.code != 220:
            raise UpstreamError(TLS_FAILED, f"{where}: STARTTLS answered {reply}", in_step=True)
        if client.reader.buffered:
            # Bytes the upstream sent before the handshake must not be taken as
            # answers later (response injection, the mirror of CVE-2011-0411).
            raise UpstreamError(TLS_FAILED, f"{where}: data pipelined after the STARTTLS reply")
        ctx = await _tls.client_context_for(ca_file, verify=route.cert_check,
                                            ca_pem=route.ca_pem)
        client.tls_problems = await client.stream.start_tls_client(ctx, route.server,
                                                                   resume=_resume_key(route))
        await _hello(client, where)
    if client.stream.is_tls:
        client.stream.remember_tls_session()  # a reply came over TLS: tickets are in
    if client.tls_problems:
        log.warning("%supstream %s: certificate problems ignored (noCertCheck): %s",
                    prefix, where, printable("; ".join(client.tls_problems)))
    if route.auth:
        await _login(client, config, log, prefix)
        await _no_surplus(client, "AUTH")


def _resume_key(route: Route) -> tuple:
    return (route.server.strip("[]").rstrip(".").lower(), route.port)


async def _no_surplus(client: UpstreamClient, what: str) -> None:
    """Reply text beyond the replies asked for (a multi-line reply whose
    every line says "250 ", a command answered twice) would be read as the
    next command's reply, every later one a step late. Raises ReplyError.
    Except a 421: a server may say it at any moment, unasked, before it
    closes (RFC 5321 3.8; Dovecot's submission service does right after
    its 235 when its relay host is down): UpstreamError, 451 with its words,
    as for a 421 to MAIL."""
    if not client.reader.buffered:
        return
    reply = await client.unasked_reply()
    if reply is not None and reply.code == 421:
        if what == "AUTH" and _echoes_credentials(client.route, reply):
            # its words go to the log and to the client: not when they
            # quote what we sent (a box that echoes the AUTH line it got)
            reply = Reply(421, ("4.3.0 (text not shown: it quotes the credentials)",))
        raise UpstreamError(Reply(451, reply.lines).with_enhanced("0.0"),
                            f"{client.address}: closing: {reply}")
    raise ReplyError(f"more than its reply to {what}")


def _echoes_credentials(route: Route, reply: Reply) -> bool:
    """Does the reply text hold the password, or an AUTH line's base64 we
    sent (PLAIN's token, LOGIN's password)?"""
    password = route.password.reveal()
    text = "\n".join(reply.lines)
    sent = (password, _b64(password.encode("utf-8")),
            _b64(b"\0" + route.user.encode("utf-8") + b"\0" + password.encode("utf-8")))
    return any(s and s in text for s in sent)


async def _hello(client: UpstreamClient, where: str) -> None:
    reply = await client.command(f"EHLO {client.ehlo_name}")
    if reply.code == 250:
        await _no_surplus(client, "EHLO")
        client.esmtp = True
        client.extensions = parse_ehlo(reply)
        return
    if reply.code >= 500:
        reply = await client.command(f"HELO {client.ehlo_name}")
        if reply.code == 250:
            await _no_surplus(client, "HELO")
            client.esmtp = False
            client.extensions = {}
            return
    raise UpstreamError(NOT_READY, f"{where}: EHLO/HELO answered {reply}", in_step=True)


# Order and config field of each mechanism we can do.
_MECHANISMS = (("CRAM-MD5", "smarthostCramMD5"), ("PLAIN", "smarthostPlain"), ("LOGIN", "smarthostLogin"))
# Replies to AUTH that mean "not this mechanism", so the next one may be tried.
_TRY_NEXT = {500, 501, 502, 504, 534}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def _login(client: UpstreamClient, config: Config, log: logging.Logger, prefix: str) -> None:
    route = client.route
    where = client.address
    offered = set(client.extensions.get("AUTH", "").upper().split())
    tried: list[str] = []
    refused = False  # a 5xx that refuses the credentials, not only a mechanism
    for mech, setting in _MECHANISMS:
        mode = getattr(config, setting)
        if mode is SmarthostAuth.NEVER:
            continue
        if mode is SmarthostAuth.IF_ADVERTISED and mech not in offered:
            continue
        try:
            reply = await _AUTH[mech](client)
        except ReplyError:
            # never quote it: an upstream (or a box in front of it) that
            # echoes what it got sends the base64 credentials back
            raise ReplyError(f"malformed reply to AUTH {mech} (not shown: it may echo"
                             " the credentials)") from None
        if reply.code == 235:
            client.auth_mechanism = mech
            return
        # the code only: an upstream may echo the command, and with it the
        # base64 credentials, in its reply text
        tried.append(f"{mech}: {reply.code}{' ' + reply.enhanced if reply.enhanced else ''}")
        if reply.code in _TRY_NEXT:
            continue
        if mech not in offered and 500 <= reply.code < 600:
            # tried only for alwaysTry: a server without it may well say 535
            # (Postfix with Dovecot SASL does) and means "not this one"; the
            # original went on to the next mechanism after any refusal
            continue
        # A real refusal of the credentials (535) or a temporary failure:
        # trying the same password again by another mechanism only adds
        # failures to the upstream's counters.
        refused = reply.code >= 500
        break
    if tried:
        raise UpstreamError(AUTH_FAILED, f"{where}: AUTH as {route.user!r} refused: {'; '.join(tried)}",
                            in_step=True, login_refused=refused)
    # No mechanism we may use: go on without AUTH; the upstream decides.
    log.warning("%supstream %s: no usable AUTH mechanism (offered: %s), sending without AUTH",
                prefix, where, printable(" ".join(sorted(offered)), 200) or "none")


async def _auth_cram_md5(client: UpstreamClient) -> Reply:
    reply = await client.command("AUTH CRAM-MD5")
    if reply.code != 334:
        return reply
    try:
        challenge = base64.b64decode((reply.lines[0] if reply.lines else "").strip(), validate=True)
    except (ValueError, base64.binascii.Error):
        await client.command("*")
        return Reply(501, ("5.5.2 undecodable CRAM-MD5 challenge",))
    digest = hmac.new(client.route.password.reveal().encode("utf-8"), challenge, hashlib.md5).hexdigest()
    return await client.command(_b64(f"{client.route.user} {digest}".encode("utf-8")))


async def _auth_plain(client: UpstreamClient) -> Reply:
    token = _b64(b"\0" + client.route.user.encode("utf-8") + b"\0"
                 + client.route.password.reveal().encode("utf-8"))
    return await client.command("AUTH PLAIN " + token)


async def _auth_login(client: UpstreamClient) -> Reply:
    reply = await client.command("AUTH LOGIN")
    if reply.code != 334:
        return reply
    reply = await client.command(_b64(client.route.user.encode("utf-8")))
    if reply.code != 334:
        return reply
    return await client.command(_b64(client.route.password.reveal().encode("utf-8")))


_AUTH = {"CRAM-MD5": _auth_cram_md5, "PLAIN": _auth_plain, "LOGIN": _auth_login}
