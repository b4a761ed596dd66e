"""Differential review of the frames between the frontend and the
authenticator (shared/protocol.py, sendooway_auth/_connection.py,
_server.py, _permits.py; sendooway_front/_authlink.py) and of the
authenticator's pipe to its reader workers (_workers.py, _reader.py,
routes.from_wire), looking for defects that show only when the bytes are
cut at a particular place, or that a peer which has been taken over (the
frontend as nobody; a reader worker, which runs as the user) can reach.

Oracles, written here from docs/protocol.md, docs/security.md and the
_workers/_reader docstrings, never from the code: `reference` (the daemon's
answers to a whole request stream then EOF: frame lengths 1..16384 refused
as soon as the length is read, one msgpack map with exactly the type's keys
each once, integers but not booleans in 0..2^32-1, UTF-8 strings without
NUL within their bounds, the permit table's reasons word for word,
maxAuthFailures), `link_reference` (what the frontend may take from a
stream of answers: a welcome of version 2 first, then only the answer
kinds its request allows, the link failed at the first anything else) and
`pipe_reference` (a worker's ACK, length and answer: no ACK is a stale
worker, asked again once; a break after it is a temporary failure).

Inputs: random sequences of good requests and requests spoilt in ~20 ways
(extra, missing and repeated keys, booleans and out-of-range integers, bin,
ext, nested, nil and float values, non-UTF-8 and NUL strings, fields at
their bound and one over, reply types, non-maps, trailing bytes in a frame,
short bodies, lengths 0, 16385, 2^31-1, 2^32-1, half a frame at the end),
plus fixed border streams; answer streams to hello/auth/route/route, good,
out of order, spoilt or cut short; worker replies good, garbage, un-ACKed,
over-long, short by an octet. Each fed whole, in random pieces with pauses
and one octet at a time, and (a pipelined session) ended at every offset.
Against: an in-process Connection with real PAM (pam_wrapper) and a real
reader fork server; the real daemon and the real `--fd` authenticator;
a real AuthLink on a socketpair; the real `sendooway` (stdio, dropping to
nobody) against a scripted authenticator, checking its client's reply
codes; the real WorkerPool with workers played by threads. Logs are
checked for passwords and tracebacks.

Found (each test failed before its fix):
  1. The decoder decoded every frame of a read and raised at the first
     broken one, dropping the good ones before it: a hello, a login and a
     route followed by junk got welcome, auth_ok, route_ok, error when the
     junk came in a read of its own and a bare error when all came in one
     (47 of 213 cut sequences differed from the reference). Now the error
     is held behind the good messages (FrameDecoder.held).
  2. The daemon's silence limits were armed anew for each read: a hello or
     a login frame trickled one octet per (timeout - a little) was never
     cut, so the hoarder the limits exist for had only to trickle. Now
     each counts from the connection's start, the frame's first octet or
     the last answer.
  3. A worker's answer to a route request was taken with up to 1000
     accounts of 10,000 patterns: 8 MiB of one-octet patterns cost the
     daemon ~5 s of its event loop per MAIL FROM. Now one account, and
     only the lists routes._cap leaves.
Not found: a route answered before a login, an answer out of turn, an
error that did not close, a malformed or misplaced answer taken by the
frontend as a login or a route, a traceback, a password in a log.

Planted bugs (not committed; 23, each run against this file): frame length
bound, booleans as integers, string bound, NUL, repeated keys, the held
error dropped in the decoder and in each channel, route_ok's port bound,
maxAuthFailures off by one, route permitted before login, a violation not
closing, the silence limit per read (frame and hello), the welcome and its
version not checked, error taken as auth_fail, auth_ok taken as no_route,
ACK not checked, a stale worker not asked again, a short answer padded,
more than one account and more than 1000 patterns accepted. All 23 fail
here (17 did before the fixed border streams and worker edges were added).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
import time

import msgpack
import pytest

from sendooway_auth._connection import Connection
from sendooway_auth._pam import PamPool
from sendooway_auth._penalty import Penalty
from sendooway_auth._reader import ForkServer
from sendooway_auth._service import AuthService
from sendooway_auth._workers import WorkerPool
from sendooway_shared.config import parse_config
from sendooway_shared.protocol import REPLIES, FrameDecoder
from tests import auth_helpers
from tests.front_harness import pieces

daemon = auth_helpers.daemon  # a fixture: real daemons, their logs checked at the end
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the reader switches users")

RELAY = "relay.example.org"
RELAY_SECRET = "r-Secret-9"
CONF = ("maxAuthFailures = 2\n"
        f"smarthostMapping = direct:*@example.org {RELAY} 587 u {RELAY_SECRET} tls\n")


# ------------------------------------------------ the reference (docs/protocol.md)

LIMITS = {"user": 256, "password": 1024, "sender": 512, "session": 64, "client": 128}
SCHEMA = {"hello": {"version": int, "session": str, "client": str},
          "auth": {"user": str, "password": str},
          "route": {"sender": str}}
PERMITTED = {"expect-hello": "hello", "expect-auth": "auth", "authenticated": "route"}
# the permit table's "error reason" column, word for word
VIOLATIONS = {("expect-hello", "auth"): "auth before hello",
              ("expect-hello", "route"): "route before hello",
              ("expect-auth", "hello"): "second hello",
              ("expect-auth", "route"): "route before a successful auth",
              ("authenticated", "hello"): "hello after auth",
              ("authenticated", "auth"): "second auth after a successful one"}
PROTOCOL_ERROR = "protocol error: "  # the rest of that reason is the product's own words


class _Pairs(list):
    """A msgpack map as the list of its (key, value) pairs, duplicates kept."""


class _Refused(Exception):
    pass


def _request(body: bytes) -> dict:
    """The request one frame body holds, read as the spec words it: exactly
    one msgpack map, its keys exactly the type's, each once; integers
    (not booleans) in 0..2^32-1, UTF-8 strings without NUL within their
    bound; anything else (bin, ext, float, nil, nested) refused."""
    try:
        obj = msgpack.unpackb(body, raw=False, unicode_errors="surrogateescape",
                              strict_map_key=False, object_pairs_hook=_Pairs)
    except Exception:  # noqa: BLE001 - any undecodable body, trailing bytes included
        raise _Refused from None
    if not isinstance(obj, _Pairs):
        raise _Refused
    keys = [k for k, _v in obj]
    if len(set(map(repr, keys))) != len(keys):
        raise _Refused
    fields = dict(obj)
    kind = fields.pop("type", None)
    if not isinstance(kind, str) or kind not in SCHEMA or set(fields) != set(SCHEMA[kind]):
        raise _Refused
    for key, want in SCHEMA[kind].items():
        value = fields[key]
        if want is int:
            if type(value) is not int or not 0 <= value < 2**32:
                raise _Refused
        elif (type(value) is not str or len(value) > LIMITS.get(key, 1024) or "\0" in value
              or any(0xD800 <= ord(c) <= 0xDFFF for c in value)):
            raise _Refused
    return {"type": kind, **fields}


def reference(stream: bytes, password: str, max_failures: int = 2) -> list[tuple]:
    """What the authenticator answers to `stream` followed by EOF, whole:
    ('welcome',), ('auth_ok', user), ('auth_fail',), ('route_ok', server),
    ('no_route',), ('error', reason) where a protocol error's reason is
    only its prefix. The world's alice logs in with `password`; routes
    exist for senders *@example.org (CONF)."""
    out: list[tuple] = []
    state, failures, at = "expect-hello", 0, 0
    while len(stream) - at >= 4:
        (length,) = struct.unpack_from(">I", stream, at)
        if not 1 <= length <= 16384:
            return out + [("error", PROTOCOL_ERROR)]  # known as soon as the length is
        if len(stream) - at - 4 < length:
            break
        body, at = stream[at + 4:at + 4 + length], at + 4 + length
        try:
            req = _request(body)
        except _Refused:
            return out + [("error", PROTOCOL_ERROR)]
        if PERMITTED[state] != req["type"]:
            return out + [("error", "not permitted: " + VIOLATIONS[state, req["type"]])]
        if req["type"] == "hello":
            if req["version"] != 2:
                return out + [("error", f"unsupported protocol version {req['version']}"
                                        " (this is version 2)")]
            out.append(("welcome",))
            state = "expect-auth"
        elif req["type"] == "auth":
            if req["user"] == "alice" and req["password"] == password:
                out.append(("auth_ok", "alice"))
                state = "authenticated"
            else:
                out.append(("auth_fail",))
                failures += 1
                if failures >= max_failures:
                    return out
        else:
            sender = req["sender"]
            out.append(("route_ok", RELAY) if sender.endswith("@example.org")
                       and "@" not in sender[:-12] else ("no_route",))
    return out


def seen(replies: list) -> list[tuple]:
    """The product's answers in the reference's terms."""
    out = []
    for r in replies:
        if r.TYPE == "auth_ok":
            out.append(("auth_ok", r.user))
        elif r.TYPE == "route_ok":
            out.append(("route_ok", r.server))
        elif r.TYPE == "error":
            cut = r.reason.startswith(PROTOCOL_ERROR)
            out.append(("error", PROTOCOL_ERROR if cut else r.reason))
        else:
            out.append((r.TYPE,))
    return out


# ------------------------------------------------ frames, good and spoilt


def frame(body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">I", len(body) if length is None else length) + body


def packed(fields: list[tuple[str, object]]) -> bytes:
    """A map body from (key, value) pairs in order, keys repeated as given;
    a value of type bytes is put in as it is (already msgpack)."""
    assert len(fields) < 16
    return bytes([0x80 | len(fields)]) + b"".join(
        msgpack.packb(k) + (v if isinstance(v, bytes) else msgpack.packb(v, use_bin_type=True))
        for k, v in fields)


def raw_str(data: bytes) -> bytes:
    """A msgpack str holding `data` as it is (UTF-8 or not)."""
    return b"\xd9" + bytes([len(data)]) if len(data) < 256 else b"\xda" + struct.pack(">H", len(data))


def rstr(data: bytes) -> bytes:
    return raw_str(data) + data


def requests(password: str) -> dict[str, list[tuple[str, object]]]:
    return {
        "hello": [("type", "hello"), ("version", 2), ("session", "s1"),
                  ("client", "192.0.2.7:5")],
        "login": [("type", "auth"), ("user", "alice"), ("password", password)],
        "wrong": [("type", "auth"), ("user", "alice"), ("password", "wrong-Pw-zz")],
        "route": [("type", "route"), ("sender", "alice@example.org")],
        "elsewhere": [("type", "route"), ("sender", "alice@elsewhere.test")],
    }


def _spoil(rng: random.Random, fields: list[tuple[str, object]]) -> bytes:
    """One frame made from a good request's fields, spoilt (or, for the
    bound cases, kept just valid) in one of many ways."""
    fields = list(fields)
    i = rng.randrange(1, len(fields)) if len(fields) > 1 else 0
    key, value = fields[i]
    way = rng.randrange(24)
    if way == 0:
        fields.append(("x", 1))
    elif way == 1:
        del fields[i]
    elif way == 2:
        fields.append(fields[i])  # a key twice
    elif way == 3:
        fields[i] = (key, True if isinstance(value, int) else False)
    elif way == 4:
        fields[i] = (key, 2**32 if isinstance(value, int)
                     else msgpack.packb(value.encode(), use_bin_type=True))  # bin
    elif way == 5:
        fields[i] = (key, -1 if isinstance(value, int) else msgpack.ExtType(1, b"x"))
    elif way == 6:
        fields[i] = (key, [value])
    elif way == 7:
        fields[i] = (key, {key: value})
    elif way == 8:
        fields[i] = (key, None)
    elif way == 9:
        fields[i] = (key, 2.0)
    elif way == 10 and isinstance(value, str):
        fields[i] = (key, rstr(value.encode() + b"\xff\xfe"))  # not UTF-8
    elif way == 11 and isinstance(value, str):
        fields[i] = (key, value[:1] + "\0" + value[1:])
    elif way in (12, 13) and key in LIMITS:
        bound = LIMITS[key] + (way - 12)  # at the bound, and one over
        fields[i] = (key, ("é" * bound) if rng.random() < 0.5 else ("a" * bound))
    elif way == 14:
        fields[0] = ("type", rng.choice(["welcome", "auth_ok", "nope", ""]))
    elif way == 15:
        fields[0] = ("type", b"\xc4\x05hello")  # the type as bin
    elif way == 16:
        return frame(msgpack.packb([dict(fields)]))
    elif way == 17:
        return frame(packed(fields) + b"\xc0")  # a second object in the frame
    elif way == 18:
        body = packed(fields)
        return frame(body[:-1], length=len(body) - 1)  # the body cut short
    elif way == 19:
        return frame(b"", length=rng.choice([0, 16385, 2**32 - 1, 0x7FFFFFFF]))
    elif way == 20:
        return frame(b"\xc1")  # never used in msgpack
    elif way == 21 and key == "version":
        fields[i] = (key, rng.choice([0, 1, 3, 2**32 - 1]))  # valid frames, other versions
    elif way == 22:
        fields[i] = (key, b"\xdc" + struct.pack(">H", 0) if rng.random() < 0.5
                     else b"\xd4\x00\x00")  # array16 [] or fixext1
    else:
        fields[i] = (key, value)  # unchanged: a good frame among the spoilt ones
    return frame(packed(fields))


def sequence(rng: random.Random, password: str) -> bytes:
    """A frontend's bytes: mostly a good start, then good, bad and spoilt
    requests in any order."""
    good = requests(password)
    start = rng.choice([[], ["hello"], ["hello", "login"], ["hello", "login"],
                        ["hello", "wrong", "login"]])
    names = start + [rng.choice(list(good)) for _ in range(rng.randrange(0, 4))]
    out = [frame(packed(good[n])) for n in names]
    for _ in range(rng.randrange(0, 3)):
        spoilt = _spoil(rng, good[rng.choice(list(good))])
        out.insert(rng.randrange(len(out) + 1), spoilt)
    if rng.random() < 0.3:
        out.append(frame(packed(good["route"]))[:rng.randrange(1, 12)])  # half a frame, then EOF
    return b"".join(out)


def edges(password: str) -> list[bytes]:
    """Streams at the spec's borders, beside the random ones."""
    good = requests(password)
    hello = frame(packed(good["hello"]))

    def hello_with(version) -> bytes:
        return frame(packed([(k, version if k == "version" else v) for k, v in good["hello"]]))

    return [
        hello + struct.pack(">I", 16385),  # refused at once
        hello + struct.pack(">I", 16384) + b"\x80" * 9,  # may come: EOF, no word
        hello + struct.pack(">I", 0),
        hello_with(True), hello_with(1), hello_with(2**32), hello_with(2**32 - 1),
        hello + frame(packed(good["login"])) + frame(b"\xc1"),
        hello + frame(packed(good["login"])) + frame(packed(good["route"])) + b"\0\0",
    ]


