"""Passwords where a parser does not expect them, through the real
`sendooway-auth --check` (an outside review of the no-password-in-output
rule, docs/decisions/auth.md "No error message contains a value that could
be a password"). Each test failed before its fix: the value was repeated in
the error, which --check prints and the daemon logs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="writes files as the fake users")

AUTH = [sys.executable, "-m", "sendooway_auth.cli"]
PW = "Zq9-Pw-Placed"
B64_PW = "c2VjcmV0UHdQbGFjZWQ"  # a generated password: base64, padded with `=`


def check(conf_path: str, *args: str) -> tuple[int, str]:
    res = subprocess.run([*AUTH, "-c", conf_path, "--check", *args],
                         capture_output=True, text=True, timeout=30)
    return res.returncode, res.stdout + res.stderr


def test_wrapped_direct_mapping_whose_password_holds_an_equals_sign(tmp_config, clean_homes):
    """shared/config.py _lookup: a direct: mapping wrapped by an editor
    leaves its password (base64 padding: `...=`) at the start of the next
    line, which reads as `KEY =`: the error was "unknown keyword
    '<the password>'", in --check and the daemon's start-up log; the same
    in a user's ~/.sendoowayrc."""
    conf = tmp_config("smarthostMapping = direct:* smtp.example.org 587 alice\n"
                      f"    {B64_PW}= tls\n")
    code, out = check(conf, "alice")
    assert code == 2 and f"{conf}:2: unknown keyword" in out, out
    assert B64_PW not in out, out
    clean_homes.write_user_file("alice", ".sendoowayrc", (
        "smarthostMapping = direct:alice@own.example smtp.example.org 587 alice\n"
        f"  {B64_PW}== tls\n"))
    conf = tmp_config("userInclude = %h/.sendoowayrc\n")
    code, out = check(conf, "alice", "--sender", "alice@own.example")
    assert ".sendoowayrc:2: unknown keyword" in out, out
    assert B64_PW not in out, out


def test_getmail_password_line_indented_below_address(tmp_config, clean_homes):
    """getmail.py: a `password=...` line indented by mistake below `address`
    continues the address value (ConfigParser's rule); that "address" was
    shown in full: `address must be user@domain, ..., got 'password=PW'`."""
    clean_homes.write_user_file("alice", ".getmail/getmailrc", (
        "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = pop.example.org\n"
        "username = alice\npassword = pop-pw\n"
        "[sender]\ntype = SimpleSMTPTLSSender\nserver = smtp.example.org\n"
        f"address = alice@example.org\n  password={PW}\n"))
    conf = tmp_config("smarthostMapping = getmail:%h/.getmail/getmailrc\n")
    code, out = check(conf, "alice", "--sender", "alice@example.org")
    assert "getmailrc:10: [sender] address: address must be user@domain" in out, out
    assert PW not in out, out


@pytest.mark.parametrize("value", [PW, f"{PW}:x@y", f"<{PW}@x>"])
def test_fetchmail_password_typed_into_the_address_line(tmp_config, clean_homes, value):
    """fetchmail.py _close: `#sendooway:address` given the password (the
    lines mixed up) was repeated in the error, whatever its form."""
    clean_homes.write_user_file("alice", ".fetchmailrc", (
        "poll pop.example.org user alice pass pop-pw\n"
        '#sendooway:server "smtp.example.org"\n'
        f'#sendooway:address "{value}"\n'))
    conf = tmp_config("smarthostMapping = fetchmail:%h/.fetchmailrc\n")
    code, out = check(conf, "alice", "--sender", "alice@example.org")
    assert ".fetchmailrc:3: #sendooway:address: address must" in out, out
    assert PW not in out, out


def test_a_reload_refused_for_a_wrapped_mapping_does_not_log_its_password(tmp_path, world):
    """The same wrapped direct: mapping brought in by a SIGHUP: "reload
    failed, old config kept: ... unknown keyword '<the password>'" in the
    daemon's log."""
    import signal

    from tests.auth_helpers import Daemon

    conf = tmp_path / "sendooway.conf"
    conf.write_text("smarthostMapping = direct:* smtp.example.org 587 alice other-pw\n")
    os.chmod(tmp_path, 0o755)
    d = Daemon(tmp_path, str(conf)).start()
    try:
        conf.write_text("smarthostMapping = direct:* smtp.example.org 587 alice\n"
                        f"  {B64_PW}== tls\n")
        d.proc.send_signal(signal.SIGHUP)
        log = d.wait_log("reload failed")
        assert f"{conf}:2: unknown keyword" in log, log
        assert B64_PW not in log, log
    finally:
        d.stop()


def test_getmail_password_on_a_line_of_its_own_below_its_key(tmp_config, clean_homes):
    """getmail.py: `password =` with the password on the next line, not
    indented (so no continuation): a base64 password's `=` makes that line
    `KEY =`, warned about as "unknown key '<the password, lower-cased>'"."""
    clean_homes.write_user_file("alice", ".getmail/getmailrc", (
        "[sender]\ntype = SimpleSMTPTLSSender\nserver = smtp.example.org\n"
        f"username = alice\naddress = alice@example.org\npassword =\n{B64_PW}=\n"))
    conf = tmp_config("smarthostMapping = getmail:%h/.getmail/getmailrc\n")
    code, out = check(conf, "alice", "--sender", "alice@example.org")
    assert "getmailrc:7: [sender] unknown key" in out, out
    assert B64_PW.lower() not in out.lower(), out
