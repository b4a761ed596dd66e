"""An outside review of authBackend = LDAP under hostile and broken
directories: what an entry's attributes may hold, what a login name may
hold, what a directory may answer (or not answer), and where a password
may go. Real parts: the sendooway-auth daemon and, for one test, the
sendooway frontend, against a real OpenLDAP slapd whose schema is made lax
on purpose (uidNumber, gidNumber and homeDirectory as multi-valued octet
strings: what a directory with another schema, or none checked, can
hold), and against a scripted directory for what slapd would never say
(a referral after a good bind, an echoed password, a trickle, garbage).

The backend binds to a DN and reads that entry with a base search and the
fixed filter (objectClass=*): no search filter is ever built from the
login name, so RFC 4515 filter escaping has nothing to escape; the name is
escaped as an RDN value (RFC 4514) instead, and the names a filter
injection would use are checked against that.

DEFECTS FOUND (each test named failed before its fix; 18 tests of this
file failed on the code as it was)
  D1 A referral in answer to the entry's search was followed, with the
     user's DN and password, to whatever host it named (ldap3's default:
     any host, with credentials; ldap:// in clear even from ldaps://), and
     that host's entry became the account served:
     test_a_referral_after_the_bind_..., test_a_referral_directory_through_
     the_frontend_is_454.
  D2 A bind answer carrying a referral made ldap3's decoder raise KeyError,
     which left the backend: an internal error in the daemon, the
     connection dropped; so did other corrupted answers:
     test_a_referral_in_answer_to_the_bind_..., test_corrupted_answers_...
  D3 A directory that trickles its answer (a byte every 0.2 s) held the
     login's worker thread for ever: each read was bounded, the whole try
     was not. The daemon answered 454 at `timeout`, but eight such logins
     left no worker for anyone, a second, healthy ldapUri was never tried,
     and a huge answer ground on after the 454 (ldap3 joins reads
     quadratically): test_a_trickle_is_cut_...[ldap-answer, ldaps-answer],
     test_a_trickling_first_directory_..., test_a_huge_answer_is_bounded.
  D4 Several values of uidNumber, gidNumber or homeDirectory: the first one
     the directory sent was served (values are a set: any of them); several
     uid values: the first, not the name bound (uid=aliasfirst holding
     "uid: alice" first logged in as alice, whom validUser names); two
     entries for one DN: the first; an entry followed by an error result:
     served (ldap3's search says True for any entry):
     test_hostile_entries_..., test_a_second_uid_value_...,
     test_scripted_entries_...[uid4], test_several_entries_for_one_dn_...,
     test_a_broken_answer_...[entry-then-error].
  D5 uidNumber/gidNumber read by Python's int(): "٤٠٣٠٣" (Arabic-Indic
     digits), "4_0303", " 40303", "+40303" were all uid 40303; a uid that
     is not UTF-8 was served as the account "b'le\\xffna'"; a uid with a
     newline, or "..", as such; a 5000-octet home was accepted:
     test_hostile_entries_..., test_scripted_entries_...[uid0-2].
  D6 The password went through ldap3's SASLprep: NFKC-folded, so a user
     whose stored password has a full-width letter could not log in with
     it while its ASCII fold could; a tab or a lone soft hyphen gave 454
     "no directory answered" (logged as an error, not counted), not a wrong
     password. The original (libldap) sent the bytes typed; so does PAM:
     test_the_password_is_sent_as_typed.
  D7 The directory's diagnostic message was logged whole: the password
     too when it echoed it: test_a_password_echoed_...[80, 1].

HELD ALREADY (checked, no change): names that would reshape the DN or a
filter, NUL included; an empty password (never bound, at both layers); an
entry without userPassword; uidNumber 0, negative, 2**32 and beyond;
missing attributes one by one; relative and NUL-holding homes; a search
that stalls, closes, or answers garbage, an unknown operation or another
message id (bounded by the read limit); a slow but complete answer (a
login); ldaps:// to a cleartext port; a TLS handshake trickled (Python's
handshake has one deadline); a home with a newline (served, logged
escaped). Left alone: a try's share is truncated to whole seconds (with
timeout = 4 a single URI gets 1 s of its 2 s budget); a home with ".."
is normalised and served (the directory may name any home; files are
read as the entry's uid).

MUTANTS (planted by hand in sendooway_auth/_ldap.py after the fixes, one
at a time, against this file; all 17 killed)
  M01 escape_rdn dropped from user_dn: "le\\6ea" logged in as lena
      (test_names_that_would_reshape_...).
  M02 the backend's empty-password guard dropped (the daemon's own guard
      still there): test_an_empty_password_never_reaches_the_directory.
  M03 auto_referrals back to ldap3's default: test_a_referral_after_...
  M04 the watchdog never started: test_a_trickle_...[ldap-answer] and
      [ldaps-answer] (each alone).
  M05 no several-values check: test_hostile_entries_...
  M06 a looser digits test (blanks and "+" stripped, any Unicode digit):
      test_hostile_entries_...
  M07 the uid value matching the name not preferred: test_a_second_uid_...
  M08 the password given to ldap3 as text again: test_the_password_...
  M09 the password not masked in the logged answer: test_a_password_echoed_...
  M10 several entries accepted: test_several_entries_for_one_dn_...
  M11 the home length bound dropped: test_hostile_entries_...
  M12 the catch-all for undecodable answers dropped:
      test_a_referral_in_answer_to_the_bind_...
  M13 the uid's printable/"."/".." checks dropped: test_scripted_entries_...
  M14 the text (not bytes) check dropped: test_hostile_entries_...
  M15 the watchdog 60 s late: test_a_trickle_...[ldap-answer].
  M16 the search's result code not checked:
      test_a_broken_answer_...[entry-then-error].
  M17 the digit-count bound dropped from _number (int() then raises on
      5000 digits: a 454 instead of a refusal): test_hostile_entries_...
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time

import pytest

from sendooway_shared.protocol import AuthFail, AuthOk, Error, NoRoute
from tests.auth_helpers import all_passwords, checked_daemons, login, route
from tests.ldap_world import PEOPLE, Slapd, have_slapd

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root"),
    pytest.mark.skipif(not have_slapd(), reason="slapd is not installed (scripts/setup.sh)"),
]

PW = "Hostile-Ldap-Pw-6"
LENA_PW = "Lena-Hostile-Pw-7"
WIDE_PW = "\uff57ide-Hostile-Pw-8"  # a full-width w: NFKC makes it "wide-Hostile-Pw-8"
HOME = "/nonexistent/hostile"
AUTH_DN = f"uid=%u,{PEOPLE}"
# homeDirectory as any octets, several values; uidNumber and gidNumber are
# built into slapd (2.5), their values loaded unchecked (slapadd -s)
LAX_SCHEMA = ("attributetype ( 1.3.6.1.1.1.1.3 NAME 'homeDirectory' EQUALITY octetStringMatch"
              " SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 )\n")
BASE = {"uidNumber": [b"40301"], "gidNumber": [b"40301"], "homeDirectory": [HOME.encode()]}

# name -> (attributes changed from BASE (None: absent), what the log says)
HOSTILE = {
    "twouidn": ({"uidNumber": [b"40302", b"0"]}, "several values"),
    "twogidn": ({"gidNumber": [b"40302", b"40399"]}, "several values"),
    "twohomes": ({"homeDirectory": [HOME.encode(), b"/root"]}, "several values"),
    "arabic": ({"uidNumber": ["\u0664\u0660\u0663\u0660\u0663".encode()]}, "are not numbers"),
    "underscore": ({"uidNumber": [b"4_0303"]}, "are not numbers"),
    "blanked": ({"uidNumber": [b" 40303"]}, "are not numbers"),
    "plussed": ({"gidNumber": [b"+40303"]}, "are not numbers"),
    "hexed": ({"gidNumber": [b"0x9d6f"]}, "are not numbers"),
    "negative": ({"uidNumber": [b"-40303"]}, "are not numbers"),
    "wrapped": ({"uidNumber": [b"4294967296"]}, "root or out of range"),  # 2**32: 0 for a C uid_t
    "huge": ({"gidNumber": [b"9" * 400]}, "root or out of range"),
    "vast": ({"uidNumber": [b"9" * 5000]}, "root or out of range"),  # int() refuses > 4300 digits
    "nouidn": ({"uidNumber": None}, "lacks uidNumber"),
    "nogidn": ({"gidNumber": None}, "lacks gidNumber"),
    "nohome": ({"homeDirectory": None}, "lacks homeDirectory"),
    "relhome": ({"homeDirectory": [b"home/relhome"]}, "unusable uid or homeDirectory"),
    "nulhome": ({"homeDirectory": [b"/home/x\0/root"]}, "unusable uid or homeDirectory"),
    "binhome": ({"homeDirectory": [b"/home/\xff\xfe"]}, "unusable uid or homeDirectory"),
    "longhome": ({"homeDirectory": [b"/" + b"x" * 5000]}, "unusable uid or homeDirectory"),
}


@pytest.fixture
def daemon(tmp_path, tmp_config, clean_homes):
    """auth_helpers' daemon fixture, whose logs are checked for this file's
    passwords too."""
    yield from checked_daemons(tmp_path, tmp_config, all_passwords(clean_homes) + [
        PW, LENA_PW, WIDE_PW, "wide-Hostile-Pw-8", "Echoed-Secret-Pw-9"])


def _ldif_entry(uid: list[str], password: str | None, attrs: dict) -> str:
    lines = [f"dn: uid={uid[-1]},{PEOPLE}", "objectClass: inetOrgPerson",
             "objectClass: extensibleObject", f"cn: {uid[-1]}", f"sn: {uid[-1]}"]
    lines += [f"uid: {u}" for u in uid]
    if password is not None:
        lines.append("userPassword:: " + base64.b64encode(password.encode()).decode())
    for key, values in attrs.items():
        lines += [f"{key}:: {base64.b64encode(v).decode()}" for v in values or ()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def lax(tmp_path_factory):
    """A slapd whose entries hold what the nis schema would refuse, with a
    default referral for DNs it does not hold (ldap://127.0.0.1:9, where
    nothing listens)."""
    entries = [_ldif_entry(["lena"], LENA_PW, BASE),
               _ldif_entry(["okay"], PW, BASE),
               _ldif_entry(["alice", "aliasfirst"], PW, BASE),
               _ldif_entry(["nlhome"], PW, dict(BASE, homeDirectory=[b"/tmp/x\nFAKE auth ok: user=root"])),
               _ldif_entry(["wide"], WIDE_PW, BASE),
               _ldif_entry(["nopw"], None, BASE)]
    entries += [_ldif_entry([f"w{n}"], PW, BASE) for n in range(8)]
    entries += [_ldif_entry([name], PW, {k: v for k, v in dict(BASE, **change).items()
                                         if v is not None})
                for name, (change, _said) in HOSTILE.items()]
    server = Slapd(str(tmp_path_factory.mktemp("slapd")), [],
                   schemas=("core", "cosine", "inetorgperson"), extra_schema=LAX_SCHEMA,
                   extra_ldif="\n".join(entries), extra_conf="referral ldap://127.0.0.1:9/\n",
                   check_schema=False)
    yield server
    server.stop()


def _conf(uri: str, ca: str = "", dn: str = AUTH_DN, timeout: int = 5) -> str:
    return (f"authBackend = LDAP\nldapUri = {uri}\n" + (f"ldapSSLca = {ca}\n" if ca else "")
            + f"ldapAuthDN = {dn}\ntimeout = {timeout}\n")


def _lax_conf(lax, **kw) -> str:
    return _conf(lax.uri(tls=False), **kw)


def _outcome(d, name: str, password: str, client: str = "192.0.2.7"):
    ch = d.connect(timeout=20)
    try:
        return login(ch, name, password, client=client)
    finally:
        ch.close()


# -- a scripted directory: BER by hand, for what slapd never says ----------

def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _int(n: int, tag: int = 0x02) -> bytes:
    return _tlv(tag, n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True))


def _str(b) -> bytes:
    return _tlv(0x04, b if isinstance(b, bytes) else b.encode())


def _result(code: int, diag: bytes = b"", referral=()) -> bytes:
    body = _int(code, 0x0A) + _str(b"") + _str(diag)
    if referral:
        body += _tlv(0xA3, b"".join(_str(u) for u in referral))
    return body


def _msg(msgid: int, op: bytes) -> bytes:
    return _tlv(0x30, _int(msgid) + op)


def bind_reply(msgid: int, code: int = 0, diag: bytes = b"", referral=()) -> bytes:
    return _msg(msgid, _tlv(0x61, _result(code, diag, referral)))


def entry_reply(msgid: int, attrs: dict, dn: bytes = b"uid=lena," + PEOPLE.encode()) -> bytes:
    pal = b"".join(_tlv(0x30, _str(k) + _tlv(0x31, b"".join(_str(v) for v in vals)))
                   for k, vals in attrs.items())
    return _msg(msgid, _tlv(0x64, _str(dn) + _tlv(0x30, pal)))


def done_reply(msgid: int, code: int = 0, referral=()) -> bytes:
    return _msg(msgid, _tlv(0x65, _result(code, referral=referral)))


def _parse(buf: bytes, i: int):
    tag, n, i = buf[i], buf[i + 1], i + 2
    if n & 0x80:
        k = n & 0x7F
        n, i = int.from_bytes(buf[i:i + k], "big"), i + k
    return tag, buf[i:i + n], i + n


class Scripted:
    """An ldap:// server on loopback: `script(self, conn)` plays each
    connection; `requests` records (operation tag, its fields) in order,
    `binds` each bind's (dn, password)."""

    def __init__(self, script, tls=None) -> None:
        self.script = script
        self.tls = tls  # an ssl.SSLContext: ldaps://
        self.requests: list = []
        self.binds: list[tuple[bytes, bytes]] = []
        self.conns: list[socket.socket] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.uri = f"ldap://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._play, args=(conn,), daemon=True).start()

    def _play(self, conn) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
                self.conns.append(conn)
            self.script(self, conn)
        except (EOFError, OSError):
            pass

    def read(self, conn) -> tuple[int, int, list]:
        def exactly(n):
            out = b""
            while len(out) < n:
                chunk = conn.recv(n - len(out))
                if not chunk:
                    raise EOFError
                out += chunk
            return out
        head = exactly(2)
        n = head[1]
        if n & 0x80:
            n = int.from_bytes(exactly(n & 0x7F), "big")
        body = exactly(n)
        _t, msgid, i = _parse(body, 0)
        op, opbody, _ = _parse(body, i)
        fields, j = [], 0
        while j < len(opbody):
            t, v, j = _parse(opbody, j)
            fields.append(v)
        self.requests.append((op, fields))
        if op == 0x60:
            self.binds.append((fields[1], fields[2]))
        return int.from_bytes(msgid, "big"), op, fields

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def scripted():
    made = []

    def make(script, tls=None) -> Scripted:
        made.append(Scripted(script, tls))
        return made[-1]
    yield make
    for s in made:
        s.close()


