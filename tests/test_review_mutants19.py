"""Tests written from a mutation-testing review of the product code changed
since 1ae966c (work in progress: the counts follow)."""

from __future__ import annotations

import time

import pytest

from sendooway_shared.config import ConfigError, load_config
from sendooway_shared.protocol import AuthFail, AuthOk, Error
from tests import test_review_ldaphostile as hostile
from tests.test_review_ldaphostile import (
    GOOD, PW, _conf, _outcome, _serving, bind_reply, done_reply, entry_reply,
)

# the hostile review's fixtures: the real daemon (its logs checked for the
# passwords) and scripted directories on loopback
daemon = hostile.daemon
scripted = hostile.scripted
ldap_marks = hostile.pytestmark


# -- shared/config.py ----------------------------------------------------------

@pytest.mark.parametrize("n", [79, 80, 81, 200])
def test_a_value_is_shown_to_80_characters_then_cut_with_dots(tmp_path, n):
    """_shown: up to 80 characters of a value are shown whole; a longer
    one shows exactly its first 80 and "..." (kills C05 limit 81, C06 the
    dots from 80 on, C07 the value shown whole)."""
    path = tmp_path / "long.conf"
    path.write_text(f"timeout = 30\ncloneEhlo = {'y' * n}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    text = str(exc.value)
    assert exc.value.line == 2
    shown = "y" * min(n, 80)
    assert repr(shown) in text and "y" * (min(n, 80) + 1) not in text, text
    assert text.endswith(f"{shown!r}...") == (n > 80), text


@pytest.mark.parametrize("ctl, hint", [("\r", True), ("\x0c", False), ("\x1b", False)])
def test_only_a_carriage_return_gets_the_line_ends_hint(tmp_path, ctl, hint):
    """A CR inside a line (a CR-only file read as one line) is told why;
    other controls are not (kills C04: the hint for U+000A instead)."""
    path = tmp_path / "ctl.conf"
    path.write_bytes(f"timeout = 30\npamService = smtp{ctl}x\n".encode())
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    text = str(exc.value)
    assert exc.value.line == 2 and f"U+{ord(ctl):04X}" in text
    assert ("carriage return" in text) == hint, text
    assert ("LF or CRLF" in text) == hint, text


# -- sendooway_auth/_ldap.py ---------------------------------------------------

@ldap_marks[0]
@ldap_marks[1]
@pytest.mark.parametrize("home, served", [
    (b"/" + b"x" * 4094, True),   # 4095 octets: PATH_MAX less its NUL
    (b"/" + b"x" * 4095, False),  # 4096
    ("/".encode() + "\u00e9".encode() * 2047, True),   # 4095 octets, 2048 characters
    ("/".encode() + "\u00e9".encode() * 2048, False),  # 4097 octets, 2049 characters
])
def test_a_home_of_up_to_4095_octets_is_served(daemon, scripted, home, served):
    """MAX_HOME is in octets (UTF-8) and inclusive: a home of 4095 octets
    is a path, one of 4096 is not (kills L17 `>=`, L18 4096)."""
    directory = scripted(_serving(dict(GOOD, homeDirectory=[home])))
    d = daemon(_conf(directory.uri))
    got = _outcome(d, "lena", PW)
    if served:
        assert got == AuthOk("lena"), got
    else:
        assert got == AuthFail(), got
        assert "unusable uid or homeDirectory" in d.wait_log("reason=ldap-entry-incomplete")


@ldap_marks[0]
@ldap_marks[1]
@pytest.mark.parametrize("name, uids, got", [
    ("Lena", [b"alias", b"lena"], AuthOk("lena")),  # the directory matched uid=Lena to "lena"
    ("lena", [b"LENA", b"alias"], AuthOk("LENA")),
    ("lena", [b"alias", b"other"], AuthFail()),   # neither is the name bound
    ("lena", [b"Lena", b"lena"], AuthFail()),     # both are: still two accounts
])
def test_several_uid_values_pick_the_name_bound_whatever_its_case(daemon, scripted, name,
                                                                   uids, got):
    """uid matches without regard to case (RFC 4519: caseIgnoreMatch), so
    the value bound as uid=%u is the one equal to the name bar case, and
    it is the account; two such values are ambiguous (kills L14: only the
    exact spelling counted, and "Lena" bound as "lena" was refused). The
    order of the values kept (L13) decides nothing: two kept are refused."""
    directory = scripted(_serving(dict(GOOD, uid=uids)))
    d = daemon(_conf(directory.uri))
    assert _outcome(d, name, PW) == got
    if got == AuthFail():
        assert "several values of uid" in d.wait_log("reason=ldap-entry-incomplete")


@ldap_marks[0]
@ldap_marks[1]
@pytest.mark.parametrize("change, got, said", [
    ({"uid": [b""]}, AuthFail(), "lacks uid"),
    ({"homeDirectory": [b""]}, AuthFail(), "lacks homeDirectory"),
    ({"uid": [b"", b"lena"]}, AuthOk("lena"), ""),
    ({"homeDirectory": [b"", b"/home/lena"]}, AuthOk("lena"), ""),
    ({"gidNumber": [b"40101", b""]}, AuthOk("lena"), ""),
])
def test_empty_values_are_no_values(daemon, scripted, change, got, said):
    """An empty value is no value: alone it is an attribute missing, beside
    a real one it does not make two (kills L11: empty values kept, which
    served the account "" and refused a home beside an empty one as
    several)."""
    directory = scripted(_serving(dict(GOOD, **change)))
    d = daemon(_conf(directory.uri))
    assert _outcome(d, "lena", PW) == got
    if said:
        assert said in d.wait_log("reason=ldap-entry-incomplete")


def _trickled(bind_slow: bool):
    """A script: the bind's answer (bind_slow) or the entry's trickles, a
    byte every 0.1 s, well past a try's share."""
    def script(s, conn):
        while True:
            msgid, op, _f = s.read(conn)
            if op == 0x60:
                reply = bind_reply(msgid, diag=b"x" * 300) if bind_slow else bind_reply(msgid)
            elif op == 0x63:
                reply = entry_reply(msgid, dict(GOOD, description=[b"x" * 300])) + done_reply(msgid)
            else:
                return
            if bind_slow == (op == 0x60):
                for byte in reply:
                    conn.sendall(bytes([byte]))
                    time.sleep(0.1)
            else:
                conn.sendall(reply)
    return script


@ldap_marks[0]
@ldap_marks[1]
@pytest.mark.parametrize("bind_slow", [True, False], ids=["bind", "search"])
def test_a_trickle_cut_by_the_watchdog_is_logged_as_a_timeout(daemon, scripted, bind_slow):
    """ldapUri = a directory trickling its bind answer (or its entry), then
    a good one: the first try is cut at its share and logged as timed out
    (not as whatever the cut socket made of the answer), the second logs
    in (kills L04/L05: the cut not checked after the bind/search, L22: the
    watchdog not marking its cut)."""
    slow = scripted(_trickled(bind_slow))
    good = scripted(_serving(GOOD))
    d = daemon(_conf(f"{slow.uri} {good.uri}", timeout=5))
    started = time.monotonic()
    assert _outcome(d, "lena", PW) == AuthOk("lena")
    assert time.monotonic() - started < 3
    log = d.wait_log("auth ok: user=lena")
    assert f"ldap: {slow.uri}: timed out: no complete answer within 1 s" in log, log


# -- sendooway-auth --private ----------------------------------------------------

@pytest.mark.parametrize("args", [["--fd", "3", "--private"], ["--check", "alice", "--private"]])
def test_private_is_refused_beside_fd_and_check(capsys, args):
    """--private is the daemon's (the private authenticator of a listening
    sendooway): with --fd or --check it is a usage error, exit 2 (kills
    S03: the check dropped, --private silently meaningless there)."""
    from sendooway_auth import cli as auth_cli

    with pytest.raises(SystemExit) as exc:
        auth_cli.main(["-c", "/dev/null", *args])
    assert exc.value.code == 2
    assert "--private is for the daemon of a listening sendooway" in capsys.readouterr().err


@ldap_marks[0]
@ldap_marks[1]
def test_a_search_reference_instead_of_the_entry_is_not_followed(daemon, scripted):
    """The entry's search answers a continuation reference (searchResRef)
    and success, no entry: ldap3's search says True (a reference is a
    response), the entry could not be read: 454, the reference not
    followed, the log saying what was missing (kills L07: `not entries`
    dropped, which read entries[0] of nothing, an IndexError logged as an
    answer that could not be read)."""
    from tests.test_review_ldaphostile import _msg, _str, _tlv

    elsewhere = scripted(_serving(GOOD))

    def script(s, conn):
        while True:
            msgid, op, _f = s.read(conn)
            if op == 0x60:
                conn.sendall(bind_reply(msgid))
            elif op == 0x63:
                ref = _msg(msgid, _tlv(0x73, _str(elsewhere.uri.encode() + b"/")))
                conn.sendall(ref + done_reply(msgid))
            else:
                return
    directory = scripted(script)
    d = daemon(_conf(directory.uri))
    reply = _outcome(d, "lena", PW)
    assert isinstance(reply, Error), reply
    log = d.wait_log("no directory answered")
    assert "could not be read after the bind" in log and "IndexError" not in log, log
    time.sleep(0.2)
    assert elsewhere.requests == [] and "auth ok" not in log
