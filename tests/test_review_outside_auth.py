"""Outside review of the authenticator's user files and `--check` report
(sendooway_auth/getmail.py, routes.py, check.py). Each test failed against
the code as reviewed, for the reason its docstring gives (each is fixed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from sendooway_auth._files import FileRead
from sendooway_auth._users import UserInfo
from sendooway_auth.routes import from_wire, run_plan, to_wire
from sendooway_shared.config import parse_config
from sendooway_shared.protocol import REPLIES, AuthOk, BlockingChannel, RouteOk
from tests.auth_helpers import all_passwords, login, route
from tests.test_review_fixes_auth import check, route_line

AUTH = [sys.executable, "-m", "sendooway_auth.cli"]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")

HOME = "/home/alice"
G = f"{HOME}/.getmail/getmailrc"
ALICE = UserInfo(name="alice", uid=40001, gid=40001, home=HOME, groups=(40001,))

RETRIEVER = (b"[retriever]\ntype = SimpleIMAPSSLRetriever\nserver = imap.example.net\n"
             b"username = alice\npassword = Gm-Pw-81\n\n"
             b"[destination]\ntype = Maildir\npath = ~/Maildir/\n\n")
SENDER = (b"[sender]\ntype = SimpleSMTPSSLSender\nserver = smtp.example.net\n"
          b"address = alice@example.net\n")


def _lookup(files: dict[str, bytes], conf: str = ""):
    """run_plan as the reader worker runs it, on these files (as bytes), with
    the default mappings unless `conf` has some; the answer after the trip
    through to_wire/from_wire, as the daemon and --check see it."""
    def read(paths):
        return [FileRead(p, "ok", "", 0o100600, ALICE.uid, len(files[p]), files[p])
                if p in files else FileRead(p, "missing") for p in paths]
    found = run_plan(parse_config(conf, "sendooway.conf"), ALICE, read)
    return from_wire(to_wire(found), ALICE)


def _check(tmp_config, user: str, *args: str, conf: str = "") -> tuple[int, str]:
    return check(tmp_config(conf), user, *args)


# ------------------------------------------------------------ getmail rc files


def test_getmailrc_with_latin1_comment_is_read():
    """DEFECT (rule: .fetchmailrc, .sendoowayrc and sendooway.conf take
    octets that are not UTF-8 in remarks; only a value that is used must be
    UTF-8, an error at its file:line): a getmailrc whose first line is
    `# Zugang f\\xfcr B\\xfcro` (Latin-1) was refused as a whole,
    "getmailrc:1: not valid UTF-8 (not a text file?)", and the account was
    lost. getmail's own values may hold such octets too (a Maildir path):
    sendooway does not use them."""
    text = (b"# Zugang f\xfcr B\xfcro\n" + RETRIEVER.replace(b"~/Maildir/", b"~/B\xfcro/")
            + b"; Versand \xfcber den Provider\n" + SENDER)
    found = _lookup({G: text})
    assert found.errors == [] and found.warnings == [], (found.errors, found.warnings)
    (account,) = found.accounts
    assert account.addresses == ("alice@example.net",)
    assert (account.route.server, account.route.port) == ("smtp.example.net", 465)
    assert account.route.password.reveal() == "Gm-Pw-81"


@pytest.mark.parametrize("text,line,what", [
    # the used password, from [retriever]: its line, its section
    (RETRIEVER.replace(b"Gm-Pw-81", b"gr\xfc\xdf") + SENDER, 5, "[retriever] password"),
    # a continuation line of the address
    (RETRIEVER + SENDER + b"    b\xfcro@example.net\n", 15, "[sender] address"),
    (RETRIEVER + SENDER.replace(b"smtp.example.net", b"smtp.b\xfcro.net"), 13, "[sender] server"),
])
def test_getmailrc_used_value_not_utf8_is_an_error_at_its_line(text, line, what):
    found = _lookup({G: text})
    assert found.accounts == []
    (message,) = found.errors
    assert message.startswith(f"{G}:{line}: {what}") and "not valid UTF-8" in message, message
    assert "Gm-Pw-81" not in message and "gr" not in message


def test_getmailrc_without_sender_section_gives_no_account_and_no_error():
    """DEFECT (rule: DESIGN.md, the default mappings read
    ~/.getmail/getmailrc; a .fetchmailrc without #sendooway: lines is
    silent): the ordinary getmailrc of a user who uses getmail only to
    fetch mail has no [sender] section, and every route lookup logged
    "user file error: ... no [sender] section". Correct: no account from
    that file, no error; a broken [sender] section is still an error."""
    found = _lookup({G: b"# nur zum Abholen, ohne Versand\n" + RETRIEVER})
    assert found.accounts == [] and found.errors == [] and found.warnings == []
    (read,) = [r for role, r in found.files if role == "getmail"]
    assert "no [sender] section" in read.describe()
    broken = _lookup({G: RETRIEVER + b"[sender]\ntype = SimpleSMTPSSLSender\n"})
    assert broken.accounts == []
    assert broken.errors == [f"{G}:11: [sender] at least one 'address' is required"]


@as_root
def test_getmailrc_without_sender_is_not_logged_by_the_daemon(tmp_path, tmp_config, clean_homes):
    """The same through the daemon: alice sends with her .fetchmailrc and
    fetches with getmail; her lookups log no "user file error"."""
    world = clean_homes
    world.write_user_file("alice", ".getmail/getmailrc", RETRIEVER)
    world.write_user_file("alice", ".fetchmailrc",
                          'poll pop.example.org user "alice" password "fm-Pw-82"\n'
                          '#sendooway:server "smtp.example.org"\n'
                          '#sendooway:address "alice@example.org"\n')
    log = tmp_path / "auth.log"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conf = tmp_config(f"authSocket = {tmp_path}/run/auth.sock\n")
    proc = subprocess.Popen([*AUTH, "-c", conf, "-l", str(log), "--fd", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        ch = BlockingChannel(ours, REPLIES, timeout=10)
        assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
        assert isinstance(route(ch, "alice@example.org"), RouteOk)
        ch.close()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "route: user=alice" in text, text
    assert "user file" not in text, text
    assert not any(pw in text for pw in all_passwords(world) + ["Gm-Pw-81", "fm-Pw-82"])


@as_root
def test_check_tells_a_getmailrc_without_sender_as_information(tmp_config, clean_homes):
    world = clean_homes
    path = world.write_user_file("alice", ".getmail/getmailrc", b"# f\xfcr B\xfcro\n" + RETRIEVER)
    code, out = _check(tmp_config, "alice")
    assert code == 1, out  # no usable account: she has none
    (line,) = [line for line in out.splitlines() if line.startswith(f"  {path} [getmail]")]
    assert "found" in line and "no [sender] section" in line, out
    assert "errors:" not in out and "not valid UTF-8" not in out, out
    assert "Gm-Pw-81" not in out


# ------------------------------------------------------------ --check


FETCHMAILRC = """\
poll pop.example.org user "alice" password "fm-Pw-83"
#sendooway:server "smtp.example.org"
#sendooway:tls
#sendooway:address "alice@example.org"

