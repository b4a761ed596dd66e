"""Mutation review and differential tests of the DATA path, now that the
session core is the only check of the message bytes (75ee33d removed the
relay's second scan).

Reviewed: sendooway_front/_session.py `_begin_data`, `_step_data`, `_emit`,
`_finish_data`, `_refuse_data`, `_step_refused`, `_too_long`, `_close`'s
aborted_data, `fail_message`, the `_END_STARTS`/`_LOOSE_END` constants, and
sendooway_front/_driver.py's handing of DataChunk/DataRefused/
ConnectionClosed to the relay.

126 mutants, one at a time: 121 of the code as it was, against the DATA
test files (test_session, test_session_fuzz, test_front_driver,
test_review_mutants{,5,8,10,12,13,15}, test_hardening_relay,
test_hardening_front): 94 killed, 27 survived. This file kills 13 of them
(the lax-end regex without its leading or trailing bare CR; _begin_data not
resetting the line length or the doubled-dot count; a mid-line dot after a
chunk border counted as doubled; refusing at a running size equal to the
limit; the refused-message search ignoring EOF, dropping a lax end while
waiting for a later CR's LF, or never closing at EOF; fail_message refusing
twice or replacing a 421 of the driver's; aborted_data after a refusal; the
driver cutting 128 KiB chunks short). 14 are equivalent: the order of
_END_STARTS (its two tails cannot both match); the search window or find
limit 1-4 octets smaller or tail test 1 octet looser, or no window test for a
tail (a chunk is cut at skip + DATA_CHUNK anyway, and only an end marker
starting 2 octets before that cut has to be seen: 1 octet of slack is
enough); _d_skip not reset after an end (_begin_data sets it); splitting
before any CR at the cut rather than only a CRLF (a bare CR is refused one
chunk later, the same reply); the `longest + 2 > 1000` pre-test loosened or
dropped (_too_long decides; it is only a shortcut); keeping 4 octets, or
trimming at exactly 5, after a refusal (no partial end is longer than 4).
Five mutants of this review's fix (_refuse_data putting the line start back):
4 killed, 1 equivalent (putting a CRLF in front of the DATA line's own).
"""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from sendooway_front import _catalogue as R
from sendooway_front import _session
from sendooway_front._events import ConnectionClosed, DataChunk, DataFinished, DataRefused, DataRequested
from sendooway_front._session import SessionSettings

from .front_harness import LOGIN_ALICE, Harness, codes, unchecked_chunk
from .test_front_driver import LOGIN, TXN, converse

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


def reference(stream: bytes, limit: int = 0) -> dict:
    """What must happen to `stream` (all the client sends after DATA, then
    EOF), with extMessageSize `limit` (0: none). Keys: outcome (accepted /
    refused / lax / unended), codes (the reply to the end: one of them),
    message (the relay's octets when accepted), empty, rest (the input
    after the end)."""
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
    starts = [x for x in (bad, long_) if x is not None]
    # RFC 1870 size: the dots the client doubled left out, the last CRLF in
    size = tail - 2 - s.count(b"\r\n.", 0, tail) + (2 if p > 0 else 0)
    too_big = bool(limit) and size > limit
    if not starts:
        if p < 0:
            # refused for its size before its last octets came (all but a
            # last "\r\n.\r" went out), an end with a bare CR there at EOF
            e = len(s) - 4
            if limit and s.endswith(b"\r\n.\r") and e - 2 - s.count(b"\r\n.", 0, e) > limit:
                return {"outcome": "lax", "codes": {421}}
            return {"outcome": "unended"}
        if too_big:
            return {"outcome": "refused", "codes": {552}, "rest": s[p + 5:]}
        return {"outcome": "accepted", "codes": {250}, "message": s[2:p], "empty": p == 0,
                "rest": s[p + 5:]}
    # refused: the rest is dropped up to the first "." line between any line
    # ends, looked for from the line end before the offending line
    m = LOOSE_END.search(s, min(starts) - 2)
    if m is None:
        return {"outcome": "unended"}
    if m.group() == END:
        return {"outcome": "refused", "codes": {550, 552} if too_big else {550}, "rest": s[m.end():]}
    return {"outcome": "lax", "codes": {421}}


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
        assert not unchecked_chunk(c), c  # nor a CRLF split between chunks
    assert promise_broken(data) is None, promise_broken(data)
    assert stream.startswith(data)
    return data


