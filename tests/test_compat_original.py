"""Compatibility with the original C sendooway (from a review against its
sources, ralic/gnu_sendooway).

Each test pins one thing a deployment of the original relied on and that
broke when the C binary was swapped for this one; each failed before its
fix, and its docstring says what used to happen.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest
from hypothesis import given, strategies as st

from sendooway_auth import _users
from sendooway_auth._reader import lookup_direct
from sendooway_auth.fetchmail import parse_fetchmailrc
from sendooway_auth.getmail import parse_getmailrc
from sendooway_front._server import parse_bind
from sendooway_front._stream import LfAsCrlf
from sendooway_shared.config import parse_config
from sendooway_shared.types import TlsMode

from .front_util import FRONT, NOBODY, stdio_session

F = "/home/alice/.fetchmailrc"
G = "/home/alice/.getmail/getmailrc"


# ------------------------------------------------------------ ~/.fetchmailrc


def test_fetchmail_auth_password_before_user_is_not_the_password_keyword():
    """fetchmail's `auth password` (authenticate with a password, see
    fetchmail(1)) is an option whose value happens to be the word
    `password`. The original read tokens in keyword/value pairs, so
    (auth, password) was one pair and the account's `user`/`pass` were read
    as usual (glue.c, glue_lookupFetchmail). Ours takes that `password` for
    fetchmail's pass keyword and swallows the next token (`user`) as its
    value: the account is refused ("no upstream user")."""
    text = (
        "poll imap.example.org proto imap auth password\n"
        '  user "alice" pass "fm-Secret-7"\n'
        '#sendooway:server "smtp.example.org"\n'
        "#sendooway:tls\n"
        '#sendooway:address "alice@example.org"\n'
    )
    r = parse_fetchmailrc(text, F)
    assert r.errors == [], r.errors
    (a,) = r.accounts
    assert (a.route.user, a.route.password.reveal()) == ("alice", "fm-Secret-7")


def test_fetchmail_auth_password_after_pass_keeps_the_real_password():
    """The same option after `pass`: here the word following `auth password`
    (`is`) silently becomes the upstream password, and every login upstream
    fails with the wrong credentials. The original kept "fm-Secret-7"."""
    text = (
        'poll imap.example.org proto imap user "alice" pass "fm-Secret-7"'
        " auth password is alice here\n"
        '#sendooway:server "smtp.example.org"\n'
        "#sendooway:tls\n"
        '#sendooway:address "alice@example.org"\n'
    )
    r = parse_fetchmailrc(text, F)
    (a,) = r.accounts
    assert a.route.password.reveal() == "fm-Secret-7"  # not "is"


def test_fetchmail_consecutive_address_lines_are_aliases_of_one_account():
    """One account, several sender addresses: the original kept every value
    it had read until the end of the file, so a second `#sendooway:address`
    right after the first matched with the same server, flags and
    credentials (glue.c: nothing is reset after an address that does not
    match). Here the second line opens an empty account and is refused
    ("account has no #sendooway:server ... no upstream user ... password"):
    mail from the alias gets 550."""
    text = (
        'poll imap.example.org proto imap user "alice" pass "fm-Secret-7"\n'
        '#sendooway:server "smtp.example.org"\n'
        "#sendooway:tls\n"
        '#sendooway:address "alice@example.org"\n'
        '#sendooway:address "a.liddell@example.org"\n'
    )
    r = parse_fetchmailrc(text, F)
    assert r.errors == [], r.errors
    routes = {addr: a.route for a in r.accounts for addr in a.addresses}
    alias = routes["a.liddell@example.org"]
    assert (alias.server, alias.port, alias.tls) == ("smtp.example.org", 587, TlsMode.STARTTLS)
    assert (alias.user, alias.password.reveal()) == ("alice", "fm-Secret-7")


def test_fetchmail_comment_after_a_sendooway_directive():
    """A remark after a directive: the original's fetchmail reader has an
    explicit branch for a `#` where a value would start (an empty value), so
    `#sendooway:tls   # STARTTLS` sets TLS; and after a value the rest of the
    line is read as further (ignored) pairs, so `#sendooway:port 587 # ...`
    keeps 587 (glue.c, glue_lookupFetchmail). Here the second `#` and the
    words after it become values: "#sendooway:tls takes no value",
    "#sendooway:port needs a number", and the account is skipped."""
    text = (
        'poll imap.example.org proto imap user "alice" pass "fm-Secret-7"\n'
        '#sendooway:server "smtp.example.org"   # the submission server\n'
        "#sendooway:port 587    # submission\n"
        "#sendooway:tls         # STARTTLS\n"
        '#sendooway:address "alice@example.org"\n'
    )
    r = parse_fetchmailrc(text, F)
    assert r.errors == [], r.errors
    (a,) = r.accounts
    assert (a.route.server, a.route.port, a.route.tls) == (
        "smtp.example.org", 587, TlsMode.STARTTLS)


# ------------------------------------------------------------ getmail rc


_GETMAIL_RETRIEVER = (
    "[retriever]\n"
    "type = SimplePOP3SSLRetriever\n"
    "server = pop.example.org\n"
    "username = alice\n"
    "password = gm-Secret-4\n"
    "\n"
)


def test_getmail_section_header_with_a_trailing_comment():
    """`[sender]   # read by sendooway`: the original recognised a section by
    the line's start (glue.c, util_strstart(key, "[sender]")), and getmail's
    ConfigParser ignores what follows the closing bracket as well. Here the
    whole file is refused ("malformed section header (not an INI file?)")."""
    text = _GETMAIL_RETRIEVER + (
        "[sender]   # read by sendooway, not by getmail\n"
        "type = SimpleSMTPTLSSender\n"
        "server = smtp.example.org\n"
        "address = alice@example.org\n"
    )
    r = parse_getmailrc(text, G)
    assert r.errors == [], r.errors
    (a,) = r.accounts
    assert (a.route.server, a.route.port) == ("smtp.example.org", 587)


def test_getmail_sender_section_name_without_case():
    """`[sender]` exists only for sendooway (getmail never reads it), and the
    original matched it without case (util_strstart is case-insensitive), so
    a `[Sender]` section worked. Here: "no [sender] section"."""
    text = _GETMAIL_RETRIEVER + (
        "[Sender]\n"
        "type = SimpleSMTPTLSSender\n"
        "server = smtp.example.org\n"
        "address = alice@example.org\n"
    )
    r = parse_getmailrc(text, G)
    assert r.errors == [], r.errors
    assert [a.route.server for a in r.accounts] == ["smtp.example.org"]


# ------------------------------------------------------------ sendooway.conf, ~/.sendoowayrc


def test_direct_mapping_port_by_service_name():
    """The original handed a direct mapping's PORT to getaddrinfo() as a
    service (client.c, client_connectSocket), so `submission` or `smtps`
    worked there as they do in #sendooway:port and getmail's port. Here the
    global config is refused (field count error) and nothing starts."""
    cfg = parse_config(
        "smarthostMapping = direct:alice@example.org smtp.example.org submission"
        " alice d-Secret-2 tls\n", "sendooway.conf")
    (m,) = cfg.smarthostMapping
    assert m.direct.route.port == 587 and m.direct.route.user == "alice"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_user_include_relative_sslca_is_relative_to_the_home(clean_homes):
    """sendooway.conf(5) of the original: users may redefine sslCA in their
    include. The original read the include and made every upstream TLS
    connection after chdir() to the user's home (auth.c, auth_runas), so
    `sslCA = certs/my-ca.pem` in ~/.sendoowayrc meant ~/certs/my-ca.pem.
    Here the relative path goes to the frontend unchanged and is opened from
    the frontend's own working directory (/ under xinetd and systemd), so
    every TLS route of that user fails. (Relative mapping paths already
    count from the home, docs/decisions/auth.md.)"""
    world = clean_homes
    home = world.users["alice"].home
    world.write_user_file("alice", "certs/my-ca.pem", open(world.ca_file).read())
    world.write_user_file("alice", ".sendoowayrc", (
        "sslCA = certs/my-ca.pem\n"
        "smarthostMapping = direct:alice@example.org smtp.example.org 587 alice"
        " i-Secret-8 tls\n"
    ))
    cfg = parse_config("userInclude = %h/.sendoowayrc\n", "sendooway.conf")
    found = lookup_direct(cfg, _users.lookup("alice"))
    assert found.errors == [], found.errors
    route = found.route_for("alice@example.org").route
    assert route.ca_file == os.path.join(home, "certs/my-ca.pem")
    assert route.ca_pem == open(world.ca_file).read()  # read as alice, sent with the route


# ------------------------------------------------------------ command line and session


def test_session_typed_by_hand_with_lf_line_ends(tmp_path):
    """The original's man page: `sendooway -c /dev/null -l '&2'` reads the
    client from stdin for testing, and its own test suite pipes `echo`
    lines (LF only) into it (test/smtptest.sh, test/conftest.sh); its line
    reader took LF with or without CR (util.c, util_readline). Our
    deployment guide gives the same command for "a session by hand", but a
    terminal sends LF: every command, QUIT included, gets
    "500 5.5.2 Bare LF in command line" and the session cannot be used."""
    out, err, rc = stdio_session(
        [FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket", str(tmp_path / "none.sock")],
        b"EHLO admin.test\nNOOP\nQUIT\n")
    assert b"500 5.5.2" not in out, out
    assert b"250-PIPELINING" in out and b"250 2.0.0" in out, out
    assert out.endswith(b"221 2.0.0 Bye\r\n"), out


def test_ehlo_also_advertises_the_obsolete_auth_equals_form(tmp_path):
    """The original's EHLO listed both `AUTH PLAIN LOGIN` and
    `AUTH=PLAIN LOGIN` (server.c, server_sendEhlo). Clients built before
    RFC 2554 was final (old Outlook/Outlook Express, many scanners and
    printers with scan-to-mail) look only for `AUTH=`; without it they never
    log in and their mail is refused with 530 (Postfix keeps
    broken_sasl_auth_clients for them)."""
    out, err, rc = stdio_session(
        [FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket", str(tmp_path / "none.sock")],
        b"EHLO printer.test\r\nQUIT\r\n")
    lines = [line[4:] for line in out.decode().split("\r\n") if line.startswith("250")]
    assert "AUTH PLAIN LOGIN" in lines, out
    assert "AUTH=PLAIN LOGIN" in lines, out


def test_bind_port_by_service_name():
    """The original's -b took a service name first (daemon.c, daemon_bind:
    getservbyname, then a number), so `sendooway -b submission` in an init
    script worked. Here: "-b submission: the port must be a number"."""
    assert parse_bind("submission") == (None, 587)


def test_log_to_stdout_spelling_creates_no_file(tmp_path):
    """The original's -l took `&1` (stdout) as well as `&2` (util.c,
    util_setLogger). Here `&1` is a file name: a root-owned file named `&1`
    appears in the working directory (/ under xinetd) and the log goes
    there, unannounced."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run(
        [FRONT, "-c", "/dev/null", "-l", "&1", "--auth-socket", str(tmp_path / "none.sock")],
        input=b"QUIT\r\n", capture_output=True, timeout=30, cwd=str(cwd))
    assert not (cwd / "&1").exists(), "a log file named '&1' was created"
    assert r.stdout.startswith(b"220 ") or r.returncode != 0


