"""Tests written from a mutation-testing review of the input parsers: the
user-file readers (_files, routes' .sendoowayrc and mapping parts,
fetchmail, getmail), sendooway.conf, the PROXY protocol header, the address
and EHLO name syntax, the per-address session limit and the wire protocol.
Each pins down behaviour that a small change to that code (a bound moved by
one, a condition dropped) left unnoticed by the rest of the suite; each
docstring names what it guards. Parser-level: plain function calls."""

from __future__ import annotations

import os

import pytest

from sendooway_auth._accounts import Account
from sendooway_auth._address import matches
from sendooway_auth._files import MAX_FILE, MAX_FILES, Budget, read_one
from sendooway_auth.fetchmail import parse_fetchmailrc
from sendooway_auth.getmail import parse_getmailrc
from sendooway_auth.routes import (
    MAX_CA_PATH, MAX_CA_PEM, MAX_INCLUDE_ERRORS, UserRoutes, WireError, from_wire, to_wire,
)
from sendooway_shared.smtp_syntax import (
    NeedsUtf8, ParamError, PathError, host_a_label, is_ehlo_name, parse_params,
    parse_path, split_path_argument,
)
from sendooway_front._limits import AddressLimit
from sendooway_front._proxyproto import ProxyHeaderError, parse as parse_proxy
from sendooway_shared.config import (
    MAX_CONFIG_BYTES, MAX_SOCKET_PATH, ConfigError, exposed_passwords, load_config, parse_config,
    read_text,
)
from sendooway_shared.protocol import REQUESTS, ProtocolError, from_map

from .test_front_proxyproto import v2
from .test_review_mutants import ALICE, ROUTE, _lookup

INCLUDE = "/home/alice/.sendoowayrc"
DIRECT = b"smarthostMapping = direct:* smtp.example.org 587 alice Rc-pw-41 tls\n"


# ------------------------------------------------------------ reading a user's file


def test_a_path_through_a_regular_file_is_missing_not_unreadable(tmp_path):
    """ENOTDIR is "missing" (normal, silent): %h/.getmail/getmailrc where
    ~/.getmail is a file must not be logged as an unreadable file."""
    (tmp_path / "getmail").write_bytes(b"x")
    assert read_one(str(tmp_path / "getmail" / "getmailrc"), Budget()).status == "missing"


def test_a_file_of_max_file_bytes_is_read_and_one_more_is_too_large(tmp_path):
    """MAX_FILE (1 MiB, auth.md) is the largest size read, refused one
    octet past it with what --check shows: its size and the limit."""
    assert MAX_FILE == 1 << 20
    path = tmp_path / "rc"
    path.write_bytes(b"#" * MAX_FILE)
    read = read_one(str(path), Budget())
    assert (read.status, read.size) == ("ok", MAX_FILE)
    path.write_bytes(b"#" * (MAX_FILE + 1))
    read = read_one(str(path), Budget())
    assert (read.status, read.detail) == ("too-large", f"{MAX_FILE + 1} bytes, limit {MAX_FILE}")


def test_what_one_file_took_is_gone_from_the_lookups_budget(tmp_path):
    """The budget of one lookup shrinks by each file read: a second file
    larger than what is left is refused, though under MAX_FILE."""
    (tmp_path / "a").write_bytes(b"#" * 100)
    (tmp_path / "b").write_bytes(b"#" * 60)
    budget = Budget(150)
    assert read_one(str(tmp_path / "a"), budget).ok and budget.left == 50
    read = read_one(str(tmp_path / "b"), budget)
    assert read.status == "too-large" and "budget" in read.detail


def test_a_file_longer_than_its_stat_size_is_refused_past_the_limit():
    """The read itself is bounded, not only fstat's size: a file that holds
    more than it says (a /proc file says 0; one that grows after fstat) is
    refused once one octet more than the limit came."""
    read = read_one("/proc/self/status", Budget(100))
    assert (read.status, read.detail) == ("too-large", "more than 100 bytes")


# ------------------------------------------------------------ routes: the user's files


def _include(text: bytes, **kw):
    return _lookup({INCLUDE: text}, **kw)


def test_a_group_writable_password_file_is_named_in_a_warning():
    """Group-writable (0620), not only world-writable, is named: another
    user could change where the password goes."""
    found = _include(DIRECT, mode=0o100620)
    assert any(w.endswith("writable by group or others") for w in found.warnings), found.warnings


