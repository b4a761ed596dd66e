"""Tests written from a mutation-testing review of the frontend's SMTP
session core (sendooway_front/_session.py: the command table, line limits,
AUTH, STARTTLS, error and junk points) and of its authenticator link
(sendooway_front/_authlink.py). Each pins down behaviour that a small change
to that code left unnoticed by the rest of the suite, and names what it
guards. The DATA handling was reviewed before (test_review_mutants.py)."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from sendooway_front._authlink import AuthLinkError, SocketConnector
from sendooway_front._events import (
    FLUSH, NEED_DATA, AuthRefused, AuthRequested, DataRequested, Greeted, MailRequested, RcptRequested, StartTls,
)
from sendooway_front._reply import Reply
from sendooway_front._session import LocalProtocolError, Session, SessionSettings, State
from sendooway_shared.protocol import (
    REQUESTS, VERSION, AuthFail, AuthOk, AuthRequest, FrameDecoder, Hello, NoRoute, RouteRequest, Welcome,
    encode,
)
from sendooway_shared.types import Secret

from .fakeworld import become
from .front_harness import LOGIN_ALICE, Harness, codes, plain

MAIL = b"MAIL FROM:<alice@example.org>\r\n"
RCPT = b"RCPT TO:<bob@example.net>\r\n"


def first_lines(replies: bytes) -> list[str]:
    """The last line of each reply (code and text), as the client reads it."""
    return [line.decode() for line in replies.split(b"\r\n")
            if len(line) >= 4 and line[3:4] == b" "]


# ------------------------------------------------------------ the command table

_PREFIX = {
    State.CONNECTED: b"",
    State.GREETED: b"EHLO client.test\r\n",
    State.AUTHENTICATED: LOGIN_ALICE,
    State.MAIL: LOGIN_ALICE + MAIL,
    State.RCPT: LOGIN_ALICE + MAIL + RCPT,
}
_C, _G, _A, _M, _R = _PREFIX
_OK = "250 2.0.0 OK"
_TLS_LATE = "503 5.5.1 STARTTLS not permitted after AUTH or MAIL"
_NEED_MAIL = "503 5.5.1 Need MAIL before RCPT"
_NEED_MAIL_DATA = "503 5.5.1 Need MAIL before DATA"
_IN_TXN = "503 5.5.1 AUTH not permitted during a mail transaction"
_NESTED = "503 5.5.1 Nested MAIL command"

# (command, state before) -> (the reply's last line, the state after): written
# out from RFC 5321/4954/3207 and DESIGN.md, not from the session's own table
_TABLE = {
    b"EHLO client.test": {s: ("250 HELP", _G if s in (_C, _G) else _A) for s in _PREFIX},
    b"HELO client.test": {s: ("250 mx.test Hello client.test", _G if s in (_C, _G) else _A)
                          for s in _PREFIX},
    b"STARTTLS": {_C: ("220 2.0.0 Ready to start TLS", _C), _G: ("220 2.0.0 Ready to start TLS", _C),
                  _A: (_TLS_LATE, _A), _M: (_TLS_LATE, _M), _R: (_TLS_LATE, _R)},
    b"AUTH PLAIN " + plain("alice", "alice-secret").encode(): {
        _C: ("235 2.7.0 Authentication successful", _A),
        _G: ("235 2.7.0 Authentication successful", _A),
        _A: ("503 5.5.1 Already authenticated", _A), _M: (_IN_TXN, _M), _R: (_IN_TXN, _R)},
    MAIL[:-2]: {_C: ("530 5.7.0 Authentication required", _C),
                _G: ("530 5.7.0 Authentication required", _G),
                _A: ("250 2.1.0 Sender OK", _M), _M: (_NESTED, _M), _R: (_NESTED, _R)},
    RCPT[:-2]: {_C: (_NEED_MAIL, _C), _G: (_NEED_MAIL, _G), _A: (_NEED_MAIL, _A),
                _M: ("250 2.1.5 Recipient OK", _R), _R: ("250 2.1.5 Recipient OK", _R)},
    b"DATA": {_C: (_NEED_MAIL_DATA, _C), _G: (_NEED_MAIL_DATA, _G), _A: (_NEED_MAIL_DATA, _A),
              _M: ("554 5.5.1 No valid recipients", _M),
              _R: ("354 End data with <CR><LF>.<CR><LF>", State.DATA)},
    b"RSET": {_C: (_OK, _C), _G: (_OK, _G), _A: (_OK, _A), _M: (_OK, _A), _R: (_OK, _A)},
    b"NOOP": {s: (_OK, s) for s in _PREFIX},
    b"HELP": {s: ("214 2.0.0 Commands: EHLO HELO AUTH STARTTLS MAIL RCPT DATA RSET NOOP QUIT"
                  " VRFY HELP", s) for s in _PREFIX},
    b"VRFY bob": {s: ("252 2.5.0 Cannot VRFY user, but will try to deliver the message", s)
                  for s in _PREFIX},
    b"EXPN list": {s: ("502 5.5.1 EXPN not available", s) for s in _PREFIX},
    b"QUIT": {s: ("221 2.0.0 Bye", State.CLOSED) for s in _PREFIX},
}


_REQUESTS = (AuthRequested, MailRequested, RcptRequested, DataRequested, StartTls)
_ASKING = {b"AUTH", b"MAIL", b"RCPT", b"DATA", b"STARTTLS"}


@pytest.mark.parametrize("command, before", [(c, s) for c in _TABLE for s in _PREFIX],
                         ids=lambda v: v.value if isinstance(v, State) else v[:8].decode())
def test_every_command_in_every_state_gets_its_reply_and_next_state(command, before):
    """The command table as a client sees it: each verb in each state gets
    the reply (code, enhanced code, text) and leads to the state the RFCs
    want, and a refused one asks nobody. Guards against a swapped cell: EHLO
    that logs out or keeps a transaction, AUTH or MAIL inside a
    transaction, a RCPT out of order sent to the relay (its 250 would be
    turned into 503, but the upstream would see it), RSET that keeps a
    transaction or greets."""
    h = Harness()
    h.feed(_PREFIX[before])
    assert h.session.state is before
    reply, after = _TABLE[command][before]
    asked = len(h.events)
    out = h.feed(command + b"\r\n")
    assert first_lines(out) == [reply], out
    assert h.session.state is after
    # a refused command asks nobody (authenticator, relay, TLS layer)
    requests = [e for e in h.events[asked:] if isinstance(e, _REQUESTS)]
    assert bool(requests) is (reply[0] in "23" and command.split()[0] in _ASKING), requests
    if after is _A:
        assert h.session.user == "alice"
    if after in (_C, _G):
        assert h.session.user is None


def test_ehlo_and_helo_are_handed_to_the_driver():
    """EHLO and HELO each make a Greeted event with the name and the kind
    (the driver logs it); STARTTLS forgets the EHLO and the session is back
    at its start (RFC 3207 4.2)."""
    h = Harness()
    h.feed(b"EHLO one.test\r\nHELO two.test\r\nSTARTTLS\r\n")
    assert [(e.name, e.esmtp) for e in h.events if isinstance(e, Greeted)] == [
        ("one.test", True), ("two.test", False)]
    assert h.session.state is State.CONNECTED and h.session.encrypted


def test_after_tls_and_after_login_ehlo_offers_neither_starttls_nor_auth_again():
    """RFC 3207 4.2: no STARTTLS in the EHLO reply once TLS is on; RFC 4954
    4: no second AUTH once logged in, so AUTH is not offered then."""
    h = Harness()
    assert "250-STARTTLS" in h.feed(b"EHLO c\r\n").decode()
    h.feed(b"STARTTLS\r\n")
    out = h.feed(b"EHLO c\r\n").decode()
    assert "STARTTLS" not in out and "250-AUTH PLAIN LOGIN" in out
    h.feed(b"AUTH PLAIN " + plain("alice", "alice-secret").encode() + b"\r\n")
    out = h.feed(b"EHLO c\r\n").decode()
    assert codes(out.encode()) == [250] and "AUTH" not in out


def test_plaintext_fed_after_starttls_is_a_driver_bug():
    """Bytes that came in clear behind STARTTLS must never be read as if
    they came over TLS (CVE-2011-0411): a driver that feeds any before
    reporting the handshake is stopped with LocalProtocolError."""
    s = Session(SessionSettings("h", tls_available=True))
    s.start()
    s.receive_data(b"STARTTLS\r\n")
    assert isinstance(s.next_event(), StartTls)
    s.receive_data(b"AUTH PLAIN " + plain("alice", "x").encode() + b"\r\n")
    with pytest.raises(LocalProtocolError):
        s.tls_started()


# ------------------------------------------------------------ error and junk points

@pytest.mark.parametrize("prefix, line, code, settings", [
    (b"", MAIL, 530, {}),                                       # MAIL before AUTH
    (b"EHLO c\r\n", RCPT, 503, {}),                             # RCPT before MAIL
    (b"", b"AUTH PLAIN\r\n", 538, {"require_encryption": True}),
    (b"", b"NOOP\0\r\n", 500, {}),
    (b"", b"AUTH CRAM-MD5\r\n", 504, {}),
    (b"", b"VRFY\r\n", 501, {}),
    (LOGIN_ALICE, b"MAIL FROM:<a@b.c> FOO=bar\r\n", 555, {}),
    (LOGIN_ALICE, b"MAIL FROM:<alice>\r\n", 553, {}),
])
def test_each_syntax_or_sequence_refusal_earns_an_error_point(prefix, line, code, settings):
    """Every 5yz refusal for the client's own mistake counts towards
    max_errors, whatever its code: a client cannot loop on one kind of
    mistake for ever."""
    h = Harness(settings=SessionSettings("mx.test", tls_available=True, max_errors=2, **settings))
    h.feed(prefix)
    assert codes(h.feed(line * 2 + b"NOOP\r\n")) == [code, code, 421]
    assert h.closed.reason == "too many errors"


def test_a_starttls_that_succeeds_is_junk_too():
    """STARTTLS moves no message forward: it counts towards max_junk like
    EHLO and NOOP."""
    h = Harness(settings=SessionSettings("mx.test", tls_available=True, max_junk=2, max_errors=1))
    out = h.feed(b"EHLO c\r\n") + h.feed(b"STARTTLS\r\n") + h.feed(b"EHLO c\r\n")
    assert codes(out) == [250, 220, 250, 421] and h.session.encrypted


def test_a_mail_refused_here_for_its_size_is_junk():
    """A MAIL refused without an error point (552: the declared size is over
    the limit) still moves nothing forward: past max_junk each one costs a
    point."""
    h = Harness(settings=SessionSettings("mx.test", size_limit=1000, max_junk=3, max_errors=1))
    h.feed(LOGIN_ALICE)  # (its EHLO is the first junk)
    assert codes(h.feed(b"MAIL FROM:<a@b.c> SIZE=1001\r\n" * 3)) == [552, 552, 552, 421]


def test_rcpts_behind_a_refused_mail_earn_no_points():
    """A pipelining client sends its RCPTs before it sees the MAIL refused
    (by the relay, or here for its syntax): each gets 503 without an error
    point, not only the first."""
    settings = SessionSettings("mx.test", max_errors=2)
    h = Harness(settings=settings, refuse_mail={"alice@example.org"})
    h.feed(LOGIN_ALICE)
    out = h.feed(MAIL + RCPT * 3 + b"NOOP\r\n", bytewise=True)
    assert codes(out) == [550, 503, 503, 503, 250]
    h = Harness(settings=settings)
    h.feed(LOGIN_ALICE)
    assert codes(h.feed(b"MAIL FROM:<alice>\r\n" + RCPT * 3 + b"NOOP\r\n")) == [553, 503, 503, 503, 250]


_RCPTS_1000 = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(1000))


def test_a_transaction_takes_1000_rcpt_commands_and_then_each_costs_a_point():
    """MAX_RCPT_COMMANDS (1000) RCPTs in one transaction cost nothing,
    refused or not; the next one owes an error point."""
    h = Harness(settings=SessionSettings("mx.test", max_errors=1))
    h.feed(LOGIN_ALICE + MAIL)
    c = codes(h.feed(_RCPTS_1000 + b"NOOP\r\n"))
    assert c.count(250) == 101 and c.count(452) == 900 and not h.closed
    assert codes(h.feed(RCPT + b"NOOP\r\n")) == [452, 421]


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_mail_that_succeeds_starts_the_rcpt_count_again_pipelined_or_not(bytewise):
    """RCPTs behind a refused MAIL count towards the 1000 (a loop of them is
    cut off), but a MAIL that succeeds starts a new count, which includes
    the RCPTs pipelined behind that MAIL and nothing before it: the replies
    are the same whether the client pipelines or not. (The RCPTs taken with
    the MAIL were counted before its answer, still in the old count: two
    RCPTs after 1000 behind a refused MAIL owed two points when pipelined.)"""
    h = Harness(settings=SessionSettings("mx.test", max_errors=2), refuse_mail={"x@example.org"})
    h.feed(LOGIN_ALICE + b"MAIL FROM:<x@example.org>\r\n" + _RCPTS_1000)
    out = h.feed(MAIL + RCPT * 2 + b"NOOP\r\n", bytewise=bytewise)
    assert codes(out) == [250, 250, 250, 250] and not h.closed


def test_rset_frees_the_recipient_count_for_rcpts_pipelined_behind_the_next_mail():
    """After RSET the recipient cap counts from zero again: a RCPT pipelined
    behind the next MAIL is taken with it (one group upstream)."""
    h = Harness(settings=SessionSettings("mx.test", max_recipients=2))
    assert codes(h.feed(LOGIN_ALICE + MAIL + b"RCPT TO:<a@x.y>\r\nRCPT TO:<b@x.y>\r\nRSET\r\n"))[-3:] \
        == [250, 250, 250]
    h.session.receive_data(MAIL + b"RCPT TO:<c@x.y>\r\n")
    assert isinstance(h.session.next_event(), MailRequested)
    taken = h.session.pipelined_rcpt()
    assert taken is not None and taken.recipient == "c@x.y"


# ------------------------------------------------------------ line limits

def _b64_line(length: int) -> bytes:
    """A line of `length` octets, CRLF included, of base64 characters that
    do not decode (not a multiple of 4): taken, it gets 501 5.5.2."""
    assert (length - 2) % 4
    return b"Q" * (length - 2) + b"\r\n"


@pytest.mark.parametrize("start", [b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n"])
def test_an_auth_continuation_is_taken_up_to_2048_octets(start):
    """An AUTH continuation line may hold 2048 octets with its CRLF (a 1024
    octet password and a 256 octet user name in base64); one more is
    refused as too long (500 5.5.6), not decoded."""
    h = Harness()
    h.feed(b"EHLO c\r\n")
    out = h.feed(start + _b64_line(2049))
    assert first_lines(out)[-1].startswith("500 5.5.6 "), out
    out = h.feed(start + _b64_line(2048))
    assert first_lines(out)[-1].startswith("501 5.5.2 "), out


def test_an_auth_initial_response_is_taken_up_to_2048_octets_past_the_verb():
    """AUTH with an initial response may be as long as "AUTH PLAIN " and a
    continuation line; one octet more is refused as too long (RFC 4954 6's
    5.5.6, as for a continuation line)."""
    h = Harness()
    taken = b"AUTH PLAIN " + _b64_line(2048)
    assert first_lines(h.feed(taken))[0].startswith("501 5.5.2 ")
    assert first_lines(h.feed(b"AUTH PLAIN Q" + _b64_line(2048)))[0].startswith("500 5.5.6 ")


@pytest.mark.parametrize("verb", [b"MAIL", b"mail"])
def test_a_mail_line_has_room_for_size_body_and_auth_parameters(verb):
    """MAIL may exceed 512 octets by its parameters (SIZE, BODY and a
    500-octet RFC 4954 AUTH=, in any case of the verb): 1088 octets are
    taken, one more is refused (500) and nothing is asked of the relay."""
    head = verb + b" FROM:<alice@example.org> SIZE=1 BODY=8BITMIME AUTH="
    for length, code in ((1088, 250), (1089, 500)):
        h = Harness()
        h.feed(LOGIN_ALICE)
        line = head + b"a" * (length - len(head) - 2) + b"\r\n"
        assert len(line) == length
        assert codes(h.feed(line)) == [code]
        assert any(isinstance(e, MailRequested) for e in h.events) is (code == 250)


def test_a_line_starting_with_auth_but_no_auth_command_has_the_command_limit():
    """Only "AUTH " lines get the longer limit of an initial response."""
    assert codes(Harness().feed(b"AUTHX" + b"a" * 600 + b"\r\nNOOP\r\n")) == [500, 250]


def test_replies_wait_for_the_client_once_64_kib_are_held():
    """A client that pipelines commands and never reads the replies cannot
    make the session hold them without bound: past 64 KiB the session asks
    the driver to send (FLUSH) before it reads another command."""
    s = Session(SessionSettings("h", max_junk=10**6))
    s.start()
    s.receive_data(b"HELP\r\n" * 2000)
    while (ev := s.next_event()) is not FLUSH:
        assert ev is not NEED_DATA and not s.closed, "all input read, no FLUSH"
    held = len(s.data_to_send())
    assert 64 * 1024 <= held < 64 * 1024 + 200
    assert s.has_buffered_input


# ------------------------------------------------------------ AUTH

def test_a_cancelled_exchange_says_so():
    """"*" cancels an AUTH exchange at any step: 501 5.7.0 Authentication
    cancelled (RFC 4954 4), not a base64 error; nothing is asked."""
    h = Harness()
    out = h.feed(b"EHLO c\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN\r\n*\r\nAUTH LOGIN\r\n"
                 + base64.b64encode(b"alice") + b"\r\n*\r\n")
    cancel = "501 5.7.0 Authentication cancelled"
    assert first_lines(out) == ["250 HELP", "334 ", cancel, "334 VXNlcm5hbWU6", cancel,
                                "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", cancel]
    assert h.auth_seen == []


@pytest.mark.parametrize("response", [
    plain("alice", "alice-secret") + "!",                  # a character outside base64
    plain("alice", "alice-secret")[:8] + " " + plain("alice", "alice-secret")[8:],
])
def test_base64_is_decoded_strictly(response):
    """A response with characters outside the base64 alphabet is refused
    (501 5.5.2), never decoded by skipping them."""
    h = Harness()
    out = h.feed(b"EHLO c\r\nAUTH PLAIN\r\n" + response.encode() + b"\r\n")
    assert first_lines(out)[-1].startswith("501 5.5.2 Cannot decode"), out
    assert h.auth_seen == []


def test_with_a_broken_certificate_a_response_outside_base64_is_still_501():
    """tls_broken (no login without TLS, 538): an initial response with
    characters outside the base64 alphabet still gets its 501, checked as
    strictly as any other response."""
    h = Harness(settings=SessionSettings("h", tls_broken=True))
    assert codes(h.feed(b"AUTH PLAIN abcd[]\r\nAUTH PLAIN abcd\r\n")) == [501, 538]


def test_an_initial_response_may_follow_more_than_one_space():
    """`AUTH PLAIN  <response>` (two spaces) is the same login."""
    h = Harness()
    assert codes(h.feed(b"AUTH PLAIN  " + plain("alice", "alice-secret").encode() + b"\r\n")) == [235]


def test_a_plain_message_with_a_third_nul_is_malformed():
    """RFC 4616: authzid NUL authcid NUL passwd, nothing more; a fourth
    field is a malformed message (501), not a crash nor a login."""
    h = Harness()
    out = h.feed(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0alice-secret\0x") + b"\r\nNOOP\r\n")
    assert first_lines(out)[0].startswith("501 5.5.2 Malformed PLAIN") and codes(out)[1] == 250
    assert h.auth_seen == []


def test_a_broken_line_inside_an_auth_exchange_is_a_base64_error():
    """Inside an AUTH exchange a line with a bare LF or a NUL is a response
    that cannot be decoded: 501 5.5.2, and the exchange is over."""
    h = Harness()
    out = h.feed(b"EHLO c\r\nAUTH PLAIN\r\nQUFB\n" + b"AUTH LOGIN\r\nQU\0FB\r\nNOOP\r\n")
    assert codes(out) == [250, 334, 501, 334, 501, 250]
    assert [line[:9] for line in first_lines(out)][2] == "501 5.5.2"


@pytest.mark.parametrize("mech, steps, why", [
    ("PLAIN", [b"\0\0pw"], "empty user name"),
    ("PLAIN", [b"\0alice\0"], "empty password"),
    ("LOGIN", [b"al\0ice", b"pw"], "NUL in the credentials"),
    ("PLAIN", [b"\0alice\0caf\xe9"], "credentials not UTF-8"),
    ("PLAIN", [b"\0al\xefce\0pw"], "credentials not UTF-8"),
])
def test_credentials_that_can_never_pass_are_refused_here_and_counted(mech, steps, why):
    """Empty, NUL-holding or non-UTF-8 credentials never reach the
    authenticator: 535 as for a wrong password, the reason in the log
    (AuthRefused), and counted: the third closes the session with 421, even
    where a stricter junk limit would close it sooner for another reason."""
    h = Harness(settings=SessionSettings("mx.test", max_junk=0, max_errors=1))
    # (the first step as an initial response: the login is refused in the
    # AUTH command itself, where a refusal here could count as junk)
    script = f"AUTH {mech} ".encode() + b"".join(base64.b64encode(s) + b"\r\n" for s in steps)
    out = h.feed(script * 3)
    challenges = [334] * (len(steps) - 1)
    assert codes(out) == challenges + [535] + challenges + [535] + challenges + [421], out
    assert h.auth_seen == []
    assert [e.reason for e in h.events if isinstance(e, AuthRefused)] == [why] * 3
    assert h.closed.reason == "too many authentication failures"


# ------------------------------------------------------------ MAIL / RCPT / DATA arguments

@pytest.mark.parametrize("settings, params, code", [
    ({"advertise_8bitmime": False}, b"BODY=8BITMIME", 555),   # not offered: not taken
    ({"advertise_8bitmime": False}, b"BODY=7BIT", 250),
    ({}, b"SMTPUTF8=yes", 555),                               # SMTPUTF8 has no value
    ({}, b"AUTH", 555),                                       # AUTH= needs one
    ({"size_limit": 1000}, b"SIZE=1000", 250),
    ({"size_limit": 1000}, b"SIZE=1001", 552),
])
def test_mail_parameters_are_taken_only_as_offered(settings, params, code):
    """MAIL parameters: BODY=8BITMIME only when 8BITMIME is offered,
    SMTPUTF8 without a value, AUTH= with one, SIZE up to the limit itself."""
    h = Harness(settings=SessionSettings("mx.test", **settings))
    h.feed(LOGIN_ALICE)
    assert codes(h.feed(b"MAIL FROM:<alice@example.org> " + params + b"\r\n")) == [code]


def test_data_with_an_argument_is_refused_where_data_would_start():
    """DATA takes no argument (RFC 5321 4.1.1.4): 501 even with recipients,
    and the relay is not asked to start a message."""
    h = Harness()
    h.feed(LOGIN_ALICE + MAIL + RCPT)
    out = h.feed(b"DATA now\r\n")
    assert first_lines(out) == ["501 5.5.4 Syntax error: no arguments allowed"]
    assert not any(isinstance(e, DataRequested) for e in h.events)
    assert h.session.state is State.RCPT


def test_trailing_spaces_after_a_command_are_no_argument():
    """Spaces after the verb are no argument: RSET and QUIT with a trailing
    space are taken, VRFY with only spaces still needs one."""
    h = Harness()
    assert codes(h.feed(LOGIN_ALICE + MAIL + b"RSET  \r\nVRFY  \r\nQUIT \r\n")) == [
        250, 235, 250, 250, 501, 221]


def _awaiting_mail(tail: bytes) -> Session:
    """A session that asked the relay for MAIL, `tail` received behind it."""
    s = Session(SessionSettings("h"))
    s.start()
    s.receive_data(LOGIN_ALICE + MAIL + tail)
    while not isinstance(ev := s.next_event(), MailRequested):
        if isinstance(ev, AuthRequested):
            s.auth_result("alice")
    return s


def test_only_rcpt_lines_within_the_command_limit_go_with_a_mail():
    """RCPTs pipelined behind MAIL are taken only when they are RCPT lines
    no longer than 512 octets: a longer one is refused in its turn (500),
    and DATA with a path is no RCPT."""
    long_rcpt = b"RCPT TO:<a@x.y>" + b" " * 600 + b"\r\n"
    for tail in (long_rcpt, b"DATA TO:<a@x.y>\r\n"):
        s = _awaiting_mail(tail)
        assert s.pipelined_rcpt() is None
    h = Harness()
    assert codes(h.feed(LOGIN_ALICE + MAIL + long_rcpt)) == [250, 235, 250, 500]


def test_no_rcpt_is_taken_after_the_mail_it_followed_was_refused():
    """The relay refused the MAIL while RCPTs of its group were pending:
    no further RCPT is taken for the relay (it would go upstream behind a
    refused MAIL); they are answered 503 in turn."""
    s = _awaiting_mail(b"RCPT TO:<a@x.y>\r\nRCPT TO:<b@x.y>\r\n")
    assert s.pipelined_rcpt().recipient == "a@x.y"
    s.relay_reply(Reply(550, ("5.7.1 not you",)))
    assert s.pipelined_rcpt() is None
    s.relay_reply(Reply(250, ("2.1.5 ok",)))  # a careless upstream's word on a@x.y
    while s.next_event() is not NEED_DATA:
        pass
    assert codes(s.data_to_send())[-3:] == [550, 503, 503]


# ------------------------------------------------------------ the authenticator link

async def _serve(tmp_path, answers):
    """A scripted authenticator on a UNIX socket: each request read gets the
    next of `answers` — a Message, raw bytes, or (seconds, answer) to
    answer late. Returns (server, path, requests seen)."""
    seen = []

    async def handle(reader, writer):
        decoder, queue = FrameDecoder(REQUESTS), list(answers)
        while queue and (data := await reader.read(65536)):
            for msg in decoder.feed(data):
                seen.append(msg)
                answer = queue.pop(0)
                if isinstance(answer, tuple):
                    await asyncio.sleep(answer[0])
                    answer = answer[1]
                writer.write(answer if isinstance(answer, bytes) else encode(answer))
        await reader.read()
        writer.close()

    path = os.path.join(tmp_path, "auth.sock")
    return await asyncio.start_unix_server(handle, path), path, seen


def _with_link(tmp_path, answers, body, timeout=5.0, client="192.0.2.7"):
    """Open a link to a scripted authenticator and run `body(link)`."""
    async def main():
        server, path, seen = await _serve(tmp_path, answers)
        async with server:
            link = await SocketConnector(path, timeout).open("S1", client)
            try:
                return await body(link), seen
            finally:
                link.close()
    return asyncio.run(main())


def test_one_link_answers_a_login_and_then_routes(tmp_path):
    """The Welcome is read once, before the first answer: the next requests
    on the same link read their own answers; the account name is the one
    the authenticator answered, not the one the client typed."""
    async def body(link):
        return (await link.auth("ALICE", Secret("pw")), await link.route("alice@example.org"),
                await link.route("other@example.org"))

    result, seen = _with_link(tmp_path, [Welcome(VERSION), AuthOk("alice"), NoRoute(), NoRoute()],
                              body)
    assert result == ("alice", None, None)
    assert [type(m) for m in seen] == [Hello, AuthRequest, RouteRequest, RouteRequest]


def test_a_late_answer_is_never_taken_for_the_next_requests(tmp_path, monkeypatch):
    """An answer that comes after the timeout breaks the link: the next
    login is refused at once (AuthLinkError), never answered with the late
    AuthOk of the login before (a wrong password would pass). (A login's
    wait also allows for what the authenticator holds a refusal back, 25 s
    in all: made 0 here, so 0.5 s is late.)"""
    from sendooway_front import _authlink

    monkeypatch.setattr(_authlink, "MAX_REFUSAL_PAD", 0.0)
    monkeypatch.setattr(_authlink, "MAX_FAILURE_DELAY", 0.0)

    async def body(link):
        with pytest.raises(AuthLinkError, match="in time"):
            await link.auth("alice", Secret("right"))
        assert link.broken
        with pytest.raises(AuthLinkError):
            await link.auth("alice", Secret("wrong"))
        await asyncio.sleep(0.4)  # (the late answer has come by now)

    _with_link(tmp_path, [Welcome(VERSION), (0.5, AuthOk("alice")), AuthFail()], body, timeout=0.3)


@pytest.mark.parametrize("first, second", [
    ("auth", "auth"), ("route", "auth"),
])
def test_an_unexpected_answer_breaks_the_link(tmp_path, first, second):
    """A reply of the wrong type is an AuthLinkError and breaks the link:
    nothing more is asked on it, whatever the authenticator would answer
    (a route request answered AuthOk is no "no route", 550)."""
    async def body(link):
        call = link.auth("alice", Secret("pw")) if first == "auth" else link.route("a@example.org")
        with pytest.raises(AuthLinkError):
            await call
        assert link.broken
        with pytest.raises(AuthLinkError, match="already failed"):
            await link.auth("alice", Secret("wrong"))

    wrong = NoRoute() if first == "auth" else AuthOk("alice")
    _, seen = _with_link(tmp_path, [Welcome(VERSION), wrong, AuthOk("alice")], body)
    assert len(seen) == 2


def test_a_frame_that_breaks_the_protocol_breaks_the_link(tmp_path):
    """An answer that is not a valid frame is an AuthLinkError (never a
    ProtocolError escaping to the driver) and the link is broken."""
    async def body(link):
        with pytest.raises(AuthLinkError):
            await link.auth("alice", Secret("pw"))
        return link.broken

    broken, _ = _with_link(tmp_path, [Welcome(VERSION), b"\x00\x00\x00\x01\xc1"], body)
    assert broken is True


def test_the_hello_carries_at_most_what_the_wire_allows(tmp_path):
    """A long client description (a PROXY-protocol address, say) is cut to
    the 128 characters the hello may carry, the session id to 64: the link
    opens instead of failing to encode its first frame."""
    async def main():
        server, path, seen = await _serve(tmp_path, [Welcome(VERSION), AuthOk("alice")])
        async with server:
            link = await SocketConnector(path, 5).open("S" * 100, "c" * 300)
            assert await link.auth("alice", Secret("pw")) == "alice"
            link.close()
        return seen
    hello = asyncio.run(main())[0]
    assert (hello.session, hello.client) == ("S" * 64, "c" * 128)


# ------------------------------------------------------------ who listens at authSocket


def test_a_listener_of_another_user_is_refused_before_a_byte_is_sent(world):
    """SocketConnector.open and daemon_problem check SO_PEERCRED themselves,
    behind the socket-directory check that keeps a squatter from binding
    the name at all (test_review_authboundary): a listener running as a
    local user (carol, in a directory only she may write to, so only the
    peer check stands) is refused, and it receives nothing, no hello and
    no login; a uid the frontend was told to trust (`also`) is taken."""
    import shutil
    import socket
    import tempfile

    from sendooway_front._authlink import daemon_problem

    carol = world.users["carol"]
    base = tempfile.mkdtemp(prefix="sendooway-peer-")  # (pytest's tmp_path is root's alone)
    os.chmod(base, 0o755)
    home = os.path.join(base, "carol")
    os.mkdir(home, 0o700)
    os.chown(home, carol.uid, carol.gid)
    path = os.path.join(home, "auth.sock")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # carol's listener: reports what any connection sent it
        try:
            os.close(r)
            become(carol)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            s.listen(8)
            os.write(w, b"R")
            s.settimeout(10)
            got = b""
            for _ in range(3):  # daemon_problem's probe, open(), the `also` probe
                conn, _ = s.accept()
                conn.settimeout(1)
                try:
                    conn.sendall(encode(Welcome(VERSION)))  # play the authenticator
                    while chunk := conn.recv(4096):
                        got += chunk
                except OSError:
                    pass
                conn.close()
            os.write(w, b"got:" + got)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"R"
        assert f"runs as uid {carol.uid}, not root" in daemon_problem(path)
        with pytest.raises(AuthLinkError, match=f"refusing the authenticator at .*uid {carol.uid}"):
            asyncio.run(SocketConnector(path, 5).open("S1", "192.0.2.1"))
        assert daemon_problem(path, also=carol.uid) == ""
        report = b""
        while chunk := os.read(r, 65536):
            report += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
        shutil.rmtree(base, ignore_errors=True)
    assert report == b"got:", report
