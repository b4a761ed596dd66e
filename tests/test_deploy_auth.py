"""The authenticator as the shipped systemd units run it (socket activation,
Type=notify), and the shipped fail2ban filter against the lines it really
wrote."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys

import pytest

from sendooway_shared.protocol import (VERSION, AuthFail, AuthOk, AuthRequest, BlockingChannel,
                                       Hello, NoRoute, RouteOk, RouteRequest, Welcome)
from sendooway_shared.types import Secret

from . import deploy_world as dw
from .deploy_util import command
from .deploy_util import PACKAGING, rewrite_paths, system_env

WORLD_VARS = ("LD_PRELOAD", "LD_LIBRARY_PATH", "NSS_WRAPPER_PASSWD", "NSS_WRAPPER_GROUP",
              "PAM_WRAPPER", "PAM_WRAPPER_SERVICE_DIR", "SENDOOWAY_TEST_WORLD", "PATH",
              "PYTHONPATH")  # (tests/worldsite: pam_wrapper's start-up one process at a time)
CLIENTS = ("192.0.2.7", "2001:db8::9")
UPSTREAM_PORT = 2587  # only looked up, never connected to


def _unit(name: str) -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment]
    cp.read_string((PACKAGING / "systemd" / name).read_text())
    return cp


@pytest.fixture
def deployment(world):
    dep = dw.build(world, UPSTREAM_PORT)
    yield dep
    dep.cleanup()
    world.clear_home("alice")


def _exec_start(unit: str, dep: dw.Deployment) -> list[str]:
    line = rewrite_paths(_unit(unit)["Service"]["ExecStart"])
    return [str(dep.config) if a == "/etc/sendooway.conf" else a for a in shlex.split(line)]


def _channel(path, client: str, session: str) -> BlockingChannel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    ch = BlockingChannel(sock, timeout=30)
    assert isinstance(ch.request(Hello(VERSION, session, client)), Welcome)
    return ch


def _connect_as(uid: int, path) -> str:
    """Connect to the socket from a child running as uid; what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                ch = BlockingChannel(sock, timeout=10)
                reply = ch.request(Hello(VERSION, "uidtest", "198.51.100.1"))
                out = type(reply).__name__
            except PermissionError:
                out = "EACCES"
            except (ConnectionError, OSError) as exc:
                out = f"closed:{type(exc).__name__}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


def test_auth_daemon_socket_activated_as_the_units_say(world, deployment):
    dep = deployment
    sock_unit = _unit("sendooway-auth.socket")["Socket"]
    cmd = _exec_start("sendooway-auth.service", dep)
    assert cmd[0].endswith("/sendooway-auth") and "-c" in cmd
    # observation hooks for the test only: a log file, no failure delay
    cmd += ["-l", str(dep.auth_log), "--failure-delay", "0"]

    notify_path = dep.root / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    dep.auth_socket.parent.mkdir(mode=0o755)
    env = dict(dep.env, NOTIFY_SOCKET=str(notify_path))
    setenv = [a for v in WORLD_VARS if v in env for a in ("-E", f"{v}={env[v]}")]
    setenv += ["-E", f"NOTIFY_SOCKET={notify_path}"]
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(dep.auth_socket), *setenv, *cmd],
                            env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        # Like systemd, systemd-socket-activate starts the daemon on the first
        # connection; then Type=notify: READY=1 on NOTIFY_SOCKET.
        dw.wait_for(dep.auth_socket.exists, what="the activation socket")
        ch = _channel(dep.auth_socket, CLIENTS[0], "sess-1")
        message = notify.recv(4096).decode()
        assert "READY=1" in message.split("\n"), message
        # what sendooway-auth.socket does to the socket file
        os.chown(dep.auth_socket, dw.NOBODY_UID, 0)
        os.chmod(dep.auth_socket, int(sock_unit["SocketMode"], 8))

        alice = world.users["alice"]
        assert isinstance(ch.request(AuthRequest("alice", Secret("wrong-1"))), AuthFail)
        assert isinstance(ch.request(AuthRequest("alice", Secret(alice.password))), AuthOk)
        route = ch.request(RouteRequest(dw.SENDER))
        assert isinstance(route, RouteOk), route
        assert (route.server, route.port) == ("localhost", UPSTREAM_PORT)
        assert isinstance(ch.request(RouteRequest("mallory@example.org")), NoRoute)
        ch.close()
        ch = _channel(dep.auth_socket, CLIENTS[1], "sess-2")
        assert isinstance(ch.request(AuthRequest("nosuchuser", Secret("x"))), AuthFail)
        ch.close()

        # nobody (frontendUser) may talk to it; another user may not connect
        assert _connect_as(dw.NOBODY_UID, dep.auth_socket) == "Welcome"
        assert _connect_as(world.users["carol"].uid, dep.auth_socket) == "EACCES"
        # ... and not even with the socket file opened up: SO_PEERCRED
        os.chmod(dep.auth_socket, 0o666)
        assert _connect_as(world.users["carol"].uid, dep.auth_socket).startswith("closed")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(20)
        finally:
            dw.stop(proc)
        notify.close()
    assert rc == 0, proc.stderr.read().decode()
    # the socket file is systemd's: it stays for the service's next start
    # (Python 3.13's asyncio removed it when the daemon stopped)
    assert stat.S_ISSOCK(os.lstat(dep.auth_socket).st_mode)
    log = dep.auth_log.read_text()
    assert "auth ok: user=alice" in log and "peer refused" in log
    assert alice.password not in log and dw.UPSTREAM_PASSWORD not in log


