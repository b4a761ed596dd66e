"""Review of what the documentation promises against what the product does
(README.md, docs/deployment.md, docs/protocol.md, docs/security.md, the man
pages and the shipped files in packaging/), met as an outside admin meets
them. Each test pins one concrete mismatch — the doc's words quoted with
file and line, the product's behaviour observed with the real programs in
the fake world — and failed on the code and docs as they stand, for the
reason its docstring gives; it passes once the doc or the code is fixed.
Each is fixed (all in the docs: the code was right)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sendooway_shared.config import Config, load_config
from sendooway_shared.protocol import REPLIES, BlockingChannel, Welcome

from .auth_helpers import MATRIX, Daemon, build_test_pam_module, login
from .deploy_util import MAN, PACKAGING, REPO, man_section
from .front_util import Frontend, front_config, login_plain, open_tmp
from .hardening_util import RawClient, ScriptedUpstream

DOCS = REPO / "docs"
AUTH = [sys.executable, "-m", "sendooway_auth.cli"]


def _line_of(path: Path, needle: str) -> int:
    """1-based line number of the first line holding `needle` (0 if none)."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    return 0


def _roff_text(roff: str) -> str:
    """Roff source reduced to its words (macros and font escapes dropped)."""
    out = []
    for line in roff.splitlines():
        line = re.sub(r"^\.(?:BR|BI|B|I|IR|RB|IB|TP|TQ|PP|EX|EE)\b ?", "", line)
        line = line.replace("\\-", "-").replace("\\fI", "").replace("\\fP", "")
        line = line.replace("\\fB", "").replace("\\fR", "").replace('"', "")
        out.append(line)
    return " ".join(" ".join(out).split())


# ------------------------------------------------------------ docs/security.md


def _security_md_proofs() -> list[tuple[int, str, str]]:
    """(line, file, test name) of every `tests/FILE.py::NAME` and `::NAME`
    continuation security.md names as the proof of a defence (a bare
    `::NAME` belongs to the last file named before it in the same cell)."""
    path = DOCS / "security.md"
    found = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.startswith("|"):
            continue
        cells = line.split("|")
        if len(cells) < 4:
            continue
        current = None
        for file_part, name in re.findall(r"`(?:\[\w+\] )?(test_\w+\.py)?(?:::(\w+))?`",
                                          cells[-2]):
            if file_part:
                current = file_part
            if name and current:
                found.append((number, current, name))
    return found


def test_security_md_names_only_tests_that_exist_where_it_says():
    """DEFECT (rule: docs/security.md, its own preamble: "This page says ... which
    test proves it. Tests are `tests/FILE.py::NAME`"): three proofs named in the
    table do not exist under the name and file given. security.md:103 (the row
    "Users' files are read by a per-user worker ...") names
    `test_auth_workers.py::test_reader_has_the_users_uid_gid_and_groups_not_roots`
    and `::test_a_user_reaches_only_their_own_routes`; neither is in
    tests/test_auth_workers.py (both live in tests/test_hardening_auth.py, so the
    reference sends a reader to the wrong file). security.md:154 (row "The
    authenticator killed: ...") names
    `test_auth_daemon.py::test_dead_reader_is_a_temporary_failure_not_no_route`,
    which no longer exists at all: commit 524caba replaced it by
    `test_a_dead_fork_server_stops_the_daemon_with_status_1_for_a_restart`
    because the behaviour changed (a dead fork server now stops the daemon with
    exit 1 instead of answering temporary failures), and the row still claims the
    old defence. Fix the doc: point at the real files and tests and restate the
    "authenticator killed" row for the exit-1/restart behaviour."""
    missing = []
    for number, file_name, name in _security_md_proofs():
        path = REPO / "tests" / file_name
        if not path.exists() or not re.search(rf"^def {name}\b", path.read_text(), re.M):
            elsewhere = [p.name for p in sorted((REPO / "tests").glob("test_*.py"))
                         if re.search(rf"^def {name}\b", p.read_text(), re.M)]
            missing.append(f"security.md:{number}: {file_name}::{name}"
                           f" (found in: {', '.join(elsewhere) or 'no test file'})")
    assert not missing, "security.md names proofs that do not exist there:\n" + "\n".join(missing)


