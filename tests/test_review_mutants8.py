"""Mutation review of the frontend's I/O layer (`_stream.py`, `_driver.py`):
each test kills a hand-made mutant the rest of the suite let live. Real
sockets on loopback (socketpairs), real pyOpenSSL TLS with the world's
certificates, timeouts patched down."""

from __future__ import annotations

import asyncio
import socket

import pytest
from OpenSSL import SSL

from sendooway_front._stream import Stream


def run(coro, timeout: float = 15):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _pair(timeout: float | None):
    """A Stream on one end of a socketpair, asyncio streams on the other."""
    a, b = socket.socketpair()
    s = await Stream.from_socket(a, timeout=timeout)
    peer_r, peer_w = await asyncio.open_connection(sock=b)
    return s, peer_r, peer_w


def test_a_second_read_times_out_too():
    """After one read timed out, the next read that waits too long times out
    as well, and interrupt() still works: the timer's record of the task it
    expired is cleared (`_wait` resets `_expired`), else every later wait of
    that stream, a pooled upstream's probe included, waits for ever."""

    async def go():
        loop = asyncio.get_running_loop()
        s, _r, peer_w = await _pair(0.15)
        for _ in range(2):
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await s.read(10)
            assert loop.time() - t0 < 1.5
        s.timeout = 30
        loop.call_later(0.1, s.interrupt)
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await s.read(10)
        assert loop.time() - t0 < 1.5
        await s.aclose()
        peer_w.close()

    run(go())


def test_two_interrupts_in_one_tick_are_one_timeout():
    """interrupt() twice before the waiting task runs (request_stop racing
    itself, or the read deadline) cancels once: the read ends in
    TimeoutError, not in a CancelledError that kills the session's task
    without its 421 (`interrupt` checks `_expired` first)."""

    async def go():
        loop = asyncio.get_running_loop()
        s, _r, peer_w = await _pair(30)

        def twice():
            s.interrupt()
            s.interrupt()

        loop.call_later(0.05, twice)
        with pytest.raises(TimeoutError):
            await s.read(10)
        await s.aclose()
        peer_w.close()

    run(go())


def test_abort_lets_go_of_the_read_timer():
    """abort() stops the stream's lazy timer, as aclose() does: a cancelled
    handle no longer keeps the stream (and its buffers) alive until a
    deadline minutes away."""

    async def go():
        s, _r, peer_w = await _pair(300)
        peer_w.write(b"x")
        assert await s.read(10) == b"x"
        assert s._timer is not None
        s.abort()
        assert s._timer is None
        peer_w.close()

    run(go())


async def _tls_pair(world, timeout: float = 10):
    """Two of our Streams over a socketpair, in TLS: (server, client)."""
    from sendooway_front._tls import client_context, server_context

    a, b = socket.socketpair()
    s = await Stream.from_socket(a, timeout=timeout)
    c = await Stream.from_socket(b, timeout=timeout)
    ctx = server_context(world.upstream_cert_file, world.upstream_key_file)
    await asyncio.gather(s.start_tls_server(ctx),
                         c.start_tls_client(client_context(world.ca_file), "localhost"))
    return s, c


async def _client_end(c: Stream) -> str:
    """How the TLS client saw the end: close_notify or a bare EOF."""
    while await c.read():
        pass
    return "close_notify" if c._conn.get_shutdown() & SSL.RECEIVED_SHUTDOWN else "bare EOF"


@pytest.mark.parametrize("how", ["shutdown_write", "aclose"])
def test_the_tls_end_is_a_close_notify(world, how):
    """shutdown_write() (the lingering close after a 421) and aclose() end
    the TLS stream with close_notify before the FIN: a client that tells a
    truncation from an end (RFC 8446 6.1) reads a clean end, not an attack."""

    async def go():
        s, c = await _tls_pair(world)
        if how == "shutdown_write":
            await s.shutdown_write()
        else:
            await s.aclose()
        assert await _client_end(c) == "close_notify"
        await c.aclose()
        await s.aclose()

    run(go())