# ------------------------------------------------------------ the session core against it


def _message_events(events: list) -> tuple[list[bytes], object]:
    """The chunks handed out for a message and the event that ended it
    (DataFinished, DataRefused, ConnectionClosed), from `events` after
    its DataRequested."""
    chunks = []
    for ev in events:
        if isinstance(ev, DataChunk):
            chunks.append(ev.data)
        elif isinstance(ev, (DataFinished, DataRefused, ConnectionClosed)):
            return chunks, ev
    return chunks, None


def check_message(want: dict, events: list, replies: list[int], chunk_size: int, stream: bytes,
                  closed: bool) -> None:
    """One message's events and the replies after its 354 against reference()."""
    chunks, last = _message_events(events)
    data = _check_chunks(chunks, chunk_size, stream)
    outcome = want["outcome"]
    finished = [e for e in events if isinstance(e, DataFinished)]
    assert len(finished) == (outcome == "accepted"), (want, events)
    if outcome == "accepted":
        assert last is finished[0] and last.empty == want["empty"]
        assert data == want["message"]
    else:
        # data_abort: a refusal, or the session closed in the middle of the message
        assert isinstance(last, DataRefused) or (isinstance(last, ConnectionClosed) and last.aborted_data), \
            (want, last)
    # the relay is told to abort once (data_abort per DataRefused and per
    # ConnectionClosed(aborted_data)), or never for a message accepted
    aborts = sum(isinstance(e, DataRefused) or isinstance(e, ConnectionClosed) and e.aborted_data
                 for e in events)
    assert aborts == (outcome != "accepted"), events
    if outcome == "unended":
        assert replies == [] and closed
    else:
        assert replies[:1] and replies[0] in want["codes"], (want, replies)
    if outcome == "lax":
        assert replies == [421] and closed


def _feed(h: Harness, stream: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    for a, b in zip(points, points[1:]):
        h.feed(stream[a:b])
    h.eof()


def _harness(chunk_size: int, limit: int) -> Harness:
    _session.DATA_CHUNK = chunk_size
    h = Harness(settings=SessionSettings("mx.test", tls_available=True, size_limit=limit))
    h.feed(START)
    assert codes(bytes(h.out))[-1] == 354
    return h


def run_core(stream: bytes, cuts: list[int], chunk_size: int, limit: int = 0) -> dict:
    """Feed `stream` after DATA in the pieces `cuts` makes, then EOF, to the
    session core with DATA_CHUNK = `chunk_size` and extMessageSize `limit`;
    compare with reference()."""
    saved = _session.DATA_CHUNK
    try:
        h = _harness(chunk_size, limit)
        before_events, before_out = len(h.events), len(h.out)
        _feed(h, stream, cuts)
    finally:
        _session.DATA_CHUNK = saved
    replies = codes(bytes(h.out[before_out:]))
    want = reference(stream, limit)
    check_message(want, h.events[before_events:], replies, chunk_size, stream, h.closed is not None)
    if want["outcome"] in ("accepted", "refused"):
        if want["rest"] == b"NOOP\r\n":
            assert replies[1:] == [250]
        elif want["rest"] == b"":
            assert replies[1:] == []
    return want


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


LIMITS = st.sampled_from([0, 0, 1, 2, 3, 40, 999, 1000, 1001, 1002, 2000, 5000])


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=SEGMENTS, ending=st.sampled_from(ENDINGS), chunk=CHUNKS,
       cuts=st.lists(st.integers(0, 4200), max_size=8), limit=LIMITS,
       trailer=st.sampled_from([b"NOOP\r\n", b"NOOP\r\n", b""]))
