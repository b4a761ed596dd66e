"""SIGHUP: sendooway-auth re-reads its config (new logins and route lookups
use it, a broken file keeps the old one), and `sendooway -b` survives it.
Real processes in the fake world, as an admin would send the signal."""

from __future__ import annotations

import asyncio
import configparser
import os
import signal
import time

import pytest

from sendooway_auth import _reader, _users
from sendooway_auth._reader import ForkServer
from sendooway_auth._workers import WorkerPool
from sendooway_shared.config import parse_config
from sendooway_shared.protocol import VERSION, AuthFail, AuthOk, AuthRequest, Hello, RouteOk
from sendooway_shared.types import Secret
from tests.auth_helpers import (  # noqa: F401 - daemon is a fixture
    Daemon, alive, closed_after, daemon, gone, login, route, workers,
)
from tests.front_util import Frontend, front_config, login_plain, open_tmp

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FETCHMAILRC = """\
poll pop.example.org proto pop3 user "alice" password "fm-Secret-A1"
#sendooway:server "smtp-fetchmail.example"
#sendooway:tls
#sendooway:address "alice@example.org"
"""
GETMAILRC = """\
[retriever]
server = pop.example.org
username = alice
password = fm-Secret-A1
[sender]
type = SimpleSMTPTLSSender
server = smtp-getmail.example
address = alice@example.org
"""


def _hup(d: Daemon, reloads: int, timeout: float = 5.0) -> str:
    """SIGHUP the daemon; wait until the log shows `reloads` reloads in all
    (done or failed) and return the log."""
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        log = d.log()
        if log.count("reloaded ") + log.count("reload failed") >= reloads:
            return log
        assert d.proc.poll() is None, f"SIGHUP ended the daemon ({d.proc.returncode}):\n{log}"
        assert time.monotonic() < deadline, f"no reload logged:\n{log}"
        time.sleep(0.02)


def _rewrite(d: Daemon, text: str) -> None:
    with open(d.config_path, "w") as f:
        f.write(text)


def test_sighup_applies_a_new_valid_user_line_to_logins(daemon, world):
    d = daemon()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    ch.close()
    opened_before = d.connect()  # hello now, the login after the reload
    assert opened_before.request(Hello(VERSION, "s2", "192.0.2.7")).TYPE == "welcome"

    _rewrite(d, "validUser = bob\n")
    log = _hup(d, 1)
    assert f"reloaded {d.config_path}" in log

    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthFail()
    ch.close()
    ch = d.connect()
    assert login(ch, "bob", world.users["bob"].password) == AuthOk("bob")
    ch.close()
    # requests on connections opened before the reload use the new config too
    assert opened_before.request(
        AuthRequest("alice", Secret(world.users["alice"].password))) == AuthFail()
    opened_before.close()
    assert "auth failed: user=alice client=192.0.2.7 reason=not-a-valid-user" in \
        d.wait_log("reason=not-a-valid-user")


def test_sighup_changes_the_route_of_a_user_with_a_live_worker(daemon, world):
    world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC)
    world.write_user_file("alice", ".getmail/getmailrc", GETMAILRC)
    d = daemon("smarthostMapping = fetchmail:%h/.fetchmailrc\n")
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    before = route(ch, "alice@example.org")
    assert isinstance(before, RouteOk) and before.server == "smtp-fetchmail.example"
    (old_worker,) = workers(d, 1)

    _rewrite(d, "smarthostMapping = getmail:%h/.getmail/getmailrc\n")
    _hup(d, 1)

    # the same connection (authenticated before the reload) and a new one
    after = route(ch, "alice@example.org")
    assert isinstance(after, RouteOk) and after.server == "smtp-getmail.example", after
    ch.close()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    again = route(ch, "alice@example.org")
    assert isinstance(again, RouteOk) and again.server == "smtp-getmail.example"
    ch.close()
    # the worker that held the old config is gone, a new one answered
    assert not alive(old_worker)
    assert old_worker not in workers(d, 1)


