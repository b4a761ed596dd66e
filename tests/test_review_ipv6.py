"""Review from a mail admin's seat on a dual-stack or IPv6-only server:
clients and upstreams over IPv6 and everything that depends on addresses
(logs, the authenticator's backoff keys, fail2ban, the shipped xinetd
blocks). Real processes only: a `sendooway-auth` daemon, `sendooway -b
[::1]:PORT`, xinetd, aiosmtpd upstreams on loopback, smtplib as the client,
host names from an nss_wrapper hosts file. Each test failed on the code as
reviewed, for the reason its docstring gives."""

from __future__ import annotations

import os
import smtplib
import socket
import time

import pytest

from tests.auth_helpers import Daemon
from tests.fakeworld import MACHINE_SKIP, free_port
from tests.front_util import Frontend, front_config, open_tmp
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_v6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason=MACHINE_SKIP + "no ::1 (IPv6 loopback)")
BODY = b"Subject: ipv6 review\r\n\r\nhello\r\n"


def _wait(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class V6World:
    """A daemon, `sendooway -b [::1]:PORT` and upstreams, one config."""


@pytest.fixture(scope="module")
def v6(world):
    if not _has_ipv6_loopback():
        pytest.skip(MACHINE_SKIP + "no ::1 (IPv6 loopback)")
    with open_tmp() as tmp:
        w = V6World()
        w.world = world
        # dual.test resolves to ::1 first, then 127.0.0.1; the upstream
        # listens on 127.0.0.1 only, and [::1] on its port refuses
        w.up4 = FakeUpstream(world, tls="plain").start()
        w.v6_refuser = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        w.v6_refuser.bind(("::1", w.up4.port))  # bound, never listening: refused
        hosts = tmp / "hosts"
        hosts.write_text("::1 dual.test\n127.0.0.1 dual.test\n")
        os.chmod(hosts, 0o644)
        extra = (f"sslCA = {world.ca_file}\naddReceivedField = yes\n"
                 f"smarthostMapping = direct:*@dual.example dual.test {w.up4.port} noAuth\n")
        w.config = front_config(tmp, world, extra)
        env = world.env()
        env["NSS_WRAPPER_HOSTS"] = str(hosts)
        w.daemon = Daemon(tmp, w.config, env=env).start()
        w.front = Frontend(w.config, str(tmp / "front.log"), host="::1", env=env).start()
        try:
            yield w
        finally:
            w.front.stop()
            w.daemon.stop()
            w.up4.stop()
            w.v6_refuser.close()


def _session(v6) -> smtplib.SMTP:
    s = v6.front.smtp(timeout=20)
    s.starttls(context=v6.world.ssl_context())
    s.ehlo()
    s.login("alice", v6.world.users["alice"].password)
    return s


def test_an_upstream_address_that_failed_before_the_one_that_answered_is_logged(v6):
    """DEFECT (rule: docs/decisions/relay.md "every address getaddrinfo
    returns (IPv6 and IPv4 ...) one after the other"; an admin needs to see
    a broken IPv6 path to the smarthost: a black-holed address costs every
    new upstream connection 10 s). The smarthost's name resolves to ::1 and
    127.0.0.1; [::1] refuses, 127.0.0.1 takes the message. The fallback
    worked but the log said nothing of [::1]: only the error after every
    address had failed named them."""
    with _session(v6) as s:
        assert s.sendmail("alice@dual.example", ["rcpt@example.net"], BODY) == {}
    assert len(v6.up4.messages) == 1
    log = _wait(lambda: "message user=alice" in v6.front.log() and v6.front.log(), "the message line")
    lines = [l for l in log.splitlines() if f"[::1]:{v6.up4.port}" in l]
    assert lines, log
    assert "Connection refused" in lines[0] and f"127.0.0.1:{v6.up4.port}" in lines[0], lines
    assert f"dual.test:{v6.up4.port}" in lines[0], lines
