"""getmail rc files read as the real getmail reads them (a differential
review, with getmail itself as the oracle).

Debian's getmail6 (installed by scripts/setup.sh) reads each rc file here
and logs in to a POP3 (plain or over TLS) or IMAP server of this module
that records the exact USER/PASS or LOGIN octets it sends. sendooway's
parser, and the real authenticator's lookup (the user-switching reader)
and --check, must take the same upstream user and password from the same
file when [sender] names none of its own, or refuse the account with
file:line where docs/decisions/auth.md says it does on purpose.
"""

from __future__ import annotations

import base64
import configparser
import io
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading

import pytest

from sendooway_auth import _users
from sendooway_auth._reader import lookup_direct
from sendooway_auth.getmail import parse_getmailrc
from sendooway_shared.config import parse_config
from sendooway_shared.types import TlsMode
from tests.front_util import front_config, open_tmp

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lookup switches users: needs root")

G = "/home/alice/.getmail/getmailrc"


# ------------------------------------------------------------ the oracle


class LoginRecorder:
    """Servers that refuse every login and record what was tried, one
    listening port per rc file: port -> [(user, password) as octets]. POP3
    lines are split at CRLF only; an IMAP LOGIN's quoted password is
    unquoted (imaplib quotes it, and sends the user name as it is)."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.tls = tls
        self.logins: dict[int, list[tuple[bytes, bytes]]] = {}
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []

    def listen(self, proto: str) -> int:
        sock = socket.create_server(("127.0.0.1", 0))
        self._socks.append(sock)
        port = sock.getsockname()[1]
        self.logins[port] = []
        threading.Thread(target=self._accept, args=(sock, port, proto), daemon=True).start()
        return port

    def close(self) -> None:
        for sock in self._socks:
            sock.close()

    def _accept(self, sock: socket.socket, port: int, proto: str) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, port, proto), daemon=True).start()

    def _serve(self, conn: socket.socket, port: int, proto: str) -> None:
        try:
            conn.settimeout(20)
            if proto == "pop3s":
                conn = self.tls.wrap_socket(conn, server_side=True)
            with conn:
                (self._imap if proto == "imap" else self._pop3)(conn, port)
        except (OSError, ssl.SSLError):
            pass

    def _lines(self, conn: socket.socket):
        buf = b""
        while data := conn.recv(65536):
            buf += data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                yield line

    def _record(self, port: int, user: bytes, password: bytes) -> None:
        with self._lock:
            self.logins[port].append((user, password))

    def _pop3(self, conn: socket.socket, port: int) -> None:
        conn.sendall(b"+OK ready\r\n")
        user = b""
        for line in self._lines(conn):
            verb = line[:5].upper()
            if verb == b"USER ":
                user = line[5:]
                conn.sendall(b"+OK\r\n")
            elif verb == b"PASS ":
                self._record(port, user, line[5:])
                conn.sendall(b"-ERR [AUTH] refused\r\n")
            elif verb.startswith(b"QUIT"):
                conn.sendall(b"+OK\r\n")
                return
            else:
                conn.sendall(b"-ERR\r\n")

    def _imap(self, conn: socket.socket, port: int) -> None:
        conn.sendall(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        lines = self._lines(conn)
        for line in lines:
            tag, _, rest = line.partition(b" ")
            verb, _, args = rest.partition(b" ")
            if verb.upper() == b"LOGIN":
                user, _, quoted = args.partition(b" ")
                assert quoted[:1] == quoted[-1:] == b'"', line
                password = quoted[1:-1].replace(b'\\"', b'"').replace(b"\\\\", b"\\")
                self._record(port, user, password)
                conn.sendall(tag + b" NO [AUTHENTICATIONFAILED] refused\r\n")
            elif verb.upper() == b"AUTHENTICATE":
                # XOAUTH2: user=NAME ^A auth=Bearer TOKEN ^A ^A
                conn.sendall(b"+ \r\n")
                fields = dict(f.split(b"=", 1) for f in base64.b64decode(next(lines, b""))
                              .split(b"\x01") if b"=" in f)
                self._record(port, fields.get(b"user", b""),
                             fields.get(b"auth", b"").removeprefix(b"Bearer "))
                conn.sendall(tag + b" NO [AUTHENTICATIONFAILED] refused\r\n")
            elif verb.upper() == b"CAPABILITY":
                conn.sendall(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK done\r\n")
            elif verb.upper() == b"LOGOUT":
                conn.sendall(b"* BYE\r\n" + tag + b" OK done\r\n")
                return
            else:
                conn.sendall(tag + b" BAD what\r\n")


@pytest.fixture(scope="module")
def recorder(world):
    assert shutil.which("getmail"), "getmail is the oracle: scripts/setup.sh installs it"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(world.cert_file, world.key_file)
    rec = LoginRecorder(ctx)
    yield rec
    rec.close()


RETRIEVERS = {"pop3": "SimplePOP3Retriever", "pop3s": "SimplePOP3SSLRetriever",
              "imap": "SimpleIMAPRetriever"}


def rc_file(port: int, proto: str, retriever: str, sender: str = "", options: str = "",
            mbox: str = "/nonexistent/mbox", address: str = "alice@example.org") -> str:
    """An rc file fetching from the recorder's `port` into `mbox`; `retriever`
    holds the lines under the server and port (the user's name and password)."""
    return (f"[retriever]\ntype = {RETRIEVERS[proto]}\nserver = 127.0.0.1\nport = {port}\n"
            f"{retriever}\n"
            f"[destination]\ntype = Mboxrd\npath = {mbox}\n"
            f"[options]\nverbose = 0\nread_all = false\n{options}\n"
            f"[sender]\ntype = SimpleSMTPTLSSender\n"
            + (f"address = {address}\n" if address else "") + sender)


class Getmail:
    """Runs the real getmail in a getmaildir of its own, quietly, with no
    terminal (a password it lacks is read from stdin)."""

    def __init__(self) -> None:
        self.home = tempfile.mkdtemp(prefix="gm-oracle-")
        self.dir = os.path.join(self.home, "gm")
        os.mkdir(self.dir)
        self.mbox = os.path.join(self.home, "mbox")
        open(self.mbox, "w").close()

    def run(self, files: dict[str, bytes], rcfiles: list[str] | None = None,
            stdin: bytes = b"", extra: tuple[str, ...] = (),
            directory: str | None = None) -> subprocess.CompletedProcess:
        """`directory`: the getmaildir, or None for getmail's own choice
        in the home (the files are written in `self.dir` either way)."""
        for name, data in files.items():
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(data)
        args = ["getmail"] + ([f"--getmaildir={self.dir}"] if directory is None else [])
        args += [f"--rcfile={name}" for name in (files if rcfiles is None else rcfiles)]
        args += extra
        try:
            return subprocess.run(args, input=stdin, capture_output=True, timeout=60,
                                  start_new_session=True,  # no terminal: getpass reads stdin
                                  env={"HOME": self.home, "PATH": "/usr/bin:/bin",
                                       "LC_ALL": "C.UTF-8"})
        finally:
            for name in files:
                os.unlink(os.path.join(self.dir, name))

    def cleanup(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def getmail():
    gm = Getmail()
    yield gm
    gm.cleanup()


def sendooway_reads(text: str):
    """(user, password, auth) sendooway takes from the file, and its errors."""
    result = parse_getmailrc(text, G)
    return ([(a.route.user, a.route.password.reveal(), a.route.auth) for a in result.accounts],
            result.errors)


# ------------------------------------------------------------ hand-picked files


# (lines of [retriever] after server and port; the login getmail sends)
SAME_AS_GETMAIL = [
    ("username = alice\npassword = s3cr%t", (b"alice", b"s3cr%t")),
    # no interpolation: %% and %(name)s are what they say
    ("username = alice\npassword = 100%%", (b"alice", b"100%%")),
    ("username = a%(server)s\npassword = %(port)s%", (b"a%(server)s", b"%(port)s%")),
    # no remarks after a value: ; and # are part of it
    ("username = alice\npassword = a;b # c", (b"alice", b"a;b # c")),
    ("username = alice\npassword = #hash", (b"alice", b"#hash")),
    ("username = alice\npassword = ;semi", (b"alice", b";semi")),
    # blanks around the value are dropped, inside it kept
    ("username =   alice  \npassword = \t two  words \t", (b"alice", b"two  words")),
    ("username = alice\npassword = x\u00a0", (b"alice", b"x")),
    # quotes and backslashes are nothing special
    ("username = alice\npassword = \"quoted\"", (b"alice", b'"quoted"')),
    ("username = alice\npassword = 'it''s'", (b"alice", b"'it''s'")),
    ("username = DOM\\alice\npassword = a\\\\b\\n\\", (b"DOM\\alice", b"a\\\\b\\n\\")),
    # UTF-8 is sent as UTF-8
    ("username = jürgen\npassword = pässwörd€🚀",
     ("jürgen".encode(), "pässwörd€🚀".encode())),
    # a line indented deeper than its key continues the value (blank and
    # comment lines inside it: a blank is kept, a comment dropped)
    ("username = alice\npassword = first\n  second", (b"alice", b"first\nsecond")),
    ("username = alice\npassword =\n    next-line", (b"alice", b"\nnext-line")),
    ("username = alice\npassword = a\n\n\tb\n# no\n  c", (b"alice", b"a\n\nb\nc")),
    # : or =, the first one separates
    ("username: alice\npassword : a=b:c", (b"alice", b"a=b:c")),
    ("username=alice\npassword=:x", (b"alice", b":x")),
    ("username :alice\npassword= a:b=c ", (b"alice", b"a:b=c")),
    # keys in any case
    ("USERNAME = alice\nPassword = Mixed", (b"alice", b"Mixed")),
    # an empty password is sent empty
    ("username = alice\npassword =", (b"alice", b"")),
    # CRLF lines
    ("username = alice\r\npassword = crlf\r", (b"alice", b"crlf")),
    # a lone CR ends a line for getmail (Python's universal newlines): the
    # next line continues the value when indented (sendooway sent the CR and
    # the blanks after it)
    ("username = alice\npassword = ab\r  cd", (b"alice", b"ab\ncd")),
    ("username = al\rpassword = pw", (b"al", b"pw")),
    # no other character ends a line (str.splitlines() would split at these)
    ("username = alice\npassword = a\u2028b\x85c\x0cd\x1ce",
     (b"alice", "a\u2028b\x85c\x0cd\x1ce".encode())),
    # user names are taken whole
    ("username = alice smith@example.org\npassword = pw", (b"alice smith@example.org", b"pw")),
    ("username = \"alice\"\npassword = pw", (b'"alice"', b"pw")),
]


@pytest.fixture(scope="module")
def same_as_getmail(recorder, getmail):
    """Every file of SAME_AS_GETMAIL through one getmail run (each with a
    port of its own): index -> (rc text, logins)."""
    ports = [recorder.listen("pop3") for _ in SAME_AS_GETMAIL]
    texts = [rc_file(port, "pop3", body, mbox=getmail.mbox)
             for port, (body, _) in zip(ports, SAME_AS_GETMAIL)]
    res = getmail.run({f"rc-{i}": t.encode() for i, t in enumerate(texts)})
    assert b"Configuration error" not in res.stderr, res.stderr
    return {i: (texts[i], recorder.logins[port]) for i, port in enumerate(ports)}


@pytest.mark.parametrize("index", range(len(SAME_AS_GETMAIL)),
                         ids=[repr(b)[:40] for b, _ in SAME_AS_GETMAIL])
def test_getmail_and_sendooway_read_the_same_login(same_as_getmail, index):
    text, logins = same_as_getmail[index]
    assert logins == [SAME_AS_GETMAIL[index][1]]
    accounts, errors = sendooway_reads(text)
    assert errors == []
    ((user, password, auth),) = accounts
    assert auth and (user.encode(), password.encode()) == logins[0]


# ------------------------------------------------------------ generated files


_PIECES = (list("aZ09 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\t") + [
    "%%", "%(server)s", "é", "€", "🚀", "\u00a0", "\u2028", "\x85", "\x0c", "\r", "\r  ",
    "\n  ", "\n\t", "\n\n  ", "\n# remark\n  ", "\n; remark\n ", "password", "="])


def _generated(r: random.Random) -> tuple[str, str]:
    """[retriever] user and password lines of random keys (case, blanks,
    `=`/`:`) and values (every ASCII mark, %, non-ASCII, line breaks getmail
    knows and ones it does not, continuation lines with blanks and remarks)."""
    def value() -> str:
        return "".join(r.choice(_PIECES) for _ in range(r.randint(0, 7)))

    def key(name: str) -> str:
        return r.choice([name, name.upper(), name.title(), name + " "]) + r.choice(
            [" = ", "=", ": ", " :", " =  ", "\t=\t"])

    return f"{key('username')}{value() or 'u'}", f"{key('password')}{value()}"


def _getmail_would_run(text: str) -> bool:
    """Whether getmail gets as far as logging in (what it refuses stops
    the whole run): ConfigParser as getmail's main() feeds it, a user and a
    password in [retriever], a port that is a number."""
    parser = configparser.RawConfigParser()
    try:
        parser.read_file(io.StringIO(text, newline=None))
        return (parser.has_option("retriever", "username")
                and parser.has_option("retriever", "password")
                and parser.get("retriever", "port").isdigit())
    except configparser.Error:
        return False


# sendooway's documented refusals (docs/decisions/auth.md, getmail rc)
_DELIBERATE = ("the upstream user name holds control characters",
               "no username: the [retriever] one is empty")


def test_generated_files_log_in_as_sendooway_reads(recorder, getmail):
    """150 generated rc files getmail runs with, in one getmail run: each
    login getmail sends is the user and password sendooway reads, or a
    refusal documented as deliberate."""
    r = random.Random(20261129)
    cases = []
    while len(cases) < 150:
        user, password = _generated(r)
        port = recorder.listen("pop3")
        body = f"{user}\n{password}"
        if r.random() < 0.3:
            body = r.choice(["# a remark\n", "; a remark\n", "\n"]) + body
        text = rc_file(port, "pop3", body, mbox=getmail.mbox)
        if r.random() < 0.3:
            text = text.replace("\n", "\r\n")
        if _getmail_would_run(text):
            cases.append((port, text))
    res = getmail.run({f"rc-{i}": t.encode() for i, (_, t) in enumerate(cases)})
    assert b"Configuration error" not in res.stderr and b"Traceback" not in res.stderr, res.stderr
    compared = 0
    for port, text in cases:
        (login,) = recorder.logins[port]
        accounts, errors = sendooway_reads(text)
        if not accounts and any(d in e for e in errors for d in _DELIBERATE):
            continue
        assert errors == [], (text, errors)
        ((user, password, auth),) = accounts
        assert (user.encode(), password.encode()) == login, text
        compared += 1
    assert compared > 80


def one_file(recorder, getmail, proto: str, retriever: str, sender: str = "",
             options: str = "", stdin: bytes = b"", before: str = "", after: str = "",
             address: str = "alice@example.org"):
    """(rc text, getmail's logins, its stderr) for one file."""
    port = recorder.listen(proto)
    text = before + rc_file(port, proto, retriever, sender, options, getmail.mbox,
                            address) + after
    res = getmail.run({"getmailrc": text.encode("utf-8", "surrogateescape")}, stdin=stdin)
    return text, recorder.logins[port], res.stderr.decode(errors="replace")


def test_a_section_name_is_taken_as_written(recorder, getmail):
    """ConfigParser keeps the blanks inside [ ]: `[ retriever]` is another
    section, which getmail never reads (sendooway stripped them, and took
    the first section's values)."""
    text, logins, _ = one_file(recorder, getmail, "pop3", "username = new\npassword = new-pw",
                               before="[ retriever ]\nusername = old\npassword = old-pw\n")
    assert logins == [(b"new", b"new-pw")]
    assert sendooway_reads(text) == ([("new", "new-pw", True)], [])
    # alone, it is no [retriever]: getmail refuses the file, sendooway has
    # no server (nor user name) to take
    text = text.replace("[retriever]", "[retriever ]")
    res = getmail.run({"getmailrc": text.encode()})
    assert b"No section: 'retriever'" in res.stderr
    accounts, errors = sendooway_reads(text)
    assert accounts == [] and [e.split(": ", 1)[1] for e in errors] == [
        "[sender] no server (neither [sender] nor [retriever] names one)"]
    # [sender] is sendooway's own: its name is matched without case or blanks
    assert sendooway_reads(text.replace("[sender]", "[ Sender ]")
                           + "server = smtp.example.org\nusername = u\npassword = p\n"
                           ) == ([("u", "p", True)], [])


def test_an_empty_retriever_username_is_no_upstream_user(recorder, getmail):
    """getmail logs in with an empty name; only an empty [sender] username
    means "no AUTH" (sendooway sent without AUTH), as an empty fetchmail
    user name is refused."""
    text, logins, _ = one_file(recorder, getmail, "pop3", "username =\npassword = pw")
    assert logins == [(b"", b"pw")]
    accounts, errors = sendooway_reads(text)
    assert accounts == [] and errors == [
        f"{G}:5: [sender] no username: the [retriever] one is empty (getmail logs in with an"
        " empty name); give one in [sender] (an empty [sender] username means no AUTH)"]
    # the user's own "no AUTH", and a [sender] name, still work
    assert sendooway_reads(text + "username =\n") == ([("", "", False)], [])
    assert sendooway_reads(text + "username = s\n") == ([("s", "pw", True)], [])


NETRC = "machine 127.0.0.1 login net-user password net-pw\n"


@pytest.mark.parametrize("where", ["options", "DEFAULT"])
def test_use_netrc_logins_are_not_taken_from_the_retriever(recorder, getmail, where):
    """With use_netrc getmail logs in with ~/.netrc's user and password
    (over the rc file's): sendooway does not read ~/.netrc, and took the
    [retriever] ones. Now it asks for them in [sender]."""
    with open(os.path.join(getmail.home, ".netrc"), "w") as f:
        f.write(NETRC)
    os.chmod(os.path.join(getmail.home, ".netrc"), 0o600)
    try:
        if where == "options":
            text, logins, _ = one_file(recorder, getmail, "pop3", "username = rc\npassword = rc-pw",
                                       options="use_netrc = Yes")
        else:
            text, logins, _ = one_file(recorder, getmail, "pop3", "username = rc\npassword = rc-pw",
                                       before="[DEFAULT]\nuse_netrc = on\n")
    finally:
        os.unlink(os.path.join(getmail.home, ".netrc"))
    assert logins == [(b"net-user", b"net-pw")]
    accounts, errors = sendooway_reads(text)
    line = text.splitlines().index("use_netrc = Yes" if where == "options" else "use_netrc = on")
    assert accounts == [] and errors == [
        f"{G}:{line + 1}: [{where}] use_netrc: getmail logs in with ~/.netrc's user name and"
        " password, which sendooway does not read: give username and password in [sender]"]
    # (with no password in the file, the same: not "no password")
    accounts, errors = sendooway_reads(text.replace("password = rc-pw\n", ""))
    assert accounts == [] and len(errors) == 1 and "use_netrc" in errors[0]
    assert sendooway_reads(text + "username = s\npassword = s-pw\n") == ([("s", "s-pw", True)], [])
    # off, getmail's own way of saying so
    off = (text.replace("use_netrc = Yes", "use_netrc = 0")
           .replace("use_netrc = on", "use_netrc = off"))
    assert sendooway_reads(off) == ([("rc", "rc-pw", True)], [])


def test_documented_refusals_where_getmail_finds_a_password(recorder, getmail):
    """password_command and a password getmail asks for (keyring, then the
    terminal): getmail logs in, sendooway refuses the file with file:line
    (docs/decisions/auth.md, getmail rc)."""
    text, logins, _ = one_file(recorder, getmail, "pop3",
                               'username = alice\npassword_command = ("/bin/echo", "from cmd")')
    assert logins == [(b"alice", b"from cmd")]
    accounts, errors = sendooway_reads(text)
    assert accounts == [] and errors == [
        f"{G}:14: [sender] no password (neither [sender] nor [retriever] has one;"
        " password_command is not supported)"]
    text, logins, stderr = one_file(recorder, getmail, "pop3", "username = alice", stdin=b"typed\n")
    assert logins == [(b"alice", b"typed")] and "Enter password" in stderr
    accounts, errors = sendooway_reads(text)
    assert accounts == [] and len(errors) == 1 and "no password" in errors[0]
    # a [sender] password serves either
    assert sendooway_reads(text + "password = s-pw\n") == ([("alice", "s-pw", True)], [])


def test_documented_differences_in_files_getmail_refuses_or_never_reads(recorder, getmail):
    """A repeated key or section: getmail refuses the file, sendooway takes
    the first value. [sender]'s user and password are sendooway's only
    (getmail logs in with [retriever]'s). A Latin-1 remark: getmail (in a
    UTF-8 locale) fails on it, sendooway reads the file."""
    text, logins, _ = one_file(recorder, getmail, "pop3",
                               "username = alice\npassword = first\nPassword = second")
    assert logins == []
    assert sendooway_reads(text) == ([("alice", "first", True)], [])
    text, logins, _ = one_file(recorder, getmail, "pop3", "username = alice\npassword = first",
                               after="[retriever]\npassword = second\n")
    assert logins == []
    assert sendooway_reads(text) == ([("alice", "first", True)], [])
    text, logins, _ = one_file(recorder, getmail, "pop3", "username = alice\npassword = r-pw",
                               sender="username = bob\npassword = s-pw\n")
    assert logins == [(b"alice", b"r-pw")]
    assert sendooway_reads(text) == ([("bob", "s-pw", True)], [])
    text, logins, stderr = one_file(recorder, getmail, "pop3", "username = alice\npassword = pw",
                                    after="# f\udcfcr B\udcfcro\n")
    assert logins == [] and "UnicodeDecodeError" in stderr
    assert sendooway_reads(text) == ([("alice", "pw", True)], [])


# ------------------------------------------------------------ TLS and IMAP retrievers


OTHER_RETRIEVERS = [
    ("pop3s", "username = alice\npassword = tls %% ;# \"q\" \\ é",
     (b"alice", 'tls %% ;# "q" \\ é'.encode())),
    ("pop3s", "Username: DOM\\x\nPASSWORD: a\n  b", (b"DOM\\x", b"a\nb")),
    # (imaplib sends the user name bare and the password quoted; ASCII only)
    ("imap", "username = alice\npassword = im \"q\" \\ %% ;#x", (b"alice", b'im "q" \\ %% ;#x')),
    ("imap", "USERNAME = a.b@example.org\npassword:  x=y:z  ", (b"a.b@example.org", b"x=y:z")),
]


def test_tls_and_imap_retrievers_log_in_as_sendooway_reads(recorder, getmail):
    ports = [recorder.listen(proto) for proto, _, _ in OTHER_RETRIEVERS]
    texts = [rc_file(port, proto, body, mbox=getmail.mbox)
             for port, (proto, body, _) in zip(ports, OTHER_RETRIEVERS)]
    getmail.run({f"rc-{i}": t.encode() for i, t in enumerate(texts)})
    for port, text, (_, _, login) in zip(ports, texts, OTHER_RETRIEVERS):
        assert recorder.logins[port] == [login]
        accounts, errors = sendooway_reads(text)
        assert errors == [] and [(u.encode(), p.encode()) for u, p, _ in accounts] == [login]


@pytest.mark.parametrize("server,port", [
    ("SERVER: 127.0.0.1  ", "Port={}"), ("Server =\tlocalhost", "PORT : {}"),
    ("server=127.0.0.1\r", "port = {}\r")])
def test_the_retrievers_server_is_the_one_getmail_reaches(recorder, getmail, server, port):
    """[sender] without a server takes the [retriever]'s, spelled as
    getmail reads it (getmail reaches the recorder there); the port is the
    [sender] type's."""
    number = recorder.listen("pop3")
    text = rc_file(number, "pop3", "username = alice\npassword = pw", mbox=getmail.mbox).replace(
        f"server = 127.0.0.1\nport = {number}", f"{server}\n{port.format(number)}")
    getmail.run({"getmailrc": text.encode()})
    assert recorder.logins[number] == [(b"alice", b"pw")]
    (account,) = parse_getmailrc(text, G).accounts
    assert (account.route.server, account.route.port) == (
        server.split(":" if ":" in server else "=", 1)[1].strip(), 587)


def test_ports_are_the_sender_types_never_the_retrievers(getmail):
    """getmail6's own defaults are POP3's and IMAP's (110, 995, 143, 993);
    sendooway's come from the [sender] type (25, 587, 465): the [retriever]
    port, given or not, is never used for SMTP."""
    dumps = {}
    for kind in ("SimplePOP3Retriever", "SimplePOP3SSLRetriever", "SimpleIMAPRetriever",
                 "SimpleIMAPSSLRetriever"):
        text = (f"[retriever]\ntype = {kind}\nserver = 127.0.0.1\nusername = a\npassword = p\n"
                f"[destination]\ntype = Mboxrd\npath = {getmail.mbox}\n")
        res = getmail.run({"getmailrc": text.encode()}, extra=("--dump",))
        dumps[kind] = res.stdout.decode()
    assert 'port="110"' in dumps["SimplePOP3Retriever"]
    assert 'port="995"' in dumps["SimplePOP3SSLRetriever"]
    assert 'port="143"' in dumps["SimpleIMAPRetriever"]
    assert 'port="993"' in dumps["SimpleIMAPSSLRetriever"]
    for given in ("", "port = 995\n"):
        for sender, port, tls in (("SimpleSMTPSender", 25, TlsMode.PLAIN),
                                  ("SimpleSMTPTLSSender", 587, TlsMode.STARTTLS),
                                  ("SimpleSMTPSSLSender", 465, TlsMode.TLS)):
            text = ("[retriever]\ntype = SimplePOP3SSLRetriever\nserver = pop.example.org\n"
                    f"{given}username = a\npassword = p\n"
                    f"[sender]\ntype = {sender}\naddress = a@example.org\n")
            result = parse_getmailrc(text, G)
            (account,) = result.accounts
            assert (account.route.server, account.route.port, account.route.tls) == (
                "pop.example.org", port, tls)
        text = text.replace("[sender]\n",
                            "[sender]\nport = submission\nserver = smtp.example.org\n")
        (account,) = parse_getmailrc(text, G).accounts
        assert (account.route.server, account.route.port) == ("smtp.example.org", 587)


def test_a_line_opening_with_a_bracket_but_no_section_is_a_key(recorder, getmail):
    """`[note = x` is no section header for ConfigParser (no `]`): a key,
    which getmail ignores with a warning (sendooway refused the file)."""
    text, logins, stderr = one_file(recorder, getmail, "pop3", "username = alice\npassword = pw",
                                    sender="[note = the office account\n")
    assert logins == [(b"alice", b"pw")] and 'ignoring unknown parameter "[note"' not in stderr
    result = parse_getmailrc(text, G)
    assert [(a.route.user, a.route.password.reveal()) for a in result.accounts] == [("alice", "pw")]
    assert result.errors == [] and result.warnings == [
        f"{G}:17: [sender] unknown key (the line is not shown) ignored"]
    # (in [retriever] getmail warns about it, and logs in all the same)
    text, logins, stderr = one_file(recorder, getmail, "pop3",
                                    "username = alice\n[]x = y\npassword = pw")
    assert logins == [(b"alice", b"pw")] and 'ignoring unknown parameter "[]x"' in stderr
    assert sendooway_reads(text) == ([("alice", "pw", True)], [])


@pytest.mark.parametrize("flag", ["use_xoauth2 = true", "USE_XOAUTH2: On"])
def test_an_imap_oauth_login_is_no_password_to_take(recorder, getmail, flag):
    """use_xoauth2: getmail sends password_command's token (or a keyring or
    typed one), never the file's password, which sendooway took."""
    text, logins, _ = one_file(recorder, getmail, "imap",
                               f"username = alice\npassword = static\n{flag}\n"
                               'password_command = ("/bin/echo", "oauth-token")')
    assert logins == [(b"alice", b"oauth-token")]
    accounts, errors = sendooway_reads(text)
    assert accounts == [] and errors == [
        f"{G}:7: [retriever] use_xoauth2: getmail does not log in with the"
        " [retriever] password then: give the password in [sender]"]
    assert sendooway_reads(text + "password = s-pw\n") == ([("alice", "s-pw", True)], [])
    assert sendooway_reads(text.replace(flag, "use_xoauth2 = false")) == (
        [("alice", "static", True)], [])


# ------------------------------------------------------------ the authenticator


def test_sendooway_lines_leave_getmail_working(recorder, getmail):
    """The [sender] forms sendooway documents (addresses on indented lines
    or after commas, remarks between them, a service name for the port)
    are read by getmail too, which ignores the section; a repeated
    `address` key stops getmail (as the man page says) and sendooway takes
    both."""
    sender = ("server = smtp.example.org\nport = submission\nno_certificate_check = false\n"
              "address = alice@example.org\n  # the old one\n\n  a.smith@example.org,"
              " *@alice.example\n")
    text, logins, _ = one_file(recorder, getmail, "pop3", "username = alice\npassword = pw",
                               sender=sender, address="")
    assert logins == [(b"alice", b"pw")]
    (account,) = parse_getmailrc(text, G).accounts
    assert account.addresses == ("alice@example.org", "a.smith@example.org", "*@alice.example")
    assert (account.route.server, account.route.port, account.route.user) == (
        "smtp.example.org", 587, "alice")
    text, logins, stderr = one_file(recorder, getmail, "pop3", "username = alice\npassword = pw",
                                    sender="address = b@example.org\n")
    assert logins == [] and "DuplicateOptionError" in stderr
    (account,) = parse_getmailrc(text, G).accounts
    assert account.addresses == ("alice@example.org", "b@example.org")


def test_several_rc_files_through_the_authenticator(recorder, getmail, clean_homes):
    """getmail, given no rc file, reads every file of its directory
    (getmailrc-*; getmailrc alone when there is one). sendooway reads one
    file a mapping (the default: getmailrc only; docs/decisions/
    foundation.md); mapped, each file's login through the real lookup
    (the user-switching reader) is getmail's, and --check shows the user
    names and no password."""
    world = clean_homes
    bodies = {"getmailrc-work": "username = work@example.org\npassword = w %% ;#\\ é\n  two",
              "getmailrc-home": "Username: home\nPASSWORD = h'\"x\"'  "}
    ports = {name: recorder.listen("pop3s") for name in bodies}
    texts = {name: rc_file(ports[name], "pop3s", body, mbox=getmail.mbox,
                           address=f"{name[10:]}@alice.example")
             for name, body in bodies.items()}
    getmail.run({name: t.encode() for name, t in texts.items()}, rcfiles=[])
    logins = {name: recorder.logins[ports[name]] for name in bodies}
    assert logins == {"getmailrc-work": [(b"work@example.org", "w %% ;#\\ é\ntwo".encode())],
                      "getmailrc-home": [(b"home", b"h'\"x\"'")]}
    for name, t in texts.items():
        world.write_user_file("alice", f".getmail/{name}", t)
    alice = _users.lookup("alice")
    found = lookup_direct(parse_config("", "t.conf"), alice)
    assert found.accounts == [] and found.errors == []
    mappings = "".join(f"smarthostMapping = getmail:%h/.getmail/{name}\n" for name in bodies)
    found = lookup_direct(parse_config(mappings, "t.conf"), alice)
    assert found.errors == [] and found.warnings == []
    assert [[(a.route.user.encode(), a.route.password.reveal().encode())] for a in found.accounts
            ] == list(logins.values())
    assert [a.route.port for a in found.accounts] == [587, 587]  # not getmail's 995
    with open_tmp() as tmp:
        config = front_config(tmp, world, mappings)
        check = subprocess.run([sys.executable, "-m", "sendooway_auth.cli", "-c", config,
                                "--check", "alice"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in bodies:
        assert f"{name[10:]}@alice.example -> 127.0.0.1:587 starttls" in check.stdout
    assert "user work@example.org password ********" in check.stdout
    assert "user home password ********" in check.stdout
    for secret in ("w %% ;#", "two", "h'\"x"):
        assert secret not in check.stdout + check.stderr


def test_getmails_own_choice_of_files_and_the_default_mapping(recorder, getmail, clean_homes):
    """With a `getmailrc` beside other files getmail reads it alone, as
    sendooway's default mapping does; getmail6 looks in ~/.config/getmail/
    first, sendooway's default stays ~/.getmail/getmailrc (a documented
    choice: docs/decisions/auth.md, getmail rc)."""
    world = clean_homes
    ports = {name: recorder.listen("pop3") for name in ("getmailrc", "getmailrc-other")}
    texts = {name: rc_file(port, "pop3", f"username = {name}\npassword = pw-{name}",
                           mbox=getmail.mbox) for name, port in ports.items()}
    getmail.run({n: t.encode() for n, t in texts.items()}, rcfiles=[])
    assert {n: recorder.logins[p] for n, p in ports.items()} == {
        "getmailrc": [(b"getmailrc", b"pw-getmailrc")], "getmailrc-other": []}
    for name, text in texts.items():
        world.write_user_file("alice", f".getmail/{name}", text)
    alice = _users.lookup("alice")
    found = lookup_direct(parse_config("", "t.conf"), alice)
    assert [(a.route.user, a.route.password.reveal()) for a in found.accounts] == [
        ("getmailrc", "pw-getmailrc")]
    # getmail6's own place, when it exists: getmail reads it, the default
    # mapping does not (one line names it)
    world.clear_home("alice")
    port = recorder.listen("pop3")
    xdg = os.path.join(getmail.home, ".config", "getmail")
    os.makedirs(xdg)
    try:
        text = rc_file(port, "pop3", "username = xdg\npassword = pw-xdg", mbox=getmail.mbox)
        with open(os.path.join(xdg, "getmailrc"), "w") as f:
            f.write(text)
        getmail.run({}, rcfiles=[], directory="")
    finally:
        shutil.rmtree(os.path.join(getmail.home, ".config"))
    assert recorder.logins[port] == [(b"xdg", b"pw-xdg")]
    world.write_user_file("alice", ".config/getmail/getmailrc", text)
    assert lookup_direct(parse_config("", "t.conf"), alice).accounts == []
    found = lookup_direct(parse_config(
        "smarthostMapping = getmail:%h/.config/getmail/getmailrc\n", "t.conf"), alice)
    assert [(a.route.user, a.route.password.reveal()) for a in found.accounts] == [
        ("xdg", "pw-xdg")]


def test_a_kerberos_login_is_no_password_to_take(recorder, getmail):
    """use_kerberos: getmail logs in with a ticket (GSSAPI), or, without
    Python's GSS support (as here), refuses to run; never with the file's
    password, which sendooway took."""
    text, logins, stderr = one_file(recorder, getmail, "imap",
                                    "username = alice\npassword = static\nuse_kerberos = yes")
    assert logins == [] and "cannot use kerberos" in stderr
    accounts, errors = sendooway_reads(text)
    assert accounts == [] and errors == [
        f"{G}:7: [retriever] use_kerberos: getmail does not log in with the [retriever]"
        " password then: give the password in [sender]"]
    assert sendooway_reads(text + "password = s-pw\n") == ([("alice", "s-pw", True)], [])