def test_a_password_file_owned_by_root_is_named_in_a_warning():
    """Only the user's own files are trusted silently; root's is named too."""
    found = _include(DIRECT, owner=0)
    assert f"{INCLUDE}: owned by uid 0, not by alice" in found.warnings


def test_a_sendoowayrc_holding_a_direct_password_readable_by_others_is_warned_about():
    """The include's own direct: password counts like a fetchmailrc's."""
    found = _include(DIRECT, mode=0o100644)
    assert any(w.startswith(f"{INCLUDE}: unsafe mode 0644: holds passwords")
               for w in found.warnings), found.warnings


def test_mapping_files_past_max_files_are_named_as_skipped():
    """Past MAX_FILES distinct files, each one left unread is named in
    an error (not dropped silently); the last one within the limit is
    read."""
    text = b"".join(b"smarthostMapping = fetchmail:%%h/f%d\n" % i for i in range(MAX_FILES + 1))
    found = _include(text)
    assert f"/home/alice/f{MAX_FILES}: skipped: more than {MAX_FILES} files to read" in found.errors
    assert not any(f"/home/alice/f{MAX_FILES - 1}: skipped" in e for e in found.errors)


def test_an_include_with_exactly_the_allowed_errors_is_still_used():
    """MAX_INCLUDE_ERRORS bad lines are reported and skipped; only more
    than that makes the file be ignored whole."""
    found = _include(b"junk\n" * MAX_INCLUDE_ERRORS + DIRECT)
    assert found.route_for("a@example.org") is not None
    assert len(found.errors) == MAX_INCLUDE_ERRORS


def test_a_hash_glued_to_a_word_in_the_include_is_warned_about():
    """The include gets the global config's warning for a '#' that cut a
    mapping short (`pa#ss`)."""
    found = _include(b"smarthostMapping = direct:* smtp.example.org 587 alice pa#ss tls\n")
    assert any(w.startswith(f"{INCLUDE}:1: the '#' right after a word") for w in found.warnings)


def test_an_empty_sslca_in_the_include_means_the_system_store_not_the_global_ca():
    """`sslCA =` in a user's include sets no CA file (the system store) for
    the user's routes, even where the global config names one."""
    found = _lookup({INCLUDE: b"sslCA =\n" + DIRECT},
                    conf="sslCA = /etc/ssl/global.pem\nuserInclude = %h/.sendoowayrc\n")
    assert found.route_for("a@example.org").route.ca_file == ""
    found = _lookup({INCLUDE: DIRECT},
                    conf="sslCA = /etc/ssl/global.pem\nuserInclude = %h/.sendoowayrc\n")
    assert found.route_for("a@example.org").route.ca_file == "/etc/ssl/global.pem"


@pytest.mark.parametrize("extra, refused", [(0, False), (1, True)])
def test_an_own_sslca_path_is_taken_up_to_its_limit(extra, refused):
    """A user's sslCA path may be as long as a route carries
    (MAX_CA_PATH), and is refused with an error one character past it."""
    path = "/" + "c" * (MAX_CA_PATH - 1 + extra)
    found = _include(b"sslCA = " + path.encode() + b"\n" + DIRECT)
    assert any("sslCA: path longer than" in e for e in found.errors) is refused


@pytest.mark.parametrize("extra, refused", [(0, False), (1, True)])
def test_an_own_sslca_is_taken_up_to_the_octets_a_route_carries(extra, refused):
    """The user's own CA certificates travel with the route up to
    MAX_CA_PEM octets; one more is an error here, not a route the wire
    refuses later."""
    begin, end = b"-----BEGIN CERTIFICATE-----\n", b"-----END CERTIFICATE-----"
    body = b"A" * (MAX_CA_PEM + extra - len(begin) - len(end) - 2) + b"\n"
    found = _lookup({INCLUDE: b"sslCA = ca.pem\n" + DIRECT,
                     "/home/alice/ca.pem": begin + body + end + b"\n"})
    assert any("octets of certificates, more than" in e for e in found.errors) is refused
    assert len(found.ca_pem) == (0 if refused else MAX_CA_PEM)


def test_an_account_tier_out_of_range_from_a_reader_is_refused():
    """The reader child runs as the user: its answer is checked like
    protocol input, the tier included (0 the user's, 1 the admin's)."""
    found = UserRoutes(ALICE, accounts=[Account(("*",), ROUTE, 2)])
    with pytest.raises(WireError):
        from_wire(to_wire(found), ALICE)


# ------------------------------------------------------------ getmail rc files

