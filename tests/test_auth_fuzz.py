"""Random frame sequences against a real Connection (real PAM through
pam_wrapper, real reader fork server), in-process: whatever arrives, routes
are only ever answered after a login on the same connection, errors close
the connection, and nothing escapes as an exception."""

import asyncio
import logging
import os
import socket
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from sendooway_auth._connection import Connection
from sendooway_auth._pam import PamPool
from sendooway_auth._penalty import Penalty
from sendooway_auth._reader import ForkServer
from sendooway_auth._service import AuthService
from sendooway_auth._workers import WorkerPool
from sendooway_shared.config import parse_config
from sendooway_shared.protocol import VERSION, encode, Hello, AuthRequest, RouteRequest
from sendooway_shared.types import Secret
from tests.auth_helpers import replies_until_closed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the reader switches users")


@pytest.fixture(scope="module")
def service(world):
    cfg = parse_config("maxAuthFailures = 2\n"
                       "smarthostMapping = direct:* relay.example.org 587 u r-Secret-9 tls\n",
                       "fuzz.conf")
    forks = ForkServer(cfg).start()
    pool = PamPool("sendooway", threads=2)
    # a worker table per service: each example runs its own event loop
    yield lambda: AuthService(cfg, pool, WorkerPool(forks), Penalty(base=0))
    pool.shutdown()
    forks.stop()


def _frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def frames(world):
    good = world.users["alice"].password
    hello = encode(Hello(VERSION, "s", "192.0.2.1"))
    login = encode(AuthRequest("alice", Secret(good)))
    valid = st.sampled_from([
        hello,
        encode(Hello(VERSION + 1, "s", "192.0.2.1")),
        login, login,
        encode(AuthRequest("alice", Secret("wrong-Pw-zz"))),
        encode(AuthRequest("nosuch", Secret("x"))),
        encode(RouteRequest("alice@example.org")),
        encode(RouteRequest("alice@example.org")),
        encode(RouteRequest("")),
    ])
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=20),
                        st.binary(max_size=10))
    maps = st.dictionaries(st.sampled_from(["type", "user", "password", "sender", "version",
                                            "session", "client", "x"]), scalars, max_size=5)
    junk = st.one_of(maps.map(_frame), st.binary(min_size=1, max_size=40),
                     st.builds(lambda t, m: _frame({**m, "type": t}),
                               st.sampled_from(["hello", "auth", "route", "welcome", "auth_ok"]), maps))
    # mostly a proper start, so that the later states get explored too
    opening = st.sampled_from([[hello], [hello, login], [hello, login], [hello, login], []])
    # one frame in six is junk (one junk frame ends the connection, so more
    # would leave the later states unexplored)
    frame = st.integers(0, 5).flatmap(lambda i: junk if i == 0 else valid)
    body = st.lists(frame, min_size=1, max_size=8)
    return st.builds(lambda a, b: a + b, opening, body).filter(bool)


async def _exchange(make_service, blobs, split):
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    service = make_service()
    conn = Connection(service, reader, writer, "fuzz")
    task = asyncio.ensure_future(conn.run())
    loop = asyncio.get_running_loop()
    ours.setblocking(False)
    data = b"".join(blobs)
    try:
        for i in range(0, len(data), split):
            await loop.sock_sendall(ours, data[i:i + split])
    except (BrokenPipeError, ConnectionResetError):
        pass
    ours.shutdown(socket.SHUT_WR)
    try:
        await asyncio.wait_for(task, 10)
    finally:
        service.readers.close()
    replies = await replies_until_closed(ours)
    ours.close()
    return replies


def test_random_frames_keep_the_rules(world, service, caplog):
    seen: set = set()
    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(frames(world), st.integers(1, 64))
    def run(blobs, split):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sendooway-auth"):
            replies = asyncio.run(_exchange(service, blobs, split))
        kinds = [r.TYPE for r in replies]
        seen.update(kinds)
        assert kinds.count("auth_ok") <= 1
        assert kinds.count("auth_fail") <= 2  # maxAuthFailures
        if "route_ok" in kinds or "no_route" in kinds:
            first_route = min(i for i, k in enumerate(kinds) if k in ("route_ok", "no_route"))
            assert "auth_ok" in kinds[:first_route]
        if "error" in kinds:
            assert kinds.index("error") == len(kinds) - 1  # nothing after an error
        if kinds:
            assert kinds[0] in ("welcome", "error")
        text = caplog.text
        assert "Traceback" not in text and "r-Secret-9" not in text
        assert world.users["alice"].password not in text

    # explicit cases, so every answer is seen whatever the random draw
    good = world.users["alice"].password
    hello = encode(Hello(VERSION, "s", "192.0.2.1"))
    run = example([hello, encode(AuthRequest("alice", Secret("wrong-Pw-zz"))),
                   encode(AuthRequest("alice", Secret(good))),
                   encode(RouteRequest("alice@example.org"))], 7)(run)
    run = example([hello, encode(RouteRequest("x@y.z"))], 64)(run)
    run()
    # the generator reaches every answer, so the checks above had work to do
    assert {"welcome", "auth_ok", "auth_fail", "route_ok", "error"} <= seen, seen
