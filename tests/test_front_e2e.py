"""The real `sendooway` command with real clients (smtplib, swaks) and the
real `sendooway-auth`: stdio, -b, -s, socket activation; the privilege drop;
logs without passwords."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from .auth_helpers import Daemon
from .fakeworld import free_port, free_port_everywhere
from .front_util import (
    FRONT, NOBODY, Frontend, front_config, login_plain, open_tmp, proc_ids, stdio_session,
    wait_port,
)

UNROUTED = "alice@unrouted.example"


@pytest.fixture
def tmp_path():
    """A temp dir the frontend user can traverse (pytest's own are 0700)."""
    with open_tmp() as d:
        yield d


@pytest.fixture(scope="module")
def setup(world):
    with open_tmp() as tmp:
        yield from _setup(world, tmp)


def _setup(world, tmp):
    config = front_config(tmp, world)
    daemon = Daemon(tmp, config).start()
    fe = Frontend(config, os.path.join(str(tmp), "front.log")).start()
    yield world, tmp, config, daemon, fe
    fe.stop()
    daemon.stop()


def passwords(world):
    return [u.password for u in world.users.values()]


def test_starttls_auth_with_smtplib_as_nobody(setup):
    world, tmp, config, daemon, fe = setup
    alice = world.users["alice"]
    with fe.smtp() as s:
        code, text = s.ehlo()
        assert code == 250 and b"STARTTLS" in text and b"PIPELINING" in text
        s.starttls(context=world.ssl_context())
        code, text = s.ehlo()
        assert b"STARTTLS" not in text and b"AUTH PLAIN LOGIN" in text
        s.login("alice", alice.password)
        # the process serving this client runs as the frontend user
        ids = proc_ids(fe.proc.pid)
        assert ids["Uid"] == [NOBODY] * 4 and ids["Gid"] == [NOBODY] * 4
        assert ids["Groups"] == []
        code, text = s.mail(UNROUTED)
        assert code == 550 and text.startswith(b"5.7.1")
        assert s.rcpt("bob@example.net")[0] == 503
        assert s.noop()[0] == 250
    log = fe.log()
    assert "user=alice: login: mechanism=PLAIN" in log
    assert "STARTTLS: TLSv1.3" in log


def test_auth_login_and_failures_close_the_session(setup):
    world, tmp, config, daemon, fe = setup
    with fe.smtp() as s:
        s.starttls(context=world.ssl_context())
        s.ehlo()
        for expected in (535, 535):
            code, _ = s.docmd("AUTH", "PLAIN " + login_plain("bob", "wrong-" + world.users["bob"].password))
            assert code == expected
        code, text = s.docmd("AUTH", "PLAIN " + login_plain("bob", "still-wrong"))
        assert code == 421
    with fe.smtp() as s:
        s.starttls(context=world.ssl_context())
        s.ehlo()
        s.user, s.password = "bob", world.users["bob"].password
        code, _ = s.auth("LOGIN", s.auth_login)
        assert code == 235


def test_swaks_starttls_auth(setup):
    world, tmp, config, daemon, fe = setup
    for mech in ("PLAIN", "LOGIN"):
        r = subprocess.run(
            ["swaks", "--server", f"{fe.host}:{fe.port}", "--tls", "--auth", mech,
             "--auth-user", "carol", "--auth-password", world.users["carol"].password,
             "--from", "carol@unrouted.example", "--to", "bob@example.net",
             "--helo", "swaks.test", "--quit-after", "FROM", "--timeout", "20"],
            capture_output=True, text=True, timeout=60)
        out = r.stdout + r.stderr
        assert "235 2.7.0 Authentication successful" in out, out
        assert "550 5.7.1" in out, out


def test_logs_never_hold_a_password(setup):
    world, tmp, config, daemon, fe = setup
    s = fe.smtp()
    s.starttls(context=world.ssl_context())
    s.ehlo()
    for user in ("dave", "alice"):
        s.docmd("AUTH", "PLAIN " + login_plain(user, world.users["carol"].password))
    s.docmd("AUTH LOGIN")
    s.docmd(login_plain("x", world.users["bob"].password))
    s.close()
    time.sleep(0.2)
    text = fe.log() + daemon.log()
    assert "login failed: user='dave'" in text
    for pw in passwords(world):
        assert pw not in text
        assert login_plain("dave", pw) not in text


def test_required_encryption_refuses_auth_in_clear(world, tmp_path):
    config = front_config(tmp_path, world, "mailerEncryption = required\n")
    daemon = Daemon(tmp_path, config).start()
    fe = Frontend(config, str(tmp_path / "front.log")).start()
    try:
        with fe.smtp() as s:
            code, text = s.ehlo()
            assert b"AUTH" not in text
            code, text = s.docmd("AUTH", "PLAIN " + login_plain("alice", world.users["alice"].password))
            assert code == 538
            s.starttls(context=world.ssl_context())
            s.ehlo()
            s.login("alice", world.users["alice"].password)
        time.sleep(0.2)
        assert daemon.log().count("auth ok: user=alice") == 1
        assert "auth failed" not in daemon.log()
    finally:
        fe.stop()
        daemon.stop()


def test_implicit_tls_and_both_address_families(world, tmp_path):
    config = front_config(tmp_path, world)
    daemon = Daemon(tmp_path, config).start()
    port = free_port_everywhere()  # (bound on both families)
    fe = Frontend(config, str(tmp_path / "front.log"), args=["-s"], bind=str(port), port=port).start()
    try:
        for host in ("127.0.0.1", "::1"):
            with smtplib.SMTP_SSL(host, port, context=world.ssl_context(), timeout=20) as s:
                code, text = s.ehlo()
                assert b"STARTTLS" not in text
                s.login("dave", world.users["dave"].password)
                assert s.mail(UNROUTED)[0] == 550
    finally:
        fe.stop()
        daemon.stop()


def test_implicit_tls_client_on_the_starttls_port_fails_at_once(world, tmp_path):
    """A mail client set for port 465 (implicit TLS) pointed at the STARTTLS
    port: its handshake fails at once and the log says why, instead of both
    sides waiting `timeout` (300 s) for the other."""
    config = front_config(tmp_path, world, "timeout = 60\n")
    daemon = Daemon(tmp_path, config).start()
    fe = Frontend(config, str(tmp_path / "front.log")).start()
    try:
        started = time.monotonic()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            smtplib.SMTP_SSL(fe.host, fe.port, context=world.ssl_context(), timeout=20)
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 5
        while "TLS handshake on a plaintext port" not in fe.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "refused: TLS handshake on a plaintext port" in fe.log(), fe.log()
    finally:
        fe.stop()
        daemon.stop()


def test_sigterm_stops_accepting_and_lets_sessions_finish(world, tmp_path):
    config = front_config(tmp_path, world)
    daemon = Daemon(tmp_path, config).start()
    fe = Frontend(config, str(tmp_path / "front.log")).start()
    try:
        s = fe.smtp()
        s.ehlo()
        fe.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):
            socket.create_connection((fe.host, fe.port), timeout=2).close()
        assert s.noop()[0] == 250  # the running session goes on
        s.quit()
        assert fe.proc.wait(10) == 0
    finally:
        fe.stop()
        daemon.stop()