def _searched(answer, pause: float = 0.0):
    """A script: any bind succeeds (a directory with unauthenticated binds
    allowed), a search is answered with `answer(msgid)`."""
    def script(s, conn):
        while True:
            msgid, op, _f = s.read(conn)
            time.sleep(pause)
            if op == 0x60:
                conn.sendall(bind_reply(msgid))
            elif op == 0x63:
                conn.sendall(answer(msgid))
            else:
                return
    return script


def _serving(attrs: dict, entries: int = 1, pause: float = 0.0):
    """A script: any bind succeeds, the search answers `entries` copies of
    the entry."""
    return _searched(lambda msgid: b"".join(entry_reply(msgid, attrs) for _ in range(entries))
                     + done_reply(msgid), pause)


GOOD = {"uid": [b"lena"], "uidNumber": [b"40101"], "gidNumber": [b"40101"],
        "homeDirectory": [b"/home/lena"]}


# -- what an entry may hold --------------------------------------------------

def test_hostile_entries_are_refused_and_logged(daemon, lax):
    """Each entry above, with its right password: refused as a failed login
    (535: the account cannot be served), the log saying why; the plain one
    beside them logs in. None is served on its first value, a number
    Python reads and NSS does not, a home not text or longer than a path."""
    d = daemon(_lax_conf(lax))
    assert _outcome(d, "okay", PW) == AuthOk("okay")
    got = {name: _outcome(d, name, PW) for name in HOSTILE}
    assert got == {name: AuthFail() for name in HOSTILE}
    log = d.wait_log("user=longhome client=")
    for name, (_change, said) in HOSTILE.items():
        line = next((x for x in log.splitlines() if f"ldap: user={name} " in x), "")
        assert said in line, (name, line)
        assert f"auth failed: user={name} client=192.0.2.7 reason=ldap-" in log, name
    assert PW not in log


