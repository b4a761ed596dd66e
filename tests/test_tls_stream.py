"""The TLS/stream layer: Stream over real loopback sockets, STARTTLS-style
upgrades, certificate and name checks, context errors."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

import pytest
import trustme

from sendooway_front._stream import ConnectError, Stream, open_tcp
from sendooway_front._tls import (
    TLSConfigError, TLSHandshakeError, TLSVerifyError, client_context, server_context,
)

from .fakeworld import refused_port


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _echo_server(world, host="127.0.0.1", upgrade=True, ctx=None):
    """A line server: 'STARTTLS' upgrades, other lines are echoed upper-cased."""
    ctx = ctx or server_context(world.upstream_cert_file, world.upstream_key_file)
    seen = {}

    async def handle(reader, writer):
        s = Stream(reader, writer, timeout=10)
        seen["nodelay"] = writer.get_extra_info("socket").getsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY)
        buf = b""
        try:
            while True:
                data = await s.read(4096)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line == b"STARTTLS" and upgrade:
                        await s.write(b"GO\n")
                        await s.start_tls_server(ctx)
                        seen["tls"] = s.is_tls
                    else:
                        await s.write(line.upper() + b"\n")
        except Exception as e:  # recorded for the test
            seen["error"] = e
        finally:
            await s.aclose()

    server = await asyncio.start_server(handle, host, 0)
    return server, server.sockets[0].getsockname()[1], seen


async def _readline(s: Stream) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        data = await s.read(1)
        if not data:
            break
        buf += data
    return buf


def test_plain_then_starttls_round_trip(world):
    async def go():
        server, port, seen = await _echo_server(world)
        async with server:
            s = await open_tcp("localhost", port, timeout=5)
            assert s._writer.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await s.write(b"hello\n")
            assert await _readline(s) == b"HELLO\n"
            assert not s.is_tls
            await s.write(b"STARTTLS\n")
            assert await _readline(s) == b"GO\n"
            problems = await s.start_tls_client(client_context(world.ca_file), "localhost")
            assert problems == []
            assert s.is_tls and s.tls_version() in ("TLSv1.2", "TLSv1.3")
            big = os.urandom(300_000).hex().encode()  # crosses many records and raw reads
            await s.write(big + b"\n")
            got = b""
            while not got.endswith(b"\n"):
                got += await s.read(65536)
            assert got == big.upper() + b"\n"
            await s.aclose()
        assert seen.get("tls") is True
        assert seen["nodelay"]
        assert "error" not in seen

    run(go())


def test_ip_address_host_checked_against_san(world):
    async def go():
        server, port, _ = await _echo_server(world)
        async with server:
            s = await open_tcp("127.0.0.1", port, timeout=5)
            await s.write(b"STARTTLS\n")
            await _readline(s)
            assert await s.start_tls_client(client_context(world.ca_file), "127.0.0.1") == []
            await s.aclose()

    run(go())


def test_ipv6_loopback(world):
    async def go():
        server, port, _ = await _echo_server(world, host="::1")
        async with server:
            s = await open_tcp("::1", port, timeout=5)
            assert s.peername[0] == "::1"
            await s.write(b"STARTTLS\n")
            await _readline(s)
            await s.start_tls_client(client_context(world.ca_file), "::1")
            await s.write(b"x\n")
            assert await _readline(s) == b"X\n"
            await s.aclose()

    run(go())


def _other_name_ctx(tmp_path):
    """A server context whose certificate (same world CA? no: own CA) names mail.example."""
    ca = trustme.CA()
    leaf = ca.issue_cert("mail.example")
    cert = tmp_path / "other.crt"
    key = tmp_path / "other.key"
    with open(cert, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(key))
    ca_file = tmp_path / "otherca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server_context(str(cert), str(key)), str(ca_file)


def test_wrong_host_name_refused_and_tolerated_with_no_cert_check(world, tmp_path):
    ctx, other_ca = _other_name_ctx(tmp_path)

    async def attempt(client_ctx, check=True):
        server, port, _ = await _echo_server(world, ctx=ctx)
        async with server:
            s = await open_tcp("127.0.0.1", port, timeout=5)
            await s.write(b"STARTTLS\n")
            await _readline(s)
            try:
                return await s.start_tls_client(client_ctx, "localhost", check_hostname=check)
            finally:
                await s.aclose()

    # right CA, wrong name: refused with the name in the reason
    with pytest.raises(TLSVerifyError, match="localhost"):
        run(attempt(client_context(other_ca)))
    # unknown CA (the world's CA did not sign it): refused
    with pytest.raises(TLSVerifyError, match="certificate"):
        run(attempt(client_context(world.ca_file)))
    # system store does not know a trustme CA either
    with pytest.raises(TLSVerifyError):
        run(attempt(client_context("")))
    # noCertCheck: both problems reported, the session goes on
    problems = run(attempt(client_context(world.ca_file, verify=False)))
    assert any("localhost" in p for p in problems)
    assert any("depth" in p for p in problems)


def test_server_stream_with_python_ssl_client(world):
    """Interop: the standard library's client against our server side."""
    async def go():
        server, port, seen = await _echo_server(world)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"STARTTLS\n")
            assert await reader.readline() == b"GO\n"
            await writer.start_tls(world.ssl_context(), server_hostname="localhost")
            writer.write(b"abc\n")
            assert await reader.readline() == b"ABC\n"
            writer.close()
        assert seen["tls"]

    run(go())


