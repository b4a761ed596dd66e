"""PROXY protocol end to end: the real `sendooway` (-b, -s, stdio on a TCP
socket, systemd socket activation) with the real `sendooway-auth` and an
aiosmtpd upstream. The "balancer" is 127.0.0.2 (proxyProtocol), direct
clients come from 127.0.0.1; the -b frontend listens dual-stack, so it sees
its peers as ::ffff:127.0.0.x (logged as 127.0.0.x)."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from .auth_helpers import Daemon
from .fakeworld import free_port, free_port_everywhere
from .front_util import FRONT, Frontend, front_config, login_plain, open_tmp, wait_port
from .test_front_proxyproto import v2, v2_tcp4, v2_tcp6, TLVS
from .upstream import FakeUpstream

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")

BALANCER = "127.0.0.2"
DIRECT = "127.0.0.1"
# packaging/fail2ban/filter.d/sendooway.conf's failregex; the frontend hands
# the authenticator the bare address, which is what fail2ban's <HOST> takes
FAIL2BAN = re.compile(r"auth failed: user=\S* client=(?P<host>\S+) reason=")


class ProxiedSMTP(smtplib.SMTP):
    """smtplib from `source`, sending `header` before it reads the greeting
    (as a balancer does before relaying the client's bytes)."""

    def __init__(self, port, header=b"", source=BALANCER, **kw):
        self.header = header
        super().__init__("127.0.0.1", port, local_hostname="client.test", timeout=20,
                         source_address=(source, 0), **kw)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self.header)
        return sock


class ProxiedSMTP_SSL(smtplib.SMTP_SSL, ProxiedSMTP):
    """The same before the TLS handshake (-s): SMTP_SSL wraps the socket
    ProxiedSMTP._get_socket returned, after the header went out."""

    def __init__(self, port, header, context, source=BALANCER):
        self.header = header
        smtplib.SMTP_SSL.__init__(self, "127.0.0.1", port, local_hostname="client.test",
                                  timeout=20, source_address=(source, 0), context=context)


def fail2ban_hosts(text: str) -> list[str]:
    return [m.group("host") for m in FAIL2BAN.finditer(text)]


def wait_for(predicate, what: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def raw_connect(port: int, source: str = BALANCER) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))


def read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


class ProxyWorld:
    def __init__(self, world, tmp):
        self.world, self.tmp = world, tmp


@pytest.fixture(scope="module")
def pw(world):
    with open_tmp() as tmp:
        w = ProxyWorld(world, tmp)
        w.up = FakeUpstream(world, tls="plain").start()
        extra = (f"proxyProtocol = 192.0.2.200, {BALANCER}/32 2001:db8:ffff::/48\n"
                 f"smarthostMapping = direct:* 127.0.0.1 {w.up.port} noAuth\n")
        w.config = front_config(tmp, world, extra)
        w.daemon = Daemon(tmp, w.config).start()
        port = free_port_everywhere()  # (bound on both families)
        w.front = Frontend(w.config, os.path.join(str(tmp), "front.log"), bind=str(port),
                           port=port).start()
        w.tls_front = Frontend(w.config, os.path.join(str(tmp), "front-s.log"),
                               args=["-s"]).start()
        try:
            yield w
        finally:
            w.front.stop()
            w.tls_front.stop()
            w.daemon.stop()
            w.up.stop()


@pytest.fixture(autouse=True)
def _clear(pw):
    pw.up.messages.clear()


def _failed_login(s: smtplib.SMTP, user: str = "alice") -> None:
    s.ehlo()
    code, _ = s.docmd("AUTH", "PLAIN " + login_plain(user, "not-the-password"))
    assert code == 535


# ------------------------------------------------------------ trusted balancer


def test_header_address_is_what_the_authenticator_and_fail2ban_see(pw):
    header = b"PROXY TCP4 198.51.100.23 127.0.0.1 40001 587\r\n"
    with ProxiedSMTP(pw.front.port, header) as s:
        s.starttls(context=pw.world.ssl_context())
        _failed_login(s, "bob")
    wait_for(lambda: "198.51.100.23" in pw.daemon.log(), "the auth failed line")
    assert fail2ban_hosts(pw.daemon.log())[-1] == "198.51.100.23"
    assert "client=127.0.0.2" not in pw.daemon.log()
    log = pw.front.log()
    # the dual-stack socket saw ::ffff:127.0.0.2, which matches the IPv4 entry
    # and is logged as the IPv4 address it is
    assert re.search(r"client=198\.51\.100\.23:40001: connect via 127\.0\.0\.2:\d+"
                     r" \(PROXY v1 TCP4\)", log), log
    assert "client=198.51.100.23:40001: STARTTLS" in log
    assert "client=198.51.100.23:40001: login failed: user='bob'" in log
    assert not re.search(r"client=127\.0\.0\.2:\d+: (?!PROXY)", log)


