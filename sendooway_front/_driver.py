"""Runs one sans-IO Session over a Stream: moves bytes, asks the
authenticator and the relay, logs. Shared by every mode (stdio, -b, socket
activation); the modes themselves live in _server.py."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from sendooway_shared.config import Config, Ext8BitMime, MailerEncryption, default_localname
from sendooway_shared.log import field as log_field, log_failure, printable

from . import _catalogue as R
from . import _loops
from ._authlink import AuthLink, AuthLinkError
from ._events import (
    FLUSH, NEED_DATA, PAUSED, AuthRefused, AuthRequested, ConnectionClosed, DataChunk, DataFinished, DataRefused,
    DataRequested, Greeted, MailRequested, RcptRequested, StartTls, TransactionReset,
)
from ._proxyproto import (
    NoProxyHeader, ProxyHeaderError, ProxyHeaderReader, is_trusted, unmapped,
)
from ._relay_api import RelayBackend, SessionInfo
from ._reply import Reply
from ._session import Session, SessionSettings, State
from ._stream import Stream
from ._tls import TLSError

READ_SIZE = 256 * 1024
LINGER = 1.0  # seconds to drain a client's input after closing on it
# A session logs in within LOGIN_WITHIN x `timeout` of its start or is closed:
# a real client logs in at once, and MAIL needs a login. It also keeps a
# link within the authenticator's own limit (the next request before a
# login within 4 x `timeout`, sendooway_auth._connection.LOGIN_IDLE).
LOGIN_WITHIN = 4
log = logging.getLogger("sendooway")


def make_relay(config: Config, logger: logging.Logger) -> RelayBackend:
    """The relay backend of one client session (the one place to swap it)."""
    from ._pool import shared_pool
    from ._relay import Relay

    return Relay(config, logger, shared_pool(config.smarthostCache, logger))


class Connector(Protocol):
    def describe(self) -> str: ...

    async def open(self, session_id: str, client: str) -> AuthLink: ...


@dataclass
class Frontend:
    """What every session of one process shares."""

    config: Config
    tls_context: Any = None           # OpenSSL.SSL.Context or None
    implicit_tls: bool = False        # -s: handshake before the greeting
    channel_safe: bool = False        # -S: the channel is already encrypted
    connector: Connector | None = None
    tls_broken: bool = False          # sslCert/sslKey set but unusable (one session only)
    hostname: str = ""
    active: set = field(default_factory=set)
    per_address: Any = None           # _limits.AddressLimit of a listening process

    def __post_init__(self) -> None:
        if not self.hostname:
            self.hostname = default_localname(self.config)

    def behind_balancer(self, peer_ip: str) -> bool:
        """Whether this peer is a trusted balancer (`proxyProtocol`), which
        must begin with a PROXY protocol header."""
        return bool(self.config.proxyProtocol) and is_trusted(peer_ip, self.config.proxyProtocol)

    def settings(self) -> SessionSettings:
        cfg = self.config
        starttls = not self.channel_safe and cfg.mailerEncryption is not MailerEncryption.FORBIDDEN
        return SessionSettings(
            hostname=self.hostname,
            tls_available=starttls and self.tls_context is not None,
            tls_broken=starttls and self.tls_broken,
            encrypted=self.channel_safe or self.implicit_tls,
            require_encryption=cfg.mailerEncryption is MailerEncryption.REQUIRED,
            advertise_8bitmime=cfg.ext8BitMime is not Ext8BitMime.DISABLE,
            size_limit=cfg.extMessageSize,
            max_auth_failures=cfg.maxAuthFailures,
        )


def _sender(address: str) -> str:
    """A sender in a log line: escaped as the message line's `from=` (a
    quoted local part may hold spaces and `=`: no forged fields)."""
    return log_field(address, 320) if address else ""


def _failure(exc: BaseException, fe: "Frontend") -> str:
    """A failed step's reason for the log: a timeout says so (its text is
    empty, and the line used to end in "failed: ")."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"timed out (no answer within {fe.config.timeout}s)"
    return str(exc) or type(exc).__name__


