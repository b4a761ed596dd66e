"""Mutation review and differential tests of the DATA path, now that the
session core is the only check of the message bytes (75ee33d removed the
relay's second scan).

Reviewed: sendooway_front/_session.py `_begin_data`, `_step_data`, `_emit`,
`_finish_data`, `_refuse_data`, `_step_refused`, `_too_long`, `_close`'s
aborted_data, `fail_message`, the `_END_STARTS`/`_LOOSE_END` constants, and
sendooway_front/_driver.py's handing of DataChunk/DataRefused/
ConnectionClosed to the relay. MUTANTS_SUMMARY below gives the counts.

The tests compare the session core (and once the driver with its
recording relay) against a whole-message reference written here: given
everything the client sends after DATA, it decides whether the message is
accepted (the relay gets exactly the octets before the end marker, dot-
stuffing as received, then data_end), refused with a clean end (550, the
session goes on), refused with a lax end (421 and close) or never ended
(closed at EOF, data_abort); and in every case no chunk breaks the
data_chunk promise.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sendooway_front import _catalogue as R
from sendooway_front import _session
from sendooway_front._events import ConnectionClosed, DataChunk, DataFinished, DataRefused

from .front_harness import LOGIN_ALICE, Harness, codes
from .test_front_driver import LOGIN, TXN, converse

MUTANTS_SUMMARY = """
121 mutants: 92 killed by the existing suite, 5 killed only by this file,
24 equivalent (see the report in the commit message for the list).
"""

END = b"\r\n.\r\n"
LOOSE_END = re.compile(rb"(\r\n|\r|\n)\.(\r\n|\r|\n)")
START = LOGIN_ALICE + b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"


# ------------------------------------------------------------ the reference


def _bare_or_nul(s: bytes, lo: int, hi: int, ended: bool) -> int | None:
    """First bare CR, bare LF or NUL in s[lo:hi] (s[hi:] may still follow:
    a CR at hi-1 before an LF at hi is not bare). A CR that ends all of the
    input of a message that never ended is not known to be bare."""
    for i in range(lo, hi):
        c = s[i]
        if c == 0:
            return i
        if c == 13 and s[i + 1:i + 2] != b"\n" and (ended or i + 1 < len(s)):
            return i
        if c == 10 and s[i - 1] != 13:
            return i
    return None


def _long_line(s: bytes, lo: int, hi: int) -> int | None:
    """Start of the first line in s[lo:hi] over 1000 octets with its CRLF,
    a leading (doubled) dot not counted. A line still open at hi counts
    as if its CRLF came next."""
    pos = lo
    while pos < hi:
        e = s.find(b"\r\n", pos, hi)
        line_end = e if e >= 0 else hi
        if line_end - pos - (s[pos:pos + 1] == b".") + 2 > 1000:
            return pos
        if e < 0:
            break
        pos = e + 2
    return None


def reference(stream: bytes) -> dict:
    """What must happen to `stream` (all the client sends after DATA, then
    EOF). Keys: outcome (accepted / refused / lax / unended), message (the
    relay's octets when accepted), empty, rest (the input after the end)."""
    s = b"\r\n" + stream  # the CRLF that ended DATA starts the first "\r\n." test
    p = s.find(END)
    hi = p if p >= 0 else len(s)
    tail = hi
    if p < 0 and s.endswith(b"\r"):
        tail -= 1  # a CR that may still get its LF: not yet part of a line
    bad = _bare_or_nul(s, 2, hi, p >= 0)
    long_ = _long_line(s, 2, tail)
    if bad is not None:
        bad = s.rfind(b"\r\n", 0, bad + 1) + 2  # the start of its line
        bad = bad if bad > 1 else 2
    starts = [x for x in (bad, long_) if x is not None]
    if not starts:
        if p < 0:
            return {"outcome": "unended"}
        return {"outcome": "accepted", "message": s[2:p], "empty": p == 0, "rest": s[p + 5:]}
    # refused: the rest is dropped up to the first "." line between any line
    # ends, looked for from the line end before the offending line
    m = LOOSE_END.search(s, min(starts) - 2)
    if m is None:
        return {"outcome": "unended"}
    if m.group() == END:
        return {"outcome": "refused", "rest": s[m.end():]}
    return {"outcome": "lax"}


def promise_broken(data: bytes) -> str | None:
    """Why the octets handed to the relay (all chunks joined, then each
    chunk alone) break RelayBackend.data_chunk's promise, or None."""
    if b"\0" in data:
        return "NUL"
    if _bare_or_nul(b"\r\n" + data, 2, len(data) + 2, True) is not None:
        return "bare CR or LF"
    if END in b"\r\n" + data:
        return "end of data handed out"
    if _long_line(b"\r\n" + data, 2, len(data) + 2) is not None:
        return "line over 1000 octets"
    return None


def _check_chunks(chunks: list[bytes], chunk_size: int, stream: bytes) -> bytes:
    data = b"".join(chunks)
    for c in chunks:
        assert 0 < len(c) <= max(chunk_size, 2)  # a CRLF is never split, even by DATA_CHUNK = 1
        rest = c.replace(b"\r\n", b"")
        assert b"\r" not in rest and b"\n" not in rest, c  # nor a CRLF split between chunks
    assert promise_broken(data) is None, promise_broken(data)
    assert stream.startswith(data)
    return data


# ------------------------------------------------------------ the session core against it


def run_core(stream: bytes, cuts: list[int], chunk_size: int, monkeypatch=None) -> None:
    """Feed `stream` after DATA in the pieces `cuts` makes, then EOF, to the
    session core with DATA_CHUNK = `chunk_size`; compare with reference()."""
    saved = _session.DATA_CHUNK
    _session.DATA_CHUNK = chunk_size
    try:
        h = Harness()
        h.feed(START)
        assert codes(bytes(h.out))[-1] == 354
        before_events, before_out = len(h.events), len(h.out)
        points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
        for a, b in zip(points, points[1:]):
            h.feed(stream[a:b])
        h.eof()
    finally:
        _session.DATA_CHUNK = saved
    events = h.events[before_events:]
    replies = codes(bytes(h.out[before_out:]))
    want = reference(stream)
    # what the relay is told about the message, up to its end
    told = []
    for ev in events:
        if isinstance(ev, DataChunk):
            told.append(ev.data)
            continue
        if isinstance(ev, (DataFinished, DataRefused)):
            told.append(ev)
            break
        if isinstance(ev, ConnectionClosed):
            told.append(ev)
            break
    chunks = [c for c in told if isinstance(c, bytes)]
    last = told[-1] if told and not isinstance(told[-1], bytes) else None
    data = _check_chunks(chunks, chunk_size, stream)
    outcome = want["outcome"]
    assert sum(isinstance(e, DataFinished) for e in events) == (outcome == "accepted"), (want, events)
    if outcome == "accepted":
        assert isinstance(last, DataFinished) and last.empty == want["empty"]
        assert data == want["message"]
        assert replies[:1] == [250]
    else:
        # data_abort: a refusal, or the session closed in the middle of the message
        assert isinstance(last, DataRefused) or (isinstance(last, ConnectionClosed) and last.aborted_data), \
            (want, last)
    if outcome == "refused":
        assert replies[:1] == [550], replies
    elif outcome == "lax":
        assert replies == [421] and h.closed is not None
    elif outcome == "unended":
        assert replies == [] and h.closed is not None
    if outcome in ("accepted", "refused"):
        if want["rest"] == b"NOOP\r\n":
            assert replies == [replies[0], 250]
        elif want["rest"] == b"":
            assert replies == [replies[0]]


# A message: small pieces, lines near the 1000-octet limit (with and
# without a doubled dot), then one of the ways it may end, then a command.
PIECES = [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"\0", b" ", b"\r\n.", b"\r\n..", b".\r\n",
          b"\r\n.\r", b"\n.", b".\n", b"\r.", b"x" * 40]
LONG = st.builds(lambda dot, n, eol: (b"." if dot else b"") + b"y" * n + eol,
                 st.booleans(), st.integers(995, 1001), st.sampled_from([b"\r\n", b"\r\n", b"\n", b""]))
ENDINGS = [b"\r\n.\r\n", b"\r\n.\r\n", b".\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r",
           b"\r\n.", b"", b"\r\n"]
SEGMENTS = st.lists(st.one_of(st.sampled_from(PIECES), LONG), max_size=12)
CHUNKS = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 13, 64, 997, 998, 999, 1000, 1001, 1002, 1003, 2048,
                          _session.DATA_CHUNK])