def test_tls_guards_unread_and_a_second_handshake(world):
    """unread() is refused once TLS runs (octets given back would skip the
    decryption), and a second start_tls on a TLS stream is refused rather
    than run over the first."""

    async def go():
        from sendooway_front._tls import server_context

        s, c = await _tls_pair(world)
        with pytest.raises(RuntimeError):
            s.unread(b"x")
        with pytest.raises(RuntimeError):
            await s.start_tls_server(server_context(world.upstream_cert_file,
                                                    world.upstream_key_file))
        await c.aclose()
        await s.aclose()

    run(go())


async def _session(monkeypatch, timeout: float, tls_context=None, relay=None,
                   implicit_tls=False, **config):
    """A SessionRunner on one end of a socketpair (authenticator and relay
    stand-ins as in test_front_driver); returns (task, reader, writer,
    relay), the runner as task.runner."""
    from sendooway_front import _driver
    from sendooway_shared.config import Config

    from .test_front_driver import FakeConnector, RecordingRelay

    relay = relay or RecordingRelay()
    monkeypatch.setattr(_driver, "make_relay", lambda cfg, log: relay)
    fe = _driver.Frontend(Config(timeout=timeout, **config), tls_context=tls_context,
                          implicit_tls=implicit_tls, connector=FakeConnector(), hostname="mx.test")
    a, b = socket.socketpair()
    stream = await Stream.from_socket(a, 10)
    runner = _driver.SessionRunner(fe, stream, "192.0.2.1:4242")
    task = asyncio.ensure_future(runner.run())
    task.runner = runner
    reader, writer = await asyncio.open_connection(sock=b)
    return task, reader, writer, relay


async def _until(reader, marker: bytes) -> bytes:
    buf = b""
    while marker not in buf:
        data = await reader.read(4096)
        assert data, buf
        buf += data
    return buf


def test_after_a_timeout_421_the_client_sees_the_end_at_once(monkeypatch):
    """The 421 of a client timeout is followed at once by a half-close (FIN)
    while the lingering close still reads (shutdown_write): the client sees
    the end without waiting out LINGER; one that then closes ends the
    session at once, one that never closes holds it LINGER seconds at most."""

    from sendooway_front import _driver

    # LINGER 3 s instead of 1 s: "at once" (< 1.5 s) still tells the FIN
    # from one sent after LINGER, with room for a loaded machine's stall
    # (the bound was 0.6 s against 1 s; a stall of 0.5 s made it fail)
    monkeypatch.setattr(_driver, "LINGER", 3.0)

    async def go():
        loop = asyncio.get_running_loop()
        for closes in (True, False):
            task, reader, writer, _ = await _session(monkeypatch, 0.3)
            writer.write(b"EHLO c.test\r\n")
            await _until(reader, b"250 ")
            assert b"421 " in await _until(reader, b"421 ")
            t0 = loop.time()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert loop.time() - t0 < 1.5  # not LINGER (3 s) later
            if closes:
                writer.close()
                await asyncio.wait_for(task, 10)
                assert loop.time() - t0 < 1.5
            else:
                await asyncio.wait_for(task, 10)
                assert loop.time() - t0 < 4.5  # LINGER, and not much more
                writer.close()

    run(go())


