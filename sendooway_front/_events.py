"""What the sans-IO session hands to its driver.

Events marked "answer with ..." pause the session: it processes no more
input until the driver calls that method. The others are notices the driver
acts on (or ignores) before asking for the next event.
"""

from __future__ import annotations

from dataclasses import dataclass

from sendooway_shared.types import Secret

from ._relay_api import MailParams


class Event:
    """Base class of all session events."""

    __slots__ = ()


class _Sentinel(Event):
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""The session has consumed its input: send data_to_send(), then read and
call receive_data()."""

FLUSH = _Sentinel("FLUSH")
"""Replies have piled up (a client pipelining without reading them): send
data_to_send() (waiting for the client to take it), then call next_event()
again — without reading: there is input left."""

PAUSED = _Sentinel("PAUSED")
"""The session waits for the answer to the last event (a driver bug if seen)."""


@dataclass(frozen=True)
class Greeted(Event):
    """EHLO/HELO accepted. `esmtp` is True for EHLO."""

    name: str
    esmtp: bool


@dataclass(frozen=True)
class AuthRequested(Event):
    """A complete AUTH exchange: check the credentials; answer with
    Session.auth_result()."""

    mechanism: str
    user: str
    password: Secret


@dataclass(frozen=True)
class AuthRefused(Event):
    """A login the session refused itself (535, counted): to be logged.
    Needs no answer."""

    mechanism: str
    user: str
    reason: str


@dataclass(frozen=True)
class StartTls(Event):
    """STARTTLS accepted (the 220 is in data_to_send()): send it, run the
    server handshake, answer with Session.tls_started()."""


@dataclass(frozen=True)
class MailRequested(Event):
    """MAIL FROM: look the route up and open the upstream transaction; answer
    with Session.relay_reply(). `sender` is "" for the null sender <>."""

    sender: str
    params: MailParams


@dataclass(frozen=True)
class RcptRequested(Event):
    """RCPT TO: answer with Session.relay_reply()."""

    recipient: str


@dataclass(frozen=True)
class DataRequested(Event):
    """DATA: answer with Session.relay_reply() (354 starts the message)."""


@dataclass(frozen=True)
class DataChunk(Event):
    """Raw message bytes: dot-stuffing kept, CRLF line ends, never part of the
    final CRLF.CRLF. Bounded in size."""

    data: bytes


@dataclass(frozen=True)
class DataFinished(Event):
    """The client sent CRLF.CRLF after a clean message: send the final dot;
    answer with Session.relay_reply()."""

    size: int  # octets handed out in DataChunk events, plus the last line's CRLF
    empty: bool = False  # no line at all: "." came right after the 354


@dataclass(frozen=True)
class DataRefused(Event):
    """The message must not be delivered (bare CR/LF, over-long line, too
    big): abort the upstream transaction now, without its final dot. The
    session answers the client itself once the data ends."""

    reason: str
    complete: bool = False  # refused at its end: the whole message came


@dataclass(frozen=True)
class TransactionReset(Event):
    """RSET, EHLO, STARTTLS or the end of the session during an open mail
    transaction: end the upstream transaction."""


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """The session is over (QUIT, 421, or the client went away). Send what is
    left in data_to_send() and close. `aborted_data` is True when the client
    vanished in the middle of a message (the driver must abort it)."""

    reason: str
    aborted_data: bool = False
