r"""Tests written from a mutation-testing review of the code the earlier
ones (test_review_mutants{,2..17}) left out or only touched: the users'
file parsers (sendooway_auth/fetchmail.py: the escapes, the lexer, the
remark and directive split, the user options, _apply and _close;
getmail.py: the INI reader, the [sender] checks, the unknown-key warning),
route matching and the lookup (_accounts.choose, _address._local/_domain/
matches; routes.plan, _cap, _take_ca, _text, _check_mode), the file reader
(_files.read_one), the backoff (_penalty: Penalty, SharedPenalty, KeyLocks,
_private_directory, client_host, user_key), the permit table (_permits),
shared/log.py (field, printable, the formatter, _quiet_failures, Tally,
log_failure, the new log file's mode), sendooway_auth/check.py (the
--check report) and a spot check of sendooway_front/_proxyproto.py. Each test pins down behaviour that a small change to that
code left unnoticed by the suite, and names the mutant it kills. Real
parts: the parsers on real file text, with fetchmail 6.4.37 itself as the
oracle where it decides (test_review_parsers_oracle's recording POP3
server); run_plan with the answer through to_wire/from_wire as the daemon
takes it; SharedPenalty and KeyLocks on real directories and flock(2); the
real log set-up in a child process.

MUTANTS ("killed" means by the suite before this file), one at a time,
each against the test files that exercise its module (parsers:
test_auth_parsers, _review_mutants3, _rcfiles2, _userfiles,
_compat_original{,2}, _outside_files, _mutants14, _coverage,
_parsers_oracle, test_auth_routes; routes: test_review_mutants{,3,14},
test_auth_routes, _localuser, test_auth_second_review, _userfiles,
_outside_auth, _coverage, _compat_original, test_auth_parsers,
_checkdiff; _files: _mutants{3,6}, _userfiles, test_auth_routes,
_authframes, _outside_files, _coverage; penalty: test_auth_permits,
_mutants{,9}, _fixes_late, _fifth, _fourth, _third, _second, _turns,
test_auth_faults; permits: test_auth_permits, _mutants{,17},
_authframes, test_auth_daemon, test_auth_fuzz; log: test_auth_permits,
_mutants11, test_cli, _fixes_front, _seventh, test_auth_faults,
_authboundary, _logs; check: test_auth_cli,
_mutants{6,14}, _checkdiff, _fixes_auth, _admin, _addresses, _pwplaces,
_sixth, test_direct_patterns, test_auth_second_review; PROXY header:
test_front_proxyproto, _proxyheader, _mutants{3,8}).
138 mutants: 96 killed by the suite; 42 survived, of which this file
kills 31 and 11 are equivalent (reasons below).

fetchmail.py (40):
  killed: F01 a backslash ending a word kept; F02 three hex digits; F03
  `\x` without a digit read as "x"; F04 four octal digits; F05 `% 255`
  for `& 0xFF`; F06 `\9` not decimal; F07 an escape of octet 0 not ending
  the value; F08 any backslash run before the closing quote refused; F09
  no remark right after a closing quote; F10 none after a separator; F11
  a backslash in a quote skipping one character; F12 two directives a
  line at most; F13 an unknown keyword as the first directive dropped;
  F14 `# sendooway:` (a blank after the #) obeyed; F15 a tab after the
  keyword; F16 a broken address not ending its account; F17 an alias of
  an account with errors taken; F18/F19 the defaults' credentials not
  reset by a second defaults block, not given to the next poll; F20 `no
  envelope` taking a value; F23 `is NAME there` with a bad NAME; F27
  a list of local names seen only one word long; F28 a directive ending a
  local-name list; F30/F31/F39 a port, server or address with two values;
  F33 tls and ssl together; F35 an empty password refused; F37 a noauth
  route carrying the user; F38 an unclosed quote always a word; F40
  noise words before `there`.
  Survived, killed here: F22 one word skipped after `is a=` (`pass pass
  x` read the password "pass"); F24, F25 a second `user` of a poll keeping
  the first one's password (u's password sent as v, or as the login
  name, where fetchmail logs in for no one); F26 a flag alone after the
  last address not warned about; F29 a flag taking the first of two
  values (`noauth no yes`); F32 an unknown keyword shown by its first 40
  non-blank characters (`#sendooway:pass=SECRET` put the password into
  --check and the log); F34 the login name as the user of an account with
  no fetchmail password; F36 an upstream user with a control character
  taken.
  Equivalent: F21 `is`'s `there` test also after `=` (`= NAME there`
  is a syntax error to fetchmail in every form tried: `is a = b there`,
  `to a = b there`, `is = b there`, ... so no file fetchmail reads
  differs).
getmail.py (17):
  killed: G01 `;` no comment; G02 a key indented like the one before
  read as a continuation; G03 a repeated key's last value; G04 two
  [sender] sections taken; G06 the retriever's username first; G07 a
  password required without AUTH; G08 a noauth route carrying the
  password; G09 every address at its key's line; G10 every value named as
  [sender]'s; G11 blank lines kept across a key; G14 every unknown key
  shown; G15 `= value` with no key.
  Survived, killed here: G05 an empty [sender] `server =` passed on to
  the host-name check (another error, not "no server"); G12 the
  retriever's password checked for UTF-8 without AUTH (a Latin-1 POP3
  password broke a noauth sender); G13 an unknown key shown with its
  control characters; G16 a value's bad octets named at its key's line,
  not at the piece's.
  Equivalent: G17 `username.strip()` for the username (the reader strips
  every piece and keeps no trailing blank line: a value is empty or holds
  a visible character).
Matching and the lookup (21):
  killed: R01 specificity before tier (a global exact pattern over the
  user's own *@domain); R06 the user's ca_pem given to any account (the
  admin's direct routes too); R08 every global route kept off the user's
  CA; R10 1001 accounts; R12 a NUL's line one too low; R14 a CA one octet
  over; R15 an include with passwords never warned about; R17 a file with
  warnings counted as fetch-only; R18 group-readable passwords not warned
  about; R20 a CA path one over.
  Survived, killed here: R03 a local part unquoted when only its first
  character is a quote (a global direct: mapping `"alice@...` kept with
  its warning matched the sender alic); R04 UTS 46 mapping in IDNA
  (U+212A KELVIN SIGN or a full-width letter made a look-alike domain
  match); R09 a path of exactly MAX_PATH skipped; R11 1001 addresses an
  account not cut (the daemon refused the whole answer); R16 a user's own
  sslCA never mode-checked; R19 trailing blanks and CRs of a CA file
  sent with the route; R21 1001 mapping rows with no "and N more".
  Equivalent: R02 `<=` for `<` in choose (the rank holds the account's
  index: equal ranks are the same account); R05 `bool(s_domain)` dropped
  (a sender always has a domain: MAIL refuses one without, the null
  sender returns before, and no pattern has an empty domain: *@ is no
  pattern, refused in users' files); R07 `a.tier and` dropped (a tier-0
  account never has an admin's source: sources are file:line, and the
  user's include is not sendooway.conf); R13 an owner of -1 warned
  about (_check_mode only sees reads that succeeded, which carry fstat's
  owner).
_files.py (5): all killed (FI1 the settle window from 0 only; FI2 the
  budget never charged; FI3 no O_NONBLOCK; FI4/FI5 no second read, or no
  wait, of a file emptied just now).
_penalty.py (18):
  killed: P01 `>=` for the window; P03 the hold one delay longer; P05 a
  zero count kept after a success; P06 the PAM figure falling fast; P07
  P14 the store's bound one off; P12 a link-local zone kept in the key;
  P17 the user-at-address count not dropped on success; P18 a "c:" key
  without a client.
  Survived, killed here: P08 expired counts measured against the
  caller's monotonic clock (a full store never made room again); P09 a
  count already in a full store not raised (a guesser's backoff frozen);
  P11 no check that the locked file is still the one at the path (two
  logins for one key decided side by side); P13 lower() for casefold();
  P15 a store directory another user owns accepted; P16 O_NOFOLLOW
  dropped for the turn files.
  Equivalent: P02 the user-at-address count in the delay's max (it never
  exceeds the user's count: each failure raises both, a success drops
  both; only after the oldest-first eviction of a full table could it,
  and then the delay is longer, not shorter); P04 the hold not capped
  (wait = last + delay - now with last <= now and delay <= cap); P10 a
  restamp as a made-up name's write (the file was just read, so it
  exists and the full-store check is skipped either way).
_permits.py (5): all killed (PM1 a violation not closing; PM2 `>` for
  `>=` at the last failure; PM3/PM4 an unavailable backend or a failed
  route lookup not closing; PM5 a newer version taken).
shared/log.py (12):
  killed: L01 a space in a field; L02 `=` in a field; L03 `<`/`>`; L04
  C1 controls and U+2028 printed; L05 printable() not cut; L08 every lost
  line noted; L10 a new log 0644.
  Survived, killed here: L06 the date formatted once a process (every
  line stamped with the first one's second); L07 the lost-lines note at
  exit also said by each forked child; L11 a MemoryError logged with a
  traceback.
  Equivalent: L09 `< 0` for `<= 0` in Tally.note (only at an exact float
  tie, and then the line comes from a timer of 0 s, a moment later);
  L12 Tally.close not cancelling its timer (close runs as the serving
  loop ends, and a timer of an ended loop never runs; one that did would
  find nothing unsaid).
check.py (10):
  killed: C01 the password shown; C02 no sslCA shown for a route
  without its own (the config's serves it); C04 <...> kept around
  --sender; C05 a source route kept; C07 the "only root may" note also
  for the user itself; C09 exit 1 for an unknown user under a refused
  config; C10 no warning for a route too big to go with its CA.
  Survived, killed here: C03 report lines not escaped (a home named by
  NSS with ESC and CR cleared the admin's screen and forged a "result:"
  line; first written with alice's sslCA path, which the config's
  control-character rule now refuses at its line); C06
  ", owner uid -1" for a file that was not read; C08 a user who is no
  valid user reported with usable accounts, exit 0 (sendooway-auth(8):
  exit 1, the daemon refuses that login).
_proxyproto.py (10): all killed (X01 an IPv4-mapped peer not trusted as
  IPv4; X02 a bare LF taken; X03/X10 the 107-octet bound one off; X04 a
  port over 65535; X05 an IPv4 address in a TCP6 line; X06 2049 octets;
  X07 an address block one octet short; X08 source and destination
  swapped; X09 a LOCAL header's family checked).

Defects: none. Every survivor was a gap in the tests, not a behaviour
contradicting DESIGN.md, the man pages or docs/decisions; the mutants'
behaviours were checked against fetchmail itself where it decides (F22,
F24/F25: real fetchmail logs in for no one where the mutant sent the
first user's password).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from sendooway_auth._address import matches
from sendooway_auth._files import MAX_PATH, FileRead
from sendooway_auth._penalty import KeyLocks, Penalty, SharedPenalty, key_path
from sendooway_auth.fetchmail import parse_fetchmailrc
from sendooway_auth.getmail import parse_getmailrc
from sendooway_auth.routes import MAX_ADDRESSES, MAX_MAPPINGS, from_wire, run_plan, to_wire
from sendooway_shared.config import parse_config
from sendooway_shared.log import DATEFMT, _Formatter, log_failure
from tests.test_review_mutants import ALICE
from tests import test_review_parsers_oracle as oracle

F = "/home/alice/.fetchmailrc"
G = "/home/alice/.getmail/getmailrc"
TAIL = oracle.TAIL
pop3 = oracle.pop3  # a fixture: fetchmail itself, logging in to a recording POP3 server


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


SENDER = ("[sender]\ntype = SimpleSMTPTLSSender\nserver = smtp.example.org\nusername = u\n"
          "password = p\naddress = a@example.org\n")


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


# ------------------------------------------------------------ route matching


@pytest.mark.parametrize("pattern,sender", [
    ('"alice@example.org', "alic@example.org"),
    ('"alice@example.org', '"alic"@example.org'),
])
def test_a_local_part_is_unquoted_only_when_a_quote_stands_at_both_ends(pattern, sender):
    """R03: a global direct: mapping keeps an address that is no pattern
    (a warning says it matches only a sender spelled exactly so): one
    quote at its start is no quoted string, and cutting its first and last
    character made `"alice` match the sender alic."""
    assert not matches(pattern, sender)
    assert matches('"alice"@example.org', "alice@example.org")  # (a quoted one is unquoted)


@pytest.mark.parametrize("pattern,sender", [
    ("*@kelvin.example", "x@\u212aelvin.example"),
    ("x@kelvin.example", "x@\u212aelvin.example"),
    ("*@example.org", "x@\uff45xample.org"),
])
def test_a_domain_idna_2008_refuses_is_never_mapped_onto_another(pattern, sender):
    """R04: IDNA 2008 without mappings (docs in _address._domain): a
    sender's domain with U+212A KELVIN SIGN or a full-width letter is not
    the ASCII domain it looks like; UTS 46's mapping made it one, and a
    route for kelvin.example served a look-alike sender."""
    assert not matches(pattern, sender)
    assert matches("*@b\u00fccher.example", "x@xn--bcher-kva.example")  # (A- and U-label alike)


# ------------------------------------------------------------ a lookup's bounds


def lookup(files: dict[str, bytes], conf: str, asked: list | None = None,
           modes: dict[str, int] | None = None):
    """run_plan on these files as a reader child reads them (alice's, mode
    0600 unless `modes` says), the answer after its trip through
    to_wire/from_wire."""
    def read(paths):
        if asked is not None:
            asked.extend(paths)
        return [FileRead(p, "ok", "", (modes or {}).get(p, 0o100600), ALICE.uid,
                         len(files[p]), files[p])
                if p in files else FileRead(p, "missing") for p in paths]
    return from_wire(to_wire(run_plan(parse_config(conf, "sendooway.conf"), ALICE, read)), ALICE)


def test_a_mapping_path_of_max_path_characters_is_read_and_one_more_is_skipped():
    """R09: a path of MAX_PATH (4096) characters, Linux's PATH_MAX, is read;
    one of 4097 is skipped with an error naming it."""
    at_limit = "/home/alice/" + "d/" * ((MAX_PATH - 12) // 2)
    assert len(at_limit) == MAX_PATH
    over = at_limit + "x"
    asked: list[str] = []
    found = lookup({}, f"smarthostMapping = fetchmail:{at_limit}\n"
                       f"smarthostMapping = getmail:{over}\n", asked)
    assert asked == [at_limit]
    assert found.errors == [f"{over[:200]}...: skipped: path longer than {MAX_PATH}"]


def test_an_account_with_more_addresses_than_a_route_carries_keeps_the_first_ones():
    """R11: a getmail file listing 1001 addresses: the lookup still answers
    (the daemon refuses an answer with more patterns an account), with the
    first MAX_ADDRESSES of them and an error saying the rest are ignored."""
    addresses = "".join(f"  a{i}@example.org\n" for i in range(MAX_ADDRESSES + 1))
    rc = SENDER.replace("address = a@example.org\n", "address =\n" + addresses)
    found = lookup({"/home/alice/.getmail/getmailrc": rc.encode()},
                   "smarthostMapping = getmail:%h/.getmail/getmailrc\n")
    (account,) = found.accounts
    assert account.addresses == tuple(f"a{i}@example.org" for i in range(MAX_ADDRESSES))
    assert found.errors == [f"{G}:7: more than {MAX_ADDRESSES} addresses: the rest are ignored"]


CERT = ("-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2Fm\nZQ==\n"
        "-----END CERTIFICATE-----\n")
INC = "/home/alice/.sendoowayrc"
OWN_CA = "/home/alice/ca.pem"
USER_CA_FILES = {INC: b"sslCA = ca.pem\nsmarthostMapping = direct:* own.example.org 587 u pw tls\n"}


def test_a_users_own_ca_file_others_may_change_is_warned_about():
    """R16: a user's sslCA with certificates in it vouches for the servers
    their passwords go to: writable by group or others, anyone could add
    a CA for a server of their own; the lookup warns, as for the file
    naming the route."""
    files = dict(USER_CA_FILES, **{OWN_CA: CERT.encode()})
    found = lookup(files, "userInclude = %h/.sendoowayrc\n", modes={OWN_CA: 0o100666})
    assert found.ca_pem == CERT
    assert found.warnings == [f"{OWN_CA}: unsafe mode 0666: writable by group or others"]
    assert not lookup(files, "userInclude = %h/.sendoowayrc\n").warnings


def test_only_the_certificate_lines_of_a_users_ca_file_travel():
    """R19: what goes with a route is the certificates alone, their lines
    without trailing blanks or CRs (a file saved on Windows, or by an
    editor keeping blanks): the octets a route carries are bounded, and
    the remark and the blanks are no part of a certificate."""
    dos = "# my CA\r\n" + CERT.replace("\n", " \t \r\n") + "trailing remark\n"
    found = lookup(dict(USER_CA_FILES, **{OWN_CA: dos.encode()}), "userInclude = %h/.sendoowayrc\n")
    assert found.errors == [] and found.ca_pem == CERT
    assert found.route_for("x@example.org").route.ca_pem == CERT


def test_one_mapping_more_than_reported_ends_the_list_with_a_count():
    """R21: --check shows at most MAX_MAPPINGS mapping lines, then one row
    saying how many more: with one more than that, the last real one gives
    way to "and 1 more mappings" (a list of 1001 real rows went through
    whole, and one of 1002 was cut to 1000 and the count)."""
    conf = "".join(f"smarthostMapping = fetchmail:%h/rc{i}\n" for i in range(MAX_MAPPINGS + 1))
    found = lookup({}, conf)
    assert len(found.mappings) == MAX_MAPPINGS + 1
    assert found.mappings[-2] == ("sendooway.conf:1000", "fetchmail:/home/alice/rc999")
    assert found.mappings[-1] == ("...", "and 1 more mappings")


# ------------------------------------------------------------ the backoff's shared store


def test_a_full_shared_store_makes_room_by_removing_counts_past_their_window(tmp_path):
    """P08: the socketpair mode's store is bounded in files; once full, a
    count that has faded (its file older than the window, by the wall
    clock its files are stamped with) is removed to make room, whatever
    clock the caller's `now` is on (the daemon's is monotonic: measured
    against it, no file ever looked old, and a store filled once by
    made-up names counted no new guesser for as long as it lived)."""
    store = SharedPenalty.open(str(tmp_path / "penalty"), max_keys=4, window=900.0)
    now = time.monotonic()
    for i in range(4):
        store.failure(f"ghost{i}", "", now, account=False)
    store.failure("guesser", "", now, account=False)
    assert store.count("guesser", "", now) == 0  # full: a new made-up name is not kept
    old = time.time() - 1000
    for name in os.listdir(store.directory):
        if name != SharedPenalty.TURNS:
            os.utime(os.path.join(store.directory, name), (old, old))
    store.failure("guesser", "", now, account=False)
    assert store.count("guesser", "", now) == 1


def test_a_full_shared_store_still_raises_the_counts_it_holds(tmp_path):
    """P09: a full store refuses new files for made-up names and addresses,
    but a count already in it goes on rising: a guesser who filled the
    store (or found it full) must not freeze his own address's backoff
    at what it was."""
    store = SharedPenalty.open(str(tmp_path / "penalty"), max_keys=2, window=900.0)
    now = time.monotonic()
    for i in range(5):
        store.failure(f"ghost{i}", "192.0.2.7", now, account=False)
    assert store.client_failures("192.0.2.7", now) == 5
    assert store.count("ghost4", "", now) == 0  # (its own file was refused: the store is full)


def test_a_turn_whose_file_was_removed_under_the_lock_is_taken_again_on_the_new_file(
        tmp_path, monkeypatch):
    """P11: a holder removes its file, then lets go; one who opened the
    old file meanwhile and locks it holds a lock no one else sees. It
    must notice (the path names another file now, or none) and take the
    file at the path, so that a third login waits its turn (without the
    check, two logins for one key were decided side by side, each reading
    the same count: the socketpair mode's backoff undone)."""
    directory = str(tmp_path)
    held_a = KeyLocks(directory).try_take(["u:alice"])
    assert held_a is not None
    real_flock = fcntl.flock
    first = [True]

    def flock(fd, op):
        if first[0]:  # the holder lets go between our open() and our flock()
            first[0] = False
            KeyLocks.release(held_a)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    held_b = KeyLocks(directory).try_take(["u:alice"])
    assert held_b is not None and not first[0]
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert KeyLocks(directory).try_take(["u:alice"]) is None  # the turn is b's
    KeyLocks.release(held_b)
    held_c = KeyLocks(directory).try_take(["u:alice"])
    assert held_c is not None
    KeyLocks.release(held_c)


@pytest.mark.parametrize("counted,asked", [
    ("stra\u00dfe", "STRASSE"),
    ("\u03c3\u03bf\u03c6\u03bf\u03c2", "\u03a3\u039f\u03a6\u039f\u03a3"),  # (a final sigma)
])
def test_a_users_backoff_key_is_the_name_case_folded_not_only_lower_cased(counted, asked):
    """P13: the user's key is the name case-folded (_penalty.user_key):
    LDAP's caseIgnoreMatch folds case as Unicode's case folding does
    (RFC 4518: ß is ss, a final sigma a sigma), so "STRASSE" is the
    account "straße" to it; lower() left them two counts, and a guesser
    alternating the spellings met half the backoff."""
    penalty = Penalty()
    penalty.failure(counted, "", 100.0)
    penalty.failure(asked, "", 101.0)
    assert penalty.count(counted, "", 102.0) == penalty.count(asked, "", 102.0) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a directory another user owns")
def test_a_penalty_store_owned_by_another_user_is_refused(tmp_path):
    """P15: the shared store must be root's own private directory: one
    that another user owns (mode 0700 or not) is theirs to empty or fill,
    and with it the backoff of every socketpair-mode session."""
    theirs = tmp_path / "penalty"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PermissionError):
        SharedPenalty.open(str(theirs))
    os.chown(theirs, os.geteuid(), os.getegid())
    assert SharedPenalty.open(str(theirs)).directory == str(theirs)