def test_a_refused_message_may_take_longer_than_timeout_to_end(monkeypatch):
    """In DATA each read is bounded by `timeout`, the whole message is not,
    also for a message already refused (too big) that is only read to its
    end, which gives the session no event to note progress by: a client
    sending the rest in pieces, each well within `timeout`, hears the 552,
    not a 421, though that took several times `timeout`."""
    from .test_front_driver import LOGIN, TXN

    async def go():
        # timeout 1 s, a piece every 0.2 s (each read has 0.8 s to spare on a
        # loaded machine: with 0.4 s it had 0.2 s, and a stall gave a 421),
        # 3 s for the rest: still three times `timeout` for the whole
        task, reader, writer, relay = await _session(monkeypatch, 1.0, extMessageSize=100)
        writer.write(LOGIN + TXN)
        await _until(reader, b"354 ")
        writer.write(b"x" * 200 + b"\r\n")  # over extMessageSize: refused from here
        for _ in range(15):
            await asyncio.sleep(0.2)
            writer.write(b"words\r\n")
        writer.write(b".\r\nQUIT\r\n")
        out = await asyncio.wait_for(reader.read(), 5)
        assert out.startswith(b"552 ") and b"421 " not in out, out
        assert relay.calls.count("data_abort") == 1
        writer.close()
        await asyncio.wait_for(task, 5)

    run(go())


def test_a_client_silent_after_starttls_is_timed_out(monkeypatch, world):
    """The STARTTLS handshake is bounded by `timeout`: a client that reads
    the 220 and then sends nothing does not hold its session for ever."""
    from sendooway_front._tls import server_context

    async def go():
        ctx = server_context(world.cert_file, world.key_file)
        task, reader, writer, _ = await _session(monkeypatch, 0.3, tls_context=ctx)
        writer.write(b"EHLO c.test\r\nSTARTTLS\r\n")
        await _until(reader, b"220 2.0.0")
        await asyncio.wait_for(task, 3)
        writer.close()

    run(go())


def test_a_peer_that_reads_nothing_makes_a_big_write_time_out():
    """Flow control: past WRITE_BUFFER_HIGH unsent octets a write waits for
    the peer, bounded by `timeout`: a client that takes no replies costs a
    TimeoutError, not an ever-growing buffer or a wait for ever."""

    async def go():
        s, _r, peer_w = await _pair(0.3)
        peer_w.transport.pause_reading()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(s.write(b"x" * (8 << 20)), 3)
        assert loop.time() - t0 < 2  # the stream's timeout, not the test's
        s.abort()
        peer_w.close()

    run(go())


def test_decrypted_octets_left_unread_count_as_said(world):
    """said_something() (a kept connection the peer spoke on while idle)
    also sees plaintext OpenSSL decrypted but nobody read yet."""

    async def go():
        s, c = await _tls_pair(world)
        await c.write(b"421 4.4.2 idle too long\r\n")
        assert await s.read(5) == b"421 4"
        assert s.said_something()
        await c.aclose()
        await s.aclose()

    run(go())


@pytest.mark.parametrize("how", ["aclose", "abort"])
def test_a_closed_stream_reads_the_end(how):
    """After aclose() or abort() a read gives b"" (the end), not input that
    still lay in the buffer: nothing is taken from a connection we left."""

    async def go():
        s, _r, peer_w = await _pair(5)
        peer_w.write(b"late words\r\n")
        await peer_w.drain()
        await asyncio.sleep(0.05)  # (in the stream's buffer now)
        if how == "aclose":
            await s.aclose()
        else:
            s.abort()
        assert await s.read(100) == b""
        peer_w.close()

    run(go())


def test_nested_bounded_reads_keep_the_outer_deadline(world):
    """bounded() around many TLS reads (a whole SMTP reply) keeps ONE
    deadline: the reads inside, bounded themselves, neither move it nor
    drop it, so a peer sending a line a byte at a time, each byte in time,
    still runs out of `timeout` for the whole."""

    async def go():
        loop = asyncio.get_running_loop()
        s, c = await _tls_pair(world)
        # (0.4 s from here on: the handshake itself is not under test, and
        # on a loaded machine may take longer)
        s.timeout = c.timeout = 0.4

        async def dribble():
            for b in b"250 slowly\r\n":
                await asyncio.sleep(0.1)
                await c.write(bytes([b]))

        async def whole_line():
            buf = b""
            while not buf.endswith(b"\r\n"):
                buf += await s.read(100)
            return buf

        sender = asyncio.ensure_future(dribble())
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await s.bounded(whole_line())
        assert loop.time() - t0 < 1.0
        sender.cancel()
        await c.aclose()
        await s.aclose()

    run(go())