def test_received_header_names_the_ipv6_client_of_a_v2_header(pw):
    header = v2_tcp6("2001:db8:7::23", 50123, "2001:db8::1", 587, tlvs=TLVS)
    with ProxiedSMTP(pw.front.port, header) as s:
        s.starttls(context=pw.world.ssl_context())
        s.ehlo()
        s.login("carol", pw.world.users["carol"].password)
        assert s.sendmail("carol@example.org", ["x@example.net"], b"Subject: t\r\n\r\nhi\r\n") == {}
    assert len(pw.up.messages) == 1
    data = pw.up.messages[0].data
    assert data.startswith(b"Received: from client.test ([IPv6:2001:db8:7::23])\r\n"), data[:200]
    assert b"127.0.0.2" not in data
    assert "auth ok: user=carol" in pw.daemon.log()
    assert "client=[2001:db8:7::23]:50123 user=carol: login: mechanism=PLAIN" in pw.front.log()


def test_v1_ipv6_header(pw):
    header = b"PROXY TCP6 2001:db8:7::24 2001:db8::1 40002 587\r\n"
    with ProxiedSMTP(pw.front.port, header) as s:
        _failed_login(s, "dave")
    wait_for(lambda: "2001:db8:7::24" in pw.daemon.log(), "the auth failed line")
    assert "2001:db8:7::24" in fail2ban_hosts(pw.daemon.log())


def test_commands_right_behind_the_header_are_kept(pw):
    """Header and EHLO in one segment: the EHLO belongs to SMTP and is answered
    after the greeting."""
    with raw_connect(pw.front.port) as c:
        c.sendall(v2_tcp4("198.51.100.25", 40003) + b"EHLO client.test\r\nQUIT\r\n")
        out = read_until_closed(c)
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"220 ") and b"250-" in out and out.endswith(b"221 2.0.0 Bye\r\n")
    assert "client=198.51.100.25:40003: connect" in pw.front.log()


def test_health_checks_keep_the_balancers_address(pw):
    for header, kind in ((v2(0, 0x00), "v2 LOCAL"), (b"PROXY UNKNOWN\r\n", "v1 UNKNOWN")):
        with ProxiedSMTP(pw.front.port, header) as s:
            assert s.noop()[0] == 250
        assert re.search(rf"client=127\.0\.0\.2:\d+: connect \(PROXY {kind}: the"
                         r" balancer's own connection\)", pw.front.log())


@pytest.mark.parametrize("sent, reason", [
    (b"EHLO client.test\r\n", "not a PROXY protocol header"),
    (b"PROXY TCP4 198.51.100.26 127.0.0.1 1 2\n", "bare LF"),
    (b"PROXY TCP4 198.51.100.999 127.0.0.1 1 2\r\n", "not an IPv4 address"),
    (v2(1, 0x11, bytes(12), version=1), "version 1, not 2"),
    (v2(1, 0x11, length=4000), "more than"),
    (b"PROXY TCP4 198.51.100.26 127.0.0.1 1", "truncated"),  # then EOF
    (b"", "connection closed before a PROXY header"),
])
def test_trusted_peer_without_a_valid_header_gets_no_greeting(pw, sent, reason):
    before = pw.front.log()
    with raw_connect(pw.front.port) as c:
        c.sendall(sent)
        try:
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the frontend already closed on the first bytes
        assert read_until_closed(c) == b""
    wait_for(lambda: reason in pw.front.log()[len(before):], "the log line")
    new = pw.front.log()[len(before):].splitlines()
    assert len(new) == 1, new
    assert re.search(r"client=127\.0\.0\.2:\d+: PROXY protocol from a trusted"
                     r" balancer: .*; closing without a greeting", new[0]), new


def test_slow_or_trickled_header_is_cut_at_timeout(pw):
    config = front_config(pw.tmp, pw.world, f"proxyProtocol = {BALANCER}\ntimeout = 2\n",
                          name="slow.conf")
    fe = Frontend(config, os.path.join(str(pw.tmp), "slow.log")).start()
    try:
        with raw_connect(fe.port) as c:
            c.sendall(b"PROXY TCP4 198.51")
            assert read_until_closed(c) == b""
        header = b"PROXY TCP4 198.51.100.27 127.0.0.1 40004 587\r\n"
        with raw_connect(fe.port) as c:
            start = time.monotonic()
            c.settimeout(0.4)
            closed = False
            for i in range(len(header)):  # one byte every 0.4 s: never a whole header in 2 s
                try:
                    c.sendall(header[i:i + 1])
                    assert c.recv(100) == b"", "the frontend answered a trickled header"
                    closed = True
                    break
                except socket.timeout:
                    continue
                except OSError:
                    closed = True
                    break
            assert closed and time.monotonic() - start < 6
        wait_for(lambda: fe.log().count("no complete header within 2s") == 2, "two timeouts")
        assert not re.search(r"client=(127\.0\.0\.2|198\.51\.100\.27):\d+: connect", fe.log())
    finally:
        fe.stop()


# ------------------------------------------------------------ untrusted peers


@pytest.mark.parametrize("header", [b"PROXY TCP4 198.51.100.28 127.0.0.1 40005 587\r\n",
                                    v2_tcp4("198.51.100.28", 40005)])
