"""Adversarial review of the frontend changes f3e34e3..HEAD (LF lines on
stdio, enhanced codes on relayed replies, MAIL line limit, stuffed-dot line
limit, local parts, MAIL parameter values, AUTH=, -b service names and
-l '&1', the start-up 421's linger, the socketpair authenticator's stderr,
route_ok.ca_pem, early signals, authBackend refusals).

Each test is one finding and failed against the code as reviewed, for the
reason its docstring gives; each is fixed."""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from sendooway_shared.types import Route, Secret, TlsMode
from sendooway_front import _authlink
from sendooway_front._relay import Relay
from sendooway_front._relay_api import MailParams
from tests.front_util import FRONT, socket_client_session
from tests.upstream import capture_log, config, info, run
from tests.deploy_world import deployment, upstream  # noqa: F401 - fixtures


# ------------------------------------------------------------ helpers


def _bad_version_ca_pem() -> str:
    """A PEM certificate whose version field says v4 (INTEGER 3): what a
    local user may put in the sslCA file of their own ~/.sendoowayrc. The
    authenticator passes it on (it only looks for a BEGIN CERTIFICATE line)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "my ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    v3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2 (v3)
    assert der.count(v3) == 1
    der = der.replace(v3, bytes.fromhex("a003020103"))
    return ("-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der).decode()
            + "-----END CERTIFICATE-----\n")


# ------------------------------------------------------------ route_ok.ca_pem


def test_user_ca_pem_that_cryptography_refuses_is_a_tls_failure_not_a_leaked_connection():
    """_tls.client_context loads a route's ca_pem with
    x509.load_pem_x509_certificates and catches ValueError and crypto.Error
    only. A certificate with a bad version field raises
    cryptography.x509.InvalidVersion (an Exception, not a ValueError): it
    escapes client_context, _open_upstream (which aborts the upstream
    connection only for the exceptions it lists) and Relay.mail. The driver
    then logs a traceback and answers 451 "Relay failed", and the TCP
    connection already open to the upstream is never closed: one fd per
    MAIL in the shared -b frontend, for as long as the (user-chosen)
    upstream keeps it open. Expected: a TLS failure reply (4xx from
    UpstreamError) and the connection closed."""
    pem = _bad_version_ca_pem()

    async def go():
        closed = asyncio.Event()
        opened = asyncio.Event()

        async def handle(reader, writer):
            opened.set()
            try:
                while await reader.read(4096):
                    pass
            except ConnectionError:
                pass
            closed.set()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        route = Route("127.0.0.1", port, TlsMode.TLS, auth=False, password=Secret(""),
                      source="/home/alice/.sendoowayrc:1", ca_file="/home/alice/my-ca.pem",
                      ca_pem=pem)
        log, _ = capture_log()
        # (the upstream never answers: with the CA loaded, the handshake
        # times out; 1 s is enough for that)
        relay = Relay(config(timeout=1), log)
        async with server:
            try:
                reply = await relay.mail(info(), route, "alice@example.org", MailParams())
                raised = None
            except Exception as e:  # noqa: BLE001
                reply, raised = None, e
            await opened.wait()
            try:
                await asyncio.wait_for(closed.wait(), 3)
                was_closed = True
            except asyncio.TimeoutError:
                was_closed = False
            relay._drop()
        return reply, raised, was_closed

    reply, raised, was_closed = run(go())
    problems = []
    if raised is not None:
        problems.append(f"Relay.mail raised {type(raised).__name__}: {raised}")
    elif not 400 <= reply.code < 500:
        problems.append(f"reply {reply}")
    if not was_closed:
        problems.append("the upstream connection was left open")
    assert not problems, problems


# ------------------------------------------------------------ the start-up 421's linger


def test_start_up_421_linger_is_bounded_in_time_not_per_read():
    """cli._linger ("read and drop for a moment", 2 s) sets a 2 s timeout
    on each recv and reads until 64 KiB or EOF: a client that sends one
    octet a second keeps the refused inetd process (root, before the
    privilege drop) for 65536 reads, about 18 hours, instead of 2 s. Here
    an inetd-style start that fails at once (-l '&1' without -b) and a
    client trickling a byte every 0.5 s: the process must be gone within a
    few seconds of the 421."""
    client, server = socket.socketpair()
    proc = subprocess.Popen([FRONT, "-c", "/dev/null", "-l", "&1"],
                            stdin=server.fileno(), stdout=server.fileno(),
                            stderr=subprocess.DEVNULL)
    server.close()
    try:
        client.settimeout(10)
        got = client.recv(4096)
        assert got.startswith(b"421"), got
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 8:
            try:
                client.send(b"x")
            except OSError:
                break
            time.sleep(0.5)
        alive_after = time.monotonic() - t0
        still_running = proc.poll() is None
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert not still_running, f"still lingering {alive_after:.1f}s after its 421"


# ------------------------------------------------------------ sendooway -b's private authenticator


_SLOW_DAEMON = """\
import os, signal, sys, time
with open(sys.argv[-1], "w") as f:
    f.write(f"{os.getpid()} {int(signal.getsignal(signal.SIGTERM))}")
