"""Tests written from a mutation-testing review of the product code changed
since dad20da: the global config's warnings (shell-like paths, validUser
lists, a config others may change), sender patterns no sender is spelled
as, the user-file mode checks and --check's notes on files that give no
account, getmail's unknown-key warning, the 5.5.6 of an over-long AUTH
line, STARTTLS after a login, the credentials an upstream's 421 may quote,
and the root frontend's start stopped by a group stop. Each test pins down
behaviour that a small change to that code left unnoticed by the rest of
the suite; each names the mutant it guards against.

Left alive as equivalent: the `_discarding` test in _next_pipelined (no
line is taken while an over-long one is dropped, so no MAIL or RCPT answer
is awaited then); `not cfg.filename` in writable_config (os.stat("")
fails: None all the same); the watcher keeping fd 3 after starting its
reader, or the daemon inheriting it (a read end: EOF comes when the
frontend's write end closes); `many and` before stop_requested() (the
early signals are caught only with -b); SIGINT left out of
stop_requested() (tried: a group's ^C sent as the private
authenticator starts did not end the daemon's start, so the early
SIGINT was a clean stop, exit 0, either way; an asynchronous list of
/bin/sh starts with SIGINT ignored); the credentials check after any
command's surplus 421, not only AUTH's, or with an empty password
counted as quoted (only ever hides a 421's words after a 235).
Left alive, judged not worth a test: a getmail key shown only at a
closer match (0.9: fewer typos named); SIGHUP counted as a stop request
while starting (a terminal hang-up that killed the starting daemon: exit
0 instead of 1, either is defensible); the mode checks on a user's sslCA
file with no certificate in it (an error is reported already); a
shell-path warning quoting a path longer than 80 characters whole."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sendooway_auth.getmail import parse_getmailrc
from sendooway_shared.config import address_pattern_problem, config_warnings, load_config, parse_config

AUTH = [sys.executable, "-m", "sendooway_auth.cli"]
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="--check of another user runs as root")
FETCH_OK = ('poll pop.example.org user "alice" pass "fm-Pw-9x"\n'
            '#sendooway:server "smtp.example.org"\n#sendooway:address "alice@example.org"\n')


def _check(conf: str, *args: str) -> str:
    res = subprocess.run([*AUTH, "-c", conf, "--check", *args], capture_output=True,
                         text=True, timeout=60)
    return res.stdout + res.stderr


def _line_of(out: str, path: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith(f"  {path} [")]
    return line


# ------------------------------------------------------------------ global config warnings

@pytest.mark.parametrize("value, why", [
    # C12: `~alice/...` (a shell's other user's home) is no more expanded than `~/`
    ("fetchmail:~alice/.fetchmailrc", "starts with '~'"),
    # C13: `?` is a wildcard as much as `*`
    ("getmail:%h/.getmail/getmailrc-?", "holds '*' or '?'"),
    # C15: a variable anywhere in the path, not only at its start
    ("fetchmail:/home/$USER/.fetchmailrc", "holds '$'"),
])
def test_every_shell_spelling_of_a_mapping_path_is_warned_about(value, why):
    """C12, C13, C15: each of these looks for a file of that very name,
    silently missing, so the mapping does nothing without a word."""
    cfg = parse_config(f"smarthostMapping = {value}\n", "c")
    (warning,) = config_warnings(cfg)
    assert warning.startswith("c:1: ") and why in warning, warning


@pytest.mark.parametrize("pattern", [
    "alice,bob@example.org",   # C19: a list with one '@' (the ',' alone tells it)
    '"@example.org',           # C24: a lone quote is no quoted local part
])
def test_a_sender_pattern_no_sender_is_spelled_as_is_a_problem(pattern):
    assert address_pattern_problem(pattern) is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")
def test_a_config_owned_by_the_account_reading_it_is_not_warned_about():
    """C04: writable_config names a config owned by someone besides root
    *and the account reading it*: a user running sendooway-auth --check
    on a config of their own got an "owned by uid N, not root" warning
    about their own file when the second half was dropped."""
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    where = tempfile.mkdtemp(prefix="mut14-", dir="/tmp")  # (pytest's tmp_path is root's, 0700)
    try:
        os.chmod(where, 0o755)
        conf = os.path.join(where, "sendooway.conf")
        with open(conf, "w") as f:
            f.write("validUser = alice\n")
        os.chmod(conf, 0o644)
        os.chown(conf, nobody.pw_uid, nobody.pw_gid)
        code = ("import sys; from sendooway_shared.config import config_warnings, load_config;"
                " print(repr(config_warnings(load_config(sys.argv[1]))))")
        as_nobody = subprocess.run([sys.executable, "-c", code, conf], capture_output=True,
                                   text=True, timeout=60, user=nobody.pw_uid,
                                   group=nobody.pw_gid, extra_groups=[], cwd="/")
        assert as_nobody.returncode == 0, as_nobody.stderr
        assert as_nobody.stdout.strip() == "[]"
        # (as root the same file is someone else's: warned about)
        (warning,) = config_warnings(load_config(conf))
        assert f"owned by uid {nobody.pw_uid}, not root" in warning
    finally:
        shutil.rmtree(where)


# ------------------------------------------------------------------ getmail unknown keys

def test_a_getmail_password_line_that_is_no_near_miss_of_a_key_is_not_shown():
    """G01: only a near miss of a [sender] key (`adress`) is shown; a
    password on a line of its own (`password =` then `hunter2=x`) reads as
    key `hunter2`, which a looser match took for `username` and printed."""
    result = parse_getmailrc("[sender]\ntype = SimpleSMTPTLSSender\nserver = smtp.example.org\n"
                             "username = alice\naddress = alice@example.org\npassword =\n"
                             "hunter2=x\n", "/home/alice/.getmail/getmailrc")
    (warning,) = [w for w in result.warnings if "unknown key" in w]
    assert "hunter2" not in warning and "(the line is not shown)" in warning


# ------------------------------------------------------------------ user files: modes

@ROOT
def test_an_include_with_only_an_sslca_others_may_change_is_warned_about(tmp_config, clean_homes):
    """R01: an include with no mapping but an sslCA gives routes all the
    same (the global mappings, checked against that CA): whoever may
    rewrite it may name a CA of theirs and hear alice's upstream password."""
    world = clean_homes
    include = world.write_user_file("alice", ".sendoowayrc", "sslCA = %h/ca.pem\n", mode=0o646)
    with open(world.ca_file) as f:
        world.write_user_file("alice", "ca.pem", f.read(), mode=0o644)
    out = _check(tmp_config("userInclude = %h/.sendoowayrc\n"), "alice")
    assert f"  {include}: unsafe mode 0646: writable by group or others" in out, out


