"""An outside review from the side of a mail admin and of users editing
their files (black-box first: `sendooway-auth --check`, fetchmail and
getmail6 themselves as oracles).

A sender address written as a mail header writes it (`<alice@example.org>`)
or two addresses on one `#sendooway:address` line (`a@x.org,b@x.org`) were
taken as exact patterns: no sender is ever spelled so (the frontend takes
only RFC 5321 mailboxes, and the original compared the bare address too),
so the account was listed by --check and the user's mail got 550 with no
word of why. Such a pattern is now an error at its file:line, in every
file that names senders (docs/decisions/auth.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sendooway_auth.fetchmail import parse_fetchmailrc
from sendooway_auth.getmail import parse_getmailrc
from sendooway_shared.config import (
    address_pattern_problem, config_warnings, load_config, parse_config, parse_user_config,
)
from tests.auth_helpers import Daemon, fd_authenticator

AUTH = [sys.executable, "-m", "sendooway_auth.cli"]
F = "/home/alice/.fetchmailrc"
G = "/home/alice/.getmail/getmailrc"

NO_SENDER_SPELLS_SO = ["<alice@example.org>", "alice@example.org>", "<alice@example.org",
                       "alice@example.org,bob@example.org", "alice@example.org;bob@example.org",
                       "mailto:alice@example.org", "alice(work)@example.org",
                       "alice@exam<ple.org", 'al"ice@example.org', "al\\ice@example.org"]
SENDERS_CAN_BE = ["alice@example.org", "*@example.org", "*", "a.b+tag@example.org",
                  "o'brien@example.org", "a=b/c?d@example.org", '"a,b"@example.org',
                  '"<x>"@example.org', '"a@b"@example.org', "alice@[192.0.2.1]",
                  "alice@[IPv6:2001:db8::1]", "jörg@bücher.example"]


def _directive(pattern: str) -> str:
    """A #sendooway:address line for `pattern`, written as it reads back:
    bare when it holds a backslash (no escapes there), else in quotes."""
    if "\\" in pattern:
        return f"#sendooway:address {pattern}\n"
    quote = '"' if "'" in pattern else "'"
    return f"#sendooway:address {quote}{pattern}{quote}\n"


@pytest.mark.parametrize("pattern", NO_SENDER_SPELLS_SO)
def test_a_pattern_no_sender_is_spelled_as_is_an_error_in_a_fetchmailrc(pattern):
    text = ('poll pop.example.org user "alice" pass "fm-Pw-9x"\n'
            '#sendooway:server "smtp.example.org"\n'
            + _directive(pattern))
    result = parse_fetchmailrc(text, F)
    assert result.accounts == []
    assert len(result.errors) == 1 and result.errors[0].startswith(f"{F}:3: #sendooway:address:")
    assert "fm-Pw-9x" not in result.errors[0]


@pytest.mark.parametrize("pattern", ["<alice@example.org>", "alice@example.org;bob@example.org",
                                     # getmail6's own spelling of a list (its `mailboxes`)
                                     '("alice@example.org", "a.smith@example.org")'])
def test_a_pattern_no_sender_is_spelled_as_is_an_error_in_a_getmail_rc(pattern):
    text = ("[retriever]\ntype = SimplePOP3SSLRetriever\nserver = pop.example.org\n"
            "username = alice\npassword = gm-Pw-7y\n"
            f"[sender]\ntype = SimpleSMTPTLSSender\naddress = {pattern}\n")
    result = parse_getmailrc(text, G)
    assert result.accounts == [] and len(result.errors) == 1
    assert result.errors[0].startswith(f"{G}:8: [sender] address:")


def test_a_pattern_no_sender_is_spelled_is_an_error_in_a_user_include():
    errors: list = []
    parsed = parse_user_config("smarthostMapping = direct:<alice@example.org> smtp.example.org"
                               " 587 alice inc-Pw-5z tls\n", "/home/alice/.sendoowayrc", errors)
    assert parsed.smarthostMapping == ()
    assert [str(e).split(": smarthostMapping: ")[0] for e in errors] == [
        "/home/alice/.sendoowayrc:1"]
    assert "inc-Pw-5z" not in str(errors[0])


@pytest.mark.parametrize("pattern", SENDERS_CAN_BE)
def test_patterns_a_sender_can_be_spelled_as_stay_good(pattern):
    assert address_pattern_problem(pattern) is None
    text = ('poll pop.example.org user "alice" pass "x"\n#sendooway:server "smtp.example.org"\n'
            + _directive(pattern))
    result = parse_fetchmailrc(text, F)
    assert result.errors == [] and result.accounts[0].addresses == (pattern,)


@pytest.mark.skipif(os.geteuid() != 0, reason="--check of another user runs as root")
def test_check_names_the_line_of_an_address_in_angle_brackets(tmp_config, clean_homes):
    """What the admin sees: the account is not listed, its line is."""
    world = clean_homes
    path = world.write_user_file("alice", ".fetchmailrc", (
        'poll pop.example.org user "alice" pass "fm-Pw-9x"\n'
        '#sendooway:server "smtp.example.org"\n'
        '#sendooway:address "<alice@example.org>"\n'))
    res = subprocess.run([*AUTH, "-c", tmp_config(""), "--check", "alice", "--sender",
                          "alice@example.org"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"{path}:3: #sendooway:address:" in res.stdout
    assert "route for alice@example.org: none" in res.stdout
    assert "fm-Pw-9x" not in res.stdout + res.stderr



@pytest.mark.parametrize("value", ["alice,bob", "%mailusers,alice", "alice:bob"])
def test_a_list_on_one_valid_user_line_is_warned_about_at_its_line(value):
    """`validUser = alice,bob` was one name no account can have (passwd and
    group files separate with `,` and `:`): nobody could log in, and the
    log only said "not-a-valid-user". The line is kept, as the original
    loaded it (a migrated server must start), with a warning naming it."""
    cfg = parse_config(f"# who may log in\nvalidUser = {value}\nvalidUser = carol\n",
                       "sendooway.conf")
    assert cfg.validUser == (value, "carol")
    (warning,) = config_warnings(cfg)
    assert warning.startswith("sendooway.conf:2: validUser: no user or group is named with")
    assert config_warnings(parse_config("validUser = alice\nvalidUser = %mailusers\n", "c")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="--check of another user runs as root")
def test_check_and_the_daemon_warn_of_a_list_on_one_valid_user_line(tmp_path, tmp_config,
                                                                     clean_homes):
    conf = tmp_config("validUser = alice,bob\n")
    res = subprocess.run([*AUTH, "-c", conf, "--check", "alice"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"warning: {conf}:1: validUser: no user or group is named with" in res.stdout
    assert "alice is not a valid user" in res.stdout
    daemon = Daemon(tmp_path, conf).start()
    try:
        daemon.wait_log(f"{conf}:1: validUser: no user or group is named with")
    finally:
        daemon.stop()


def test_a_path_starting_with_a_tilde_is_warned_about_at_its_line():
    """No shell reads sendooway.conf: `~/.fetchmailrc` is taken as a path
    below the home's directory `~`, a missing file, which is no error: the
    mapping (or the include) did nothing without a word."""
    cfg = parse_config("userInclude = ~/.sendoowayrc\n"
                       "smarthostMapping = fetchmail:~/.fetchmailrc\n"
                       "smarthostMapping = getmail:%h/.getmail/getmailrc\n"
                       "smarthostMapping = direct:~x@example.org smtp.example.org 25 u p\n",
                       "sendooway.conf")
    warnings = [w for w in config_warnings(cfg) if "'~" in w]
    assert [w.split(": ")[0] for w in warnings] == ["sendooway.conf:1", "sendooway.conf:2"]
    assert all("write %h for the user's home" in w for w in warnings)


def test_a_mapping_path_with_a_wildcard_is_warned_about_at_its_line():
    """getmail users keep one rc file an account (getmailrc-work, ...):
    `getmail:%h/.getmail/getmailrc-*` looked for a file named with a `*`,
    silently missing."""
    cfg = parse_config("smarthostMapping = getmail:%h/.getmail/getmailrc-*\n"
                       "smarthostMapping = getmail:%h/.getmail/getmailrc-work\n", "c")
    (warning,) = config_warnings(cfg)
    assert warning.startswith("c:1: '%h/.getmail/getmailrc-*' holds '*' or '?'")


@pytest.mark.parametrize("path, why", [("$HOME/.fetchmailrc", "holds '$'"),
                                       ('"%h/.fetchmailrc"', "starts with a quote"),
                                       ("'%h/.fetchmailrc'", "starts with a quote")])
def test_a_variable_or_quotes_in_a_mapping_path_are_warned_about_at_its_line(path, why):
    cfg = parse_config(f"# users' files\nsmarthostMapping = fetchmail:{path}\n"
                       f"userInclude = {path}\n", "c")
    assert [w.split(": ")[0] for w in config_warnings(cfg)] == ["c:3", "c:2"]
    assert all(why in w for w in config_warnings(cfg))


@pytest.mark.skipif(os.geteuid() != 0, reason="--check of another user runs as root")
def test_check_warns_of_a_tilde_in_a_users_include(tmp_config, clean_homes):
    world = clean_homes
    include = world.write_user_file("alice", ".sendoowayrc",
                                    "smarthostMapping = fetchmail:~/.fetchmailrc\n")
    world.write_user_file("alice", ".fetchmailrc", (
        'poll pop.example.org user "alice" pass "fm-Pw-9x"\n'
        '#sendooway:server "smtp.example.org"\n#sendooway:address "alice@example.org"\n'))
    res = subprocess.run([*AUTH, "-c", tmp_config("userInclude = %h/.sendoowayrc\n"),
                          "--check", "alice"], capture_output=True, text=True, timeout=60)
    assert f"  {include}:1: '~/.fetchmailrc' starts with '~', which is not expanded" in res.stdout
    assert res.returncode == 1, res.stdout


def test_the_global_config_keeps_such_a_direct_mapping_with_a_warning():
    """As for `*@*.example.org`: the original loaded the line (it matched
    nothing there either), so a migrated server still starts."""
    cfg = parse_config("smarthostMapping = direct:<alice@example.org> smtp.example.org 587"
                       " u p tls\n", "sendooway.conf")
    assert len(cfg.smarthostMapping) == 1
    (warning,) = config_warnings(cfg)
    assert warning.startswith("sendooway.conf:1: smarthostMapping: address must be one bare")


@pytest.mark.skipif(os.geteuid() != 0, reason="--check of another user runs as root")
@pytest.mark.parametrize("directive", ['# sendooway:server "smtp.example.org"',
                                       '#sendoway:server "smtp.example.org"', "# no directive"])
def test_check_tells_a_fetchmailrc_without_directives_as_information(tmp_config, clean_homes,
                                                                      directive):
    """As for a getmailrc without [sender]: a .fetchmailrc with no
    #sendooway: line (`# sendooway:` with a blank is a remark) gives no
    account and no error, and --check said nothing beside it, so the typo
    looked like a file sendooway had read and found fine."""
    world = clean_homes
    path = world.write_user_file("alice", ".fetchmailrc", (
        'poll pop.example.org user "alice" pass "fm-Pw-9x"\n'
        f'{directive}\n# sendooway:address "alice@example.org"\n'))
    res = subprocess.run([*AUTH, "-c", tmp_config(""), "--check", "alice"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout
    (line,) = [line for line in res.stdout.splitlines() if line.startswith(f"  {path} [fetchmail]")]
    assert line.endswith("no #sendooway: lines (for fetchmail alone; '# sendooway:' with a blank"
                         " is a remark): no account from it"), line
    assert "errors:" not in res.stdout and "fm-Pw-9x" not in res.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_global_config_others_may_change_is_warned_about(tmp_path, tmp_config, clean_homes):
    """sendooway-auth runs as root on this file: whoever may change it may
    set authBackend = LDAP with an ldapUri of theirs and log in as anyone.
    It was loaded without a word when writable by all or owned by a user."""
    conf = tmp_config("validUser = alice\n")
    assert config_warnings(load_config(conf)) == []
    assert config_warnings(load_config("/dev/null")) == []
    os.chmod(conf, 0o666)
    (warning,) = config_warnings(load_config(conf))
    assert warning.startswith(f"{conf} is writable by group or others (mode 0666): whoever")
    res = subprocess.run([*AUTH, "-c", conf, "--check", "alice"], capture_output=True,
                         text=True, timeout=60)
    assert f"warning: {warning}" in res.stdout and res.returncode == 1, res.stdout
    os.chmod(conf, 0o664)
    assert config_warnings(load_config(conf)) == []  # (group root)
    os.chown(conf, -1, clean_homes.users["bob"].gid)
    assert "writable by group or others (mode 0664)" in config_warnings(load_config(conf))[0]
    os.chmod(conf, 0o644)
    os.chown(conf, clean_homes.users["bob"].uid, 0)
    (warning,) = config_warnings(load_config(conf))
    assert f"owned by uid {clean_homes.users['bob'].uid}, not root" in warning


@pytest.mark.skipif(os.geteuid() != 0, reason="--check of another user runs as root")
def test_a_users_file_others_may_change_is_warned_about_without_passwords(tmp_config,
                                                                          clean_homes):
    """docs/decisions/auth.md: a user's file "writable by group or others"
    is warned about. Only files holding passwords were: a ~/.sendoowayrc
    with an sslCA and a mapping (no password in it) anyone may rewrite, to
    trust their own CA before alice's upstream (and hear her password), or
    a noAuth account anyone may point at their server, went unmentioned."""
    world = clean_homes
    include = world.write_user_file("alice", ".sendoowayrc",
                                    "sslCA = %h/ca.pem\nsmarthostMapping = fetchmail:%h/.fetchmailrc\n",
                                    mode=0o666)
    rc = world.write_user_file("alice", ".fetchmailrc", (
        'poll pop.example.org user "alice"\n#sendooway:server "smtp.example.org"\n'
        '#sendooway:noAuth\n#sendooway:address "alice@example.org"\n'), mode=0o646)
    conf = tmp_config("userInclude = %h/.sendoowayrc\n")
    res = subprocess.run([*AUTH, "-c", conf, "--check", "alice"], capture_output=True,
                         text=True, timeout=60)
    assert f"  {include}: unsafe mode 0666: writable by group or others" in res.stdout
    assert f"  {rc}: unsafe mode 0646: writable by group or others" in res.stdout
    assert "readable" not in res.stdout  # (no password in either)
    os.chmod(include, 0o644)
    os.chmod(rc, 0o644)
    res = subprocess.run([*AUTH, "-c", conf, "--check", "alice"], capture_output=True,
                         text=True, timeout=60)
    assert "unsafe mode" not in res.stdout, res.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="--check of another user runs as root")
def test_a_users_own_sslca_file_others_may_change_is_warned_about(tmp_config, clean_homes):
    """Whoever may add a certificate to alice's own sslCA file may vouch
    for a server of theirs before her upstream, and hear her password."""
    world = clean_homes
    with open(world.ca_file) as f:
        ca = world.write_user_file("alice", "ca.pem", f.read(), mode=0o646)
    world.write_user_file("alice", ".sendoowayrc", "sslCA = %h/ca.pem\n")
    conf = tmp_config("userInclude = %h/.sendoowayrc\n")
    res = subprocess.run([*AUTH, "-c", conf, "--check", "alice"], capture_output=True,
                         text=True, timeout=60)
    assert f"  {ca}: unsafe mode 0646: writable by group or others" in res.stdout, res.stdout
    assert "errors:" not in res.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")
def test_the_session_authenticator_of_an_inetd_frontend_logs_the_config_warnings(tmp_path,
                                                                               tmp_config):
    """sendooway started by xinetd as root (the original's deployment) runs
    `sendooway-auth --fd` for each session, with no daemon to log the
    config's warnings at its start: they reached no log at all."""
    conf = tmp_config("validUser = alice,bob\n")
    log = tmp_path / "fd.log"
    with fd_authenticator(conf, str(log)) as (proc, ours):
        ours.close()
        assert proc.wait(10) == 0
    assert f"{conf}:1: validUser: no user or group is named with" in log.read_text()