def test_a_second_uid_value_does_not_rename_the_account(daemon, lax):
    """uid=aliasfirst,... holding "uid: alice" before "uid: aliasfirst":
    the account is the name bound, not whichever value came first (it was
    alice, whom validUser names)."""
    d = daemon(_lax_conf(lax) + "validUser = alice\n")
    assert _outcome(d, "aliasfirst", PW) == AuthFail()
    log = d.wait_log("user=aliasfirst client=192.0.2.7 reason=not-a-valid-user")
    assert "auth ok" not in log
    d2 = daemon(_lax_conf(lax))
    assert _outcome(d2, "aliasfirst", PW) == AuthOk("aliasfirst")


@pytest.mark.parametrize("uid, said", [
    ([b"le\xffna"], "unusable uid"),
    ([b"le\nna"], "unusable uid"),
    ([b".."], "unusable uid"),
    ([b"le/na"], "unusable uid"),
    ([b"bob", b"carol"], "several values"),
])
def test_scripted_entries_with_unusable_uids_are_refused(daemon, scripted, uid, said):
    """uid values slapd's DirectoryString would not hold (not UTF-8) or
    that make poor account names (a newline, "..", a slash), and two uid
    values neither of which is the name bound."""
    directory = scripted(_serving(dict(GOOD, uid=uid)))
    d = daemon(_conf(directory.uri))
    assert _outcome(d, "lena", PW) == AuthFail()
    log = d.wait_log("reason=ldap-entry-incomplete")
    assert said in log and "auth ok" not in log