# ------------------------------------------------------------ docs/protocol.md


def _protocol_md_hello_bytes() -> bytes:
    text = (DOCS / "protocol.md").read_text()
    m = re.search(r"Example, `hello` on the wire.*?```\n(.*?)```", text, re.S)
    assert m, "protocol.md has no hello example"
    return bytes.fromhex(m.group(1))


def test_protocol_md_hello_example_is_accepted_by_the_real_authenticator(tmp_path, tmp_config):
    """DEFECT (rule: docs/protocol.md "Frames" is "the contract between them":
    "Example, `hello` on the wire (57 bytes of body)" at protocol.md:62-66, and
    protocol.md:77 "`version` must equal the authenticator's `VERSION`
    (currently 1)"): the documented frame carries version 1 (the byte `01` after
    `a7 76 65 72 73 69 6f 6e`), but shared/protocol.py has `VERSION = 2` (since
    route_ok got `ca_pem`). Sent byte for byte to a real `sendooway-auth --fd`,
    the documented hello is answered `error: unsupported protocol version 1
    (this is version 2)` and the connection closed, so anyone writing a client
    from the contract (a monitoring probe, another frontend) fails at the first
    frame. protocol.md even contradicts itself (its JSON examples at
    protocol.md:83 and :106 say `"version": 2`). Fix the doc: the example's version byte `02` and
    "currently 2"."""
    documented = _protocol_md_hello_bytes()
    assert len(documented) == 4 + 57
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log = tmp_path / "fd.log"
    conf = tmp_config(f"authSocket = {tmp_path}/run/auth.sock\n")
    proc = subprocess.Popen([*AUTH, "-c", conf, "-l", str(log), "--fd", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        ours.sendall(documented)
        ch = BlockingChannel(ours, REPLIES, timeout=10)
        reply = ch.receive()
        ch.close()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert isinstance(reply, Welcome), (
        f"protocol.md:{_line_of(DOCS / 'protocol.md', 'Example, `hello` on the wire')}: the"
        f" documented hello frame is refused by the real authenticator: {reply!r}")


# ------------------------------------------------------------ log reasons


@pytest.fixture
def pam_module(world):
    path = build_test_pam_module(world)
    if path is None:
        pytest.skip("needs a C compiler (cc) to build the test PAM module")
    return path


def _man_auth_failed_reasons() -> set[str]:
    """The `why` values sendooway-auth(8) LOG lists for the `auth failed` line."""
    text = _roff_text(man_section("sendooway-auth.8", "LOG"))
    m = re.search(r"where why is one of (.*?) The start of this line", text)
    assert m, text
    return set(re.findall(r"[a-z]+(?:-[a-z]+)+", m.group(1)))


PAM_UNAVAILABLE_ROFF = ".BR pam\\-unavailable"


def test_man_page_lists_pam_unavailable_as_a_failed_login_that_fail2ban_never_sees(
        tmp_path, tmp_config, world, pam_module):
    """DEFECT (rule: sendooway-auth(8) LOG, sendooway-auth.8:221-245: "A failed
    login is logged as `auth failed: user=name client=address reason=why ...`
    where why is one of ... pam-unavailable ... The start of this line is kept
    stable for fail2ban(1)"): the daemon never writes `reason=pam-unavailable`
    on an `auth failed` line. With a PAM stack that returns
    PAM_AUTHINFO_UNAVAIL (an LDAP server behind pam_ldap down) the real daemon
    logs `auth unavailable: user=alice client=192.0.2.7 reason=pam-unavailable`,
    answers a temporary failure and counts nothing — on purpose, as
    docs/protocol.md ("login undecided ... **not** for fail2ban") and
    sendooway_auth/_pam.py `is_temporary` say. The man page tells an admin the
    opposite: that an LDAP outage shows up as failed logins that the shipped
    fail2ban filter bans, and it does not mention the `auth unavailable` line
    at all, so an admin grepping `auth failed` for an outage finds nothing. Fix
    the man page: drop pam-unavailable (and temporary pam-error codes) from the
    `auth failed` list and document the `auth unavailable` line."""
    path = os.path.join(world.pam_dir, "sendooway-review-docs-down")
    with open(path, "w") as f:
        f.write(f"auth required {pam_module} rc=9\n"
                f"account required {MATRIX} passdb={world.passdb}\n")
    d = Daemon(tmp_path, tmp_config("pamService = sendooway-review-docs-down\n"),
               failure_delay=0.0).start()
    try:
        login(d.connect(), "alice", world.users["alice"].password)
        log = d.wait_log("reason=pam-unavailable")
    finally:
        d.stop()
    line = next(l for l in log.splitlines() if "reason=pam-unavailable" in l)
    written_as_failed = "auth failed:" in line
    listed = "pam-unavailable" in _man_auth_failed_reasons()
    assert written_as_failed == listed, (
        f"sendooway-auth.8:{_line_of(MAN / 'sendooway-auth.8', PAM_UNAVAILABLE_ROFF)}"
        f" lists pam-unavailable among the `auth failed` reasons (for fail2ban), but the"
        f" daemon writes: {line.split(': ', 1)[1]}")


def test_protocol_md_says_not_a_valid_user_means_the_password_was_right(
        tmp_path, tmp_config, world, clean_homes):
    """DEFECT (rule: docs/protocol.md "`reason=` values of `auth failed`",
    protocol.md:262: "`not-a-valid-user` | right password, but `validUser` lines
    exist and neither name the user nor a group of it"): validUser is decided
    before PAM (sendooway_auth/_service.py `_check_blocking`: "the password of
    an account kept out is never tried", also docs/security.md "No timing
    oracle"), so a login of an account outside validUser is logged
    `reason=not-a-valid-user` whatever the password. Observed with the real
    daemon (`validUser = bob`): alice with a wrong password gets
    `auth failed: user=alice ... reason=not-a-valid-user`. An admin who reads
    the table concludes from such a line that the guesser knew alice's UNIX
    password and starts an incident for nothing (or, worse, trusts the line as a
    password oracle). The code is right; fix the table: "not in validUser (the
    password is not checked)"."""
    d = Daemon(tmp_path, tmp_config("validUser = bob\n"), failure_delay=0.0).start()
    try:
        login(d.connect(), "alice", "certainly-not-alices-password")
        log = d.wait_log("auth failed:")
    finally:
        d.stop()
    line = next(l for l in log.splitlines() if "auth failed:" in l)
    assert "reason=not-a-valid-user" in line, line  # what the product does
    doc = DOCS / "protocol.md"
    row = next(l for l in doc.read_text().splitlines() if l.startswith("| `not-a-valid-user`"))
    assert "right password" not in row, (
        f"protocol.md:{_line_of(doc, row)}: {row!r}, but a WRONG password of an account outside"
        f" validUser is logged the same way: {line.split(': ', 1)[1]}")


# ------------------------------------------------------------ timeout


def test_timeout_doc_says_a_silent_upstream_ends_the_session_with_421(world):
    """DEFECT (rule: sendooway.conf(5) `timeout`, sendooway.conf.5:66-67: "How
    long a client or an upstream may stay silent before the session ends with
    421 (logged)", and the shipped packaging/sendooway.conf:15-16 "Seconds of
    silence from the client or an upstream before the session is ended with
    421"): an upstream that stays silent past `timeout` does not end the
    session and the client never sees 421. Observed with `sendooway -b`, the
    authenticator daemon and an upstream that does not answer RCPT: the client
    gets `451 4.4.2 Upstream server timed out, try again later` and the session
    goes on (NOOP 250, a next MAIL possible) — which is the sensible behaviour
    and what docs/decisions/relay.md ("timeout or lost connection 451 4.4.2")
    decided. An admin reading the man page or the example config expects 421
    and a closed connection in the client's log. Fix the two texts: the client's
    silence ends the session with 421 4.4.2, an upstream's silence fails the
    transaction with 451 4.4.2."""
    timeout = 1

    def stall(conn, rfile):
        time.sleep(timeout + 3)

    up = ScriptedUpstream(replies={"RCPT": stall}).start()
    with open_tmp() as tmp:
        config = front_config(tmp, world, f"timeout = {timeout}\nsmarthostCache = 0\n"
                                          "addReceivedField = no\n"
                                          f"smarthostMapping = direct:* 127.0.0.1 {up.port} noAuth\n")
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            c = RawClient(fe.host, fe.port)
            assert c.reply()[0] == 220
            assert c.cmd(b"EHLO client.test\r\n")[0] == 250
            pw = world.users["alice"].password
            assert c.cmd(f"AUTH PLAIN {login_plain('alice', pw)}\r\n".encode())[0] == 235
            assert c.cmd(b"MAIL FROM:<alice@example.org>\r\n")[0] == 250
            rcpt = c.cmd(b"RCPT TO:<x@example.net>\r\n")
            after = c.cmd(b"NOOP\r\n")
            c.close()
        finally:
            fe.stop()
            daemon.stop()
            up.stop()
    session_ended_with_421 = rcpt[0] == 421 or after[0] in (0, 421)
    conf5 = _roff_text(man_section("sendooway.conf.5", "KEYWORDS"))
    m = re.search(r"timeout = seconds (.*?) 1 to 86400", conf5)
    assert m, conf5[:400]
    example = (PACKAGING / "sendooway.conf").read_text()
    doc_says = {
        "sendooway.conf.5": "upstream may stay silent before the session ends with 421" in m.group(1),
        "packaging/sendooway.conf": re.search(r"or an upstream before the session is\s*#?\s*ended"
                                              r" with 421", example) is not None,
    }
    wrong = [name for name, says in doc_says.items() if says != session_ended_with_421]
    assert not wrong, (
        f"{', '.join(wrong)} say a silent upstream ends the session with 421; the client got"
        f" RCPT -> {rcpt[0]} {rcpt[1][:1]}, then NOOP -> {after[0]} (session still open)")


# ------------------------------------------------------------ the example config


def test_example_config_sets_only_the_documented_non_defaults():
    """DEFECT (rule: docs/deployment.md:41-45 "The shipped file lists every keyword
    with its default and a short comment, and sets two things stricter than the
    defaults: `mailerEncryption = required` ... and the Debian snakeoil
    certificate as `sslCert`/`sslKey`", and packaging/sendooway.conf:5-6 "Every
    keyword is listed below with its default"): loaded with the product's own
    parser, the shipped file also differs from the defaults (shared/config.py
    `Config`, sendooway.conf(5) "userInclude ... Default: empty (none)") in
    `userInclude = %h/.sendoowayrc` — so following the guide silently turns on
    every user's own include (their own `direct:` mappings and `sslCA`, read by
    root's authenticator for every MAIL FROM; `--check` shows a
    `[userInclude]` file for each user) — and in two explicit
    `smarthostMapping` lines, which are not the built-in default either: with
    none configured, a user whose include has a mapping gets only their own
    (sendooway.conf(5) "With no mapping anywhere the defaults are ..."), with
    the shipped lines the global getmail/fetchmail files are always read after
    it. Fix: say in deployment.md and in the file's header that the example
    also enables userInclude and names the two default mappings explicitly (or
    ship `userInclude =`)."""
    shipped = load_config(str(PACKAGING / "sendooway.conf"))
    defaults = Config()
    documented = {"mailerEncryption", "sslCert", "sslKey"}
    guide = (DOCS / "deployment.md").read_text()
    paragraph = guide[guide.index("Then edit `/etc/sendooway.conf`"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    differ = {name for name in Config.__dataclass_fields__
              if name not in ("filename", "lines", "comment_cuts")
              and getattr(shipped, name) != getattr(defaults, name)}
    undocumented = sorted(n for n in differ - documented if n not in paragraph)
    assert not undocumented, (
        f"docs/deployment.md:{_line_of(DOCS / 'deployment.md', 'The shipped file lists every')}"
        f" says the example sets only {sorted(documented)} apart from the defaults; it also"
        f" sets: " + ", ".join(f"{n} = {getattr(shipped, n)!r} (default {getattr(defaults, n)!r})"
                               for n in undocumented))
