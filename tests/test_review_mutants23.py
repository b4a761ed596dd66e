"""Mutation review (mut23) of the last session's product changes
(900a680..468b8ac): getmail.py (_lines: LF/CRLF/CR line ends; section
names as written, [sender] matched without blanks or case; `[note = x`
a key; the empty [retriever] username; use_netrc, use_xoauth2,
use_kerberos), _stream._lookup's dropped work, _reader.lookup_direct's
"stopped by its alarm", _connection.sendable_frame and the help epilogs.

60 hand-made mutants, one at a time, each against the closest files:
getmail (test_review_getmail_oracle, test_auth_parsers,
test_review_rcfiles2, _userfiles, test_compat_original2,
test_review_mutants18, _mutants14, _fixes_late), _lookup
(test_review_nproc, _mutants22, _mutants21, _insider), the reader
(test_auth_faults' alarm test, test_auth_routes, test_auth_workers,
test_review_getmail_oracle), _connection (test_review_authperf,
_mutants11, test_auth_second_review, test_third_review), epilogs
(test_cli's --help test). 35 killed by those files, 25 survived: this
file kills 15, 9 are equivalent, 1 is a gap left unpinned. One product
defect found (found while writing the G21 test, not by a mutant): a
file with `use_netrc = on` in [DEFAULT] and no [options] section was
refused, though getmail, which reads use_netrc with has_option('options',
...), logs in with the file's own login then; fixed, pinned here
(G39: the fix's condition dropped).

getmail.py
  killed: G01 a lone CR no line end; G02 `\r|\n|\r\n` (CRLF two ends);
  G03 \x0c a line end too; G06 `[]` a section (`close >= 1`); G08 the name
  stripped; G09 no header lines; G10 `[note = x` refused; G13 `[ sender ]`
  not [sender]; G15 an empty [sender] username refused too; G16 the empty
  [retriever] username taken as "no AUTH"; G20 [DEFAULT]'s use_netrc not
  read; G22 `continue` -> `break` ([DEFAULT] not read when [options] has
  none); G27 use_netrc's case kept; G29 use_netrc's error not returned;
  G30 use_kerberos and G31 use_xoauth2 not looked at; G34 a [sender]
  password not serving under use_xoauth2; G35 its case kept; G36 the flag
  looked for in [sender]; G37 its error not returned; G41 the empty
  username's error at the header line; G42 any line with a `]` a header.
  Killed only here: G05 the last line dropped when it has no line end
  (`if out:` for `if out and out[-1] == ""`); G07 a one-letter section
  (`[o]`) refused (`close >= 3`); G11 `[note: x` refused (its `:` not
  looked at); G12 the malformed-header error dropped (`[retriever` said
  "expected 'key = value'"); G43 a line without `[`, `=` or `:` called a
  malformed header; G14 rfind -> find (`[retriever]  # was [imap]` taken
  for [retriever]); G21 [DEFAULT] read before [options] and G23 no
  `break` (options' `off` lost to [DEFAULT]'s `on`); G24 use_netrc
  checked only without a [sender] username, G25 only without a [sender]
  password, G26 `auth and` dropped (a "no AUTH" [sender] refused); G32
  use_xoauth2 refusing a "no AUTH" [sender]; G33 `password is not None`
  dropped (no password anywhere said "use_xoauth2" instead of "no
  password"); G39 (the fix) `if "options" in sections` dropped.
  Equivalent: G04 the trailing "" not popped: one blank line at the end,
  which nothing follows. G17 `not username.strip()` for `== ""`: every
  value is already stripped, and a continued one has a non-blank piece.
  G28, G38 use_netrc / use_xoauth2 "not false" for "true": they differ
  for a value neither true nor false, a file getmail itself refuses
  ("boolean parameter requires ..."), so one it never logs in with.
_stream._lookup:
  killed (test_review_nproc): S01 `dropped = True` dropped; S02 the test
  reversed; S03 give_back() dropped; S05 every lookup dropped; S06
  `return []` for the raise.
  Equivalent: S04 give_back() before `dropped = True`: both run in the
  loop's thread with no await between; give_back touches only the loop's
  semaphore and table, never what a pool thread reads.
_reader.lookup_direct:
  killed (test_auth_faults): R03 SIGKILL for SIGALRM; R04 the branch
  dropped; R05 `not found.failure`.
  Equivalent: R02 WIFSIGNALED dropped: for a child that exited, WTERMSIG
  is status & 0x7f, which is 0 (waitpid without WUNTRACED reports no
  stop).
  Gap, not pinned: R01 `found.failure` dropped: a whole answer would be
  thrown away when the alarm ends the child after its last write and
  before its _exit, a window no test can aim at without faking the
  child.
_connection:
  killed: C01 the frame of the reply without certificates sent but the
  reply with them returned, C05 sendable() not checking at all
  (test_review_authperf); C03 NoRoute always (test_auth_second_review).
  Equivalent: C02, C06 the reply encoded again to be sent: encode() is
  deterministic, the same octets (only the ~17 us this change saved).
  Killed only here: C04 drain() dropped from _send_frame (every
  answer): a peer that pipelines route requests and reads no answer had
  every one answered into the daemon's memory (300 of 300 here, ~8 KiB
  each, where the drain stops at a few dozen).
cli epilogs (test_cli's --help test):
  killed: E02 "(Accept=yes)" dropped from the frontend's; E03 a code
  changed in the authenticator's.
  Equivalent (prose): E01 "the text or report" -> "the report": the test
  pins the codes against the man page, not the words.
"""

