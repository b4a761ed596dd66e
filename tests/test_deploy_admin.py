"""Deployment review: what a mail admin following the shipped docs and
packaging ran into. Each test is one finding and failed before its fix;
the docstrings say what the admin did and what used to happen."""

from __future__ import annotations

import os
import shutil
import re
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sendooway_shared.protocol import (VERSION, AuthFail, AuthOk, AuthRequest, BlockingChannel,
                                       Hello, Welcome)
from sendooway_shared.types import Secret

from . import deploy_world as dw
from .deploy_world import deployment, upstream  # noqa: F401 - fixtures
from .deploy_util import PACKAGING, REPO, command, man_text
from .front_util import socket_client_session

BODY = "Subject: review\r\n\r\nsent through the shipped deployment\r\n"


def _inetd(args: list[str], env: dict | None, client_input: bytes,
           program: str | None = None) -> tuple[int | None, bytes]:
    """The frontend as inetd/xinetd start it: fd 0, 1 and 2 are the client's
    socket. Returns (exit code, every byte the client received)."""
    seen, code = socket_client_session([program or command("sendooway"), *args], client_input,
                                       timeout=30, env=env)
    return code, seen


def _send_as_alice(world, port: int) -> tuple[int, bytes]:
    """STARTTLS, AUTH as alice, MAIL FROM her address: MAIL's reply."""
    ctx = world.ssl_context()
    with smtplib.SMTP("localhost", port, timeout=60) as client:
        client.ehlo("client.test")
        client.starttls(context=ctx)
        client.ehlo("client.test")
        client.login("alice", world.users["alice"].password)
        code, text = client.mail(dw.SENDER)
        if code != 250:
            return code, text
        client.rcpt("bob@example.net")
        return client.data(BODY)


# ------------------------------------------------------------ inetd/xinetd, frontend as root


def _ldap_config(tmp_path: Path) -> Path:
    """The shipped example with the original's authBackend = LDAP, as a
    migrating admin's file reads (docs/deployment.md, section 5), but
    without an ldapAuthDN: a config the authenticator refuses at start."""
    text = (PACKAGING / "sendooway.conf").read_text()
    text = re.sub(r"^sslCert =.*$", "sslCert =", text, flags=re.M)
    text = re.sub(r"^sslKey =.*$", "sslKey =", text, flags=re.M)
    text = text.replace("mailerEncryption = required", "mailerEncryption = allowed")
    text = text.replace("authBackend = PAM", "authBackend = LDAP")
    text = text.replace("ldapUri =", "ldapUri = ldaps://ldap.example.org")
    conf = tmp_path / "sendooway.conf"
    conf.write_text(text)
    os.chmod(tmp_path, 0o755)
    os.chmod(conf, 0o644)
    return conf


@pytest.mark.parametrize("trigger", ["authBackend-LDAP", "any-stderr-output"])
def test_socketpair_authenticator_never_writes_into_the_inetd_client_connection(tmp_path, trigger):
    """xinetd's submission-root block / the inetd line: xinetd makes the
    client's socket fd 0, 1 and 2. The frontend keeps its own start-up
    errors off fd 2 (tests/test_cli.py), but spawn_pair
    (sendooway_front/_authlink.py) hands the same fd 2 to its
    `sendooway-auth --fd N` child (only stdin/stdout become /dev/null), and
    sendooway_auth/cli.py prints its start-up errors there: the mail client
    reads the config path and the error text in the middle of the SMTP
    dialogue. Real trigger: an old config with authBackend = LDAP. The
    second case puts a wrapper `sendooway-auth` next to `sendooway` that
    writes one line to stderr, then runs the real one: whatever the child
    prints (a warning, a traceback) reaches the client the same way."""
    if trigger == "authBackend-LDAP":
        conf = _ldap_config(tmp_path)
        program = command("sendooway")
    else:
        conf = tmp_path / "sendooway.conf"
        conf.write_text("")
        bindir = tmp_path / "bin"
        bindir.mkdir()
        os.symlink(command("sendooway"), bindir / "sendooway")
        wrapper = bindir / "sendooway-auth"
        wrapper.write_text("#!/bin/sh\necho 'sendooway-auth: internal detail of the server' >&2\n"
                           f'exec {command("sendooway-auth")} "$@"\n')
        os.chmod(wrapper, 0o755)
        program = str(bindir / "sendooway")
    log = tmp_path / "front.log"
    _code, seen = _inetd(["-c", str(conf), "-l", str(log)], None,
                         b"EHLO client.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nQUIT\r\n",
                         program=program)
    lines = seen.split(b"\r\n")
    # (this LDAP config is refused by the frontend itself at start: 421, nothing else)
    first = b"421 " if trigger == "authBackend-LDAP" else b"220 "
    assert lines[0].startswith(first) and lines[-1] == b"", seen
    junk = [line for line in lines[:-1] if not re.match(rb"^\d{3}[ -]", line)]
    assert junk == [], f"the client received non-SMTP text: {junk}"
    assert b"sendooway-auth:" not in seen