def _stream(segments, ending, trailer=b"NOOP\r\n"):
    return b"".join(segments) + ending + trailer


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=SEGMENTS, ending=st.sampled_from(ENDINGS), chunk=CHUNKS,
       cuts=st.lists(st.integers(0, 4200), max_size=8))
def test_the_session_core_agrees_with_a_whole_message_reference(segments, ending, chunk, cuts):
    run_core(_stream(segments, ending), cuts, chunk)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=SEGMENTS, ending=st.sampled_from(ENDINGS), chunk=st.integers(1, 12),
       bytewise=st.booleans())
def test_the_same_with_tiny_chunks_and_every_split(segments, ending, chunk, bytewise):
    stream = _stream(segments, ending)
    run_core(stream, list(range(len(stream))) if bytewise else [], chunk)


def _filler(length: int) -> bytes:
    """Clean text lines (none over 1000 octets) of exactly `length` octets."""
    line = b"f" * 998 + b"\r\n"
    q, r = divmod(length, len(line))
    if r == 1:  # no line is 1 octet long: 1001 = 999 + 2
        return line * (q - 1) + b"f" * 997 + b"\r\n" + b"\r\n"
    return line * q + (b"f" * (r - 2) + b"\r\n" if r else b"")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offset=st.integers(-1010, 8), segments=SEGMENTS, ending=st.sampled_from(ENDINGS),
       cuts=st.lists(st.integers(0, 140_000), max_size=4))