SENDER = "[sender]\ntype = SimpleSMTPTLSSender\nserver = smtp.example.org\nusername = u\n"


def test_a_getmail_value_goes_on_after_a_blank_line_as_configparser_reads_it():
    """A blank line inside a continued value stays in it (ConfigParser's
    empty_lines_in_values), so the password is getmail's own."""
    result = parse_getmailrc(SENDER + "password = a\n\n    b\naddress = x@example.org\n", "rc")
    assert result.accounts[0].route.password.reveal() == "a\n\nb"


def test_a_getmail_section_name_runs_to_the_last_bracket():
    """ConfigParser's rule: `[sender] # for [me]` names another section, so
    getmail and sendooway read the same file alike (no account here)."""
    text = (SENDER.replace("[sender]", "[sender] # for [me]")
            + "password = p\naddress = x@example.org\n")
    result = parse_getmailrc(text, "rc")
    assert result.accounts == [] and result.errors == []


@pytest.mark.parametrize("text, line", [("[]\n", 1), ("[sender]\n= value\n", 2),
                                        ("[sender]\n  : value\n", 2)])
def test_an_empty_section_name_or_key_is_not_ini(text, line):
    """`[]`, `= value`, `: value`: an error at their line, not a section
    or key with an empty name."""
    result = parse_getmailrc(text, "rc")
    assert result.accounts == [] and result.errors[0].startswith(f"rc:{line}: ")


def test_a_getmail_certificate_check_value_that_is_no_boolean_is_an_error():
    """A typo must not turn the check off: only true/false and the like."""
    text = SENDER + "password = p\naddress = x@example.org\nno_certificate_check = ja\n"
    result = parse_getmailrc(text, "rc")
    assert result.accounts == [] and result.errors == [
        "rc:7: [sender] no_certificate_check must be true or false"]


def _latin1(text: str) -> str:
    return text.encode("latin-1").decode("utf-8", "surrogateescape")  # as routes reads it


def test_a_getmail_address_that_is_not_utf8_is_an_error_at_its_line():
    """Such an address could not cross from the reader child (the whole
    lookup would fail): the account is refused with file:line instead."""
    result = parse_getmailrc(_latin1(SENDER + "password = p\naddress = x@example.org\n"
                                     "    café@example.org\n"), "rc")
    assert result.accounts == [] and result.errors == [
        "rc:7: [sender] address: not valid UTF-8 (only comment lines may hold other octets)"]


def test_a_retriever_value_that_is_not_utf8_is_named_as_the_retrievers():
    """The error names the section the value came from ([retriever],
    used as the default), not [sender]."""
    text = ("[retriever]\npassword = café\n" + SENDER + "address = x@example.org\n")
    assert parse_getmailrc(_latin1(text), "rc").errors == [
        "rc:2: [retriever] password: not valid UTF-8 (only comment lines may hold other octets)"]


def test_a_getmail_password_that_is_not_utf8_is_an_error_at_its_line():
    """Such a password could not be sent, nor cross from the reader
    child (the whole lookup would fail): an error at its line."""
    result = parse_getmailrc(_latin1(SENDER + "password = café\naddress = x@example.org\n"), "rc")
    assert result.accounts == [] and result.errors == [
        "rc:5: [sender] password: not valid UTF-8 (only comment lines may hold other octets)"]


def test_getmail_addresses_may_be_separated_by_commas():
    """`address = a, b` is two addresses, as the module's docstring
    promises."""
    text = SENDER + "password = p\naddress = a@example.org, b@example.org\n"
    result = parse_getmailrc(text, "rc")
    assert result.accounts[0].addresses == ("a@example.org", "b@example.org")


def test_a_repeated_sender_section_is_named_by_its_first_header():
    """A [sender] given twice is one section (ConfigParser merges them);
    an error about it names the first header's line."""
    text = "[sender]\nserver = smtp.example.org\n[retriever]\nusername = u\n[sender]\nport = 587\n"
    assert parse_getmailrc(text, "rc").errors == [
        "rc:1: [sender] type is required (SimpleSMTPSender, SimpleSMTPTLSSender or"
        " SimpleSMTPSSLSender)"]


# ------------------------------------------------------------ fetchmailrc


def test_a_fetchmail_backslash_b_is_a_backspace():
    """fetchmail's \\b escape is octet 8, as its lexer reads it."""
    text = ('poll pop.example.org user "alice" pass "a\\bc"\n'
            '#sendooway:server "smtp.example.org"\n#sendooway:address "alice@example.org"\n')
    [account] = parse_fetchmailrc(text, "rc").accounts
    assert account.route.password.reveal() == "a\bc"