def drawn(rng: random.Random, password: str, count: int):
    """`count` random sequences, each with the reference's answers."""
    for _ in range(count):
        stream = sequence(rng, password)
        yield stream, reference(stream, password)


def cuts(rng: random.Random, data: bytes) -> list[int]:
    n = rng.choice([1, 2, 4, 8, len(data)])
    return [rng.randrange(len(data) + 1) for _ in range(n)]


# ------------------------------------------------ the daemon's side, in-process


@pytest.fixture(scope="module")
def make_service(world):
    cfg = parse_config(CONF, "authframes.conf")
    forks = ForkServer(cfg).start()
    pam = PamPool("sendooway", threads=2)
    yield lambda: AuthService(cfg, pam, WorkerPool(forks), Penalty(base=0))
    pam.shutdown()
    forks.stop()


async def _serve_once(service, reads: list[bytes], pause: int) -> list:
    """One Connection over a socketpair, fed `reads` one by one with a
    pause after each, then EOF; its answers, decoded."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    task = asyncio.ensure_future(Connection(service, reader, writer, "review").run())
    loop = asyncio.get_running_loop()
    ours.setblocking(False)
    try:
        for piece in reads:
            await loop.sock_sendall(ours, piece)
            for _ in range(pause):  # a few turns of the loop: the piece is read alone
                await asyncio.sleep(0)
    except (BrokenPipeError, ConnectionResetError):
        pass  # it closed after an error: what it said is read below
    ours.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(task, 10)
    replies = await auth_helpers.replies_until_closed(ours)
    ours.close()
    return replies


def _run_cases(make_service, cases) -> list[str]:
    """Serve each (stream, reads, pause) in one event loop with one service;
    the disagreements with the reference, described."""
    async def main():
        service = make_service()
        problems = []
        try:
            for stream, reads, pause, want in cases:
                got = seen(await _serve_once(service, reads, pause))
                if got != want:
                    problems.append(f"{stream.hex()} in {[len(r) for r in reads]}:"
                                    f"\n   got {got}\n  want {want}")
        finally:
            service.readers.close()
        return problems

    return asyncio.run(main())


@ROOT_ONLY
def test_answers_are_the_references_however_the_frames_are_cut(world, make_service, caplog):
    """Random sequences of good and spoilt requests, each fed whole, in
    random pieces with pauses, and (some) one octet at a time: the answers
    are the reference's every time."""
    password = world.users["alice"].password
    rng = random.Random(20261129)
    cases = []
    for stream, want in drawn(rng, password, 150):
        splits = [[], cuts(rng, stream), cuts(rng, stream)]
        if len(stream) < 120 and rng.random() < 0.2:
            splits.append(range(len(stream)))
        for where in splits:
            cases.append((stream, pieces(stream, where), 3, want))
    for stream in edges(password):  # and the borders, every time
        want = reference(stream, password)
        for where in ([], cuts(rng, stream), range(len(stream))):
            cases.append((stream, pieces(stream, where), 3, want))
    with caplog.at_level(logging.INFO, logger="sendooway-auth"):
        problems = _run_cases(make_service, cases)
    assert not problems, f"{len(problems)} of {len(cases)}:\n" + "\n".join(problems[:6])
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text
    assert password not in caplog.text and RELAY_SECRET not in caplog.text