time.sleep(1.5)  # starting up: imports, config, users, PAM, the fork server
# serving: like sendooway-auth's event loop, SIGTERM now means stop
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(0.1)
"""


def test_private_authenticator_stopped_while_starting_up_really_stops(tmp_path, monkeypatch):
    """The root watcher of spawn_daemon now runs `trap "" INT HUP TERM`
    before it starts the daemon in the background, and a disposition set
    to ignore survives fork and exec: sendooway-auth starts with SIGTERM
    ignored (SIG_IGN) until its event loop installs a handler. When the
    lifeline closes while the daemon is still starting (the frontend gave
    up waiting for READY=1, or died), the watcher's `kill -TERM` is lost:
    the root daemon goes on to serve on its private socket for ever and
    the watcher waits for it for ever (the directory is never removed).
    Before the change, TERM was not trapped and the kill stopped it."""
    pidfile = tmp_path / "daemon.pid"
    fake = tmp_path / "fake-sendooway-auth"
    fake.write_text(f"#!{sys.executable}\n{_SLOW_DAEMON}")
    fake.chmod(0o755)
    monkeypatch.setattr(_authlink, "find_auth_program", lambda: str(fake))
    # the fake takes the config path argument as its pid file
    monkeypatch.setattr(_authlink, "_auth_args", lambda config, log: [str(pidfile)])
    watcher = None
    private = ""
    original_popen = subprocess.Popen

    def keep(*a, **kw):
        nonlocal watcher, private
        private = kw["env"]["SENDOOWAY_PRIVATE_DIR"]
        watcher = original_popen(*a, **kw)
        return watcher

    monkeypatch.setattr(_authlink.subprocess, "Popen", keep)
    with pytest.raises(_authlink.AuthLinkError):
        _authlink.spawn_daemon("/dev/null", None, 5.0, ready_timeout=0.5)
    assert watcher is not None
    try:
        watcher.wait(6)
        stopped = True
    except subprocess.TimeoutExpired:
        stopped = False
    pid, disposition = (int(x) for x in pidfile.read_text().split())
    if not stopped:  # stop the fake daemon: its watcher then ends and cleans up
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        watcher.wait(10)
    if private and os.path.isdir(private):
        shutil.rmtree(private, ignore_errors=True)
    assert stopped, ("the watcher and its daemon still run 6 s after the lifeline closed"
                     f" (the daemon started with SIGTERM disposition {disposition}, 1 = ignored)")


def test_b_log_to_stdout_keeps_the_private_authenticators_lines(world, deployment):
    """`sendooway -b ... -l '&1'` (new: stdout, with -b only) started as
    root with no daemon: spawn_daemon passes `-l &1` on to the private
    sendooway-auth but starts it with stdout=/dev/null, so every line the
    authenticator writes — its start-up, and the failed-login lines the
    fail2ban filter reads — is thrown away, while `-l '&2'` keeps them.
    Here: the authenticator's "started: listening on" line never shows on
    the frontend's stdout, and neither does its "auth failed: user=alice"
    line (packaging/fail2ban/filter.d/sendooway.conf matches only that
    one: with -l '&1' the jail never bans anybody)."""
    from tests import deploy_world as dw
    from tests.deploy_util import command
    import smtplib

    dep = deployment
    port = dw.free_tcp_port()
    out_path = dep.root / "stdout.log"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [command("sendooway"), "-c", str(dep.config), "-l", "&1", "-b", f"127.0.0.1:{port}"],
            env=dep.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL,
            start_new_session=True)
    try:
        dw.wait_for(lambda: proc.poll() is not None or dw.listening(port), timeout=30,
                    what="sendooway -b to listen")
        assert proc.poll() is None, out_path.read_text()
        ctx = world.ssl_context()
        with smtplib.SMTP("localhost", port, timeout=60) as client:
            client.ehlo("client.test")
            client.starttls(context=ctx)
            client.ehlo("client.test")
            # one wrong password, by PLAIN only (login() would try LOGIN too)
            client.user, client.password = "alice", "not-her-password"
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.auth("PLAIN", client.auth_plain)
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        time.sleep(1.0)  # the watcher stops the daemon after the frontend
    text = out_path.read_text()
    missing = [what for what in ("started: listening on", "auth failed: user=alice")
               if what not in text]
    assert not missing, f"not on stdout: {missing}\n{text[-3000:]}"


# ------------------------------------------------------------ enhanced status codes


def test_rcpt_refusals_behind_a_refused_mail_get_an_enhanced_code_too():
    """Relayed replies without an enhanced status code now get one
    (RFC 2034: we advertise ENHANCEDSTATUSCODES) — but not the RCPT
    replies of a pipelined group whose MAIL was refused: _group_replies
    passes a 4xx/5xx RCPT reply through untouched when not in a
    transaction. qmail (no enhanced codes, PIPELINING) refuses MAIL with
    553 and then answers each RCPT "503 MAIL first (#5.5.1)": the client
    gets MAIL's 553 with 5.0.0 added and the 503s bare."""
    from tests.test_upstream_faults import Script, _route

    async def go():
        script = Script(EHLO=b"250-qmail\r\n250 PIPELINING\r\n",
                        MAIL=b"553 sorry, that domain isn't allowed (#5.7.1)\r\n",
                        RCPT=b"503 MAIL first (#5.5.1)\r\n")
        server, port = await script.serve()
        log, _ = capture_log()
        relay = Relay(config(timeout=3), log)
        async with server:
            replies = await relay.mail_group(info(), _route(port), "a@x.y", MailParams(),
                                             ["r@x.y", "s@x.y"], False)
            relay._drop()
        return replies

    replies = run(go())
    assert [r.code for r in replies] == [553, 503, 503], replies
    bare = [str(r) for r in replies if not r.enhanced]
    assert not bare, f"relayed without an enhanced status code: {bare}"