def _fail2ban_regex(log, root) -> subprocess.CompletedProcess:
    """fail2ban-regex with the shipped filter installed next to fail2ban's
    own filter.d/common.conf (which it includes), as in /etc/fail2ban."""
    filter_dir = root / "fail2ban" / "filter.d"
    if not filter_dir.exists():
        filter_dir.mkdir(parents=True)
        shutil.copy("/etc/fail2ban/filter.d/common.conf", filter_dir)
        shutil.copy(PACKAGING / "fail2ban" / "filter.d" / "sendooway.conf", filter_dir)
    return subprocess.run(["fail2ban-regex", "--out", "ip", str(log),
                           str(filter_dir / "sendooway.conf")],
                          capture_output=True, text=True, timeout=60, env=system_env())


def test_fail2ban_filter_matches_the_failures_the_authenticator_wrote(world, deployment):
    if not shutil.which("fail2ban-regex"):
        pytest.skip("fail2ban not installed")
    dep = deployment
    proc = dw.start_auth_daemon(dep, ["--failure-delay", "0"])
    try:
        alice = world.users["alice"]
        ch = _channel(dep.auth_socket, CLIENTS[0], "f2b-1")
        for attempt in range(2):
            assert isinstance(ch.request(AuthRequest("alice", Secret(f"bad-{attempt}"))), AuthFail)
        assert isinstance(ch.request(AuthRequest("alice", Secret(alice.password))), AuthOk)
        ch.close()
        ch = _channel(dep.auth_socket, CLIENTS[1], "f2b-2")
        assert isinstance(ch.request(AuthRequest("nosuchuser", Secret("x"))), AuthFail)
        ch.close()
        ch = _channel(dep.auth_socket, "203.0.113.5:40123", "f2b-3")
        assert isinstance(ch.request(AuthRequest("bob", Secret("also-wrong"))), AuthFail)
        ch.close()
    finally:
        dw.stop(proc)
    log = dep.auth_log.read_text()
    failures = [line for line in log.splitlines() if "auth failed:" in line]
    assert len(failures) == 4, log
    r = _fail2ban_regex(dep.auth_log, dep.root)
    assert r.returncode == 0, r.stdout + r.stderr
    ips = r.stdout.split()
    assert ips == [CLIENTS[0], CLIENTS[0], CLIENTS[1], "203.0.113.5"], r.stdout
    # the same lines as syslog writes them (facility mail, /var/log/mail.log)
    syslog = dep.root / "mail.log"
    with syslog.open("w") as f:
        for line in log.splitlines():
            stamp, _, rest = line.partition(" sendooway-auth[")
            f.write(f"Nov 25 23:59:01 mailhost sendooway-auth[{rest}\n")
    r = _fail2ban_regex(syslog, dep.root)
    assert r.stdout.split() == ips, r.stdout + r.stderr


def test_guide_troubleshooting_check_on_the_shipped_config(world, deployment):
    """docs/deployment.md's first troubleshooting step, on the shipped config."""
    dep = deployment
    guide = (PACKAGING.parent / "docs" / "deployment.md").read_text()
    assert "sendooway-auth --check alice --sender alice@example.org" in guide

    def check(*args):
        return subprocess.run([command("sendooway-auth"), "-c", str(dep.config), "--check", *args],
                              env=dep.env, capture_output=True, text=True, timeout=60)

    r = check("alice", "--sender", dw.SENDER)
    assert r.returncode == 0, r.stderr
    route = [line for line in r.stdout.splitlines() if line.startswith(f"route for {dw.SENDER}:")]
    assert route and f"localhost:{UPSTREAM_PORT} starttls" in route[0], r.stdout
    assert "********" in route[0] and dw.UPSTREAM_PASSWORD not in r.stdout
    assert ".fetchmailrc:6" in route[0]
    r = check("alice", "--sender", "mallory@example.org")
    assert r.returncode == 0 and "route for mallory@example.org: none" in r.stdout
    r = check("nosuchuser")
    assert r.returncode == 1 and "does not exist" in r.stdout


def test_authbackend_ldap_in_the_shipped_config_is_refused_at_start(world, deployment):
    """The example config switched to LDAP without filling in its ldap*
    lines: refused at start-up (exit 2), the message naming what is missing
    with the config's lines."""
    dep = deployment
    text = dep.config.read_text()
    assert "authBackend = PAM" in text and "LDAP" in text
    dep.config.write_text(text.replace("authBackend = PAM", "authBackend = LDAP"))
    r = subprocess.run([command("sendooway-auth"), "-c", str(dep.config), "-l", str(dep.auth_log)],
                       env=dep.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "authBackend = LDAP: " in r.stderr and "ldapUri is not set" in r.stderr
    assert f"{dep.config}:" in r.stderr
    assert not dep.auth_socket.exists()
