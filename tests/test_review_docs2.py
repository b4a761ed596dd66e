"""Second docs review (a review named "docs2"): the admin-facing docs held
against what the programs do after the day's changes (socket activation
checks, a frontend that trusts only a root authenticator, socket path
lengths, closed socket directories, serve_one's SIGTERM/SIGHUP, closed
stdin/stdout at start, the login wait, --check --sender, the null sender
logged as <>, a Latin-1 line of a user's include, LISTEN_FDS read as a
number). Each claim that could be run was run against the real programs:
the quoted log lines, exit codes and signals' effects below.

What it found (docs fixed; each test below failed before):
- sendooway(1) EXIT STATUS had no code for a closed stdin or stdout
  without -b (exit 1, `cannot start: stdout closed`), nor for what systemd
  passed that cannot be served (exit 2); its 421-on-a-failed-start
  paragraph named inetd and xinetd only, not systemd's Accept=yes on fd 3;
  its SIGHUP entry named standard input only, where a connection systemd
  passes (Accept=yes) stops alike.
- sendooway(1) and sendooway.conf(5) (authSocket) did not say that the
  frontend trusts only a root listener at authSocket (but for
  authBackend = none), nor the warning it logs;
  deployment.md's troubleshooting table had no row for that warning, nor
  for `cannot start: stdout closed`.
- sendooway(1)'s xinetd example lacked the shipped block's `flags = IPv6`
  (without it xinetd listens on IPv4 only).
- sendooway-auth(8) EXIT STATUS 2 did not name a socket path too long or a
  connection from systemd (Accept=yes), both exit 2; its LOG section
  listed the once-per-burst lines without `peer refused`, which is one
  now (protocol.md has it), and its Daemon section still said each
  stranger is logged.
- sendooway.conf(5) said nothing of a bad line in a user's include but
  that it is an error (and of the file, "UTF-8 text"): each such line,
  a Latin-1 one included since today, is skipped and the rest counts.
- deployment.md's "421 in the greeting" row did not quote the daemon's
  line for a socket directory closed to frontendUser, and its "lets root
  connect but not frontendUser" row advised only SocketUser=, where the
  frontend's message now names a closed directory instead.
- protocol.md's "Log lines" said only `=`, `"` and `\\` of printable ASCII
  are escaped (space, `<` and `>` are too) and not how the null sender
  is written (`sender=<>`, since today).
- The jail's comment and the guide's section 4 named, as the -l files
  that hold the failures, sendooway-auth's and a root frontend's under
  xinetd/inetd, not a root `sendooway -b`'s, whose private authenticator
  writes into it too.

Seen and fine: fail2ban's filter against real failures (existing tests
cover wrong passwords, PROXY v1/v2 clients and forged lines), the null
sender's `sender=<>` in both logs, protocol.md's route line, the wait of
`timeout` + 25 s (MAX_REFUSAL_PAD + MAX_FAILURE_DELAY), conf(5)'s IDNA and
local-part rule, the by-hand session of deployment.md section 6 as root
and as nobody, man pages clean under `groff -man -ww`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.deploy_util import PACKAGING, man_section, system_env
from tests.front_util import (
    FRONT, NOBODY, Frontend, front_config, front_with_daemon, login_plain, open_tmp,
)

AUTH = os.path.join(os.path.dirname(FRONT), "sendooway-auth")
DOCS = Path(__file__).resolve().parent.parent / "docs"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts the programs as root")


def _exit_codes(page: str) -> dict[int, str]:
    """EXIT STATUS of a man page: {code: its paragraph, troff removed}."""
    section = man_section(page, "EXIT STATUS").split("\n.PP\n", 1)[0]
    codes = {}
    for item in section.split(".TP\n")[1:]:
        head, _, body = item.partition("\n")
        code = int(head.split()[-1])
        codes[code] = re.sub(r"\\-", "-", re.sub(r"\n\.[A-Z]+ ?", " ", "\n" + body))
    return codes


def _code_saying(page: str, *words: str) -> list[int]:
    return [c for c, text in _exit_codes(page).items() if all(w in text for w in words)]


def _doc_regex(quoted: str) -> re.Pattern:
    """A line the docs quote, its placeholders (PATH, N) as patterns."""
    out = re.escape(quoted)
    return re.compile(out.replace("PATH", r"\S+").replace("N", r"\d+"))


def test_a_closed_stdout_exits_as_the_man_page_and_the_guide_say(world, tmp_path):
    """DOC DEFECT: without -b a closed stdout (or stdin) is a start-up error
    (docs/decisions/deployment.md: exit 1), but sendooway(1) EXIT STATUS
    named no code for it: 1 was the private authenticator and the
    privilege drop, 2 every other start-up error. The guide's
    troubleshooting table now quotes the log line with its exit status."""
    config = front_config(tmp_path, world, tls=False)
    log = tmp_path / "front.log"
    proc = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", FRONT, "-c", config, "-l", str(log)],
        input=b"QUIT\r\n", capture_output=True, timeout=30)
    said = "cannot start: stdout closed: no SMTP client to serve"
    assert said in log.read_text(), log.read_text()
    assert _code_saying("sendooway.1", "closed") == [proc.returncode]
    guide = (DOCS / "deployment.md").read_text()
    assert f"| `{said}` (exit {proc.returncode}) |" in guide


def test_the_authenticators_refusals_at_start_exit_as_its_man_page_says(tmp_path, tmp_config):
    """DOC DEFECT: sendooway-auth(8) EXIT STATUS 2 listed the reasons the
    daemon cannot start without today's two: a --socket (or authSocket)
    too long for a socket address, and a connection passed by systemd (a
    socket unit with Accept=yes). Both exit 2; the page now says so."""
    config = tmp_config(f"authSocket = {tmp_path}/run/auth.sock\n")
    long_path = str(tmp_path / ("x" * 120) / "auth.sock")
    r = subprocess.run([AUTH, "-c", config, "-l", "-", "--socket", long_path],
                       capture_output=True, text=True, timeout=30)
    assert "too long" in r.stderr, r.stderr
    assert _code_saying("sendooway-auth.8", "too long") == [r.returncode]
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen(
            ["sh", "-c", 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&4 4<&-', "sh",
             AUTH, "-c", config, "-l", "-"],
            pass_fds=[4], preexec_fn=lambda: os.dup2(theirs.fileno(), 4),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _out, err = proc.communicate(timeout=30)
    finally:
        ours.close()
        theirs.close()
    assert "Accept=yes" in err, err
    assert _code_saying("sendooway-auth.8", "Accept=yes") == [proc.returncode]
    assert "(exit 2)" in man_section("sendooway-auth.8", "ENVIRONMENT") and proc.returncode == 2


def test_the_authenticators_man_page_lists_every_line_it_logs_once_per_burst():
    """DOC DEFECT: since the activation review a refused peer is counted in
    a Tally (protocol.md: `peer refused: ...; N refused since the last such
    line`, at most one line per 10 s), but sendooway-auth(8) LOG listed
    only the connection cap and the silent connection as lines logged once
    per burst, and its Daemon section said strangers are "logged and
    dropped", as if each one were."""
    proto = (DOCS / "protocol.md").read_text()
    kinds = {m.group(1) for m in re.finditer(r"`([a-z ]+): [^`]*since the last such line`", proto)}
    assert {"peer refused", "connection refused", "silent connection closed"} <= kinds, kinds
    log = man_section("sendooway-auth.8", "LOG")
    burst = log.split("most one line every 10 seconds", 1)[1].split(".EE", 1)[0]
    assert {k for k in kinds if f"\n{k}: " not in burst} == set()
    assert "logged and dropped" not in man_section("sendooway-auth.8", "DESCRIPTION")