FM_TAIL = '#sendooway:address "alice@example.org"\n'


def _fetchmail(text: str):
    return parse_fetchmailrc(text, "rc")


@pytest.mark.parametrize("server_line", [
    '#sendooway:server "smtp.example.org"# the work server',
    '#Sendooway:server "smtp.example.org"',
    '#sendooway:server\t"smtp.example.org"',
])
def test_a_fetchmail_server_directive_in_each_form_the_original_read(server_line):
    """A remark right after the closing quote is no value; the prefix is
    matched without case; a tab may follow the keyword."""
    [account] = _fetchmail(f'poll pop.example.org user "alice" pass "p"\n{server_line}\n'
                           + FM_TAIL).accounts
    assert account.route.server == "smtp.example.org"


def test_a_hash_after_a_separator_starts_a_remark_in_a_directive():
    """As fetchmail's lexer: `;#` starts a remark, so it and what follows
    are not part of the password."""
    [account] = _fetchmail('poll pop.example.org user "alice" pass "p"\n#sendooway:pass abc;#x\n'
                           '#sendooway:server "smtp.example.org"\n' + FM_TAIL).accounts
    assert account.route.password.reveal() == "abc;"


def test_a_sendooway_directive_that_is_not_utf8_is_an_error_not_a_fallback():
    """Dropped silently, a Latin-1 #sendooway:pass would leave fetchmail's
    own password in its place."""
    text = _latin1('poll pop.example.org user "alice" pass "fm-pass"\n#sendooway:pass "café"\n'
                   '#sendooway:server "smtp.example.org"\n' + FM_TAIL)
    result = _fetchmail(text)
    assert result.accounts == [] and "rc:2: not valid UTF-8" in result.errors


def test_an_escaped_backslash_before_the_closing_quote_ends_the_string_well():
    """An even run of backslashes before the closing quote is escaped
    backslashes, not the 'backslash before the quote' error."""
    [account] = _fetchmail('poll pop.example.org user "alice" pass "ab\\\\"\n'
                           '#sendooway:server "smtp.example.org"\n' + FM_TAIL).accounts
    assert account.route.password.reveal() == "ab\\"


def test_a_second_defaults_block_replaces_the_first_ones_credentials():
    """A later `defaults` starts afresh (fetchmail keeps one defaults record)."""
    text = ('defaults user "d1" pass "p1"\ndefaults proto pop3\npoll pop.example.org\n'
            '#sendooway:server "smtp.example.org"\n' + FM_TAIL)
    assert "no upstream password" in " ".join(_fetchmail(text).errors)


def test_a_poll_host_name_is_never_read_as_a_keyword():
    """`poll pass ...`: "pass" is the host, not the start of a password."""
    text = 'poll pass user "alice"\n#sendooway:server "smtp.example.org"\n' + FM_TAIL
    assert "no upstream password" in " ".join(_fetchmail(text).errors)


# ------------------------------------------------------------ sendooway.conf


NAME_253 = ".".join(["a" * 63] * 3 + ["b" * 61])
DIRECT_TO = "smarthostMapping = direct:* {} 587 u p tls"


@pytest.mark.parametrize("taken, refused, error", [
    ("extMessageSize = " + "9" * 18, "extMessageSize = " + "9" * 19, ":1: extMessageSize"),
    (f"localname = {NAME_253}", f"localname = {NAME_253}b", ":1: localname"),
    ("authSocket = /" + "s" * (MAX_SOCKET_PATH - 1), "authSocket = /" + "s" * MAX_SOCKET_PATH,
     ":1: authSocket: path too long"),
    (DIRECT_TO.format("a" * 63 + ".example.org"), DIRECT_TO.format("a" * 64 + ".example.org"),
     "not a valid host name"),
])
def test_a_config_value_is_taken_at_its_limit_and_refused_one_past_it(taken, refused, error):
    """The bounds: 18 digits of a size, a 253-character localname, the
    octets sun_path holds, a 63-character label of a direct: server."""
    parse_config(taken)
    with pytest.raises(ConfigError, match=error):
        parse_config(refused)


