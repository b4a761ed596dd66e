"""A differential review of the upstream side's reply parsing
(sendooway_front/_upstream.py: ReplyReader, `buffered`, `heard`,
UpstreamClient.unasked_reply) and of the Relay's use of it for pipelined
RCPT groups and the final dot (_group_replies, _refused_behind_354,
_closing_behind, data_end), after a defect in another parser showed only
when its input was cut at one exact position.

Oracles:
- `model()`, a reference parser written here from the documented rules
  (docs/decisions/relay.md "Replies are bounded": lines end at LF, one CR
  before it dropped; a code of 2-5 and two digits, then "-", " " or the end;
  one code per reply; 4096 octets a line with its LF, 100 lines a reply;
  controls but TAB, DEL, C1, U+2028/9 become "?"), from the whole input to
  the replies and then the error (broken syntax or bounds) or the end of
  the input. The real ReplyReader, on a real socket pair, is fed the same
  octets in generated splits (1 octet to all at once, cuts between CR and
  LF, right after a final line, inside the 3-digit code, a second reply or
  an unasked 421 behind the first in the same read), one split per read
  (the read is gated so each piece is its own read): every reply, the
  error, how much of the input it consumed per reply (`buffered` = what
  arrived minus what the model consumed) and `heard` must match the model,
  whatever the split. The same through TCP on loopback without the gate
  (pieces a few ms apart) for the reader and for `unasked_reply`.
- The real Relay, to a scripted upstream on loopback offering PIPELINING:
  MAIL, RCPTs and DATA in one group, the upstream's replies to them and
  to the final dot (maybe with an unasked 421 behind it) written in
  generated pieces. The codes the client gets must be those a reference
  (`expected_codes`, from the Relay's documented rules) gives, whatever the
  split; a 250 for the message only when the upstream said 250 to the dot;
  the upstream gets the message exactly; a second transaction on the same
  Relay then gets its own replies (none read a step late), except behind
  a stray reply (below), where only "no message reported delivered" holds.
- EHLO's reply with an unasked 421 behind it, cut at every position: the
  client's MAIL gets 451 with the 421's words, whatever the split.

Found: no defect. Nothing split-dependent in ReplyReader (5000 generated
splits in a longer run; mutants of its line bound, its line-count bound and
its CR stripping are caught here), no false 250, hang or traceback through
the Relay (2500 generated cases in a longer run). Seen, and documented as
what the relay cannot tell: a stray reply (a refusal behind a 354, a second
reply behind the dot's) that reaches us only after the one it follows was
taken decides by its timing: the dot's answer may then be the stray one,
and a reply still on its way when the next MAIL group goes is read by it a
step late: DATA, answered 250 instead of 354, shows it, or the stale reply
(the dot's 550, the upstream's 421) answers that MAIL, a 5xx for a MAIL the
upstream accepted (seen under load); no message is reported delivered.
Not changed: a 421 in the same read behind a group of RCPTs makes all of
them 451 4.5.0 (surplus after a group is nonsense, docs/decisions/relay.md),
where a moment later they keep their codes and DATA gets the 451; a
temporary failure either way."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sendooway_front import _upstream
from sendooway_front._relay import Relay
from sendooway_front._relay_api import MailParams
from sendooway_front._stream import Stream
from sendooway_front._upstream import ReplyError, ReplyReader, UpstreamClient

from .front_harness import pieces
from .scripted_relay import plain_route
from .upstream import capture_log, config, info

MAX_LINE = 4096
MAX_LINES = 100


# ---------------------------------------------------------------- the model

def _clean(raw: bytes) -> str:
    out = []
    for ch in raw.decode("utf-8", "replace"):
        o = ord(ch)
        bad = (o < 0x20 and ch != "\t") or 0x7f <= o <= 0x9f or ch in "\u2028\u2029"
        out.append("?" if bad else ch)
    return "".join(out)


def model(data: bytes):
    """(replies as (code, lines, end offset), outcome): outcome is "eof"
    (the input ended, maybe inside a reply) or the kind of ReplyError."""
    replies = []
    pos = 0
    code = None
    lines: list[str] = []
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return replies, ("long" if len(data) - pos >= MAX_LINE else "eof")
        if nl + 1 - pos > MAX_LINE:
            return replies, "long"
        line = data[pos:nl]
        pos = nl + 1
        if line[-1:] == b"\r":
            line = line[:-1]
        head, sep = line[:3], line[3:4]
        if (len(head) < 3 or head[0:1] not in (b"2", b"3", b"4", b"5")
                or not all(48 <= c <= 57 for c in head) or sep not in (b"", b" ", b"-")):
            return replies, "malformed"
        this = int(head)
        if code is not None and this != code:
            return replies, "changed"
        code = this
        lines.append(_clean(line[4:]))
        if len(lines) > MAX_LINES:
            return replies, "lines"
        if sep != b"-":
            replies.append((code, tuple(lines), pos))
            code, lines = None, []


def _kind(e: BaseException) -> str:
    if isinstance(e, ConnectionResetError):
        return "eof"
    assert isinstance(e, ReplyError), repr(e)
    text = str(e)
    for kind, words in (("long", "reply line longer"), ("malformed", "malformed reply line"),
                        ("changed", "code changed"), ("lines", f"longer than {MAX_LINES} lines")):
        if words in text:
            return kind
    raise AssertionError(text)


# ---------------------------------------------------------------- inputs

TEXT_CHARS = st.sampled_from(
    [b"a", b"Z", b" ", b"-", b"\t", b"\r", b"\x00", b"\x1b", b"\x7f", b"\xc2\x85", b"\xc2\x9b",
     b"\xe2\x80\xa8", b"\xff", b"\xc3", b"\xe2\x80", b"250 ", b"5.7.1", b"\xc3\xa9"])


@st.composite
def reply_bytes(draw, codes=st.sampled_from([220, 250, 251, 334, 354, 421, 450, 452, 550, 554]),
                max_lines=4):
    code = draw(codes)
    n = draw(st.integers(1, max_lines))
    out = b""
    for i in range(n):
        last = i == n - 1
        text = b"".join(draw(st.lists(TEXT_CHARS, max_size=6)))
        if last:
            sep = draw(st.sampled_from([b" ", b" ", b""])) if not text else b" "
        else:
            sep = b"-"
        out += b"%d" % code + sep + text + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    return out


@st.composite
def faulty(draw):
    """One reply made wrong in one way (or left right)."""
    good = draw(reply_bytes())
    how = draw(st.sampled_from(["none", "code", "mixed", "long", "exact", "many", "cut", "bare"]))
    if how == "code":
        return draw(st.sampled_from([b"199 x\r\n", b"600 x\r\n", b"25 x\r\n", b"2a0 x\r\n",
                                     b"250x\r\n", b"250\r\r\n", b"\r\n", b" 250 x\r\n",
                                     b"\xef\xbc\x92\xef\xbc\x95\xef\xbc\x90 x\r\n"]))
    if how == "mixed":
        return b"250-a\r\n" + draw(st.sampled_from([b"251 b\r\n", b"550 b\r\n", b"250-c\r\n450 d\r\n"]))
    if how == "long":  # one octet over, with or without its LF yet
        return b"250 " + b"x" * (MAX_LINE - 5) + draw(st.sampled_from([b"\r\n", b"y\n", b"yz", b"y", b""]))
    if how == "exact":  # the longest line taken, CRLF or LF
        return draw(st.sampled_from([b"250 " + b"x" * (MAX_LINE - 6) + b"\r\n",
                                     b"250 " + b"x" * (MAX_LINE - 5) + b"\n"]))
    if how == "many":
        n = draw(st.sampled_from([MAX_LINES - 1, MAX_LINES, MAX_LINES + 1]))
        return b"250-l\r\n" * n + b"250 end\r\n"
    if how == "cut":
        return good[:draw(st.integers(0, len(good) - 1))]
    if how == "bare":
        return good.replace(b"\r\n", b"\r", 1)
    return good


@st.composite
def stream_and_cuts(draw, parts=None):
    """Input octets and the positions it is cut at (each piece one read)."""
    if parts is None:
        parts = st.lists(st.one_of(reply_bytes(), faulty()), min_size=1, max_size=4)
    data = b"".join(draw(parts))
    if draw(st.booleans()):
        data += b"421 4.3.0 closing\r\n"  # an unasked 421 right behind
    n = len(data)
    if n < 2:
        return data, []
    # favoured cut points: between CR and LF, right after an LF, inside a code
    special = set()
    for i, c in enumerate(data):
        if c == 0x0a:
            special.update({i, i + 1, i + 2, i + 3, i + 4})
    special = sorted(p for p in special if 0 < p < n)
    style = draw(st.sampled_from(["whole", "bytes", "random", "special", "mixed"]))
    if style == "whole":
        cuts = set()
    elif style == "bytes":
        cuts = set(range(1, n)) if n <= 600 else set(range(1, 600))
    elif style == "special":
        cuts = set(draw(st.lists(st.sampled_from(special), max_size=12))) if special else set()
    elif style == "random":
        cuts = set(draw(st.lists(st.integers(1, n - 1), max_size=12)))
    else:
        cuts = set(draw(st.lists(st.integers(1, n - 1), max_size=6)))
        if special:
            cuts |= set(draw(st.lists(st.sampled_from(special), max_size=6)))
    return data, sorted(cuts)


# ---------------------------------------------------------------- the reader, gated

class Gate:
    """Each read of the stream gets the next piece (sent just before it) and
    only that; after the last piece, the end of the input."""

    def __init__(self, stream: Stream, peer: socket.socket, parts: list[bytes]) -> None:
        self.peer, self.parts = peer, list(parts)
        self.real = stream.read
        self.delivered = 0
        stream.read = self.read

    async def read(self, max: int = 65536) -> bytes:
        if self.parts:
            self.peer.sendall(self.parts.pop(0))
        else:
            try:
                self.peer.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        data = await self.real(max)
        self.delivered += len(data)
        return data


async def _read_all(reader: ReplyReader, gate=None):
    """Every reply until the error; with each the octets it left unread."""
    got = []
    while True:
        try:
            reply = await reader.read_reply()
        except (ReplyError, ConnectionResetError) as e:
            return got, _kind(e)
        consumed = gate.delivered - reader.buffered if gate is not None else None
        got.append((reply.code, reply.lines, consumed))


def gated_read(data: bytes, cuts: list[int]):
    async def go():
        a, b = socket.socketpair()
        stream = await Stream.from_socket(a, timeout=5)
        gate = Gate(stream, b, pieces(data, cuts))
        reader = ReplyReader(stream)
        assert not reader.heard
        try:
            got, outcome = await _read_all(reader, gate)
            return got, outcome, reader.heard, gate.delivered
        finally:
            stream.abort()
            b.close()

    return asyncio.run(asyncio.wait_for(go(), 20))


@settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck))
@given(stream_and_cuts())
def test_reader_matches_the_model_whatever_the_split(case):
    data, cuts = case
    want, outcome = model(data)
    got, got_outcome, heard, delivered = gated_read(data, cuts)
    assert [(c, lines) for c, lines, _ in got] == [(c, lines) for c, lines, _ in want], (data, cuts)
    assert got_outcome == outcome, (data, cuts)
    # nothing lost or read twice: after each reply, what arrived minus
    # what is still buffered is exactly where the model's reply ended
    assert [end for _, _, end in got] == [end for _, _, end in want], (data, cuts)
    assert heard == (delivered > 0) and (heard or not data)


def test_split_invariance_on_every_cut_of_a_pipelined_group():
    """Every single cut, and every octet its own read, of a group's replies
    (multi-line with CRLF and LF, a 421 behind) give the same replies."""
    data = (b"250-2.1.0 first\r\n250 2.1.0 ok\r\n550 5.1.1 no\n250-a\r\n250-\r\n250\r\n"
            b"354 go\r\n421 4.3.0 bye\r\n")
    want, outcome = model(data)
    assert [c for c, _, _ in want] == [250, 550, 250, 354, 421] and outcome == "eof"
    whole = gated_read(data, [])
    assert whole[0] == [(c, lines, end) for c, lines, end in want]
    for cut in range(1, len(data)):
        assert gated_read(data, [cut])[:2] == whole[:2], cut
    assert gated_read(data, list(range(1, len(data))))[:2] == whole[:2]


def test_line_length_bound_at_every_cut_near_it():
    """The longest line taken (4096 octets with CRLF) and one octet more,
    cut at each position around the bound: taken / refused alike."""
    ok = b"250-" + b"x" * (MAX_LINE - 6) + b"\r\n250 end\r\n"
    over = b"250 " + b"x" * (MAX_LINE - 5) + b"\r\n"
    unended = b"250 " + b"x" * (MAX_LINE - 4)  # 4096 octets and no LF yet: refused, not waited on
    for data, outcome in ((ok, "eof"), (over, "long"), (unended, "long"), (unended[:-1], "eof")):
        for cut in [0, *range(MAX_LINE - 4, MAX_LINE + 3)]:
            got, got_outcome, _, _ = gated_read(data, [cut] if 0 < cut < len(data) else [])
            assert got_outcome == outcome and len(got) == (data == ok), (cut, got_outcome)


# ---------------------------------------------------------------- loopback TCP, no gate

async def _tcp_pair(parts: list[bytes], pause: float):
    """A loopback server writing `parts` `pause` s apart, then closing; a
    Stream connected to it."""
    async def serve(_r, w):
        for p in parts:
            w.write(p)
            await w.drain()
            await asyncio.sleep(pause)
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server, await Stream.from_socket(sock, timeout=5)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(stream_and_cuts(parts=st.lists(reply_bytes(), min_size=1, max_size=3)))
def test_reader_over_tcp_matches_the_model(case):
    data, cuts = case
    parts = pieces(data, cuts)[:40]
    data = b"".join(parts)
    want, outcome = model(data)

    async def go():
        server, stream = await _tcp_pair(parts, 0.001)
        try:
            return await _read_all(ReplyReader(stream))
        finally:
            stream.abort()
            server.close()

    got, got_outcome = asyncio.run(asyncio.wait_for(go(), 20))
    assert [(c, lines) for c, lines, _ in got] == [(c, lines) for c, lines, _ in want]
    assert got_outcome == outcome


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(first=reply_bytes(codes=st.sampled_from([250, 235, 354])),
       behind=st.sampled_from([b"421 4.3.0 bye\r\n", b"421-4.3.0 shutting\r\n421 down\n",
                               b"421 4.3.0 cut", b"250 again\r\n", b"bogus\r\n", b""]),
       cuts=st.lists(st.integers(1, 400), max_size=6))
def test_unasked_reply_whatever_the_split(first, behind, cuts):
    """The reply asked for, then what came behind it, over TCP in pieces:
    unasked_reply() gives the 421 (or the other whole reply) and None for
    a broken or missing one, whatever the split."""
    data = first + behind
    parts = pieces(data, sorted({c for c in cuts if c < len(data)}))
    want, outcome = model(data)

    async def go():
        server, stream = await _tcp_pair(parts, 0.002)
        reader = ReplyReader(stream)
        client = UpstreamClient(plain_route(1), stream, reader, "relay.test")
        try:
            asked = await client.read_reply()
            return asked, await client.unasked_reply()
        finally:
            stream.abort()
            server.close()

    asked, unasked = asyncio.run(asyncio.wait_for(go(), 20))
    assert (asked.code, asked.lines) == want[0][:2]
    if len(want) > 1:
        assert unasked is not None and (unasked.code, unasked.lines) == want[1][:2]
    else:
        assert unasked is None


def test_the_bounds_are_the_documented_ones():
    assert (_upstream.MAX_REPLY_LINE, _upstream.MAX_REPLY_LINES) == (MAX_LINE, MAX_LINES)


# ---------------------------------------------------------------- through the Relay

BODY = b"Subject: split\r\n\r\nline one\r\n..dotted\r\nlast"  # as the session passes it on


@st.composite
def relay_reply(draw, code):
    """`code`'s reply bytes: one line or several, enhanced code or not."""
    n = draw(st.integers(1, 3))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    text = draw(st.sampled_from([b"ok", b"4.0.0 try later", b"5.1.1 \x1b[31mno\xc2\x85", b""]))
    return b"".join(b"%d-line %d%s" % (code, i, eol) for i in range(n - 1)) + b"%d %s%s" % (code, text, eol)


