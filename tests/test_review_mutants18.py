"""Tests written from a mutation-testing review of what the earlier ones
left out. (DOCSTRING TO BE COMPLETED)
"""

from __future__ import annotations

import pytest

from sendooway_auth.fetchmail import parse_fetchmailrc
from sendooway_auth.getmail import parse_getmailrc
from tests.test_review_parsers_oracle import TAIL, pop3  # noqa: F401 - a fixture: fetchmail itself

F = "/home/alice/.fetchmailrc"
G = "/home/alice/.getmail/getmailrc"


def fm(text: str, login: str = "root"):
    """(user, password) of each account sendooway reads from `text`, and its errors."""
    r = parse_fetchmailrc(text, F, login=login)
    return [(a.route.user, a.route.password.reveal()) for a in r.accounts], r.errors


# ------------------------------------------------------------ fetchmail's user options


def test_a_name_after_a_trailing_equals_sign_is_skipped_whatever_word_it_is(pop3):
    """F22: `is a= NAME`: fetchmail's `=` is a token of its own and the word
    after it a local name, even `pass`; the `pass x` after it is the
    password. Skipping one word instead of two read `pass pass` as the
    password "pass"."""
    poll = "poll 127.0.0.1 user u is a= pass pass x"
    assert pop3.fetchmail((poll + TAIL).encode()) == ([(b"u", b"x")], False)
    assert fm(poll + TAIL) == ([("u", "x")], [])


@pytest.mark.parametrize("poll", ["user u pass p user v", "user u pass p user alice here"])
def test_a_second_user_of_a_poll_never_takes_the_first_ones_password(pop3, poll):
    """F24, F25: each `user` of a poll is a user of its own, whose password
    is its own or the defaults' (fetchmail fills each field from the
    defaults alone): here the last user has none, and fetchmail logs in
    for no one. Keeping the password given for u sent u's password to the
    server as v (or as the login name)."""
    text = f"poll 127.0.0.1 {poll}{TAIL}"
    assert pop3.fetchmail(text.encode()) == ([], False)
    accounts, errors = fm(text)
    assert accounts == []
    assert f"{F}:3: account has no upstream password (#sendooway:pass or fetchmail's pass)" \
        in errors, errors


def test_a_flag_after_the_last_address_is_warned_about_as_ignored():
    """F26: a `#sendooway:tls` (a flag alone) after the last account's
    address describes no account: the warning says so, as for a value."""
    text = ('poll pop.example.org user u pass p\n#sendooway:server "smtp.example.org"\n'
            '#sendooway:address "a@example.org"\n#sendooway:tls\n')
    r = parse_fetchmailrc(text, F, login="root")
    assert len(r.accounts) == 1 and r.errors == []
    assert r.warnings == [f"{F}:4: #sendooway: lines after the last #sendooway:address are"
                          " ignored (an account ends with #sendooway:address)"]


@pytest.mark.parametrize("flag", ["tls", "ssl", "nocertcheck", "noauth"])
def test_a_flag_with_two_values_is_an_error_at_its_line(flag):
    """F29: a flag takes no value or one yes/no word; `#sendooway:noauth no
    yes` is a mistake to be named, not the first word taken (the account
    would have gone without a login, or without the certificate check)."""
    text = ("poll pop.example.org user u pass p\n#sendooway:server \"smtp.example.org\"\n"
            f"#sendooway:{flag} no yes\n#sendooway:address \"a@example.org\"\n")
    r = parse_fetchmailrc(text, F, login="root")
    assert r.accounts == []
    assert any(e.startswith(f"{F}:3: #sendooway:") and "takes no value or one of" in e
               for e in r.errors), r.errors


def test_an_unknown_keyword_glued_to_a_password_shows_only_its_leading_letters():
    """F32: `#sendooway:pass=Secret-41` (a blank forgotten) is an unknown
    keyword; the error shows its leading letters and "...", never the
    rest, which is the password (a mutant showing 40 non-blank characters
    put it into the log and --check)."""
    text = ("poll pop.example.org user u\n#sendooway:server \"smtp.example.org\"\n"
            "#sendooway:pass=Secret-41\n#sendooway:address \"a@example.org\"\n")
    r = parse_fetchmailrc(text, F, login="root")
    assert r.accounts == []
    assert f"{F}:3: unknown keyword '#sendooway:pass...'" in r.errors, r.errors
    assert not any("secret-41" in m.lower() for m in r.errors + r.warnings)


