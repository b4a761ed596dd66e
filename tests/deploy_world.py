"""A deployment inside the fake world, built from the shipped files: the
example config, the PAM file, the xinetd block and the systemd units, with
only paths and ports rewritten. Used by tests/test_deploy*.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .deploy_util import PACKAGING, command, pam_service_dir
from .fakeworld import free_port

SSL_CERT_GID = 41500  # the fake world's "ssl-cert" group
NOBODY_UID = 65534
UPSTREAM_USER = "alice-up"
UPSTREAM_PASSWORD = "up-Pw-Q8r2v"  # distinctive: grep-able in leak checks
SENDER = "alice@example.org"


@dataclass
class Deployment:
    root: Path  # world-readable (the frontend may run as nobody)
    config: Path
    auth_socket: Path
    key: Path
    cert: Path
    env: dict[str, str]
    auth_log: Path
    front_log: Path

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def build(world, upstream_port: int) -> Deployment:
    """Config, key, PAM and alice's files for one deployment test."""
    root = Path(tempfile.mkdtemp(prefix="sendooway-deploy-"))
    os.chmod(root, 0o755)
    # The TLS key as docs/deployment.md says: root:ssl-cert, mode 0640.
    key = root / "server.key"
    cert = root / "server.crt"
    shutil.copy(world.key_file, key)
    shutil.copy(world.cert_file, cert)
    os.chown(key, 0, SSL_CERT_GID)
    os.chmod(key, 0o640)
    os.chmod(cert, 0o644)
    auth_socket = root / "run" / "auth.sock"
    text = (PACKAGING / "sendooway.conf").read_text()
    replacements = {
        "sslCert": str(cert),
        "sslKey": str(key),
        "authSocket": str(auth_socket),
        "localname": "proxy.test",
    }
    for keyword, value in replacements.items():
        text, n = re.subn(rf"^{keyword} =.*$", f"{keyword} = {value}", text, flags=re.M)
        assert n == 1, keyword
    config = root / "sendooway.conf"
    config.write_text(text)
    os.chmod(config, 0o644)

    # nss_wrapper: the world's groups plus ssl-cert
    group = root / "group"
    group.write_text(Path(world.group).read_text() + f"ssl-cert:x:{SSL_CERT_GID}:\n")
    os.chmod(group, 0o644)
    env = world.env()
    env["NSS_WRAPPER_GROUP"] = str(group)
    env["PAM_WRAPPER_SERVICE_DIR"] = str(pam_service_dir(root / "pam", world))

    # alice's own files: a fetchmailrc for the upstream, sslCA in her include
    world.clear_home("alice")
    world.write_user_file("alice", ".fetchmailrc", (
        'poll imap.example.org protocol imap\n'
        f'    user "{UPSTREAM_USER}" pass "{UPSTREAM_PASSWORD}"\n'
        '#sendooway:server "localhost"\n'
        f'#sendooway:port {upstream_port}\n'
        '#sendooway:tls\n'
        f'#sendooway:address "{SENDER}"\n'
    ))
    world.write_user_file("alice", ".sendoowayrc", f"sslCA = {world.ca_file}\n", mode=0o644)

    auth_log = root / "auth.log"
    front_log = root / "front.log"
    for log in (auth_log, front_log):
        log.touch()
        os.chown(log, NOBODY_UID, -1)  # the nobody variant opens it as nobody
        os.chmod(log, 0o600)
    return Deployment(root, config, auth_socket, key, cert, env, auth_log, front_log)


# ------------------------------------------------------------ processes


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def listening(port: int, proc: subprocess.Popen | None = None) -> bool:
    """Something listens on `port`; with `proc`: that process (or a child
    of it), not another one that took the port free_port() picked."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    if not out.stdout.strip():
        return False
    if proc is None:
        return True
    from .front_util import _listener_is

    return _listener_is(proc, port)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """End a process the test started, and its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def credentials(pid: int) -> dict[str, list[int]]:
    """Uid, Gid and Groups lines of /proc/pid/status, plus the command line."""
    info: dict = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                info[key] = [int(v) for v in value.split()]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        info["cmdline"] = [a.decode() for a in f.read().split(b"\0") if a]
    return info