def test_a_tls_peer_leaving_without_close_notify_is_the_end(world):
    """A TLS peer that closes its socket without close_notify (most SMTP
    clients after QUIT) gives the end of the stream, b"", not an error."""

    async def go():
        s, c = await _tls_pair(world)
        c.abort()
        assert await s.read(100) == b""
        await s.aclose()

    run(go())


def test_lf_lines_of_a_pipe_are_read_as_crlf():
    """stdio mode on a pipe or terminal (`echo ... | sendooway`): the
    stream's lf_lines turns bare LF into CRLF, also across two reads of one
    CRLF and at the start of a read, and leaves a bare CR bare."""
    import os

    from sendooway_front._stream import LfAsCrlf

    lf = LfAsCrlf()
    assert lf.feed(b"abc\r") + lf.feed(b"\ndef\n") == b"abc\r\ndef\r\n"
    assert LfAsCrlf().feed(b"\nx\ry") == b"\r\nx\ry"

    async def go():
        rfd, wfd = os.pipe()
        rfd2, wfd2 = os.pipe()
        s = await Stream.from_fds(rfd, wfd2, 5)
        s.lf_lines = LfAsCrlf()
        os.write(wfd, b"EHLO pipe\nQUIT\n")
        os.close(wfd)
        got = b""
        while data := await s.read(100):
            got += data
        assert got == b"EHLO pipe\r\nQUIT\r\n"
        await s.aclose()
        for fd in (rfd, rfd2, wfd2):
            os.close(fd)

    run(go())


def test_handshake_failure_reasons_for_the_log():
    """The log line of a failed handshake: a timeout says so (its text is
    empty), and only octets that are no TLS record at all (any record type,
    an alert too, or an SSLv2 hello) are called plaintext."""
    from sendooway_front._driver import Frontend, _failure, _not_tls
    from sendooway_shared.config import Config

    fe = Frontend(Config(timeout=7), hostname="mx.test")
    assert _failure(TimeoutError(), fe) == "timed out (no answer within 7s)"
    assert _failure(OSError("boom"), fe) == "boom"
    err = OSError("wrong version number")
    for record in (b"\x15\x03\x03\x00\x02", b"\x16\x03\x01\x02\x00", b"\x80\x2e\x01"):
        assert _not_tls(err, record) == ""
    assert "plaintext ('EHLO')" in _not_tls(err, b"EHLO client\r\n")
    assert "sent nothing" in _not_tls(TimeoutError(), b"")


def test_a_failed_handshake_leaves_the_stream_plain(world):
    """A handshake that failed (the peer closed or reset in the middle, or
    the server's name did not match) leaves no half-made TLS behind: is_tls is
    False again, so no close_notify or log line claims a TLS session."""
    from sendooway_front._tls import TLSHandshakeError, TLSVerifyError, client_context, server_context

    async def go():
        s, peer_r, peer_w = await _pair(5)
        peer_w.write(b"\x16\x03\x01")  # the start of a ClientHello, then the end
        peer_w.close()
        with pytest.raises(TLSHandshakeError):
            await s.start_tls_server(server_context(world.upstream_cert_file,
                                                    world.upstream_key_file))
        assert not s.is_tls
        await s.aclose()

        a, b = socket.socketpair()
        srv = await Stream.from_socket(a, timeout=5)
        cli = await Stream.from_socket(b, timeout=5)
        ctx = server_context(world.upstream_cert_file, world.upstream_key_file)
        server = asyncio.ensure_future(srv.start_tls_server(ctx))
        with pytest.raises(TLSVerifyError):
            await cli.start_tls_client(client_context(world.ca_file), "not-this.example")
        assert not cli.is_tls
        await cli.aclose()
        await asyncio.gather(server, return_exceptions=True)
        await srv.aclose()

        # the server resets the connection in answer to the ClientHello
        a, b = socket.socketpair()
        cli = await Stream.from_socket(b, timeout=5)
        client = asyncio.ensure_future(cli.start_tls_client(client_context(world.ca_file),
                                                            "localhost"))
        await asyncio.sleep(0.1)
        a.close()  # (its ClientHello unread: a reset)
        with pytest.raises(OSError):
            await client
        assert not cli.is_tls
        await cli.aclose()

    run(go())