@pytest.fixture
def squatter():
    """A process running as nobody that listens where authSocket points
    (a directory anyone may write to) and never answers; its path."""
    shared = tempfile.mkdtemp(prefix="sendooway-docs2-")
    os.chmod(shared, 0o1777)
    path = os.path.join(shared, "auth.sock")
    code = ("import os, socket, time\n"
            f"s = socket.socket(socket.AF_UNIX); s.bind({path!r}); os.chmod({path!r}, 0o777)\n"
            "s.listen(8); time.sleep(60)\n")
    proc = subprocess.Popen(["python3", "-c", code], user=NOBODY, group=NOBODY, extra_groups=[])
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        yield path
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(shared, ignore_errors=True)


def test_the_untrusted_listener_warning_is_the_one_the_docs_quote(world, tmp_path, squatter):
    """DOC DEFECT: a frontend trusts only a root listener at authSocket (but
    for authBackend = none) and logs any other at start; neither
    sendooway(1) nor the guide's troubleshooting table said so, and an
    admin seeing the warning (or a root frontend starting its own
    authenticator next to a running "daemon") had nothing to look it up
    in. Both now quote the line; this runs a squatter as nobody and checks
    that the real warning is the one quoted, and that the session is still
    served (by the root frontend's private authenticator)."""
    config = front_config(tmp_path, world, f"authSocket = {squatter}\n", tls=False)
    log = tmp_path / "front.log"
    r = subprocess.run([FRONT, "-c", config, "-l", str(log)], input=b"EHLO c.test\r\nQUIT\r\n",
                       capture_output=True, timeout=30, env=world.env())
    assert b"\r\n221 " in r.stdout, r.stdout
    text = log.read_text()
    guide = (DOCS / "deployment.md").read_text()
    quoted = re.search(r"\| `(authSocket PATH: [^`]*)` at start \|", guide)
    assert quoted, "deployment.md's troubleshooting table has no row for the untrusted listener"
    assert _doc_regex(quoted.group(1)).search(text), text
    man = man_section("sendooway.1", "EXIT STATUS")
    man_quote = re.search(r'\.RB \( "(authSocket [^"]*)" \)', man)
    assert man_quote, man
    plain = re.sub(r"\\f[BIR]", "", man_quote.group(1))
    assert _doc_regex(plain.replace("path", "PATH")).search(text), text
    assert "started socketpair" in text
    conf5 = (DOCS / "man" / "sendooway.conf.5").read_text()
    auth_socket = conf5.split('.BR authSocket " = \\fIpath\\fR"', 1)[1].split(".TP", 1)[0]
    assert "root" in auth_socket and "authBackend = none" in auth_socket, auth_socket


