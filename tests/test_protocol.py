"""The frontend ⇄ authenticator wire protocol: frames, schemas, the typed error."""

from __future__ import annotations

import asyncio
import socket
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendooway_shared.protocol import (
    MAX_FRAME,
    REPLIES,
    REQUESTS,
    VERSION,
    AsyncChannel,
    AuthFail,
    AuthOk,
    AuthRequest,
    BlockingChannel,
    Error,
    FrameDecoder,
    Hello,
    NoRoute,
    ProtocolError,
    RouteOk,
    RouteRequest,
    Welcome,
    encode,
)
from sendooway_shared.types import Route, Secret, TlsMode

ROUTE = Route("smtp.example.org", 587, TlsMode.STARTTLS, True, "", "alice@example.org",
              Secret("up-pass-9"), True, "/home/alice/.fetchmailrc:7")

ALL_MESSAGES = [
    (REQUESTS, Hello(VERSION, "s1a2", "192.0.2.7")),
    (REQUESTS, AuthRequest("alice", Secret("pw"))),
    (REQUESTS, RouteRequest("alice@example.org")),
    (REQUESTS, RouteRequest("")),
    (REPLIES, Welcome(VERSION)),
    (REPLIES, AuthOk("alice")),
    (REPLIES, AuthFail()),
    (REPLIES, RouteOk.from_route(ROUTE)),
    (REPLIES, NoRoute()),
    (REPLIES, Error("route before auth")),
]


def frame(obj) -> bytes:
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("allowed, msg", ALL_MESSAGES, ids=lambda x: getattr(x, "TYPE", ""))
def test_round_trip_all_at_once_and_byte_by_byte(allowed, msg):
    data = encode(msg)
    assert FrameDecoder(allowed).feed(data) == [msg]
    dec = FrameDecoder(allowed)
    got = []
    for b in data:
        got.extend(dec.feed(bytes([b])))
    assert got == [msg]
    assert dec.pending == 0


def test_route_survives_the_wire():
    msg = FrameDecoder(REPLIES).feed(encode(RouteOk.from_route(ROUTE)))[0]
    assert msg.to_route() == ROUTE
    assert "up-pass-9" not in repr(msg)


def test_several_frames_in_one_feed():
    data = encode(Hello(VERSION, "s", "c")) + encode(AuthRequest("u", Secret("p")))
    assert [m.TYPE for m in FrameDecoder(REQUESTS).feed(data)] == ["hello", "auth"]


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ({"type": "auth", "user": "a"}, "missing keys ['password']"),
        ({"type": "auth", "user": "a", "password": "b", "admin": True}, "unexpected keys ['admin']"),
        ({"type": "auth", "user": 5, "password": "b"}, "auth.user: expected a string"),
        ({"type": "hello", "version": True, "session": "s", "client": "c"}, "expected an integer"),
        ({"type": "hello", "version": -1, "session": "s", "client": "c"}, "expected an integer"),
        ({"type": "shutdown"}, "unexpected message type 'shutdown'"),
        ({"user": "a"}, "unexpected message type"),
        ({"type": "route", "sender": "x" * 600}, "longer than"),
        ({"type": "auth", "user": "a\x00b", "password": "p"}, "NUL"),
        ([1, 2, 3], "one map"),
        ("hello", "one map"),
    ],
)
def test_schema_violations_raise_protocol_error(obj, fragment):
    with pytest.raises(ProtocolError) as info:
        FrameDecoder(REQUESTS).feed(frame(obj))
    assert fragment in str(info.value)


def test_replies_are_not_requests():
    # an authenticator message sent to the authenticator is a protocol error
    with pytest.raises(ProtocolError):
        FrameDecoder(REQUESTS).feed(encode(AuthOk("root")))
    with pytest.raises(ProtocolError):
        FrameDecoder(REPLIES).feed(encode(AuthRequest("a", Secret("b"))))


def test_route_ok_checks_its_values():
    bad = dict(type="route_ok", server="h", port=70000, tls="starttls", cert_check=True,
               ca_file="", user="u", password="p", auth=True, source="s", ca_pem="")
    with pytest.raises(ProtocolError, match="port"):
        FrameDecoder(REPLIES).feed(frame(bad))
    bad.update(port=25, tls="rot13")
    with pytest.raises(ProtocolError, match="tls"):
        FrameDecoder(REPLIES).feed(frame(bad))