@ROOT_ONLY
def test_eof_at_every_offset_gets_the_answers_to_the_whole_frames_before_it(world, make_service):
    """A pipelined session (hello, a wrong and a right login, two routes,
    then a spoilt frame) ended by the frontend at every offset, in random
    pieces: every whole frame before the end is answered as the reference
    says, a frame left half-read is dropped without a word."""
    password = world.users["alice"].password
    good = requests(password)
    stream = b"".join(frame(packed(good[n])) for n in ("hello", "wrong", "login", "route",
                                                       "elsewhere"))
    stream += frame(packed(good["route"] + [("x", 1)]))
    rng = random.Random(7)
    cases = []
    for end in range(len(stream) + 1):
        cut = stream[:end]
        cases.append((cut, pieces(cut, cuts(rng, cut)), 3, reference(cut, password)))
    assert cases[-1][3][-1] == ("error", PROTOCOL_ERROR)
    problems = _run_cases(make_service, cases)
    assert not problems, f"{len(problems)} of {len(cases)}:\n" + "\n".join(problems[:6])


def test_a_link_reads_the_good_answers_before_a_broken_one_and_then_fails_at_once():
    """As the frontend's AuthLink: welcome, auth_ok and a broken frame in
    one read, the connection left open: the login is alice's, the route
    request fails at once, not after the link's timeout."""
    from sendooway_front._authlink import AuthLink, AuthLinkError
    from sendooway_shared.types import Secret

    async def main():
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        link = AuthLink(reader, writer, timeout=5)
        theirs.sendall(frame(packed([("type", "welcome"), ("version", 2)]))
                       + frame(packed([("type", "auth_ok"), ("user", "alice")])) + frame(b"\xc1"))
        await link.send_hello("S1", "192.0.2.7")
        user = await link.auth("alice", Secret("pw"))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(AuthLinkError, match="undecodable"):
            await link.route("alice@example.org")
        link.close()
        theirs.close()
        return user, loop.time() - t0

    user, took = asyncio.run(main())
    assert user == "alice" and took < 1.0, took


