"""The user-file parsers, address patterns and route choice (pure functions)."""

import pytest
from hypothesis import assume, example, given, settings, strategies as st

from sendooway_auth._accounts import Account, choose
from sendooway_auth._address import check_pattern, matches
from sendooway_auth.fetchmail import parse_fetchmailrc
from sendooway_auth.getmail import parse_getmailrc
from sendooway_shared.types import Route, TlsMode

F = "/home/alice/.fetchmailrc"
G = "/home/alice/.getmail/getmailrc"


# ------------------------------------------------------------ fetchmail


def test_fetchmail_account_with_fetchmail_user_and_pass_fallback():
    text = (
        "poll pop.example.org with proto POP3\n"
        # (fetchmail's quotes have no escape for the quote: \\x27 is one;
        # `'Se cr\\'et'` is a syntax error to fetchmail 6.4.37)
        "  user 'alice' there with password 'Se cr\\x27et' is alice here\n"
        '  #sendooway:server "smtp.example.org"\n'
        "  #sendooway:tls\n"
        '  #sendooway:address "alice@example.org"\n'
    )
    r = parse_fetchmailrc(text, F)
    assert r.errors == [] and r.warnings == []
    (a,) = r.accounts
    assert a.addresses == ("alice@example.org",)
    route = a.route
    assert (route.server, route.port, route.tls) == ("smtp.example.org", 587, TlsMode.STARTTLS)
    assert route.user == "alice" and route.password.reveal() == "Se cr'et"
    assert route.auth and route.cert_check
    assert route.source == f"{F}:5"


def test_fetchmail_sendooway_user_pass_override_and_escapes():
    text = (
        'poll pop.example.org user "fm" pass "fmpass"\n'
        '#sendooway:server "smtp.example.org"\n'
        "#sendooway:ssl\n"
        '#sendooway:user "up\\x41\\101"\n'
        '#sendooway:pass "tab\\there\\\\q\\"#notacomment"\n'
        "#sendooway:noCertCheck\n"
        '#sendooway:address "*@example.org"\n'
    )
    (a,) = parse_fetchmailrc(text, F).accounts
    assert a.route.user == "upAA"
    assert a.route.password.reveal() == 'tab\there\\q"#notacomment'
    assert a.route.tls is TlsMode.TLS and a.route.port == 465
    assert not a.route.cert_check


def test_fetchmail_several_accounts_carry_nothing_over():
    text = (
        "poll pop.a.org user alice pass apass\n"
        '#sendooway:server "smtp.a.org"\n'
        "#sendooway:port 2525\n"
        "#sendooway:noCertCheck\n"
        '#sendooway:address "alice@a.org"\n'
        '#sendooway:server "smtp.b.org"\n'
        '#sendooway:address "alice@b.org"\n'
        "skip pop.c.org user calice pass cpass\n"
        '#sendooway:server "smtp.c.org"\n'
        "#sendooway:noAuth\n"
        '#sendooway:address "*"\n'
    )
    r = parse_fetchmailrc(text, F)
    assert [a.addresses for a in r.accounts] == [("alice@a.org",), ("*",)]
    a, c = r.accounts
    assert a.route.port == 2525 and not a.route.cert_check
    # the second account got neither port, flags nor fetchmail's user from the first
    assert r.errors and all(e.startswith(f"{F}:7: ") for e in r.errors)
    assert "no upstream user" in r.errors[0] and "no upstream password" in r.errors[1]
    assert c.route.port == 25 and c.route.cert_check and not c.route.auth
    assert c.route.user == "" and not c.route.password


@pytest.mark.parametrize("value,expected", [
    ("yes", True), ("true", True), ("on", True), ("1", True),
    ("no", False), ("false", False), ("off", False), ("0", False), ("", True),
])
def test_fetchmail_flag_with_value(value, expected):
    text = (f'user u pass p\n#sendooway:server "s"\n#sendooway:tls {value}\n'
            '#sendooway:address "a@b.c"\n')
    (a,) = parse_fetchmailrc(text, F).accounts
    assert (a.route.tls is TlsMode.STARTTLS) is expected