@st.composite
def relay_case(draw):
    mode = draw(st.sampled_from(["group", "group-nodata", "rcpts"]))
    mail = draw(st.sampled_from([250, 250, 250, 550, 452, 421]))
    rcpts = draw(st.lists(st.sampled_from([250, 250, 251, 550, 450, 421]), min_size=2, max_size=4))
    data = draw(st.sampled_from([354, 354, 354, 554, 451, 421]))
    dot = draw(st.sampled_from([250, 250, 550, 452, 421]))
    # behind the dot's reply: an unasked 421 (the upstream closing) or a
    # stray reply (nonsense); behind a 354, a refusal (smtp-sink -A)
    trailer = draw(st.sampled_from([b"", b"", b"421 4.3.0 shutting down\r\n",
                                    b"421-4.3.0 shutting\r\n421 down\r\n", b"250 2.0.0 again\r\n"]))
    behind_354 = draw(st.sampled_from([b"", b"", b"", b"550 5.7.1 not from you\r\n"])) if data == 354 else b""
    replies = {"MAIL": draw(relay_reply(mail)), "RCPT": [draw(relay_reply(r)) for r in rcpts],
               "DATA": draw(relay_reply(data)) + behind_354, "DOT": draw(relay_reply(dot)) + trailer}
    group = (replies["MAIL"] + b"".join(replies["RCPT"])
             + (replies["DATA"] if mode == "group" else b""))
    if mode == "rcpts":
        group = b"".join(replies["RCPT"])
    cuts = {
        "group": sorted(set(draw(st.lists(st.integers(1, len(group) - 1), max_size=8)))),
        "dot": sorted(set(draw(st.lists(st.integers(1, len(replies["DOT"]) - 1), max_size=6)))),
        "data": sorted(set(draw(st.lists(st.integers(1, len(replies["DATA"]) - 1), max_size=4)))),
    }
    if draw(st.booleans()):  # the favoured places: right after each LF, inside the next code
        lfs = [i + 1 + k for i, c in enumerate(group) if c == 0x0a for k in (0, 1, 2)]
        cuts["group"] = sorted({c for c in cuts["group"] + lfs if 0 < c < len(group)})
    if draw(st.booleans()):  # the dot's reply ends one read, what is behind it starts the next
        dot_bytes = replies["DOT"]
        lfs = [i + 1 for i, c in enumerate(dot_bytes) if c == 0x0a]
        cuts["dot"] = sorted({c for c in cuts["dot"] + lfs if 0 < c < len(dot_bytes)})
    return mode, (mail, rcpts, data, dot), replies, cuts