def test_root_frontend_refuses_authbackend_ldap_at_start(tmp_path):
    """An LDAP config the authenticator must refuse (no ldapAuthDN with %u)
    is refused at start-up by a root frontend too. Only the daemon checked it (check_backend in
    sendooway_auth/_server.py). The original's own deployment - xinetd/inetd
    starting sendooway as root, the one a migrating admin keeps - greets
    220, offers AUTH and answers every login 454 "Temporary authentication
    failure", so clients retry for ever; nothing says "cannot start"."""
    conf = _ldap_config(tmp_path)
    log = tmp_path / "front.log"
    code, seen = _inetd(["-c", str(conf), "-l", str(log)], None,
                        b"EHLO client.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nQUIT\r\n")
    assert seen.startswith(b"421 "), seen
    assert code == 2
    text = log.read_text()
    assert "cannot start:" in text and "LDAP" in text, text


# ------------------------------------------------------------ a user's own sslCA


def _user_ca_session(world, dep: dw.Deployment, sslca_line: str) -> tuple[int, bytes]:
    """alice keeps the CA of her upstream in her home (mode 0644 file, her
    home as the world makes it: 0700) and names it in ~/.sendoowayrc."""
    world.write_user_file("alice", ".config/work-ca.pem", Path(world.ca_file).read_text(),
                          mode=0o644)
    world.write_user_file("alice", ".sendoowayrc", sslca_line + "\n", mode=0o644)
    proc, port = dw.serve_b(dep)
    try:
        return _send_as_alice(world, port)
    finally:
        dw.stop(proc)


def test_user_sslca_with_percent_h_as_in_the_man_page(world, deployment, upstream):
    """sendooway.conf(5), SENDOOWAYRC, shows `sslCA = %h/.config/work-ca.pem`.
    %h is expanded in userInclude and mapping paths, but not in sslCA
    (sendooway_auth/routes.py: found.ca_file = user_cfg.sslCA): the route
    carries the literal "%h/.config/work-ca.pem", the frontend cannot load
    it, and every message of that user is refused with a 4xx."""
    assert "sslCA = %h/.config/work\\-ca.pem" in man_text("sendooway.conf.5")
    code, text = _user_ca_session(world, deployment, "sslCA = %h/.config/work-ca.pem")
    log = deployment.front_log.read_text()
    assert code == 250, (code, text, [l for l in log.splitlines() if "CA" in l or "TLS" in l])
    assert len(upstream.messages) == 1


def test_user_sslca_in_the_users_own_home_is_usable(world, deployment, upstream):
    """The same with the path written out. The authenticator reads the
    user's files as the user, but only passes the CA file's *path*; the
    frontend, already running as nobody, opens it (sendooway_front/_tls.py
    client_context) and cannot enter a 0700 home (Debian's default for new
    homes since bookworm): 4xx for every message, though `--check` shows
    the route as fine. The authenticator should read the CA as the user and
    pass its contents, or --check/the log should say that nobody cannot
    read it."""
    home = world.users["alice"].home
    assert os.stat(home).st_mode & 0o777 == 0o700
    code, text = _user_ca_session(world, deployment, f"sslCA = {home}/.config/work-ca.pem")
    log = deployment.front_log.read_text()
    assert code == 250, (code, text, [l for l in log.splitlines() if "CA" in l or "TLS" in l])
    assert len(upstream.messages) == 1