def test_lines_across_the_real_128_kib_chunk_border(offset, segments, ending, cuts):
    """The interesting part starts within a line of the first chunk's
    border (DATA_CHUNK octets after the DATA line)."""
    filler = _filler(_session.DATA_CHUNK + offset)
    run_core(filler + _stream(segments, ending), cuts, _session.DATA_CHUNK)


# ------------------------------------------------------------ a lax end right at a chunk border


def _at_the_border(before: bytes, evil: bytes) -> bytes:
    """Clean lines up to the first chunk's border (DATA_CHUNK octets after
    the DATA line), then `before` and `evil` there, then commands."""
    lead = _filler(_session.DATA_CHUNK - len(before)) + before
    return lead + evil + b"MAIL FROM:<evil@x.y>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n"


@pytest.mark.parametrize("before", [b"", b"."])
@pytest.mark.parametrize("evil", [b".\n", b".\r", b".\r\r\n.\r\n", b".\n\r\n.\r\n"])
def test_a_lax_end_right_after_a_chunk_border_closes_the_session(before, evil):
    """The first chunk ends with a line's CRLF (or CRLF and a dot) at the
    128 KiB border and the next octets make a "." line with a bare line end:
    that is an end made with bare line ends, 421 and close, as anywhere else.
    It was missed (the CRLF had gone out with the chunk): the session read
    on, dropping the smuggled commands as message text, and waited (a
    hang until `timeout`) or answered 550 at a later clean end and read
    what followed as commands."""
    evil = evil[len(before):] if before else evil
    stream = _at_the_border(before, evil)
    assert reference(stream) == {"outcome": "lax"}
    run_core(stream, [], _session.DATA_CHUNK)


@pytest.mark.parametrize("before", [b"", b"."])
def test_a_lax_end_after_a_chunk_border_when_the_relay_failed(before):
    """The same after the relay failed on the chunk before the border
    (fail_message): 421 and close, no data_end."""
    stream = _at_the_border(before, b"\n" if before else b".\n")
    h = Harness()
    h.feed(START)
    s = h.session
    s.receive_data(stream)
    ev = s.next_event()
    assert isinstance(ev, DataChunk) and ev.data.endswith(b"\r\n" + before)
    s.fail_message(R.RELAY_FAILED, "relay failed during DATA")
    h.pump()
    assert codes(bytes(h.out))[-1] == 421 and h.closed is not None
    assert not any(isinstance(e, DataFinished) for e in h.events)


def test_a_clean_end_after_a_refusal_at_the_border_still_goes_on():
    """Putting the CRLF back does not make an end of a dot-stuffed line: a
    too-long line, then "..x" right after the border, then the real end."""
    lead = _filler(_session.DATA_CHUNK - 1003) + b"z" * 1001 + b"\r\n"
    stream = lead + b"..x\r\n.\r\nNOOP\r\n"
    assert reference(stream)["outcome"] == "refused"
    run_core(stream, [], _session.DATA_CHUNK)


# ------------------------------------------------------------ the driver and its relay against it


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offset=st.one_of(st.none(), st.integers(-1010, 8)), segments=SEGMENTS,
       ending=st.sampled_from(ENDINGS))
def test_the_driver_hands_the_relay_what_the_reference_says(offset, segments, ending):
    """Through the real driver over a socketpair (reads split by the
    kernel), with the recording relay that checks every chunk itself."""
    filler = b"" if offset is None else _filler(_session.DATA_CHUNK + offset)
    stream = filler + _stream(segments, ending, b"QUIT\r\n")
    want = reference(stream)
    with pytest.MonkeyPatch.context() as mp:
        out, relay = asyncio.run(converse(mp, LOGIN + TXN + stream, half_close=True))
    replies = codes(out)
    assert replies[:6] == [220, 250, 235, 250, 250, 354], out
    replies = replies[6:]
    data = bytes(relay.data)
    assert relay.unchecked == [] and promise_broken(data) is None and stream.startswith(data)
    outcome = want["outcome"]
    assert relay.calls.count("data_end") == (outcome == "accepted"), (want, relay.calls)
    if outcome == "accepted":
        assert data == want["message"] and replies[:1] == [250]
    else:
        assert "data_abort" in relay.calls
    if outcome == "refused":
        assert replies[:1] == [550]
    elif outcome == "lax":
        assert replies == [421]
    elif outcome == "unended":
        assert replies == []
    if outcome in ("accepted", "refused") and want["rest"] == b"QUIT\r\n":
        assert replies[1:] == [221]