def test_a_stop_421s_an_idle_client_at_once_and_lets_a_message_finish(monkeypatch):
    """request_stop(): a client waiting between commands hears "421 4.3.2
    shutting down" at once (not the timeout's 421); one in mid-DATA is not
    interrupted: its message goes upstream whole, its 250 comes, then the
    421."""
    from .test_front_driver import LOGIN, TXN

    async def go():
        loop = asyncio.get_running_loop()
        task, reader, writer, relay = await _session(monkeypatch, 5)
        writer.write(LOGIN)
        await _until(reader, b"235 ")
        t0 = loop.time()
        task.runner.request_stop()
        out = await asyncio.wait_for(reader.read(), 3)
        assert out.startswith(b"421 4.3.2 ") and loop.time() - t0 < 1.5, out
        writer.close()
        await asyncio.wait_for(task, 3)

        task, reader, writer, relay = await _session(monkeypatch, 5)
        writer.write(LOGIN + TXN + b"first part\r\n")
        await _until(reader, b"354 ")
        await asyncio.sleep(0.1)
        task.runner.request_stop()
        await asyncio.sleep(0.1)
        writer.write(b"second part\r\n.\r\n")
        out = await asyncio.wait_for(reader.read(), 3)
        assert out.startswith(b"250 2.0.0 upstream queued\r\n421 4.3.2 "), out
        assert bytes(relay.data) == b"first part\r\nsecond part"
        writer.close()
        await asyncio.wait_for(task, 3)

    run(go())


def test_a_failed_implicit_tls_handshake_gets_no_plaintext_greeting(monkeypatch, world):
    """-s (implicit TLS): a client that speaks plaintext fails the
    handshake and the session ends there; no greeting goes out in clear."""
    from sendooway_front._tls import server_context

    async def go():
        ctx = server_context(world.cert_file, world.key_file)
        task, reader, writer, relay = await _session(monkeypatch, 2, tls_context=ctx,
                                                     implicit_tls=True)
        writer.write(b"EHLO plain.test\r\n")
        out = await asyncio.wait_for(reader.read(), 3)
        assert b"220" not in out
        writer.close()
        await asyncio.wait_for(task, 3)
        assert relay.calls in ([], ["close"])

    run(go())


def test_an_internal_error_in_mid_data_aborts_upstream_and_says_421(monkeypatch):
    """A bug in mid-DATA (here the session raising on the message text):
    the upstream's message is aborted (never completed by a later dot) and
    the client hears 421, not a silent close."""
    from sendooway_front._session import Session

    from .test_front_driver import LOGIN, TXN

    real = Session.receive_data

    def broken(self, data):
        if b"boom" in data:
            raise RuntimeError("a bug")
        return real(self, data)

    async def go():
        task, reader, writer, relay = await _session(monkeypatch, 5)
        writer.write(LOGIN + TXN)
        await _until(reader, b"354 ")
        monkeypatch.setattr(Session, "receive_data", broken)
        writer.write(b"boom\r\n")
        out = await asyncio.wait_for(reader.read(), 3)
        assert out.startswith(b"421 "), out
        assert "data_abort" in relay.calls and "data_end" not in relay.calls
        writer.close()
        await asyncio.wait_for(task, 3)

    run(go())