def test_sighup_with_a_broken_config_keeps_the_old_one(daemon, world):
    d = daemon("validUser = alice\n")
    # a bad line (with something that could be a password on it) at line 3
    _rewrite(d, "validUser = alice\nvalidUser = bob\n"
                "smarthostMapping = direct:*@corp.example smtp.corp.example 99999 u Rel-Secret-7\n")
    log = _hup(d, 1)
    assert f"reload failed, old config kept: {d.config_path}:3: smarthostMapping:" in log, log
    # still serving, with the old config: bob is not let in
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    ch.close()
    ch = d.connect()
    assert login(ch, "bob", world.users["bob"].password) == AuthFail()
    ch.close()

    # the start-up checks count as well: authBackend = LDAP without ldapUri is refused
    _rewrite(d, "validUser = bob\nauthBackend = LDAP\n")
    log = _hup(d, 2)
    assert "reload failed, old config kept:" in log and "ldapUri is not set" in log
    ch = d.connect()
    assert login(ch, "bob", world.users["bob"].password) == AuthFail()
    ch.close()

    # fixed: now it is taken
    _rewrite(d, "validUser = bob\n")
    log = _hup(d, 3)
    assert f"reloaded {d.config_path}" in log
    ch = d.connect()
    assert login(ch, "bob", world.users["bob"].password) == AuthOk("bob")
    ch.close()
    log = d.log()
    assert "Rel-Secret-7" not in log and "Traceback" not in log
    assert d.proc.poll() is None


def test_sighup_keeps_what_needs_a_restart_and_says_so(daemon, world, tmp_path):
    """authSocket and frontendUser are bound at start: they keep their old
    value, a line names each; the rest (pamService, maxAuthFailures) applies."""
    passdb = tmp_path / "passdb-bob-only"
    passdb.write_text(f"bob:{world.users['bob'].password}:sendooway-reload\n")
    os.chmod(passdb, 0o600)
    matrix = "/usr/lib/x86_64-linux-gnu/pam_wrapper/pam_matrix.so"
    service = os.path.join(world.pam_dir, "sendooway-reload")
    with open(service, "w") as f:
        f.write(f"auth required {matrix} passdb={passdb}\n"
                f"account required {matrix} passdb={passdb}\n")
    try:
        d = daemon()
        _rewrite(d, f"authSocket = {tmp_path}/elsewhere.sock\nfrontendUser = root\n"
                    "pamService = sendooway-reload\nmaxAuthFailures = 1\n")
        log = _hup(d, 1)
        assert "reload: authSocket changed; it takes effect only after a restart" in log
        assert "reload: frontendUser changed; it takes effect only after a restart" in log
        assert f"reloaded {d.config_path}" in log
        assert not os.path.exists(f"{tmp_path}/elsewhere.sock")
        # still on the old socket; the new PAM service knows only bob
        ch = d.connect()
        assert login(ch, "bob", world.users["bob"].password) == AuthOk("bob")
        ch.close()
        ch = d.connect()
        assert login(ch, "alice", world.users["alice"].password) == AuthFail()
        assert closed_after(ch)  # maxAuthFailures = 1
    finally:
        os.unlink(service)


def test_a_busy_worker_finishes_its_lookup_and_none_is_served_from_it_after(
        clean_homes, monkeypatch):
    """In-process, with a real fork server: at the reload an idle worker is
    killed at once; a busy one answers the lookup it took before the reload
    (old config) and is then retired, so the lookup queued behind it goes to
    a worker forked with the new config."""
    old_text = "smarthostMapping = direct:* old.example 25 noAuth\n"
    new_text = "smarthostMapping = direct:* new.example 25 noAuth\n"
    alice, bob = _users.lookup("alice"), _users.lookup("bob")
    marker = os.path.join(alice.home, "slow")
    real = _reader._lookup_wire

    def slow(cfg, who, sender=None):  # inherited by the workers (forked after this)
        if who.name == "alice" and os.path.exists(marker):
            time.sleep(0.5)
        return real(cfg, who, sender)

    monkeypatch.setattr(_reader, "_lookup_wire", slow)

    async def server(p, user) -> str:
        found = await p.lookup(user)
        assert not found.incomplete, found.failure
        return found.route_for(f"{user.name}@example.org").route.server

    async def scenario(p, fs):
        assert await server(p, alice) == "old.example"
        assert await server(p, bob) == "old.example"
        before = {user.name: w.pid for user, w in p._workers.items()}
        open(marker, "w").close()
        took = asyncio.ensure_future(server(p, alice))
        await asyncio.sleep(0.2)  # the worker has taken it
        queued = asyncio.ensure_future(server(p, alice))
        await asyncio.sleep(0.05)
        fs.reconfigure(new_text, parse_config(new_text, "t.conf"))
        p.reconfigured()
        assert gone(before["bob"])  # idle: killed at once
        assert alive(before["alice"])  # busy: finishes first
        assert await took == "old.example"
        assert await queued == "new.example"
        assert gone(before["alice"])
        os.unlink(marker)
        assert await server(p, bob) == "new.example"
        assert await server(p, alice) == "new.example"

    fs = ForkServer(parse_config(old_text, "t.conf")).start()
    p = WorkerPool(fs)
    try:
        asyncio.run(scenario(p, fs))
    finally:
        p.close()
        fs.stop()


