"""Sixth review: an adversarial review of the changes made on 2026-11-26
(7d554e7..HEAD: the fork-server pidfd watcher, quiet logging failures, the
RFC 1870 size count and the DATA log lines, enhanced-code lending,
_refuse_mail, the longer AUTH line, the config file checks and BOM, the
`--check` exit codes, the /dev/null bridge). The real sendooway-auth daemon
and the real `sendooway-auth`/`sendooway` commands run in the fake world;
the relay tests run the real session core, driver and Relay in-process
against a scripted upstream on 127.0.0.1 with a stand-in authenticator link.
Each test below failed on the code as reviewed, for the reason its docstring
gives; each is fixed (_refuse_mail gave way to a rule in the session core:
RCPTs right behind a refused MAIL get 503 without an error point)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from sendooway_shared.config import MAX_CONFIG_BYTES, ConfigError, load_config

from .auth_helpers import daemon, fork_server  # noqa: F401 - daemon is a fixture
from .scripted_relay import LOGIN, converse
from .scripted_relay import careful as _careful, codes as _codes

BIN = os.path.dirname(sys.executable)
FRONT = os.path.join(BIN, "sendooway")
AUTH = os.path.join(BIN, "sendooway-auth")

def _converse(monkeypatch, script, steps: list[bytes], **cfg_kw):
    return converse(monkeypatch, script, steps, **cfg_kw)


def _message_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ": message user=alice" in ln]


# ------------------------------------------------------------------ findings

@pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")
def test_a_service_manager_stop_is_not_reported_as_a_failure(daemon):
    """DEFECT (rule: docs/decisions/auth.md: the fork server dying "(the OOM
    killer, a stray kill)" stops the daemon with exit status 1 "for
    Restart=on-failure"; systemd.kill(5): the shipped sendooway-auth.service
    has the default KillMode=control-group, so `systemctl stop` sends
    SIGTERM to the main process and then to every other process of the
    unit, the fork server included; a normal stop must exit 0, or systemd
    marks the unit failed): the fork server keeps SIGTERM's default
    disposition (_reader._serve), so it dies of that same SIGTERM, and
    whenever the daemon's event loop sees its pidfd readable before it ran
    its own SIGTERM handler (a busy loop, or the scheduler running the fork
    server first: simulated here by holding the daemon stopped while both
    signals arrive, in systemd's order), `_fork_server_gone` logs "the
    reader fork server killed by SIGTERM; route lookups cannot work without
    it: stopping (exit status 1) for the service manager to restart us" and
    the daemon exits 1. Without the hold the same race was lost in 22 of 30
    runs when the fork server's signal came first. Correct: a fork server
    ended by the stop itself is no failure: exit 0 and no such error (e.g.
    the fork server ignores SIGTERM and ends on EOF of its socket, or the
    watcher looks at the stop request / the signal before deciding)."""
    d = daemon()
    fs = fork_server(d)
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        os.kill(d.proc.pid, signal.SIGTERM)  # systemd: the main process first,
        os.kill(fs, signal.SIGTERM)          # then the rest of the unit's cgroup
        time.sleep(0.2)  # (the fork server died of it here, before the fix)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    code = d.proc.wait(10)
    log = d.log()
    assert "restart us" not in log, log
    assert code == 0, log


def test_a_config_with_a_byte_order_mark_is_silently_cut_at_1_mib(tmp_path):
    """DEFECT (rule: docs/man/sendooway.conf.5 "The file may be at most 1 MiB
    of UTF-8 text (a leading byte order mark is skipped)"; STYLE.md "parse
    untrusted input with explicit bounds" and errors a user can act on — a
    bound is an error, never a silent cut): read_text (shared/config.py)
    reads MAX_CONFIG_BYTES + 1 octets and only then strips a BOM, so with a
    BOM it gets 3 octets less of the text than it checks: the "larger than
    1048576 bytes" check can never fire for a file that starts with a BOM.
    Observed: a file of exactly 1 MiB of text after its BOM, ending in
    `maxAuthFailures = 100`, loads without an error as maxAuthFailures =
    10 (its last 2 octets cut off); a 1 MiB + 100 octet file with a BOM
    loads with everything after the first 1 MiB silently dropped (the same
    file without the BOM is refused, "larger than 1048576 bytes"). Correct:
    the bound applies to the text after the BOM (read 3 more octets, or
    strip first and then read), so the first file loads whole
    (maxAuthFailures = 100) and the second is refused like its BOM-less
    twin."""
    last = b"maxAuthFailures = 100\n"
    body = bytearray()
    while len(body) < MAX_CONFIG_BYTES - len(last):
        n = min(200, MAX_CONFIG_BYTES - len(last) - len(body))
        body += (b"#" + b"x" * (n - 2) + b"\n") if n >= 2 else b"\n"
    body += last
    assert len(body) == MAX_CONFIG_BYTES
    exact = tmp_path / "exact.conf"
    exact.write_bytes(b"\xef\xbb\xbf" + bytes(body))
    assert load_config(str(exact)).maxAuthFailures == 100

    over = b"#" + b"y" * (MAX_CONFIG_BYTES + 100) + b"\n" + last
    plain_over = tmp_path / "over.conf"
    plain_over.write_bytes(over)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(str(plain_over))
    bom_over = tmp_path / "bom-over.conf"
    bom_over.write_bytes(b"\xef\xbb\xbf" + over)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(str(bom_over))


def test_rcpts_past_the_cap_behind_an_unrouted_mail_end_the_session(monkeypatch):
    """DEFECT (rule: docs/decisions/frontend.md "RCPTs pipelined behind a MAIL
    that gets no route (550) ... get 503 each, as relay replies: no error
    point ... counting them ended a 25-recipient message's session with
    421" and "a message to 250 recipients must not end the session";
    RFC 2920 3.1: the client sends the whole group before it sees the
    MAIL reply): SessionRunner._refuse_mail takes the pipelined RCPTs with
    Session.pipelined_rcpt(), which stops at the 100-recipient cap, so the
    RCPTs from the 101st on are handled afterwards as commands in the
    authenticated state: 503 plus an error point each. A client pipelining
    MAIL from an unrouted sender, 130 RCPTs and DATA gets 550, 100 × 503,
    then 20 more 503 and "421 4.7.0 Too many errors, closing connection";
    its RSET and QUIT are never answered. Correct: every RCPT of the group
    behind the refused MAIL is answered 503 without an error point (the
    cap is meaningless without a transaction), the session goes on and the
    client's RSET gets 250."""
    rcpts = b"".join(b"RCPT TO:<r%d@x.example>\r\n" % i for i in range(130))
    out, up, log = _converse(monkeypatch, _careful,
                             [LOGIN + b"MAIL FROM:<a@unrouted.example>\r\n" + rcpts + b"DATA\r\n",
                              b"RSET\r\nQUIT\r\n"])
    codes = _codes(out)
    assert codes[:4] == [220, 250, 235, 550], out[:400]
    assert 421 not in codes, out[-300:]
    assert codes[4:4 + 130] == [503] * 130
    assert codes[-2:] == [250, 221], out[-300:]


def test_a_pipelined_data_the_upstream_answers_421_leaves_no_message_line(monkeypatch):
    """DEFECT (rule: docs/decisions/relay.md "One log line per message ...
    also for messages that never reached the upstream (... `DATA refused:
    ...` ...)", the change's own aim "an upstream refusing DATA (or failing
    at DATA) now gets its message log line"): the upstream accepts MAIL and
    RCPT and answers DATA "421 4.3.2 shutting down". Sent one by one, the
    log gets `message user=alice ... upstream=DATA refused: 451 4.3.2
    shutting down`. Sent as one pipelined group (MAIL, RCPT, DATA: what
    Thunderbird and Outlook do with PIPELINING), Relay._group_replies keeps
    the 421 as _broken and Relay.data_start returns `_broken` at its top,
    before any _log_message: the client gets 451 but the log has no message
    line at all (likewise a 2xx/3xx nonsense answer to a grouped DATA, or a
    connection lost while reading the group's DATA reply). Correct: the
    same single message line as for the unpipelined DATA."""

    async def data(up, c):
        await c.send(b"421 4.3.2 shutting down\r\n")
        return False

    async def script(up, c):
        await _careful(up, c, data=data)

    out, up, log = _converse(monkeypatch, script,
                             [LOGIN + b"MAIL FROM:<a@b.example>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n",
                              b"QUIT\r\n"])
    assert _codes(out)[-4:] == [250, 250, 451, 221], out
    assert up.messages == []
    lines = _message_lines(log)
    assert len(lines) == 1, log
    assert "from=<a@b.example> rcpts=1" in lines[0] and "451" in lines[0], lines


def test_a_message_refused_at_its_end_as_too_big_is_logged_under_the_limit(monkeypatch):
    """DEFECT (rule: docs/decisions/relay.md "One log line per message ...
    bytes=B ... B is the message as the client sent it, its last line's
    CRLF included"; RFC 1870 3): with extMessageSize = 99 the client sends
    a 100-octet message (98 octets and CRLF). The new end-of-data check
    (Session._finish_data) rightly refuses it 552, but the message line
    says `bytes=98 ... upstream=aborted, no final dot sent` (Relay._bytes
    counts the last CRLF only in data_end, and data_abort never gets it),
    while the frontend line says "message exceeds the size limit": an admin
    reads a 98-octet message refused as larger than 99. Correct: the
    message line of a message refused after its end counts its last CRLF
    too: bytes=100."""
    msg = b"x" * 98 + b"\r\n"
    out, up, log = _converse(monkeypatch, _careful,
                             [LOGIN + b"MAIL FROM:<a@b.example>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n",
                              msg + b".\r\n", b"QUIT\r\n"], extMessageSize=99)
    assert _codes(out)[-2:] == [552, 221], out
    assert up.messages == []
    lines = _message_lines(log)
    assert len(lines) == 1, log
    assert int(re.search(r"bytes=(\d+)", lines[0]).group(1)) == len(msg) == 100, lines[0]


def test_check_with_stdout_closed_is_a_traceback_and_exit_1(tmp_path):
    """DEFECT (rule: the change's own contract in docs/decisions/deployment.md
    "Admin surface": `--check` output errors "exit 3 either way", without a
    traceback; sendooway-auth(8) exit 1 means "no usable mapping"; the
    review brief: never a traceback): with stdout closed (`>&-`, as a cron
    job or a script with a closed descriptor runs it), Python sets
    sys.stdout to None; report() "writes" through print(file=None), which
    writes nothing, and report_to_stdout then calls sys.stdout.flush():
    AttributeError, a traceback on stderr, exit status 1 — which reads as
    "no usable mapping" although the user has one (the same report exits 0
    on a terminal). Correct: an unwritable (closed) stdout is an output
    error like /dev/full: one line on stderr, exit 3, no traceback."""
    conf = tmp_path / "check.conf"
    conf.write_text("smarthostMapping = direct:* 127.0.0.1 2525 noAuth\n")
    ok = subprocess.run([AUTH, "-c", str(conf), "--check", "root"], capture_output=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    r = subprocess.run(["/bin/sh", "-c", 'exec "$0" "$@" >&-', AUTH, "-c", str(conf),
                        "--check", "root"], capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert "Traceback" not in err, err
    assert r.returncode == 3, (r.returncode, err)


def test_the_lost_line_count_leaves_out_the_lines_lost_after_the_note(tmp_path):
    """DEFECT (rule: docs/decisions/deployment.md "A log that cannot be
    written ... one line ...: `sendooway: cannot write the log to FILE
    (reason): N line(s) lost`"; an admin must be able to trust N): the note
    counts only the lines lost up to the moment it is written (the first
    failure: always 1); the lines lost after it are reported by the next
    note, which comes only on a failure 60 s later — never, in a process
    that ends before (every inetd/xinetd session is one process, `--check`
    too). A stdin/stdout session that logs 3 lines (as the same session
    with a writable log shows) prints "cannot write the log to /dev/full
    (No space left on device): 1 line(s) lost" and nothing else: 2 lost
    lines are never reported. Correct: the lines lost since the last note
    are reported when the process ends (logging.shutdown / atexit), so
    that the counts add up to the lines lost. (The existing
    test_cli.py::test_a_log_that_cannot_be_written_is_one_short_note_on_stderr
    asserts exactly one note; with such a fix it would allow a closing one.)"""
    script = b"EHLO x\r\nNOOP\r\nQUIT\r\n"
    log = tmp_path / "front.log"
    r = subprocess.run([FRONT, "-c", "/dev/null", "-S", "-l", str(log)], input=script,
                       capture_output=True, timeout=60)
    assert b"221 " in r.stdout
    pid = re.search(r"sendooway\[(\d+)\]", log.read_text()).group(1)
    written = [ln for ln in log.read_text().splitlines() if f"sendooway[{pid}]:" in ln]
    assert len(written) >= 2, written

    r = subprocess.run([FRONT, "-c", "/dev/null", "-S", "-l", "/dev/full"], input=script,
                       capture_output=True, timeout=60)
    assert b"221 " in r.stdout
    notes = re.findall(r"^sendooway: cannot write the log to /dev/full \(.*\): (\d+) line\(s\) lost$",
                       r.stderr.decode(), re.M)
    assert notes, r.stderr
    assert sum(map(int, notes)) == len(written), (notes, written)