def test_tls12_only_client_accepted_and_weak_refused(world):
    async def go(max_version, ciphers=None):
        server, port, _ = await _echo_server(world)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"STARTTLS\n")
            await reader.readline()
            c = world.ssl_context()
            c.minimum_version = ssl.TLSVersion.TLSv1_2
            c.maximum_version = max_version
            if ciphers:
                c.set_ciphers(ciphers)
            try:
                await writer.start_tls(c, server_hostname="localhost")
                writer.write(b"q\n")
                return await reader.readline()
            finally:
                writer.close()

    assert run(go(ssl.TLSVersion.TLSv1_2)) == b"Q\n"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        run(go(ssl.TLSVersion.TLSv1_2, "AES128-SHA"))  # no forward secrecy: refused


def test_handshake_with_a_plain_peer_fails_cleanly(world):
    async def go():
        async def handle(reader, writer):
            writer.write(b"220 not tls at all\r\n" * 3)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            s = await open_tcp("127.0.0.1", server.sockets[0].getsockname()[1], timeout=5)
            try:
                await s.start_tls_client(client_context(world.ca_file), "localhost")
            finally:
                await s.aclose()

    with pytest.raises(TLSHandshakeError):
        run(go())


def test_read_timeout(world):
    async def go():
        async def handle(reader, writer):
            await asyncio.sleep(5)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            s = await open_tcp("127.0.0.1", server.sockets[0].getsockname()[1], timeout=0.2)
            try:
                await s.read(10)
            finally:
                s.abort()

    with pytest.raises(TimeoutError):
        run(go())


def test_connect_tries_every_address_and_reports_each():
    # a port refused on both loopbacks: localhost resolves to 127.0.0.1 (and ::1 when present)
    with refused_port() as port, pytest.raises(ConnectError) as exc:
        run(open_tcp("localhost", port, timeout=2))
    assert f"127.0.0.1:{port}" in str(exc.value)
    with pytest.raises(ConnectError):
        run(open_tcp("no-such-host.invalid", 25, timeout=2))


def test_server_context_errors(world, tmp_path):
    with pytest.raises(TLSConfigError, match="missing.crt"):
        server_context(str(tmp_path / "missing.crt"), world.upstream_key_file)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match="junk.pem"):
        server_context(str(junk), world.upstream_key_file)
    with pytest.raises(TLSConfigError, match="junk.pem"):
        server_context(world.upstream_cert_file, str(junk))
    other = trustme.CA().issue_cert("localhost")
    other_key = tmp_path / "other.key"
    other.private_key_pem.write_to_path(str(other_key))
    with pytest.raises(TLSConfigError, match="does not match"):
        server_context(world.upstream_cert_file, str(other_key))
    with pytest.raises(TLSConfigError, match="cannot load CA"):
        client_context(str(junk))
    assert server_context(world.cert_file, world.key_file) is not None


def test_from_fds_pipe_pair(world):
    """inetd-style: read on one pipe, write on another."""
    async def go():
        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        s = await Stream.from_fds(r_in, w_out, timeout=5)
        os.write(w_in, b"ping")
        assert await s.read(10) == b"ping"
        await s.write(b"pong")
        assert os.read(r_out, 10) == b"pong"
        os.close(w_in)
        assert await s.read(10) == b""
        await s.aclose()
        for fd in (r_in, r_out, w_out):
            os.close(fd)

    run(go())


