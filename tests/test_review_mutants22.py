"""Mutation review (mut22) of the latest product changes: shared/cli.py
listen_fds() and its users (socket_activated, activated_sockets, the fd-3
connection of Accept=yes, the refusal of xinetd `wait = yes`), _stream's
_lookup with give_back(), the routing-loop checks (_loops, the driver's
client_destinations looked up at AUTH), serve_listening's SIGHUP handler
and its unserve in `finally`, and shared/smtp_syntax.py.

52 mutants of the code as it is (HEAD 900a680), one at a time, each run
against the test files closest to it: activation (test_review_activation,
test_review_mutants20, _mutants6, _mutants19; survivors also against
test_third_review, test_front_second_review, test_review_mutants7,
test_review_inetd), lookups and loops (test_review_insider,
test_review_mutants21, test_front_driver), SIGHUP (test_review_mutants20,
test_review_confdiff, test_review_relay_fuzz, test_third_review,
test_review_inetd), smtp_syntax (test_session, test_protocol,
test_review_mutants3, _mutants11, test_review_addresses,
test_review_fixes_front, test_client_conformance,
test_review_parsers_oracle). 31 killed by those files, 21 survived; this
file kills 6 of them, 13 are equivalent, 2 are gaps left unpinned. No
product defect found.

MUTANTS ("killed" means by the existing files)
listen_fds and its users (shared/cli.py, sendooway_front/cli.py, _server.py):
  killed: A01 LISTEN_PID only looked for, not compared with our pid; A06
  the fd-3 connection's LISTEN_FDS compared as text with "1"; A09
  socket_activated taking LISTEN_FDS=0; A14 a second connection taken;
  A15 a connection among listening sockets taken; A17 xinetd's listening
  stdin not refused.
  Killed only here: A02 a missing LISTEN_FDS read as "1" and A12 `count
  < 0` for `count < 1` in activated_sockets (LISTEN_PID ours with
  LISTEN_FDS unset or zero: the inetd client got 421, "fd 3 is not open"
  / "systemd passed no usable socket"); A03 isascii() dropped (an
  Arabic-Indic "1" taken for one socket); A07 stdin's being a socket not
  looked at for the fd-3 connection (Accept=yes with StandardInput=socket
  and stderr inherited: `-l '&2'` served, the log written to the client);
  A18 one_session not looking at socket activation (an Accept=no unit
  with -l '&1' refused to start).
  Equivalent: A04 lstrip("0") dropped: int() differs only beyond 4300
  digits, which activated_sockets refuses as "not a number" either way
  (only which fd gets that refusal's 421 changes). A08 a listening fd 3 taken for the connection
  (mutants20's I02: on a start-up failure only, the 421 to a listening
  socket fails quietly and the message also reaches -l's log). A13
  LISTEN_* left in the environment (mutants20's H13: every reader checks
  LISTEN_PID, the frontend's pid, which no child has).
_stream._lookup:
  killed: S01 give_back not releasing the semaphore; S02 give_back not
  leaving; S03 a lookup given up while waiting for its turn releasing a
  turn it never took (3 at once); S06 the user's entry never deleted.
  Equivalent: S05 `_lookup_turns.get(key) is turn` dropped: the entry is
  this turn for as long as its count is above 0 (deleted only when it
  reaches 0). S07 `if who` always true: every lookup the product makes
  names the user (a MAIL comes after AUTH); only tests call open_tcp
  without one. S09 give_back after the answer is set, not before: the
  waiting session resumes from a callback the loop runs after settle
  returns, so the order is not seen.
  Gap, not pinned: S04 a submit that cannot start a thread (RLIMIT_NPROC)
  leaving without releasing the turn: that user has one lookup fewer at
  once until all his lookups end (the entry is then made anew). A thread
  that cannot start is not produced as root without faking the pool.
routing loops (_driver, _loops, _server):
  killed: L01 the PROXY header's destination ignored; L04 the loop check
  after the authenticator's answer; L08 unserve not in `finally` and L09
  no unserve (test_front_driver's cancelled server).
  Equivalent: L02 the client's stream address not among its destinations
  (mutants21's N01: a direct connection to us is refused by leads_back
  before it logs in). L06 a None destination given to _key: its own
  except turns the TypeError into None, skipped the same. L07
  is_unspecified dropped from leads_back: Linux reports the peer of a
  connection to 0.0.0.0 or :: as 127.0.0.1 or ::1 (checked), which
  is_loopback covers.
  Gap, not pinned: L03 the destination before a kernel port redirect
  (SO_ORIGINAL_DST) not looked at: no iptables/nft here (mutants21 tests
  the parsing of the kernel's struct).
SIGHUP (_server):
  killed: H01 add_signal_handler instead of the plain handler
  (test_third_review: SIGHUP right after loop.close()); H05 serve_one not
  stopping on SIGHUP.
  Killed only here: H03 a SIGHUP that came while starting not told.
  Equivalent: H02 _hangup() run in the signal handler itself (mutants20's
  X5: the handler runs in the main thread between bytecodes, the logging
  lock is re-entrant).
shared/smtp_syntax.py:
  killed: P02 the path length in characters; P03 no blank after the
  colon; P04 junk glued to the path; P05 no backslash escape in quotes;
  P07 find for rfind; P08 an all-dots local part; P14 "%" in a literal;
  P15 a literal's family unchecked; P17 an empty parameter; P18 a
  repeated parameter; P20 a source-route hop without "@"; P21 postmaster
  case-sensitive; P23 FROM: case-sensitive; P24 NeedsUtf8 after the
  local-part test; P11b host_a_label by Python's IDNA 2003 codec
  (test_review_mutants11: straße.test looked up as strasse.test).
  Equivalent: P06 `at < 0` for `at <= 0`: at 0 only after a source route
  leaves "@dom" (<@a:@b>), refused then as "bad local part" instead of
  "mailbox needs local-part@domain": the same 553 and --check refusal,
  other words. P10 `not c.isspace()` dropped in _ascii_stand_in: the only
  printable whitespace character is the ASCII space, which never reaches
  the non-ASCII branch (checked over every code point). P11
  transitional=True: a no-op (deprecated) in the installed idna 3.20;
  on a release that still honours it (pyproject allows >= 3.4),
  test_review_mutants11's sharp-s test would see it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from sendooway_shared.cli import EXIT_CONFIG
from tests.front_util import FRONT, front_config
from tests.test_review_activation import _activated, _finish

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts the frontend as root")


def _inetd_with(env_script: str, config: str) -> tuple[int | None, str, str]:
    """One inetd session (the connection on stdin, replies read on stdout)
    of a frontend started by `sh -c env_script; exec`: its greeting, QUIT."""
    ours, theirs = socket.socketpair()
    ours.sendall(b"QUIT\r\n")
    ours.shutdown(socket.SHUT_WR)
    proc = subprocess.Popen(["sh", "-c", env_script + '; exec "$@"', "sh", FRONT, "-c", config,
                             "-l", "&2"], stdin=theirs.fileno(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        return _finish(proc)
    finally:
        ours.close()


@pytest.mark.parametrize("fds", [None, "0", "000"], ids=["unset", "zero", "zeros"])
def test_listen_pid_of_ours_passing_nothing_leaves_an_inetd_session_served(world, tmp_path, fds):
    """Kills A02 (LISTEN_FDS missing read as "1") and A12 (`count < 0`
    for `count < 1` in activated_sockets): LISTEN_PID naming this process
    with LISTEN_FDS unset or zero passes no socket (sd_listen_fds(3) gives
    0), so the frontend is an inetd service and serves the connection on
    stdin. The mutants refused to start (exit 2: "fd 3 is not open",
    "systemd passed no usable socket") and the inetd client got a 421."""
    config = front_config(tmp_path, world, tls=False)
    script = "export LISTEN_PID=$$" + (f" LISTEN_FDS={fds}" if fds is not None else "")
    status, out, err = _inetd_with(script, config)
    assert status == 0, (status, err)
    assert out.startswith("220 ") and "\n221 " in out, out  # (text mode: \r\n read as \n)
    assert "cannot start" not in err and "systemd" not in err


def test_listen_fds_in_other_digits_is_no_number_of_sockets(world, tmp_path):
    """Kills A03 (isascii() dropped in listen_fds): "\u0661" (ARABIC-INDIC
    DIGIT ONE) is a digit to str.isdigit() and 1 to int(), but no number
    to sd_listen_fds (strtol: ASCII digits). The mutant took it for one
    socket and served the connection on fd 3; the product refuses the
    variable as it refuses "²", exit 2, before any authenticator."""
    config = front_config(tmp_path, world, tls=False)
    ours, theirs = socket.socketpair()
    proc = _activated([FRONT, "-c", config, "-l", "&2"], [theirs.fileno()], "\u0661")
    theirs.close()
    ours.settimeout(30)
    status, out, err = _finish(proc)
    heard = ours.recv(4096)
    ours.close()
    assert status == EXIT_CONFIG, (status, err)
    assert "sendooway: LISTEN_FDS='\u0661' is not a number of sockets" in err
    assert not heard.startswith(b"220"), heard
    assert "sendooway-auth" not in err and out == ""


def test_a_listening_unit_logs_to_stdout_as_minus_b_does(world, tmp_path):
    """Kills A18 (one_session = not args.bind, socket activation ignored):
    a socket unit with Accept=no passes listening sockets: the frontend
    serves many sessions, as with -b, so its stdout is no client's and
    `-l '&1'` (journald reading stdout) is allowed, as sendooway(1) says for
    -b. The mutant took the process for an inetd session and refused to
    start ("-l '&1': stdout is the SMTP client here")."""
    config = front_config(tmp_path, world, tls=False)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    where = listener.getsockname()
    proc = _activated([FRONT, "-c", config, "-l", "&1"], [listener.fileno()], "1")
    listener.close()
    try:
        client = socket.create_connection(where, timeout=30)
        greeting = client.recv(4096)
        client.sendall(b"QUIT\r\n")
        client.recv(4096)
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
    status, out, err = _finish(proc)
    assert greeting.startswith(b"220 "), (greeting, err)
    assert status == 0, (status, err)
    assert "listening on 127.0.0.1:%d" % where[1] in out, out


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def test_a_sighup_while_the_listening_frontend_starts_is_told_and_ignored(world, tmp_path):
    """Kills H03 (the SIGHUP noted during start-up not told by
    serve_listening): sendooway(1) says SIGHUP to a listening frontend is
    logged and changes nothing. One that comes while it starts (its
    private authenticator not yet ready: the frontend waits for its
    READY=1, hundreds of milliseconds) is noted by catch_early_signals;
    the mutant then dropped it without a word, where the admin who sent
    it (a logrotate postrotate, `pkill -HUP sendooway` by habit) is owed the
    same "SIGHUP ignored" line as later."""
    config = front_config(tmp_path, world, tls=False)
    log = tmp_path / "front.log"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    where = listener.getsockname()
    proc = _activated([FRONT, "-c", config, "-l", str(log)], [listener.fileno()], "1")
    listener.close()
    try:
        deadline = time.monotonic() + 20
        while not _children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.002)  # the private authenticator is started: it is not ready yet
        proc.send_signal(signal.SIGHUP)
        client = socket.create_connection(where, timeout=30)
        greeting = client.recv(4096)
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
    status, _out, err = _finish(proc)
    assert status == 0, (status, err)
    assert greeting.startswith(b"220 "), greeting
    text = log.read_text()
    assert text.count("SIGHUP ignored") == 1, text
    assert text.index("SIGHUP ignored") < text.index("stopping:"), text


def test_accept_yes_with_the_connection_on_stdin_too_keeps_stderr_out_of_the_dialogue(
        world, tmp_path):
    """Kills A07 (_activated_connection not looking at whether stdin is a
    socket): systemd's Accept=yes with StandardInput=socket passes the
    connection as fd 3 (LISTEN_FDS=1) and as fd 0 and 1, and as fd 2 too
    when StandardError= is left to inherit. The frontend must then see
    the client on fd 0, whose socket is also its stderr: `-l '&2'` would
    write the log into the SMTP dialogue, and is refused with the 421 an
    inetd client gets. The mutant took fd 3 for the client, no longer saw
    that stderr is the client's connection and served the session with
    its log lines sent to the client between the replies."""
    config = front_config(tmp_path, world, tls=False)
    ours, theirs = socket.socketpair()
    ours.settimeout(30)
    ours.sendall(b"EHLO c.test\r\nQUIT\r\n")
    script = 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&0'
    proc = subprocess.Popen(["sh", "-c", script, "sh", FRONT, "-c", config, "-l", "&2"],
                            stdin=theirs.fileno(), stdout=theirs.fileno(),
                            stderr=theirs.fileno())
    theirs.close()
    heard = b""
    try:
        while chunk := ours.recv(4096):
            heard += chunk
    finally:
        ours.close()
    status = proc.wait(timeout=30)
    assert heard == b"421 4.3.0 Service not available, closing connection\r\n", heard
    assert status == EXIT_CONFIG