def test_a_home_with_a_newline_is_served_and_logged_escaped(daemon, lax):
    """A newline is a legal byte of a path: the account is served, and the
    route lookup's errors about its files cannot forge a log line."""
    d = daemon(_lax_conf(lax))
    ch = d.connect()
    assert login(ch, "nlhome", PW) == AuthOk("nlhome")
    assert route(ch, "nlhome@example.org") == NoRoute()
    ch.close()
    log = d.wait_log("route: user=nlhome")
    assert not any(line.startswith("FAKE") for line in log.splitlines())


def test_an_entry_without_a_password_never_binds(daemon, lax):
    d = daemon(_lax_conf(lax))
    for pw in (PW, "x"):
        assert _outcome(d, "nopw", pw) == AuthFail()
    d.wait_log("user=nopw client=192.0.2.7 reason=wrong-password")


# -- what a login name may hold ----------------------------------------------

NAMES = ["*", "le\\6ea", "le\\6Ea", "lena\\", "\\6cena", "lena)(uid=*", "*)(|(uid=*",
         "lena,ou=people", "uid=lena", "lena+cn=lena", "#04046c656e61", "lena\\00",
         "lena,ou=people,dc=example,dc=test", "lena\"", "<lena>", "lena;", "(lena)"]


def test_names_that_would_reshape_the_dn_or_a_filter_never_log_in(daemon, lax):
    """lena's right password with names that, pasted into a DN or a
    filter, would be lena or every entry: RFC 4514 hex escapes ("le\\6ea"
    is lena unescaped), a BER value ("#0404lena"), filter metacharacters,
    RDN separators, a NUL (which the protocol cannot carry: asked of the
    backend directly). Each is refused; lena herself logs in."""
    from sendooway_auth import _ldap
    from sendooway_shared.config import parse_config
    from sendooway_shared.types import Secret

    cfg = parse_config(_lax_conf(lax), "names.conf")
    assert _ldap.login(cfg, "lena\0", Secret(LENA_PW)) == (None, "unknown-user")
    assert _ldap.login(cfg, "lena", Secret(LENA_PW))[0].name == "lena"
    d = daemon(_lax_conf(lax))
    got = {name: _outcome(d, name, LENA_PW) for name in NAMES}
    assert got == {name: AuthFail() for name in NAMES}
    assert _outcome(d, "lena", LENA_PW) == AuthOk("lena")
    assert "auth ok: user=lena " in d.wait_log("auth ok")
    assert d.log().count("auth ok") == 1