def test_a_refused_certificate_is_told_to_the_server_by_an_alert(world):
    """A client that refuses the server's chain says so with a TLS alert
    before it gives up (the records OpenSSL made are flushed on failure):
    the server's log shows "unknown ca", not a mere lost connection."""
    import trustme

    from sendooway_front._tls import TLSHandshakeError, TLSVerifyError, client_context, server_context

    async def go():
        a, b = socket.socketpair()
        srv = await Stream.from_socket(a, timeout=5)
        cli = await Stream.from_socket(b, timeout=5)
        ctx = server_context(world.upstream_cert_file, world.upstream_key_file)
        server = asyncio.ensure_future(srv.start_tls_server(ctx))
        other_ca = trustme.CA().cert_pem.bytes().decode()
        with pytest.raises(TLSVerifyError):
            await cli.start_tls_client(client_context(ca_pem=other_ca), "localhost")
        await asyncio.sleep(0.1)
        cli.abort()
        with pytest.raises(TLSHandshakeError, match="unknown ca"):
            await server
        await srv.aclose()

    run(go())


def test_handshake_start_is_the_peers_first_octets(world):
    """handshake_start keeps the first octets of the handshake (what tells a
    plaintext client on the implicit-TLS port from a TLS one), not the last
    piece read before the failure."""
    from sendooway_front._tls import TLSHandshakeError, server_context

    async def go():
        s, _r, peer_w = await _pair(5)
        ctx = server_context(world.upstream_cert_file, world.upstream_key_file)
        handshake = asyncio.ensure_future(s.start_tls_server(ctx))
        peer_w.write(b"\x16\x03\x01")
        await asyncio.sleep(0.1)
        peer_w.write(b"\x00\x04GARBAGE\r\n")
        await asyncio.sleep(0.1)
        peer_w.close()
        with pytest.raises(TLSHandshakeError):
            await handshake
        assert s.handshake_start == b"\x16\x03\x01"
        await s.aclose()

    run(go())


def test_a_cut_session_leaves_its_upstream_at_once(monkeypatch):
    """A session task cancelled (the grace of a stop is over) drops its
    upstream with relay.abort(), no polite RSET/QUIT a silent upstream
    could hold; a message in flight is aborted first."""
    from .test_front_driver import LOGIN, TXN, RecordingRelay

    class AbortingRelay(RecordingRelay):
        def abort(self):
            self.calls.append("abort")

    async def go():
        task, reader, writer, relay = await _session(monkeypatch, 5, relay=AbortingRelay())
        writer.write(LOGIN + TXN + b"half a message\r\n")
        await _until(reader, b"354 ")
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert relay.calls[-3:] == ["data_abort", "abort", "close"], relay.calls
        writer.close()

    run(go())


def test_a_client_that_takes_no_replies_is_dropped(monkeypatch, caplog):
    """A client that sends and sends but reads none of the replies: once a
    write of replies has waited `timeout` the session ends, instead of going
    on with its commands, each write waiting `timeout` again; the session is
    told why, and its closing log line says so."""
    import logging

    from sendooway_front import _stream

    from .test_front_driver import LOGIN

    monkeypatch.setattr(_stream, "WRITE_BUFFER_HIGH", 0)  # (no 256 KiB of replies to fill)
    caplog.set_level(logging.INFO, logger="sendooway")

    async def go():
        loop = asyncio.get_running_loop()
        task, reader, writer, relay = await _session(monkeypatch, 0.3)
        writer.write(LOGIN + b"MAIL FROM:<alice@example.org>\r\n")
        await _until(reader, b"250 2.1.0")
        writer.transport.pause_reading()
        for sock in (task.runner.stream._writer.get_extra_info("socket"),
                     writer.get_extra_info("socket")):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        task.runner.stream._writer.transport.set_write_buffer_limits(high=1024)

        async def flood():  # refused RCPTs: replies, no error points
            for _ in range(15):
                writer.write(b"RCPT TO:<nobody@example.net>\r\n" * 20)
                await writer.drain()

        sender = asyncio.ensure_future(flood())
        t0 = loop.time()
        await asyncio.wait_for(asyncio.shield(task), 5)
        assert loop.time() - t0 < 4
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()

    run(go())
    [closed] = [r.getMessage() for r in caplog.records if ": closed: " in r.getMessage()]
    assert "took no replies" in closed, closed