@ROOT
def test_files_without_passwords_readable_by_all_are_not_warned_about(tmp_config, clean_homes):
    """R03, R06: "holds passwords and is readable" only for a file that
    does: an include whose direct: mapping is noAuth (no password in it)
    and the user's own CA file, both 0644, are fine."""
    world = clean_homes
    include = world.write_user_file(
        "alice", ".sendoowayrc",
        "sslCA = %h/ca.pem\nsmarthostMapping = direct:* smtp.example.org 25 noAuth\n", mode=0o644)
    with open(world.ca_file) as f:
        world.write_user_file("alice", "ca.pem", f.read(), mode=0o644)
    out = _check(tmp_config("userInclude = %h/.sendoowayrc\n"), "alice")
    assert "direct:*" in out and f"  {include}" in out, out
    assert "unsafe mode" not in out and "holds passwords" not in out, out


@ROOT
def test_an_include_owned_by_another_user_is_warned_about_without_passwords(tmp_config,
                                                                           clean_homes):
    """R19: "not owned by the user" is for every file that gives routes,
    not only those holding passwords: bob owning alice's ~/.sendoowayrc
    may point her mail (direct:* ... noAuth) at a server of his."""
    world = clean_homes
    include = world.write_user_file("alice", ".sendoowayrc",
                                    "smarthostMapping = direct:* smtp.example.org 25 noAuth\n",
                                    mode=0o644)
    os.chown(include, world.users["bob"].uid, world.users["bob"].gid)
    out = _check(tmp_config("userInclude = %h/.sendoowayrc\n"), "alice")
    assert f"  {include}: owned by uid {world.users['bob'].uid}, not by alice" in out, out


