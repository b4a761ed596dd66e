"""The users' files read as the real programs read them, with those programs
as oracles (a differential review).

fetchmail 6.4.37 itself (Debian's package, installed by scripts/setup.sh)
reads each file here and logs in to a POP3 server of this module that
records the USER and PASS lines: the exact octets fetchmail sends. For
getmail rc files the oracle is getmail6's own reading, Python's
configparser.RawConfigParser fed as getmail feeds it (the real getmail's
logins: tests/test_review_getmail_oracle.py). sendooway's parsers
must read the same upstream user and password from the same text, or
refuse the account with file:line where docs/decisions/auth.md says it
does on purpose. Last, the exact credentials travel through the real
authenticator and frontend to upstreams that offer only PLAIN, only LOGIN
or only CRAM-MD5.
"""

from __future__ import annotations

import configparser
import io
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

from sendooway_auth.fetchmail import parse_fetchmailrc
from sendooway_auth.getmail import parse_getmailrc
from tests.auth_helpers import Daemon
from tests.fakeworld import _find_lib
from tests.front_util import Frontend, front_config, open_tmp
from tests.upstream import FakeUpstream

F = "/home/alice/.fetchmailrc"
G = "/home/alice/.getmail/getmailrc"
TAIL = '\n#sendooway:server "smtp.example.org"\n#sendooway:address "alice@example.org"\n'


# ------------------------------------------------------------ the oracles