def test_untrusted_peer_cannot_forge_its_address(pw, header):
    with raw_connect(pw.front.port, source=DIRECT) as c:
        f = c.makefile("rb")
        assert f.readline().startswith(b"220 ")  # greeted at once: nobody waits for a header
        c.sendall(header + b"\r\nNOOP\r\n")
        replies = []
        while not (line := f.readline()).startswith(b"250 "):
            assert line, replies
            replies.append(line)
        assert replies and all(r[:1] == b"5" for r in replies), replies  # command errors
        c.sendall(b"EHLO client.test\r\nAUTH PLAIN " + login_plain("carol", "wrong").encode()
                  + b"\r\nQUIT\r\n")
        rest = read_until_closed(c)
        assert b"535 " in rest
    wait_for(lambda: "user=carol client=127.0.0.1" in pw.daemon.log(), "the auth failed line")
    assert "198.51.100.28" not in pw.daemon.log() + pw.front.log()
    assert fail2ban_hosts(pw.daemon.log())[-1] == "127.0.0.1"
    assert "::ffff:" not in pw.front.log()


# ------------------------------------------------------------ implicit TLS (-s)


def test_implicit_tls_reads_the_header_before_the_handshake(pw):
    header = v2_tcp4("198.51.100.29", 40006, tlvs=TLVS)
    with ProxiedSMTP_SSL(pw.tls_front.port, header, context=pw.world.ssl_context()) as s:
        _failed_login(s, "alice")
        s.login("alice", pw.world.users["alice"].password)
    wait_for(lambda: "198.51.100.29" in pw.daemon.log(), "the auth failed line")
    assert "198.51.100.29" in fail2ban_hosts(pw.daemon.log())
    assert "client=198.51.100.29:40006 user=alice: login: mechanism=PLAIN" in pw.tls_front.log()


def test_implicit_tls_client_hello_in_the_headers_segment(pw):
    """The ClientHello arrives with the header in one send: it is kept for
    the handshake."""
    ctx = pw.world.ssl_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with raw_connect(pw.tls_front.port) as c:

        def pump():
            if outgoing.pending:
                c.sendall(outgoing.read())
            data = c.recv(65536)
            assert data, "closed by the frontend"
            incoming.write(data)

        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        c.sendall(b"PROXY TCP4 198.51.100.30 127.0.0.1 40007 465\r\n" + outgoing.read())
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            try:
                greeting += tls.read(1024)
            except ssl.SSLWantReadError:
                pump()
        assert greeting.startswith(b"220 ")
    wait_for(lambda: "client=198.51.100.30:40007: connect" in pw.tls_front.log(), "connect")


# ------------------------------------------------------------ inetd and systemd modes


def _session_through_balancer(port: int, log_of, daemon_log, ip: str) -> None:
    with ProxiedSMTP(port, f"PROXY TCP4 {ip} 127.0.0.1 40010 587\r\n".encode()) as s:
        _failed_login(s, "dave")
    wait_for(lambda: ip in daemon_log(), "the auth failed line")
    assert ip in fail2ban_hosts(daemon_log())
    wait_for(lambda: f"client={ip}:40010: connect via 127.0.0.2:" in log_of(), "connect")


def test_stdio_on_a_tcp_socket(pw):
    """inetd/xinetd: fd 0 and 1 are the accepted TCP socket."""
    log = os.path.join(str(pw.tmp), "stdio.log")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = raw_connect(port)
        conn, _addr = listener.accept()
    proc = subprocess.Popen([FRONT, "-c", pw.config, "-l", log], stdin=conn, stdout=conn,
                            stderr=subprocess.PIPE)
    conn.close()
    try:
        with client:
            client.sendall(b"PROXY TCP4 198.51.100.31 127.0.0.1 40011 25\r\n")
            f = client.makefile("rb")
            assert f.readline().startswith(b"220 ")
            client.sendall(b"EHLO client.test\r\nAUTH PLAIN "
                           + login_plain("dave", "wrong").encode() + b"\r\nQUIT\r\n")
            assert b"535 " in read_until_closed(client)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    wait_for(lambda: "198.51.100.31" in pw.daemon.log(), "the auth failed line")
    with open(log) as f:
        assert "client=198.51.100.31:40011: connect via 127.0.0.2:" in f.read()


@pytest.mark.parametrize("mode", ["accept-yes", "accept-no", "inetd"])
def test_socket_activation(pw, mode):
    if not shutil.which("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate not installed")
    port = free_port()
    flags = {"accept-yes": ["-a"], "accept-no": [], "inetd": ["-a", "--inetd"]}[mode]
    log = os.path.join(str(pw.tmp), f"activate-{mode}.log")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", *flags, FRONT, "-c", pw.config,
         "-l", log], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ip = {"accept-yes": "198.51.100.32", "accept-no": "198.51.100.33", "inetd": "198.51.100.34"}[mode]
    try:
        wait_port("127.0.0.1", port, proc)
        # (wait_port's probe comes from 127.0.0.1: served as a direct client)
        _session_through_balancer(port, lambda: open(log).read() if os.path.exists(log) else "",
                                  pw.daemon.log, ip)
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()