# ------------------------------------------------------------ signals: editing the config


def _login(path: Path, user: str, password: str, client: str = "192.0.2.50") -> object:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    ch = BlockingChannel(sock, timeout=30)
    try:
        assert isinstance(ch.request(Hello(VERSION, "review", client)), Welcome)
        return ch.request(AuthRequest(user, Secret(password)))
    finally:
        ch.close()


def test_auth_daemon_sighup_reloads_instead_of_dying_silently(world, deployment):
    """An admin restricts the proxy (`validUser = bob`) in
    /etc/sendooway.conf while the daemon runs (2b, 2c), checks it with
    `sendooway-auth --check alice` (which reads the file: "valid user: no")
    and sends the daemon the conventional SIGHUP. The daemon has no handler
    (sendooway_auth/_server.py handles only SIGTERM/SIGINT): it dies at once
    with no log line, in-flight sessions fail, and under plain init nothing
    restarts it. Nowhere do the docs say that the daemon keeps the config it
    started with until it is restarted (while per-connection frontends read
    the new one), the man page says nothing about SIGHUP, and the unit has
    no ExecReload=. Expected: SIGHUP re-reads the config (or is at least
    survived and documented)."""
    dep = deployment
    alice = world.users["alice"]
    daemon = dw.start_auth_daemon(dep, ["--failure-delay", "0"])
    try:
        assert isinstance(_login(dep.auth_socket, "alice", alice.password), AuthOk)
        dep.config.write_text(dep.config.read_text() + "validUser = bob\n")
        r = subprocess.run([command("sendooway-auth"), "-c", str(dep.config), "--check", "alice"],
                           env=dep.env, capture_output=True, text=True, timeout=60)
        assert "valid user: no" in r.stdout, r.stdout + r.stderr
        reloads = dep.auth_log.read_text().count("reloaded ")
        os.kill(daemon.pid, signal.SIGHUP)
        # until the reload is logged (it was a fixed 1 s: on a loaded machine
        # the login below could still meet the old config), or the daemon ended
        deadline = time.monotonic() + 30
        while (daemon.poll() is None and dep.auth_log.read_text().count("reloaded ") == reloads
               and time.monotonic() < deadline):
            time.sleep(0.05)
        time.sleep(0.2)  # (and a SIGHUP that kills does so within this, too)
        assert daemon.poll() is None, (
            f"SIGHUP ended the daemon (status {daemon.returncode}); its log:\n"
            + dep.auth_log.read_text())
        assert isinstance(_login(dep.auth_socket, "alice", alice.password), AuthFail)
    finally:
        dw.stop(daemon)
    assert "SIGHUP" in man_text("sendooway-auth.8")


# ------------------------------------------------------------ passwords in /etc/sendooway.conf