def test_oversize_and_empty_frames():
    with pytest.raises(ProtocolError, match="frame length"):
        FrameDecoder(REQUESTS).feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="frame length"):
        FrameDecoder(REQUESTS).feed(struct.pack(">I", 0))
    with pytest.raises(ProtocolError):
        encode(AuthRequest("a", Secret("p" * 2000)))


def test_garbage_and_trailing_bytes():
    with pytest.raises(ProtocolError, match="undecodable"):
        FrameDecoder(REQUESTS).feed(struct.pack(">I", 1) + b"\xc1")
    body = msgpack.packb({"type": "route", "sender": "a@b"}) + b"\x00"
    with pytest.raises(ProtocolError, match="undecodable"):
        FrameDecoder(REQUESTS).feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError):  # non-string map keys
        FrameDecoder(REQUESTS).feed(frame({1: 2}))


def test_a_key_given_twice_is_refused():
    """msgpack keeps the last of two equal keys: a hello whose map said
    `type` twice was read as a route request. Every key once, or no frame."""
    def key(k: str) -> bytes:
        return bytes([0xA0 | len(k)]) + k.encode()

    fields = [("type", "hello"), ("version", VERSION), ("session", "s"), ("client", "c"),
              ("type", "route")]
    body = bytes([0x80 | len(fields)]) + b"".join(
        key(k) + msgpack.packb(v) for k, v in fields)
    with pytest.raises(ProtocolError, match="undecodable"):
        FrameDecoder(REQUESTS).feed(struct.pack(">I", len(body)) + body)
    body = bytes([0x80 | 4]) + b"".join(key(k) + msgpack.packb(v) for k, v in fields[:4])
    assert FrameDecoder(REQUESTS).feed(struct.pack(">I", len(body)) + body) == [
        Hello(VERSION, "s", "c")]


def test_decoder_is_dead_after_an_error():
    dec = FrameDecoder(REQUESTS)
    with pytest.raises(ProtocolError):
        dec.feed(frame({"type": "nope"}))
    with pytest.raises(ProtocolError, match="already"):
        dec.feed(encode(Hello(VERSION, "s", "c")))


def test_blocking_channel_over_socketpair():
    a, b = socket.socketpair()
    client = BlockingChannel(a, REPLIES, timeout=5)
    server = BlockingChannel(b, REQUESTS, timeout=5)
    client.send(Hello(VERSION, "s", "c"))
    assert server.receive() == Hello(VERSION, "s", "c")
    server.send(Welcome(VERSION))
    assert client.receive() == Welcome(VERSION)
    server.close()
    with pytest.raises(ConnectionError):
        client.receive()
    client.close()


def test_async_channel_over_socketpair():
    async def run():
        a, b = socket.socketpair()
        ra, wa = await asyncio.open_connection(sock=a)
        rb, wb = await asyncio.open_connection(sock=b)
        front = AsyncChannel(ra, wa, REPLIES)
        auth = AsyncChannel(rb, wb, REQUESTS)
        await front.send(RouteRequest("x@y.z"))
        assert await auth.receive() == RouteRequest("x@y.z")
        await auth.send(NoRoute())
        assert await front.receive() == NoRoute()
        front.close()
        auth.close()

    asyncio.run(run())


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_give_messages_or_protocol_error(data):
    for allowed in (REQUESTS, REPLIES):
        try:
            msgs = FrameDecoder(allowed).feed(data)
        except ProtocolError:
            continue
        assert all(m.TYPE in allowed for m in msgs)


_values = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**33), st.text(max_size=20),
                    st.binary(max_size=5), st.lists(st.integers(-5, 5), max_size=2))


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["type", "user", "password", "sender", "version",
                                        "session", "client", "x"]), _values, max_size=5),
       st.sampled_from(["hello", "auth", "route", "welcome", None]))
def test_random_maps_give_messages_or_protocol_error(obj, kind):
    if kind is not None:
        obj["type"] = kind
    try:
        msgs = FrameDecoder(REQUESTS).feed(frame(obj))
    except ProtocolError:
        return
    assert len(msgs) == 1 and msgs[0].TYPE == obj["type"]
