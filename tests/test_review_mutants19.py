"""Tests written from a mutation-testing review of the product code changed
since 1ae966c: sendooway_auth/_ldap.py (referrals not followed, the
watchdog timer per try, the password sent as the bytes typed, the checks
of the directory's answer, _answer/_describe, _values, _number and
_account's value checks, MAX_HOME); shared/config.py (_CONTROL in _split
and its CR hint, the NUL error with its line, _shown cutting a value at
80 characters, a bare IPv6 localname with a zone refused); --private
(sendooway_auth/cli.py, _server.run_daemon ignoring SIGHUP,
sendooway_front/_authlink.spawn_daemon passing it); sendooway_front/cli.py
installing the early signal handlers before the sockets listen. Each test
pins down behaviour that a small change to that code left unnoticed by the
suite, and names the mutants it kills. Real parts: the sendooway-auth
daemon against test_review_ldaphostile's scripted directories on loopback
(BER by hand, for what slapd never says), the real config parser, and a
root sendooway started by socket activation with a fake authenticator
beside it (as test_third_review does).

40 mutants of the code as it was, one at a time, each against the test
files that exercise it (_ldap: test_review_ldaphostile, test_ldap_backend,
test_review_mutants11; config: test_review_confdiff, test_config,
test_auth_faults, test_compat_original; --private and the signals:
test_review_confdiff, test_third_review, test_deploy_admin,
test_front_e2e): 26 killed, 14 survived. This file kills 10 of them; 4
are equivalent.

MUTANTS ("killed" means by the suite before this file)
_ldap.py:
  killed: L01 auto_referrals=True; L02 the password bound as the str
  (SASLprep); L03 the watchdog never started; L06 the search's result
  code not checked (an entry then an error served); L08 two entries
  taken (> 2); L09 isascii() dropped from _number (Arabic-Indic digits a
  uid); L12 the uid choice only from three values on; L15 ".." taken as a
  uid; L16 isprintable() dropped (a newline in a uid); L19 the password
  left in _answer's text; L21 the password encoded as Latin-1; L22 the
  watchdog not setting `cut`; L23 only KeyError caught from the decoder.
  Killed only here: L07 `not entries` dropped (a search reference and
  success read entries[0] of nothing: IndexError, logged as an answer that
  could not be read); L11 empty values kept (uid "" served as the account
  "", a home beside an empty value refused as two); L14 the uid values
  compared with the name case-sensitively (login "Lena", bound by the
  directory to uid "lena", refused as several values); L17 `>= MAX_HOME`
  and L18 MAX_HOME = 4096 (a home of 4095 octets refused, one of 4096
  served); L24 the referral left out of the logged answer.
  Equivalent: L04/L05 the `cut` test after the bind/after the search
  dropped: a watchdog's shutdown makes ldap3 raise (session terminated),
  and the except clause tests `cut` itself; bind() and search() return
  normally after a cut only when the whole answer had arrived just before
  it, a race in which the mutant uses that complete answer (a wrong
  password, an entry) instead of a timeout: no deterministic test, and no
  worse. L13 the sort key inverted (the exact spelling last): the order
  of the values kept decides nothing, since two kept values are refused
  as several and one is one.
  L20 the password not cut out of an exception's text (_describe): with
  raise_exceptions=False and auto_referrals=False the exceptions ldap3
  can raise here carry its own fixed words or a socket error
  (strategy/base.py, sync.py: "session terminated by server", "no
  response from server", last_error of a socket): never the
  directory's message nor the bind request, so there is no password to
  cut (the directory's own text goes through _answer, whose cut L19
  test_review_ldaphostile kills). Defence in depth, not reachable.
config.py:
  killed: C01 DEL allowed; C02 tab refused; C07 the value shown whole;
  C08 the NUL's line one less; C09 the NUL error without its line; C10
  the zone check dropped; C11 match() for search() (a control inside the
  line taken); C12 validUser's error shown whole.
  Killed only here: C04 the CR hint given for U+000A instead; C05 _shown's
  limit 81; C06 the dots from 80 characters on (>=).
--private and the signals:
  killed: S01 run_daemon without SIG_IGN for SIGHUP; S02 --private
  ignored (config_path passed); S03 --private beside --fd/--check
  accepted; S04 spawn_daemon without --private; S06 the early handlers
  for activation alone (-b killed by SIGHUP).
  Killed only here: S05 the early handlers for -b alone: an activated
  frontend (Accept=no) stopped while its private authenticator starts
  died of the SIGTERM (status -15) instead of stopping cleanly.

No product defect was found: each survivor killed here was a gap in the
tests, the product right."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from sendooway_shared.config import ConfigError, load_config
from sendooway_shared.protocol import AuthFail, AuthOk, Error
from tests import test_review_ldaphostile as hostile
from tests.test_review_ldaphostile import (
    GOOD, PW, _conf, _outcome, _searched, _serving, done_reply,
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
    # (a search result reference, 0x73, then the search's end)
    directory = scripted(_searched(lambda msgid: _msg(msgid, _tlv(0x73, _str(
        elsewhere.uri.encode() + b"/"))) + done_reply(msgid)))
    d = daemon(_conf(directory.uri))
    reply = _outcome(d, "lena", PW)
    assert isinstance(reply, Error), reply
    log = d.wait_log("no directory answered")
    assert "could not be read after the bind" in log and "IndexError" not in log, log
    time.sleep(0.2)
    assert elsewhere.requests == [] and "auth ok" not in log



@ldap_marks[0]
@ldap_marks[1]
def test_a_referral_is_named_in_the_log(daemon, scripted):
    """A referral in answer to the entry's search is not followed, and the
    log names where it pointed: what an admin needs to see why the
    directory "did not answer" (kills L24: the referral left out of the
    directory's answer as logged)."""
    directory = scripted(_searched(
        lambda msgid: done_reply(msgid, 10, referral=[b"ldap://elsewhere.invalid/"])))
    d = daemon(_conf(directory.uri))
    assert isinstance(_outcome(d, "lena", PW), Error)
    log = d.wait_log("no directory answered")
    assert "could not be read after the bind (10 " in log, log
    assert "(referral to ldap://elsewhere.invalid/)" in log, log

# -- sendooway_front/cli.py: the early signal handlers ---------------------------

_SLOW_TO_START_AUTH = """\
import os, signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
open(os.environ["FAKE_AUTH_STARTED"], "w").close()
time.sleep(2)  # starting: the frontend waits for READY=1
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
while True:
    time.sleep(0.1)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the private authenticator)")
def test_a_stop_while_an_activated_frontend_starts_is_a_clean_stop(tmp_path):
    """Socket activation (Accept=no: a listening socket on fd 3, as systemd
    passes it), sendooway as root, its private authenticator slow to
    start: a SIGTERM while the frontend waits for it (systemctl stop at
    once) is noted and the frontend stops cleanly, exit 0, as with -b
    (kills S05: the early handlers installed for -b alone, the activated
    frontend killed by the signal, status -15)."""
    from tests.test_third_review import sendooway_beside_a_fake_authenticator

    front = sendooway_beside_a_fake_authenticator(tmp_path, _SLOW_TO_START_AUTH)
    started = tmp_path / "auth-started"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    script = 'exec 3<&0 0</dev/null; export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@"'
    proc = subprocess.Popen(
        ["/bin/sh", "-c", script, "sh", front, "-c", "/dev/null", "-l", "&2",
         "--auth-socket", str(tmp_path / "none" / "auth.sock")],
        stdin=listener.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=dict(os.environ, FAKE_AUTH_STARTED=str(started)), start_new_session=True)
    listener.close()
    try:
        deadline = time.monotonic() + 20
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), proc.stderr.read() if proc.poll() is not None else "no start"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    err = proc.stderr.read().decode(errors="replace")
    assert code == 0, f"the activated sendooway ended with {code}:\n{err}"