def test_sighup_to_a_systemd_connection_on_fd_3_stops_as_the_man_page_says(world, tmp_path):
    """DOC DEFECT: sendooway(1) SIGNALS said of SIGHUP "One session
    (standard input): it ends the session as SIGTERM does", next to a
    SIGTERM entry naming standard input and systemd Accept=yes: serve_one
    handles both signals for both, so a connection systemd passes as fd 3
    alone (no StandardInput=socket) hears 421 4.3.2 on SIGHUP too. The
    page now names Accept=yes for SIGHUP as well."""
    signals = man_section("sendooway.1", "SIGNALS")
    hup = signals.split("\n.B SIGHUP\n", 1)[1]
    one = hup[hup.index("One session"):]
    assert "Accept=yes" in one.split(")", 1)[0], one
    config = front_config(tmp_path, world, tls=False)
    client, server = socket.socketpair()
    proc = subprocess.Popen(
        ["sh", "-c", 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&4 4<&-', "sh",
         FRONT, "-c", config, "-l", str(tmp_path / "front.log")],
        pass_fds=[4], preexec_fn=lambda: os.dup2(server.fileno(), 4),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=world.env())
    server.close()
    client.settimeout(20)
    try:
        got = b""
        while b"\r\n" not in got:
            got += client.recv(4096)
        assert got.startswith(b"220 "), got
        proc.send_signal(signal.SIGHUP)
        while chunk := client.recv(4096):
            got += chunk
    finally:
        client.close()
        rc = proc.wait(20)
    assert b"\r\n421 4.3.2 " in got, got
    assert rc == 0