def test_several_entries_for_one_dn_are_a_broken_directory(daemon, scripted):
    """A base search has one entry at most: two (different accounts) is a
    directory to distrust, a temporary failure, never the first of them."""
    other = dict(GOOD, uidNumber=[b"40999"])
    script = _searched(lambda msgid: entry_reply(msgid, GOOD) + entry_reply(msgid, other)
                       + done_reply(msgid))
    directory = scripted(script)
    d = daemon(_conf(directory.uri))
    assert isinstance(_outcome(d, "lena", PW), Error)
    assert "answered 2 entries" in d.wait_log("no directory answered")


# -- where the password goes ---------------------------------------------------

def test_an_empty_password_never_reaches_the_directory(daemon, scripted):
    """The scripted directory takes any bind, as one allowing
    unauthenticated binds (RFC 4513 5.1.2) would: an empty password is
    refused before any bind."""
    from sendooway_auth import _ldap
    from sendooway_shared.config import parse_config
    from sendooway_shared.types import Secret

    directory = scripted(_serving(GOOD))
    cfg = parse_config(_conf(directory.uri), "empty.conf")
    assert _ldap.login(cfg, "lena", Secret("")) == (None, "empty-password")
    d = daemon(_conf(directory.uri))
    assert _outcome(d, "lena", "") == AuthFail()
    d.wait_log("reason=empty-password")
    assert directory.binds == []
    assert _outcome(d, "lena", "x") == AuthOk("lena")  # the directory itself works
    assert directory.binds == [(b"uid=lena," + PEOPLE.encode(), b"x")]