def test_fetchmail_errors_skip_only_that_account_and_hide_passwords():
    text = (
        'poll p user u pass "Hidden-Pw-1"\n'
        '#sendooway:server "s1"\n'
        "#sendooway:tls\n#sendooway:ssl\n"
        '#sendooway:address "one@x.org"\n'            # 5: tls+ssl
        'user u2 pass "Hidden-Pw-2\n'                 # 6: unbalanced quote
        '#sendooway:server "s2"\n'
        '#sendooway:address "two@x.org"\n'
        'user u3 pass p3\n#sendooway:server "s3"\n#sendooway:port 99999\n'
        '#sendooway:address "three@x.org"\n'          # 12
        'user u4 pass p4\n#sendooway:frobnicate "Hidden-Pw-4"\n#sendooway:server "s4"\n'
        '#sendooway:address "four@x.org"\n'           # 16
        'user u5 pass p5\n#sendooway:server "s5"\n#sendooway:address "five@x.org"\n'
        '#sendooway:pass "Hidden-Pw-6\n'               # 20: unbalanced, then no address
    )
    r = parse_fetchmailrc(text, F)
    assert [a.addresses[0] for a in r.accounts] == ["five@x.org"]
    joined = "\n".join(r.errors + r.warnings)
    assert f"{F}:5: #sendooway:tls and #sendooway:ssl exclude each other" in joined
    assert f"{F}:6: unbalanced quote" in joined
    assert f"{F}:11: #sendooway:port must be a number from 1 to 65535 or a service name" in joined
    assert f"{F}:14: unknown keyword '#sendooway:frobnicate'" in joined
    assert f"{F}:20: #sendooway:pass: unbalanced quote" in joined
    assert "after the last #sendooway:address" in joined
    assert "Hidden-Pw" not in joined


def test_fetchmail_broken_address_line_still_ends_its_account():
    text = ('user u pass p\n#sendooway:server "s1"\n#sendooway:address "one@x.org\n'
            'user u2 pass p2\n#sendooway:server "s2"\n#sendooway:address "two@x.org"\n')
    r = parse_fetchmailrc(text, F)
    assert [a.addresses for a in r.accounts] == [("two@x.org",)]
    assert r.accounts[0].route.server == "s2" and r.accounts[0].route.user == "u2"
    assert r.errors == [f"{F}:3: #sendooway:address: unbalanced quote"]


def test_fetchmail_consecutive_addresses_share_one_account_but_only_back_to_back():
    text = (
        'poll pop.a.org user alice pass "A-Pw-1"\n'
        '#sendooway:server "smtp.a.org"\n#sendooway:ssl\n'
        '#sendooway:address "alice@a.org"\n'
        '#sendooway:address "*@alias.a.org"\n'     # 5: alias, same account
        '#sendooway:address "bad address@"\n'      # 6: a broken alias is refused alone
        '#sendooway:address "third@a.org"\n'       # 7: still back to back
        '#sendooway:server "smtp.b.org"\n'
        '#sendooway:address "b@b.org"\n'           # 9: a new account, nothing carried
        'user u3 pass p3\n#sendooway:server "s3"\n#sendooway:ssl\n#sendooway:tls\n'
        '#sendooway:address "c@c.org"\n'           # 14: broken (tls + ssl)
        '#sendooway:address "d@c.org"\n'           # 15: an alias of a broken account
    )
    r = parse_fetchmailrc(text, F)
    by_address = {a.addresses[0]: a.route for a in r.accounts}
    assert list(by_address) == ["alice@a.org", "*@alias.a.org", "third@a.org"]
    for route in by_address.values():
        assert (route.server, route.port, route.tls) == ("smtp.a.org", 465, TlsMode.TLS)
        assert (route.user, route.password.reveal()) == ("alice", "A-Pw-1")
    assert by_address["*@alias.a.org"].source == f"{F}:5"
    joined = "\n".join(r.errors)
    assert f"{F}:6: #sendooway:address: " in joined
    assert f"{F}:9: account has no upstream user" in joined
    assert f"{F}:15: #sendooway:address adds to the account above, which has errors" in joined
    assert "A-Pw-1" not in joined