def test_bad_lines_of_a_users_include_are_skipped_as_conf5_says(world, tmp_path):
    """DOC DEFECT: sendooway.conf(5) said of this file "at most 1 MiB of
    UTF-8 text", and of a user's include only that a keyword it may not
    hold "is an error naming the file and line", so an admin read a
    user's include with a Latin-1 line as refused whole (as it was until
    today's outside review). Each bad line of a user's include is skipped
    with its error and the other lines count; the page now says so. Run
    through the real --check: a Latin-1 value, a keyword not allowed, a
    bad port, an unknown mapping kind, and the good line after them."""
    conf5 = (DOCS / "man" / "sendooway.conf.5").read_text()
    user_include = conf5.split('.BR userInclude " = \\fIpath\\fR"', 1)[1].split(".TP", 1)[0]
    assert "not\nUTF-8" in user_include and "skipped" in user_include, user_include
    config = front_config(tmp_path, world, "userInclude = %h/.sendoowayrc\n", tls=False)
    world.write_user_file("alice", ".sendoowayrc", (
        b"smarthostMapping = direct:x@b.example h.example 587 u p\xfc tls\n"
        b"timeout = 5\n"
        b"smarthostMapping = direct:y@b.example h.example 5x87 u p tls\n"
        b"smarthostMapping = bogus:zz\n"
        b"smarthostMapping = direct:c@b.example h.example 587 u p tls\n"))
    try:
        r = subprocess.run([AUTH, "-c", config, "--check", "alice", "--sender", "c@b.example"],
                           capture_output=True, text=True, timeout=60, env=world.env())
    finally:
        world.clear_home("alice")
    errors = r.stdout.split("\nerrors:\n", 1)[1].split("\nroute for", 1)[0].splitlines()
    lines = [e.rsplit(".sendoowayrc:", 1)[1].split(":")[0] for e in errors]
    assert lines == ["1", "2", "3", "4"], r.stdout
    assert "not valid UTF-8 (outside a comment), line skipped" in errors[0]
    route = r"route for c@b\.example: h\.example:587 .*\.sendoowayrc:5,"
    assert re.search(route, r.stdout), r.stdout
    assert r.returncode == 0


