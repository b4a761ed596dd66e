"""Hypothesis drives the session core with random commands, arguments,
garbage and chunk splits, checking it against its own command table."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sendooway_front._reply import Reply
from sendooway_front._session import COLUMNS, COMMANDS, SessionSettings, State

from .front_harness import Harness, codes, plain

_REPLY_LINE = re.compile(rb"\A[2-5][0-9][0-9](?:[ -].*)?\Z", re.S)

COMMAND_LINES = [
    b"EHLO client.test", b"HELO client.test", b"STARTTLS", b"NOOP", b"RSET", b"QUIT",
    b"HELP", b"VRFY bob", b"EXPN list", b"DATA",
    b"MAIL FROM:<alice@example.org>", b"MAIL FROM:<>", b"MAIL FROM:<a@b.c> SIZE=10",
    b"RCPT TO:<bob@example.net>", b"RCPT TO:<Postmaster>",
    b"AUTH PLAIN " + plain("alice", "alice-secret").encode(),
    b"AUTH PLAIN " + plain("alice", "nope").encode(),
    b"AUTH LOGIN", b"AUTH PLAIN", b"YWxpY2U=", b"*",
    b"mail from:<x@y.z> BODY=8BITMIME", b"rcpt to:<bad>", b"BDAT 10 LAST", b"XYZZY",
]
MESSAGE_PARTS = [b"Subject: x\r\n", b"\r\n", b".\r\n", b"..x\r\n", b"\r\n.\r\n", b"a\nb", b"\r",
                 b"\n.\n", b"x" * 1200, b"line\r\n"]


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(settings=SessionSettings("mx.test", tls_available=True, max_errors=50,
                                                  size_limit=5000))

    def _feed(self, data: bytes, splits: list[int]) -> bytes:
        out = b""
        cuts = sorted({min(max(c, 0), len(data)) for c in splits} | {0, len(data)})
        for a, b in zip(cuts, cuts[1:]):
            out += self.h.feed(data[a:b])
        return out

    def _command_mode(self) -> bool:
        s = self.h.session
        return (s.state in COLUMNS and s._auth is None and not s.has_buffered_input
                and not s._discarding)

    @precondition(lambda self: not self.h.closed)
    @rule(line=st.sampled_from(COMMAND_LINES), splits=st.lists(st.integers(0, 80), max_size=4))
    def command(self, line, splits):
        expected = None
        if self._command_mode():
            verb = line.split(b" ")[0].decode().upper()
            row = COMMANDS.get(verb)
            if row is not None:
                cell = row[COLUMNS.index(self.h.session.state)]
                if isinstance(cell, Reply):
                    expected = cell.code
            elif verb not in ("YWXPY2U=", "*"):
                expected = 502
        out = self._feed(line + b"\r\n", splits)
        if expected is not None and out:
            assert int(out[:3]) == expected, (line, out)

    @precondition(lambda self: not self.h.closed)
    @rule(parts=st.lists(st.sampled_from(MESSAGE_PARTS), max_size=6),
          splits=st.lists(st.integers(0, 200), max_size=4))
    def message_bytes(self, parts, splits):
        self._feed(b"".join(parts), splits)

    @precondition(lambda self: not self.h.closed)
    @rule(data=st.binary(max_size=600), splits=st.lists(st.integers(0, 600), max_size=3))
    def garbage(self, data, splits):
        self._feed(data, splits)

    @precondition(lambda self: not self.h.closed)
    @rule()
    def client_goes_away(self):
        self.h.eof()
        assert self.h.closed

    @precondition(lambda self: bool(self.h.closed))
    @rule()
    def reconnect(self):
        self.__init__()

    @invariant()
    def replies_are_well_formed(self):
        out = bytes(self.h.out)
        assert out == b"" or out.endswith(b"\r\n")
        for line in out.split(b"\r\n")[:-1]:
            assert _REPLY_LINE.match(line), line

    @invariant()
    def input_is_bounded(self):
        assert len(self.h.session._buf) <= 4096

    @invariant()
    def state_is_known(self):
        s = self.h.session
        assert s.state in State
        if s.state in (State.MAIL, State.RCPT, State.DATA):
            assert s.user is not None
        if self.h.closed:
            assert s.state is State.CLOSED


TestSession = SessionMachine.TestCase
TestSession.settings = settings(max_examples=150, stateful_step_count=30, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])


_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
PIECES = [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"x" * 10, b"\r\n.", b"\r\n..", b" "]


def _check_message(pieces, cuts, chunk=None):
    """Any message, split anywhere: the relay gets exactly the raw bytes
    before the final CRLF.CRLF, or nothing at all when a bare CR/LF is in
    it. `chunk`: DATA_CHUNK shrunk to that many octets."""
    from unittest import mock

    from sendooway_front import _session

    body = b"".join(pieces) + b"\r\n"
    assume(b"\r\n.\r\n" not in b"\r\n" + body)
    stream = body + b".\r\nNOOP\r\n"
    with mock.patch.object(_session, "DATA_CHUNK", chunk or _session.DATA_CHUNK):
        h = Harness()
        h.feed(b"EHLO c\r\nAUTH PLAIN " + plain("alice", "alice-secret").encode()
               + b"\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
        points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
        for a, b in zip(points, points[1:]):
            h.feed(stream[a:b])
    if _BARE.search(body):
        assert h.messages == [] and h.aborted == 1
    else:
        assert h.messages == [body[:-2]]
        assert codes(bytes(h.out))[-2:] == [250, 250]


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=30),
       cuts=st.lists(st.integers(0, 400), max_size=6))
def test_message_bytes_against_a_reference(pieces, cuts):
    _check_message(pieces, cuts)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=30),
       cuts=st.lists(st.integers(0, 400), max_size=6),
       chunk=st.integers(1, 12))
def test_message_bytes_with_tiny_chunks(pieces, cuts, chunk):
    """The same with DATA_CHUNK shrunk to a few octets, so that the search
    window, the chunk border (never inside a CRLF) and the checks of each
    chunk meet every position of the message and of its end."""
    _check_message(pieces, cuts, chunk)
