"""docs/deployment.md section 7 with a real HAProxy (Debian's package) in
front of `sendooway -b`: TCP mode, `send-proxy-v2`, HAProxy connecting from
its own address (127.0.0.2, listed in proxyProtocol), clients from
127.0.0.3. The client's address must reach the authenticator's fail2ban line
and Received:, and an SMTP health check (`option smtpchk`) must see the
server up: HAProxy sends its checks the header too (v2 LOCAL)."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess

import pytest

from .auth_helpers import Daemon
from .fakeworld import free_port
from .front_util import Frontend, _listener_is, front_config, open_tmp, wait_port
from .test_front_proxy_e2e import FAIL2BAN, wait_for
from .upstream import FakeUpstream

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
BALANCER, CLIENT = "127.0.0.2", "127.0.0.3"

HAPROXY_DEFAULTS = """\
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""
HAPROXY_CFG = """\
global
    stats socket {stats} mode 600 level admin
""" + HAPROXY_DEFAULTS + """\
frontend submission
    bind 127.0.0.1:{port}
    default_backend sendooway
backend sendooway
    option smtpchk EHLO haproxy.test
    timeout check 5s
    server mx1 127.0.0.1:{backend} source {balancer} send-proxy-v2 check inter 300ms
"""


def server_status(stats: str) -> str:
    """mx1's status (UP, DOWN, ...) from HAProxy's stats socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(stats)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("svname") == "mx1":
            return row.get("status", "")
    return ""


@pytest.fixture(scope="module")
def deployment(world):
    if not os.access(HAPROXY, os.X_OK):
        pytest.fail("haproxy is missing: scripts/setup.sh installs it")
    with open_tmp() as tmp:
        up = FakeUpstream(world, tls="plain").start()
        config = front_config(tmp, world, f"proxyProtocol = {BALANCER}\n"
                                           f"smarthostMapping = direct:* 127.0.0.1 {up.port} noAuth\n")
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log")).start()  # (its own port)
        stats = os.path.join(str(tmp), "haproxy.stats")
        cfg = os.path.join(str(tmp), "haproxy.cfg")
        for attempt in range(4):
            # free_port()'s pick may be taken before HAProxy binds it: another
            port = free_port()
            with open(cfg, "w") as f:
                f.write(HAPROXY_CFG.format(stats=stats, port=port, backend=front.port,
                                           balancer=BALANCER))
            proc = subprocess.Popen([HAPROXY, "-db", "-f", cfg], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                wait_port("127.0.0.1", port, proc)
                if _listener_is(proc, port):
                    break
                proc.wait(15)  # another process's listener: HAProxy cannot bind
                raise RuntimeError("taken")
            except (RuntimeError, subprocess.TimeoutExpired):
                if proc.poll() is None:
                    proc.kill()
                out = proc.communicate(timeout=10)[0].decode(errors="replace")
                if attempt == 3 or "cannot bind socket" not in out:
                    front.stop()
                    daemon.stop()
                    up.stop()
                    raise RuntimeError(f"haproxy did not start: {out}") from None
        try:
            yield {"port": port, "stats": stats, "up": up, "daemon": daemon, "front": front,
                   "haproxy": proc}
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            front.stop()
            daemon.stop()
            up.stop()


def client(dep) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", dep["port"], local_hostname="client.test", timeout=20,
                        source_address=(CLIENT, 0))


def test_smtp_health_check_sees_the_server_up(deployment):
    """HAProxy sends its checks a v2 LOCAL header: they keep the balancer's
    address, get the greeting and the EHLO answer smtpchk wants."""
    # (without `timeout check`, a whole check - connect, greeting, EHLO -
    # had `inter`, 300 ms: a loaded machine failed three in a row, mx1 DOWN)
    wait_for(lambda: server_status(deployment["stats"]) == "UP", "HAProxy to mark mx1 UP",
             timeout=30)
    log = deployment["front"].log()
    assert re.search(rf"client={re.escape(BALANCER)}:\d+: connect \(PROXY v2 LOCAL: the"
                     r" balancer's own connection\)", log), log[-2000:]


def test_the_clients_address_reaches_fail2ban_and_received(deployment, world):
    dep = deployment
    with client(dep) as s:
        s.starttls()
        s.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("carol", "not-carols-password")
    wait_for(lambda: FAIL2BAN.search(dep["daemon"].log()), "the auth failed line")
    assert [m.group("host") for m in FAIL2BAN.finditer(dep["daemon"].log())][-1] == CLIENT
    with client(dep) as s:
        s.starttls()
        s.ehlo()
        s.login("alice", world.users["alice"].password)
        s.sendmail("alice@example.org", ["friend@example.net"],
                   b"Subject: through haproxy\r\n\r\nhello\r\n")
    [m] = dep["up"].messages[-1:]
    assert m.data.startswith(b"Received: from client.test ([" + CLIENT.encode() + b"])"), m.data[:120]
    log = dep["front"].log()
    assert re.search(rf"client={re.escape(CLIENT)}:\d+: connect via {re.escape(BALANCER)}:\d+"
                     r" \(PROXY v2 TCP4\)", log), log[-2000:]
    assert "not-carols-password" not in log + dep["daemon"].log()