def test_from_fds_same_socket_upgrades_to_tls(world):
    """inetd with a socket on fd 0 and fd 1 (two descriptors, one socket): TLS works."""
    async def go():
        a, b = socket.socketpair()
        fd2 = os.dup(a.fileno())
        s = await Stream.from_fds(a.fileno(), fd2, timeout=5)
        peer = await Stream.from_socket(b, timeout=5)
        ctx = server_context(world.upstream_cert_file, world.upstream_key_file)
        await asyncio.gather(s.start_tls_server(ctx),
                             peer.start_tls_client(client_context(world.ca_file), "localhost"))
        await peer.write(b"secret bytes")
        assert await s.read(100) == b"secret bytes"
        await peer.aclose()
        assert await s.read(100) == b""
        await s.aclose()
        a.close()
        os.close(fd2)

    run(go())


_DUAL_SCRIPT = r"""
import asyncio, socket, sys
from sendooway_front._stream import ConnectError, open_tcp
from tests.fakeworld import refused_port

async def main():
    async def handle(r, w):
        w.close()
    results = []
    for host in ("127.0.0.1", "::1"):
        server = await asyncio.start_server(handle, host, 0)
        port = server.sockets[0].getsockname()[1]
        s = await open_tcp("dual.test", port, timeout=3)
        results.append(s.peername[0])
        s.abort()
        server.close()
    # (a port merely closed could be taken by another test meanwhile)
    with refused_port() as port:
        try:
            await open_tcp("dual.test", port, timeout=3)   # nothing listens
        except ConnectError as e:
            results.append(str(e))
    print(results)

asyncio.run(main())
"""


