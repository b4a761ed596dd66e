"""Tests written from a mutation-testing review of the product code changed
since dad20da: the global config's warnings (shell-like paths, validUser
lists, a config others may change), sender patterns no sender is spelled
as, the user-file mode checks and --check's notes on files that give no
account, getmail's unknown-key warning, the 5.5.6 of an over-long AUTH
line, STARTTLS after a login, the credentials an upstream's 421 may quote,
and the root frontend's start stopped by a group stop. Each test pins down
behaviour that a small change to that code left unnoticed by the rest of
the suite; each names the mutant it guards against.

Left alive as equivalent or not worth a test are listed in
docs/review-mutants14.md."""

from __future__ import annotations

import os
import subprocess
import sys

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