@given(st.binary(max_size=60).map(lambda b: b.translate(bytes.maketrans(b"ab", b"\r\n"))),
       st.lists(st.integers(0, 60), max_size=6))
def test_lf_as_crlf_whatever_the_reads(data, cuts):
    """Every LF without a CR before it becomes CRLF, a CRLF split between
    two reads stays one CRLF, a bare CR stays bare."""
    conv = LfAsCrlf()
    points = sorted(set(c for c in cuts if c <= len(data)))
    pieces = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    assert b"".join(conv.feed(p) for p in pieces) == re.sub(rb"(?<!\r)\n", b"\r\n", data)


def test_socket_on_stdin_still_refuses_bare_lf(tmp_path):
    """Only a terminal, pipe or file gets LF line ends read as CRLF: with a
    network socket on fd 0/1 (inetd, xinetd) a bare LF is refused as ever."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen(
            [FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket", str(tmp_path / "none.sock")],
            stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL)
        theirs.close()
        ours.settimeout(20)
        ours.sendall(b"EHLO x\nQUIT\r\n")
        out = b""
        while chunk := ours.recv(4096):
            out += chunk
        assert proc.wait(20) == 0
    assert b"500 5.5.2" in out and out.endswith(b"221 2.0.0 Bye\r\n"), out
    assert b"250-PIPELINING" not in out


# ------------------------------------------------------------ the original's own test scripts
# Its `make check` piped commands into `sendooway -c /dev/null -l '&2'` (or
# -c with its sample config), one process per check, and read the reply
# codes; monitoring scripts written against it do the same. The cases
# below are those checks (commands and expected codes), as facts.

_NO_EHLO_CASES = [
    (["KUSPBV_IS_NO_VALID_KEYWORD"], "502"),
    (["HELO Foo"], "250"),
    (["EHLO bar"], "250"),
    (["RSET"], "250"),
    (["MAIL FROM: <alice>"], "530"),
    (["RCPT TO: <bob>"], "503"),
    (["DATA"], "503"),
    (["AUTH ME"], "504"),
    (["AUTH LOGIN"], "334"),
    (["AUTH LOGIN", "*"], "501"),
    (["AUTH PLAIN"], "334"),
    (["AUTH PLAIN", "*"], "501"),
    (["NOOP"], "250"),
    (["QUIT"], "221"),
]


@pytest.mark.parametrize("user", [None, NOBODY], ids=["root", "not-root"])
@pytest.mark.parametrize("lines, code", _NO_EHLO_CASES, ids=[c[0][-1] for c in _NO_EHLO_CASES])
def test_the_originals_command_checks_without_ehlo(world, tmp_path, lines, code, user):
    """Each command alone, no EHLO before it, LF line ends (echo): the
    greeting is 220 and the last reply has the original's code, as root (an
    authenticator of its own) and as an ordinary user with no daemon (the
    original's `make check`). MAIL, AUTH and STARTTLS used to be refused
    before EHLO (503 "Send EHLO first"): six of these fourteen checks failed
    as root, and all of them as a user (421 at once)."""
    out, err, rc = stdio_session(
        [FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket", str(tmp_path / "none.sock")],
        "".join(line + "\n" for line in lines).encode(), user=user)
    replies = out.decode().split("\r\n")
    assert replies[0].startswith("220 "), out
    last = [r for r in replies[1:] if r][-1]
    assert last[:3] == code, (out, err)


def _sample_config(tmp_path) -> str:
    """A config with the keywords and values of the original's sample
    (etc/sendooway.conf), certificate paths that do not exist included."""
    path = tmp_path / "sample.conf"
    path.write_text(
        "localname =\ntimeout = 30\ncloneEhlo = yes\naddReceivedField = yes\n"
        f"sslCA   =\nsslCert = {tmp_path}/missing/sendooway.crt\n"
        f"sslKey  = {tmp_path}/missing/sendooway.key\n"
        "mailerEncryption = allowed\next8BitMime = ignore\nextMessageSize = 52428800\n"
        "smarthostPlain   = ifAdvertised\nsmarthostLogin   = ifAdvertised\n"
        "smarthostCramMD5 = alwaysTry\nValidUser = %users\n"
        "smarthostMapping = fetchmail:%h/.fetchmailrc\n"
        "smarthostMapping = getmail:%h/.getmail/getmailrc\n"
        "smarthostMapping = direct:foobar@example.com smtp.example.com foo secret\n"
        "userInclude = %h/.sendoowayrc\n")
    return str(path)


def _codes(out: bytes) -> list[str]:
    return [r[:3] for r in out.decode("utf-8", "replace").split("\r\n")[1:] if r]


def test_the_originals_sample_config_starts_without_its_certificate_files(world, tmp_path):
    """`echo QUIT | sendooway -l '&2' -c sample.conf` (the original's
    conftest) exits 0 although sslCert/sslKey name missing files: the
    original loaded them only at STARTTLS. It used to exit 2 at once. The
    session offers STARTTLS and refuses it (454), so that a client set to use
    it stops rather than log in without it, and the log says which line of
    which file is at fault."""
    conf = _sample_config(tmp_path)
    argv = [FRONT, "-c", conf, "-l", "&2", "--auth-socket", str(tmp_path / "none.sock")]
    out, err, rc = stdio_session(argv, b"QUIT\n")
    assert rc == 0 and out.startswith(b"220 ") and out.endswith(b"221 2.0.0 Bye\r\n"), (out, err)
    assert f"{conf}:6: {tmp_path}/missing/sendooway.crt: cannot read TLS certificate".encode() in err
    out, err, rc = stdio_session(argv, b"EHLO c\r\nSTARTTLS\r\nQUIT\r\n")
    assert b"250-STARTTLS" in out and _codes(out)[-2:] == ["454", "221"], out


def test_a_listening_frontend_still_refuses_to_start_without_its_certificate(world, tmp_path):
    """A daemon (-b) with a missing certificate stops at start (exit 2), the
    error naming the config line, so that the service manager shows it."""
    conf = _sample_config(tmp_path)
    r = subprocess.run([FRONT, "-c", conf, "-l", "&2", "-b", "127.0.0.1:0",
                        "--auth-socket", str(tmp_path / "none.sock")],
                       capture_output=True, timeout=30)
    assert r.returncode == 2, r
    assert f"{conf}:6: {tmp_path}/missing/sendooway.crt: cannot read TLS certificate".encode() in r.stderr


@pytest.mark.parametrize("script, code, name", [
    (b"HELO B\x00B\r\n", "500", "garbage ident"),
    (b"HELO " + b"a" * 505 + b"\r\n", "250", "longest command line"),
    (b"HELO " + b"a" * 506 + b"\r\n", "500", "one octet too long"),
    (b"AUTH PLAIN abc[]def\n\r", "501", "garbage base64"),
])
def test_the_originals_input_checks(world, tmp_path, script, code, name):
    """The original's input checks, with its sample config: every reply
    after the greeting has the expected code. A 512-octet HELO (505 a's)
    used to get 501 (not a domain) and AUTH without EHLO 503."""
    out, err, rc = stdio_session(
        [FRONT, "-c", _sample_config(tmp_path), "-l", "&2",
         "--auth-socket", str(tmp_path / "none.sock")], script)
    codes = _codes(out)
    assert codes and set(codes) == {code}, (name, out)
    assert all(len(line) <= 510 for line in out.split(b"\r\n")), "a reply line over 512 octets"


def test_any_ehlo_name_is_taken_and_shown_only_when_safe(world, tmp_path):
    """Names that are no domain (a space, Latin-1 octets of a Windows
    computer name) are taken as the original and Postfix take them (they
    used to get 501 or 500, and the client could not send at all); the reply
    echoes only a plain one and the log escapes them."""
    out, err, rc = stdio_session(
        [FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket", str(tmp_path / "none.sock")],
        b"EHLO my host\r\nEHLO G\xfcnter-PC\r\nHELO DESKTOP_4F2A\r\nQUIT\r\n")
    lines = out.split(b"\r\n")
    assert _codes(out)[-1] == "221" and "500" not in _codes(out) and "501" not in _codes(out), out
    hellos = [line for line in lines if b" Hello" in line]
    assert [h.split(b" Hello")[1] for h in hellos] == [b"", b"", b" DESKTOP_4F2A"], out
    assert b"\xfc" not in err


@pytest.mark.parametrize("hello", [b"", b"EHLO my host\r\n", b"HELO G\xfcnter-PC\r\n"],
                         ids=["no EHLO", "a space", "latin-1"])
def test_a_message_without_ehlo_or_with_a_name_that_is_no_domain(monkeypatch, hello):
    """AUTH and MAIL without any EHLO (the original took them), or after a
    name that is no domain: the message goes through; upstream the relay
    says its own name (cloneEhlo cannot send that one) and the Received:
    header says `from unknown`."""
    from tests.scripted_relay import greeted_message

    _out, message, ehlo = greeted_message(monkeypatch, hello)
    assert ehlo and all(b"host" not in line and b"PC" not in line for line in ehlo), ehlo
    assert message.startswith(b"Received: from unknown ("), message[:200]