def test_check_warns_that_the_global_config_with_passwords_is_world_readable(world, deployment):
    """docs/deployment.md installs the config with `install -m 0644`, and the
    frontend of 2b/2c (nobody) must read it. An admin then adds a shared
    upstream as DESIGN.md's `direct:ADDRESS SERVER PORT USER PASS` line:
    every local user can now read the upstream password that the proxy is
    meant to keep on the server. The users' own files get "unsafe mode"
    warnings (sendooway_auth/routes.py _check_mode); the admin's file, the
    one most likely to hold a shared password, gets none, from --check or
    the daemon, and no doc says which mode the config needs
    (root:ssl-cert 0640 would serve all three deployments)."""
    dep = deployment
    guide = (REPO / "docs" / "deployment.md").read_text()
    assert "install -m 0644 packaging/sendooway.conf /etc/sendooway.conf" in guide
    dep.config.write_text(dep.config.read_text() + (
        "smarthostMapping = direct:*@corp.example smtp.corp.example 587 shared Sh4red-Pw tls\n"))
    os.chmod(dep.config, 0o644)
    r = subprocess.run([command("sendooway-auth"), "-c", str(dep.config), "--check", "alice",
                        "--sender", "x@corp.example"],
                       env=dep.env, capture_output=True, text=True, timeout=60)
    assert "Sh4red-Pw" not in r.stdout + r.stderr
    assert "route for x@corp.example: smtp.corp.example:587" in r.stdout, r.stdout
    warnings = [line for line in r.stdout.splitlines()
                if str(dep.config) in line and ("mode 0644" in line or "readable" in line)]
    assert warnings, r.stdout


# ------------------------------------------------------------ fail2ban with the journal


def _journalmatch(filter_text: str) -> list[dict[str, str]]:
    """fail2ban's journalmatch: FIELD=value terms, ANDed; '+' separates ORed groups."""
    m = re.search(r"^journalmatch\s*=\s*(.*)$", filter_text, re.M)
    assert m, "the filter has no journalmatch"
    groups, current = [], {}
    for term in m.group(1).split():
        if term == "+":
            groups.append(current)
            current = {}
        else:
            key, _, value = term.partition("=")
            current[key] = value
    groups.append(current)
    return groups


def test_fail2ban_journalmatch_covers_the_default_xinetd_deployment():
    """Debian 12 logs to the journal only (no rsyslog, no /var/log/mail.log);
    docs/deployment.md section 4 says: set `backend = systemd` in the jail,
    "the filter has a journalmatch for sendooway-auth.service". But in the
    deployment the guide enables first (2a, xinetd or inetd with
    user = root) the authenticator that writes "auth failed" is the
    frontend's `sendooway-auth --fd N` child, in xinetd.service's (or
    inetd.service's) cgroup: journald records it with
    _SYSTEMD_UNIT=xinetd.service and SYSLOG_IDENTIFIER=sendooway-auth.
    `journalmatch = _SYSTEMD_UNIT=sendooway-auth.service` selects none of
    those lines, so fail2ban never bans anyone and says nothing.
    `SYSLOG_IDENTIFIER=sendooway-auth` matches in every deployment."""
    # what the socketpair authenticator hands to syslog (shared/log.py):
    # "<PRI>sendooway-auth[PID]: auth failed: ...", parsed by journald into:
    record = {
        "SYSLOG_IDENTIFIER": "sendooway-auth",
        "SYSLOG_FACILITY": "2",
        "_SYSTEMD_UNIT": "xinetd.service",
        "MESSAGE": "auth failed: user=alice client=192.0.2.7 reason=wrong-password"
                   " session=abc delay=1.0",
    }
    text = (PACKAGING / "fail2ban" / "filter.d" / "sendooway.conf").read_text()
    groups = _journalmatch(text)
    assert any(all(record.get(k) == v for k, v in g.items()) for g in groups), (
        f"journalmatch {groups} selects no line of the xinetd/inetd deployment")


# ------------------------------------------------------------ authBackend = none


def test_authbackend_none_never_means_root_without_a_password(tmp_path):
    """The shipped sendooway.conf says `none (only the user sendooway runs
    as; single-user setups)`. sendooway-auth accepts, without a password,
    the account whose uid it runs as (sendooway_auth/_service.py
    _check_blocking) - and in every shipped deployment (xinetd/inetd as
    root, the daemon's unit with User=root) that is root. An admin of a
    single-user box who sets `authBackend = none` lets anyone on the
    network log in as "root" with any password and relay over root's
    routes (global direct mappings, /root/.fetchmailrc, read as root).
    Expected: refused at start-up like LDAP when the authenticator is root,
    or uid 0 never accepted."""
    conf = tmp_path / "sendooway.conf"
    conf.write_text("authBackend = none\n")
    os.chmod(tmp_path, 0o755)
    token = __import__("base64").b64encode(b"\0root\0not-roots-password").decode()
    r = subprocess.run([command("sendooway"), "-c", str(conf), "-l", str(tmp_path / "front.log")],
                       input=f"EHLO client.test\r\nAUTH PLAIN {token}\r\nQUIT\r\n".encode(),
                       capture_output=True, timeout=60)
    replies = r.stdout.decode(errors="replace").split("\r\n")
    assert not any(line.startswith("235") for line in replies), replies