def test_fetchmail_options_whose_value_looks_like_a_keyword():
    text = ('poll imap.a.org proto imap auth password user "al" pass "P-1" auth password'
            ' esmtppassword "E-2" is al here\n'
            '#sendooway:server "s" # a remark\n#sendooway:tls   # STARTTLS\n'
            '#sendooway:address "al@a.org" # the last one\n')
    r = parse_fetchmailrc(text, F)
    assert r.errors == []
    (a,) = r.accounts
    assert (a.route.user, a.route.password.reveal(), a.route.server) == ("al", "P-1", "s")
    assert a.route.tls is TlsMode.STARTTLS and a.addresses == ("al@a.org",)


def test_fetchmail_missing_server_and_password():
    r = parse_fetchmailrc('#sendooway:user "x"\n#sendooway:address "a@b.c"\n', F)
    assert r.accounts == []
    assert any("no #sendooway:server" in e for e in r.errors)
    assert any("no upstream password" in e for e in r.errors)
    # said once: not again as an empty server name
    assert not any("host name" in e for e in r.errors), r.errors


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_fetchmail_parser_never_raises(text):
    r = parse_fetchmailrc(text, F)
    for message in r.errors + r.warnings:
        assert message.startswith(F)


# ------------------------------------------------------------ getmail

GETMAIL = """\
[retriever]
type = SimplePOP3SSLRetriever
server = pop.example.org
username = alice-r
password = r-Secret-1

[sender]
type = {type}
{extra}address = alice@example.org
address = *@alias.example.org
"""


@pytest.mark.parametrize("kind,mode,port", [
    ("SimpleSMTPSender", TlsMode.PLAIN, 25),
    ("SimpleSMTPTLSSender", TlsMode.STARTTLS, 587),
    ("SimpleSMTPSSLSender", TlsMode.TLS, 465),
])
def test_getmail_sender_types_and_retriever_fallbacks(kind, mode, port):
    r = parse_getmailrc(GETMAIL.format(type=kind, extra=""), G)
    assert r.errors == []
    (a,) = r.accounts
    assert a.addresses == ("alice@example.org", "*@alias.example.org")
    assert (a.route.server, a.route.port, a.route.tls) == ("pop.example.org", port, mode)
    assert a.route.user == "alice-r" and a.route.password.reveal() == "r-Secret-1"
    assert a.route.source == f"{G}:9"


def test_getmail_own_values_empty_username_and_cert_check():
    extra = "server = smtp.x.org\nport = 2587\nusername =\nno_certificate_check = true\n"
    (a,) = parse_getmailrc(GETMAIL.format(type="SimpleSMTPTLSSender", extra=extra), G).accounts
    assert (a.route.server, a.route.port) == ("smtp.x.org", 2587)
    assert not a.route.auth and a.route.user == "" and not a.route.password
    assert not a.route.cert_check


def test_getmail_sender_section_name_any_case_and_remark_after_headers():
    text = GETMAIL.format(type="SimpleSMTPSSLSender", extra="").replace(
        "[sender]", "[Sender]   ; read by sendooway").replace(
        "[retriever]", "[retriever] # getmail's")
    r = parse_getmailrc(text, G)
    assert r.errors == []
    (a,) = r.accounts
    assert (a.route.server, a.route.user) == ("pop.example.org", "alice-r")
    twice = text + "[SENDER]\ntype = SimpleSMTPSender\naddress = x@y.org\n"
    r = parse_getmailrc(twice, G)
    assert r.accounts == [] and "more than one [sender] section" in r.errors[0]


