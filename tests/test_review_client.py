"""The frontend against a hostile or badly behaved SMTP client: findings of
an adversarial review. Each test is one defect and failed against the code
as reviewed, for the reason its docstring gives (each is fixed).

Real `sendooway -b` and `sendooway-auth` processes on loopback where the
operating system is part of the defect (sockets, buffers); the sans-IO
session core (tests/front_harness.py) where a sequence of commands is the
whole point."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest

from sendooway_front._session import SessionSettings

from .auth_helpers import Daemon
from .front_harness import LOGIN_ALICE, Harness, codes
from .front_util import Frontend, front_config, open_tmp

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")

TIMEOUT = 2  # the frontend's `timeout`, short so that write timeouts come quickly


@pytest.fixture
def fe(world):
    if os.geteuid() != 0:
        pytest.skip("the frontend drops to nobody: needs root")
    with open_tmp() as tmp:
        config = front_config(tmp, world)
        with open(config) as f:
            text = f.read().replace("timeout = 30\n", f"timeout = {TIMEOUT}\n")
        with open(config, "w") as f:
            f.write(text)
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            yield front
        finally:
            front.stop()
            daemon.stop()


def _frontend_sockets_to(pid: int, client_port: int) -> list[str]:
    """The frontend's (pid's) TCP connections whose peer is our client port
    (as `ss` shows them: state, Recv-Q, Send-Q, addresses, owner)."""
    out = subprocess.run(["ss", "-Htanp", f"( dport = :{client_port} )"],
                         capture_output=True, text=True, timeout=10).stdout
    return [line for line in out.splitlines() if f"pid={pid}," in line]


def _wait_log(fe: Frontend, pattern: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, fe.log())
        if m:
            return m.group(0)
        time.sleep(0.1)
    return None


# ------------------------------------------------------------ a client that never reads


def test_socket_of_a_client_that_never_reads_is_released_when_its_session_ends():
    """A client that pipelines commands and never reads its replies (a
    small receive buffer, then it just sits there with a zero TCP window)
    is cut off by the session: a write times out, or the error limit
    closes it with 421. But the socket was never released:
    `Stream.aclose()` calls `writer.close()` and gives `wait_closed()` 2 s;
    an asyncio transport that still holds unsent data does not close until
    that data has been written, which never happens while the peer keeps
    answering the kernel's zero-window probes. The frontend kept the
    descriptor and its buffers for as long as the client liked, after the
    session was over, outside the session cap (which exists so that the -b
    process never runs out of descriptors): repeated, one connection at a
    time, up to EMFILE. (Found against a real `sendooway -b` with 40,000
    pipelined EHLOs; since the junk limit ends such a flood after 120
    replies, the socket-level condition is reproduced here on the Stream
    itself: real sockets, a peer that never reads.)

    Expected: aclose() leaves no socket behind: when wait_closed() gives
    up, the transport is aborted."""
    import asyncio

    from sendooway_front._stream import Stream

    async def go():
        accepted = asyncio.get_running_loop().create_future()

        async def on_client(reader, writer):
            accepted.set_result((reader, writer))

        server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect(("127.0.0.1", port))   # and never reads
        reader, writer = await accepted
        stream = Stream(reader, writer, timeout=2)
        sock = writer.get_extra_info("socket")
        for _ in range(200):  # until writes wait: the kernel's buffers full, then asyncio's
            writer.write(b"250-x" * 50000 + b"\r\n")
            await asyncio.sleep(0.01)
            if writer.transport.get_write_buffer_size() > 0:
                break
        assert writer.transport.get_write_buffer_size() > 0
        started = asyncio.get_running_loop().time()
        await stream.aclose()
        took = asyncio.get_running_loop().time() - started
        await asyncio.sleep(0.1)  # an aborted transport closes its socket on the next turn
        released = sock.fileno() == -1
        writer.transport.abort()  # (clean up when it was not)
        peer.close()
        server.close()
        return released, took

    released, took = asyncio.run(asyncio.wait_for(go(), 30))
    assert released, "aclose() returned with the socket still open"
    assert took < 4


# ------------------------------------------------------------ the junk-command limit


_JUNK_LOOPS = {
    # an idle session kept alive with EHLO (or HELO) instead of NOOP
    "EHLO": (b"EHLO client.test\r\n" * 1000, None),
    "HELO": (b"HELO client.test\r\n" * 1000, None),
    # STARTTLS where it is not offered (no certificate, -S, forbidden): 454, free
    "STARTTLS not offered": (b"EHLO client.test\r\n" + b"STARTTLS\r\n" * 1000,
                             SessionSettings("mx.test", tls_available=False)),
    # DATA without an accepted recipient: 554, not an error point, not junk
    "DATA without recipients": (LOGIN_ALICE + b"MAIL FROM:<alice@example.org>\r\n"
                                + b"DATA\r\n" * 1000, None),
    # a MAIL the upstream accepts, abandoned with EHLO instead of RSET: each
    # one costs a route lookup, an upstream MAIL and an upstream RSET
    "MAIL abandoned by EHLO": (LOGIN_ALICE + (b"MAIL FROM:<alice@example.org>\r\n"
                                              b"EHLO client.test\r\n") * 500, None),
    # (found while fixing the above) RCPT past the 100-recipient cap: 452, free;
    # since a second review, 1000 RCPTs a transaction are (a message to 250
    # recipients is no junk), then each costs a point
    "RCPT past the cap": (LOGIN_ALICE + b"MAIL FROM:<alice@example.org>\r\n"
                          + b"RCPT TO:<bob@example.net>\r\n" * 1200, None),
}


@pytest.mark.parametrize("loop", list(_JUNK_LOOPS))
def test_junk_limit_cannot_be_sidestepped_with_other_harmless_commands(loop):
    """The junk-command limit (dcc0f5f; docs/decisions/frontend.md "Junk",
    docs/security.md) promises that "a client cannot keep a session, its
    process and its slot forever with a NOOP every few minutes, nor loop
    over unroutable senders": past 100 NOOP/RSET/VRFY/HELP (or refused
    MAILs) without a delivered message, each one earns an error point and
    the 20th point closes with 421.

    `_session._JUNK_VERBS` lists only NOOP, RSET, VRFY and HELP, and
    `_ERROR_CODES` leaves out 454 and 554, so other commands that move
    nothing forward are still free of charge for ever: EHLO and HELO (250
    each time), STARTTLS where it is not offered (454 4.7.0), DATA with no
    accepted recipient (554 5.5.1), and a MAIL the upstream accepted that
    is abandoned with EHLO instead of RSET (RSET would count; EHLO ends the
    transaction just the same and costs the authenticator a route lookup
    and the upstream a MAIL and an RSET each time). A client sending one of
    these every `timeout` - 1 seconds holds its session, its authenticator
    connection and its slot of the -b process (one of at most 4000)
    forever, exactly what the limit was added to prevent. (Exim's
    smtp_accept_max_nonmail counts HELO/EHLO among its non-mail commands
    for this reason.)

    Expected: 1000 such commands in a row end the session with 421 like
    1000 NOOPs do: count EHLO/HELO, refused STARTTLS and refused DATA as
    junk (Session._handle_line / _JUNK_VERBS, _ERROR_CODES in
    sendooway_front/_session.py), and an abandoned transaction like a
    refused MAIL."""
    data, settings = _JUNK_LOOPS[loop]
    h = Harness(settings) if settings is not None else Harness()
    replies = codes(h.feed(data))
    assert h.closed is not None and replies[-1] == 421, (
        f"{len(replies)} replies {sorted(set(replies))}, session still open")
    assert h.closed.reason == "too many errors"
