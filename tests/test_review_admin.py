"""Review of the admin-facing surface (sendooway.conf parsing, the two command
lines, `sendooway-auth --check`, a running daemon's SIGHUP): what a mail
admin touches when deploying and running sendooway. Each test below failed
on the code it was written against, for the reason its docstring gives; all
use the real commands in the fake world (nss_wrapper, pam_wrapper). Each
defect is fixed; the tests stay as their proof.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from sendooway_shared.config import ConfigError, load_config
from sendooway_shared.protocol import AuthOk
from tests.auth_helpers import daemon, login  # noqa: F401 - daemon is a fixture

BIN = os.path.dirname(sys.executable)
FRONT = os.path.join(BIN, "sendooway")
AUTH = os.path.join(BIN, "sendooway-auth")

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")


def _kill_group(proc: subprocess.Popen) -> None:
    """End a process started with start_new_session=True and all it forked."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


@as_root
def test_sighup_with_the_config_replaced_by_a_fifo_does_not_stall_the_daemon(daemon, world):
    """DEFECT (rule: docs/decisions/deployment.md "SIGHUP": a config that does
    not pass gives `reload failed, old config kept: FILE...` and nothing
    changes; auth.md reads users' files with O_NONBLOCK so "a FIFO cannot hang
    it"; the review brief: never a hang): `read_text()` opens the config with a
    plain blocking open(). After the admin's config path becomes a FIFO (a
    botched `mkfifo`/process-substitution deploy, or a config generator's named
    pipe nobody writes to), SIGHUP makes the daemon block in open() on its
    event loop: no reload line is ever logged and every login of every user
    hangs until someone writes to the pipe. The same open() hangs
    `sendooway -c FIFO` and `sendooway-auth -c FIFO` at start forever.
    Correct: open with O_NONBLOCK and refuse anything that is not a regular
    file (or a character device such as /dev/null) with `FILE: not a regular
    file`, so the reload fails, the old config stays and logins go on."""
    d = daemon("validUser = alice\n")
    os.unlink(d.config_path)
    os.mkfifo(d.config_path, 0o600)
    try:
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 4
        while "reload failed" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reload failed, old config kept" in d.log(), \
            f"no reload result logged 4 s after SIGHUP (daemon stuck in open()):\n{d.log()}"
        ch = d.connect(timeout=4)
        assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
        ch.close()
    finally:
        # unblock a daemon stuck in open(): a writer that closes gives it EOF
        try:
            fd = os.open(d.config_path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass


@as_root
def test_test_session_with_stdin_from_dev_null_ends_without_traceback(tmp_path):
    """DEFECT (rule: DESIGN.md "Command lines": `sendooway -c /dev/null -l '&2'`
    must give a working session; without -b one session on stdin/stdout; the
    review brief: never a traceback or a hang): with standard input
    /dev/null (a script, cron, a systemd unit's default StandardInput=null,
    `ssh host sendooway ... </dev/null`), `_streamable()` treats every
    character device as pollable, asyncio's epoll refuses /dev/null with
    EPERM, the frontend prints "Exception in callback ... PermissionError:
    [Errno 1] Operation not permitted" with a traceback, never sees the end
    of input, and sits there until `timeout` (300 s with /dev/null as
    config). Correct: a character device that epoll cannot watch is bridged
    like a regular file (or read directly), the session sees EOF at once and
    ends (exit 0) with no traceback."""
    proc = subprocess.Popen(
        [FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket", str(tmp_path / "none.sock")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        out, err = proc.communicate(timeout=8)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        pytest.fail("the session on stdin /dev/null was still running after 8 s; stderr:\n"
                    + err.decode(errors="replace"))
    finally:
        _kill_group(proc)
    assert out.startswith(b"220 "), out
    assert b"Traceback" not in err, err.decode(errors="replace")
    assert proc.returncode == 0


@as_root
def test_check_with_an_empty_user_name_does_not_start_the_daemon(tmp_path):
    """DEFECT (rule: DESIGN.md "Command lines": `sendooway-auth --check USER` is
    the admin's report; docs/man/sendooway-auth.8 EXIT STATUS: 2 for a bad
    command line): `cli.main` tests `if args.check:`, so `--check ''` (a
    script's `--check "$user"` with an unset variable) is taken as no
    --check at all: sendooway-auth starts the root daemon in the foreground
    on authSocket (in production /run/sendooway/auth.sock, taking it over if
    the real daemon is down) and never returns. Correct: `args.check is not
    None`; an empty user name is a usage error (exit 2, message on stderr)
    or at least a report saying the account does not exist (exit 1)."""
    conf = tmp_path / "c.conf"
    sock = tmp_path / "run" / "auth.sock"
    conf.write_text(f"authSocket = {sock}\n")
    proc = subprocess.Popen([AUTH, "-c", str(conf), "-l", str(tmp_path / "auth.log"),
                             "--check", ""],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=6)
    except subprocess.TimeoutExpired:
        started = sock.exists()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        finally:
            _kill_group(proc)
        pytest.fail("--check '' did not return within 6 s"
                    + (f" (a daemon listens on {sock})" if started else ""))
    finally:
        _kill_group(proc)
    assert proc.returncode in (1, 2), (proc.returncode, out, err)
    assert not sock.exists()


@as_root
@pytest.mark.parametrize("how", ["closed-pipe", "full-disk"])
def test_check_output_that_cannot_be_written_gives_no_traceback(tmp_path, how):
    """DEFECT (rule: the review brief and STYLE.md "Errors carry context a user
    can act on": never a traceback; `sendooway-auth --check USER | head -1`
    is what an admin types): `check.report` prints with no guard, so when the
    reader of its output has gone (`| head -1`, `| grep -q`, a pager quit
    early) the admin gets a 10-line Python traceback ending in
    "BrokenPipeError: [Errno 32] Broken pipe", and on a full disk
    (`> /dev/full`) one ending in "OSError: [Errno 28] No space left on
    device". Correct: a closed pipe ends the report silently (as coreutils
    do: exit by SIGPIPE or a non-zero status, nothing on stderr); another
    write error is one line `sendooway-auth: cannot write the report: No
    space left on device` and a non-zero exit."""
    conf = tmp_path / "c.conf"
    conf.write_text("")
    if how == "closed-pipe":
        r, w = os.pipe()
        os.close(r)  # the reader is gone before the first line
        out_fd = w
    else:
        out_fd = os.open("/dev/full", os.O_WRONLY)
    try:
        res = subprocess.run([AUTH, "-c", str(conf), "--check", "alice"], stdin=subprocess.DEVNULL,
                             stdout=out_fd, stderr=subprocess.PIPE, timeout=20)
    finally:
        os.close(out_fd)
    err = res.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    assert res.returncode != 0


@as_root
@pytest.mark.parametrize("backend", ["none", "LDAP"])
def test_check_reports_a_backend_the_daemon_refuses_as_a_bad_config(tmp_path, backend):
    """DEFECT (rule: docs/decisions/auth.md "--check": exit 2 when the config is
    bad; "authBackend = none ... An authenticator running as root refuses it
    at start (exit 2)", LDAP likewise; man sendooway-auth(8) EXIT STATUS 2):
    the admin checks a config before deploying it with `sendooway-auth -c
    NEW --check alice` and gets exit 0, "result: 1 usable account(s)", for a
    config the daemon refuses to start with. For `authBackend = none` the
    report is plainly false: it says "note: authBackend = none accepts only
    root", when a root authenticator accepts nobody (it does not start, and
    a root frontend answers every client 421). Correct: --check applies
    Config.backend_refusal(geteuid()) as the daemon does, prints the same
    reason, and exits 2."""
    conf = tmp_path / "c.conf"
    conf.write_text(f"authBackend = {backend}\n"
                    "smarthostMapping = direct:*@x.example smtp.x.example 587 u Chk-Pw-31 tls\n")
    os.chmod(conf, 0o600)
    res = subprocess.run([AUTH, "-c", str(conf), "--check", "alice"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=20)
    assert "Chk-Pw-31" not in res.stdout + res.stderr
    assert "accepts only root" not in res.stdout, res.stdout
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)


def test_config_with_a_utf8_byte_order_mark_gets_a_usable_error(tmp_path):
    """DEFECT (rule: DESIGN.md "Configuration": every error names file:line and
    is one an admin can act on; STYLE.md "Errors carry context a user can
    act on"): a sendooway.conf saved by an editor that writes a UTF-8 BOM
    (Windows Notepad, some web panels) fails with
    `c.conf:1: unknown keyword '...' (did you mean 'timeout'?)` — the
    keyword the admin sees in the file IS `timeout`, and the invisible BOM
    is never named. Correct: either skip a leading BOM (the file is UTF-8
    text, which is what is required) or say so:
    `c.conf:1: starts with a UTF-8 byte order mark (BOM); save the file
    without it`."""
    conf = tmp_path / "c.conf"
    conf.write_bytes(b"\xef\xbb\xbftimeout = 30\n")
    try:
        cfg = load_config(str(conf))
    except ConfigError as exc:
        msg = str(exc).lower()
        assert "byte order mark" in msg or "bom" in msg, str(exc)
    else:
        assert cfg.timeout == 30


@as_root
def test_auth_socket_path_too_long_is_explained(tmp_path):
    """DEFECT (rule: DESIGN.md "Configuration": every error names what is wrong;
    STYLE.md "Errors carry context a user can act on"; man sendooway-auth(8)
    EXIT STATUS 2 with a message): an `authSocket` (or `--socket`) longer
    than a UNIX socket address can hold (107 bytes on Linux: a deep
    RuntimeDirectory, a long host-specific path) makes bind() raise
    OSError("AF_UNIX path too long"), which has no strerror, and
    `listen_unix` prints `exc.strerror`: the admin reads
    `sendooway-auth: cannot listen on /long/path: None`. Correct: say why
    (`... path too long: at most 107 bytes for a UNIX socket`), best already
    when the config is parsed (`sendooway.conf:N: authSocket: ...`)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    sock = run / ("s" * (120 - len(str(run))) + ".sock")
    assert len(str(sock)) > 108
    conf = tmp_path / "c.conf"
    conf.write_text("")
    res = subprocess.run([AUTH, "-c", str(conf), "-l", str(tmp_path / "auth.log"),
                          "--socket", str(sock)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert not res.stderr.rstrip().endswith(": None"), res.stderr
    assert "too long" in res.stderr, res.stderr