def test_the_password_is_sent_as_typed(daemon, lax, scripted):
    """No SASLprep: the bytes typed are the bytes bound with, as with
    libldap (the original) and PAM. A stored password with a full-width
    letter logs in as typed and not as its NFKC fold; a tab or a lone
    soft hyphen is a wrong password, not a 454."""
    d = daemon(_lax_conf(lax))
    assert _outcome(d, "wide", WIDE_PW) == AuthOk("wide")
    assert _outcome(d, "wide", "wide-Hostile-Pw-8") == AuthFail()
    for pw in ("Tab\tHostile-Pw", "\u00ad"):
        assert _outcome(d, "okay", pw) == AuthFail(), repr(pw)
    log = d.wait_log("user=okay client=192.0.2.7 reason=wrong-password")
    assert log.count("user=okay client=192.0.2.7 reason=wrong-password") == 2
    assert "no directory answered" not in log
    directory = scripted(_serving(GOOD))
    d2 = daemon(_conf(directory.uri))
    _outcome(d2, "lena", WIDE_PW)
    assert directory.binds[-1][1] == WIDE_PW.encode()


@pytest.mark.parametrize("code", [80, 53, 49, 1])
def test_a_password_echoed_by_the_directory_is_never_logged(daemon, scripted, code):
    """A directory whose diagnostic message repeats the password (some
    password-policy modules quote what they refused): never in the log."""
    secret = "Echoed-Secret-Pw-9"

    def script(s, conn):
        msgid, _op, _f = s.read(conn)
        conn.sendall(bind_reply(msgid, code, diag=b"refused password " + s.binds[-1][1]))
        s.read(conn)
    directory = scripted(script)
    d = daemon(_conf(directory.uri))
    reply = _outcome(d, "lena", secret)
    assert reply == AuthFail() or isinstance(reply, Error)
    log = d.wait_log("user=lena client=192.0.2.7 reason=")
    assert directory.binds and secret not in log


def _referring(elsewhere):
    """A directory's script: every bind succeeds, every search answers a
    referral (result 10) to `elsewhere`."""
    return _searched(lambda msgid: done_reply(msgid, 10, referral=[elsewhere.uri.encode() + b"/"]))


def test_a_referral_after_the_bind_is_not_followed_with_the_password(daemon, scripted):
    """The bind succeeds and the entry's search answers a referral to
    another server (ldap://, in clear): nothing is sent there — it used
    to get the DN and the password, and its entry was the account."""
    elsewhere = scripted(_serving(dict(GOOD, uid=[b"mallory"], uidNumber=[b"4242"])))
    directory = scripted(_referring(elsewhere))
    d = daemon(_conf(directory.uri))
    reply = _outcome(d, "lena", PW)
    assert isinstance(reply, Error), reply
    time.sleep(0.2)
    assert elsewhere.requests == [] and "auth ok" not in d.log()
    d.wait_log("no directory answered")


def test_a_referral_in_answer_to_the_bind_is_a_temporary_failure(daemon, scripted):
    """The bind itself answered with a referral (slapd never does; other
    directories may): 454, nothing counted, nothing sent to the other
    server."""
    elsewhere = scripted(_serving(GOOD))

    def script(s, conn):
        msgid, _op, _f = s.read(conn)
        conn.sendall(bind_reply(msgid, 10, referral=[elsewhere.uri.encode() + b"/"]))
        s.read(conn)
    directory = scripted(script)
    d = daemon(_conf(directory.uri))
    assert isinstance(_outcome(d, "lena", PW), Error)
    log = d.wait_log("no directory answered")
    assert "reason=ldap-unavailable" in log and "auth failed" not in log
    assert elsewhere.requests == [] and PW not in log


# -- a directory that answers badly, slowly or not at all ----------------------

def _bind_then(search_answer):
    def script(s, conn):
        msgid, _op, _f = s.read(conn)
        conn.sendall(bind_reply(msgid))
        msgid, _op, _f = s.read(conn)
        search_answer(conn, msgid)
        time.sleep(30)  # held open, silent
    return script


def _half(conn, msgid):
    conn.sendall((entry_reply(msgid, GOOD) + done_reply(msgid))[:40])


def _close(conn, msgid):
    conn.sendall(entry_reply(msgid, GOOD)[:30])
    conn.shutdown(socket.SHUT_RDWR)


def _garbage(conn, msgid):
    conn.sendall(b"\x30\x84\xff\xff\xff\xff\x02\x01" + os.urandom(64))


def _junk_op(conn, msgid):
    conn.sendall(_msg(msgid, _tlv(0x7F, b"\x00" * 8)) + b"\x00\x00\x00")


def _entry_then_error(conn, msgid):
    conn.sendall(entry_reply(msgid, GOOD) + done_reply(msgid, 80))


def _wrong_id(conn, msgid):
    conn.sendall(entry_reply(msgid + 7, GOOD) + done_reply(msgid + 7))


