"""Processes review: `sendooway -b` (it runs as nobody, whose RLIMIT_NPROC
counts every thread of every daemon running as nobody) meeting the limit
while a user's MAIL needs a host name looked up. The real programs: a
`sendooway-auth` daemon, the frontend as a subprocess (upstream names
from an nss_wrapper hosts file), an aiosmtpd upstream and smtplib as the
client; the limit is set with prlimit on the running frontend and taken
away in `finally`."""

from __future__ import annotations

import os
import random
import smtplib
import socket
import subprocess
import time

import pytest

from .auth_helpers import Daemon
from .front_util import FRONT, Frontend, front_config, open_tmp
from .test_review_exhaustion import _prlimit, _smtp_login

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real limits and users need root")


def _nproc_hard(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        return next(line for line in f if line.startswith("Max processes")).split()[3]


def _mails_at_once(clients: list[smtplib.SMTP], sender: str, within: float) -> list:
    """MAIL on every client before any reply is read (their lookups run
    side by side): each reply, or the error that came instead of one
    within `within` seconds."""
    for c in clients:
        c.sock.settimeout(within)
        c.putcmd("MAIL", f"FROM:<{sender}>")
    replies = []
    for c in clients:
        try:
            replies.append(c.getreply())
        except smtplib.SMTPException as e:
            replies.append(e)
    return replies


def test_a_lookup_that_no_thread_could_take_gives_the_users_turn_back(
        world, clean_homes, upstream_factory):
    """At most LOOKUPS_PER_USER (2) of one user's name lookups run at once;
    a lookup that finds no thread to run in (RLIMIT_NPROC of nobody
    reached: the pool's submit raises) must give its turn back, or each
    such failure leaves the user one lookup fewer for as long as the
    frontend runs: after two, no MAIL of his needing a lookup is ever
    answered before `timeout` (a mutation review: the give_back() in
    `_lookup` was not pinned). Here: on a fresh frontend, whose lookup
    pool has started no thread yet, both of alice's sessions get a plain
    451 and one log line each while no thread can start; once threads are
    back, the same two sessions' MAILs, side by side, are answered at
    once, and their messages are delivered."""
    up = upstream_factory(tls="plain", require_tls=False, accounts={"u": "p"})
    with open_tmp() as tmp:
        hosts = tmp / "hosts"
        hosts.write_text("127.0.0.1 relay.test\n")
        os.chmod(hosts, 0o644)
        env = world.env()
        env["NSS_WRAPPER_HOSTS"] = str(hosts)
        config = front_config(tmp, world, "addReceivedField = no\nsmarthostMapping ="
                              f" direct:*@example.org relay.test {up.port} u p\n")
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log"), env=env).start()
        try:
            pid = fe.proc.pid
            hard = _nproc_hard(pid)
            clients = [_smtp_login(fe, world, "alice") for _ in range(2)]
            _prlimit(pid, f"--nproc=1:{hard}")
            try:
                for c in clients:
                    code, text = c.docmd("MAIL FROM:<alice@example.org>")
                    assert (code, text[:5]) == (451, b"4.4.1"), (code, text)
            finally:
                _prlimit(pid, f"--nproc={hard}:{hard}")
            log = fe.log()
            failed = [line for line in log.splitlines()
                      if "relay.test: cannot look the name up now (can't start new thread)" in line]
            assert len(failed) == 2, log[-3000:]  # both submits failed: no thread had started
            for c in clients:
                assert c.docmd("RSET")[0] == 250
            start = time.monotonic()
            replies = _mails_at_once(clients, "alice@example.org", 5)
            assert [r[0] if isinstance(r, tuple) else r for r in replies] == [250, 250], (
                replies, fe.log()[-3000:])
            assert time.monotonic() - start < 5
            for c in clients:
                for command in ("RCPT TO:<rcpt@example.net>", "DATA"):
                    assert c.docmd(command)[0] in (250, 354)
                c.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
                assert c.getreply()[0] == 250
                c.quit()
        finally:
            fe.stop()
            daemon.stop()
        log = fe.log()
        assert "Traceback" not in log and "relay failed" not in log, log[-3000:]
        assert len(up.messages) == 2


def test_lookups_that_no_thread_could_take_are_not_made_later_for_nobody(
        world, clean_homes, upstream_factory):
    """DEFECT: the lookup pool's submit() queues the work first and then
    starts a thread for it; when no thread could start (RLIMIT_NPROC of
    nobody reached), the MAIL got its plain 451 but the work stayed
    queued, outside every user's turns. Once threads were back, the first
    thread started ran every such lookup first, one after the other, for
    nobody: with a name whose name servers do not answer (the case the
    turns are for), each MAIL tried during the shortage made everyone's
    next lookup wait one more resolver timeout (here 1 s each; with the
    resolver's defaults 10 s, so a few MAILs outlast the `timeout` and
    every user's lookup fails). Correct: a lookup that could not be
    started is dropped, and the next one is made at once. The frontend
    runs in a mount namespace of its own whose /etc/resolv.conf names a
    server that never answers; relay.test is in nss_wrapper's hosts file,
    slow.test only in that silent DNS."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("no mount namespace to give the frontend a resolv.conf of its own")
    up = upstream_factory(tls="plain", require_tls=False, accounts={"u": "p"})
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes queries, never answers
    for _ in range(20):
        server = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.53"
        try:
            silent.bind((server, 53))
            break
        except OSError:
            continue
    else:
        raise AssertionError("no loopback address with port 53 free")
    with silent, open_tmp() as tmp:
        hosts = tmp / "hosts"
        hosts.write_text("127.0.0.1 relay.test\n")
        resolv = tmp / "resolv.conf"
        resolv.write_text(f"nameserver {server}\noptions timeout:1 attempts:1\n")
        for path in (hosts, resolv):
            os.chmod(path, 0o644)
        env = world.env()
        env["NSS_WRAPPER_HOSTS"] = str(hosts)
        config = front_config(tmp, world, "addReceivedField = no\n"
                              f"smarthostMapping = direct:*@slow.example slow.test {up.port} u p\n"
                              f"smarthostMapping = direct:*@example.org relay.test {up.port} u p\n")
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log"), env=env, argv0=[
            "unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            str(resolv), FRONT])
        fe.start()
        try:
            pid = fe.proc.pid
            hard = _nproc_hard(pid)
            alice = _smtp_login(fe, world, "alice")
            bob = _smtp_login(fe, world, "bob")
            _prlimit(pid, f"--nproc=1:{hard}")
            try:
                for _ in range(6):
                    assert alice.docmd("MAIL FROM:<alice@slow.example>")[0] == 451
                    assert alice.docmd("RSET")[0] == 250
            finally:
                _prlimit(pid, f"--nproc={hard}:{hard}")
            assert fe.log().count("slow.test: cannot look the name up now") == 6, fe.log()[-3000:]
            start = time.monotonic()
            code, text = bob.docmd("MAIL FROM:<bob@example.org>")
            took = time.monotonic() - start
            assert code == 250, (code, text, fe.log()[-3000:])
            assert took < 3, f"bob's MAIL answered after {took:.1f}s"
            for c in (alice, bob):
                c.quit()
        finally:
            fe.stop()
            daemon.stop()
        log = fe.log()
        assert "Traceback" not in log, log[-3000:]
