"""Differential review of the frontend's PROXY protocol header reading
(sendooway_front/_proxyproto.py and SessionRunner._proxy_header in
_driver.py, the path taken before the SMTP greeting from a `proxyProtocol`
peer), looking for defects that show only when the input is cut at an exact
border.

Inputs: valid v1 (TCP4, TCP6, UNKNOWN, the 107-octet longest lines) and v2
(TCP4, TCP6, LOCAL, UNSPEC, UDP, UNIX; TLVs; total lengths at and around
V2_MAX) headers, and invalid ones made from them (truncated, one octet
changed, inserted or dropped, v1 lines of 106..108 octets, oversized v2
lengths, junk), each followed in the same read by nothing, the first SMTP
command, a TLS ClientHello, a second PROXY header or random octets.

Oracles:
  1. an independent reference reading of the spec (haproxy
     doc/proxy-protocol.txt), written here from the text, on the whole input;
  2. the product on the whole input in one read;
  3. the product fed the same input in random pieces (1 octet up to all at
     once), with the end of the connection (EOF) after the last piece.
All three must agree on accept/refuse, the client address taken, the
header's length and the octets left for the SMTP (or TLS) session. The
driver tests run the real SessionRunner.run() over a socketpair, with pauses
between pieces, EOF mid-header, and a peer that stops sending (cut at
`timeout`, no sooner and not much later); no traceback, no ERROR line.

Findings: none. The parser is split-invariant (it re-parses the whole
buffer each time and refuses only on a prefix that no continuation can
make valid), and its decisions match the reference on every input tried;
the driver hands back exactly the octets after the header (unread()) and
bounds the whole header by one `timeout` (checked: a header trickled a
piece per 0.4 s is cut at 1 s, not 1 s after the last piece). Every
mutant tried against these tests (v1/v2 limits off by one, trailing octets
off by one, no unread(), a timeout per read instead of per header, a "need
more" turned into a refusal at the CR of a split CRLF, reads capped) fails
them.

One deliberate strictness, kept: an UNKNOWN line holding a bare LF before
its CRLF is refused (the spec says to ignore what precedes the CRLF; no
balancer sends a LF there), the same way in any split; the reference here
follows the product on that.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sendooway_front._driver import Frontend, SessionRunner
from sendooway_front._proxyproto import (
    V1_MAX, V2_MAX, V2_SIGNATURE, ProxyHeaderError, ProxyHeaderReader,
)
from sendooway_front._stream import Stream
from sendooway_shared.config import parse_config

from .front_harness import pieces
from .test_front_driver import FakeConnector


# ------------------------------------------------------------ reference (spec)


def reference(data: bytes):
    """The whole input, then EOF: ("ok", source, length) or ("refuse",)."""
    refuse = ("refuse",)
    if data.startswith(V2_SIGNATURE):
        if len(data) < 16:
            return refuse
        ver, cmd, fam = data[12] >> 4, data[12] & 0xF, data[13]
        total = 16 + struct.unpack(">H", data[14:16])[0]
        if ver != 2 or cmd not in (0, 1) or total > V2_MAX or len(data) < total:
            return refuse
        if cmd == 0:
            return ("ok", None, total)
        needs = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
        if fam not in needs or total - 16 < needs[fam]:
            return refuse
        block = data[16:total]
        if fam == 0x11:
            return ("ok", (str(ipaddress.IPv4Address(block[:4])),
                           struct.unpack(">H", block[8:10])[0]), total)
        if fam == 0x21:
            ip = ipaddress.IPv6Address(block[:16])
            text = str(ip.ipv4_mapped or ip)
            return ("ok", (text, struct.unpack(">H", block[32:34])[0]), total)
        return ("ok", None, total)
    if data.startswith(b"PROXY "):
        end = data.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            return refuse
        line = data[:end]
        if b"\r" in line or b"\n" in line:
            return refuse
        words = line.split(b" ")
        if words[1] == b"UNKNOWN":
            return ("ok", None, end + 2)
        if words[1] not in (b"TCP4", b"TCP6") or len(words) != 6:
            return refuse
        version = int(words[1][3:])
        if b"%" in words[2] + words[3]:  # no scoped addresses on the wire
            return refuse
        try:
            src = ipaddress.ip_address(words[2].decode("ascii"))
            dst = ipaddress.ip_address(words[3].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return refuse
        if src.version != version or dst.version != version:
            return refuse
        for p in words[4:6]:
            if not p.isdigit() or (p[:1] == b"0" and p != b"0") or int(p) > 65535:
                return refuse
        src = src.ipv4_mapped or src if version == 6 else src
        return ("ok", (str(src), int(words[4])), end + 2)
    return refuse


# ------------------------------------------------------------ inputs


def _v2(cmd, fam, block, length=None):
    n = len(block) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | cmd, fam]) + struct.pack(">H", n) + block


def _tlv(kind, value):
    return bytes([kind]) + struct.pack(">H", len(value)) + value


ip4 = st.ip_addresses(v=4)
ip6 = st.ip_addresses(v=6)
port = st.integers(0, 65535)
tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4).map(
    lambda ts: b"".join(_tlv(k, v) for k, v in ts))


@st.composite
def valid_header(draw):
    kind = draw(st.sampled_from(["v1 TCP4", "v1 TCP6", "v1 UNKNOWN", "v1 longest",
                                 "v2 TCP4", "v2 TCP6", "v2 LOCAL", "v2 other", "v2 at limit"]))
    if kind == "v1 TCP4":
        return f"PROXY TCP4 {draw(ip4)} {draw(ip4)} {draw(port)} {draw(port)}\r\n".encode()
    if kind == "v1 TCP6":
        return f"PROXY TCP6 {draw(ip6)} {draw(ip6)} {draw(port)} {draw(port)}\r\n".encode()
    if kind == "v1 UNKNOWN":
        rest = draw(st.binary(max_size=V1_MAX - 15).filter(lambda b: b"\r" not in b and b"\n" not in b))
        return b"PROXY UNKNOWN" + (b" " + rest if rest else b"") + b"\r\n"
    if kind == "v1 longest":
        f = "ffff:" * 7 + "ffff"
        return draw(st.sampled_from([f"PROXY TCP6 {f} {f} 65535 65535\r\n".encode(),
                                     f"PROXY UNKNOWN {f} {f} 65535 65535\r\n".encode()]))
    if kind == "v2 TCP4":
        block = draw(ip4).packed + draw(ip4).packed + struct.pack(">HH", draw(port), draw(port))
        return _v2(1, 0x11, block + draw(tlvs))
    if kind == "v2 TCP6":
        block = draw(ip6).packed + draw(ip6).packed + struct.pack(">HH", draw(port), draw(port))
        return _v2(1, 0x21, block + draw(tlvs))
    if kind == "v2 LOCAL":
        return _v2(0, draw(st.integers(0, 255)), draw(st.binary(max_size=60)))
    if kind == "v2 other":
        fam, need = draw(st.sampled_from([(0x00, 0), (0x12, 12), (0x22, 36), (0x31, 216),
                                          (0x32, 216)]))
        return _v2(1, fam, bytes(need) + draw(tlvs))
    # total length V2_MAX - 1, V2_MAX, V2_MAX + 1 (the last refused)
    extra = draw(st.sampled_from([-1, 0, 1]))
    return _v2(1, 0x11, bytes(12) + _tlv(4, bytes(V2_MAX - 16 - 12 - 3 + extra)))


@st.composite
def header_like(draw):
    """A valid header, or one spoilt at a random place."""
    raw = draw(valid_header())
    how = draw(st.sampled_from(["keep", "keep", "truncate", "flip", "insert", "drop", "junk",
                                "v1 106..108", "v2 length"]))
    if how == "keep":
        return raw
    if how == "junk":
        return draw(st.binary(max_size=120))
    if how == "v1 106..108":
        n = draw(st.integers(104, 110))
        return b"PROXY UNKNOWN " + b"x" * (n - 16) + b"\r\n"
    if how == "v2 length":
        return _v2(1, 0x11, bytes(12), draw(st.sampled_from(
            [0, 11, 12, V2_MAX - 17, V2_MAX - 16, V2_MAX - 15, 0xFFFF])))
    i = draw(st.integers(0, len(raw) - 1))
    if how == "truncate":
        return raw[:i]
    if how == "flip":
        return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    if how == "insert":
        return raw[:i] + draw(st.sampled_from([b" ", b"\r", b"\n", b"\x00", b"0", b":"])) + raw[i:]
    return raw[:i] + raw[i + 1:]


CLIENT_HELLO = bytes.fromhex("16030100c4010000c00303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
TAILS = st.one_of(st.sampled_from([b"", b"EHLO client.example\r\n", b"QUIT\r\n", CLIENT_HELLO,
                                   b"PROXY TCP4 6.6.6.6 6.6.6.6 1 2\r\n", V2_SIGNATURE,
                                   b"\r\n", b"\n"]),
                  st.binary(max_size=40))


def drawn_pieces(data, draw):
    cuts = draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=8))
    if draw(st.booleans()) and len(data) < 200:  # sometimes octet by octet
        cuts = range(1, len(data))
    return pieces(data, cuts)


def product(parts):
    """The reader fed `parts`, then EOF: ("ok", source, length, left) or ("refuse",)."""
    reader = ProxyHeaderReader()
    fed = 0
    try:
        for i, part in enumerate(parts):
            header = reader.receive_data(part)
            fed += len(part)
            if header is not None:
                left = reader.trailing_data + b"".join(parts[i + 1:])
                return ("ok", header.source, header.length, left)
        reader.receive_data(b"")
    except ProxyHeaderError:
        return ("refuse",)
    raise AssertionError("EOF did not end the header")


# ------------------------------------------------------------ sans-IO


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_like(), TAILS, st.data())
def test_split_invariance_and_reference(raw, tail, data):
    stream = raw + tail
    whole = product([stream] if stream else [])
    split = product(drawn_pieces(stream, data.draw) if stream else [])
    assert split == whole
    ref = reference(stream)
    assert whole[:3] == ref, (stream, whole, ref)
    if whole[0] == "ok":
        assert whole[3] == stream[whole[2]:]  # exactly the octets after the header
        assert whole[2] <= (V1_MAX if stream[:1] == b"P" else V2_MAX)


@settings(max_examples=300, deadline=None)
@given(valid_header(), TAILS)
def test_every_prefix_is_need_more_or_final(raw, tail):
    """Cut at every border: no prefix is refused that a continuation accepts,
    and once accepted the answer never changes with more input."""
    stream = raw + tail
    final = product([stream])
    for cut in range(len(stream) + 1):
        reader = ProxyHeaderReader()
        try:
            header = reader.receive_data(stream[:cut]) if cut else None
        except ProxyHeaderError:
            assert final == ("refuse",), cut
            continue
        if header is not None:
            assert final[:3] == ("ok", header.source, header.length)
            assert reader.trailing_data == stream[header.length:cut]


# ------------------------------------------------------------ the driver


BALANCER = "192.0.2.1"


async def _session(parts, pause, timeout=2, eof=True):
    """SessionRunner.run() from the balancer, the client sending `parts` with
    `pause` seconds between them; returns (client, client_ip, octets the
    session would read after the header or None when refused, its output,
    seconds taken)."""
    seen = {}

    async def open_link(self):  # the session's first step after the header
        seen["client"], seen["ip"] = self.client, self.client_ip
        got = bytearray()
        while True:
            chunk = await self.stream.read(65536)
            if not chunk:
                break
            got += chunk
        seen["left"] = bytes(got)
        self.session.refuse()

    cfg = parse_config(f"proxyProtocol = {BALANCER}\ntimeout = {timeout}\n")
    fe = Frontend(cfg, connector=FakeConnector(), hostname="mx.test")
    a, b = socket.socketpair()
    server = await Stream.from_socket(a, 10)
    runner = SessionRunner(fe, server, f"{BALANCER}:4242")
    runner._open_link = open_link.__get__(runner)
    start = time.monotonic()
    task = asyncio.ensure_future(runner.run())
    ended = []
    task.add_done_callback(lambda t: ended.append(time.monotonic()))
    reader, writer = await asyncio.open_connection(sock=b)
    try:
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        if eof:
            writer.write_eof()
    except ConnectionError:  # refused while we were still sending
        pass
    try:
        out = await asyncio.wait_for(reader.read(-1), timeout + 5)
    except ConnectionError:  # refused while we were still sending: reset
        out = b""
    await asyncio.wait_for(task, timeout + 5)
    took = ended[0] - start  # when the session ended, not when the client stopped
    writer.close()
    return seen.get("client"), seen.get("ip"), seen.get("left"), out, took


def _expect(stream):
    ref = reference(stream)
    if ref[0] == "refuse":
        return None, None, None
    src = ref[1]
    if src is None:
        return f"{BALANCER}:4242", BALANCER, stream[ref[2]:]
    host, p = src
    return (f"[{host}]:{p}" if ":" in host else f"{host}:{p}"), host, stream[ref[2]:]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(header_like(), TAILS, st.sampled_from([0, 0, 0.002]), st.data())
def test_driver_split_invariance(caplog, raw, tail, pause, data):
    caplog.clear()
    caplog.set_level(logging.INFO, "sendooway")
    stream = raw + tail
    parts = drawn_pieces(stream, data.draw) if stream else []
    if pause:
        parts = parts[:12]
        stream = b"".join(parts)
    client, ip, left, out, took = asyncio.run(_session(parts, pause))
    assert (client, ip, left) == _expect(stream), stream
    if left is None:
        assert out == b""  # refused: no greeting, no reply at all
    else:
        assert out.startswith(b"421 ")
    assert took < 2.0  # EOF or a refusal ends it, not the timeout
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize("sent", [
    b"PROXY TCP4 203.0.113.7 10.0.0.2 40000 ",          # a v1 line stopped short
    _v2(1, 0x11, bytes(12))[:15],                       # inside the v2 fixed part
    _v2(1, 0x11, bytes(12) + _tlv(4, b"x" * 100))[:-1],  # one octet short of its TLVs
])
def test_driver_stalled_header_is_cut_at_timeout(caplog, sent):
    caplog.set_level(logging.INFO, "sendooway")
    # trickled: a piece every 0.4 s, each well within `timeout`, never complete
    n = len(sent) // 4
    parts = [sent[:n], sent[n:2 * n], sent[2 * n:3 * n], sent[3 * n:]]
    client, ip, left, out, took = asyncio.run(_session(parts, 0.4, timeout=1, eof=False))
    assert (client, left, out) == (None, None, b"")
    assert 1.0 <= took < 1.6  # one timeout for the whole header, not one per read
    assert any("no complete header within 1s" in r.getMessage() for r in caplog.records)


def test_driver_header_completed_just_before_the_timeout(caplog):
    """A header trickled so that it completes shortly before `timeout`
    passes is accepted; the SMTP session then gets its own `timeout`."""
    raw = b"PROXY TCP4 203.0.113.7 10.0.0.2 40000 587\r\n"
    parts = [raw[:10], raw[10:30], raw[30:]]
    client, ip, left, out, took = asyncio.run(_session(parts + [b"QUIT\r\n"], 0.25, timeout=1))
    assert (client, ip, left) == ("203.0.113.7:40000", "203.0.113.7", b"QUIT\r\n")