def test_a_channel_reads_the_good_answer_before_a_broken_one_and_then_fails_at_once():
    """The frontend's side of the same rule: an answer followed in the same
    read by a broken frame is read, and the next receive fails at once
    (it does not wait for bytes that are already there)."""
    from sendooway_shared.protocol import BlockingChannel, ProtocolError, AuthFail

    ours, theirs = socket.socketpair()
    ch = BlockingChannel(ours, REPLIES, timeout=3)
    try:
        theirs.sendall(frame(msgpack.packb({"type": "auth_fail"})) + frame(b"\xc1"))
        assert ch.receive() == AuthFail()
        with pytest.raises(ProtocolError):
            ch.receive()
    finally:
        ch.close()
        theirs.close()


# ------------------------------------------------ the daemon's side, a real daemon


def _answers(sock: socket.socket, timeout: float = 5.0) -> list:
    """Every frame the daemon sends until it closes (within `timeout`)."""
    sock.setblocking(False)
    return asyncio.run(asyncio.wait_for(auth_helpers.replies_until_closed(sock), timeout))


@ROOT_ONLY
def test_a_real_daemon_answers_as_the_reference_in_any_cut(daemon, world):
    """The same differential against the real daemon (its own socket,
    SO_PEERCRED, log): random sequences in random pieces with real
    pauses; its log is checked for passwords and tracebacks by the
    fixture."""
    d = daemon(CONF)
    password = world.users["alice"].password
    rng = random.Random(11)
    problems = []
    for stream, want in drawn(rng, password, 20):
        for where in ([], cuts(rng, stream)):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket_path)
            try:
                for piece in pieces(stream, where):
                    s.sendall(piece)
                    time.sleep(0.002)
            except (BrokenPipeError, ConnectionResetError):
                pass
            s.shutdown(socket.SHUT_WR)
            got = seen(_answers(s))
            s.close()
            if got != want:
                problems.append(f"{stream.hex()} {where}:\n   got {got}\n  want {want}")
    assert not problems, "\n".join(problems[:4])