@pytest.mark.parametrize("text,where,what", [
    ("just some text\n", ":1:", "not an INI file"),
    ("\x7fELF\x01\x02garbage = 1\n", ":1:", "not an INI file"),
    ("[sender]\ntype = Carrier Pigeon\naddress = a@b.c\nserver=s\nusername=\n", ":2:", "unknown type"),
    ("[sender]\ntype = SimpleSMTPSender\nserver = s\nusername =\n", ":", "at least one 'address'"),
    ("[sender]\ntype = SimpleSMTPSender\nserver = s\nusername = u\naddress = a@b.c\n", ":", "no password"),
    ("[sender]\ntype = SimpleSMTPSender\nserver = s\nusername =\naddress = a@b.c\nport = 0\n", ":6:", "port"),
    ("[sender]\ntype = SimpleSMTPSender\nserver = s\nusername =\naddress = nobody\n", ":5:", "address"),
    ("[sender]\ntype = SimpleSMTPSender\nport = nosuchservice\nusername=\naddress=a@b.c\nserver=s\n",
     ":3:", "port must be a number from 1 to 65535 or a service name"),
])
def test_getmail_errors_name_file_and_line(text, where, what):
    r = parse_getmailrc(text, G)
    assert r.accounts == []
    (message,) = r.errors
    assert message.startswith(G + where) and what in message


def test_getmail_password_with_unicode_line_separators():
    text = "[sender]\ntype = SimpleSMTPSender\nserver = s\nusername = u\npassword = a\u2028b\x0cc\r\naddress = a@b.c\n"
    (a,) = parse_getmailrc(text, G).accounts
    assert a.route.password.reveal() == "a\u2028b\x0cc"


def test_getmail_unknown_key_warned_repeated_key_first_wins_service_port():
    text = ("[sender]\ntype = SimpleSMTPSSLSender\nserver = first.example\nserver = second.example\n"
            "port = submission\nusername =\nadress = typo@x.org\naddress = a@x.org\n")
    r = parse_getmailrc(text, G)
    (a,) = r.accounts
    assert a.route.server == "first.example" and a.route.port == 587
    assert r.warnings == [f"{G}:7: [sender] unknown key 'adress' ignored"]


def test_getmail_unknown_key_warning_shows_its_first_word_only():
    """`password s3cr=t` (the `=` forgotten) makes "password s3cr" the key:
    the warning used to show it, and with it part of the password."""
    text = ("[sender]\ntype = SimpleSMTPSSLSender\nserver = s.example\nusername =\n"
            "password s3cr=t\naddress = a@x.org\n")
    r = parse_getmailrc(text, G)
    assert r.warnings == [f"{G}:5: [sender] unknown key 'password' ignored"]


def test_fetchmail_defaults_credentials_serve_later_polls():
    """fetchmail gives every later poll the `user`/`pass` of a `defaults`
    block until the poll names its own (a review: they were dropped, and
    such accounts had "no upstream password")."""
    text = ('defaults user du pass dp\n'
            'poll a.org proto imap\n#sendooway:server "s.a.org"\n#sendooway:address "x@a.org"\n'
            'poll b.org user bu pass bp\n#sendooway:server "s.b.org"\n#sendooway:address "y@b.org"\n'
            'poll c.org\n#sendooway:server "s.c.org"\n#sendooway:address "z@c.org"\n')
    r = parse_fetchmailrc(text, F)
    assert r.errors == []
    assert [(a.route.server, a.route.user, a.route.password.reveal()) for a in r.accounts] == [
        ("s.a.org", "du", "dp"), ("s.b.org", "bu", "bp"), ("s.c.org", "du", "dp")]


def test_fetchmail_port_by_service_name():
    text = 'user u pass p\n#sendooway:server "s"\n#sendooway:port smtps\n#sendooway:address "a@b.c"\n'
    (a,) = parse_fetchmailrc(text, F).accounts
    assert a.route.port == 465


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_getmail_parser_never_raises(text):
    r = parse_getmailrc(text, G)
    assert len(r.accounts) <= 1
    for message in r.errors:
        assert message.startswith(G)


# ------------------------------------------------------------ addresses


def _acc(pattern, server):
    return Account((pattern,), Route(server, 25, TlsMode.PLAIN, source=server))