def start_auth_daemon(dep: Deployment, extra: list[str] | None = None) -> subprocess.Popen:
    """`sendooway-auth` as a daemon on the config's authSocket."""
    proc = subprocess.Popen(
        [command("sendooway-auth"), "-c", str(dep.config), "-l", str(dep.auth_log),
         *(extra or [])],
        env=dep.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"sendooway-auth exited: {proc.stderr.read().decode()}")
        if not dep.auth_socket.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(dep.auth_socket))
                return True
            except OSError:
                return False

    wait_for(up, what="the authenticator's socket")
    return proc


def serve_b(dep: Deployment) -> tuple[subprocess.Popen, int]:
    """`sendooway -b 127.0.0.1:PORT` started as root on the deployment's
    config (no daemon: it starts its private authenticator)."""
    for attempt in range(4):
        # free_port()'s pick may be taken by another process before this one
        # binds it: then it exits "Address already in use", and another pick
        port = free_tcp_port()
        proc = subprocess.Popen(
            [command("sendooway"), "-c", str(dep.config), "-l", str(dep.front_log),
             "-b", f"127.0.0.1:{port}"],
            env=dep.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)

        def up():
            if proc.poll() is not None:
                return "exited"
            return listening(port, proc)

        if wait_for(up, timeout=30, what="sendooway -b to listen") is True:
            return proc, port
        err = proc.stderr.read().decode()
        if attempt < 3 and f"127.0.0.1:{port}: Address already in use" in err:
            continue
        raise AssertionError("sendooway -b exited: " + err + dep.front_log.read_text())
    raise AssertionError("unreachable")


# ------------------------------------------------------------ clients


def smtp_session(world, port: int, *, implicit_tls: bool = False, body: str = "") -> dict:
    """A whole client session: TLS, AUTH as alice, one message to bob."""
    ctx = world.ssl_context()
    if implicit_tls:
        client = smtplib.SMTP_SSL("localhost", port, context=ctx, timeout=30)
    else:
        client = smtplib.SMTP("localhost", port, timeout=30)
    result = {}
    with client:
        client.ehlo("client.test")
        if not implicit_tls:
            result["ehlo_before_tls"] = client.esmtp_features.copy()
            client.starttls(context=ctx)
            client.ehlo("client.test")
        client.login("alice", world.users["alice"].password)
        result["during"] = time.monotonic()
        body = body or "Subject: deploy test\r\n\r\nsent through the shipped deployment\r\n"
        refused = client.sendmail(SENDER, ["bob@example.net"], body)
        result["refused"] = refused
    return result


def wrong_password_session(port: int, world, attempts: int = 1) -> list[int]:
    """`attempts` AUTH PLAIN commands as alice with a wrong password, after
    STARTTLS; the reply codes (one AUTH each: smtplib's login() would try
    PLAIN and then LOGIN)."""
    import base64

    ctx = world.ssl_context()
    codes = []
    token = base64.b64encode(b"\0alice\0not-alices-password").decode()
    with smtplib.SMTP("localhost", port, timeout=60) as client:
        client.ehlo("client.test")
        client.starttls(context=ctx)
        client.ehlo("client.test")
        for _ in range(attempts):
            code, _text = client.docmd("AUTH", f"PLAIN {token}")
            codes.append(code)
            if code == 421:
                break
    return codes


def free_tcp_port() -> int:
    return free_port("127.0.0.1")


# ------------------------------------------------------------ fixtures (import them by name)


@pytest.fixture
def upstream(world, upstream_factory):
    """The deployment's upstream: STARTTLS, AUTH as UPSTREAM_USER."""
    return upstream_factory(tls="starttls", accounts={UPSTREAM_USER: UPSTREAM_PASSWORD})


@pytest.fixture
def deployment(world, upstream):
    """The shipped packaging installed under a scratch root, routing to `upstream`."""
    dep = build(world, upstream.port)
    yield dep
    dep.cleanup()
    world.clear_home("alice")