def test_the_session_core_agrees_with_a_whole_message_reference(segments, ending, chunk, cuts, limit,
                                                                  trailer):
    event(run_core(_stream(segments, ending, trailer), cuts, chunk, limit)["outcome"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=SEGMENTS, ending=st.sampled_from(ENDINGS), chunk=st.integers(1, 12),
       bytewise=st.booleans())
def test_the_same_with_tiny_chunks_and_every_split(segments, ending, chunk, bytewise):
    stream = _stream(segments, ending)
    event(run_core(stream, list(range(len(stream))) if bytewise else [], chunk)["outcome"])


def _filler(length: int) -> bytes:
    """Clean text lines (none over 1000 octets) of exactly `length` octets."""
    line = b"f" * 998 + b"\r\n"
    q, r = divmod(length, len(line))
    if r == 1:  # no line is 1 octet long: 1001 = 999 + 2
        return line * (q - 1) + b"f" * 997 + b"\r\n" + b"\r\n"
    return line * q + (b"f" * (r - 2) + b"\r\n" if r else b"")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offset=st.one_of(st.integers(-8, 8), st.integers(-1010, 8)), segments=SEGMENTS,
       ending=st.sampled_from(ENDINGS),
       cuts=st.lists(st.integers(0, 140_000), max_size=4))