class Pop3Recorder:
    """A POP3 server that refuses every login and records what was tried:
    (USER argument, PASS argument) as octets, lines split at CRLF only."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.logins: list[tuple[bytes, bytes]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"+OK ready\r\n")
            buf, user = b"", b""
            while data := conn.recv(65536):
                buf += data
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    verb = line[:5].upper()
                    if verb == b"USER ":
                        user = line[5:]
                        conn.sendall(b"+OK\r\n")
                    elif verb == b"PASS ":
                        with self._lock:
                            self.logins.append((user, line[5:]))
                        conn.sendall(b"-ERR [AUTH] refused\r\n")
                    elif verb[:4] == b"QUIT":
                        conn.sendall(b"+OK\r\n")
                        return
                    else:
                        conn.sendall(b"-ERR\r\n")

    def fetchmail(self, text: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
        """What fetchmail logs in with for each user of `text` (its polls
        name 127.0.0.1), and whether it refused the file (syntax error)."""
        home = tempfile.mkdtemp(prefix="fm-oracle-")
        try:
            path = os.path.join(home, "rc")
            with open(path, "wb") as f:
                f.write(text)
            os.chmod(path, 0o600)
            # a multidrop poll (`is a b`) makes fetchmail qualify this
            # machine's name: from a hosts file of its own (nss_wrapper), not
            # the resolver, which waits 5 s on each dropped query where the
            # name is not in /etc/hosts (1500 files overran the test's time)
            hosts = os.path.join(home, "hosts")
            with open(hosts, "w") as f:
                f.write(f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n")
            with self._lock:
                self.logins.clear()
            res = subprocess.run(
                ["fetchmail", "-f", path, "--check", "-N", "--nosyslog", "--sslproto", "",
                 "-p", "POP3", "-P", str(self.port), "-t", "30",
                 # as root its pid file is /var/run/fetchmail.pid: a second
                 # fetchmail at once (another xdist worker, another suite)
                 # "can't check mail while another fetchmail to same host is
                 # running" and logs in with nothing
                 "--pidfile", os.path.join(home, "fetchmail.pid")],
                env={"HOME": home, "PATH": "/usr/bin:/bin", "LC_ALL": "C",
                     "LD_PRELOAD": _find_lib("libnss_wrapper.so"), "NSS_WRAPPER_HOSTS": hosts},
                stdin=subprocess.DEVNULL, capture_output=True, timeout=90)
            refused = b"syntax error" in res.stderr
            with self._lock:
                return list(self.logins), refused
        finally:
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def pop3():
    assert shutil.which("fetchmail"), "fetchmail is the oracle: scripts/setup.sh installs it"
    rec = Pop3Recorder()
    yield rec
    rec.sock.close()


def sendooway_reads(text: bytes, login: str = "root"):
    """(user, password) of each account sendooway reads, and its errors."""
    r = parse_fetchmailrc(text.decode("utf-8", "surrogateescape"), F, login=login)
    return [(a.route.user, a.route.password.reveal()) for a in r.accounts], r.errors


def _octets(pair: tuple[str, str]) -> tuple[bytes, bytes]:
    return tuple(v.encode("utf-8") for v in pair)  # type: ignore[return-value]


# ------------------------------------------------------------ fetchmail: hand-picked


# (the user's poll; what fetchmail logs in with, as it showed here)
SAME_AS_FETCHMAIL = [
    # a quote is no escape in fetchmail's quotes; its lexer takes the longest
    # match, so a word running on past a closing quote is one word, quotes
    # and all (sendooway read a"b, abc, abc, it, ')
    (r'user u pass "a\"b"', (b"u", b'"a"b"')),
    ('user u pass "abc"def', (b"u", b'"abc"def')),
    ('user u pass "abc"#def', (b"u", b'"abc"#def')),
    ("user u pass 'it''s'", (b"u", b"'it''s'")),
    (r"user u pass '\''", (b"u", b"'''")),
    # a quote that closes nowhere after it starts a word (was: refused)
    ("user u pass 'abc", (b"u", b"'abc")),
    # a backslash ending a word is dropped (sendooway sent abc\)
    ("user u pass abc\\", (b"u", b"abc")),
    # an escape making the octet 0 ends fetchmail's C string (sendooway sent
    # the NUL and what follows, or \xZ as "xZ")
    (r"user u pass ab\xZcd", (b"u", b"ab")),
    (r'user u pass "ab\0cd"', (b"u", b"ab")),
    (r'user u pass "ab\256cd"', (b"u", b"ab")),
    (r'user u pass "ab\x00cd"', (b"u", b"ab")),
    # a backslash before a line end, where a word would start, joins the
    # lines (sendooway read an empty password)
    ("user u pass \\\nsecret-7", (b"u", b"secret-7")),
    ("user u pass '\\\\\n'", (b"u", b"\\\n")),
    # a name followed by `here` is a local name: fetchmail logs in as the
    # login name, or the defaults' user (sendooway sent alice, a, alice=bob)
    ("user alice here pass x", (b"root", b"x")),
    ("user a b here pass x", (b"root", b"x")),
    ("user alice=bob here pass x", (b"root", b"x")),
    ("user Z:-= ; is a here pass x", (b"root", b"x")),
    ('user "alice" here is bob there pass x', (b"bob", b"x")),
    # the word after `is` is a name, whatever word it is (sendooway took
    # `user here` for a user named "here")
    ("user alice is user here pass x", (b"alice", b"x")),
    # noise words between a name and `there` (sendooway kept the defaults')
    ("pass x is bob and there", (b"bob", b"x")),
    # `is L= there`: a mapping of local names (`there` a name after `=`)
    ("user u is a= there pass x", (b"u", b"x")),
    # already read alike (kept so)
    (r'user u pass "caf\xc3\xa9 ü \101\0101"', (b"u", "café ü e\x081".encode())),
    ('user u pass "a#b" # c', (b"u", b"a#b")),
    ("user u pass a#b;keep", (b"u", b"a#b")),
    ("user u with pass poll and options keep", (b"u", b"poll")),
    ("user poll there with password pass", (b"poll", b"pass")),
    ('user u pass "ab\\\ncd"', (b"u", b"abcd")),
    ('user u pass "a\nb"', (b"u", b"a\nb")),
    (r"user DOMAIN\\x pass \q%s", (b"DOMAIN\\x", b"q%s")),
]


@pytest.mark.parametrize("poll,login", SAME_AS_FETCHMAIL)
def test_fetchmail_and_sendooway_read_the_same_login(pop3, poll, login):
    text = f"poll 127.0.0.1 {poll}{TAIL}".encode()
    assert pop3.fetchmail(text) == ([login], False)
    accounts, errors = sendooway_reads(text)
    assert errors == []
    assert [_octets(a) for a in accounts] == [login]


def test_fetchmail_defaults_fill_each_field_of_each_poll(pop3):
    text = ("defaults user du pass dp\n"
            f"poll 127.0.0.1{TAIL}"
            f"poll 127.0.0.1 user x{TAIL}"
            f"poll 127.0.0.1 pass y{TAIL}"
            f"poll 127.0.0.1 is zz there{TAIL}"
            f"poll 127.0.0.1 user alice here{TAIL}").encode()
    logins, refused = pop3.fetchmail(text)
    assert logins == [(b"du", b"dp"), (b"x", b"dp"), (b"du", b"y"), (b"zz", b"dp"),
                      (b"du", b"dp")] and not refused
    accounts, errors = sendooway_reads(text)
    assert errors == [] and [_octets(a) for a in accounts] == logins


# (the user's poll; what fetchmail logs in with; sendooway's error at line 1
# or 3 of the file, and deliberately no account: docs/decisions/auth.md)
REFUSED_ON_PURPOSE = [
    # a backslash before the closing quote: fetchmail drops it and ends the
    # string there; surely a quote meant to be escaped, and a cut password
    (r'user u pass "abc\"', (b"u", b"abc"), "1: 'pass': a backslash before the closing quote"),
    # octets that are not UTF-8: they cannot be sent as written
    (r"user u pass caf\xe9", (b"u", b"caf\xe9"), "1: 'pass': not valid UTF-8"),
    # an empty user name: fetchmail sends it empty, sendooway does not log in
    # as someone else (it took the login name)
    ('user "" pass x', (b"", b"x"), "3: account has no upstream user"),
]


@pytest.mark.parametrize("poll,login,error", REFUSED_ON_PURPOSE)
def test_fetchmail_accepts_and_sendooway_refuses_with_file_and_line(pop3, poll, login, error):
    text = f"poll 127.0.0.1 {poll}{TAIL}".encode()
    assert pop3.fetchmail(text) == ([login], False)
    accounts, errors = sendooway_reads(text)
    assert accounts == []
    assert any(e.startswith(f"{F}:{error}") for e in errors), errors


# ------------------------------------------------------------ fetchmail: generated


_PIECES = (list("abcXYZ0129!$%&()*+-./<>?@[]^_{|}~#=;:, \t\"'") + [
    "\\\\", "\\n", "\\t", "\\x41", "\\x4", "\\xg", "\\101", "\\0101", "\\0", "\\256",
    '\\"', "\\'", "\\", "é", "ü", "€", "\u00a0", "\udce9", "\\xc3\\xa9", "pass", "user",
    "here", "there", "is", "poll", "with", "and", "\\q", "%s", "%(x)s", "\\\n"])
_KEYWORDS_AS_VALUES = ["pass", "user", "here", "there", "is", "to", "poll", "with",
                       "password", "1234", "-5", "imap", "ssl"]
_NOISE = ["", "", "with ", "and ", "has ", "wants ", "options ", ", ", "; "]
_OPTIONS = ["keep", "fetchall", "smtphost localhost", 'mda "/usr/bin/procmail -d %T"',
            "folder INBOX"]


def _value(r: random.Random) -> str:
    if r.random() < 0.15:
        return r.choice(_KEYWORDS_AS_VALUES)
    body = "".join(r.choice(_PIECES) for _ in range(r.randint(0, 8)))
    if r.random() < 0.4:
        q = r.choice("\"'")
        return q + body + q + (r.choice(["", "x", "#y", "'", '"']) if r.random() < 0.15 else "")
    return body or "x"


def _poll(r: random.Random) -> str:
    """One poll of random user options: names, passwords and noise of
    every kind fetchmail's lexer knows (quotes, escapes, separators,
    keywords as values, non-ASCII and Latin-1 octets, line joins)."""
    parts = ["poll 127.0.0.1"]
    if r.random() < 0.3:
        parts.append(r.choice(["proto pop3", "timeout 30", "auth password", "envelope X-To",
                               "no envelope", "uidl"]))
    if r.random() < 0.3:
        parts.append(r.choice(["", ",", ";", ":"]) + "\n ")
    u, p, n = _value(r), _value(r), r.choice(_NOISE)
    uk, pk = r.choice(["user", "username"]), r.choice(["pass", "password"])
    parts.append(r.choice([
        f"{uk} {u} {n}{pk} {p}",
        f"{uk} {u} there {n}{pk} {p}",
        f"{uk} {u} there {n}{pk} {p} is {_value(r)} here",
        f"{uk} {_value(r)} here {n}is {u} there {n}{pk} {p}",
        f"{pk} {p} {n}is {u} there",
        f"{uk} {u} {n}is {_value(r)} {_value(r)} here {pk} {p}",
        f"{uk} {_value(r)} here {pk} {p}",
        f"{uk} {u}\n  {n}{pk} {p}\n  {r.choice(_OPTIONS)}",
    ]))
    text = " ".join(parts)
    if r.random() < 0.25:
        text = f"defaults {r.choice(['user', 'username'])} {_value(r)} pass {_value(r)}\n" + text
    return text + TAIL


# sendooway's documented refusals (docs/decisions/auth.md, fetchmailrc)
_DELIBERATE = ("not valid UTF-8", "backslash before the closing quote", "control characters",
               "unbalanced quote")


# 1500 files through fetchmail and the parser: 47 s on 2 CPUs at load ~10;
# a slower or busier CI machine gets room beyond the default 120 s
@pytest.mark.timeout(300)
def test_generated_fetchmailrc_files_read_as_fetchmail_reads_them(pop3):
    """1500 generated files: wherever fetchmail accepts one, sendooway logs
    in with what fetchmail logs in with (the last user of the poll: the one
    the #sendooway: lines follow), or refuses the account on purpose."""
    r = random.Random(20261127)
    compared = refused_on_purpose = 0
    for _ in range(1500):
        text = _poll(r).encode("utf-8", "surrogateescape")
        logins, refused = pop3.fetchmail(text)
        if refused or not logins:
            continue  # fetchmail refuses the file: nothing to match
        accounts, errors = sendooway_reads(text)
        if not accounts and (any(d in e for e in errors for d in _DELIBERATE)
                             or logins[-1][0] == b""):
            refused_on_purpose += 1
            continue
        assert errors == [] and [_octets(a) for a in accounts] == logins[-1:], text
        compared += 1
    assert compared > 600 and refused_on_purpose < compared / 2, (compared, refused_on_purpose)


# ------------------------------------------------------------ getmail rc files


def getmail_reads(text: str) -> configparser.RawConfigParser:
    """The file as getmail6 reads it (getmail's main(): a RawConfigParser
    with its own defaults, read_file() on the text file, then the defaults
    cleared before the [retriever] section is read)."""
    parser = configparser.RawConfigParser({"verbose": "1", "delete": "False"})
    parser.read_file(io.StringIO(text, newline=None))
    parser._defaults = {}  # type: ignore[attr-defined]
    return parser


_INI_VALUES = ["x", "s3cr%t", "100%", "%(verbose)s", "a;b", "a # b", "; a", "# a", "a=b:c",
               "'q'", '"q"', "\\", "\\n", "é€", "a\u00a0b", "a b  c", "", " lead", "x\t"]


def _getmailrc(r: random.Random) -> str:
    def value() -> str:
        v = r.choice(_INI_VALUES) + r.choice(["", "", r.choice(_INI_VALUES)])
        if r.random() < 0.15:
            v += "\n" + r.choice(["  ", "\t", "    "]) + r.choice(_INI_VALUES).strip()
        return v or "x"

    def key(name: str) -> str:
        # (an indented key continues the value above it: rarely)
        return " " + name if r.random() < 0.03 else r.choice(
            [name, name.upper(), name.title(), name + " "])

    sep = lambda: r.choice([" = ", "=", ": ", " :", " =  "])  # noqa: E731
    lines = ["[retriever]", f"{key('type')}{sep()}SimplePOP3SSLRetriever",
             f"{key('server')}{sep()}pop.example.org"]
    if r.random() < 0.8:
        lines.append(f"{key('username')}{sep()}{value()}")
    if r.random() < 0.8:
        lines.append(f"{key('password')}{sep()}{value()}")
    if r.random() < 0.3:
        lines.append(r.choice(["# a remark", "; a remark", "   # indented remark", ""]))
    lines += ["[sender]", f"{key('type')}{sep()}SimpleSMTPTLSSender", f"address{sep()}a@b.example"]
    if r.random() < 0.5:
        lines.append(f"{key('username')}{sep()}{value()}")
    if r.random() < 0.5:
        lines.append(f"{key('password')}{sep()}{value()}")
    if r.random() < 0.3:
        lines.append(f"{key('server')}{sep()}smtp.example.org")
    eol = r.choice(["\n", "\r\n"])
    return eol.join(lines) + eol


def test_generated_getmail_rc_files_read_as_getmail_reads_them():
    """1000 generated rc files (key case and blanks, `=`/`:`, `%`, `;`/`#`
    inside values, continuation lines, CRLF): the upstream user and
    password sendooway takes are getmail6's values of [sender], else of
    [retriever] (which getmail itself logs in with)."""
    r = random.Random(1127)
    compared = 0
    for _ in range(1000):
        text = _getmailrc(r)
        try:
            oracle = getmail_reads(text)
        except configparser.Error:
            continue  # getmail refuses the file: nothing to match

        def get(key: str) -> str | None:
            for section in ("sender", "retriever"):
                if oracle.has_option(section, key):
                    return oracle.get(section, key)
            return None

        user, password = get("username"), get("password")
        result = parse_getmailrc(text, G)
        if user is None or password is None and user or not get("server"):
            # (a key indented deeper than the one above it continues its value)
            assert result.accounts == [] and result.errors, text
            continue
        if any(c.isspace() or not c.isprintable() for c in get("server") or "") or (
                user and not user.isprintable()) or "\n" in oracle.get("sender", "address"):
            # a server or user name sendooway refuses (field_problem), or a
            # key line swallowed into `address` by its indent (not an address)
            assert result.accounts == [] and result.errors, text
            continue
        assert result.errors == [], (text, result.errors)
        (account,) = result.accounts
        assert account.route.user == user, text
        assert account.route.password.reveal() == (password if user else ""), text
        compared += 1
    assert compared > 500


# ------------------------------------------------------------ end to end


# 200+ characters with blanks, both quotes, backslashes, %, #, ;, :, =, and
# UTF-8 beyond Latin-1
_TRICKY = "Sp ace\"quo'te\\back %s%%(x)s #hash ;semi :col =eq é€ 🚀 "
PASSWORDS = {
    "fm": ("fm " + _TRICKY * 5 + "end-FM")[:260],
    "gm": ("gm " + _TRICKY * 5 + "end-GM")[:260],
}
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def _fetchmail_quoted(value: str) -> str:
    """`value` in fetchmail's double quotes: a quote as a hex escape (its
    quotes have no escape for the quote), a backslash doubled."""
    return '"' + value.replace("\\", "\\\\").replace('"', "\\x22") + '"'


@pytest.fixture(scope="module")
def e2e(world):
    with open_tmp() as tmp:
        ups = {m: FakeUpstream(world, tls="starttls", auth_mechanisms=(m,),
                               accounts={f"fm-{m}": PASSWORDS["fm"],
                                         f"gm {m}": PASSWORDS["gm"]}).start()
               for m in MECHANISMS}
        getmail_files = [f".getmail/rc-{m}" for m in MECHANISMS]
        extra = (f"sslCA = {world.ca_file}\n"
                 "smarthostMapping = fetchmail:%h/.fetchmailrc\n"
                 + "".join(f"smarthostMapping = getmail:%h/{g}\n" for g in getmail_files))
        config = front_config(tmp, world, extra)
        world.clear_home("alice")
        fetchmailrc = "".join(
            f"poll 127.0.0.1 proto pop3 user fm-{m} there with password"
            f" {_fetchmail_quoted(PASSWORDS['fm'])}\n"
            f'#sendooway:server "localhost"\n#sendooway:port {ups[m].port}\n#sendooway:tls\n'
            f'#sendooway:address "fm-{m.lower()}@e2e.example"\n' for m in MECHANISMS)
        world.write_user_file("alice", ".fetchmailrc", fetchmailrc)
        getmailrcs = {}
        for m, g in zip(MECHANISMS, getmail_files):
            getmailrcs[m] = (
                "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = pop.example.org\n"
                f"username = gm {m}\npassword = {PASSWORDS['gm']}\n"
                f"[sender]\ntype = SimpleSMTPTLSSender\nserver = localhost\nport = {ups[m].port}\n"
                f"address = gm-{m.lower()}@e2e.example\n")
            world.write_user_file("alice", g, getmailrcs[m])
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            yield world, ups, front, daemon, config, fetchmailrc, getmailrcs
        finally:
            front.stop()
            daemon.stop()
            for up in ups.values():
                up.stop()
            world.clear_home("alice")


@pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("source", ["fm", "gm"])
def test_exact_credentials_reach_the_upstream_by_each_mechanism(e2e, pop3, source, mechanism):
    """The password the real programs read from alice's files (fetchmail's
    POP3 login, getmail6's configparser) is the one the upstream checks,
    by PLAIN, LOGIN and CRAM-MD5; no log and no --check output shows it."""
    world, ups, front, daemon, config, fetchmailrc, getmailrcs = e2e
    if source == "fm":
        logins, refused = pop3.fetchmail(fetchmailrc.encode())
        assert not refused
        assert logins[MECHANISMS.index(mechanism)] == (
            f"fm-{mechanism}".encode(), PASSWORDS["fm"].encode())
        user = f"fm-{mechanism}"
    else:
        assert getmail_reads(getmailrcs[mechanism]).get("retriever", "password") == PASSWORDS["gm"]
        user = f"gm {mechanism}"
    up = ups[mechanism]
    up.logins.clear()
    up.mechanisms_used.clear()
    sender = f"{source}-{mechanism.lower()}@e2e.example"
    with front.smtp() as s:
        s.starttls(context=world.ssl_context())
        s.ehlo()
        s.login("alice", world.users["alice"].password)
        s.sendmail(sender, ["rcpt@example.net"], b"Subject: t\r\n\r\nbody\r\n")
    assert up.logins == [user]
    assert up.mechanisms_used == [mechanism]
    check = subprocess.run([sys.executable, "-m", "sendooway_auth.cli", "-c", config, "--check",
                            "alice", "--sender", sender], capture_output=True, text=True, timeout=30)
    assert user in check.stdout, check.stdout + check.stderr
    for secret in PASSWORDS.values():
        for text in (front.log(), daemon.log(), check.stdout, check.stderr):
            assert secret not in text and secret[:40] not in text