@pytest.mark.parametrize("text, error", [
    ("validUser = alice\nvalidUser = %\n", "sendooway.conf:2: validUser"),
    ("localname = [IPv6:192.0.2.1]", "write an IPv4 address literal as \\[192.0.2.1\\]"),
    ("proxyProtocol = ::ffff:0.0.0.0/96", "would trust every address"),
    ("smarthostMapping = direct:@example.org smtp.example.org 587 u p tls",
     "sendooway.conf:1: smarthostMapping: address must be"),
])
def test_a_config_value_of_the_wrong_form_is_refused(text, error):
    """A lone `%` is no group; an IPv4 address in an IPv6 literal; the
    IPv4-mapped form of every address as a balancer (every IPv4 peer, as
    0.0.0.0/0); a direct: address without its local part."""
    with pytest.raises(ConfigError, match=error):
        parse_config(text)


def test_a_mapping_without_its_kind_shows_only_its_first_word():
    """The rest of such a line may be the password (`direct:` forgotten)."""
    with pytest.raises(ConfigError) as exc:
        parse_config("smarthostMapping = a@b.org smtp.b.org 587 u Cf-pw-88 tls")
    assert "Cf-pw-88" not in str(exc.value) and "'a@b.org...'" in str(exc.value)


@pytest.mark.parametrize("kind", ["fetchmail", "getmail", "direct"])
def test_a_mapping_with_an_empty_value_is_an_error(kind):
    """`fetchmail:` with nothing after it is an error at its line, not a
    mapping to an empty path."""
    with pytest.raises(ConfigError, match=f"sendooway.conf:1: smarthostMapping: {kind}: needs"):
        parse_config(f"smarthostMapping = {kind}:   ")


def test_a_form_feed_does_not_shift_the_line_numbers_of_errors():
    """Lines end at LF only, as an editor counts them."""
    with pytest.raises(ConfigError, match="sendooway.conf:2: unknown keyword"):
        parse_config("timeout = 5\x0c\nbogus = 1\n")


def test_a_config_of_max_config_bytes_is_read_and_one_more_is_refused(tmp_path):
    """sendooway.conf is read up to MAX_CONFIG_BYTES and refused one
    octet past it."""
    path = tmp_path / "sendooway.conf"
    path.write_bytes(b"#" * MAX_CONFIG_BYTES)
    assert read_text(str(path)) == "#" * MAX_CONFIG_BYTES
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        read_text(str(path))


def test_a_config_with_passwords_is_warned_about_only_when_everyone_can_read_it(tmp_path):
    """The exposed-passwords warning is about the world-read bit: mode
    0644 is warned about, 0640 (root and the frontend's group) is not."""
    path = tmp_path / "sendooway.conf"
    path.write_text("smarthostMapping = direct:* smtp.example.org 587 u Cf-pw-88 tls\n")
    cfg = load_config(str(path))
    os.chmod(path, 0o644)
    assert "can read it (mode 0644)" in exposed_passwords(cfg)
    os.chmod(path, 0o640)
    assert exposed_passwords(cfg) is None


# ------------------------------------------------------------ PROXY protocol


def test_a_v1_line_with_no_room_left_for_its_crlf_is_refused_at_once():
    """106 octets without a line end can no longer end within 107: refused
    now, not after waiting for more from the balancer."""
    assert parse_proxy(b"PROXY " + b"x" * 99) is None
    with pytest.raises(ProxyHeaderError, match="without CRLF"):
        parse_proxy(b"PROXY " + b"x" * 100)


def test_a_v2_local_header_is_taken_whatever_its_family_byte():
    """LOCAL (a balancer's health check): the receiver must ignore the
    family (the spec), so an unassigned one does not refuse it."""
    header = parse_proxy(v2(command=0, family=0xFF))
    assert header is not None and header.kind == "LOCAL" and header.source is None


# ------------------------------------------------------------ MAIL/RCPT and EHLO syntax


def test_a_path_is_taken_up_to_256_octets():
    """RFC 5321's path limit, brackets included: 256 octets taken, 257
    refused."""
    local = "a" * (256 - len("<@example.org>"))  # RFC 5321 4.5.3.1.3
    assert parse_path(f"<{local}@example.org>", allow_null=False, allow_postmaster=False,
                      utf8=False) == f"{local}@example.org"
    with pytest.raises(PathError):
        parse_path(f"<{local}a@example.org>", allow_null=False, allow_postmaster=False, utf8=False)


def test_junk_glued_to_the_closing_bracket_is_a_syntax_error():
    """`<a@b>SIZE=10` is a syntax error (501), not a path with a
    parameter."""
    with pytest.raises(PathError, match="junk after the path"):
        split_path_argument("FROM:<alice@example.org>SIZE=10", "FROM")