def test_lines_across_the_real_128_kib_chunk_border(offset, segments, ending, cuts):
    """The interesting part starts within a line of the first chunk's
    border (DATA_CHUNK octets after the DATA line)."""
    filler = _filler(_session.DATA_CHUNK + offset)
    event(run_core(filler + _stream(segments, ending), cuts, _session.DATA_CHUNK)["outcome"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=SEGMENTS, second=SEGMENTS, chunk=CHUNKS, cuts=st.lists(st.integers(0, 4200), max_size=8),
       limit=LIMITS)
def test_two_messages_in_one_session(first, second, chunk, cuts, limit):
    """What one message leaves behind (its last line's length and dot, its
    doubled dots, its refusal) never changes how the next one is read."""
    txn = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
    one, two = b"".join(first) + END, b"".join(second) + END + b"QUIT\r\n"
    want1 = reference(one + txn + two, limit)
    assume(want1["outcome"] in ("accepted", "refused") and want1["rest"] == txn + two)
    want2 = reference(two, limit)
    saved = _session.DATA_CHUNK
    try:
        h = _harness(chunk, limit)
        start_events, start_out = len(h.events), len(h.out)
        _feed(h, one + txn + two, cuts)
    finally:
        _session.DATA_CHUNK = saved
    replies = codes(bytes(h.out[start_out:]))
    assert 354 in replies, replies
    cut = replies.index(354)
    assert replies[cut - 2:cut] == [250, 250]
    events = h.events[start_events:]
    second_at = next(i for i, e in enumerate(events) if isinstance(e, DataRequested))
    check_message(want1, events[:second_at], replies[:cut - 2], chunk, one + txn + two, False)
    check_message(want2, events[second_at + 1:], replies[cut + 1:], chunk, two, h.closed is not None)
    if want2["outcome"] in ("accepted", "refused") and want2["rest"] == b"QUIT\r\n":
        assert replies[cut + 2:] == [221]


def _two_messages(one: bytes, two: bytes, limit: int = 0) -> list[int]:
    """The reply codes to two messages sent in one session, each ended by
    CRLF.CRLF, then QUIT."""
    h = Harness(settings=SessionSettings("mx.test", tls_available=True, size_limit=limit))
    out = h.feed(START + one + END + b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
                 b"DATA\r\n" + two + END + b"QUIT\r\n")
    return codes(out)


def test_the_last_line_of_one_message_is_not_the_first_of_the_next():
    """Two lines of 600 octets, one ending a message and one starting the
    next, are two lines (the length so far is reset at DATA)."""
    assert _two_messages(b"y" * 600, b"y" * 600)[-6:] == [250, 250, 250, 354, 250, 221]
    assert _two_messages(b".y" + b"y" * 600, b"." + b"y" * 998 + b"\r\nz")[-2:] == [250, 221]


def test_the_doubled_dots_of_one_message_do_not_count_for_the_next():
    """RFC 1870's size leaves out doubled dots, each message its own: 50
    doubled dots in the first message do not let the second (1003 octets
    with its last CRLF) through a limit of 1000."""
    replies = _two_messages(b"..x\r\n" * 50 + b"end", b"a" * 998 + b"\r\nb", limit=1000)
    assert replies[-6:] == [250, 250, 250, 354, 552, 221]


def test_a_dot_after_the_chunk_border_inside_a_line_is_not_a_doubled_one():
    """Only a dot that starts a line was doubled by the client: one that
    begins the second chunk in the middle of a line counts for the size."""
    message = _filler(_session.DATA_CHUNK - 1) + b"x.yz"
    size = len(message) + 2  # with the last line's CRLF, no doubled dot
    for limit, code in ((size - 1, 552), (size, 250)):
        h = _harness(_session.DATA_CHUNK, limit)
        out = h.feed(message + END)
        chunks = [e.data for e in h.events if isinstance(e, DataChunk)]
        assert chunks[1:2] == [b".yz"] and codes(out) == [code], (limit, codes(out))


def test_a_message_at_the_limit_but_for_its_last_crlf_is_refused_complete():
    """extMessageSize 500 and 500 octets before the end marker: over the
    limit only with the last line's CRLF, so refused at its end (the relay
    is told the whole message came), not when its last chunk came."""
    h = _harness(_session.DATA_CHUNK, 500)
    message = b"a" * 496 + b"\r\nbc"
    assert len(message) == 500
    out = h.feed(message + END)
    refused = [e for e in h.events if isinstance(e, DataRefused)]
    assert codes(out) == [552] and len(refused) == 1 and refused[0].complete


def test_a_lax_end_and_a_cr_that_ends_the_read_after_it():
    """A refused message's lax end and, in the same read, a command whose
    CR ends the read: the lax end is taken at once (421), not dropped while
    waiting for that CR's LF."""
    h = _harness(_session.DATA_CHUNK, 0)
    assert codes(h.feed(b"bad\n.\nNOOP\r")) == [421] and h.closed is not None


def test_a_lax_end_in_a_cr_that_ends_the_input():
    """A refused message whose input ends (EOF) in a "." line ended by a
    bare CR: no LF can follow any more, so that is its end (421)."""
    h = _harness(_session.DATA_CHUNK, 0)
    assert h.feed(b"bad\n.\r") == b""
    assert codes(h.eof()) == [421] and h.closed is not None


def test_the_relay_failing_twice_refuses_the_message_once():
    """fail_message twice (a driver that reports its relay's failure
    twice): one DataRefused, one reply, the first one's."""
    h = _harness(_session.DATA_CHUNK, 0)
    s = h.session
    s.receive_data(b"line\r\nmore")
    assert isinstance(s.next_event(), DataChunk)
    s.fail_message(R.RELAY_FAILED, "relay failed during DATA")
    s.fail_message(R.SHUTTING_DOWN, "again")
    h.pump()
    out = h.feed(b"\r\n.\r\nNOOP\r\n")
    assert codes(out) == [451, 250]
    assert sum(isinstance(e, DataRefused) for e in h.events) == 1


def test_a_421_from_the_driver_is_the_reply_to_a_lax_end():
    """fail_message with a 421 of the driver's: a lax end closes with that
    421, not with the bare-line-end one."""
    h = _harness(_session.DATA_CHUNK, 0)
    s = h.session
    s.receive_data(b"line\r\nmore")
    assert isinstance(s.next_event(), DataChunk)
    s.fail_message(R.SHUTTING_DOWN, "stopping")
    h.pump()
    out = h.feed(b"\r\n.\n")
    assert out == R.SHUTTING_DOWN.to_bytes() and h.closed is not None


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
    assert reference(stream)["outcome"] == "lax"
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
        assert data == want["message"]
    else:
        assert "data_abort" in relay.calls
    if outcome == "unended":
        assert replies == []
    else:
        assert replies[:1] and replies[0] in want["codes"]
    if outcome == "lax":
        assert replies == [421]
    if outcome in ("accepted", "refused") and want["rest"] == b"QUIT\r\n":
        assert replies[1:] == [221]
