"""The stream's read timer and upstream TLS session resumption under
faults found by a review (each test failed before its fix): memory held by
the session cache, servers that break on resumption, peers that dribble
bytes, a timeout during cleanup after a cancel."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import pytest
from OpenSSL import SSL

from sendooway_front import _tls
from sendooway_front._stream import Stream
from sendooway_front._upstream import UpstreamError, open_upstream
from sendooway_shared.config import Config
from sendooway_shared.types import Route, TlsMode


def run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _mini_upstream(ctx: SSL.Context):
    """An implicit-TLS SMTP server on loopback (our own Stream, a given
    pyOpenSSL server context): 220, then 250 to anything, 221 to QUIT."""

    async def handle(reader, writer):
        s = Stream(reader, writer, timeout=10)
        try:
            await s.start_tls_server(ctx)
            await s.write(b"220 mini\r\n")
            buf = b""
            while data := await s.read(4096):
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip().upper() == b"QUIT":
                        await s.write(b"221 bye\r\n")
                        return
                    await s.write(b"250 ok\r\n")
        except Exception:
            pass
        finally:
            await s.aclose()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _server_ctx(world) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(world.upstream_cert_file)
    ctx.use_privatekey_file(world.upstream_key_file)
    return ctx


async def _connect_n(route: Route, n: int) -> list:
    cfg = Config(localname="relay.test", timeout=5, smarthostCache=0)
    log = logging.getLogger("review-test")
    results = []
    for _ in range(n):
        try:
            client = await open_upstream(route, cfg, "relay.test", log)
        except UpstreamError as e:
            results.append(f"454: {e}")
            continue
        results.append("resumed" if client.stream.tls_resumed else "full")
        await client.quit()
    return results


# ------------------------------------------------------------ TLS resumption

def test_sessions_do_not_pin_every_replaced_system_store_context(world, monkeypatch):
    """Memory. The session cache is keyed by the SSL.Context object, and
    cached_client_context makes a new system-store context every
    SYSTEM_STORE_TTL (300 s). Each new context gives the same server and
    port a new key, so the old entry stays (up to MAX_SESSIONS = 256) and
    keeps its old context alive: ~0.9 MiB each (the system CA bundle), so
    ~230 MiB after 256 x 300 s (21 h) of traffic to one upstream. Here
    the TTL is 0 (every connection a new era): one server:port must not
    keep more than a couple of sessions/contexts."""
    _tls.forget_sessions()
    monkeypatch.setattr(_tls, "SYSTEM_STORE_TTL", 0.0)

    async def go():
        server, port = await _mini_upstream(_server_ctx(world))
        try:
            # ca_file "" = the system store; noCertCheck since the test CA is not in it
            route = Route(server="localhost", port=port, tls=TlsMode.TLS, ca_file="",
                          cert_check=False, auth=False)
            results = await _connect_n(route, 12)
        finally:
            server.close()
        return results

    results = run(go())
    assert all(r in ("full", "resumed") for r in results), results
    pinned = {id(x) for key, value in _tls._sessions.items() for x in (*key, *value)
              if isinstance(x, SSL.Context)}
    assert len(_tls._sessions) <= 2 and len(pinned) <= 2, (
        f"{len(_tls._sessions)} sessions kept for one server:port, pinning "
        f"{len(pinned)} client contexts (~0.9 MiB each)")
    _tls.forget_sessions()


def test_a_session_whose_resumption_breaks_the_handshake_is_not_offered_again(world):
    """Availability. An upstream that asks for a client certificate without
    a session id context (OpenSSL: 'session id context uninitialized')
    answers any resumption attempt with a fatal alert. The connection that
    finds out reconnects at once without resumption, and that server is
    never offered a session again: every message goes through."""
    _tls.forget_sessions()
    ctx = _server_ctx(world)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)  # asks for a client cert; no set_session_id

    async def go():
        server, port = await _mini_upstream(ctx)
        try:
            route = Route(server="localhost", port=port, tls=TlsMode.TLS, ca_file=world.ca_file,
                          auth=False)
            return await _connect_n(route, 5)
        finally:
            server.close()

    results = run(go())
    assert not [r for r in results if r.startswith("454")], results
    _tls.forget_sessions()


# ------------------------------------------------------------ the stream timer

def _client_hello_and_record(world) -> tuple[bytes, "ssl.SSLObject", ssl.MemoryBIO, ssl.MemoryBIO]:
    ctx = ssl.create_default_context(cafile=world.ca_file)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read(), obj, incoming, outgoing


@pytest.mark.parametrize("phase", ["handshake", "read"])
def test_a_tls_peer_dribbling_bytes_cannot_stretch_the_timeout(world, phase):
    """Hang / slowloris. `timeout` is meant to bound a handshake and a read
    (and the driver bounds a whole command line). Under TLS one handshake
    or one read() makes several raw reads until a record is complete, and
    every raw read starts a fresh `timeout`: a peer that sends one byte of
    an incomplete record every (timeout - e) seconds holds the session for
    as long as it likes (a ClientHello of ~500 bytes at 299 s a byte: days).
    Seen on the real frontend too (timeout = 2: a STARTTLS client dribbling
    its ClientHello or a command record is still connected after 9 s).
    Here timeout = 0.5 s and a byte every 0.3 s: it must end by ~1 s."""

    async def go():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        s = await Stream.from_socket(a, timeout=0.5)
        peer_r, peer_w = await asyncio.open_connection(sock=b)
        server_ctx = _tls.server_context(world.upstream_cert_file, world.upstream_key_file)
        hello, obj, incoming, outgoing = _client_hello_and_record(world)
        if phase == "handshake":
            record = hello
            started = loop.time()
            op = s.start_tls_server(server_ctx)
        else:
            # a complete handshake first (the client side driven by hand)
            async def client_side():
                peer_w.write(hello)
                while True:
                    incoming.write(await peer_r.read(65536))
                    try:
                        obj.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        peer_w.write(outgoing.read())
                peer_w.write(outgoing.read())
            await asyncio.gather(s.start_tls_server(server_ctx), client_side())
            obj.write(b"NOOP\r\n")
            record = outgoing.read()
            started = loop.time()
            op = s.read(4096)

        async def dribble():
            for byte in record[:12]:  # never the whole record
                peer_w.write(bytes([byte]))
                await asyncio.sleep(0.3)
            await asyncio.sleep(3600)

        dribbler = asyncio.ensure_future(dribble())
        try:
            with pytest.raises((TimeoutError, _tls.TLSError)):
                await asyncio.wait_for(op, 6)
            took = loop.time() - started
        finally:
            dribbler.cancel()
            await s.aclose()
            peer_w.close()
        return took

    took = run(go())
    assert took < 1.5, f"{phase}: timeout 0.5 s, held {took:.2f} s by a byte every 0.3 s"


def test_a_stream_timeout_during_cleanup_after_a_cancel_is_a_timeout(world):
    """Wrong exception. After SIGTERM's cancel (serve_listening, after the
    grace) the session task cleans up in `finally` (SessionRunner._finish ->
    relay.close -> RSET/QUIT upstream, bounded by the stream's timeout). If
    that read expires, _wait's `task.uncancel() == 0` test sees the earlier
    (handled) cancel still counted and raises CancelledError instead of
    TimeoutError: Relay._release (which catches TimeoutError) then neither
    aborts nor QUITs the upstream connection (left open: 'unclosed
    transport'), and _finish skips link.close() and the client's aclose().
    (asyncio.timeout on 3.11 has the same flaw; 3.12 compares with the
    cancelling() count at entry.) The expired read must give TimeoutError."""

    async def go():
        a, b = socket.socketpair()
        s = await Stream.from_socket(a, timeout=0.2)
        _peer_r, peer_w = await asyncio.open_connection(sock=b)
        seen = {}

        async def session():
            try:
                await asyncio.sleep(30)
            finally:  # cleanup after the cancel, as SessionRunner._finish does
                try:
                    await s.read(10)
                except TimeoutError:
                    seen["cleanup"] = "TimeoutError"
                except asyncio.CancelledError:
                    seen["cleanup"] = "CancelledError"

        task = asyncio.ensure_future(session())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await s.aclose()
        peer_w.close()
        return seen

    assert run(go()) == {"cleanup": "TimeoutError"}