@pytest.mark.parametrize("answer", [_half, _close, _garbage, _junk_op, _wrong_id,
                                    _entry_then_error],
                         ids=["stalls-mid-answer", "closes-mid-answer", "garbage",
                              "unknown-operation", "wrong-message-id", "entry-then-error"])
def test_a_broken_answer_is_a_temporary_failure_within_timeout(daemon, scripted, answer):
    directory = scripted(_bind_then(answer))
    d = daemon(_conf(directory.uri, timeout=4))
    started = time.monotonic()
    reply = _outcome(d, "lena", PW)
    assert isinstance(reply, Error), reply
    assert time.monotonic() - started < 4 + 1
    log = d.wait_log("auth unavailable: user=lena")
    assert "auth ok" not in log and "auth failed" not in log and PW not in log


def test_a_directory_closing_after_the_connect_is_a_temporary_failure(daemon, scripted):
    directory = scripted(lambda s, conn: conn.close())
    d = daemon(_conf(directory.uri))
    assert isinstance(_outcome(d, "lena", PW), Error)
    d.wait_log("no directory answered")


def test_a_slow_but_complete_answer_logs_in(daemon, scripted):
    """Each answer 0.6 s late, well within the limits: a login, not a
    spurious 454."""
    directory = scripted(_serving(GOOD, pause=0.6))
    d = daemon(_conf(directory.uri))
    assert _outcome(d, "lena", PW) == AuthOk("lena")


def _trickle(conn, msgid):
    for byte in entry_reply(msgid, dict(GOOD, description=[b"x" * 2000])):
        conn.sendall(bytes([byte]))
        time.sleep(0.2)


def _trickle_tls(s, conn):
    for byte in b"\x16\x03\x03\x40\x00" + b"\x02" * 400:  # a ServerHello that never ends
        conn.sendall(bytes([byte]))
        time.sleep(0.2)


@pytest.mark.parametrize("where", ["ldap-answer", "ldaps-answer", "ldaps-handshake"])
def test_a_trickle_is_cut_at_the_budget(scripted, lax, where):
    """A byte every 0.2 s, in the entry's answer (in clear or over TLS) or
    in the TLS handshake: each read is quick, the answer never ends. The
    try ends with the login's budget (timeout - 2 s), not with the answer
    (it took for ever)."""
    import ssl

    from sendooway_auth import _ldap
    from sendooway_shared.config import parse_config
    from sendooway_shared.types import Secret

    tls = None
    if where == "ldaps-answer":
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(lax.cert, lax.key)
    directory = scripted(_trickle_tls if where == "ldaps-handshake" else _bind_then(_trickle), tls)
    uri = directory.uri
    if where != "ldap-answer":
        uri = uri.replace("ldap://127.0.0.1", "ldaps://localhost")
    cfg = parse_config(_conf(uri, ca=lax.ca_file), "trickle.conf")
    got: list = []
    worker = threading.Thread(target=lambda: got.append(_ldap.login(cfg, "lena", Secret(PW))),
                              daemon=True)
    worker.start()
    worker.join(_ldap.budget(cfg) + 1)  # (a stuck worker ends when the script is closed)
    assert got == [(None, "ldap-unavailable")]


def test_a_trickling_first_directory_leaves_the_second_to_answer(daemon, scripted, lax):
    """ldapUri = a trickling server, then a good one; nine logins, the first
    eight at once, eight users from eight addresses (the daemon has eight
    login workers, and one turn per user and address at a time): each
    is cut at its share of the budget and goes on to the good server. The
    trickle used to hold every worker for ever: 454 for all, and for every
    login after."""
    directory = scripted(_bind_then(_trickle))
    d = daemon(_conf(f"{directory.uri} {lax.uri(tls=False)}", timeout=5))
    replies = {}

    def one(n):
        replies[n] = _outcome(d, f"w{n}", PW, client=f"192.0.2.{20 + n}")  # (a turn each)
    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert replies == {n: AuthOk(f"w{n}") for n in range(8)}
    assert _outcome(d, "lena", LENA_PW) == AuthOk("lena")
    assert f"ldap: {directory.uri}: " in d.log()