poll pop.other.net user "alice2" password "fm-Pw-84"
#sendooway:server "smtp.other.net"
#sendooway:ssl
#sendooway:address "*@other.net"
"""


@as_root
def test_check_takes_a_sender_in_angle_brackets(tmp_config, clean_homes):
    """DEFECT (rule: the frontend logs senders as `<alice@example.org>`, and
    --check understands `<>` as the null sender): `--sender
    '<alice@example.org>'`, pasted from a log, reported "route for
    <alice@example.org>: none". Correct: one pair of surrounding angle
    brackets is taken off."""
    world = clean_homes
    world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC)
    code, out = _check(tmp_config, "alice", "--sender", "<alice@example.org>")
    assert code == 0, out
    assert "smtp.example.org:587" in route_line(out, "alice@example.org"), out
    code, out = _check(tmp_config, "alice", "--sender", "<>",
                       conf="smarthostMapping = direct:* smtp.any.example 25 noAuth\n")
    assert "smtp.any.example:25" in route_line(out, "<>"), out
    assert "fm-Pw-8" not in out


@as_root
def test_check_names_starttls_and_implicit_tls_unambiguously(tmp_config, clean_homes):
    """DEFECT (rule: in the files `tls` means STARTTLS and `ssl` implicit TLS,
    DESIGN.md's words "587 STARTTLS, 465 implicit TLS"): --check showed a
    `#sendooway:ssl` account as `smtp.other.net:465 tls`, the files' word
    for STARTTLS. Correct: `starttls` and `implicit-tls`."""
    world = clean_homes
    world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC)
    conf = ("smarthostMapping = fetchmail:%h/.fetchmailrc\n"
            "smarthostMapping = direct:*@club.example smtp.club.example 465 u Dir-Pw-85 ssl\n")
    code, out = _check(tmp_config, "alice", "--sender", "bob@other.net", conf=conf)
    assert code == 0, out
    assert "smtp.other.net:465 implicit-tls user alice2" in route_line(out, "bob@other.net")
    assert "-> smtp.example.org:587 starttls user alice" in out, out
    assert "direct:*@club.example smtp.club.example:465 implicit-tls" in out, out
    assert "-> smtp.club.example:465 implicit-tls user u" in out, out
    assert not any(" tls " in line or line.endswith(" tls") for line in out.splitlines()), out
    assert "Dir-Pw-85" not in out and "fm-Pw-8" not in out


@as_root
def test_check_of_a_user_who_is_not_a_valid_user_has_no_usable_account(tmp_config, clean_homes):
    """DEFECT (rule: sendooway-auth(8) EXIT STATUS 1 "the user has no usable
    mapping"; a user who is not a valid user cannot log in, so no route of
    theirs is ever used): `valid user: no` was followed by "result: 1
    usable account(s)" and exit 0. Correct: the result says no account is
    usable for this user, and exit 1."""
    world = clean_homes
    world.write_user_file("carol", ".fetchmailrc",
                          FETCHMAILRC.replace("alice", "carol").replace("*@other.net", "c@x.net"))
    code, out = _check(tmp_config, "carol", "--sender", "carol@example.org",
                       conf="validUser = %mailusers\n")
    assert "valid user: no" in out, out
    assert "smtp.example.org:587" in route_line(out, "carol@example.org")  # what her files say
    (result,) = [line for line in out.splitlines() if line.startswith("result:")]
    assert "usable account(s)" not in result and "no usable mapping" in result, result
    assert "not a valid user" in result, result
    assert code == 1, out