def test_a_client_that_never_logs_in_hears_why(monkeypatch):
    """LOGIN_WITHIN: a client that keeps sending commands in time but never
    logs in is closed after LOGIN_WITHIN x `timeout` with "No login in
    time", not the idle timeout's 421."""

    async def go():
        loop = asyncio.get_running_loop()
        # timeout 1 s (LOGIN_WITHIN x 1 s = 4 s to the 421); a NOOP every
        # 0.1 s leaves 0.9 s of each `timeout` to a loaded machine's stall
        # (with 0.25 s it left 0.15 s, and a stall gave the idle timeout's 421)
        task, reader, writer, _ = await _session(monkeypatch, 1.0)
        t0 = loop.time()
        out = b""
        while b"421 " not in out and loop.time() - t0 < 12:
            writer.write(b"NOOP\r\n")
            out += await asyncio.wait_for(reader.read(4096), 5)
            await asyncio.sleep(0.1)
        assert b"421 4.4.2 No login in time" in out, out
        writer.close()
        await asyncio.wait_for(task, 3)

    run(go())


def test_a_write_after_the_peer_reset_fails():
    """Once the peer reset the connection, a write raises
    ConnectionResetError instead of vanishing into a closed transport (the
    driver then logs a lost connection rather than replies nobody got)."""

    async def go():
        a, b = socket.socketpair()
        s = await Stream.from_socket(a, timeout=5)
        await s.write(b"unread by the peer\r\n")
        await asyncio.sleep(0.05)
        b.close()  # with our octets unread: a reset
        try:
            await s.read(100)
        except ConnectionError:
            pass
        with pytest.raises(ConnectionResetError):
            await s.write(b"421 too late\r\n")
        s.abort()

    run(go())


@pytest.mark.parametrize("script, level", [(b"", "INFO"), (b"PROXY TCP4 1.2.3.4", "WARNING")])
def test_a_balancers_health_check_is_no_warning(monkeypatch, caplog, script, level):
    """A trusted balancer's plain TCP check (connect, close, no header) is
    logged at INFO; a broken header from it is a WARNING."""
    import logging

    from .test_front_driver import converse
    from .test_front_proxyproto import BALANCER

    caplog.set_level(logging.INFO, "sendooway")
    out, _ = asyncio.run(converse(monkeypatch, script, config=BALANCER, half_close=True))
    assert out == b""
    [line] = [r for r in caplog.records if "PROXY protocol" in r.getMessage()]
    assert line.levelname == level


def test_the_421_survives_input_the_client_sent_behind_it(monkeypatch):
    """Closing on a client that still sends (421 after too many errors,
    with more pipelined input behind): the lingering close reads and drops
    that input, so no reset destroys the 421 before the client read it."""

    async def go():
        task, reader, writer, _ = await _session(monkeypatch, 5)
        writer.write(b"EHLO c.test\r\n" + b"XYZZY\r\n" * 30)
        await writer.drain()
        await asyncio.sleep(0.2)  # (the session closed: it reads no more commands)
        writer.write(b"x" * 65536)
        await asyncio.sleep(0.2)
        out = b""
        try:
            while data := await asyncio.wait_for(reader.read(65536), 3):
                out += data
        except ConnectionError:
            pass
        assert b"421 " in out, out[-200:]
        writer.close()
        await asyncio.wait_for(task, 3)

    run(go())


def test_a_read_deadline_never_cancels_a_task_no_longer_waiting():
    """The lazy timer cancels only a task still waiting on the stream: a
    read that finished in time leaves no deadline behind that later cancels
    its task in the middle of something else (the stream forgets its
    waiter after each wait)."""

    async def go():
        s, _r, peer_w = await _pair(0.1)
        peer_w.write(b"x")
        assert await s.read(10) == b"x"
        await asyncio.sleep(0.4)  # past the deadline of that read: no CancelledError
        await s.aclose()
        peer_w.close()

    run(go())