def test_without_a_fetchmail_password_the_login_name_is_no_upstream_user():
    """F34: the login name is fetchmail's user only for a poll that gives
    a password (docs/decisions/auth.md); an account of #sendooway: lines
    alone, its password among them, names no upstream user: an error,
    not a login to someone's server as the local login name."""
    text = ('#sendooway:server "smtp.example.org"\n#sendooway:pass "Pw-77"\n'
            '#sendooway:address "a@example.org"\n')
    accounts, errors = fm(text, login="alice")
    assert accounts == []
    assert errors == [f"{F}:3: account has no upstream user (#sendooway:user or"
                      " fetchmail's user)"]


@pytest.mark.parametrize("given,line", [
    ('poll pop.example.org user "al\\x01ice" pass p\n#sendooway:server "smtp.example.org"\n', 3),
    ('poll pop.example.org pass p\n#sendooway:server "smtp.example.org"\n'
     '#sendooway:user "al\\tice"\n', 3),
    ('#sendooway:user "al\\nice"\n#sendooway:server "smtp.example.org"\n#sendooway:pass p\n', 1),
])
def test_an_upstream_user_with_a_control_character_is_an_error_at_its_line(given, line):
    """F36: a user name holding a control character (it would put a line
    into the logs, or a command into the upstream's AUTH) is refused at
    the line that gave it (the address line for fetchmail's own `user`)."""
    text = given + '#sendooway:address "a@example.org"\n'
    accounts, errors = fm(text)
    assert accounts == []
    assert errors == [f"{F}:{line}: the upstream user name holds control characters"], errors


# ------------------------------------------------------------ getmail rc files


SENDER = "[sender]\ntype = SimpleSMTPTLSSender\nserver = smtp.example.org\nusername = u\npassword = p\naddress = a@example.org\n"


def gm(text: str | bytes):
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return parse_getmailrc(text, G)


def test_an_empty_sender_server_is_no_server_not_the_retrievers():
    """G05: `server =` left empty in [sender] names no server (it does not
    fall back to the retriever's, as in the original): the error says so
    at the section's header."""
    r = gm("[retriever]\nserver = pop.example.org\n\n" + SENDER.replace(
        "server = smtp.example.org", "server ="))
    assert r.accounts == []
    assert r.errors == [f"{G}:4: [sender] no server (neither [sender] nor [retriever] names one)"]


def test_an_account_without_auth_never_reads_the_retrievers_password():
    """G12: an empty [sender] username means no AUTH; the retriever's
    password (Latin-1 here, for the POP3 server: getmail's business) is
    then not sendooway's to check, and the account stands."""
    text = (b"[retriever]\ntype = SimplePOP3Retriever\nserver = pop.example.org\n"
            b"username = u\npassword = caf\xe9\n\n[sender]\ntype = SimpleSMTPSender\n"
            b"server = smtp.example.org\nusername =\naddress = a@example.org\n")
    r = gm(text)
    assert r.errors == [] and len(r.accounts) == 1
    route = r.accounts[0].route
    assert not route.auth and route.user == "" and route.password.reveal() == ""


def test_an_unknown_key_is_shown_without_its_control_characters():
    """G13: the warning quoting a near miss of a key (`addres` + ESC) keeps
    only its printable characters: it goes to --check's terminal."""
    r = gm(SENDER + "addres\x1b[2J = b@example.org\n")
    assert len(r.accounts) == 1
    assert r.warnings == [f"{G}:7: [sender] unknown key 'addres[2j' ignored"], r.warnings
    assert all(w.isprintable() for w in r.warnings)


def test_a_value_not_utf8_on_its_continuation_line_is_named_at_that_line():
    """G16: a password running over lines, its second piece Latin-1: the
    error names the line of that piece, not the key's."""
    text = SENDER.replace("password = p\n", "password = first\n  caf\udce9\n")
    r = gm(text)
    assert r.accounts == []
    assert r.errors == [f"{G}:6: [sender] password: not valid UTF-8 (only comment lines may"
                        " hold other octets)"]
