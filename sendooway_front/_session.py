"""The client-facing SMTP session, sans-IO.

Bytes go in with receive_data(); next_event() hands out what the driver must
do (events.py); replies collect in data_to_send(). No sockets, no clock, no
threads: the stdio and listening drivers and the tests all use it as is.

The command table COMMANDS below says, for every verb and state, either the
state a successful command leads to or the reply that refuses it. A command
whose outcome depends on someone else (AUTH: the authenticator, MAIL/RCPT/
DATA: the relay, STARTTLS: the handshake) pauses the session until the
driver reports the outcome.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections import deque
from dataclasses import dataclass

from sendooway_shared.smtp_syntax import (
    NeedsUtf8, ParamError, PathError, parse_params, parse_path, split_path_argument,
)
from sendooway_shared.types import Secret

from . import _catalogue as R
from ._events import (
    FLUSH, NEED_DATA, PAUSED, AuthRefused, AuthRequested, ConnectionClosed, DataChunk, DataFinished, DataRefused,
    DataRequested, Event, Greeted, MailRequested, RcptRequested, StartTls, TransactionReset,
)
from ._relay_api import MailParams
from ._reply import Reply

MAX_COMMAND_LINE = 512      # octets, CRLF included (RFC 5321 4.5.3.1.4)
# MAIL grows by its parameters: SIZE 26 (RFC 1870), AUTH= 500 (RFC 4954), BODY= ~20
MAX_MAIL_LINE = MAX_COMMAND_LINE + 26 + 500 + 50
MAX_AUTH_LINE = 2048        # base64 of user (256) + password (1024) + slack
MAX_TEXT_LINE = 1000        # octets, CRLF included (RFC 5321 4.5.3.1.6)
DATA_CHUNK = 128 * 1024  # largest DataChunk handed out
MAX_USER = 256              # as the wire protocol allows
MAX_PASSWORD = 1024


class State(enum.Enum):
    CONNECTED = "connected"          # greeting sent, no EHLO/HELO yet
    GREETED = "greeted"              # EHLO/HELO done, not logged in
    AUTHENTICATED = "authenticated"  # logged in, no mail transaction
    MAIL = "mail"                    # MAIL accepted (by the upstream)
    RCPT = "rcpt"                    # at least one RCPT accepted
    DATA = "data"                    # reading the message
    CLOSED = "closed"


class LocalProtocolError(Exception):
    """The driver broke the session's rules (a bug, never the client's doing)."""


@dataclass(frozen=True)
class SessionSettings:
    hostname: str
    tls_available: bool = False       # STARTTLS may be offered (cert loaded, not forbidden, not -S)
    tls_broken: bool = False          # STARTTLS offered but refused (454): the cert would not load;
                                      # no login without TLS then (538), AUTH not advertised
    encrypted: bool = False           # channel already safe at the start (-s after handshake, -S)
    require_encryption: bool = False  # mailerEncryption = required
    advertise_8bitmime: bool = True   # ext8BitMime force | ignore
    size_limit: int | None = 0        # None: no SIZE; 0: SIZE without a limit
    max_auth_failures: int = 3
    max_recipients: int = 100
    max_errors: int = 20              # syntax/sequence errors before 421
    max_junk: int = 100               # commands that move nothing forward, free between messages


_C, _G, _A, _M, _R = State.CONNECTED, State.GREETED, State.AUTHENTICATED, State.MAIL, State.RCPT
COLUMNS = (_C, _G, _A, _M, _R)
_TLS_LATE = Reply(503, ("5.5.1 STARTTLS not permitted after AUTH or MAIL",))

# For each verb and state: the state after success, or the refusing reply.
COMMANDS: dict[str, tuple[State | Reply, ...]] = {
    #  verb        CONNECTED          GREETED            AUTHENTICATED      MAIL             RCPT
    "EHLO":     (_G,                _G,                _A,                _A,              _A),
    "HELO":     (_G,                _G,                _A,                _A,              _A),
    "STARTTLS": (_C,                _C,                _TLS_LATE,         _TLS_LATE,       _TLS_LATE),
    "AUTH":     (_A,                _A,                R.AUTH_TWICE,      R.AUTH_IN_TRANSACTION, R.AUTH_IN_TRANSACTION),
    "MAIL":     (R.NEED_AUTH,       R.NEED_AUTH,       _M,                R.NESTED_MAIL,   R.NESTED_MAIL),
    "RCPT":     (R.NEED_MAIL,       R.NEED_MAIL,       R.NEED_MAIL,       _R,              _R),
    "DATA":     (R.NEED_MAIL_DATA,  R.NEED_MAIL_DATA,  R.NEED_MAIL_DATA,  R.NO_RECIPIENTS, State.DATA),
    "RSET":     (_C,                _G,                _A,                _A,              _A),
    "NOOP":     (_C,                _G,                _A,                _M,              _R),
    "HELP":     (_C,                _G,                _A,                _M,              _R),
    "VRFY":     (_C,                _G,                _A,                _M,              _R),
    "EXPN":     (R.EXPN_REFUSED,) * 5,
    "QUIT":     (State.CLOSED,) * 5,
}

# Replies the client earns an error point with (RFC 5321 5yz for syntax/sequence).
_ERROR_CODES = {500, 501, 502, 503, 504, 530, 538, 553, 555}
# HTTP methods: no SMTP client sends them (Postfix refuses CONNECT, GET, POST)
_NOT_SMTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS"})
# Commands that move nothing forward: these verbs, a command refused without
# an error point (DATA before any recipient), and a MAIL, DATA or message
# the relay refuses (each cost a lookup or an upstream round trip). Past
# max_junk of them without a message accepted, each one earns an error point
# too (as Postfix's smtpd_junk_command_limit and Exim's
# smtp_accept_max_nonmail), so a client cannot hold a session open forever.
_JUNK_VERBS = frozenset(("NOOP", "RSET", "VRFY", "HELP", "EHLO", "HELO", "STARTTLS"))
MAX_RCPT_COMMANDS = 1000  # RCPTs in one transaction, refused or not, before each costs a point

# In a message, "\r\n." starts a line with a dot (end of data or
# dot-stuffing); a CR or LF outside a CRLF pair is a bare line end (SMTP
# smuggling, CVE-2023-51764 class) and refuses the message.
_END = b"\r\n.\r\n"
_END_STARTS = (b"\r\n.\r", b"\r\n.")  # how input may end inside an end marker
OUT_LIMIT = 64 * 1024  # octets of replies held before the client must take them (FLUSH)
# After a refusal: a lone "." line between any line ends.
_LOOSE_END = re.compile(rb"(\r\n|\r|\n)\.(\r\n|\r|\n)")


class _Await(enum.Enum):
    AUTH = "auth"
    TLS = "tls"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    DATA_END = "data_end"


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return True


def _is_text(value: str) -> bool:
    """No octet that was not UTF-8 (see _auth_step's surrogateescape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Session:
    """One SMTP session with one client."""

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self.state = State.CONNECTED
        self.encrypted = settings.encrypted
        self.client_name = ""          # EHLO/HELO argument
        self.esmtp = False
        self.user: str | None = None   # set by auth_result()
        self.recipients = 0            # accepted in this transaction
        self.auth_failures = 0
        self.errors = 0
        self._mail_refused = False     # the last command: a refused MAIL or a RCPT behind one
        self.junk = 0                  # junk commands since the session began or a message went
        self._owed = 0                 # error points for refusals, charged at the next command
        self._rcpt_commands = 0        # RCPT commands in this transaction
        self._last_code = 0            # of the last reply made here (not relayed)
        self._buf = bytearray()
        self._eof = False
        self._discarding: Reply | None = None  # dropping an over-long line up to its LF: its reply
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._awaiting: _Await | None = None
        self._auth: _AuthExchange | None = None
        self._started = False
        # message state
        self._d_refusal: Reply | None = None
        self._d_size = 0
        self._d_stuffed = 0            # dots the client doubled (not in RFC 1870's size)
        self._d_line = 0               # octets of the current line so far
        self._d_dot = False            # ... and whether it began with a (stuffed) dot
        self._d_skip = 0               # octets of the synthetic CRLF not yet skipped
        self._closed_event: ConnectionClosed | None = None
        self._mail_smtputf8 = False
        self._rcpts_asked = 0          # RcptRequested not yet answered (pipelined RCPTs)

    # ------------------------------------------------------------ driver face

    def start(self) -> None:
        """Queue the 220 greeting."""
        self._check_not_started()
        self._reply(R.greeting(self.settings.hostname))

    def refuse(self, reply: Reply = R.SERVICE_UNAVAILABLE) -> None:
        """Greet with a 421 and close (no service for this client)."""
        self._check_not_started()
        self._close(reply, "refused: " + str(reply))

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" means end of input."""
        if not data:
            self._eof = True
        elif self.state is not State.CLOSED:
            self._buf += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def close_reason(self) -> str | None:
        """Why the session closed (its ConnectionClosed's reason); None while open."""
        return self._closed_event.reason if self._closed_event is not None else None

    @property
    def started(self) -> bool:
        """Greeted or refused: the client has been (or is being) answered."""
        return self._started

    @property
    def has_buffered_input(self) -> bool:
        return bool(self._buf)

    @property
    def at_command_boundary(self) -> bool:
        """Between two commands: nothing pending, no partial line, not in
        DATA or an AUTH exchange (where a 421 may close the session)."""
        return (self.state not in (State.DATA, State.CLOSED) and self._awaiting is None
                and self._auth is None and not self._buf and not self._events)

    def next_event(self) -> Event:
        while True:
            if self._events:
                return self._events.popleft()
            if self._closed_event is not None:
                return self._closed_event
            if self._awaiting is not None:
                return PAUSED
            if self.state is State.DATA:
                if not self._step_data():
                    return NEED_DATA
                continue
            if len(self._out) >= OUT_LIMIT:
                return FLUSH  # replies wait: let the client take them first
            if (self._buf[:2] == b"\x16\x03" and self.state is State.CONNECTED and not self.encrypted
                    and self._discarding is None):
                # a TLS ClientHello (record type 22, version 3.x) where a
                # command line belongs: a client set for implicit TLS (port
                # 465) on the STARTTLS port. It waits for a ServerHello and
                # never ends a line: said at once, not after `timeout`.
                # (Not the rest of an over-long line being dropped: a read
                # may begin anywhere in it.)
                self._close(R.TLS_ON_PLAIN_PORT, "refused: TLS handshake on a plaintext port")
                continue
            line = self._next_line()
            if line is None:
                if self._eof:
                    self._close(None, "client closed the connection")
                    continue
                return NEED_DATA
            self._handle_line(line)

    def auth_result(self, user: str | None, temporary: bool = False) -> None:
        """The authenticator's answer to AuthRequested: the account name, or
        None for a failure (temporary: the authenticator could not decide)."""
        self._resume(_Await.AUTH)
        if user is not None:
            self.user = user
            self.state = State.AUTHENTICATED
            self._reply(R.AUTH_OK)
        elif temporary:
            self._reply(R.AUTH_TEMPFAIL)
        else:
            self._auth_failed()

    def tls_started(self) -> None:
        """The TLS handshake after StartTls succeeded: RFC 3207 wants the
        session to forget all it learned, the client starts over with EHLO."""
        self._resume(_Await.TLS)
        if self._buf:
            raise LocalProtocolError("plaintext input fed after STARTTLS")
        self.encrypted = True
        self.state = State.CONNECTED
        self.client_name = ""
        self.esmtp = False

    def relay_reply(self, reply: Reply) -> None:
        """The relay's (or the route lookup's) reply to MailRequested,
        RcptRequested, DataRequested or DataFinished; passed to the client."""
        if self._awaiting not in (_Await.MAIL, _Await.RCPT, _Await.DATA, _Await.DATA_END):
            raise LocalProtocolError(f"relay_reply while awaiting {self._awaiting}")
        kind = self._awaiting
        self._awaiting = None
        if kind is _Await.RCPT and reply.is_positive and self.state not in (State.MAIL, State.RCPT):
            reply = R.NEED_MAIL  # a RCPT pipelined behind a MAIL that failed: never a 250
        self._out += reply.to_bytes()
        if kind is _Await.MAIL:
            if reply.is_positive:
                self.state = State.MAIL
                self.recipients = self._rcpt_commands = 0
            else:
                self._refused()
                self._mail_refused = True
            for _ in range(self._rcpts_asked):
                self._count_rcpt()  # taken behind the MAIL: counted once its answer says where
            if self._rcpts_asked:
                self._awaiting = _Await.RCPT  # RCPTs taken behind the MAIL come next
        elif kind is _Await.RCPT:
            self._rcpts_asked -= 1
            if self._rcpts_asked:
                self._awaiting = _Await.RCPT  # more pipelined RCPTs to answer, in order
            if reply.is_positive:
                self.state = State.RCPT
                self.recipients += 1
        elif kind is _Await.DATA:
            if 300 <= reply.code < 400:
                self._begin_data()
            else:
                self._refused()
        elif kind is _Await.DATA_END:
            self.state = State.AUTHENTICATED
            self.recipients = self._rcpt_commands = 0
            if reply.is_positive:
                self.junk = self._owed = 0
            else:
                self._refused()

    def pipelined_rcpt(self) -> RcptRequested | None:
        """While a MAIL or RCPT answer is awaited: the next command if the
        client already sent it (PIPELINING) and it is a RCPT that would be
        asked for anyway, taken now so that the driver can send the group
        upstream at once; None, and nothing taken, otherwise. Every
        RcptRequested gets its relay_reply, in order (after the MAIL's, for
        RCPTs taken behind a MAIL), and the client its replies in order. A
        RCPT behind a MAIL that fails is answered 503 whatever the relay says."""
        found = self._next_pipelined()
        if found is None:
            return None
        line, lf = found
        verb, _, arg = line.partition(" ")
        if verb.upper() != "RCPT":
            return None
        if self._awaiting is _Await.RCPT and self.state not in (State.MAIL, State.RCPT):
            return None
        buf = self._buf
        rcpt = self._recipient(arg.strip(" "))
        if isinstance(rcpt, Reply):
            return None  # its refusal is answered in turn, after the others
        del buf[: lf + 1]
        self._rcpts_asked += 1
        if self._awaiting is _Await.RCPT:  # (behind a MAIL not answered yet: see relay_reply)
            self._count_rcpt()
        return RcptRequested(rcpt)

    def data_follows(self) -> bool:
        """Whether the client already sent DATA right behind the RCPTs taken
        with pipelined_rcpt() (nothing is taken: the DATA line is handled in
        its turn). The driver may send DATA upstream with the group."""
        found = self._next_pipelined()
        return found is not None and found[0].rstrip(" ").upper() == "DATA"

    def _next_pipelined(self) -> tuple[str, int] | None:
        """The next complete command line already received, decoded, and the
        offset of its LF, while a MAIL or RCPT answer is awaited; None
        otherwise (nothing taken)."""
        if (self._awaiting not in (_Await.MAIL, _Await.RCPT) or self._events
                or self._auth is not None or self._discarding is not None or self._closed_event is not None):
            return None
        buf = self._buf
        lf = buf.find(b"\n", 0, MAX_COMMAND_LINE)
        if lf < 0:
            return None
        text = self._decode(bytes(buf[: lf + 1]))
        return None if isinstance(text, Reply) else (text, lf)

    def fail_message(self, reply: Reply, reason: str) -> None:
        """The driver cannot deliver the message being received (the relay
        failed mid-DATA): the rest is read and dropped, the client gets
        `reply` after its end of data. Emits DataRefused like a refusal of
        the session's own."""
        if self.state is not State.DATA or self._awaiting is not None:
            raise LocalProtocolError(f"fail_message in state {self.state.value}")
        if self._d_refusal is None:
            self._refuse_data(reply, reason)

    def timed_out(self, reply: Reply = R.TIMEOUT) -> None:
        """The driver's read timer fired: 421 and close."""
        if not self.closed:
            self._close(reply, "timeout")

    def connection_lost(self, why: str) -> None:
        """The client's connection broke (a write failed): closed with no
        reply, `why` as the reason (it was logged as a shutdown with a 421
        nobody could be sent)."""
        if not self.closed:
            self._close(None, why)

    def shutdown(self, reply: Reply = R.SHUTTING_DOWN) -> None:
        """Close now with `reply` (server stopping, backend gone)."""
        if not self.closed:
            self._close(reply, "shutdown: " + str(reply))

    # ------------------------------------------------------------ internals

    def _check_not_started(self) -> None:
        if self._started:
            raise LocalProtocolError("session already started")
        self._started = True

    def _resume(self, kind: _Await) -> None:
        if self._awaiting is not kind:
            raise LocalProtocolError(f"answer for {kind.value} while awaiting {self._awaiting}")
        self._awaiting = None

    def _reply(self, reply: Reply) -> None:
        self._out += reply.to_bytes()
        self._last_code = reply.code
        if reply.code in _ERROR_CODES:
            self._error_point()

    def _error_point(self) -> None:
        self.errors += 1
        if self.errors >= self.settings.max_errors and not self.closed:
            self._close(R.TOO_MANY_ERRORS, "too many errors")

    def _close(self, reply: Reply | None, reason: str) -> None:
        if self.closed:
            return
        in_data = self.state is State.DATA and self._d_refusal is None
        had_transaction = self.state in (State.MAIL, State.RCPT)
        if reply is not None:
            self._out += reply.to_bytes()
        if had_transaction:
            self._events.append(TransactionReset())
        self.state = State.CLOSED
        self._buf.clear()
        self._awaiting = None
        self._closed_event = ConnectionClosed(reason, aborted_data=in_data)
        self._events.append(self._closed_event)

    # ---- lines

    def _next_line(self) -> bytes | Reply | None:
        """A complete line (CRLF/LF included), a Reply for a line refused by
        the reader, or None when more input is needed."""
        buf = self._buf
        if self._auth is not None:
            limit = MAX_AUTH_LINE
        elif buf[:5].upper() == b"MAIL ":
            limit = MAX_MAIL_LINE
        elif buf[:5].upper() == b"AUTH ":
            # an initial response as long as a continuation line may be:
            # smtplib (and others) always send one, whatever its length
            limit = MAX_AUTH_LINE + len(b"AUTH PLAIN ")
        else:
            limit = MAX_COMMAND_LINE
        if self._discarding is not None:
            lf = buf.find(b"\n")
            if lf < 0:
                buf.clear()
                return None
            del buf[: lf + 1]
            too_long, self._discarding = self._discarding, None
            return too_long
        lf = buf.find(b"\n", 0, limit)
        if lf < 0:
            if len(buf) < limit:
                return None
            # an AUTH exchange line, the AUTH command's initial response
            # included, gets RFC 4954 6's 5.5.6
            too_long = (R.AUTH_LINE_TOO_LONG if self._auth is not None or buf[:5].upper() == b"AUTH "
                        else R.LINE_TOO_LONG)
            lf = buf.find(b"\n", limit)
            if lf < 0:
                self._discarding = too_long
                buf.clear()
                return None
            del buf[: lf + 1]
            return too_long
        line = bytes(buf[: lf + 1])
        del buf[: lf + 1]
        return line

    def _decode(self, line: bytes) -> str | Reply:
        if not line.endswith(b"\r\n"):
            return R.BARE_LF
        body = line[:-2]
        if b"\r" in body:
            return R.BARE_CR
        if b"\0" in body:
            return R.NUL_IN_LINE
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            if body[:5].upper() in (b"EHLO ", b"HELO "):
                # a computer name in its code page (Latin-1, CP850): taken,
                # never shown raw (see _greet)
                return body.decode("utf-8", "surrogateescape")
            return R.NOT_UTF8

    def _handle_line(self, raw: bytes | Reply) -> None:
        text = raw if isinstance(raw, Reply) else self._decode(raw)
        if self._auth is not None:
            exchange, self._auth = self._auth, None
            if isinstance(text, Reply):
                self._reply(text if text is R.AUTH_LINE_TOO_LONG else R.AUTH_BAD_BASE64)
            else:
                self._auth_step(exchange, text)
            return
        if isinstance(text, Reply):
            self._reply(text)
            return
        while self._owed and not self.closed:
            self._owed -= 1
            self._error_point()
        if self.closed:
            return
        verb, _, arg = text.partition(" ")
        # ASCII only: str.upper() would make "MAıL" (dotless i) a MAIL
        verb = verb.upper() if verb.isascii() else ""
        arg = arg.strip(" ")
        behind_refused_mail, self._mail_refused = self._mail_refused, False
        row = COMMANDS.get(verb)
        if row is None and verb in _NOT_SMTP_VERBS:
            # an HTTP request (a browser, a proxy probe, a cross-protocol
            # attack through one): ended at once, as Postfix's
            # smtpd_forbidden_commands does, not answered line by line
            self._close(R.NOT_SMTP, f"refused: non-SMTP command {verb}")
            return
        if row is None:
            # an unknown verb: 502 (DESIGN.md, as Postfix); an empty line
            # has no verb at all: 500 5.5.2 syntax error (RFC 5321 4.2.4)
            self._reply(R.EMPTY_LINE if not text.strip(" ") else R.UNKNOWN_COMMAND)
            return
        cell = row[COLUMNS.index(self.state)]
        if isinstance(cell, Reply):
            if verb == "RCPT" and behind_refused_mail:
                # a pipelining client sent its RCPTs before it could see the
                # MAIL's refusal: 503, but no error point (as many as a
                # transaction may have, see _count_rcpt)
                self._out += cell.to_bytes()
                self._last_code = cell.code
                self._mail_refused = True
                self._count_rcpt()
                return
            self._reply(cell)
            if cell.code not in _ERROR_CODES:
                self._count_junk()
            return
        self._last_code = 0
        getattr(self, "_cmd_" + verb.lower())(arg, cell)
        if verb == "MAIL" and self._last_code >= 400:
            self._mail_refused = True  # refused here (syntax, SIZE): see above
        if verb in _JUNK_VERBS:
            self._count_junk()
        elif verb == "RCPT":
            self._count_rcpt()
        elif self._last_code >= 400 and self._last_code not in _ERROR_CODES and not self.closed:
            self._count_junk()  # refused here without an error point: 552, 454

    def _count_junk(self) -> None:
        self.junk += 1
        if self.junk > self.settings.max_junk:
            self._error_point()

    def _count_rcpt(self) -> None:
        """RCPTs are no junk: past the 100-recipient cap the 452s are RFC
        5321's "send the rest in another transaction", and a refused
        recipient is the upstream's word on one address. But a transaction
        takes at most MAX_RCPT_COMMANDS of them; each one more owes an error
        point (charged at the next command: replies may be pending)."""
        self._rcpt_commands += 1
        if self._rcpt_commands > MAX_RCPT_COMMANDS:
            self._owed += 1

    def _refused(self) -> None:
        """The relay refused a MAIL or RCPT: junk, whose error point (past
        the limit) waits for the next command, as replies may be pending."""
        self.junk += 1
        if self.junk > self.settings.max_junk:
            self._owed += 1

    # ---- commands (each called only where COMMANDS allows it)

    def _cmd_ehlo(self, arg: str, nxt: State) -> None:
        self._greet(arg, nxt, esmtp=True)

    def _cmd_helo(self, arg: str, nxt: State) -> None:
        self._greet(arg, nxt, esmtp=False)

    def _greet(self, arg: str, nxt: State, esmtp: bool) -> None:
        # Any name is taken, as the original and Postfix take it (a Windows
        # computer name, a name with a space, 505 octets): it is only shown.
        # The relay uses it upstream (cloneEhlo) or in Received: only when it
        # is a domain or address literal (is_ehlo_name), the log escapes it.
        if not arg:
            self._reply(R.SYNTAX_DOMAIN)
            return
        self._end_transaction()
        self.state = nxt
        self.client_name = arg
        self.esmtp = esmtp
        self._events.append(Greeted(arg, esmtp))
        if esmtp:
            self._reply(R.ehlo(self.settings.hostname, arg, self._extensions()))
        else:
            self._reply(R.helo(self.settings.hostname, arg))

    def _extensions(self) -> tuple[str, ...]:
        s = self.settings
        ext = ["PIPELINING"]
        if s.size_limit is not None:
            ext.append(f"SIZE {s.size_limit}" if s.size_limit else "SIZE")
        if s.advertise_8bitmime:
            ext.append("8BITMIME")
        ext.append("ENHANCEDSTATUSCODES")
        if (s.tls_available or s.tls_broken) and not self.encrypted and self.user is None:
            # (after a login in clear STARTTLS is refused, 503: not offered then)
            ext.append("STARTTLS")
        if self.user is None and (self.encrypted or not (s.require_encryption or s.tls_broken)):
            ext.append("AUTH PLAIN LOGIN")
            ext.append("AUTH=PLAIN LOGIN")  # for pre-RFC 2554 clients (old Outlook, scanners)
        ext.append("HELP")
        return tuple(ext)

    def _cmd_starttls(self, arg: str, nxt: State) -> None:
        if arg:
            self._reply(R.SYNTAX_NO_ARGS)
        elif self.encrypted:
            self._reply(R.TLS_ALREADY)
        elif not self.settings.tls_available:
            self._reply(R.TLS_NOT_AVAILABLE)
        elif self._buf:
            # Input behind STARTTLS would be read as if it came over TLS
            # (CVE-2011-0411): refuse, the rest is read as plain commands.
            self._reply(R.TLS_PIPELINED)
        else:
            self._reply(R.READY_FOR_TLS)
            self._awaiting = _Await.TLS
            self._events.append(StartTls())

    def _cmd_auth(self, arg: str, nxt: State) -> None:
        mech, _, initial = arg.partition(" ")
        mech = mech.upper() if mech.isascii() else mech
        initial = initial.strip(" ")
        if not mech:
            self._reply(R.SYNTAX_NEEDS_ARG)
            return
        if mech not in ("PLAIN", "LOGIN"):
            self._reply(R.AUTH_BAD_MECH)
            return
        if self.settings.require_encryption and not self.encrypted:
            self._reply(R.AUTH_NEEDS_TLS)
            return
        if self.settings.tls_broken and not self.encrypted:
            # the certificate would not load, so STARTTLS fails: a client
            # that went on without it (an "if available" setting) is not
            # asked for a password in clear, nor logged in, whatever
            # mailerEncryption allows (AUTH was not advertised); a garbled
            # initial response still gets its 501, as the original's input
            # check with its sample config expects
            bad = initial not in ("", "*", "=") and not _is_base64(initial)
            self._reply(R.AUTH_BAD_BASE64 if bad else R.AUTH_NEEDS_TLS)
            return
        exchange = _AuthExchange(mech)
        if not initial:
            self._auth = exchange
            self._reply(R.CHALLENGE_EMPTY if mech == "PLAIN" else R.CHALLENGE_USERNAME)
        else:
            self._auth_step(exchange, initial)

    def _auth_step(self, exchange: "_AuthExchange", text: str) -> None:
        if text == "*":
            self._reply(R.AUTH_CANCELLED)
            return
        if text == "=":
            decoded = b""
        else:
            try:
                decoded = base64.b64decode(text.encode("ascii"), validate=True)
            except (binascii.Error, ValueError, UnicodeEncodeError):
                self._reply(R.AUTH_BAD_BASE64)
                return
        # octets that are no UTF-8 (a cp1252 client's "ä") decode fine as
        # base64: they make a failed login below (535, counted, logged), not
        # a 501 (RFC 4954 4 keeps that for base64 that cannot be decoded)
        value = decoded.decode("utf-8", "surrogateescape")
        if exchange.mechanism == "PLAIN":
            parts = value.split("\0")
            if len(parts) != 3:
                self._reply(R.AUTH_BAD_PLAIN)
                return
            authzid, user, password = parts
            if authzid and authzid != user:
                # with nothing after it (`alice\0SECRET\0`, the fields one
                # place off) the "user name" is the password: not shown
                self._auth_refused(exchange.mechanism, user if password else "",
                                   "authorization identity not allowed")
                return
            self._auth_ask(exchange.mechanism, user, password)
        elif exchange.user is None:
            exchange.user = value
            self._auth = exchange
            self._reply(R.CHALLENGE_PASSWORD)
        else:
            self._auth_ask(exchange.mechanism, exchange.user, value)

    def _auth_ask(self, mech: str, user: str, password: str) -> None:
        # what could never succeed does not bother the authenticator, but
        # is a failed login all the same, and logged
        why = ("empty user name" if not user else
               "user name too long" if len(user) > MAX_USER else
               "empty password" if not password else
               "password too long" if len(password) > MAX_PASSWORD else
               "NUL in the credentials" if "\0" in user or "\0" in password else
               "credentials not UTF-8" if not (_is_text(user) and _is_text(password)) else "")
        if why:
            self._auth_refused(mech, user, why)
            return
        self._awaiting = _Await.AUTH
        self._events.append(AuthRequested(mech, user, Secret(password)))

    def _auth_refused(self, mech: str, user: str, why: str) -> None:
        """A login refused here, without the authenticator: 535 and counted,
        as a wrong password; the driver logs it."""
        shown = user.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        self._events.append(AuthRefused(mech, shown[:MAX_USER], why))
        self._auth_failed()

    def _auth_failed(self) -> None:
        self.auth_failures += 1
        if self.auth_failures >= self.settings.max_auth_failures:
            self._close(R.TOO_MANY_AUTH_FAILURES, "too many authentication failures")
        else:
            self._out += R.AUTH_FAILED.to_bytes()

    def _cmd_mail(self, arg: str, nxt: State) -> None:
        try:
            path, params_text = split_path_argument(arg, "FROM")
            params = parse_params(params_text)
        except (PathError, ParamError):
            self._reply(R.SYNTAX_MAIL)
            return
        size = None
        body8 = smtputf8 = False
        for key, value in params.items():
            if key == "SIZE":  # known even where not offered (disable), as the original took it
                if not (value and value.isascii() and value.isdigit() and len(value) <= 20):
                    self._reply(R.BAD_PARAMETER_VALUE)  # known, but not a size: 501
                    return
                size = int(value)
            elif key == "BODY" and value and value.upper() in ("7BIT", "8BITMIME") \
                    and (value.upper() == "7BIT" or self.settings.advertise_8bitmime):
                body8 = value.upper() == "8BITMIME"
            elif key == "BODY" and (not value or value.upper() not in ("8BITMIME", "BINARYMIME")):
                self._reply(R.BAD_PARAMETER_VALUE)  # BODY=FOO; BINARYMIME etc.: 555 below
                return
            elif key == "SMTPUTF8" and value is None:
                smtputf8 = True
            elif key == "AUTH" and value:
                pass  # RFC 4954 AUTH=: accepted and ignored (we do not trust it)
            else:
                self._reply(R.BAD_PARAMETER)
                return
        limit = self.settings.size_limit
        if size is not None and limit and size > limit:
            self._reply(R.MESSAGE_TOO_BIG_DECLARED)
            return
        try:
            sender = parse_path(path, allow_null=True, allow_postmaster=False, utf8=smtputf8)
        except NeedsUtf8:
            self._reply(R.UTF8_NEEDS_SMTPUTF8)
            return
        except PathError:
            self._reply(R.BAD_SENDER)
            return
        self._mail_smtputf8 = smtputf8
        self._awaiting = _Await.MAIL
        self._events.append(MailRequested(sender, MailParams(size, body8, smtputf8)))

    def _cmd_rcpt(self, arg: str, nxt: State) -> None:
        rcpt = self._recipient(arg)
        if isinstance(rcpt, Reply):
            self._reply(rcpt)
            return
        self._awaiting = _Await.RCPT
        self._rcpts_asked = 1
        self._events.append(RcptRequested(rcpt))

    def _recipient(self, arg: str) -> str | Reply:
        """The address of a RCPT TO argument, or the refusal for it. Counts
        the RCPTs asked for but not answered yet towards the cap."""
        try:
            path, params_text = split_path_argument(arg, "TO")
            params = parse_params(params_text)
        except (PathError, ParamError):
            return R.SYNTAX_RCPT
        if params:
            return R.BAD_PARAMETER
        try:
            rcpt = parse_path(path, allow_null=False, allow_postmaster=True,
                              utf8=self._mail_smtputf8)
        except NeedsUtf8:
            return R.UTF8_NEEDS_SMTPUTF8
        except PathError:
            return R.BAD_RECIPIENT
        if self.recipients + self._rcpts_asked >= self.settings.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        return rcpt

    def _cmd_data(self, arg: str, nxt: State) -> None:
        if arg:
            self._reply(R.SYNTAX_NO_ARGS)
            return
        self._awaiting = _Await.DATA
        self._events.append(DataRequested())

    def _cmd_rset(self, arg: str, nxt: State) -> None:
        if arg:
            self._reply(R.SYNTAX_NO_ARGS)
            return
        self._end_transaction()
        self.state = nxt
        self._reply(R.OK)

    def _cmd_noop(self, arg: str, nxt: State) -> None:
        self._reply(R.OK)

    def _cmd_help(self, arg: str, nxt: State) -> None:
        self._reply(R.HELP)

    def _cmd_vrfy(self, arg: str, nxt: State) -> None:
        self._reply(R.VRFY if arg else R.SYNTAX_NEEDS_ARG)

    def _cmd_quit(self, arg: str, nxt: State) -> None:
        self._close(R.BYE, "quit")

    def _end_transaction(self) -> None:
        if self.state in (State.MAIL, State.RCPT):
            self._events.append(TransactionReset())
        self.recipients = self._rcpt_commands = 0

    # ---- DATA

    def _begin_data(self) -> None:
        self.state = State.DATA
        self._d_refusal = None
        self._d_size = 0
        self._d_stuffed = 0
        self._d_line = 0
        # The CRLF that ended the DATA line starts the first "\r\n." test.
        self._buf[:0] = b"\r\n"
        self._d_skip = 2

    def _step_data(self) -> bool:
        """Consume message input; False when more input is needed.

        Only a window of one chunk (plus room for an end of data) is searched
        per step, so a large buffer is never rescanned; the bare CR/LF and
        line length checks run on the chunk handed out (_emit)."""
        if self._d_refusal is not None:
            return self._step_refused()
        buf = self._buf
        n = len(buf)
        window = min(n, self._d_skip + DATA_CHUNK + len(_END))
        # The first "\r\n." that is, or may still become, the end marker:
        # a whole CRLF.CRLF, or a start of one at the very end of the input
        # (any other "\r\n." is a dot-stuffed line, part of the message).
        dot = buf.find(_END, 0, min(n, window + 2))
        if dot < 0:
            for tail in _END_STARTS:
                if buf.endswith(tail) and n - len(tail) + 3 <= window:
                    dot = n - len(tail)
                    break
        if dot < 0:
            # Keep a trailing CR or CRLF: it may begin the end of data.
            keep = 2 if buf.endswith(b"\r\n") else 1 if buf.endswith(b"\r") else 0
            return self._emit(n - keep)
        if dot > self._d_skip:
            return self._emit(dot)  # what comes before a (possible) end of data
        if n - dot < len(_END):
            return self._need_data_in_message()  # maybe the end: wait for the rest
        del buf[: dot + len(_END)]
        self._d_skip = 0
        # nothing handed out and the end marker's CRLF is the one that ended
        # the DATA command: the client sent no line at all
        return self._finish_data(empty=dot == 0 and self._d_size == 0)

    def _need_data_in_message(self) -> bool:
        if self._eof:
            self._close(None, "client closed the connection during DATA")
            return True
        return False

    def _emit(self, cut: int) -> bool:
        """Hand out buf[skip:cut] (at most DATA_CHUNK octets) as message
        data, after checking it: no bare CR or LF, no line over 1000 octets."""
        buf = self._buf
        skip = self._d_skip
        cut = min(cut, skip + DATA_CHUNK)
        if buf[cut - 1:cut + 1] == b"\r\n":
            # never split a CRLF (the LF alone would look bare): leave it for
            # the next chunk, or take it whole when it is all there is
            cut = cut - 1 if cut - 1 > skip else cut + 1
        if cut <= skip:
            return self._need_data_in_message()
        chunk = bytes(buf[skip:cut])
        lines = chunk.split(b"\r\n")
        # Every CRLF is gone from the joined lines: any CR or LF left is bare.
        # (bytes.find is memchr; counting single octets is several times slower.)
        joined = b"".join(lines)
        if b"\r" in joined or b"\n" in joined:
            return self._refuse_data(R.BARE_LF_IN_DATA, "bare CR or LF in message")
        if b"\0" in joined:  # not text (RFC 5322 2.3, RFC 5321 4.5.2 without BINARYMIME)
            return self._refuse_data(R.NUL_IN_DATA, "NUL in message")
        del buf[:cut]
        self._d_skip = 0
        skip_line_start = self._d_line == 0
        first = self._d_line + len(lines[0])
        first_dot = self._d_dot if self._d_line else lines[0][:1] == b"."
        longest = max(first, max(map(len, lines[1:]), default=0))
        self._d_line = len(lines[-1]) if len(lines) > 1 else first
        self._d_dot = lines[-1][:1] == b"." if len(lines) > 1 else first_dot
        if longest + 2 > MAX_TEXT_LINE and _too_long(first - first_dot, lines[1:]):
            return self._refuse_data(R.DATA_LINE_TOO_LONG, "line longer than 1000 octets")
        self._d_size += len(chunk)
        limit = self.settings.size_limit
        if limit:
            # RFC 1870's size leaves out the dots a client doubled
            self._d_stuffed += chunk.count(b"\r\n.") + (skip_line_start and chunk[:1] == b".")
            if self._d_size - self._d_stuffed > limit:
                return self._refuse_data(R.MESSAGE_TOO_BIG, "message exceeds the size limit")
        self._events.append(DataChunk(chunk))
        return True

    def _finish_data(self, empty: bool) -> bool:
        limit = self.settings.size_limit
        if not empty:
            # the last line's CRLF came with the end marker: it counts too
            # (RFC 1870 3), and a message one line short of the limit is
            # refused only now, before its final dot goes upstream
            self._d_size += 2
            if limit and self._d_size - self._d_stuffed > limit:
                self._events.append(DataRefused("message exceeds the size limit", complete=True))
                self._out += R.MESSAGE_TOO_BIG.to_bytes()
                self._data_refused()
                return True
        self._awaiting = _Await.DATA_END
        self._events.append(DataFinished(self._d_size, empty))
        return True

    def _data_refused(self, junk: bool = True) -> None:
        """A message refused here has ended (its reply is out): the
        transaction is over."""
        self.state = State.AUTHENTICATED
        self.recipients = self._rcpt_commands = 0
        if junk:
            self._refused()

    def _refuse_data(self, reply: Reply, reason: str) -> bool:
        self._d_refusal = reply
        self._events.append(DataRefused(reason))
        if self._d_skip == 0 and (self._d_line == 0 or self._d_line == 1 and self._d_dot):
            # The line the input left is in began in a chunk handed out, and
            # is empty or "." so far: put back its CRLF (and dot), so that
            # an end made with bare line ends (`\r\n.\n`) is still seen.
            self._buf[:0] = b"\r\n." if self._d_line else b"\r\n"
        return True

    def _step_refused(self) -> bool:
        """Discard the rest of a refused message up to its end. A clean
        CRLF.CRLF end gets the refusal and the session goes on; an end made
        with bare CR/LF is ambiguous, so the session is closed."""
        buf = self._buf
        m = _LOOSE_END.search(buf)
        if m is not None and m.end() == len(buf) and buf.endswith(b"\r") and not self._eof:
            m = None  # the CR may still get its LF
        if m is None:
            keep = 5
            if len(buf) > keep:
                del buf[: len(buf) - keep]
            if self._eof:
                self._close(None, "client closed the connection during DATA")
                return True
            return False
        clean = m.group() == _END
        del buf[: m.end()]
        reply, self._d_refusal = self._d_refusal, None
        if clean:
            self._out += reply.to_bytes()
            self._data_refused()
        else:
            self._data_refused(junk=False)
            self._close(reply if reply.code == 421 else R.BARE_LF_IN_DATA_CLOSING,
                        "message ended with bare CR/LF")
        return True


@dataclass
class _AuthExchange:
    mechanism: str
    user: str | None = None


def _too_long(first: int, rest: list[bytes]) -> bool:
    """Is a line over 1000 octets with its CRLF, not counting the leading dot
    a client doubled for transparency (RFC 5321 4.5.3.1.6)? `first`: the
    length of the chunk's first line so far, its dot already taken off."""
    longest = max(first, max((len(line) - (line[:1] == b".") for line in rest), default=0))
    return longest + 2 > MAX_TEXT_LINE