def test_exact_beats_domain_beats_any_whatever_the_order():
    accounts = [_acc("*", "any"), _acc("*@Example.org", "dom"), _acc("bob@example.ORG", "exact"),
                _acc("*@example.org", "dom2")]
    assert choose(accounts, "bob@EXAMPLE.org").route.server == "exact"
    assert choose(accounts, "carol@example.org").route.server == "dom"  # first of equals
    assert choose(accounts, "x@other.net").route.server == "any"
    assert choose(accounts, "").route.server == "any"
    assert choose(accounts[1:], "") is None
    assert choose(accounts[1:], "x@other.net") is None


def test_addresses_compare_without_case_like_the_original():
    assert matches("Bob@example.org", "Bob@EXAMPLE.ORG")
    assert matches("Bob@example.org", "bob@example.org")
    assert not matches("Bob@example.org", "bobby@example.org")
    assert matches("*@example.org", "anyone@Example.Org")
    assert not matches("*@example.org", "a@sub.example.org")
    assert not matches("*@example.org", "example.org")


def test_users_own_mappings_win_over_global_ones():
    user_any = Account(("*",), Route("own", 25, TlsMode.PLAIN), tier=0)
    global_exact = Account(("bob@example.org",), Route("global", 25, TlsMode.PLAIN), tier=1)
    assert choose([user_any, global_exact], "bob@example.org").route.server == "own"
    user_dom = Account(("*@x.org",), Route("own-dom", 25, TlsMode.PLAIN), tier=0)
    assert choose([global_exact, user_dom], "bob@example.org").route.server == "global"


@pytest.mark.parametrize("bad", ["", "nodomain", "@x.org", "a@", "a b@x.org", "a@*.org", "a*@x.org"])
def test_bad_patterns_refused(bad):
    with pytest.raises(ValueError):
        check_pattern(bad)


def _fetchmail_quote(value: str, quote: str, fetchmail: bool = False) -> str:
    """`value` quoted for a #sendooway: line, or (`fetchmail`) for fetchmail's
    own lexer, whose quoted strings end at the first quote (no escape for
    it: a hex escape instead) and hold no NUL (a C string)."""
    out = []
    for c in value:
        if fetchmail and c == quote:
            out.append(f"\\x{ord(c):02x}")
        elif c in ("\\", quote):
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 32:
            out.append(f"\\{ord(c):03o}")
        else:
            out.append(c)
    return quote + "".join(out) + quote


@settings(max_examples=300, deadline=None)
@example("pa\u2028ss\x85w\x0cord\r", '"', False)
@example("pa\u2029ss", "'", True)
@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
       st.sampled_from(['"', "'"]), st.booleans())
def test_fetchmail_quoting_round_trips(secret, quote, in_comment):
    assume(in_comment or "\x00" not in secret)
    q = _fetchmail_quote(secret, quote, fetchmail=not in_comment)
    if in_comment:
        text = f'user u\n#sendooway:server "s"\n#sendooway:pass {q}\n#sendooway:address "a@b.c"\n'
    else:
        text = f'user u pass {q}\n#sendooway:server "s"\n#sendooway:address "a@b.c"\n'
    r = parse_fetchmailrc(text, F)
    assert r.errors == [], r.errors
    (a,) = r.accounts
    assert a.route.password.reveal() == secret


def test_two_sendooway_directives_on_one_line_both_count():
    """`#sendooway:server "x" #sendooway:port 2525` is two directives, as the
    original read it; the second was taken for a remark and the route went
    to port 587 without a word (an outside review). A plain remark after a
    directive stays a remark."""
    from sendooway_auth.fetchmail import parse_fetchmailrc

    text = ('poll pop.b.org user "u" password "pw1"\n'
            '#sendooway:server "smtp.b.org" #sendooway:port 2525 #sendooway:ssl\n'
            '#sendooway:address "a@b.org"  #sendooway: the work address\n')
    r = parse_fetchmailrc(text, "/h/.fetchmailrc", login="u")
    assert not r.errors and not r.warnings, (r.errors, r.warnings)
    (account,) = r.accounts
    assert (account.route.server, account.route.port, account.route.tls) == (
        "smtp.b.org", 2525, TlsMode.TLS)