def test_an_escaped_quote_in_a_quoted_local_part_does_not_end_it():
    """A quoted-pair `\\"` inside a quoted local part neither ends the
    quotes nor lets a `>` in them close the path."""
    assert split_path_argument('FROM:<"a\\">b"@example.org> SIZE=1', "FROM") == (
        '<"a\\">b"@example.org>', "SIZE=1")


def test_a_non_ascii_address_without_smtputf8_asks_for_it():
    """NeedsUtf8 (553 5.6.7), not a plain bad address."""
    with pytest.raises(NeedsUtf8):
        parse_path("<jörg@example.org>", allow_null=False, allow_postmaster=False, utf8=False)


def test_a_source_route_hop_must_be_a_domain():
    """Each hop of a source route is checked as a domain, though the
    route is then dropped."""
    with pytest.raises(PathError, match="source route"):
        parse_path("<@bad_hop:alice@example.org>", allow_null=False, allow_postmaster=False,
                   utf8=False)


def test_a_non_printable_character_is_no_letter_under_smtputf8():
    """Under SMTPUTF8 non-ASCII letters count as atext, a no-break space
    does not."""
    with pytest.raises(PathError):
        parse_path("<a\u00a0b@example.org>", allow_null=False, allow_postmaster=False, utf8=True)


def test_a_parameter_value_holding_an_equals_sign_is_refused():
    """esmtp-value excludes '=' (RFC 5321 4.1.2): `AUTH=a=b` is a syntax
    error."""
    with pytest.raises(ParamError):
        parse_params("AUTH=a=b")


@pytest.mark.parametrize("name, ok", [
    ("[IPv6:2001:db8::1]", True), ("[192.0.2.1]", True),
    ("[IPv6:192.0.2.1]", False), ("[2001:db8::1]", False),
    ("a" * 63 + ".example.org", True), ("a" * 64 + ".example.org", False),
])
def test_an_ehlo_name_is_a_domain_or_a_literal_of_the_right_family(name, ok):
    """What cloneEhlo sends upstream and Received: shows."""
    assert is_ehlo_name(name) is ok


def test_a_server_name_label_is_at_most_63_octets():
    """The upstream name used for SNI and the hostname check: a 64-octet
    label is refused, as DNS has none."""
    assert host_a_label("a" * 63 + ".example.org") == "a" * 63 + ".example.org"
    with pytest.raises(ValueError):
        host_a_label("a" * 64 + ".example.org")


# ------------------------------------------------------------ sender patterns


def test_only_ascii_letters_are_folded_when_senders_are_compared():
    """U+212A KELVIN SIGN is no "k": an exact pattern is not widened to
    another (SMTPUTF8) sender."""
    assert not matches("kim@example.org", "\u212aim@example.org")


def test_a_quoted_local_part_is_compared_without_its_escapes():
    """`"al\\ice"@example.org` is the mailbox alice@example.org and
    matches its exact pattern."""
    assert matches("alice@example.org", '"al\\ice"@example.org')


def test_only_star_at_makes_a_domain_pattern():
    """A pattern that merely starts with '*' (a direct: mapping's
    `*bob@...`) is exact, never a wildcard for the whole domain."""
    assert not matches("*bob@example.org", "alice@example.org")


# ------------------------------------------------------------ sessions per address


def test_a_session_limit_of_zero_counts_nobody():
    """maxSessionsPerAddress = 0 turns the limit off; it never refuses all."""
    limit = AddressLimit(0)
    assert [limit.enter("203.0.113.7") for _ in range(3)] == [(True, None)] * 3


def test_an_address_whose_last_session_ended_is_forgotten():
    """No entry stays behind per address ever seen (a long-running server)."""
    limit = AddressLimit(2)
    admitted, key = limit.enter("203.0.113.7")
    assert admitted and limit.open == {key: 1}
    limit.leave(key)
    assert limit.open == {}


# ------------------------------------------------------------ wire protocol


@pytest.mark.parametrize("password", [5, ["pw"], None])
def test_a_password_that_is_no_string_is_a_protocol_error(password):
    """A password of another type is refused by the schema
    (ProtocolError, the connection closes), not a TypeError or a list
    handed to PAM."""
    with pytest.raises(ProtocolError, match="auth.password: expected a string"):
        from_map({"type": "auth", "user": "alice", "password": password}, REQUESTS)