@ROOT
def test_a_fetchmailrc_giving_no_account_is_not_checked_for_its_mode(tmp_config, clean_homes):
    """R13 (docs/decisions/auth.md: the mode checks are for files that give
    routes): a .fetchmailrc fetchmail alone uses is fetchmail's business,
    and the daemon would warn about it at every message."""
    world = clean_homes
    rc = world.write_user_file("alice", ".fetchmailrc",
                               'poll pop.example.org user "alice" pass "fm-Pw-9x"\n', mode=0o666)
    out = _check(tmp_config(""), "alice")
    assert f"  {rc} [fetchmail]" in out, out
    assert "unsafe mode" not in out and "fm-Pw-9x" not in out, out


# ------------------------------------------------------------------ --check's notes

@ROOT
@pytest.mark.parametrize("text, note", [
    # R09: a working file: its account is listed, no "no account from it"
    (FETCH_OK, None),
    # R07: #sendooway: lines without the closing address: a warning says why
    ('poll pop.example.org user "alice" pass "fm-Pw-9x"\n#sendooway:server "smtp.example.org"\n',
     "#sendooway: lines after the last #sendooway:address are ignored"),
    # R08: an error says why
    ('poll pop.example.org user "alice" pass "fm-Pw-9x"\n#sendooway:server "smtp.example.org"\n'
     '#sendooway:address "<alice@example.org>"\n', "#sendooway:address:"),
])
def test_check_says_no_directives_only_of_a_file_without_any(tmp_config, clean_homes, text, note):
    """R07, R08, R09: "no #sendooway: lines ... no account from it" beside
    a file is for one fetchmail alone uses; beside a file with directives
    (a working one, or one with a warning or an error that says what is
    wrong) it is false and sends the user looking for a typo in the
    wrong place."""
    rc = clean_homes.write_user_file("alice", ".fetchmailrc", text)
    out = _check(tmp_config(""), "alice", "--sender", "alice@example.org")
    line = _line_of(out, rc)
    assert "no account from it" not in line and "no #sendooway: lines" not in out, out
    if note is not None:
        assert note in out, out
    assert "fm-Pw-9x" not in out


# ------------------------------------------------------------------ the client's AUTH line

@pytest.mark.parametrize("verb", [b"auth plain ", b"Auth Plain "])
def test_an_over_long_auth_line_in_lower_case_gets_5_5_6_too(verb):
    """S11: verbs are case-insensitive (RFC 5321 2.4): `auth plain` with an
    initial response too long is an AUTH exchange line as much as `AUTH
    PLAIN`'s, RFC 4954 6's 5.5.6, in one piece and in pieces."""
    from .front_harness import Harness, plain

    line = verb + plain("alice", "p" * 3000).encode() + b"\r\n"
    h = Harness()
    assert h.feed(b"EHLO client.test\r\n" + line).endswith(
        b"500 5.5.6 Authentication exchange line too long\r\n")
    out = b"".join(h.feed(line[i:i + 1000]) for i in range(0, len(line), 1000))
    assert out == b"500 5.5.6 Authentication exchange line too long\r\n"
    assert h.feed(b"NOOP\r\n").startswith(b"250")

# ------------------------------------------------------------------ an upstream quoting credentials

UP_USER = "relayuser"
UP_PW = "Up-Quoted-Pw-8q"


def _b64(data: str) -> str:
    import base64

    return base64.b64encode(data.encode()).decode()


