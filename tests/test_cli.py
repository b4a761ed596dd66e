"""Both commands: -h lists every option of DESIGN.md, -V prints the version,
a broken config is reported as file:line on stderr with exit code 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from sendooway_shared import __version__
from tests.fakeworld import MACHINE_SKIP

BIN = os.path.dirname(sys.executable)
FRONT = os.path.join(BIN, "sendooway")
AUTH = os.path.join(BIN, "sendooway-auth")


def run(*args, timeout=30):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("cmd, options", [
    (FRONT, ["-h", "-V", "-s", "-S", "-c", "-b", "-l", "--auth-socket"]),
    (AUTH, ["-c", "-l", "--socket", "--check", "--sender", "-V"]),
])
def test_help_lists_every_option(cmd, options):
    r = run(cmd, "-h")
    assert r.returncode == 0, r.stderr
    for opt in options:
        assert opt in r.stdout, f"{opt} missing from {os.path.basename(cmd)} -h"


@pytest.mark.parametrize("cmd", [FRONT, AUTH])
@pytest.mark.parametrize("option", ["--help", "--version"])
def test_help_to_a_full_disk_is_one_line_not_a_traceback(cmd, option):
    with open("/dev/full", "w") as full:
        r = subprocess.run([cmd, option], stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 3
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"{os.path.basename(cmd)}: cannot write the text:"
                                " No space left on device")


@pytest.mark.parametrize("cmd", [FRONT, AUTH])
def test_help_to_a_reader_that_went_away_ends_quietly(cmd):
    rd, wr = os.pipe()
    os.close(rd)  # the reader is gone before the first write: EPIPE
    try:
        r = subprocess.run([cmd, "--help"], stdout=wr, stderr=subprocess.PIPE, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
    finally:
        os.close(wr)
    assert r.returncode == 3
    assert r.stderr == ""


@pytest.mark.parametrize("cmd", [FRONT, AUTH])
def test_a_usage_error_keeps_exit_2_when_stderr_is_full(cmd):
    with open("/dev/full", "w") as full:
        r = subprocess.run([cmd, "--no-such-option"], stdout=subprocess.PIPE, stderr=full,
                           timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2


@pytest.mark.parametrize("cmd", [FRONT, AUTH])
def test_version(cmd):
    r = run(cmd, "-V")
    assert r.returncode == 0
    assert __version__ in r.stdout


@pytest.mark.parametrize("cmd", [FRONT, AUTH])
def test_broken_config_exits_2_with_file_and_line(cmd, tmp_path):
    conf = tmp_path / "broken.conf"
    conf.write_text("timeout = 30\nsmarthostMaping = fetchmail:%h/.fetchmailrc\n")
    r = run(cmd, "-c", str(conf), "-l", "&2")
    assert r.returncode == 2
    assert f"{conf}:2: unknown keyword 'smarthostMaping'" in r.stderr
    assert "did you mean 'smarthostMapping'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", [FRONT, AUTH])
def test_missing_config_exits_2(cmd, tmp_path):
    r = run(cmd, "-c", str(tmp_path / "missing.conf"), "-l", "&2")
    assert r.returncode == 2
    assert "missing.conf: cannot read" in r.stderr
    assert "Traceback" not in r.stderr


def _inetd_run(args, stderr_is_client: bool, send: bytes = b""):
    """Run the frontend as inetd would: fd 0 and 1 (and with xinetd 2) are
    the client's socket; the client sends `send`. Returns (exit code, what
    the client read, stderr)."""
    from .test_front_proxy_e2e import read_until_closed

    client, server = __import__("socket").socketpair()
    err = server.fileno() if stderr_is_client else subprocess.PIPE
    proc = subprocess.Popen([FRONT, *args], stdin=server.fileno(), stdout=server.fileno(),
                            stderr=err)
    server.close()
    if send:
        client.sendall(send)
    _out, stderr = proc.communicate(timeout=60)
    client.settimeout(10)
    seen = read_until_closed(client)
    client.close()
    return proc.returncode, seen, (stderr or b"").decode()


@pytest.mark.parametrize("stderr_is_client", [True, False])
def test_inetd_start_up_error_gives_the_client_a_421_not_the_config(tmp_path, stderr_is_client):
    """xinetd makes the socket fd 2 too: the config error must not reach the
    client (it would show it the config), the log gets it instead."""
    conf = tmp_path / "broken.conf"
    conf.write_text("timeout = 30\nsslKey = /secret/path/key.pem\nsmarthostMaping = x\n")
    logfile = tmp_path / "front.log"
    code, seen, stderr = _inetd_run(["-c", str(conf), "-l", str(logfile)], stderr_is_client)
    assert code == 2
    assert seen == b"421 4.3.0 Service not available, closing connection\r\n"
    assert f"{conf}:3: unknown keyword 'smarthostMaping'" in logfile.read_text()
    if stderr_is_client:
        assert stderr == ""
    else:
        assert f"{conf}:3: unknown keyword" in stderr


def test_inetd_tls_key_error_is_logged_and_no_login_goes_without_tls(tmp_path):
    """A certificate that will not load, under inetd: the session is served
    as the original served it (STARTTLS offered, 454), the log names the
    config line at every session, and no login happens in clear instead
    (AUTH not offered; it used to be a 421 and exit 2)."""
    conf = tmp_path / "tls.conf"
    conf.write_text(f"sslCert = {tmp_path}/none.pem\nsslKey = {tmp_path}/none.key\n")
    logfile = tmp_path / "front.log"
    code, seen, stderr = _inetd_run(["-c", str(conf), "-l", str(logfile)], True,
                                    b"EHLO c\r\nSTARTTLS\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"
                                    b"QUIT\r\n")
    assert seen.startswith(b"220 ") and b"none" not in seen, seen
    assert b"250-STARTTLS" in seen and b"AUTH PLAIN" not in seen
    assert b"\r\n454 4.7.0" in seen and b"\r\n538 5.7.11" in seen, seen
    text = logfile.read_text()
    assert f"{conf}:1: {tmp_path}/none.pem: cannot read TLS certificate" in text, text


def test_default_log_is_syslog_facility_mail(tmp_path):
    """Without -l both programs log to syslog, facility mail: /dev/log, or
    UDP localhost:514 where there is none (as in these containers)."""
    import socket as socketmod

    if os.path.exists("/dev/log"):
        pytest.skip(MACHINE_SKIP + "a syslog daemon listens on /dev/log, so the UDP fallback is not used")
    # where SysLogHandler(("localhost", 514)) sends: the first address of
    # localhost, ::1 on a stock Debian /etc/hosts
    family, _t, _p, _c, addr = socketmod.getaddrinfo("localhost", 514, 0, socketmod.SOCK_DGRAM)[0]
    rx = socketmod.socket(family, socketmod.SOCK_DGRAM)
    try:
        rx.bind(addr)
    except OSError as exc:
        pytest.skip(f"UDP port 514 not available here: {exc}")
    rx.settimeout(10)
    try:
        r = subprocess.run([FRONT, "-c", "/dev/null"], input=b"EHLO x\r\nQUIT\r\n",
                           capture_output=True, timeout=60)
        assert r.stdout.startswith(b"220 ") and b"221 " in r.stdout, r.stdout + r.stderr
        seen = []
        while not any(b"closed: quit" in m for m in seen):
            seen.append(rx.recv(65536))
    finally:
        rx.close()
    ours = [m for m in seen if b"sendooway[" in m]
    assert ours, seen
    for m in ours:
        # <PRI>: facility mail (2) * 8 + severity; info = 6, warning = 4, error = 3
        pri = int(m[1:m.index(b">")])
        assert pri // 8 == 2, m
    assert any(m.startswith(b"<22>sendooway[") and b"connect on stdin/stdout" in m for m in ours), ours


def _inetd_session(args, script: bytes):
    """One inetd session with the socket as fd 0, 1 and 2 (xinetd): the
    bytes the client read, and the exit code."""
    import socket as socketmod

    from .test_front_proxy_e2e import read_until_closed

    client, server = socketmod.socketpair()
    proc = subprocess.Popen([FRONT, *args], stdin=server.fileno(), stdout=server.fileno(),
                            stderr=server.fileno())
    server.close()
    client.settimeout(20)
    client.sendall(script)
    seen = read_until_closed(client)
    client.close()
    return seen, proc.wait(30)


def test_a_log_that_cannot_be_written_never_reaches_the_xinetd_client():
    """A full disk under -l FILE (here /dev/full: every write fails with
    ENOSPC): logging's default is a traceback, with the record's message
    and arguments, on stderr for every line, and under xinetd stderr is the
    client's connection: the client used to read Python tracebacks (session
    ids, addresses, source paths) between the SMTP replies. Now it reads
    SMTP replies only."""
    seen, code = _inetd_session(["-c", "/dev/null", "-l", "/dev/full"],
                                b"EHLO x\r\nNOOP\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n")
    assert code == 0
    lines = seen.decode("ascii").split("\r\n")
    assert lines[-1] == ""
    assert lines[0].startswith("220 ") and lines[-2].startswith("221 "), seen
    for line in lines[:-1]:
        assert re.fullmatch(r"[2-5]\d\d[ -].*", line), line


@pytest.mark.parametrize("cmd", [FRONT, AUTH])
def test_a_log_that_cannot_be_written_is_one_short_note_on_stderr(cmd, tmp_path):
    """Where stderr is not the client, a log that cannot be written gives
    one line saying so (and how many lines were lost), not a traceback per
    log line."""
    if cmd == FRONT:
        r = subprocess.run([FRONT, "-c", "/dev/null", "-l", "/dev/full"],
                           input=b"EHLO x\r\nNOOP\r\nRSET\r\nQUIT\r\n", capture_output=True,
                           timeout=60)
        assert r.stdout.startswith(b"220 ") and b"221 " in r.stdout
    else:
        conf = tmp_path / "auth.conf"
        conf.write_text(f"authSocket = {tmp_path}/run/auth.sock\n")
        os.mkdir(tmp_path / "run", 0o755)
        proc = subprocess.Popen([AUTH, "-c", str(conf), "-l", "/dev/full"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.exists(tmp_path / "run" / "auth.sock"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.terminate()
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        r = subprocess.CompletedProcess([], proc.returncode, b"", err)
    err = r.stderr.decode()
    assert "Traceback" not in err and "Logging error" not in err, err
    # (the frontend's own: a root frontend's private authenticator logs to
    # the same -l and may add notes of its own, as sendooway-auth)
    notes = [line for line in err.splitlines()
             if line.startswith(os.path.basename(cmd) + ": cannot write the log")]
    # the first failure at once, and at exit how many were lost since
    assert len(notes) == 2, err
    assert notes[0].endswith("/dev/full (No space left on device): 1 line(s) lost")
    assert notes[1].endswith(" line(s) lost") and "Traceback" not in err


def test_a_new_log_file_is_not_world_readable(tmp_path):
    """A log names users, senders and client addresses: a file made by -l
    (both programs' setup_logging) is 0640 even under a umask of 0
    (xinetd's usual 022 made it 0644); an existing file keeps the mode its
    admin gave it."""
    import logging

    from sendooway_shared.log import setup_logging

    new, kept = tmp_path / "new.log", tmp_path / "kept.log"
    kept.touch()
    os.chmod(kept, 0o644)
    old = os.umask(0)
    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        setup_logging(str(new), "test")
        setup_logging(str(kept), "test")
    finally:
        os.umask(old)
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved:
            root.addHandler(h)
    assert oct(os.stat(new).st_mode & 0o777) == oct(0o640)
    assert oct(os.stat(kept).st_mode & 0o777) == oct(0o644)


def test_a_stop_during_start_up_is_a_clean_stop(tmp_path):
    """A SIGTERM between binding the socket and serving (systemctl stop, a
    test harness, a second admin) killed sendooway-auth by the default
    action: exit by signal and its socket file left behind. Now it is noted
    and the daemon stops cleanly as soon as it serves."""
    conf = tmp_path / "auth.conf"
    sock = tmp_path / "run" / "auth.sock"
    conf.write_text(f"authSocket = {sock}\n")
    os.mkdir(tmp_path / "run", 0o755)
    for attempt in range(5):
        proc = subprocess.Popen([AUTH, "-c", str(conf), "-l", str(tmp_path / "auth.log")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and proc.poll() is None, attempt
            time.sleep(0.001)
        proc.terminate()  # at once: the daemon is most likely still starting
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, (attempt, proc.returncode, err)
        assert not os.path.exists(sock), attempt
    with open(tmp_path / "auth.log") as f:
        log = f.read()
    assert log.count("stopped") == 5, log


@pytest.mark.parametrize("cmd, page", [(FRONT, "sendooway.1"), (AUTH, "sendooway-auth.8")])
def test_help_names_socket_activation_and_the_exit_codes_of_the_man_page(cmd, page):
    """An admin writing a unit reads --help first: it says what systemd may
    pass and lists the same exit codes as the man page's EXIT STATUS."""
    r = run(cmd, "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "LISTEN_FDS" in text and "Accept=yes" in text and "Accept=no" in text
    listed = re.findall(r"(?:Exit status:|;) (\d) ", text)
    man = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "man", page)
    with open(man, encoding="utf-8") as f:
        section = f.read().split(".SH EXIT STATUS", 1)[1].split("\n.SH ", 1)[0]
    assert listed == re.findall(r"^\.TP\n\.B (\d)$", section, re.M)
    assert page.split(".")[0] + "(" + page.split(".")[1] + ")" in text