def test_a_turn_file_that_is_a_symbolic_link_is_never_followed(tmp_path):
    """P16: the turns are files root opens with O_CREAT in its private
    directory; a symbolic link found there (planted, or left by a bug) is
    an error of the store, never a file root creates or locks elsewhere."""
    turns = tmp_path / "turns"
    turns.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    os.symlink(target, key_path(str(turns), "u:alice"))
    with pytest.raises(OSError):
        KeyLocks(str(turns)).try_take(["u:alice"])
    assert not target.exists()


# ------------------------------------------------------------ shared/log.py


def test_each_log_line_is_stamped_with_its_own_second():
    """L06: the formatter formats the date once a second, not once a
    process: a line written a second, or an hour, after another carries
    its own time (a daemon's lines all showed the time of its first)."""
    formatter = _Formatter("%(asctime)s %(message)s")
    start = 1_800_000_000
    for created in (start, start + 0.5, start + 1, start + 3600, start + 3600.9):
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "m", (), None)
        record.created = created
        stamp = time.strftime(DATEFMT, time.localtime(int(created)))
        assert formatter.format(record) == f"{stamp} m"


def test_lines_a_log_lost_are_told_once_at_exit_not_again_by_each_forked_child(tmp_path):
    """L07: the note of lines lost since the last one is said at exit by
    the process that set up the log, not also by every child forked
    after (the authenticator's fork server and workers): one "1 line(s)
    lost" each would have multiplied a loss into many."""
    script = textwrap.dedent(f"""
        import logging, os, sys
        from sendooway_shared.log import setup_logging
        log = setup_logging({str(tmp_path / "log")!r}, "prog")
        logging.getLogger().handlers[0].stream.close()  # every write fails from now on
        log.warning("first")   # noted at once
        log.warning("second")  # lost within the minute: told at exit
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                sys.exit(0)    # a child's normal exit runs the atexit handlers it inherited
            os.waitpid(pid, 0)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    notes = res.stderr.splitlines()
    where = str(tmp_path / "log")
    assert notes == [f"prog: cannot write the log to {where} (ValueError): 1 line(s) lost"] * 2


def test_a_memory_shortage_is_one_line_without_a_traceback(caplog):
    """L11: log_failure in an `except` block: a MemoryError (RLIMIT_AS,
    RLIMIT_DATA) is a shortage, said in one line, "out of memory", with no
    traceback (dozens of lines per session it ended); any other error is a
    bug and keeps its traceback."""
    log = logging.getLogger("sendooway-test-m18")
    with caplog.at_level(logging.ERROR, logger=log.name):
        try:
            raise MemoryError
        except MemoryError:
            log_failure(log, "session %s failed", "s1")
        try:
            raise KeyError("k")
        except KeyError:
            log_failure(log, "session %s failed", "s2")
    short, bug = caplog.records
    assert short.getMessage() == "session s1 failed: out of memory" and short.exc_info is None
    assert bug.getMessage() == "session s2 failed" and bug.exc_info[0] is KeyError


# ------------------------------------------------------------ --check


@pytest.mark.skipif(os.geteuid() != 0, reason="--check reads alice's files as alice")
def test_check_shows_control_characters_from_a_users_file_escaped(tmp_config, clean_homes, tmp_path):
    """C03, C06: --check prints paths and messages to the admin's terminal:
    each line escaped (_logfmt.text), so a home whose name holds
    `<ESC>[2J<CR>result 9 usable accounts` neither clears the screen nor
    forges a line of the report. (This review first put those bytes into
    alice's sslCA line; since test_review_confdiff a control character
    inside a line of a ~/.sendoowayrc is refused at its line, as the
    original refused it, and the users' parsers refuse them in names and
    addresses: what is left is a home that NSS names, here through a
    passwd file of this test's own.)"""
    world = clean_homes
    alice = world.users["alice"]
    # (beside the world's homes, which alice can reach; no colon: passwd's separator)
    home = os.path.join(os.path.dirname(alice.home), "c03\x1b[2J\rresult 9 usable accounts")
    os.makedirs(home, exist_ok=True)
    try:
        os.chown(home, alice.uid, alice.gid)
        rc = os.path.join(home, ".sendoowayrc")
        with open(rc, "w") as f:
            f.write("sslCA = ca.pem\n")
        os.chown(rc, alice.uid, alice.gid)
        os.chmod(rc, 0o600)
        passwd = tmp_path / "passwd"
        with open(world.passwd) as f:
            passwd.write_text("".join(
                f"alice:x:{alice.uid}:{alice.gid}:alice:{home}:/bin/sh\n"
                if line.startswith("alice:") else line for line in f))
        os.chmod(passwd, 0o644)
        env = world.env()
        env["NSS_WRAPPER_PASSWD"] = str(passwd)
        conf = tmp_config("userInclude = %h/.sendoowayrc\n")
        res = subprocess.run([sys.executable, "-m", "sendooway_auth.cli", "-c", conf, "--check",
                              "alice"], capture_output=True, timeout=30, env=env)
        out = res.stdout.decode()
        assert "c03\\x1b[2J\\x0dresult 9 usable accounts" in out, out  # it is alice's home
        assert b"\x1b" not in res.stdout and b"\r" not in res.stdout, out
        # C06: a file that was not read has no owner to name
        assert f"  {home}/ca.pem [sslCA]: missing".replace("\x1b", "\\x1b").replace(
            "\r", "\\x0d") in out.splitlines(), out
        assert out.splitlines()[-1] == "result: no usable mapping"
    finally:
        shutil.rmtree(home)


@pytest.mark.skipif(os.geteuid() != 0, reason="--check reads alice's files as alice")
def test_check_of_a_user_who_is_no_valid_user_finds_no_usable_mapping(tmp_config, clean_homes):
    """C08: sendooway-auth(8): --check exits 1 when the user is not a
    valid user (the daemon refuses that login, so no route of theirs is
    ever asked for), whatever accounts the files give; the last line says
    why and that those accounts go unused."""
    conf = tmp_config("validUser = bob\n"
                      "smarthostMapping = direct:* smtp.example.org 587 u Pw-c08 tls\n")
    res = subprocess.run([sys.executable, "-m", "sendooway_auth.cli", "-c", conf, "--check",
                          "alice"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1] == ("result: no usable mapping: alice is not a valid user,"
                                           " so none of the 1 account(s) above is used")
