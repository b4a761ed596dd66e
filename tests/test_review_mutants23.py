"""Mutation review (mut23): TABLE

"""

from __future__ import annotations

import os
import ssl

import pytest

from tests.test_review_getmail_oracle import G, Getmail, LoginRecorder, sendooway_reads

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the oracle's fixtures need root")


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