# ------------------------------------------------------------ -l '&1'


def test_log_to_stdout_refused_where_stdout_is_the_client_under_systemd(tmp_path):
    """-l '&1' is refused "without -b" because stdout is then the SMTP
    client — but the check is `not args.bind and LISTEN_FDS not in the
    environment`, and the shipped packaging/systemd/sendooway@.service
    (Accept=yes) has StandardInput=socket and StandardOutput=socket: there
    systemd sets LISTEN_FDS and stdout is the client's connection as well.
    An admin adding -l '&1' to that unit (to log to the journal, as for the
    -b service) gets every log line of the session written into the SMTP
    conversation: the client reads "2026-... sendooway[PID]: ... connect"
    between the replies (paths, user names, routes of the session leak to
    it, and a client taking it for a reply line is desynchronised)."""
    # systemd: the connection on fd 0 and 1 (StandardInput/Output=socket) and fd 3
    script = 'exec 3<&0; export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@"'
    seen, _rc = socket_client_session(
        ["/bin/sh", "-c", script, "sh", FRONT, "-c", "/dev/null", "-l", "&1",
         "--auth-socket", str(tmp_path / "none.sock")],
        b"EHLO client.test\r\nQUIT\r\n", stderr_is_client=False)
    not_smtp = [line for line in seen.split(b"\n") if line and not re.match(rb"[2-5]\d\d[- \r]", line)]
    # refused at start (stdout is the client): one 421, no log line
    assert seen.startswith(b"421 4.3.0"), seen
    assert not not_smtp, f"log lines sent to the SMTP client: {not_smtp[:5]}"
