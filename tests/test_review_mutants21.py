"""DOCSTRING PLACEHOLDER"""

from __future__ import annotations

import ctypes
import os
import shutil
import smtplib
import subprocess

import pytest

from sendooway_front import _loops
from tests.auth_helpers import Daemon
from tests.front_util import Frontend, front_config, login_plain, open_tmp
from tests.upstream import FakeUpstream

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="users and nobody need root")
CLONE_NEWNET = 0x40000000
PORT = 40000  # the only ephemeral port of the test's own network namespace


def _in_own_netns(scenario) -> str:
    """Run `scenario()` in a forked child in a network namespace of its own
    (loopback up, one ephemeral port: the kernel's choice made certain);
    returns what it returned (a str), or the child's error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            _port_range(PORT - 8000, PORT - 1)  # the setup's own connections
            out = scenario()
        except BaseException:  # reported to the parent
            import traceback
            out = "child error: " + traceback.format_exc()
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def _port_range(low: int, high: int) -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write(f"{low} {high}\n")


def _login(s: smtplib.SMTP, world, user: str) -> int:
    s.ehlo("client.test")
    return s.docmd("AUTH", "PLAIN " + login_plain(user, world.users[user].password))[0]


@needs_root
@pytest.mark.skipif(not shutil.which("ip"), reason="no ip(8)")
def test_a_client_sharing_the_source_port_of_an_upstream_connection_is_no_loop(world, clean_homes):
    """DEFECT (false positive): _loops knew our own upstream connections by
    their local end alone (address, port). Linux gives the same ephemeral
    port to connections to different destinations: alice's open upstream
    connection from 127.0.0.1:P to the local MTA, and bob's client from
    127.0.0.1:P to sendooway, exist at once (certain here: one ephemeral
    port). bob's AUTH was refused with 421 4.4.6 "routing loop" and he was
    disconnected, though his connection has nothing to do with ours.
    Correct: a client is one of our upstream connections only when both
    ends match (its address ours, its destination that connection's peer);
    bob logs in (235)."""
    def scenario() -> str:
        up = FakeUpstream(world, tls="plain", require_tls=False).start()
        with open_tmp() as tmp:
            config = front_config(tmp, world, "userInclude = %h/.sendoowayrc\n")
            daemon = Daemon(tmp, config).start()
            front = Frontend(config, os.path.join(str(tmp), "front.log"), port=39001).start()
            world.write_user_file("alice", ".sendoowayrc",
                                  f"smarthostMapping = direct:* 127.0.0.1 {up.port} noAuth\n")
            try:
                _port_range(PORT, PORT)
                # alice from a port of her own choosing, outside the range
                with smtplib.SMTP(front.host, front.port, source_address=("127.0.0.1", 39002),
                                  timeout=20) as alice:
                    assert _login(alice, world, "alice") == 235
                    assert alice.docmd("MAIL", "FROM:<alice@example.org>")[0] == 250
                    with smtplib.SMTP(front.host, front.port, timeout=20) as bob:
                        port = bob.sock.getsockname()[1]
                        code = _login(bob, world, "bob")
            finally:
                front.stop()
                daemon.stop()
                up.stop()
        return f"{port} {code}"

    out = _in_own_netns(scenario)
    assert out == f"{PORT} 235", out