@ROOT_ONLY
def test_a_trickled_frame_does_not_stretch_the_silence_limits(daemon, world):
    """docs/protocol.md and security.md: the hello comes within `timeout`,
    a frame begun is finished within `timeout`. A peer trickling one octet
    per 0.3 s (here timeout = 1) must be cut about `timeout` after it
    connected (the hello) or began the frame (a login), not `timeout` after
    its last octet."""
    d = daemon(CONF + "timeout = 1\n")
    good = requests(world.users["alice"].password)
    hello, login = frame(packed(good["hello"])), frame(packed(good["login"]))
    before = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    before.connect(d.socket_path)
    started = time.monotonic()
    after = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    after.connect(d.socket_path)
    after.sendall(hello)
    assert _read_one(after).TYPE == "welcome"
    trickles = {before: [hello, 0, None], after: [login, 0, None]}
    while time.monotonic() - started < 3.5 and any(t[2] is None for t in trickles.values()):
        for s, t in trickles.items():
            if t[2] is not None:
                continue
            try:
                s.sendall(t[0][t[1]:t[1] + 1])
                t[1] += 1
            except (BrokenPipeError, ConnectionResetError):
                t[2] = time.monotonic() - started
            else:
                s.setblocking(False)
                try:
                    if s.recv(65536, socket.MSG_PEEK):
                        t[2] = time.monotonic() - started
                except BlockingIOError:
                    pass
                s.setblocking(True)
        time.sleep(0.3)
    waited = {name: trickles[s][2] for name, s in (("hello", before), ("login", after))}
    assert all(w is not None and w < 2.2 for w in waited.values()), waited
    assert _read_one(before).reason == "closed: no hello within 1s"
    assert _read_one(after).reason == "closed: a frame left unfinished for 1s"
    before.close()
    after.close()


def _read_one(sock: socket.socket):
    decoder = FrameDecoder(REPLIES)
    sock.settimeout(5)
    while True:
        got = decoder.feed(sock.recv(1))
        if got:
            return got[0]


# ------------------------------------------------ the frontend's side: AuthLink

REPLY_LIMITS = {"user": 1024, "password": 1024, "server": 255, "ca_file": 4096, "source": 4096,
                "ca_pem": 8192, "reason": 1024}
REPLY_SCHEMA = {
    "welcome": {"version": int}, "auth_ok": {"user": str}, "auth_fail": {},
    "route_ok": {"server": str, "port": int, "tls": str, "cert_check": bool, "ca_file": str,
                 "user": str, "password": str, "auth": bool, "source": str, "ca_pem": str},
    "no_route": {}, "error": {"reason": str},
}


def _reply(body: bytes) -> dict | None:
    """The answer one frame body holds, as docs/protocol.md words it, or None."""
    try:
        obj = msgpack.unpackb(body, raw=False, unicode_errors="surrogateescape",
                              strict_map_key=False, object_pairs_hook=_Pairs)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(obj, _Pairs) or len({repr(k) for k, _v in obj}) != len(obj):
        return None
    fields = dict(obj)
    kind = fields.pop("type", None)
    if not isinstance(kind, str) or kind not in REPLY_SCHEMA or set(fields) != set(
            REPLY_SCHEMA[kind]):
        return None
    for key, want in REPLY_SCHEMA[kind].items():
        value = fields[key]
        if want is bool:
            ok = type(value) is bool
        elif want is int:
            ok = type(value) is int and 0 <= value < 2**32
        else:
            limit = 256 if (kind, key) == ("auth_ok", "user") else REPLY_LIMITS.get(key, 1024)
            ok = (type(value) is str and len(value) <= limit and "\0" not in value
                  and not any(0xD800 <= ord(c) <= 0xDFFF for c in value))
        if not ok:
            return None
    if kind == "route_ok" and (fields["tls"] not in ("plain", "starttls", "tls")
                               or not 1 <= fields["port"] <= 65535 or not fields["server"]):
        return None
    return {"type": kind, **fields}


def link_reference(stream: bytes, calls: list[str]) -> list[tuple]:
    """What the frontend makes of the answers `stream` (then EOF) to hello
    (not waited for) and `calls` ("auth" or "route"): each call's result,
    ('broken',) for the first that fails, nothing after it."""
    replies, at = [], 0
    while len(stream) - at >= 4:
        (length,) = struct.unpack_from(">I", stream, at)
        if not 1 <= length <= 16384 or len(stream) - at - 4 < length:
            break
        reply = _reply(stream[at + 4:at + 4 + length])
        if reply is None:
            break
        replies.append(reply)
        at += 4 + length
    replies.append(None)  # a broken frame, half a frame or EOF: all fail the link
    out: list[tuple] = []
    first = replies.pop(0)
    if first is None or first["type"] != "welcome" or first["version"] != 2:
        return [("broken",)]
    for call in calls:
        reply = replies.pop(0)
        kinds = ("auth_ok", "auth_fail") if call == "auth" else ("route_ok", "no_route")
        if reply is None or reply["type"] not in kinds:
            return out + [("broken",)]
        if reply["type"] == "auth_ok":
            out.append(("auth_ok", reply["user"]))
        elif reply["type"] == "route_ok":
            out.append(("route_ok", reply["server"], reply["port"], reply["tls"],
                        reply["password"]))
        else:
            out.append((reply["type"],))
    return out


