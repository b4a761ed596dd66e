"""Second adversarial review of the users' fetchmail and getmail files as the
real programs read them (sendooway_auth/fetchmail.py, getmail.py,
_accounts.py, routes.py), measured against fetchmail 6.4.37 (`fetchmail -f
FILE --configdump`, its lexer rcfile_l.l and grammar rcfile_y.y, fetchmail(1))
and getmail6 (which reads rc files with Python 3's
configparser.RawConfigParser, strict by default). Each test below drives the
real authenticator in the fake world (`sendooway-auth --fd` answering a
route request after a PAM login, or `sendooway-auth --check`) or the parser
the reader worker runs, and each failed against the code as reviewed for the
reason its docstring gives.
All are fixed.
"""

from __future__ import annotations

import configparser
import os
import socket
import subprocess
import sys

import pytest

from sendooway_shared.protocol import REPLIES, AuthOk, BlockingChannel, RouteOk
from sendooway_auth.getmail import parse_getmailrc
from tests.auth_helpers import login, route

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")

AUTH = [sys.executable, "-m", "sendooway_auth.cli"]

TAIL = ('#sendooway:server "smtp.example.org"\n'
        "#sendooway:tls\n"
        '#sendooway:address "alice@example.org"\n')


def _route_via_daemon(tmp_path, tmp_config, world, sender: str):
    """Log alice in and ask for `sender`'s route, as the frontend does: the
    real authenticator on a socketpair (--fd), her files read by her reader."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conf = tmp_config(f"authSocket = {tmp_path}/run/auth.sock\n")
    proc = subprocess.Popen([*AUTH, "-c", conf, "-l", str(tmp_path / "auth.log"),
                             "--fd", str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        ch = BlockingChannel(ours, REPLIES, timeout=10)
        assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
        answer = route(ch, sender)
        ch.close()
        proc.wait(10)
        return answer
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check(tmp_config, sender: str) -> str:
    conf = tmp_config("")
    res = subprocess.run([*AUTH, "-c", conf, "--check", "alice", "--sender", sender],
                         capture_output=True, text=True, timeout=30)
    return res.stdout + res.stderr


def _route_line(out: str, sender: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(f"route for {sender}:")]
    assert lines, out
    return lines[0]


# ------------------------------------------------------------ ~/.fetchmailrc


def test_fetchmail_decimal_escapes_in_password_read_as_fetchmail_reads_them(
        tmp_path, tmp_config, clean_homes):
    """DEFECT (rule: fetchmail(1), "backslash escape sequences (... \\nnn for
    decimal (where nnn cannot start with a 0), \\0ooo for octal, and \\xhh for
    hex)", with its example "fetchmail interprets \\233 the same as \\xE9";
    fetchmail's escapes() in rcfile_l.l; DESIGN.md "Quoting follows
    fetchmail's rules"): `pass "x\\101y\\9z"` is, for fetchmail 6.4.37
    (--configdump, and the PASS line it sent to a loopback POP3 server), the
    password "xey<TAB>z" (decimal 101 = 'e', decimal 9 = TAB): the password
    the user's mailbox really has. sendooway's
    _unescape reads \\ooo as octal and \\8/\\9 as the digit itself, so the
    route it hands the frontend carries "xAy9z": the upstream AUTH fails with
    a password fetchmail logs in with. Correct: \\ followed by 1-9 is up to
    three decimal digits; only \\0... is octal."""
    world = clean_homes
    world.write_user_file("alice", ".fetchmailrc",
                          'poll imap.example.org proto imap\n'
                          '  user "alice" pass "x\\101y\\9z"\n' + TAIL)
    answer = _route_via_daemon(tmp_path, tmp_config, world, "alice@example.org")
    assert isinstance(answer, RouteOk), answer
    assert answer.password.reveal() == "xey\tz"


def test_fetchmail_hex_escaped_utf8_password_reaches_upstream_as_those_bytes(
        tmp_path, tmp_config, clean_homes):
    """DEFECT (rule: fetchmail(1) "You may use backslash escape sequences
    (... \\xhh for hex) to embed non-printable characters"; its escapes()
    in rcfile_l.l stores each escape as one byte; DESIGN.md "Quoting follows
    fetchmail's rules"): a user whose mailbox password is "café" and who
    wrote it with escapes, `pass "caf\\xc3\\xa9"`, logs in with fetchmail,
    which sends the bytes 63 61 66 C3 A9 (fetchmail 6.4.37 against a
    loopback POP3 server sent `PASS caf\\xc3\\xa9e\\t` for
    "caf\\xc3\\xa9\\101\\9"). sendooway turns each escape into the code
    point U+00C3, U+00A9 and the frontend encodes the password as UTF-8, so
    the upstream gets 63 61 66 C3 83 C2 A9 ("cafÃ©") and refuses the login.
    Correct: escapes yield bytes; the password is those bytes (here the
    UTF-8 text "café")."""
    world = clean_homes
    world.write_user_file("alice", ".fetchmailrc",
                          'poll imap.example.org proto imap\n'
                          '  user "alice" pass "caf\\xc3\\xa9"\n' + TAIL)
    answer = _route_via_daemon(tmp_path, tmp_config, world, "alice@example.org")
    assert isinstance(answer, RouteOk), answer
    assert answer.password.reveal().encode("utf-8") == "café".encode("utf-8")


def test_fetchmail_unquoted_password_with_a_no_break_space_is_one_word(
        tmp_path, tmp_config, clean_homes):
    """DEFECT (rule: fetchmail's lexer rcfile_l.l: an unquoted word is
    `[^=;:, \\t\\r\\n]+` and only ` \\t\\r` and line ends separate tokens;
    DESIGN.md "Quoting follows fetchmail's rules"): `pass
    correct<U+00A0>horse` (a no-break space, which Option+Space types on a
    Mac) is for fetchmail 6.4.37 one password, the whole word. sendooway's
    lexer splits words at every str.isspace() character (U+00A0, U+2028,
    FF, VT, U+001C..U+001F...), so the route carries the password "correct"
    and the rest is dropped silently: a wrong password goes upstream. Correct:
    split fetchmail lines at blank, tab, CR, LF and `,;:` only."""
    world = clean_homes
    world.write_user_file("alice", ".fetchmailrc",
                          'poll imap.example.org proto imap\n'
                          '  user alice pass correct\u00a0horse\n' + TAIL)
    answer = _route_via_daemon(tmp_path, tmp_config, world, "alice@example.org")
    assert isinstance(answer, RouteOk), answer
    assert answer.password.reveal() == "correct\u00a0horse"


@pytest.mark.parametrize("user_line", [
    'user "alice" here with password "fm-Pw-77" is "a.smith@example.org" there',
    'user alice pass fm-Pw-77 is a.smith@example.org there',
], ids=["here-with-password-is-there", "pass-then-is-there"])
def test_fetchmail_is_remote_there_anywhere_in_the_user_options_names_the_login(
        tmp_config, clean_homes, user_line):
    """DEFECT (rule: fetchmail's grammar rcfile_y.y, `user_option: IS STRING
    THERE {current.remotename = $2;}`, a user option that may stand anywhere
    among the user's options; fetchmail 6.4.37 --configdump gives "remote":
    "a.smith@example.org" for both lines; decisions/auth.md "`user NAME here
    is REMOTE there` logs in as REMOTE"): sendooway only recognises `is
    REMOTE there` straight after `user NAME here`. With a `with password`
    or `pass` in between, `sendooway-auth --check` reports the route as
    "user alice": the upstream login is the local name, the wrong account,
    while fetchmail logs in as a.smith@example.org. Correct: `is X there`
    (and `to X there`) wherever it stands in the user's options sets the
    remote name."""
    world = clean_homes
    world.write_user_file("alice", ".fetchmailrc",
                          f"poll imap.example.org proto imap\n  {user_line}\n" + TAIL)
    out = _check(tmp_config, "alice@example.org")
    line = _route_line(out, "alice@example.org")
    assert "user a.smith@example.org " in line, out


@pytest.mark.parametrize("remark", [
    "# sendooway: STARTTLS on the submission port",
    '# sendooway:server "smtp.old-provider.net"',
], ids=["prose-remark", "disabled-directive"])
def test_fetchmail_remark_with_a_blank_after_the_hash_is_no_directive(
        tmp_config, clean_homes, remark):
    """DEFECT (rule: DESIGN.md "comment lines `#sendooway:server ...`";
    decisions/auth.md "Only remarks starting `#sendooway:` are read";
    sendooway.conf.5 FETCHMAILRC; the original C compared the whole word with
    "#sendooway:server" etc., so `# sendooway:...` was an ordinary remark):
    _directive strips the remark before testing the prefix, so `# sendooway:`
    with blanks after the `#` is taken as a directive. A prose remark
    ("# sendooway: STARTTLS on the submission port") becomes "unknown keyword
    '#sendooway:...'" and the whole account is skipped (no route, 550 for
    the user's mail); a line the user disabled by writing it as an ordinary
    remark overrides the real server and sends the account's password to
    the old provider. Correct: only a remark that starts exactly with
    `#sendooway:` (any case) is a directive; others are ignored."""
    world = clean_homes
    world.write_user_file("alice", ".fetchmailrc",
                          'poll imap.example.org proto imap user "alice" pass "fm-Pw-77"\n'
                          '#sendooway:server "smtp.example.org"\n'
                          f"{remark}\n"
                          "#sendooway:tls\n"
                          '#sendooway:address "alice@example.org"\n')
    out = _check(tmp_config, "alice@example.org")
    line = _route_line(out, "alice@example.org")
    assert "smtp.example.org:587 starttls" in line, out
    assert "fm-Pw-77" not in out


# ------------------------------------------------------------ getmail rc files

GETMAIL_HEAD = """\
[retriever]
type = SimpleIMAPSSLRetriever
server = imap.example.net
username = alice
password = gm-Pw-55

[destination]
type = Maildir
path = ~/Maildir/

[sender]
type = SimpleSMTPSSLSender
server = smtp.example.net
"""


def test_getmail_several_addresses_in_a_form_getmail6_can_read(tmp_config, clean_homes):
    """DEFECT (rule: DESIGN.md "picks ... from files the user already keeps
    (~/.fetchmailrc, getmail rc files)" and its compatibility target; getmail6
    reads the rc file with configparser.RawConfigParser, whose default
    strict=True raises DuplicateOptionError for a repeated key in any
    section, and getmail does not catch it): the only way sendooway offers to
    give a getmail account two sender addresses is a repeated `address` key
    (sendooway.conf.5's own example), and that file makes getmail6 stop
    fetching mail (getmail 6.20.02 --dump: "Unhandled exception ...
    DuplicateOptionError ... option 'address' in section 'sender' already
    exists", exit 4). The form getmail6 accepts, one address per continuation
    line, is refused by sendooway ("address contains white space or control
    characters"), so a getmail6 user cannot have both working. Correct:
    accept a multi-line `address` value (one address per line) and document
    it, so that the user's getmailrc stays readable by getmail."""
    documented = GETMAIL_HEAD + "address = alice@example.net\naddress = a.smith@example.net\n"
    with pytest.raises(configparser.DuplicateOptionError):
        configparser.RawConfigParser().read_string(documented)  # what getmail6 does
    text = GETMAIL_HEAD + "address = alice@example.net\n    a.smith@example.net\n"
    configparser.RawConfigParser().read_string(text)  # getmail6 reads this one
    world = clean_homes
    world.write_user_file("alice", ".getmail/getmailrc", text)
    out = _check(tmp_config, "a.smith@example.net")
    line = _route_line(out, "a.smith@example.net")
    assert "smtp.example.net:465 implicit-tls" in line, out
    assert "gm-Pw-55" not in out


def test_getmail_error_about_an_empty_sender_section_names_its_line():
    """DEFECT (rule: DESIGN.md "Every error names file:line"; STYLE.md
    "Errors carry context a user can act on"): a [sender] header with no key
    under it yet (a user who has just started writing it) is reported as
    "getmailrc:1: [sender] type is required": line 1 is the [retriever]
    header, the error points at the wrong section. parse_getmailrc falls back
    to line 1 when [sender] has no keys because _read_ini keeps no line for
    section headers. Correct: name the [sender] header's own line (11 here)."""
    text = GETMAIL_HEAD.split("type = SimpleSMTPSSLSender")[0]
    assert text.splitlines()[10] == "[sender]"
    result = parse_getmailrc(text, "/home/alice/.getmail/getmailrc")
    assert result.errors == ["/home/alice/.getmail/getmailrc:11: [sender] type is required"
                             " (SimpleSMTPSender, SimpleSMTPTLSSender or SimpleSMTPSSLSender)"]
