"""The PROXY protocol header parser (sans-IO, plain function calls with
byte strings), the trust check, and the session driver reading a header
in-process over a socketpair."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct

import pytest
from hypothesis import given, settings, strategies as st

from sendooway_front._proxyproto import (
    V1_MAX, V2_MAX, V2_SIGNATURE, NoProxyHeader, ProxyHeader, ProxyHeaderError,
    ProxyHeaderReader, is_trusted, parse,
)
from sendooway_shared.config import parse_config

from .test_front_driver import LOGIN, FakeConnector, codes, converse


def v2(command: int = 1, family: int = 0x11, block: bytes = b"", version: int = 2,
       length: int | None = None) -> bytes:
    """A v2 header: signature, version/command, family/protocol, length, block."""
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack(">H", size) + block


def v2_tcp4(src="203.0.113.7", sport=40000, dst="10.0.0.2", dport=587, tlvs=b"") -> bytes:
    block = (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
             + struct.pack(">HH", sport, dport) + tlvs)
    return v2(1, 0x11, block)


def v2_tcp6(src="2001:db8::7", sport=40000, dst="2001:db8::2", dport=587, tlvs=b"") -> bytes:
    block = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
             + struct.pack(">HH", sport, dport) + tlvs)
    return v2(1, 0x21, block)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack(">H", len(value)) + value


# TLVs a balancer may add: ALPN, AUTHORITY, UNIQUE_ID, SSL with sub-TLVs, NOOP,
# AWS's VPC endpoint id (0xEA) -- all skipped
TLVS = (tlv(0x01, b"smtp") + tlv(0x02, b"mail.example.org") + tlv(0x05, b"u" * 128)
        + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3")) + tlv(0x04, b"")
        + tlv(0xEA, b"\x01vpce-0123456789abcdef"))

V1_TCP4 = b"PROXY TCP4 203.0.113.7 10.0.0.2 40000 587\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::2 40000 587\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V1_UNKNOWN_LONG = (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                   b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
V1_TCP6_LONGEST = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                   b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")

VALID = {
    "v1 TCP4": (V1_TCP4, ProxyHeader(1, "TCP4", ("203.0.113.7", 40000), ("10.0.0.2", 587), 43)),
    "v1 TCP6": (V1_TCP6, ProxyHeader(1, "TCP6", ("2001:db8::7", 40000), ("2001:db8::2", 587), 46)),
    "v1 UNKNOWN": (V1_UNKNOWN, ProxyHeader(1, "UNKNOWN", None, None, 15)),
    "v1 UNKNOWN longest": (V1_UNKNOWN_LONG, ProxyHeader(1, "UNKNOWN", None, None, 107)),
    "v1 TCP6 longest": (V1_TCP6_LONGEST, ProxyHeader(
        1, "TCP6", ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), 104)),
    "v2 TCP4": (v2_tcp4(), ProxyHeader(2, "TCP4", ("203.0.113.7", 40000), ("10.0.0.2", 587), 28)),
    "v2 TCP4 TLVs": (v2_tcp4(tlvs=TLVS), ProxyHeader(
        2, "TCP4", ("203.0.113.7", 40000), ("10.0.0.2", 587), 28 + len(TLVS))),
    "v2 TCP6 TLVs": (v2_tcp6(tlvs=TLVS), ProxyHeader(
        2, "TCP6", ("2001:db8::7", 40000), ("2001:db8::2", 587), 52 + len(TLVS))),
    "v2 LOCAL": (v2(0, 0x00), ProxyHeader(2, "LOCAL", None, None, 16)),
    # LOCAL: the block is skipped, whatever the family says
    "v2 LOCAL with a block": (v2(0, 0x11, b"\x7f\x00\x00\x01" * 2 + b"\x00\x19" * 2 + TLVS),
                              ProxyHeader(2, "LOCAL", None, None, 28 + len(TLVS))),
    "v2 UNSPEC": (v2(1, 0x00, TLVS), ProxyHeader(2, "UNSPEC", None, None, 16 + len(TLVS))),
    "v2 UDP4": (v2(1, 0x12, bytes(12)), ProxyHeader(2, "UDP4", None, None, 28)),
    "v2 UNIX": (v2(1, 0x31, bytes(216)), ProxyHeader(2, "UNIX-STREAM", None, None, 232)),
}
VALID_BYTES = [raw for raw, _ in VALID.values()]


# ------------------------------------------------------------ valid headers


@pytest.mark.parametrize("name", VALID)
def test_valid_headers(name):
    raw, expected = VALID[name]
    assert parse(raw) == expected
    assert expected.length == len(raw)
    # what follows is not the parser's: it stops at the header's end
    assert parse(raw + b"220 not ours\r\n") == expected


@pytest.mark.parametrize("name", VALID)
def test_every_truncation_needs_more(name):
    raw, _ = VALID[name]
    for i in range(len(raw)):
        assert parse(raw[:i]) is None, i


@pytest.mark.parametrize("name", VALID)
def test_truncated_then_closed_is_an_error(name):
    raw, _ = VALID[name]
    for i in range(1, len(raw)):
        reader = ProxyHeaderReader()
        assert reader.receive_data(raw[:i]) is None
        with pytest.raises(ProxyHeaderError, match=f"after {i} octets.*truncated"):
            reader.receive_data(b"")


def test_closed_before_anything():
    with pytest.raises(NoProxyHeader, match="before a PROXY header"):
        ProxyHeaderReader().receive_data(b"")


@pytest.mark.parametrize("name", VALID)
def test_split_across_reads_keeps_what_follows(name):
    raw, expected = VALID[name]
    stream = raw + b"\x16\x03\x01 a TLS hello or EHLO"
    for cut in range(1, len(stream)):
        reader = ProxyHeaderReader()
        first = reader.receive_data(stream[:cut])
        unfed = b""
        if cut < len(raw):
            assert first is None
            assert reader.receive_data(stream[cut:]) == expected
        else:
            assert first == expected
            unfed = stream[cut:]
        assert reader.trailing_data + unfed == stream[len(raw):]
    # and one byte at a time: complete exactly at the last byte of the header
    reader = ProxyHeaderReader()
    results = [reader.receive_data(raw[i:i + 1]) for i in range(len(raw))]
    assert results[:-1] == [None] * (len(raw) - 1) and results[-1] == expected
    assert reader.trailing_data == b""
    with pytest.raises(RuntimeError):
        reader.receive_data(b"more")  # our bug: the driver reads no further


def test_ipv4_mapped_source_is_ipv4():
    assert parse(b"PROXY TCP6 ::ffff:198.51.100.9 ::1 1 2\r\n").source == ("198.51.100.9", 1)
    assert parse(v2_tcp6(src="::ffff:198.51.100.9")).source == ("198.51.100.9", 40000)


def test_v1_ports_and_case():
    assert parse(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n").source == ("0.0.0.0", 0)
    assert parse(b"PROXY TCP6 2001:DB8::A ::1 1 2\r\n").source == ("2001:db8::a", 1)
    assert parse(b"PROXY UNKNOWN anything \xff at all\r\n").kind == "UNKNOWN"


# ------------------------------------------------------------ invalid headers


@pytest.mark.parametrize("raw, reason", [
    (b"EHLO client.example\r\n", "not a PROXY protocol header"),
    (b"\x16\x03\x01\x02\x00", "not a PROXY protocol header"),  # a TLS ClientHello
    (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
    (b"PROXY\r\n", "not a PROXY protocol header"),
    (b"PROXYTCP4", "not a PROXY protocol header"),
    (b"\r\n\r\n\x00\r\nQUIX\n", "not a PROXY protocol header"),
    (b"\r\nQUIT", "not a PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "CR without LF"),
    (b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n", "bare LF"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "must be TCP4, TCP6 or UNKNOWN"),
    (b"PROXY UNKNOWNX\r\n", "must be TCP4, TCP6 or UNKNOWN"),
    (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "must be TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8  1 2\r\n", "single spaces"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "single spaces"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "single spaces"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "'01.2.3.4' is not an IPv4 address"),
    (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "is not an IPv4 address"),
    (b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n", "is not an IPv4 address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "'1.2.3.4' is not an IPv6 address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "is not an IPv6 address"),
    (b"PROXY TCP6 2001:db8:::1 ::1 1 2\r\n", "is not an IPv6 address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port '01'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "port '65536'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port '-1'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", "port '+2'"),
    (b"PROXY TCP4 \xc3\xa4.2.3.4 5.6.7.8 1 2\r\n", "is not an IPv4 address"),
    (V1_UNKNOWN_LONG[:-2] + b"0\r\n", f"first {V1_MAX} octets"),   # 108 octets
    (b"PROXY UNKNOWN " + b"x" * 200, f"first {V1_MAX} octets"),     # no CRLF at all
    (v2(1, 0x11)[:12] + b"\x11", "version 1, not 2"),
    (v2(1, 0x11)[:12] + b"\x31", "version 3, not 2"),
    (v2(2, 0x11, bytes(12)), "command 0x2 is neither LOCAL nor PROXY"),
    (v2(0xF, 0x11, bytes(12)), "command 0xf"),
    (v2(1, 0x13, bytes(12)), "family/protocol 0x13 is not defined"),
    (v2(1, 0x41, bytes(12)), "family/protocol 0x41 is not defined"),
    (v2(1, 0x11, bytes(11)), "TCP4 address block of 11 octets, needs 12"),
    (v2(1, 0x21, bytes(12)), "TCP6 address block of 12 octets, needs 36"),
    (v2(1, 0x31, bytes(36)), "UNIX-STREAM address block of 36 octets, needs 216"),
    (v2(1, 0x11, length=0xFFFF), f"v2 header of 65551 octets, more than {V2_MAX}"),
    (v2(1, 0x11, length=V2_MAX - 15), f"v2 header of {V2_MAX + 1} octets"),
])
def test_invalid_headers(raw, reason):
    with pytest.raises(ProxyHeaderError, match=reason.replace("+", r"\+")):
        parse(raw)


def test_garbage_is_refused_at_the_first_wrong_byte():
    """No waiting for more of something that cannot become a header."""
    for good in (b"PROXY ", V2_SIGNATURE):
        for i in range(len(good)):
            wrong = good[:i] + bytes([good[i] ^ 0x20])
            with pytest.raises(ProxyHeaderError):
                parse(wrong)
    # an oversized v2 length is refused as soon as the length is in, not at 64 KiB
    with pytest.raises(ProxyHeaderError):
        parse(v2(1, 0x11, length=V2_MAX))


def test_longest_accepted_v2_header():
    block = bytes(12) + tlv(0x04, bytes(V2_MAX - 16 - 12 - 3))
    header = parse(v2(1, 0x11, block))
    assert header is not None and header.length == V2_MAX


# ------------------------------------------------------------ properties


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_need_more_or_parse_or_fail_cleanly(data):
    try:
        header = parse(data)
    except ProxyHeaderError:
        return
    if header is None:  # still possibly a header: never beyond the bounds
        assert len(data) < max(V1_MAX, V2_MAX)
    else:
        assert header.length <= len(data)
        assert header.length <= (V1_MAX if header.version == 1 else V2_MAX)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID_BYTES), st.binary(max_size=200))
def test_prefixed_garbage_is_never_a_header(raw, tail):
    """Valid header bytes after something else are not a header."""
    for junk in (b"X", b" ", b"\r\n", b"\x00"):
        with pytest.raises(ProxyHeaderError):
            parse(junk + raw + tail)


ip4 = st.ip_addresses(v=4)
ip6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)
port = st.integers(0, 65535)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.tuples(st.just(4), ip4, ip4), st.tuples(st.just(6), ip6, ip6)),
       port, port, st.booleans(), st.binary(max_size=64), st.data())
def test_random_headers_round_trip_in_random_pieces(fam, sport, dport, binary, tail, data):
    version, src, dst = fam
    if binary:
        raw = (v2_tcp4 if version == 4 else v2_tcp6)(str(src), sport, str(dst), dport,
                                                      tlvs=data.draw(st.binary(max_size=40)))
    else:
        raw = f"PROXY TCP{version} {src} {dst} {sport} {dport}\r\n".encode()
    stream = raw + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader = ProxyHeaderReader()
    header, start = None, 0
    for end in [*cuts, len(stream)]:
        if header is None and end > start:
            header = reader.receive_data(stream[start:end])
            start = end
    assert header is not None
    assert header.source == (str(src), sport) and header.destination == (str(dst), dport)
    assert header.length == len(raw)
    assert reader.trailing_data + stream[start:] == tail


# ------------------------------------------------------------ trust


def test_trusted_peers():
    nets = parse_config("proxyProtocol = 10.0.0.5, 192.0.2.0/28 2001:db8:1::/48\n").proxyProtocol
    assert is_trusted("10.0.0.5", nets)
    assert is_trusted("::ffff:10.0.0.5", nets)         # the -b dual-stack socket's view
    assert is_trusted("192.0.2.15", nets) and not is_trusted("192.0.2.16", nets)
    assert is_trusted("2001:db8:1:ff::9", nets) and not is_trusted("2001:db8:2::9", nets)
    assert is_trusted("2001:db8:1::9%eth0", nets)
    assert not is_trusted("10.0.0.6", nets)
    assert not is_trusted("::ffff:10.0.0.6", nets)
    for not_ip in ("", "-", "/run/x.sock", "10.0.0.5:25"):
        assert not is_trusted(not_ip, nets)
    assert not is_trusted("10.0.0.5", ())
    mapped = parse_config("proxyProtocol = ::ffff:10.9.0.0/112").proxyProtocol
    assert is_trusted("10.9.1.2", mapped) and is_trusted("::ffff:10.9.1.2", mapped)


# ------------------------------------------------------------ the driver, in-process


class RecordingConnector(FakeConnector):
    """Remembers the client address each authenticator link was opened for."""

    def __init__(self):
        super().__init__()
        self.clients = []

    async def open(self, session_id, client):
        self.clients.append(client)
        return await super().open(session_id, client)


BALANCER = parse_config("proxyProtocol = 192.0.2.1\ntimeout = 2\n")  # converse()'s peer
ELSEWHERE = parse_config("proxyProtocol = 192.0.2.2\ntimeout = 2\n")
MAIL = b"MAIL FROM:<alice@example.org>\r\nQUIT\r\n"


@pytest.mark.parametrize("header, client, ip", [
    (V1_TCP4, "203.0.113.7:40000", "203.0.113.7"),
    (v2_tcp6(tlvs=TLVS), "[2001:db8::7]:40000", "2001:db8::7"),
    (V1_UNKNOWN, "192.0.2.1:4242", "192.0.2.1"),
    (v2(0, 0x00), "192.0.2.1:4242", "192.0.2.1"),
])
@pytest.mark.parametrize("bytewise", [False, True])
def test_trusted_peer_header_sets_the_client(monkeypatch, caplog, header, client, ip, bytewise):
    caplog.set_level(logging.INFO, "sendooway")
    connector = RecordingConnector()
    # the commands come right behind the header, even in the same segment: they are kept
    out, relay = asyncio.run(converse(monkeypatch, header + LOGIN + MAIL, config=BALANCER,
                                      connector=connector, bytewise=bytewise))
    assert codes(out) == [220, 250, 235, 250, 221]
    assert connector.clients == [ip]
    assert relay.info.client_address == client
    connect = [r.getMessage() for r in caplog.records if ": connect" in r.getMessage()]
    assert len(connect) == 1 and f"client={client}: connect" in connect[0]
    assert "PROXY v" in connect[0]
    assert all(f"client={client}" in r.getMessage() for r in caplog.records
               if " client=" in r.getMessage())


@pytest.mark.parametrize("script, reason", [
    (LOGIN, "not a PROXY protocol header"),
    (V1_TCP4[:-1], "truncated"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + LOGIN, "bare LF"),
    (v2(1, 0x11, length=0x2000), "more than"),
    (b"", "connection closed before a PROXY header"),
])
def test_trusted_peer_without_a_valid_header_is_closed_without_greeting(monkeypatch, caplog,
                                                                        script, reason):
    caplog.set_level(logging.INFO, "sendooway")
    connector = RecordingConnector()
    out, relay = asyncio.run(converse(monkeypatch, script, config=BALANCER, connector=connector,
                                      half_close=True))
    assert out == b""
    assert connector.clients == []  # no authenticator link either
    lines = [r.getMessage() for r in caplog.records if r.name == "sendooway"]
    assert len(lines) == 1, lines
    assert "client=192.0.2.1:4242: PROXY protocol" in lines[0] and reason in lines[0]
    assert "without a greeting" in lines[0]


def test_slow_header_times_out(monkeypatch, caplog):
    caplog.set_level(logging.INFO, "sendooway")
    out, _ = asyncio.run(converse(monkeypatch, b"PROXY TCP4 1.2.", config=BALANCER,
                                  half_close=False))
    assert out == b""
    assert any("no complete header within 2s" in r.getMessage() for r in caplog.records)


def test_untrusted_peer_header_is_an_smtp_command(monkeypatch):
    connector = RecordingConnector()
    out, relay = asyncio.run(converse(monkeypatch, V1_TCP4 + LOGIN + MAIL, config=ELSEWHERE,
                                      connector=connector))
    assert codes(out) == [220, 502, 250, 235, 250, 221]
    assert connector.clients == ["192.0.2.1"]
    assert relay.info.client_address == "192.0.2.1:4242"