def _quoting_upstream_mail(ehlo: bytes, **answers):
    """MAIL through the real Relay to a scripted upstream that answers the
    last AUTH line with 235 and, unasked, a 421 (as a broken box in front
    of a server does): the client's reply and the relay's log."""
    import asyncio

    from sendooway_front._relay import Relay
    from sendooway_front._relay_api import MailParams
    from sendooway_shared.types import Route, Secret, TlsMode

    from .test_review_mutants10 import Up
    from .upstream import capture_log, config, info, run

    async def go():
        up = Up(ehlo=ehlo, **answers)
        await up.start()
        log, handler = capture_log("relay-m14")
        relay = Relay(config(timeout=3), log)
        route = Route("127.0.0.1", up.port, TlsMode.PLAIN, auth=True, user=UP_USER,
                      password=Secret(UP_PW), source="m14.conf:1")
        reply = await relay.mail(info(), route, "alice@example.org", MailParams())
        await relay.close()
        await asyncio.sleep(0.1)
        up.server.close()
        return reply, handler.text, up

    return run(go())


def _shown(reply, log: str) -> str:
    return "\n".join([*reply.lines, log])


def test_an_upstream_quoting_the_login_password_line_is_not_passed_on():
    """U03: AUTH LOGIN sends the password as a base64 line of its own; a
    421 quoting that line went, as a 451, to the client and to the log."""
    pw_line = _b64(UP_PW)
    reply, log, up = _quoting_upstream_mail(
        b"250-up.test\r\n250 AUTH LOGIN\r\n",
        AUTH=b"334 VXNlcm5hbWU6\r\n",
        **{_b64(UP_USER)[:4].upper(): b"334 UGFzc3dvcmQ6\r\n",
           pw_line[:4].upper(): b"235 2.7.0 ok\r\n421 4.3.0 you said " + pw_line.encode() + b"\r\n"})
    assert [line.strip() for line in up.lines][-2:] == [_b64(UP_USER).encode(), pw_line.encode()]
    assert reply.code == 451 and "closing: 421" in log, (reply, log)
    assert pw_line not in _shown(reply, log) and UP_PW not in _shown(reply, log)


def test_an_upstream_quoting_the_password_in_clear_is_not_passed_on():
    """U02: a box that decodes what it got and says it back (`421 bad
    password ...`): the password in clear went to the client and the log."""
    reply, log, _up = _quoting_upstream_mail(
        b"250-up.test\r\n250 AUTH PLAIN\r\n",
        AUTH=b"235 2.7.0 ok\r\n421 4.3.0 relay down for " + UP_USER.encode() + b"/"
        + UP_PW.encode() + b"\r\n")
    assert reply.code == 451 and "closing: 421" in log, (reply, log)
    assert UP_PW not in _shown(reply, log)


def test_a_421_after_235_that_quotes_nothing_keeps_its_words():
    """U07 (the check turned around): Dovecot's own `421 relay down` text
    is no secret and tells the user and the admin what happened."""
    reply, log, _up = _quoting_upstream_mail(
        b"250-up.test\r\n250 AUTH PLAIN\r\n",
        AUTH=b"235 2.7.0 ok\r\n421 4.3.2 relay host is down\r\n")
    assert reply.code == 451 and "relay host is down" in "\n".join(reply.lines), reply
    assert "relay host is down" in log


# ------------------------------------------------------------------ the root -b watcher

@pytest.mark.skipif(os.geteuid() != 0, reason="a root frontend starts the private authenticator")
def test_the_watchers_lifeline_reader_goes_with_a_dead_private_authenticator(world):
    """A03: the root watcher of `sendooway -b` runs a reader of the
    lifeline beside the daemon; once the daemon is gone the watcher exits,
    and it must take the reader with it. Left behind, that root shell
    waited for the frontend's end (the next login, maybe hours away) and
    then ran `kill -TERM` on the dead daemon's pid, which by then may be
    any other process's."""
    import signal

    from .auth_helpers import children
    from .test_review_mutants7 import _alive, _root_b_serving

    with _root_b_serving(world) as (_fe, watcher):
        kids = children(watcher)
        (daemon,) = [pid for pid in kids
                     if b"sendooway-auth" in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[1]]
        (reader,) = [pid for pid in kids if pid != daemon]
        os.kill(daemon, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while _alive(watcher):  # (no login: the frontend does not look before one)
            assert time.monotonic() < deadline, "the watcher outlived its daemon"
            time.sleep(0.02)
        while _alive(reader):
            assert time.monotonic() < deadline, "the lifeline reader outlived its watcher"
            time.sleep(0.02)