def test_the_daemon_survives_sighups_in_quick_succession(daemon, world):
    world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC)
    # a large config (comments) makes each reload take a while: signals
    # arrive during one
    d = daemon("# padding\n" * 50000 + "validUser = alice\n")
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    assert isinstance(route(ch, "alice@example.org"), RouteOk)
    for _ in range(2):
        d.proc.send_signal(signal.SIGHUP)
    for _ in range(10):
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(0.005)
    d.wait_log("reloaded ")
    time.sleep(0.5)
    assert d.proc.poll() is None, d.log()
    log = d.log()
    assert "reload failed" not in log and "internal error" not in log
    assert isinstance(route(ch, "alice@example.org"), RouteOk)  # old connection, new worker
    ch.close()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    ok = route(ch, "alice@example.org")
    assert isinstance(ok, RouteOk) and ok.server == "smtp-fetchmail.example"
    ch.close()


def test_listening_frontend_survives_sighup_and_serves_on(world):
    with open_tmp() as tmp:
        config = front_config(tmp, world)
        d = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            fe.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while "SIGHUP" not in fe.log():
                assert fe.proc.poll() is None, f"SIGHUP ended sendooway -b ({fe.proc.returncode})"
                assert time.monotonic() < deadline, fe.log()
                time.sleep(0.02)
            assert "restart it to apply changes" in fe.log()
            time.sleep(0.2)
            assert fe.proc.poll() is None
            with fe.smtp() as s:
                s.starttls(context=world.ssl_context())
                s.ehlo()
                code, _ = s.docmd("AUTH", "PLAIN " + login_plain(
                    "alice", world.users["alice"].password))
                assert code == 235
                code, text = s.mail("alice@unrouted.example")
                assert code == 550 and text.startswith(b"5.7.1")
        finally:
            code = fe.stop()
            d.stop()
        assert code == 0  # and SIGTERM still ends it cleanly


def test_systemd_unit_reloads_and_man_pages_say_what_signals_do():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment]
    with open(os.path.join(REPO, "packaging", "systemd", "sendooway-auth.service")) as f:
        cp.read_string(f.read())
    assert cp["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
    for page in ("sendooway-auth.8", "sendooway.1"):
        with open(os.path.join(REPO, "docs", "man", page)) as f:
            text = f.read()
        assert ".SH SIGNALS" in text, page
        section = text.split(".SH SIGNALS", 1)[1].split("\n.SH ", 1)[0]
        for sig in ("SIGTERM", "SIGINT", "SIGHUP"):
            assert sig in section, (page, sig)


def test_a_reload_that_exposes_passwords_says_so(daemon, world):
    """The start-up warning about a world-readable config holding upstream
    passwords was given at start and by --check, not when a reload brought
    such a mapping in: an admin adding a direct: line with a password to
    the 0644 file and reloading was never told."""
    d = daemon("validUser = alice\n")
    assert "every local user can read it" not in d.log()
    _rewrite(d, "validUser = alice\nsmarthostMapping = direct:*@corp.example smtp.corp.example"
                " 587 relay-user Rel-Secret-8 tls\n")
    os.chmod(d.config_path, 0o644)
    log = _hup(d, 1)
    assert f"reloaded {d.config_path}" in log
    assert f"{d.config_path} holds upstream passwords" in log and "mode 0644" in log
    assert "Rel-Secret-8" not in log


def test_systemd_is_told_of_the_reload_and_its_end(daemon, world):
    """Type=notify with ExecReload: RELOADING=1 (with MONOTONIC_USEC, as
    systemd 253+ wants) when the reload starts and READY=1 when it is over,
    also when it failed (the old config serves on), so `systemctl reload`
    and `systemctl status` show what happened."""
    import socket as _socket

    d = daemon("validUser = alice\n")
    path = os.path.join(d.dir, "notify.sock")
    os.unlink(path)
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(5)
    try:
        _hup(d, 1)
        first, second = listener.recv(512).decode(), listener.recv(512).decode()
        assert first.startswith("RELOADING=1\nMONOTONIC_USEC="), first
        assert int(first.rpartition("=")[2]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert second == "READY=1\nSTATUS=serving"

        _rewrite(d, "validUser = alice\nbogusKeyword = 1\n")
        _hup(d, 2)
        assert listener.recv(512).decode().startswith("RELOADING=1\n")
        assert listener.recv(512).decode() == ("READY=1\nSTATUS=reload failed, old config kept"
                                              " (see the log)")
    finally:
        listener.close()