def test_connect_tries_ipv6_and_ipv4_addresses_of_one_name(world, tmp_path):
    """A name with an IPv6 and an IPv4 address (nss_wrapper hosts file): the
    one that listens is found either way; a failure names both."""
    import subprocess
    import sys

    hosts = tmp_path / "hosts"
    hosts.write_text("::1 dual.test\n127.0.0.1 dual.test\n")
    env = world.env()
    env["NSS_WRAPPER_HOSTS"] = str(hosts)
    r = subprocess.run([sys.executable, "-c", _DUAL_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=30, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    import ast

    v4, v6, failure = ast.literal_eval(r.stdout.strip())
    assert (v4, v6) == ("127.0.0.1", "::1")
    assert "[::1]:" in failure and "127.0.0.1:" in failure


_BLACKHOLE_SCRIPT = r"""
import asyncio, socket, time
from sendooway_front import _stream
from tests.fakeworld import bound_on_both

async def main():
    _stream.CONNECT_TRY = 0.5
    v4, hole = bound_on_both("127.0.0.1", "::1")  # (a parallel test may hold one of them)
    port = hole.getsockname()[1]
    hole.listen(0)
    fillers = []
    for _ in range(4):   # fill the accept queue: later SYNs are dropped, connect() hangs
        f = socket.socket(socket.AF_INET6)
        f.setblocking(False)
        try:
            f.connect(("::1", port))
        except BlockingIOError:
            pass
        fillers.append(f)
    time.sleep(0.2)
    server = await asyncio.start_server(lambda r, w: w.close(), sock=v4)
    t0 = time.monotonic()
    s = await _stream.open_tcp("dual.test", port, timeout=30)
    print(repr((s.peername[0], round(time.monotonic() - t0, 1))))
    s.abort()

asyncio.run(main())
"""


def test_a_black_holed_address_costs_one_short_try(world, tmp_path):
    import ast
    import subprocess
    import sys

    hosts = tmp_path / "hosts"
    hosts.write_text("::1 dual.test\n127.0.0.1 dual.test\n")
    env = world.env()
    env["NSS_WRAPPER_HOSTS"] = str(hosts)
    r = subprocess.run([sys.executable, "-c", _BLACKHOLE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=30, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    peer, took = ast.literal_eval(r.stdout.strip())
    assert peer == "127.0.0.1"
    assert 0.4 <= took < 3  # 0.5 s on the hole (it did hang), not the 30 s timeout


def test_client_contexts_are_reused_until_the_ca_file_changes(world, tmp_path):
    import asyncio
    import shutil

    from sendooway_front._tls import cached_client_context, client_context_for

    def for_file(path, verify):
        return asyncio.run(client_context_for(path, verify))

    ca = tmp_path / "ca.pem"
    shutil.copy(world.ca_file, ca)
    a = for_file(str(ca), True)
    assert for_file(str(ca), True) is a
    assert for_file(str(ca), False) is not a  # noCertCheck never shares a context
    assert cached_client_context("", True) is cached_client_context("", True)
    other = trustme.CA()
    other.cert_pem.write_to_path(str(ca))  # rotated: a new context with the new CA
    b = for_file(str(ca), True)
    assert b is not a
    os.unlink(ca)
    with pytest.raises(TLSConfigError):
        for_file(str(ca), True)
    with pytest.raises(ValueError):  # the blocking cache takes no file: a caller's bug
        cached_client_context(str(ca), True)


def test_the_admins_ca_file_is_never_evicted_by_files_users_name(world, tmp_path, monkeypatch):
    """The CA contexts kept are bounded by a PEM budget, but the config's
    sslCA is pinned: a user naming CA files of their own used to evict it,
    and every global route then paid a reparse (~8 ms for a 1 MiB bundle)."""
    import asyncio

    from sendooway_front import _tls

    def for_file(path, verify):
        return asyncio.run(_tls.client_context_for(path, verify))

    monkeypatch.setattr(_tls, "_file_contexts", type(_tls._file_contexts)())
    monkeypatch.setattr(_tls, "_pinned_file", "")
    users = []
    for i in range(4):
        path = tmp_path / f"user{i}.pem"
        trustme.CA().cert_pem.write_to_path(str(path))
        users.append(str(path))
    admin = str(tmp_path / "admin.pem")
    trustme.CA().cert_pem.write_to_path(admin)
    monkeypatch.setattr(_tls, "CA_CACHE_BUDGET", 2 * os.path.getsize(users[0]))
    _tls.pin_ca_file(admin)
    kept = for_file(admin, True)
    mine = [for_file(u, True) for u in users]
    assert for_file(admin, True) is kept  # not parsed again
    assert for_file(users[-1], True) is mine[-1]
    assert for_file(users[0], True) is not mine[0]  # the budget still holds


def test_certificates_passed_in_verify_like_their_file(world, tmp_path):
    """A user's own sslCA arrives as PEM text (read by the authenticator as
    the user): it verifies what its file would, a foreign CA refuses, and
    contexts and sessions are keyed by the certificates, not the name."""
    from sendooway_front._tls import ca_identity, cached_client_context

    pem = open(world.ca_file).read()

    async def attempt(client_ctx):
        server, port, _ = await _echo_server(world)
        async with server:
            s = await open_tcp("127.0.0.1", port, timeout=5)
            await s.write(b"STARTTLS\n")
            await _readline(s)
            try:
                return await s.start_tls_client(client_ctx, "localhost")
            finally:
                await s.aclose()

    assert run(attempt(client_context("/home/u/ca.pem", ca_pem=pem))) == []
    foreign = trustme.CA().cert_pem.bytes().decode()
    with pytest.raises(TLSVerifyError):
        run(attempt(client_context("/home/u/ca.pem", ca_pem=foreign)))
    with pytest.raises(TLSConfigError, match="/home/u/ca.pem"):
        client_context("/home/u/ca.pem", ca_pem="-----BEGIN CERTIFICATE-----\nnope\n")
    a = cached_client_context("/home/u/ca.pem", True, pem)
    assert cached_client_context("/elsewhere.pem", True, pem) is a  # same certificates
    assert cached_client_context("/home/u/ca.pem", True, foreign) is not a
    assert ca_identity("/home/u/ca.pem", pem) != ca_identity("/home/u/ca.pem", foreign)
    assert ca_identity("/etc/ca.pem") == "/etc/ca.pem"


def test_the_read_deadline_moves_with_each_read_and_real_cancellation_wins():
    """One lazy timer per stream: a read that waits longer than `timeout`
    fails with TimeoutError, reads that each finish in time never do however
    long they take in all, a cancel from outside stays a cancel, and a closed
    stream lets go of its timer."""

    async def go():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        # (timeouts 0.6 s and 1.2 s, was 0.3 s and 0.6 s: a loaded machine
        # that wakes the loop late gave the data 0.2 s and 0.15 s of room)
        s = await Stream.from_socket(a, timeout=0.6)
        peer_r, peer_w = await asyncio.open_connection(sock=b)
        # twelve reads of data that comes every 0.1 s: 1.2 s in all, no timeout
        t0 = loop.time()
        for i in range(12):
            loop.call_later(0.1, peer_w.write, b"x")
            assert await s.read(10) == b"x"
        assert loop.time() - t0 > 1.0
        # nothing comes: TimeoutError after about 0.6 s
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await s.read(10)
        assert 0.55 < loop.time() - t0 < 2.5
        # the stream still works after a timeout
        peer_w.write(b"y")
        assert await s.read(10) == b"y"
        # a longer timeout set in between is honoured
        s.timeout = 1.2
        loop.call_later(0.9, peer_w.write, b"z")
        assert await s.read(10) == b"z"
        # a cancel from outside is a CancelledError, not a timeout
        task = asyncio.ensure_future(s.read(10))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await s.aclose()
        assert s._timer is None
        peer_w.close()

    run(go())