def expected_codes(mode, codes):
    """What the client must get: (MAIL and RCPT codes, DATA's or None,
    the final dot's or None), from the Relay's documented rules: a 421 is
    passed on as 451 and the rest of the transaction gets 451 too; behind
    a refused MAIL no RCPT is accepted (503 for an upstream's 2xx, in a
    group; with MAIL alone the RCPTs never go upstream); DATA only when a
    recipient was accepted (the session answers it itself otherwise)."""
    mail, rcpts, data, dot = codes
    if mail == 421:
        return [451] * (1 + len(rcpts)), None, None
    out = [mail]
    gone = False
    accepted = 0
    for r in rcpts:
        if gone:
            out.append(451)
        elif mail >= 400 and mode == "rcpts":
            out.append(503)
        elif r == 421:
            out.append(451)
            gone = True
        elif mail >= 400:
            out.append(503 if r < 400 else r)
        else:
            out.append(r)
            accepted += r < 400
    if mail >= 400 or not accepted:
        return out, None, None
    if gone:
        return out, 451, None
    if data != 354:
        return out, 451 if data == 421 else data, None
    return out, 354, 451 if dot == 421 else dot


class SplittingUpstream:
    """A PIPELINING upstream on loopback that reads the first transaction's
    commands (the group as the mode sends it), answers them in the planned
    pieces, a few ms apart, reads the message and answers the dot in its
    pieces (closing behind a 421); any later command gets a plain answer."""

    def __init__(self, mode, replies, cuts, pause=0.002) -> None:
        self.mode, self.replies, self.cuts, self.pause = mode, replies, cuts, pause
        self.messages: list[bytes] = []
        self.data_pending = False

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _write(self, w, data: bytes, cuts: list[int]) -> None:
        for p in pieces(data, cuts):
            w.write(p)
            await w.drain()
            await asyncio.sleep(self.pause)

    async def _message(self, r, w, dot: bytes, cuts) -> bool:
        body = b""
        while (part := await r.readline()) != b".\r\n":
            if not part:
                return False
            body += part
        self.messages.append(body)
        await self._write(w, dot, cuts)
        return b"421" not in dot

    async def _handle(self, r, w) -> None:
        try:
            w.write(b"220 up.test ESMTP\r\n")
            first = not self.messages and not getattr(self, "used", False)
            self.used = True
            while line := await r.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    w.write(b"250-up.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
                elif first and verb == b"MAIL":
                    first = False
                    if not await self._first(r, w):
                        return
                elif verb in (b"MAIL", b"RCPT", b"RSET"):
                    self.data_pending = False
                    w.write(b"250 2.0.0 ok\r\n")
                elif verb == b"DATA" and self.data_pending:
                    self.data_pending = False
                    await self._write(w, self.replies["DATA"], self.cuts.get("data", []))
                    if (self.replies["DATA"].startswith(b"354")
                            and not await self._message(r, w, self.replies["DOT"], self.cuts["dot"])):
                        return
                elif verb == b"DATA":
                    w.write(b"354 go\r\n")
                    if not await self._message(r, w, b"250 2.0.0 second\r\n", []):
                        return
                elif verb == b"QUIT":
                    w.write(b"221 bye\r\n")
                    return
                else:
                    w.write(b"502 5.5.2 what?\r\n")
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def _first(self, r, w) -> bool:
        rep = self.replies
        rcpts = len(rep["RCPT"])
        if self.mode == "rcpts":
            w.write(rep["MAIL"])
            if not rep["MAIL"].startswith(b"2"):
                return True  # the relay sends no RCPT behind a refused MAIL
            for _ in range(rcpts):
                if not await r.readline():
                    return False
        else:
            for _ in range(rcpts + (self.mode == "group")):
                if not await r.readline():
                    return False
        group = (b"".join(rep["RCPT"]) if self.mode == "rcpts"
                 else rep["MAIL"] + b"".join(rep["RCPT"]) + (rep["DATA"] if self.mode == "group" else b""))
        await self._write(w, group, self.cuts["group"])
        if b"\n421 " in b"\n" + group or b"\n421-" in b"\n" + group:
            return False  # closing
        if self.mode != "group":
            self.data_pending = True  # DATA comes alone, if at all
            return True
        if rep["DATA"].startswith(b"354"):
            return await self._message(r, w, rep["DOT"], self.cuts["dot"])
        return True


async def _relay_transaction(relay, route, mode, recipients):
    """One transaction as the session driver runs it: (MAIL and RCPT codes,
    DATA's code or None, the dot's or None)."""
    sender = "alice@example.org"
    if mode == "rcpts":
        mail = await relay.mail(info(), route, sender, MailParams())
        group = [mail, *(await relay.rcpts(recipients))]
    else:
        group = await relay.mail_group(info(), route, sender, MailParams(), recipients, mode == "group")
    codes = [r.code for r in group]
    if codes[0] >= 400 or not any(c < 400 for c in codes[1:]):
        return codes, None, None
    data = await relay.data_start()
    if data.code != 354:
        return codes, data.code, None
    await relay.data_chunk(BODY)
    return codes, 354, (await relay.data_end()).code


def relay_run(mode, replies, cuts):
    async def go():
        up = await SplittingUpstream(mode, replies, cuts).start()
        log, _ = capture_log("relay-review-replies")
        relay = Relay(config(timeout=3, addReceivedField=False), log)
        route = plain_route(up.port)
        recipients = [f"r{i}@example.net" for i in range(len(replies["RCPT"]))]
        try:
            first = await _relay_transaction(relay, route, mode, recipients)
            second = await _relay_transaction(relay, route, "group", ["s@example.net"])
            await relay.close()
        finally:
            relay.abort()
            up.server.close()
        return first, second, up.messages

    return asyncio.run(asyncio.wait_for(go(), 30))


@settings(max_examples=350, deadline=None, suppress_health_check=list(HealthCheck))
@given(relay_case())
def test_relay_codes_whatever_the_split(case):
    mode, codes, replies, cuts = case
    first, second, messages = relay_run(mode, replies, cuts)
    why = (mode, replies, cuts, first)
    want = expected_codes(mode, codes)
    # never 250 for the message unless the upstream said 250 to its dot
    assert first[2] != 250 or codes[3] == 250, why
    assert first[0] == want[0], why
    stray_354 = b"550 5.7.1 not from you" in replies["DATA"]
    stray_dot = replies["DOT"].endswith(b"250 2.0.0 again\r\n")
    if (stray_354 or stray_dot) and second != ([250, 250], 354, 250):
        # a reply that reached us only after the one it follows was read
        # and the transaction ended (the stray one, or the dot's own reply
        # behind a stray one read as the dot's) is read by the next MAIL:
        # the group is a step late, and DATA, answered 250 instead of 354,
        # shows it; or the stale reply refuses that MAIL (550) or ends it
        # (421): the documented limit, timing alone cannot tell. Never a
        # message reported delivered then.
        assert second[2] is None, (why, second)
    else:
        assert second == ([250, 250], 354, 250), why
    if stray_354 and want[1] == 354:
        # the refusal behind the 354 is DATA's answer when it came with it,
        # else the answer at the end (no dot sent), or, reaching us only
        # after the dot, read as the dot's (the documented limit): a 5xx
        # or 451 then, never a 250
        assert first[1:] in ((550, None), (354, 550), (354, 451)), why
        return
    if stray_dot and want[2] is not None:
        # a stray reply behind the dot's: nonsense (451) when it came with
        # it, else the dot's reply stands
        assert first[1] == 354 and first[2] in (want[2], 451), why
        return
    assert first == want, why
    # the upstream got each message it answered, exactly
    assert messages == [BODY + b"\r\n"] * ((first[2] is not None) + 1), why


@pytest.mark.parametrize("mode", ["group", "rcpts"])
def test_relay_group_every_cut(mode):
    """One group's replies (multi-line, LF-only, a refused recipient) cut
    at every single position: the client's codes never change."""
    replies = {"MAIL": b"250-2.1.0 sender\r\n250 ok\r\n",
               "RCPT": [b"250 2.1.5 ok\n", b"550-5.1.1 no\r\n550 such user\r\n", b"251 2.1.5 fwd\r\n"],
               "DATA": b"354 go\r\n", "DOT": b"250-2.0.0 queued\r\n250 as X\r\n421 4.3.0 bye\r\n"}
    group = (b"".join(replies["RCPT"]) if mode == "rcpts"
             else replies["MAIL"] + b"".join(replies["RCPT"]) + replies["DATA"])
    want = expected_codes(mode, (250, [250, 550, 251], 354, 250))
    for cut in range(1, len(group), 3 if mode == "group" else 1):
        dot_cut = [1 + cut % (len(replies["DOT"]) - 1)]
        first, second, _ = relay_run(mode, replies, {"group": [cut], "dot": dot_cut})
        assert first == want and second == ([250, 250], 354, 250), (cut, dot_cut, first, second)


def test_421_behind_ehlo_at_every_cut():
    """EHLO's reply and an unasked 421 behind it (the upstream closing),
    cut at every position: the client's MAIL gets 451 whatever the split
    (read as surplus after EHLO, or as MAIL's own reply), never a hang."""
    ehlo = b"250-up.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n"
    closing = b"421-4.3.2 shutting\r\n421 down\r\n"
    data = ehlo + closing

    async def one(cut):
        async def serve(r, w):
            try:
                w.write(b"220 up.test ESMTP\r\n")
                await r.readline()
                for p in pieces(data, [cut]):
                    w.write(p)
                    await w.drain()
                    await asyncio.sleep(0.002)
                await asyncio.sleep(2)  # (cancelled as soon as the relay answered)
            finally:
                w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        log, handler = capture_log("relay-review-replies-ehlo")
        relay = Relay(config(timeout=3, addReceivedField=False), log)
        try:
            reply = await relay.mail(info(), plain_route(server.sockets[0].getsockname()[1]),
                                     "alice@example.org", MailParams())
        finally:
            relay.abort()
            server.close()
        return reply, handler.text

    for cut in range(1, len(data)):
        reply, text = asyncio.run(asyncio.wait_for(one(cut), 20))
        # with the 421's words, as a 421 to MAIL gives them
        assert reply.code == 451 and "Traceback" not in text, (cut, reply, text)
        assert any("down" in line for line in reply.lines), (cut, reply, text)