def answers(rng: random.Random) -> bytes:
    """A daemon's answers to hello, auth, route, route: good, out of
    order, or spoilt."""
    good = {
        "welcome": [("type", "welcome"), ("version", 2)],
        "auth_ok": [("type", "auth_ok"), ("user", "alice")],
        "auth_fail": [("type", "auth_fail")],
        "route_ok": [("type", "route_ok"), ("server", "smtp.example.org"), ("port", 587),
                     ("tls", "starttls"), ("cert_check", True), ("ca_file", ""),
                     ("user", "alice"), ("password", "up-Secret-4"), ("auth", True),
                     ("source", "/home/alice/.fetchmailrc:4"), ("ca_pem", "")],
        "no_route": [("type", "no_route")],
        "error": [("type", "error"), ("reason", "temporary failure: x")],
    }
    names = rng.choice([["welcome", "auth_ok", "route_ok", "no_route"],
                        ["welcome", "auth_fail", "auth_ok", "route_ok"],
                        ["welcome", "auth_ok", "route_ok", "route_ok"]])
    if rng.random() < 0.3:  # out of order: a right answer at the wrong place
        i, j = rng.randrange(len(names)), rng.randrange(len(names))
        names[i], names[j] = names[j], names[i]
    if rng.random() < 0.2:
        names.insert(rng.randrange(len(names) + 1), rng.choice(list(good)))
    out = [frame(packed(good[n])) for n in names]
    if rng.random() < 0.6:
        i = rng.randrange(len(out))
        fields = list(good[names[i]])
        if len(fields) > 1 and rng.random() < 0.4:
            k = rng.randrange(1, len(fields))
            key = fields[k][0]
            fields[k] = (key, rng.choice([
                0, 65536, 2**32, True, 1, None, "", "ssl", "x" * 256, "é" * 257, "a\0b",
                rstr(b"\xff"), msgpack.packb(b"bin", use_bin_type=True), [1], 2.5,
                "x" * 1024, "x" * 1025, "x" * 4097, "x" * 8193]))
            out[i] = frame(packed(fields))
        else:
            out[i] = _spoil(rng, good[names[i]])
    stream = b"".join(out)
    if rng.random() < 0.2:
        stream = stream[:rng.randrange(len(stream) + 1)]  # the daemon goes away mid-answer
    return stream


async def _link_once(reads: list[bytes], calls: list[str]) -> list[tuple]:
    """A real AuthLink on a socketpair whose other end sends `reads` with
    pauses, then closes; the results of `calls`."""
    from sendooway_front._authlink import AuthLink, AuthLinkError
    from sendooway_shared.types import Secret

    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    link = AuthLink(reader, writer, timeout=5)
    loop = asyncio.get_running_loop()
    theirs.setblocking(False)

    async def daemon_side():
        try:
            for piece in reads:
                await loop.sock_sendall(theirs, piece)
                for _ in range(3):
                    await asyncio.sleep(0)
        except (BrokenPipeError, ConnectionResetError):
            pass
        theirs.shutdown(socket.SHUT_WR)

    feeding = asyncio.ensure_future(daemon_side())
    out: list[tuple] = []
    try:
        await link.send_hello("S1", "192.0.2.7")
        for call in calls:
            if call == "auth":
                user = await link.auth("alice", Secret("alice-pw"))
                out.append(("auth_fail",) if user is None else ("auth_ok", user))
            else:
                route = await link.route("alice@example.org")
                out.append(("no_route",) if route is None else (
                    "route_ok", route.server, route.port, route.tls.value,
                    route.password.reveal()))
    except AuthLinkError:
        out.append(("broken",))
        assert link.broken
    finally:
        link.close()
        await feeding
        theirs.close()
    return out


def test_the_frontend_takes_only_the_answers_the_reference_takes_in_any_cut():
    """Random answer streams (good, out of order, spoilt, cut short) to
    hello, auth, route, route, fed to a real AuthLink whole, in random
    pieces and one octet at a time: it returns what the reference says
    and fails the link (AuthLinkError) where the reference does; so no
    malformed or misplaced answer is ever a login or a route."""
    rng = random.Random(4242)
    calls = ["auth", "route", "route"]
    problems, kinds = [], set()

    async def main():
        for _ in range(300):
            stream = answers(rng)
            want = link_reference(stream, calls)
            kinds.update(w[0] for w in want)
            splits = [[], cuts(rng, stream)] + ([range(len(stream))] if rng.random() < 0.1 else [])
            for where in splits:
                got = await _link_once(pieces(stream, where), calls)
                if got != want:
                    problems.append(f"{stream.hex()} {list(where)}:\n   got {got}\n  want {want}")

    asyncio.run(main())
    assert not problems, f"{len(problems)}:\n" + "\n".join(problems[:4])
    assert kinds == {"auth_ok", "auth_fail", "route_ok", "no_route", "broken"}, kinds


class _ScriptedDaemon:
    """A fake authenticator on a UNIX socket (root's, so the frontend trusts
    it) in a thread: to each request on a connection it sends the next of
    `script`'s byte strings, cut in pieces with pauses; then it says EOF."""

    def __init__(self, path: str, script: list[bytes], seed: int) -> None:
        import threading

        self.path, self.script, self.rng = path, script, random.Random(seed)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o666)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:  # (the frontend probes the socket before its session connects)
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        from sendooway_shared.protocol import REQUESTS

        conn.settimeout(10)
        decoder, script = FrameDecoder(REQUESTS), list(self.script)
        try:
            while script:
                data = conn.recv(65536)
                if not data:
                    break
                for _request in decoder.feed(data):
                    if not script:
                        break
                    answer = script.pop(0)
                    for piece in pieces(answer, cuts(self.rng, answer)):
                        conn.sendall(piece)
                        time.sleep(0.002)
            conn.shutdown(socket.SHUT_WR)  # (half: a request still to come is no EPIPE)
            while conn.recv(65536):
                pass
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


def per_request(stream: bytes, requests: int) -> list[bytes]:
    """`stream` as the answers to `requests` requests: a frame each (as its
    length says), the rest with the last."""
    out, at = [], 0
    for _ in range(requests - 1):
        if len(stream) - at < 4:
            break
        end = min(len(stream), at + 4 + struct.unpack_from(">I", stream, at)[0])
        out.append(stream[at:end])
        at = end
    return out + [stream[at:]]