def _not_tls(exc: BaseException, start: bytes) -> str:
    """What a failed implicit-TLS (-s) handshake adds when the client spoke
    no TLS at all: a client set for STARTTLS or plain SMTP on port 465
    either sends a command at once (OpenSSL then says only "wrong version
    number") or, as every SMTP client does, waits for a greeting in
    silence until `timeout` ends it. Both were logged without a word of
    that (an outside review)."""
    if not start:
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return ("; the client sent nothing: one waiting for a greeting"
                    " (set for STARTTLS or plain SMTP on this implicit-TLS port?)")
        return ""
    if start[0] in _TLS_RECORD_TYPES or start[0] & 0x80:  # (a TLS record, an SSLv2 hello)
        return ""
    word = printable(start.split()[0].decode("ascii", "replace")) if start.strip() else ""
    return f"; the client spoke plaintext ('{word}'): set for STARTTLS or plain SMTP on this implicit-TLS port?"


_TLS_RECORD_TYPES = frozenset((20, 21, 22, 23, 24))  # change_cipher_spec .. heartbeat


def new_session_id() -> str:
    return os.urandom(5).hex()


def describe_peer(peer: Any) -> str:
    """"HOST:PORT" or "[V6]:PORT"; an IPv4 client on the dual-stack socket
    (::ffff:a.b.c.d) is shown as the IPv4 address it is, in logs and Received:."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), peer[1]
        try:
            host = str(unmapped(ipaddress.ip_address(host)))
        except ValueError:
            pass  # not an address: shown as it is
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer) if peer else ""


class SessionRunner:
    """One client session from greeting to close."""

    def __init__(self, frontend: Frontend, stream: Stream, client: str) -> None:
        self.frontend = frontend
        self.stream = stream
        self.client = client
        self.sid = new_session_id()
        self.session = Session(frontend.settings())
        self.link: AuthLink | None = None
        self.relay: RelayBackend | None = None
        self.client_ip = client.rsplit(":", 1)[0].strip("[]") if client else ""
        self.client_address = stream.peername  # (or the PROXY header's source)
        # where it reached us, for _loops.from_ourselves: the PROXY header's
        # destination; None: the stream's own (looked up at AUTH only)
        self.client_destinations: list | None = None
        self.stream_eof = False
        self.stopping = False          # the server stops: 421 at the next command
        self.awaiting_final_reply = False  # the final dot went upstream, its answer not yet
        self._waiting_for_command = False
        self._address_key: str | None = None  # counted in frontend.per_address
        self._announced = False        # its "connect" line is written
        self._closed_logged = False    # its "closed:" line is written

    def request_stop(self) -> None:
        """The server is stopping: a client between two commands gets
        "421 4.3.2 shutting down" at once; one in the middle of something
        (DATA, a relay step) gets it once that is done."""
        self.stopping = True
        if self._waiting_for_command:
            self.stream.interrupt()

    def _log(self, level: int, msg: str, *args: Any) -> None:
        """One line: session id, client address, user once logged in."""
        if not log.isEnabledFor(level):
            return  # (a DEBUG line at the usual level: nothing formatted)
        user = f" user={self.session.user}" if self.session.user else ""
        log.log(level, "%s client=%s%s: " + msg, self.sid, self.client or "-", user, *args)

    async def run(self) -> None:
        fe = self.frontend
        self.stream.timeout = fe.config.timeout
        try:
            via = ""
            if fe.behind_balancer(self.client_ip):
                via = await self._proxy_header()
                if via is None:
                    return
            if fe.per_address is not None:
                admitted, self._address_key = fe.per_address.enter(self.client_ip)
                if not admitted:  # (logged by the limit, once per burst)
                    self.session.refuse(R.TOO_MANY_FROM_ADDRESS)
                    return
            self._log(logging.INFO, "connect%s%s", "" if self.client else " on stdin/stdout", via)
            self._announced = True
            if fe.implicit_tls:
                try:
                    await self.stream.start_tls_server(fe.tls_context)
                except (TLSError, OSError, asyncio.TimeoutError, TimeoutError) as exc:
                    self._log(logging.INFO, "TLS handshake failed: %s%s", _failure(exc, fe),
                              _not_tls(exc, self.stream.handshake_start))
                    return
                self._log(logging.INFO, "TLS: %s %s", self.stream.tls_version(), self.stream.tls_cipher())
            await self._open_link()
            self.relay = make_relay(fe.config, log)
            await self._loop()
        except asyncio.CancelledError:
            await self._cut()
            raise
        except Exception as exc:
            log_failure(log, "%s client=%s: internal error, closing the session", self.sid,
                        self.client or "-")
            if self.relay is not None and self.session.state.value == "data":
                await self._quietly(self.relay.data_abort(
                    "out of memory" if isinstance(exc, MemoryError) else "internal error"))
            self._give_up()
        finally:
            await self._finish()

    def _give_up(self) -> None:
        """The session cannot go on (a bug, no memory): the client hears
        421 (RFC 5321 3.8), not a silent close that leaves it guessing."""
        s = self.session
        try:
            if not s.closed:
                if s.started:
                    s.shutdown(R.SERVICE_UNAVAILABLE)
                else:
                    s.refuse(R.SERVICE_UNAVAILABLE)
        except Exception:  # noqa: BLE001 - the session's own state is what broke
            pass

    async def _cut(self) -> None:
        """The session's task is cancelled (the shutdown grace is over, or
        the process ends): the upstream is left at once, a message in flight
        without its final dot (and logged), no RSET or QUIT that a silent
        upstream could hold for `timeout` (the stop waits for nobody); and
        a stopping server's client hears "421 4.3.2 shutting down" (within a
        second), even in mid-AUTH or mid-DATA, before the close."""
        s = self.session
        closed = s.close_reason  # closed already, its line due after a relay step
        if self.relay is not None:
            if self.awaiting_final_reply:  # a second signal hurried the stop
                self._log(logging.WARNING, "cut before the upstream answered the final dot:"
                          " the message may have been delivered")
            elif s.state is State.DATA:
                await self._quietly(self.relay.data_abort("server stopping" if self.stopping
                                                          else "session cut"))
            self.relay.abort()
        if self._announced and not self._closed_logged:
            # its one closing line: a session cut in the middle of a step
            # (an upstream that does not answer MAIL) used to end without any
            self._closed_logged = True
            self._log(logging.INFO, "closed: %s", f"{closed}; then cut by the stop" if closed
                      else "cut by the stop")
        if not self.stopping:
            return
        s.shutdown(R.SHUTTING_DOWN)
        out = s.data_to_send()
        if out:
            self.stream.timeout = 1.0
            try:
                await self.stream.write(out)
            except (OSError, asyncio.TimeoutError, TimeoutError):
                pass

    async def _proxy_header(self) -> str | None:
        """Read the PROXY protocol header a trusted balancer sends first
        (before the greeting, before TLS), within `timeout` in all; from then
        on its source address is the client. Returns what the connect line
        adds, or None, after one log line, when the connection is to be
        closed without a greeting."""
        loop = asyncio.get_running_loop()
        limit = float(self.frontend.config.timeout)
        deadline = loop.time() + limit
        reader = ProxyHeaderReader()
        header = None
        level = logging.WARNING
        try:
            while header is None:
                self.stream.timeout = deadline - loop.time()
                if self.stream.timeout <= 0:
                    raise TimeoutError
                header = reader.receive_data(await self.stream.read(READ_SIZE))
        except ProxyHeaderError as exc:
            reason = str(exc)
            if isinstance(exc, NoProxyHeader):
                level = logging.INFO  # a balancer's plain TCP check
        except (asyncio.TimeoutError, TimeoutError):
            reason = f"no complete header within {limit:g}s"
        except OSError as exc:
            reason = f"read failed: {exc}"
        if header is None:
            self._log(level, "PROXY protocol from a trusted balancer: %s; closing without a"
                      " greeting", reason)
            return None
        self.stream.unread(reader.trailing_data)
        self.stream.timeout = limit
        if header.source is None:  # v1 UNKNOWN, v2 LOCAL (health checks)
            return f" (PROXY {header.describe()}: the balancer's own connection)"
        balancer = self.client
        self.client = describe_peer(header.source)
        self.client_ip = header.source[0]
        self.client_address = header.source
        self.client_destinations = [header.destination]
        return f" via {balancer} (PROXY {header.describe()})"

    async def _open_link(self) -> None:
        fe = self.frontend
        if fe.connector is None:
            self._log(logging.ERROR, "no authenticator configured")
            self.session.refuse(R.AUTH_BACKEND_DOWN)
            return
        try:
            self.link = await fe.connector.open(self.sid, self.client_ip)
        except AuthLinkError as exc:
            self._log(logging.ERROR, "%s; answering 421", exc)
            self.session.refuse(R.AUTH_BACKEND_DOWN)
            return
        self.session.start()

    async def _loop(self) -> None:
        s = self.session
        loop = asyncio.get_running_loop()
        limit = float(self.frontend.config.timeout)
        deadline: float | None = None  # by when the pending input must make progress
        login_by = loop.time() + LOGIN_WITHIN * limit
        while True:
            ev = s.next_event()
            if ev is FLUSH:  # replies piled up: the client takes them before we read on
                await self._send()
                deadline = None
                continue
            if ev is NEED_DATA:
                if self.stopping and s.at_command_boundary:
                    self._log(logging.INFO, "server stopping: closing the session")
                    s.shutdown(R.SHUTTING_DOWN)
                    continue
                if self.link is not None and self.link.broken and s.at_command_boundary:
                    # each session has its own link, and a failed one stays
                    # failed: after the 454 or 451 that answered the command,
                    # 421 and close, so that the client comes back on a new
                    # link instead of failing every later try in this session
                    self._log(logging.INFO, "authenticator link lost: closing the session")
                    s.shutdown(R.AUTH_BACKEND_DOWN)
                    continue
                if await self._send():
                    deadline = None  # replies went out: the client's input made progress
                    if s.closed:
                        # the write failed (logged): no read from a client
                        # that is gone or took nothing for `timeout`
                        continue
                # `timeout` bounds each read and also a whole command line:
                # a client trickling one byte at a time gets no more time.
                now = loop.time()
                if deadline is None:
                    deadline = now + limit
                wait = min(limit, deadline - now)
                if s.user is None:
                    wait = min(wait, login_by - now)
                self.stream.timeout = max(0.0, wait)
                self._waiting_for_command = s.at_command_boundary
                try:
                    if self.stream.timeout <= 0:
                        raise TimeoutError
                    data = await self.stream.read(READ_SIZE)
                except (asyncio.TimeoutError, TimeoutError):
                    if self.stopping and s.at_command_boundary:
                        continue  # interrupted by request_stop: 421 above
                    if s.user is None and loop.time() >= login_by - 0.05:
                        self._log(logging.INFO, "timeout: no login within %gs of connecting",
                                  LOGIN_WITHIN * limit)
                        s.timed_out(R.NO_LOGIN_IN_TIME)
                        continue
                    self._log(logging.INFO, "timeout: no complete input for %ss", limit)
                    s.timed_out()
                    continue
                except OSError as exc:
                    self._log(logging.INFO, "read failed: %s", exc)
                    data = b""
                finally:
                    self._waiting_for_command = False
                if not data:
                    self.stream_eof = True
                elif s.state is State.DATA:
                    # message text (even a refused message being read to
                    # its end) is not a command line: each read is bounded,
                    # the whole message is not
                    deadline = None
                s.receive_data(data)
                continue
            deadline = None  # the session moved on
            if isinstance(ev, ConnectionClosed):
                if ev.aborted_data and self.relay is not None:
                    await self._quietly(self.relay.data_abort())
                self._closed_logged = True
                self._log(logging.INFO, "closed: %s", ev.reason)
                await self._send()
                if ev.reason != "quit" and not self.stream_eof:
                    await self._linger()
                return
            elif isinstance(ev, Greeted):
                if log.isEnabledFor(logging.DEBUG):
                    self._log(logging.DEBUG, "%s %s", "EHLO" if ev.esmtp else "HELO",
                              log_field(ev.name))
            elif isinstance(ev, AuthRequested):
                await self._auth(ev)
            elif isinstance(ev, AuthRefused):
                self._log(logging.INFO, "login failed: user=%r mechanism=%s (%s, refused here)",
                          ev.user, ev.mechanism, ev.reason)
            elif isinstance(ev, StartTls):
                await self._send()
                self.stream.timeout = limit
                try:
                    await self.stream.start_tls_server(self.frontend.tls_context)
                except (TLSError, OSError, asyncio.TimeoutError, TimeoutError) as exc:
                    self._log(logging.INFO, "STARTTLS handshake failed: %s",
                              _failure(exc, self.frontend))
                    return
                s.tls_started()
                self._log(logging.INFO, "STARTTLS: %s %s", self.stream.tls_version(),
                          self.stream.tls_cipher())
            elif isinstance(ev, MailRequested):
                await self._mail(ev)
            elif isinstance(ev, RcptRequested):
                await self._rcpts(ev)
            elif isinstance(ev, DataRequested):
                s.relay_reply(await self._relay_call(self.relay.data_start()))
            elif isinstance(ev, DataChunk):
                try:
                    await self.relay.data_chunk(ev.data)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log_failure(log, "%s: relay failed during DATA", self.sid)
                    s.fail_message(R.RELAY_FAILED, "relay failed during DATA")
            elif isinstance(ev, DataFinished):
                self.awaiting_final_reply = True  # a stop waits for this (see serve_listening)
                try:
                    reply = await self._relay_call(self.relay.data_end(empty=ev.empty))
                finally:
                    self.awaiting_final_reply = False
                self._log(logging.DEBUG, "message of %d bytes: %s", ev.size, reply)  # the relay logs the line
                s.relay_reply(reply)
            elif isinstance(ev, DataRefused):
                self._log(logging.INFO, "message refused: %s", ev.reason)
                await self._quietly(self.relay.data_abort(ev.reason, ev.complete))
            elif isinstance(ev, TransactionReset):
                await self._quietly(self.relay.reset())
            elif ev is PAUSED:
                raise RuntimeError("session paused with no pending event")

    async def _linger(self) -> None:
        """We close while the client may still be sending (a 421 after
        pipelined input): half-close, then read and drop its input until it
        closes too (at most LINGER s in all), so that the kernel does
        not answer it with a reset that could destroy our 421 unread."""
        loop = asyncio.get_running_loop()
        end = loop.time() + LINGER
        self.stream.timeout = LINGER
        try:
            await self.stream.shutdown_write()  # the client sees EOF after our 421
            while (left := end - loop.time()) > 0:
                self.stream.timeout = left
                if not await self.stream.read(READ_SIZE):
                    break
        except (OSError, asyncio.TimeoutError, TimeoutError):
            pass

    async def _send(self) -> bool:
        """Write what the session has for the client; True if there was any."""
        out = self.session.data_to_send()
        if out:
            self.stream.timeout = self.frontend.config.timeout
            try:
                await self.stream.write(out)
            except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
                if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
                    # a client that stopped reading: not a lost connection
                    why = f"timeout: the client took no replies for {self.stream.timeout}s"
                else:
                    why = "connection lost: " + (str(exc) or type(exc).__name__)
                self._log(logging.INFO, "write failed: %s", why)
                self.session.receive_data(b"")
                self.session.connection_lost(why)
                self.session.data_to_send()
        return bool(out)

    async def _auth(self, ev: AuthRequested) -> None:
        user = ev.user
        destinations = self.client_destinations
        if destinations is None:  # our address, and the one before a port redirect
            destinations = [self.stream.sockname, _loops.original_destination(self.stream.socket)]
        if _loops.from_ourselves(self.client_address, destinations):
            # one of this process's own upstream connections logs in: a route
            # leads back here by a way its upstream side could not see (a
            # balancer's PROXY header names it, or a port redirect); checked
            # here, not at accept: by now that side has surely noted its
            # connection (_loops)
            self._log(logging.WARNING, "login of %r from this server's own upstream connection:"
                      " a route leads back to this server (routing loop): closing", user)
            self.session.shutdown(R.ROUTE_LOOP)
            return
        try:
            account = await self.link.auth(user, ev.password)
        except AuthLinkError as exc:
            self._log(logging.ERROR, "login of %r: %s", user, exc)
            self.session.auth_result(None, temporary=True)
            return
        if account is None:
            self._log(logging.INFO, "login failed: user=%r mechanism=%s", user, ev.mechanism)
            self.session.auth_result(None)
        else:
            self.session.auth_result(account)
            self._log(logging.INFO, "login: mechanism=%s", ev.mechanism)

    async def _mail(self, ev: MailRequested) -> None:
        """MAIL: the route, then the relay; RCPTs (and DATA) the client
        pipelined behind it go upstream in the same group."""
        s = self.session
        try:
            route = await self.link.route(ev.sender)
        except AuthLinkError as exc:
            self._log(logging.ERROR, "route for <%s>: %s", _sender(ev.sender), exc)
            s.relay_reply(R.ROUTE_TEMPFAIL)
            return
        if route is None:
            self._log(logging.INFO, "sender=<%s>: no route", _sender(ev.sender))
            s.relay_reply(R.NO_ROUTE)
            return
        if log.isEnabledFor(logging.DEBUG):  # (the route's text is built for nothing otherwise)
            self._log(logging.DEBUG, "sender=<%s> route=%s", _sender(ev.sender),
                      printable(route.describe()))
        info = SessionInfo(self.sid, self.client, s.client_name, s.user or "",
                           s.encrypted, s.esmtp)
        group = getattr(self.relay, "mail_group", None)
        recipients = []
        if group is not None:
            while (more := s.pipelined_rcpt()) is not None:
                recipients.append(more.recipient)
        if not recipients:
            s.relay_reply(await self._relay_call(self.relay.mail(info, route, ev.sender, ev.params)))
            return
        data = s.data_follows()
        replies = await self._relay_call(group(info, route, ev.sender, ev.params, recipients, data))
        self._reply_each(replies, 1 + len(recipients))

    def _reply_each(self, replies, count: int) -> None:
        """One relay reply per command of a group, in order; a relay that
        failed gives the same temporary failure for each, never a 250."""
        if not isinstance(replies, list) or len(replies) != count:
            replies = [replies if isinstance(replies, Reply) else R.RELAY_FAILED] * count
        for reply in replies:
            self.session.relay_reply(reply)

    async def _rcpts(self, first: RcptRequested) -> None:
        """A RCPT, and the RCPTs the client pipelined behind it: one group
        upstream (when it offers PIPELINING), the replies in order."""
        s = self.session
        recipients = [first.recipient]
        while (more := s.pipelined_rcpt()) is not None:
            recipients.append(more.recipient)
        if len(recipients) == 1:
            s.relay_reply(await self._relay_call(self.relay.rcpt(first.recipient)))
            return
        replies = await self._relay_call(self.relay.rcpts(recipients))
        self._reply_each(replies, len(recipients))

    async def _relay_call(self, aw):
        """A relay reply; a relay that raises gives a temporary failure, never 250."""
        try:
            return await aw
        except asyncio.CancelledError:
            raise
        except Exception:
            log_failure(log, "%s: relay failed", self.sid)
            return R.RELAY_FAILED

    async def _quietly(self, aw) -> None:
        try:
            await aw
        except Exception:
            log_failure(log, "%s: relay cleanup failed", self.sid)

    async def _finish(self) -> None:
        if self.frontend.per_address is not None:
            self.frontend.per_address.leave(self._address_key)
            self._address_key = None
        if self.relay is not None:
            await self._quietly(self.relay.close())
        if self.link is not None:
            self.link.close()
        try:
            await self._send()
        except Exception:
            pass
        await self.stream.aclose()