from __future__ import annotations

import os
import ssl
import time

import pytest

from sendooway_shared.protocol import RouteOk, RouteRequest, encode
from tests.auth_helpers import all_passwords, checked_daemons, login
from tests.test_auth_second_review import _ca_bundle
from tests.test_review_getmail_oracle import G, Getmail, LoginRecorder, sendooway_reads

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the oracle's fixtures need root")


@pytest.fixture
def daemon(tmp_path, tmp_config, clean_homes):
    """auth_helpers' daemon fixture (its logs checked for the passwords)."""
    yield from checked_daemons(tmp_path, tmp_config, all_passwords(clean_homes) + ["up-Secret-7"])


@pytest.fixture(scope="module")
def oracle(world):
    """(the login recorder, getmail) of test_review_getmail_oracle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(world.cert_file, world.key_file)
    rec, gm = LoginRecorder(ctx), Getmail()
    yield rec, gm
    rec.close()
    gm.cleanup()


def rc(port: int, retriever: str = "username = r\npassword = r-pw", sender: str = "",
       options: str | None = "verbose = 0\n", head: str = "") -> str:
    """An rc file whose [retriever] (POP3 to `port`) comes last, its
    `retriever` lines at the very end; options None: no [options].
    (run_getmail puts its mbox in place of MBOX.)"""
    return (head + "[destination]\ntype = Mboxrd\npath = MBOX\n"
            + ("" if options is None else f"[options]\n{options}")
            + f"[sender]\ntype = SimpleSMTPTLSSender\naddress = alice@example.org\n{sender}"
            + f"[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\nport = {port}\n"
            + retriever)


def run_getmail(oracle, make, end: str = "\n") -> tuple[str, list, str]:
    """(the text make(port) gives, with `end` for each line end; the logins
    getmail tried with it; its stderr)."""
    rec, gm = oracle
    port = rec.listen("pop3")
    text = make(port).replace("MBOX", gm.mbox).replace("\n", end)
    res = gm.run({"getmailrc": text.encode()})
    return text, rec.logins[port], res.stderr.decode(errors="replace")


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_the_last_line_counts_without_a_line_end(oracle, end):
    """G05: the last line of a file without a line end at its end (an
    editor that adds none) is read, as getmail reads it (the password on
    it was dropped: "no password")."""
    text, logins, _ = run_getmail(oracle, rc, end)
    assert not text.endswith(end) and logins == [(b"r", b"r-pw")]
    assert sendooway_reads(text) == ([("r", "r-pw", True)], [])


def test_a_one_letter_section_is_a_section(oracle):
    """G07: `[o]` is a section for ConfigParser, which getmail never reads
    (the file was refused: "malformed section header")."""
    text, logins, _ = run_getmail(oracle, lambda port: rc(port, head="[o]\nnote = mine\n"))
    assert logins == [(b"r", b"r-pw")]
    assert sendooway_reads(text) == ([("r", "r-pw", True)], [])


def test_a_bracket_line_with_a_colon_is_a_key(oracle):
    """G11: `[note: x` has no `]`: ConfigParser reads a key `[note` (with
    `:` as with `=`), getmail warns and logs in; sendooway takes the login
    too (the file was refused)."""
    text, logins, stderr = run_getmail(
        oracle, lambda port: rc(port, "username = r\n[note: the old box\npassword = r-pw"))
    assert logins == [(b"r", b"r-pw")] and 'ignoring unknown parameter "[note"' in stderr
    assert sendooway_reads(text) == ([("r", "r-pw", True)], [])


def test_an_unclosed_section_header_is_called_one(oracle):
    """G12: `[retriever` alone (the `]` forgotten): getmail refuses the
    file; sendooway says what the line is, not "expected 'key = value'"."""
    text, logins, stderr = run_getmail(
        oracle, lambda port: rc(port).replace("[retriever]", "[retriever"))
    assert logins == [] and "Error" in stderr
    line = text.splitlines().index("[retriever") + 1
    assert sendooway_reads(text) == (
        [], [f"{G}:{line}: malformed section header (not an INI file?)"])


def test_a_section_name_runs_to_the_last_bracket(oracle):
    """G14: `[retriever]  # was [imap]` names the section "retriever]  #
    was [imap" (ConfigParser takes it to the line's last `]`): getmail has
    no [retriever]; sendooway takes no server from it (it took the first
    `]` and the [retriever] login)."""
    text, logins, stderr = run_getmail(
        oracle, lambda port: rc(port).replace("[retriever]", "[retriever]  # was [imap]"))
    assert logins == [] and "No section: 'retriever'" in stderr
    assert sendooway_reads(text) == (
        [], [f"{G}:6: [sender] no server (neither [sender] nor [retriever] names one)"])


NETRC = "machine 127.0.0.1 login net-user password net-pw\n"


def with_netrc(oracle, make) -> tuple[str, list, str]:
    gm = oracle[1]
    path = os.path.join(gm.home, ".netrc")
    with open(path, "w") as f:
        f.write(NETRC)
    os.chmod(path, 0o600)
    try:
        return run_getmail(oracle, make)
    finally:
        os.unlink(path)


def test_use_netrc_in_options_wins_over_default(oracle):
    """G21, G23: getmail reads use_netrc from [options], [DEFAULT] only
    when [options] has none: `off` there and `on` in [DEFAULT] logs in
    with the file's login (sendooway refused the file), `on` there and
    `off` in [DEFAULT] with ~/.netrc's (sendooway took the file's)."""
    text, logins, _ = with_netrc(oracle, lambda port: rc(
        port, options="verbose = 0\nuse_netrc = off\n", head="[DEFAULT]\nuse_netrc = on\n"))
    assert logins == [(b"r", b"r-pw")]
    assert sendooway_reads(text) == ([("r", "r-pw", True)], [])
    text, logins, _ = with_netrc(oracle, lambda port: rc(
        port, options="verbose = 0\nuse_netrc = true\n", head="[DEFAULT]\nuse_netrc = false\n"))
    assert logins == [(b"net-user", b"net-pw")]
    line = text.splitlines().index("use_netrc = true") + 1
    assert sendooway_reads(text) == ([], [
        f"{G}:{line}: [options] use_netrc: getmail logs in with ~/.netrc's user name and password,"
        " which sendooway does not read: give username and password in [sender]"])


def test_use_netrc_in_default_without_options_is_not_read(oracle):
    """getmail reads use_netrc with has_option('options', ...): a file with
    no [options] section never uses ~/.netrc, whatever [DEFAULT] says."""
    text, logins, _ = with_netrc(oracle, lambda port: rc(
        port, options=None, head="[DEFAULT]\nuse_netrc = on\n"))
    assert logins == [(b"r", b"r-pw")]
    assert sendooway_reads(text) == ([("r", "r-pw", True)], [])


@pytest.mark.parametrize("sender, read", [
    # a [sender] name with the [retriever] password, or the other way
    # round: getmail's own login is ~/.netrc's, not the file's (G24, G25)
    ("username = s\n", None), ("password = s-pw\n", None),
    # both in [sender]: nothing is taken from elsewhere
    ("username = s\npassword = s-pw\n", ("s", "s-pw", True)),
    # [sender]'s "no AUTH" needs no password (G26)
    ("username =\n", ("", "", False)),
])
def test_use_netrc_needs_what_sendooway_logs_in_with_in_sender(sender, read):
    text = rc(110, sender=sender, options="use_netrc = yes\n")
    accounts, errors = sendooway_reads(text)
    if read is None:
        assert accounts == [] and errors == [
            f"{G}:5: [options] use_netrc: getmail logs in with ~/.netrc's user name and password,"
            " which sendooway does not read: give username and password in [sender]"]
    else:
        assert (accounts, errors) == ([read], [])


def imap_rc(retriever: str, sender: str = "") -> str:
    return rc(143, retriever, sender).replace("SimplePOP3Retriever", "SimpleIMAPRetriever")


def test_use_xoauth2_with_no_auth_or_no_password():
    """G32: [sender]'s "no AUTH" needs no password, whatever the retriever
    logs in with (it was refused); G33: with no password anywhere it is
    the plain "no password", not that of a [retriever] password getmail
    does not use."""
    text = imap_rc("username = r\npassword = r-pw\nuse_xoauth2 = yes\n", sender="username =\n")
    assert sendooway_reads(text) == ([("", "", False)], [])
    text = imap_rc("username = r\nuse_kerberos = on\n"
                   'password_command = ("/usr/bin/oauth", "r")\n')
    assert sendooway_reads(text) == ([], [
        f"{G}:6: [sender] no password (neither [sender] nor [retriever] has one;"
        " password_command is not supported)"])


SENDER = ["[sender]", "type = SimpleSMTPTLSSender", "server = smtp.example.org",
          "address = alice@example.org", "username = u"]


def test_a_line_without_a_bracket_or_separator_is_no_header():
    """G43: only a line opening with `[` is called a malformed section
    header; a line with neither `=` nor `:` (the `=` forgotten after a
    key) is a key gone wrong, and one before every section no INI file."""
    text = "\n".join(SENDER + ["password s3cret", ""])
    assert sendooway_reads(text) == ([], [f"{G}:6: expected 'key = value' (not an INI file?)"])
    assert sendooway_reads("Hello\n" + text) == (
        [], [f"{G}:1: text before the first [section] (not an INI file?)"])


def test_a_frontend_that_reads_no_answers_holds_the_daemons_answers(daemon, clean_homes):
    """C04: the authenticator waits for its answers to go (drain) before it
    answers the next request: a peer that sends route requests without
    reading the answers (each ~8 KiB here, its sslCA) gets a few dozen of
    them answered, then none until it reads (its requests wait in the
    socket); without the wait every request was answered into the
    daemon's memory. Once it reads, every answer comes."""
    clean_homes.write_user_file("alice", "ca.pem", _ca_bundle())
    clean_homes.write_user_file("alice", "getmailrc", (
        "[sender]\ntype = SimpleSMTPTLSSender\nserver = smtp.example.org\n"
        "username = u\npassword = up-Secret-7\naddress = alice@example.org\n"))
    clean_homes.write_user_file("alice", ".sendoowayrc", (
        "sslCA = %h/ca.pem\nsmarthostMapping = getmail:%h/getmailrc\n"))
    d = daemon("userInclude = %h/.sendoowayrc\n")
    ch = d.connect()
    assert login(ch, "alice", clean_homes.users["alice"].password).TYPE == "auth_ok"
    count = 300
    ch.sock.sendall(encode(RouteRequest("alice@example.org")) * count)
    answered, still = -1, time.monotonic()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and time.monotonic() - still < 1.5:
        now = d.log().count("route: user=alice")
        if now != answered:
            answered, still = now, time.monotonic()
        time.sleep(0.05)
    assert 0 < answered < count // 3, answered
    answers = [ch.receive() for _ in range(count)]
    assert all(isinstance(a, RouteOk) and a.ca_pem for a in answers)
    ch.close()