@ROOT_ONLY
def test_an_smtp_client_gets_the_designed_reply_whatever_the_daemon_answers(world):
    """The real `sendooway` (stdio, dropping to nobody) against a scripted
    authenticator whose answers, cut in pieces, are drawn as above: the
    client's AUTH and MAIL get what DESIGN.md and the catalogue say for
    the reference's outcome (235 / 535 / 454 at AUTH; 550 / 451 at MAIL,
    530 without a login), never a login or a route the reference refuses,
    and the frontend writes no traceback."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.front_util import FRONT, login_plain, open_tmp, stdio_session

    rng = random.Random(99)
    wanted = {"broken": 2, "auth_fail": 1, "no_route": 1, "broken-at-route": 2}
    scripts = []
    while any(wanted.values()):
        stream = answers(rng)
        outcome = link_reference(stream, ["auth", "route"])
        kind = outcome[0][0]
        if kind == "auth_ok":  # (a route_ok would send MAIL upstream: not drawn)
            kind = {"broken": "broken-at-route"}.get(outcome[1][0], outcome[1][0])
        if wanted.get(kind):
            wanted[kind] -= 1
            scripts.append((stream, outcome))
    client = (b"EHLO client.test\r\nAUTH PLAIN " + login_plain("alice", "pw").encode()
              + b"\r\nMAIL FROM:<alice@example.org>\r\nQUIT\r\n")
    with open_tmp() as tmp:
        def session(i: int):
            path = str(tmp / f"auth{i}.sock")
            fake = _ScriptedDaemon(path, per_request(scripts[i][0], 3), seed=i)
            try:
                conf = tmp / f"front{i}.conf"
                conf.write_text(f"timeout = 5\nauthSocket = {path}\n")
                return stdio_session([FRONT, "-c", str(conf), "-l", "&2"], client, timeout=20)
            finally:
                fake.close()

        with ThreadPoolExecutor(len(scripts)) as pool:
            results = list(pool.map(session, range(len(scripts))))
    for (stream, outcome), (out, err, _rc) in zip(scripts, results):
        codes = [line[:3] for line in out.decode().split("\r\n") if line[3:4] == " "]
        auth, mail = codes[2], codes[3]
        want_auth = {"auth_ok": "235", "auth_fail": "535", "broken": "454"}[outcome[0][0]]
        if outcome[0][0] == "auth_ok":
            want_mail = {"no_route": "550", "broken": "451"}[outcome[1][0]]
        else:
            want_mail = "530"
        assert (auth, mail) == (want_auth, want_mail), (stream.hex(), outcome, out, err)
        assert b"Traceback" not in err and b"internal error" not in err, err


# ------------------------------------------------ the daemon ⇄ reader worker pipe


class _HostileForks:
    """In place of the fork server: each spawn() gets a "worker" played by
    a thread on the other end of the socketpair (a real process stands in
    for its pid, so that the pool's kill hits something of ours). The
    worker says its pid as the fork server would, then answers one lookup
    with the next of `replies` (bytes), cut in pieces with pauses, and
    leaves (EOF)."""

    def __init__(self, replies: list[bytes], seed: int) -> None:
        import subprocess

        self.replies, self.rng = list(replies), random.Random(seed)
        self.stand_ins: list = []
        self.requests: list[bytes] = []
        self._popen = subprocess.Popen

    def spawn(self, user) -> socket.socket:
        import threading

        ours, theirs = socket.socketpair()
        stand_in = self._popen(["sleep", "30"])
        self.stand_ins.append(stand_in)
        theirs.sendall(struct.pack(">I", stand_in.pid))
        threading.Thread(target=self._worker, args=(theirs,), daemon=True).start()
        ours.setblocking(False)
        return ours

    def _worker(self, sock: socket.socket) -> None:
        from sendooway_auth._reader import REQUEST_FOR

        sock.settimeout(15)
        try:
            kind = sock.recv(1)
            if kind == REQUEST_FOR:
                (size,) = struct.unpack(">H", sock.recv(2, socket.MSG_WAITALL))
                self.requests.append(sock.recv(size, socket.MSG_WAITALL))
            reply = self.replies.pop(0) if kind and self.replies else b""
            for piece in pieces(reply, cuts(self.rng, reply)):
                sock.sendall(piece)
                time.sleep(0.001)
        except OSError:
            pass
        finally:
            sock.close()

    def close(self) -> None:
        for p in self.stand_ins:
            p.kill()
            p.wait()


def _alice(world):
    from sendooway_auth import _users

    return _users.lookup("alice")


def _wire(accounts: list[tuple[list[str], str]], **extra) -> bytes:
    """A worker's answer (routes.to_wire's shape) with these accounts
    (patterns, server)."""
    return msgpack.packb({
        "files": [], "mappings": [], "errors": [], "warnings": [], "ca_file": "", "ca_pem": "",
        "accounts": [[patterns, server, 587, "starttls", True, "", "alice", "up-Secret-4", True,
                      "/home/alice/.sendoowayrc:1", 0] for patterns, server in accounts],
        **extra}, use_bin_type=True)


def _lookup(world, replies: list[bytes], seed: int, sender: str = "alice@example.org"):
    """pool.lookup(alice, sender) against hostile workers: (route server
    or None, temporary failure?, seconds)."""
    forks = _HostileForks(replies, seed)

    async def main():
        pool = WorkerPool(forks)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            found = await pool.lookup(_alice(world), sender, timeout=3)
            account = found.route_for(sender)
            return (account.route.server if account else None, found.incomplete,
                    loop.time() - t0)
        finally:
            pool.close()

    try:
        return asyncio.run(main())
    finally:
        forks.close()


def pipe_reference(replies: list[bytes], sender: str) -> tuple[str | None, bool]:
    """The pool's outcome as _workers' docstring and docs/security.md put
    it: a worker that does not take the request (no ACK) is replaced and
    the lookup asked once more; one that took it and then breaks (EOF, a
    length over MAX_WIRE, a short answer) fails the lookup (temporary); an
    answer is checked like protocol input (here: the accounts' shape) and
    only the account chosen for the sender counts."""
    from sendooway_auth.routes import MAX_WIRE

    for attempt in range(2):
        reply = replies[attempt] if attempt < len(replies) else b""
        if reply[:1] != b"+":
            continue  # gone before it took the request: a fresh one is asked
        if len(reply) < 5:
            return None, True
        (size,) = struct.unpack_from(">I", reply, 1)
        if size > MAX_WIRE or len(reply) - 5 < size:
            return None, True
        try:
            obj = msgpack.unpackb(reply[5:5 + size], raw=False)
            accounts = obj["accounts"]
            assert len(accounts) <= 1  # one sender, one account (the worker chose it)
            assert all(len(a[0]) <= 1000 for a in accounts)  # what routes._cap leaves
            servers = [a[1] for a in accounts if sender in a[0] or "*" in a[0]]
        except Exception:  # noqa: BLE001 - any garbage
            return None, True
        return (servers[0] if servers else None), False
    return None, True


def worker_replies(rng: random.Random) -> list[bytes]:
    good = _wire([(["alice@example.org"], "smtp.example.org")])
    none = _wire([])
    body = rng.choice([good, good, none, b"\xc1", good[:-3], _wire([(["*"], "a.test")] * 2)])
    reply = b"+" + struct.pack(">I", len(body)) + body
    way = rng.randrange(8)
    if way == 1:
        reply = b"-" + reply[1:]  # not an ACK
    elif way == 2:
        reply = reply[:rng.randrange(len(reply))]  # it dies mid-answer
    elif way == 3:
        reply = b"+" + struct.pack(">I", (8 << 20) + 1)  # longer than MAX_WIRE
    elif way == 4:
        reply = b"+" + struct.pack(">I", len(body) + 1) + body  # one octet short, then EOF
    elif way == 5:
        reply = b""  # gone at once
    return [reply, reply if rng.random() < 0.5 else b"+" + struct.pack(">I", len(good)) + good]


@ROOT_ONLY
def test_the_pool_reads_a_workers_answer_as_the_reference_however_it_is_cut(world):
    """Workers answering good, garbage, cut-short, over-long and un-ACKed
    replies in random pieces: the lookup's outcome is the reference's,
    within the time limit, never an exception."""
    rng = random.Random(5)
    problems = []
    good = _wire([(["alice@example.org"], "smtp.example.org")])
    assert good[-1:] == b"\0"  # (the last account's tier)

    def acked(body: bytes) -> bytes:
        return b"+" + struct.pack(">I", len(body)) + body

    edges = [[b"-" + acked(good)[1:]] * 2,  # never an ACK: gone twice
             [acked(good)[:-1], acked(good)],  # dead one octet (a zero) short
             [acked(_wire([(["*"] * 1001, "a.test")]))] * 2,  # more patterns than _cap leaves
             [acked(_wire([(["*"] * 1000, "a.test")]))] * 2]
    for i in range(40 + len(edges)):
        replies = edges[i - 40] if i >= 40 else worker_replies(rng)
        want = pipe_reference(replies, "alice@example.org")
        server, temporary, took = _lookup(world, replies, seed=i)
        if (server, temporary) != want or took > 3.5:
            problems.append(f"{[r[:12].hex() for r in replies]}: got {server, temporary}"
                            f" in {took:.2f}s, want {want}")
    assert not problems, "\n".join(problems[:5])


@ROOT_ONLY
def test_a_worker_cannot_make_the_daemon_match_millions_of_patterns(world):
    """A route lookup names the sender; the worker chooses the one account
    for it (routes cap each at 1000 patterns) and the daemon checks that
    one again. A worker that answers 8 MiB of accounts instead (400
    accounts of 10,000 one-octet patterns: under the wire's limits) had
    the daemon run the choice over all of them on its event loop: 5 s of
    one CPU per route request, every login and route of every user
    waiting meanwhile. Such an answer is not what was asked: a temporary
    failure, found without matching them."""
    from sendooway_auth.routes import MAX_WIRE

    body = _wire([(["a"] * 10000, "a.test")] * 400)
    assert len(body) <= MAX_WIRE
    reply = b"+" + struct.pack(">I", len(body)) + body
    server, temporary, took = _lookup(world, [reply, reply], seed=1, sender="z@example.org")
    assert (server, temporary) == (None, True)
    assert took < 1.0, f"{took:.2f}s on the event loop for one route request"


@ROOT_ONLY
def test_the_fd_authenticator_answers_as_the_reference(world, tmp_config, tmp_path):
    """The socketpair mode (`sendooway-auth --fd N`, one session a process)
    reads frames with the same code but another driver: two sequences in
    random pieces, the answers the reference's."""
    from tests.auth_helpers import fd_authenticator

    password = world.users["alice"].password
    rng = random.Random(3)
    conf = tmp_config(CONF)
    for i, (stream, want) in enumerate(drawn(rng, password, 2)):
        log = str(tmp_path / f"fd{i}.log")
        with fd_authenticator(conf, log) as (proc, sock):
            try:
                for piece in pieces(stream, cuts(rng, stream)):
                    sock.sendall(piece)
                    time.sleep(0.002)
            except (BrokenPipeError, ConnectionResetError):
                pass
            sock.shutdown(socket.SHUT_WR)
            got = seen(_answers(sock, timeout=10))
            assert proc.wait(10) == 0
        assert got == want, stream.hex()
        text = open(log).read()
        assert password not in text and "Traceback" not in text, text
