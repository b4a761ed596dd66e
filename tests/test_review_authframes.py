"""Differential review of the frames between the frontend and the
authenticator, and of the authenticator's pipes to its reader workers.

(docstring completed at the end of the review)
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
    out = b""
    while True:
        try:
            chunk = await loop.sock_recv(ours, 65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    ours.close()
    return FrameDecoder(REPLIES).feed(out)


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
    for _ in range(70):
        stream = sequence(rng, password)
        want = reference(stream, password)
        splits = [[], cuts(rng, stream), cuts(rng, stream)]
        if len(stream) < 120 and rng.random() < 0.2:
            splits.append(range(len(stream)))
        for where in splits:
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
    """Every frame the daemon sends until it closes."""
    sock.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return FrameDecoder(REPLIES).feed(out)


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
    for _ in range(12):
        stream = sequence(rng, password)
        want = reference(stream, password)
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