# ------------------------------------------------------------ sendooway -b as root


def test_root_b_frontend_leaves_no_private_directory_behind(world, deployment):
    """`sendooway -b` started as root with no daemon (the standalone server
    of sendooway(1)) makes /tmp/sendooway-auth-XXXX for its private
    authenticator (spawn_daemon, sendooway_front/_authlink.py). The daemon
    removes its auth.sock on SIGTERM, but the directory and its `notify`
    socket stay: the frontend, by then nobody, cannot remove them and
    nothing else does. One more root-owned directory in /tmp per start
    (every Restart=, every cron restart); after a SIGHUP (no handler: the
    frontend dies at once, sessions cut) the daemon also logs "cannot
    notify systemd at /tmp/sendooway-auth-XXXX/notify"."""
    dep = deployment
    proc, _port = dw.serve_b(dep)
    try:
        m = dw.wait_for(lambda: re.search(r"started (/tmp/sendooway-auth-[^/\s]+)/auth\.sock",
                                          dep.front_log.read_text()),
                        what="the private authenticator's socket in the log")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(60)
    private = Path(m.group(1))
    time.sleep(1.0)  # the watcher stops the daemon after the frontend
    leftover = sorted(p.name for p in private.iterdir()) if private.exists() else None
    if private.exists():
        shutil.rmtree(private, ignore_errors=True)  # not this test's business to leave it
    assert rc == 0
    assert leftover is None, f"{private} left behind with {leftover}"


def test_root_b_with_a_private_tmpdir_still_serves(world, deployment, tmp_path):
    """Root's TMPDIR may be a directory only root may search (pam_tmpdir,
    TMPDIR=/root/tmp, mode 0700). `sendooway -b` started as root made its
    private authenticator's directory there with tempfile.mkdtemp, and the
    frontend, nobody once it serves, could not reach the socket: every
    session got 421 "Permission denied" for as long as it ran, and since
    that is not ECONNREFUSED/ENOENT it never stopped for a restart either.
    Now the directory goes where the frontend user can reach it (/run)."""
    dep = deployment
    private_tmp = tmp_path / "roots-tmp"
    private_tmp.mkdir(mode=0o700)
    os.chmod(private_tmp, 0o700)
    dep.env["TMPDIR"] = str(private_tmp)
    proc, port = dw.serve_b(dep)
    try:
        m = dw.wait_for(lambda: re.search(r"started (\S+)/auth\.sock",
                                          dep.front_log.read_text()),
                        what="the private authenticator's socket in the log")
        result = dw.smtp_session(world, port)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(60)
    private = Path(m.group(1))
    assert result["refused"] == {}
    assert not private.is_relative_to(private_tmp), private
    assert rc == 0
    dw.wait_for(lambda: not private.exists(), what=f"{private} removed at the stop")
    # the first try there was removed (pam.XXXXXX: the test world's
    # pam_wrapper, Debian 13's 1.1.7, makes its directory in TMPDIR)
    assert [p for p in private_tmp.iterdir() if not p.name.startswith("pam.")] == []


def test_b_frontend_stopped_while_starting_up_stops_cleanly(world, deployment):
    """A service manager may stop `sendooway -b` right after its port is up,
    before the event loop took the signals over: that SIGTERM used to kill
    it outright (status -15, its private authenticator's directory left)."""
    dep = deployment
    for _ in range(3):
        proc, _port = dw.serve_b(dep)  # returns as soon as the port listens
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, dep.front_log.read_text()[-2000:]