def test_read_timeout_gives_421(world, tmp_path):
    config = front_config(tmp_path, world, "timeout = 1\n")
    daemon = Daemon(tmp_path, config).start()
    fe = Frontend(config, str(tmp_path / "front.log")).start()
    try:
        with socket.create_connection((fe.host, fe.port), timeout=10) as c:
            f = c.makefile("rb")
            assert f.readline().startswith(b"220 ")
            assert f.readline().startswith(b"421 4.4.2")
            assert f.readline() == b""
        assert "timeout: no complete input for 1.0s" in fe.log()
    finally:
        fe.stop()
        daemon.stop()


# ------------------------------------------------------------ stdio (inetd)

LOGIN_SCRIPT = "EHLO client.test\r\nAUTH PLAIN {auth}\r\nMAIL FROM:<{sender}>\r\nQUIT\r\n"


def test_stdio_devnull_config_root_starts_its_own_authenticator(world, tmp_path):
    """`sendooway -c /dev/null -l '&2'`: pipes for fd 0 and fd 1, no daemon:
    as root it starts sendooway-auth on a socketpair, then drops to nobody."""
    script = LOGIN_SCRIPT.format(auth=login_plain("alice", world.users["alice"].password),
                                 sender=UNROUTED).encode()
    out, err, rc = stdio_session(
        [FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket", str(tmp_path / "none.sock")], script)
    assert rc == 0, err
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"220 ")
    assert b"235 2.7.0" in out and b"550 5.7.1" in out and out.endswith(b"221 2.0.0 Bye\r\n")
    assert b"started socketpair to sendooway-auth" in err
    assert world.users["alice"].password.encode() not in err


def test_rcpts_pipelined_behind_an_unrouted_mail_cost_no_error_points(world, tmp_path):
    """A pipelining client (msmtp, Thunderbird) sends MAIL and every RCPT
    at once. When the MAIL has no route (550), its RCPTs get 503 — and
    used to earn an error point each, so a message to 25 recipients ended
    the session with 421 "too many errors", while the same RCPTs behind a
    MAIL the upstream refused cost nothing (a conformance review). The
    client could not have known: it sent them before the 550."""
    rcpts = "".join(f"RCPT TO:<r{i}@example.net>\r\n" for i in range(25))
    script = (f"EHLO client.test\r\nAUTH PLAIN {login_plain('alice', world.users['alice'].password)}\r\n"
              f"MAIL FROM:<{UNROUTED}>\r\n{rcpts}DATA\r\nNOOP\r\nQUIT\r\n").encode()
    out, err, rc = stdio_session(
        [FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket", str(tmp_path / "none.sock")], script)
    assert rc == 0, err
    codes = [int(line[:3]) for line in out.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [220, 250, 235, 550] + [503] * 25 + [503, 250, 221], out


def test_stdio_non_root_without_daemon_is_a_session_without_logins(world, tmp_path):
    """A test session piped in by a user who is not root, no daemon: the
    original's own checks ran `sendooway -c /dev/null -l '&2'` so, and all of
    them failed on an at once 421. Now the session runs; a login is a
    temporary failure (454, never 535: no password was checked), and the log
    says why. (An inetd client, a socket on stdin, still gets the 421: see
    test_xinetd_nobody_block_without_daemon_greets_421.)"""
    sock = tmp_path / "absent.sock"
    out, err, rc = stdio_session(
        [FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket", str(sock)],
        b"EHLO x\nMAIL FROM:<a@b.c>\nAUTH LOGIN\n*\nAUTH PLAIN AGFsaWNlAHB3\nQUIT\n",
        user=NOBODY)
    codes = [int(line[:3]) for line in out.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [220, 250, 530, 334, 501, 454, 221], (out, err)
    assert rc == 0
    assert f"no authenticator at {sock}".encode() in err
    assert b"AUTH gets 454" in err


def test_stdio_as_nobody_with_daemon(setup):
    world, tmp, config, daemon, fe = setup
    script = LOGIN_SCRIPT.format(auth=login_plain("bob", world.users["bob"].password),
                                 sender=UNROUTED).encode()
    # started as nobody (xinetd user = nobody): the key is not readable, so no TLS
    plain_config = front_config(tmp, world, tls=False, name="notls.conf")
    out, err, rc = stdio_session([FRONT, "-c", plain_config, "-l", "&2"], script, user=NOBODY)
    assert b"235 2.7.0" in out and b"550 5.7.1" in out, (out, err)


# ------------------------------------------------------------ systemd socket activation


@pytest.mark.parametrize("mode", ["accept-yes", "accept-no", "inetd"])
def test_socket_activation(setup, mode):
    world, tmp, config, daemon, fe = setup
    port = free_port()
    flags = {"accept-yes": ["-a"], "accept-no": [], "inetd": ["-a", "--inetd"]}[mode]
    log = os.path.join(str(tmp), f"activate-{mode}.log")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", *flags, FRONT, "-c", config,
         "-l", log], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port("127.0.0.1", port, proc)
        for _ in range(2):
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as s:
                s.starttls(context=world.ssl_context())
                s.ehlo()
                s.login("alice", world.users["alice"].password)
                assert s.mail(UNROUTED)[0] == 550
        r = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--auth", "LOGIN",
             "--auth-user", "bob", "--auth-password", world.users["bob"].password,
             "--from", UNROUTED, "--to", "carol@example.net", "--quit-after", "FROM",
             "--timeout", "20"], capture_output=True, text=True, timeout=60)
        assert "235 2.7.0" in r.stdout and "550 5.7.1" in r.stdout, r.stdout + r.stderr
        if mode == "accept-no":
            with open(log) as f:
                assert "listening on" in f.read()
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


# ------------------------------------------------------------ start-up errors


@pytest.mark.parametrize("cert, key, message", [
    ("cert", "/nonexistent/key.pem", "cannot read TLS key"),
    ("cert", "cert", "not a usable PEM private key"),
    ("cert", "other", "does not match"),
])
def test_bad_tls_key_is_a_clear_startup_error(world, tmp_path, cert, key, message):
    import trustme

    other = tmp_path / "other.key"
    trustme.CA().issue_cert("x.test").private_key_pem.write_to_path(str(other))
    paths = {"cert": world.cert_file, "other": str(other)}
    cfg = tmp_path / "c.conf"
    cfg.write_text(f"sslCert = {paths.get(cert, cert)}\nsslKey = {paths.get(key, key)}\n")
    # a listening frontend does not start: exit 2, the config line named
    r = subprocess.run([FRONT, "-c", str(cfg), "-l", "&2", "-b", "127.0.0.1:0"], input=b"",
                       capture_output=True, timeout=30)
    assert r.returncode == 2
    assert message in r.stderr.decode() and f"{cfg}:2: " in r.stderr.decode()
    assert r.stdout == b""
    # one session (inetd, by hand) is served as the original served it:
    # the error logged, STARTTLS refused (454), no login without TLS
    r = subprocess.run([FRONT, "-c", str(cfg), "-l", "&2"], input=b"EHLO c\r\nSTARTTLS\r\n",
                       capture_output=True, timeout=30)
    assert message in r.stderr.decode() and "STARTTLS is refused in this session" in r.stderr.decode()
    assert r.stdout.startswith(b"220 ") and b"\r\n454 4.7.0" in r.stdout, r.stdout
    assert b"AUTH PLAIN" not in r.stdout


# ------------------------------------------------------------ unreadable installation


def test_sessions_work_with_the_install_tree_unreadable(world, tmp_path, upstream_factory):
    """As when the interpreter's tree is under /root (0700): a copy of the
    code and its dependencies in a root-only directory; after the drop to
    nobody nothing more can be imported from it."""
    import sendooway_front
    import sendooway_shared

    venv_site = os.path.dirname(os.path.dirname(ssl.__file__))  # only for the system lib check
    assert venv_site
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    site = private / "site"
    src_site = os.path.dirname(os.path.dirname(__import__("msgpack").__file__))
    shutil.copytree(src_site, site, ignore=shutil.ignore_patterns(
        "__editable__*", "*.pth", "pip*", "setuptools*", "_pytest", "pytest*", "hypothesis*",
        "pygments*", "aiosmtpd*", "trustme*"))
    shutil.copytree(os.path.dirname(sendooway_front.__file__), site / "sendooway_front")
    shutil.copytree(os.path.dirname(sendooway_shared.__file__), site / "sendooway_shared")
    os.chmod(private, 0o700)
    up = upstream_factory(tls="starttls", accounts={"up-alice": "up-secret"})
    config = front_config(tmp_path, world, f"sslCA = {world.ca_file}\n"
                          f"smarthostMapping = direct:*@example.org localhost {up.port}"
                          " up-alice up-secret tls\n")
    daemon = Daemon(tmp_path, config).start()
    boot = (f"import sys; sys.path[:0] = [{str(site)!r}]; "
            "from sendooway_front.cli import main; sys.argv[0] = 'sendooway'; sys.exit(main())")
    fe = Frontend(config, str(tmp_path / "front.log"),
                  argv0=["/usr/bin/python3", "-s", "-c", boot]).start()
    try:
        for _ in range(2):
            with fe.smtp() as s:
                s.starttls(context=world.ssl_context())
                s.ehlo()
                s.login("alice", world.users["alice"].password)
                assert s.mail(UNROUTED)[0] == 550
                assert proc_ids(fe.proc.pid)["Uid"][0] == NOBODY
                # the relay's paths too: upstream STARTTLS, certificate check, AUTH
                assert s.sendmail("alice@example.org", ["bob@example.net"], b"Subject: x\r\n\r\nhi\r\n") == {}
        assert len(up.messages) == 2 and set(up.logins) == {"up-alice"}  # (cache: one login)
        probe = subprocess.run(
            ["/usr/bin/python3", "-c", f"open({str(site / 'msgpack' / '__init__.py')!r})"],
            user=NOBODY, capture_output=True, text=True)
        assert probe.returncode != 0 and "PermissionError" in probe.stderr
    finally:
        fe.stop()
        daemon.stop()
    assert "Traceback" not in fe.log()


def test_authenticator_restart(world, tmp_path):
    """The daemon dies: the running session answers AUTH with 454, new ones
    get a 421 greeting; once it is back, sessions work again."""
    config = front_config(tmp_path, world)
    daemon = Daemon(tmp_path, config).start()
    fe = Frontend(config, str(tmp_path / "front.log")).start()
    try:
        s = fe.smtp()
        s.starttls(context=world.ssl_context())
        s.ehlo()
        daemon.stop()
        code, _ = s.docmd("AUTH", "PLAIN " + login_plain("alice", world.users["alice"].password))
        assert code == 454
        s.close()
        with pytest.raises(smtplib.SMTPConnectError) as exc:
            fe.smtp()
        assert exc.value.smtp_code == 421
        assert "cannot connect to the authenticator at " + str(tmp_path) in fe.log()
        daemon = Daemon(tmp_path, config).start()
        with fe.smtp() as s:
            s.starttls(context=world.ssl_context())
            s.ehlo()
            s.login("alice", world.users["alice"].password)
    finally:
        fe.stop()
        daemon.stop()


def test_message_through_the_live_relay(world, tmp_path, upstream_factory):
    """The whole path with smtplib: STARTTLS, AUTH, a pipelined transaction
    and a dot-stuffed message that the upstream receives byte for byte."""
    up = upstream_factory(tls="plain", accounts=None)
    config = front_config(tmp_path, world, "addReceivedField = no\n"
                          f"smarthostMapping = direct:*@example.org 127.0.0.1 {up.port} noAuth\n")
    daemon = Daemon(tmp_path, config).start()
    fe = Frontend(config, str(tmp_path / "front.log")).start()
    body = b"Subject: through\r\n\r\n.leading dot\r\n" + b"z" * 990 + b"\r\nend\r\n"
    try:
        with fe.smtp() as s:
            s.starttls(context=world.ssl_context())
            s.ehlo()
            s.login("alice", world.users["alice"].password)
            refused = s.sendmail("alice@example.org", ["bob@example.net", "carol@example.net"], body)
            assert refused == {}
        assert len(up.messages) == 1
        m = up.messages[0]
        assert m.mail_from == "alice@example.org"
        assert m.rcpt_tos == ["bob@example.net", "carol@example.net"]
        assert m.data.replace(b"\r\n", b"\n") == body.replace(b"\r\n", b"\n")
    finally:
        fe.stop()
        daemon.stop()


def test_listening_as_root_without_daemon_starts_a_private_one(world, tmp_path):
    """-b as root with no daemon: a private sendooway-auth serves all the
    sessions, and goes away with the frontend."""
    config = front_config(tmp_path, world)  # authSocket under tmp_path: nothing there
    fe = Frontend(config, str(tmp_path / "front.log")).start()
    try:
        for user in ("alice", "bob"):
            with fe.smtp() as s:
                s.starttls(context=world.ssl_context())
                s.ehlo()
                s.login(user, world.users[user].password)
                assert s.mail(UNROUTED)[0] == 550
        log = fe.log()
        assert "started " in log and "auth.sock" in log
        children = subprocess.run(["pgrep", "-P", str(fe.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 1
    finally:
        fe.stop()
    def still_there():
        return subprocess.run(["pgrep", "-f", config], capture_output=True, text=True).stdout.split()

    deadline = time.monotonic() + 10
    while still_there() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not still_there()  # neither the watcher nor the daemon outlives the frontend


def test_nossl_counts_as_encrypted(setup):
    """-S (e.g. behind stunnel): no STARTTLS offered, AUTH allowed even with
    mailerEncryption = required."""
    world, tmp, config, daemon, fe = setup
    strict = front_config(tmp, world, "mailerEncryption = required\n", name="strict.conf")
    script = LOGIN_SCRIPT.format(auth=login_plain("dave", world.users["dave"].password),
                                 sender=UNROUTED).encode()
    out, err, rc = stdio_session([FRONT, "-S", "-c", strict, "-l", "&2"], script)
    assert b"STARTTLS" not in out and b"AUTH PLAIN LOGIN" in out
    assert b"235 2.7.0" in out and b"550 5.7.1" in out, (out, err)


def test_hundreds_of_idle_sessions_and_one_that_works(setup):
    """300 idle clients in one -b process (each with its authenticator link):
    memory stays small and a real session still goes through."""
    world, tmp, config, daemon, fe = setup
    before = _rss_kib(fe.proc.pid)
    idle = []
    try:
        for _ in range(300):
            c = socket.create_connection((fe.host, fe.port), timeout=20)
            idle.append(c)
        for c in idle:
            assert c.recv(100).startswith(b"220 ")
            c.sendall(b"EHLO idle.test\r\n")
        for c in idle:
            assert c.recv(4096).startswith(b"250-")
        grown = _rss_kib(fe.proc.pid) - before
        assert grown < 300 * 64  # well under 64 KiB a session
        with fe.smtp() as s:
            s.starttls(context=world.ssl_context())
            s.ehlo()
            s.login("carol", world.users["carol"].password)
            assert s.mail(UNROUTED)[0] == 550
    finally:
        for c in idle:
            c.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