def test_relay_answers_of_the_wrong_shape_and_failing_cleanups(monkeypatch):
    """The relay's side of a transaction, kept honest: RSET reaches it; a
    group answered with too few replies, or with no list at all, gives each
    RCPT a temporary failure, never a stray 250; a cleanup (RSET) that raises
    is logged and the session goes on. At the end the authenticator link is
    closed and the address limit left."""
    from .test_front_driver import LOGIN, FakeConnector, RecordingRelay, codes, converse

    class OddRelay(RecordingRelay):
        answers = iter([[RecordingRelay._rcpt_reply("a@example.net")], None])

        async def rcpts(self, recipients):
            self.calls.append("rcpts")
            return next(self.answers)

        async def reset(self):
            self.calls.append("reset")
            raise ConnectionResetError("upstream gone at RSET")

    class Limit:
        def __init__(self):
            self.inside = 0
            self.entered = []

        def enter(self, ip):
            self.inside += 1
            self.entered.append(ip)
            return True, ip

        def leave(self, key):
            self.inside -= 1

    group = b"RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\n"
    script = (LOGIN + b"MAIL FROM:<alice@example.org>\r\n" + group + group
              + b"RSET\r\nNOOP\r\nQUIT\r\n")
    connector = FakeConnector()
    limit = Limit()

    from sendooway_front._driver import Frontend

    from . import test_front_driver

    def frontend(*a, **kw):
        fe = Frontend(*a, **kw)
        fe.per_address = limit
        return fe

    monkeypatch.setattr(test_front_driver, "Frontend", frontend)
    out, relay = asyncio.run(converse(monkeypatch, script, relay=OddRelay(), connector=connector))
    assert limit.entered == ["192.0.2.1"]
    assert codes(out) == [220, 250, 235, 250, 451, 451, 451, 451, 250, 250, 221], out
    assert relay.calls.count("reset") == 1
    assert connector.links[0].closed and limit.inside == 0


def test_a_failed_starttls_handshake_ends_the_session(monkeypatch, world):
    """STARTTLS whose handshake fails (the client spoke plaintext after the
    220) ends the session: nothing more is answered, least of all in clear
    to a session that would then count as encrypted."""
    from sendooway_front._tls import server_context

    async def go():
        ctx = server_context(world.cert_file, world.key_file)
        task, reader, writer, relay = await _session(monkeypatch, 2, tls_context=ctx)
        writer.write(b"EHLO c.test\r\nSTARTTLS\r\n")
        await _until(reader, b"220 2.0.0")
        writer.write(b"EHLO plain.test\r\n")
        await asyncio.sleep(0.2)
        try:
            writer.write(b"EHLO again.test\r\n")
        except ConnectionError:
            pass
        try:
            out = await asyncio.wait_for(reader.read(), 3)
        except ConnectionError:
            out = b""
        assert b"250" not in out, out
        await asyncio.wait_for(task, 3)
        writer.close()

    run(go())


def test_a_client_over_its_address_limit_gets_only_the_refusal(monkeypatch):
    """Over the per-address limit a client gets its 421 and the close:
    no authenticator link, no session behind it."""
    from sendooway_front._driver import Frontend

    from . import test_front_driver
    from .test_front_driver import FakeConnector, converse

    class Full:
        def enter(self, ip):
            return False, None

        def leave(self, key):
            pass

    def frontend(*a, **kw):
        fe = Frontend(*a, **kw)
        fe.per_address = Full()
        return fe

    monkeypatch.setattr(test_front_driver, "Frontend", frontend)
    connector = FakeConnector()
    out, _ = asyncio.run(converse(monkeypatch, b"", connector=connector))
    assert out.startswith(b"421 ") and out.count(b"\r\n") == 1, out
    assert connector.links == []