def test_a_socket_directory_closed_to_frontenduser_is_logged_as_the_guide_quotes(world, tmp_path):
    """DOC DEFECT: the guide's "421 in the greeting" row sent the admin to
    authSocket and frontendUser only; since today the daemon names a
    directory above its socket that frontendUser may not search (root's
    0700 /run/x, accepted as safe, yet every frontend running as nobody
    found no authenticator). The row now quotes that line; this starts the
    real daemon in such a directory and matches the line it logs."""
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    os.chmod(closed, 0o700)
    config = front_config(tmp_path, world, tls=False)
    log = tmp_path / "auth.log"
    proc = subprocess.Popen([AUTH, "-c", config, "-l", str(log), "--socket",
                             str(closed / "auth.sock")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=world.env())
    front_log = tmp_path / "front.log"
    try:
        deadline = time.monotonic() + 20
        while not (closed / "auth.sock").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        # a root frontend pointed at it: root reaches the socket, nobody does not
        front_config(tmp_path, world, f"authSocket = {closed / 'auth.sock'}\n", tls=False,
                     name="front.conf")
        r = subprocess.run([FRONT, "-c", str(tmp_path / "front.conf"), "-l", str(front_log)],
                           input=b"QUIT\r\n", capture_output=True, timeout=30, env=world.env())
        assert r.stdout.startswith(b"220 "), r.stdout
    finally:
        proc.terminate()
        proc.wait(20)
    guide = (DOCS / "deployment.md").read_text()
    for quote, text in ((r"`(frontendUser U cannot reach PATH: [^`]*)`", log.read_text()),
                        (r"goes on `(the directory DIR \(mode M\) is closed to U)`",
                         front_log.read_text())):
        quoted = re.search(quote, guide)
        assert quoted, f"the guide quotes no {quote}"
        pattern = re.escape(quoted.group(1))
        for word, regex in (("U", r"\S+"), ("PATH", r"\S+"), ("DIR", r"\S+"), ("M", r"0[0-7]{3}")):
            pattern = re.sub(rf"\b{word}\b", regex.replace("\\", "\\\\"), pattern)
        assert re.search(pattern, text), (pattern, text)


def _doc_escaped() -> set[str]:
    """The printable ASCII characters protocol.md says the log escapes."""
    proto = (DOCS / "protocol.md").read_text()
    rule = proto.split("anything but printable ASCII other than", 1)[1].split("becomes", 1)[0]
    chars = set(re.findall(r"`(.)`", rule))
    return chars | ({" "} if re.search(r"\bspace\b", rule) else set())


def test_the_log_escapes_what_protocol_md_says_and_shows_the_null_sender(world, tmp_path):
    """DOC DEFECT: protocol.md's "Log lines" said values from the network
    keep every printable ASCII character but `=`, `"` and `\\`; the daemon
    (shared/log.py field) escapes space, `<` and `>` as well, and since
    today writes the null sender as `sender=<>` (not `-`, the empty value,
    nor `\\x3c\\x3e`). A user name made of every printable ASCII character
    goes through the real frontend and daemon; the characters escaped in
    its `auth failed` line are the ones the page lists, and a MAIL FROM:<>
    is logged `sender=<>`."""
    name = "".join(chr(c) for c in range(32, 127))
    with open_tmp() as tmp:
        config = front_config(tmp, world, "mailerEncryption = allowed\n", tls=False)
        with front_with_daemon(tmp, world, config) as front:
            with front.smtp() as s:
                code, _ = s.docmd("AUTH", "PLAIN " + login_plain(name, "wrong"))
                assert code == 535
                s.login("alice", world.users["alice"].password)
                assert s.mail("<>")[0] == 550
            auth_log = tmp / "auth.log"
            deadline = time.monotonic() + 15
            while "sender=<>" not in auth_log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            text = auth_log.read_text()
    failed = [x for x in text.splitlines() if "auth failed: user=" in x]
    assert len(failed) == 1, text
    value = failed[0].split("auth failed: user=", 1)[1].split(" client=", 1)[0]
    kept = set(re.sub(r"\\x[0-9a-f]{2}", "", value))
    escaped = {chr(int(h, 16)) for h in re.findall(r"\\x([0-9a-f]{2})", value)}
    assert kept | escaped == set(name) and not kept & escaped, value
    assert escaped == _doc_escaped(), (escaped, _doc_escaped())
    assert re.search(r"route: user=alice client=\S+ session=\S+ sender=<> result=none", text), text
    assert "the null\nsender is `sender=<>`" in (DOCS / "protocol.md").read_text()


@pytest.mark.skipif(not shutil.which("fail2ban-regex") or not os.path.exists(
    "/etc/fail2ban/filter.d/common.conf"), reason="fail2ban not installed")
def test_fail2ban_finds_a_root_listening_frontends_failures_in_its_log_file(world, tmp_path):
    """DOC DEFECT: the jail's comment and the guide's section 4 said that
    with -l FILE the failures are in FILE for sendooway-auth's own -l and
    for a root frontend under xinetd or inetd, whose authenticator writes
    into the frontend's file; a root `sendooway -b` with no daemon starts a
    private authenticator that does the same (spawn_daemon passes -l on),
    and an admin running it so was not told where the jail must look. Run
    for real: `sendooway -b -l FILE` as root behind a PROXY balancer,
    wrong passwords from two clients the headers name (v1 TCP4, v1 TCP6),
    then a root frontend the inetd way (-l the same FILE) behind the same
    balancer; the shipped filter on FILE finds exactly those three
    clients, not the frontend's own `login failed` lines nor the
    balancer."""
    jail = (PACKAGING / "fail2ban" / "jail.d" / "sendooway.conf").read_text()
    guide = (DOCS / "deployment.md").read_text().split("## 4.", 1)[1].split("## 5.", 1)[0]
    where = guide.split("With `-l` files (", 1)[1].split("jail.d/sendooway.local", 1)[0]
    assert 'root "sendooway -b"' in jail and "root `sendooway -b`" in where
    config = front_config(tmp_path, world,
                          "mailerEncryption = allowed\nproxyProtocol = 127.0.0.1\n", tls=False)
    log = tmp_path / "sendooway.log"
    front = Frontend(config, str(log)).start()
    try:
        for header in (b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 587\r\n",
                       b"PROXY TCP6 2001:db8::9 ::1 40001 587\r\n"):
            with socket.create_connection(("127.0.0.1", front.port), timeout=20) as s:
                s.sendall(header + b"EHLO c.test\r\nAUTH PLAIN "
                          + login_plain("alice", "wrong").encode() + b"\r\nQUIT\r\n")
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
            assert b"\r\n535 " in got, got
    finally:
        front.stop()
    # and the inetd way into the same file: a root frontend on an accepted
    # TCP connection (stdin, stdout, stderr), its socketpair authenticator
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=20)
        conn, _ = listener.accept()
    with client:
        proc = subprocess.Popen([FRONT, "-c", config, "-l", str(log)], stdin=conn.fileno(),
                                stdout=conn.fileno(), stderr=conn.fileno(), env=world.env())
        conn.close()
        client.sendall(b"PROXY TCP4 203.0.113.44 127.0.0.1 40002 587\r\nEHLO c.test\r\n"
                       b"AUTH PLAIN " + login_plain("alice", "wrong").encode() + b"\r\nQUIT\r\n")
        got = b""
        while chunk := client.recv(4096):
            got += chunk
        assert proc.wait(20) == 0 and b"\r\n535 " in got, got
    text = log.read_text()
    assert "started socketpair" in text and "connect via" in text, text
    assert text.count("auth failed: user=alice") == 3, text
    assert text.count("login failed: user='alice'") == 3, text
    filter_dir = tmp_path / "filter.d"
    filter_dir.mkdir()
    shutil.copy("/etc/fail2ban/filter.d/common.conf", filter_dir)
    shutil.copy(PACKAGING / "fail2ban" / "filter.d" / "sendooway.conf", filter_dir)
    r = subprocess.run(["fail2ban-regex", "--out", "ip", str(log),
                        str(filter_dir / "sendooway.conf")],
                       capture_output=True, text=True, timeout=60, env=system_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["198.51.100.7", "2001:db8::9", "203.0.113.44"], r.stdout + r.stderr


def _xinetd_settings(block: str) -> dict[str, str]:
    pairs = (line.partition("=") for line in block.replace("\\-", "-").splitlines())
    return {k.strip(): v.strip() for k, eq, v in pairs if eq and "+" not in k}


def test_the_man_pages_xinetd_block_is_the_shipped_root_block():
    """DOC DEFECT: sendooway(1)'s EXAMPLES showed the root xinetd block
    without `flags = IPv6`, which the shipped block and deployment.md
    (section 2a) carry because without it xinetd listens on IPv4 only (an
    IPv6 client of the submission port gets no answer). Every setting the
    example shows is now the shipped block's, the flag included."""
    man = man_section("sendooway.1", "EXAMPLES")
    example = _xinetd_settings(man.split("service submission\n{", 1)[1].split("}", 1)[0])
    shipped_text = (PACKAGING / "xinetd" / "sendooway").read_text()
    blocks = shipped_text.split("service submission\n{")[1:]
    root = next(b for b in blocks if "submission-root" in b)
    shipped = _xinetd_settings(root.split("}", 1)[0])
    guide = (DOCS / "deployment.md").read_text().split("### a.", 1)[1]
    guide_block = _xinetd_settings(guide.split("service submission\n{", 1)[1].split("}", 1)[0])
    guide_block.pop("...", None)
    for shown in (example, guide_block):
        assert {k: shipped.get(k) for k in shown} == shown
        assert shown.get("flags") == "IPv6"
