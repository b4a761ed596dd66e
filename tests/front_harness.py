"""A scripted driver for the sans-IO session: answers its events like a
frontend whose authenticator knows PASSWORDS and whose relay accepts all,
and records what the relay would have seen."""

from __future__ import annotations

from dataclasses import dataclass, field

from sendooway_front import _catalogue as R
from sendooway_front._events import (
    FLUSH, NEED_DATA, PAUSED, AuthRequested, ConnectionClosed, DataChunk, DataFinished, DataRefused,
    DataRequested, Greeted, MailRequested, RcptRequested, StartTls, TransactionReset,
)
from sendooway_front._reply import Reply
from sendooway_front._session import DATA_CHUNK, Session, SessionSettings

PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}


@dataclass
class Harness:
    settings: SessionSettings = field(default_factory=lambda: SessionSettings(
        "mx.test", tls_available=True))
    no_route: set = field(default_factory=set)
    reject_rcpt: set = field(default_factory=set)
    refuse_mail: set = field(default_factory=set)  # senders the "upstream" refuses (550)
    temp_auth: bool = False

    def __post_init__(self) -> None:
        self.session = Session(self.settings)
        self.session.start()
        self.out = bytearray(self.session.data_to_send())
        self.events: list = []
        self.message = bytearray()
        self.messages: list[bytes] = []
        self.aborted = 0
        self.closed: ConnectionClosed | None = None
        self.auth_seen: list[tuple[str, str]] = []

    def feed(self, data: bytes, bytewise: bool = False) -> bytes:
        """Feed `data` (one byte at a time with bytewise); return the replies."""
        start = len(self.out)
        pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
        for piece in pieces:
            if self.closed:
                break
            if not piece:
                continue
            self.session.receive_data(piece)
            self.pump()
        return bytes(self.out[start:])

    def eof(self) -> bytes:
        start = len(self.out)
        self.session.receive_data(b"")
        self.pump()
        return bytes(self.out[start:])

    def _rcpt_reply(self, rcpt: RcptRequested) -> Reply:
        return (Reply(550, ("5.1.1 No such user",)) if rcpt.recipient in self.reject_rcpt
                else Reply(250, ("2.1.5 Recipient OK",)))

    def pump(self) -> None:
        s = self.session
        while True:
            ev = s.next_event()
            if ev is NEED_DATA:
                break
            if ev is FLUSH:  # the replies are taken before more input is read
                self.out += s.data_to_send()
                continue
            assert ev is not PAUSED, "harness left an event unanswered"
            self.events.append(ev)
            if isinstance(ev, AuthRequested):
                self.auth_seen.append((ev.user, ev.password.reveal()))
                if self.temp_auth:
                    s.auth_result(None, temporary=True)
                else:
                    ok = PASSWORDS.get(ev.user) == ev.password.reveal()
                    s.auth_result(ev.user if ok else None)
            elif isinstance(ev, StartTls):
                s.tls_started()
            elif isinstance(ev, MailRequested):
                if ev.sender in self.no_route:
                    s.relay_reply(R.NO_ROUTE)
                    continue
                # as the driver does: the RCPTs pipelined behind MAIL go with it
                group = []
                while (more := s.pipelined_rcpt()) is not None:
                    group.append(more)
                self.events += group
                refused = ev.sender in self.refuse_mail
                s.relay_reply(Reply(550, ("5.7.1 Sender refused",)) if refused
                              else Reply(250, ("2.1.0 Sender OK",)))
                for rcpt in group:
                    # a careless upstream accepting RCPTs after a refused MAIL:
                    # the session must still answer them 503
                    s.relay_reply(Reply(250, ("2.1.5 Recipient OK",)) if refused
                                  else self._rcpt_reply(rcpt))
            elif isinstance(ev, RcptRequested):
                # as the driver does: the RCPTs pipelined behind it as one group
                group = [ev]
                while (more := s.pipelined_rcpt()) is not None:
                    group.append(more)
                self.events += group[1:]
                for rcpt in group:
                    s.relay_reply(self._rcpt_reply(rcpt))
            elif isinstance(ev, DataRequested):
                s.relay_reply(R.START_DATA)
            elif isinstance(ev, DataChunk):
                assert 0 < len(ev.data) <= DATA_CHUNK
                self.message += ev.data
            elif isinstance(ev, DataFinished):
                assert ev.size == len(self.message) + (0 if ev.empty else 2)
                self.messages.append(bytes(self.message))
                self.message.clear()
                s.relay_reply(Reply(250, ("2.0.0 Queued upstream",)))
            elif isinstance(ev, DataRefused):
                self.aborted += 1
                self.message.clear()
            elif isinstance(ev, (TransactionReset, Greeted)):
                pass
            elif isinstance(ev, ConnectionClosed):
                self.closed = ev
                self.out += s.data_to_send()
                break
            self.out += s.data_to_send()
        self.out += s.data_to_send()


def codes(replies: bytes) -> list[int]:
    """The reply codes of the last line of each reply."""
    out = []
    for line in replies.split(b"\r\n"):
        if len(line) >= 4 and line[3:4] == b" " or len(line) == 3:
            out.append(int(line[:3]))
    return out


def plain(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


LOGIN_ALICE = f"EHLO client.test\r\nAUTH PLAIN {plain('alice', 'alice-secret')}\r\n".encode()


def unchecked_chunk(chunk: bytes) -> bool:
    """Does `chunk` break what the relay is promised (RelayBackend.data_chunk):
    a CR or LF outside a CRLF pair inside it, a CRLF split at its borders,
    a NUL? (Checked here independently of the session core's own test.)"""
    rest = chunk.replace(b"\r\n", b"")
    return b"\r" in rest or b"\n" in rest or b"\0" in chunk


def pieces(data: bytes, cuts) -> list[bytes]:
    """`data` cut at the positions `cuts` (any order, repeats and the ends
    allowed): the non-empty pieces, in order, as reads of that input."""
    edges = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]