def test_a_huge_answer_is_bounded(daemon, scripted):
    """An entry of 40 MB (one attribute value) and, apart, 100 000 entries:
    a temporary failure within the login's budget, the daemon still
    answering. (ldap3 joins the answer's reads in a loop quadratic in its
    size: the worker used to grind on after the daemon's 454.)"""
    big = dict(GOOD, description=[b"x" * (40 << 20)])
    for script in (_serving(big), _serving(GOOD, entries=100_000)):
        directory = scripted(script)
        d = daemon(_conf(directory.uri, timeout=4))
        started = time.monotonic()
        assert isinstance(_outcome(d, "lena", PW), Error)
        assert time.monotonic() - started < 4 + 1
        # ended by the backend (its worker freed: ldap-unavailable), not by
        # the daemon's wait (that would be ldap-timeout): by the watchdog,
        # or, when this test's server is slow to start its answer (a loaded
        # machine: building 100 000 entries), by the read timeout it races
        log = d.wait_log("reason=ldap-unavailable")
        assert "reason=ldap-timeout" not in log
        said = next(x for x in log.splitlines() if "no directory answered" in x)
        assert ("no complete answer within" in said
                or said.endswith(f"{directory.uri}: error receiving data: timed out")), said
        ch = d.connect()
        assert isinstance(login(ch, "lena", ""), AuthFail)  # the daemon is alive
        ch.close()


def test_ldaps_to_a_server_that_does_not_speak_tls(daemon, lax):
    """ldaps:// to slapd's cleartext port: the handshake fails, a 454 at
    once, the URI named."""
    uri = f"ldaps://localhost:{lax.port}"
    d = daemon(_conf(uri, ca=lax.ca_file))
    started = time.monotonic()
    assert isinstance(_outcome(d, "lena", LENA_PW), Error)
    assert time.monotonic() - started < 3
    assert f"{uri}: " in d.wait_log("no directory answered")


def test_a_referral_directory_through_the_frontend_is_454(world, scripted, tmp_path):
    """End to end: an SMTP client with a right password against a directory
    that refers the search elsewhere gets 454 and the other host nothing;
    one with an empty password (AUTH PLAIN "\\0lena\\0") gets 535 and the
    directory, which takes any bind, gets none."""
    from tests.auth_helpers import Daemon
    from tests.front_util import Frontend, front_config

    elsewhere = scripted(_serving(GOOD))
    directory = scripted(_referring(elsewhere))
    conf = front_config(tmp_path, world, _conf(directory.uri))
    auth = Daemon(tmp_path / "d", conf)
    os.makedirs(auth.dir, exist_ok=True)
    auth.start()
    fe = Frontend(conf, str(tmp_path / "front.log"), args=["--auth-socket", auth.socket_path]).start()
    try:
        c = fe.smtp()
        c.starttls(context=world.ssl_context())
        c.ehlo()
        blob = base64.b64encode(f"\0lena\0{PW}".encode()).decode()
        code, text = c.docmd("AUTH", f"PLAIN {blob}")  # (smtplib's login tries LOGIN next)
        c.close()  # (the session ends with a 421: its authenticator link is spent)
        assert (code, text[:5]) == (454, b"4.7.0"), (code, text)
        binds = list(directory.binds)
        c = fe.smtp()
        c.starttls(context=world.ssl_context())
        c.ehlo()
        code, text = c.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0lena\0").decode())
        c.close()
        assert code == 535, (code, text)
    finally:
        fe.stop()
        auth.stop()
    assert elsewhere.requests == [] and directory.binds == binds
    assert PW not in auth.log()


def test_corrupted_answers_never_raise_out_of_the_backend(scripted):
    """60 answers (the bind's or the search's) with one octet changed, each
    followed by the close: the backend returns a result for each — a login,
    a refusal or a temporary failure —, never an exception (ldap3's decoder
    raises KeyError, IndexError... on what it cannot read: an internal
    error in the daemon, as the bind referral above was)."""
    import random

    from sendooway_auth import _ldap
    from sendooway_shared.config import parse_config
    from sendooway_shared.types import Secret

    rng = random.Random(4515)
    plans = []
    for n in range(60):
        target = n % 2  # 0: the bind's answer, 1: the search's
        blob = bind_reply(1) if target == 0 else entry_reply(2, GOOD) + done_reply(2)
        at = rng.randrange(len(blob))
        plans.append((target, blob[:at] + bytes([rng.randrange(256)]) + blob[at + 1:]))

    def script(s, conn):
        target, blob = plans[int(s.requests_seen)]
        s.requests_seen += 1
        msgid, _op, _f = s.read(conn)
        if target == 0:
            conn.sendall(blob)
        else:
            conn.sendall(bind_reply(msgid))
            s.read(conn)
            conn.sendall(blob)
        conn.shutdown(socket.SHUT_WR)
        time.sleep(0.5)
    directory = scripted(script)
    directory.requests_seen = 0
    cfg = parse_config(_conf(directory.uri, timeout=3), "fuzz.conf")
    for target, blob in plans:
        user, reason = _ldap.login(cfg, "lena", Secret(PW))
        assert (user is None) != (reason == ""), (blob, user, reason)
