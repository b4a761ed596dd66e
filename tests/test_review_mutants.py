"""Tests written from a mutation-testing review: each pins down behaviour
that a small change to the security-critical code (the authenticator's
permit table and protocol checks, route matching, the backoff, the session
core's DATA handling, the relay's "never 250 unless the upstream said 250")
left unnoticed by the rest of the suite. Each test names what it guards."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import types

import pytest

from sendooway_auth._accounts import Account, choose
from sendooway_auth._address import check_pattern, matches
from sendooway_auth._connection import Connection
from sendooway_auth._files import FileRead
from sendooway_auth._penalty import Penalty, SharedPenalty
from sendooway_auth._service import AuthResult
from sendooway_auth._users import UserInfo
from sendooway_auth.routes import MAX_ACCOUNTS, from_wire, run_plan, to_wire
from sendooway_front import _catalogue as R
from sendooway_front._events import (
    NEED_DATA, PAUSED, AuthRefused, AuthRequested, ConnectionClosed, DataChunk, DataFinished,
    DataRequested, MailRequested, RcptRequested,
)
from sendooway_front._pool import UpstreamPool
from sendooway_front._relay import Relay
from sendooway_front._relay_api import MailParams
from sendooway_front._reply import Reply
from sendooway_front._session import Session, SessionSettings, State
from sendooway_shared.config import parse_config
from sendooway_shared.protocol import (
    MAX_ADDRESS, MAX_PASSWORD, MAX_USER, REPLIES, REQUESTS, VERSION, AsyncChannel, AuthFail, AuthOk,
    AuthRequest, Error, FrameDecoder, Hello, ProtocolError, RouteOk, RouteRequest, encode, from_map,
    to_map,
)
from sendooway_shared.types import Route, Secret, TlsMode

from .auth_helpers import raw_frame
from .front_harness import LOGIN_ALICE, Harness, codes, plain, unchecked_chunk
from .scripted_relay import LOGIN as SCRIPTED_LOGIN, Upstream as ScriptedUpstream, careful, converse
from .scripted_relay import codes as scripted_codes
from .upstream import capture_log, config as upstream_config, info as upstream_info, run

TXN = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"

ALICE = UserInfo("alice", 1000, 1000, "/home/alice", (1000,))
ROUTE = Route("smtp.example.org", 587, TlsMode.STARTTLS, user="a", password=Secret("Up-pw-93"),
              source="/home/alice/.sendoowayrc:1")


# ------------------------------------------------------------ the authenticator's connection


class ScriptedService:
    """Stands in for AuthService: answers logins and routes from lists."""

    def __init__(self, logins: list[AuthResult], routes: list[tuple[Route | None, bool]],
                 max_failures: int = 3) -> None:
        self.cfg = types.SimpleNamespace(maxAuthFailures=max_failures)
        self.logins = list(logins)
        self.routes = list(routes)
        self.asked: list[str] = []

    async def authenticate(self, user, password, peer):
        self.asked.append(f"auth {user}")
        return self.logins.pop(0)

    async def route(self, user, sender, peer):
        self.asked.append(f"route {user.name} {sender}")
        return self.routes.pop(0)


OK = AuthResult(True, ALICE)
WRONG = AuthResult(False, None, "wrong-password")
DOWN = AuthResult(False, None, "pam-unavailable", temporary=True)


async def _serve(service: ScriptedService, talk) -> tuple[list, BaseException | None]:
    """Run one Connection over a socketpair; `talk(channel, sock)` is the
    frontend's side. Returns (what talk returned, the exception run() raised)."""
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    conn = Connection(service, reader, writer, "test")
    task = asyncio.ensure_future(conn.run())
    creader, cwriter = await asyncio.open_connection(sock=b)
    channel = AsyncChannel(creader, cwriter, REPLIES)
    try:
        result = await asyncio.wait_for(talk(channel, creader), 5)
    finally:
        cwriter.close()
    try:
        await asyncio.wait_for(task, 5)
        raised = None
    except Exception as exc:  # noqa: BLE001 - what the daemon would log as an internal error
        raised = exc
    return result, raised


async def _eof_within(reader: asyncio.StreamReader, seconds: float = 10.0) -> bool:
    """The authenticator closed the connection (nothing more came). Returns
    at the EOF; the bound is only for an authenticator that never closes
    (1 s was once too short on a loaded machine)."""
    try:
        data = await asyncio.wait_for(reader.read(65536), seconds)
    except (TimeoutError, asyncio.TimeoutError):
        return False
    except ConnectionError:  # (our last write met the closed socket)
        return True
    return data == b""


async def _send_regardless(ch, msg) -> None:
    """Send as a frontend that goes on whatever it was told (the
    authenticator may have closed already)."""
    try:
        await ch.send(msg)
    except ConnectionError:
        pass


def _run(service, talk):
    return asyncio.run(_serve(service, talk))


def test_a_temporary_route_failure_closes_the_connection_at_once():
    """Temporary route failure: one error, then the connection is closed
    (no further route is answered on it, and nothing breaks inside)."""
    service = ScriptedService([OK], [(None, True), (ROUTE, False)])

    async def talk(ch, reader):
        await ch.request(Hello(VERSION, "s", "192.0.2.7"))
        assert isinstance(await ch.request(AuthRequest("alice", Secret("pw"))), AuthOk)
        reply = await ch.request(RouteRequest("alice@example.org"))
        await _send_regardless(ch, RouteRequest("alice@example.org"))
        return reply, await _eof_within(reader)

    (reply, closed), raised = _run(service, talk)
    assert isinstance(reply, Error) and reply.reason.startswith("temporary failure")
    assert closed
    assert raised is None
    assert service.asked == ["auth alice", "route alice alice@example.org"]


def test_an_unavailable_backend_closes_the_connection_and_no_second_password_is_tried():
    """auth_unavailable closes: the frontend cannot keep trying passwords
    on a connection whose backend said it cannot decide."""
    service = ScriptedService([DOWN, OK], [])

    async def talk(ch, reader):
        await ch.request(Hello(VERSION, "s", "192.0.2.7"))
        reply = await ch.request(AuthRequest("alice", Secret("pw")))
        await _send_regardless(ch, AuthRequest("alice", Secret("pw")))
        return reply, await _eof_within(reader)

    (reply, closed), raised = _run(service, talk)
    assert isinstance(reply, Error) and "temporary failure" in reply.reason
    assert closed and raised is None
    assert service.asked == ["auth alice"]


def test_the_last_allowed_failure_closes_the_connection():
    service = ScriptedService([WRONG, WRONG, OK], [], max_failures=2)

    async def talk(ch, reader):
        await ch.request(Hello(VERSION, "s", "192.0.2.7"))
        first = await ch.request(AuthRequest("alice", Secret("x")))
        second = await ch.request(AuthRequest("alice", Secret("y")))
        await _send_regardless(ch, AuthRequest("alice", Secret("pw")))
        return first, second, await _eof_within(reader)

    (first, second, closed), raised = _run(service, talk)
    assert isinstance(first, AuthFail) and isinstance(second, AuthFail)
    assert closed and raised is None
    assert service.asked == ["auth alice", "auth alice"]


def test_a_refusal_reason_cannot_close_the_quoted_log_field(caplog):
    """The log's reason="..." must stay one field: a message type chosen by
    the peer (quoted into the reason) has its double quotes replaced."""
    service = ScriptedService([], [])

    async def talk(ch, reader):
        ch.writer.write(raw_frame({"type": 'x" user=root ok="'}))
        return await ch.receive()

    with caplog.at_level(logging.WARNING, logger="sendooway-auth"):
        reply, raised = _run(service, talk)
    assert isinstance(reply, Error) and raised is None
    [line] = [r.getMessage() for r in caplog.records if "connection closed" in r.getMessage()]
    reason = line.split('reason="', 1)[1]
    assert reason.endswith('"') and '"' not in reason[:-1], line


# ------------------------------------------------------------ who may send as which address


def _account(pattern: str, server: str, tier: int = 1) -> Account:
    return Account((pattern,), Route(server, 587, TlsMode.STARTTLS, source=f"{server}:1"), tier)


def test_among_equally_specific_patterns_the_first_mapping_wins():
    """_accounts.choose: "among equally specific ones the first in order"
    (the order of the files, as the original took the first match)."""
    accounts = [_account("*@example.org", "first.test"), _account("*@example.org", "second.test"),
                _account("alice@example.org", "third.test"), _account("alice@example.org", "fourth.test")]
    assert choose(accounts, "bob@example.org").route.server == "first.test"
    assert choose(accounts, "alice@example.org").route.server == "third.test"
    own = [_account("*", "own-a.test", tier=0), _account("*", "own-b.test", tier=0)]
    assert choose(own + accounts, "alice@example.org").route.server == "own-a.test"


def test_the_domain_is_what_follows_the_last_at_sign():
    """A quoted local part may hold an "@": the domain, which `*@domain`
    compares, is what follows the last one (RFC 5321 4.1.2)."""
    sender = '"a@b.test"@example.org'
    assert matches("*@example.org", sender)
    assert not matches("*@b.test", sender)
    assert matches('"a@b.test"@example.org', sender)


@pytest.mark.parametrize("blank", ["\u00a0", "\u2028", "\u3000", "\x85"])
def test_an_address_pattern_with_unicode_white_space_is_refused(blank):
    """check_pattern refuses any white space (str.isspace()), not only the
    ASCII kind: a no-break space in a pattern is a typo no sender matches."""
    with pytest.raises(ValueError, match="white space"):
        check_pattern(f"alice{blank}@example.org")


# ------------------------------------------------------------ the session core (sans-IO)


def _drive(session: Session, data: bytes, answers: dict) -> list:
    """Feed `data`; answer each event whose type is in `answers` with that
    Reply (relay_reply) and log in alice. Returns the events seen."""
    seen = []
    session.receive_data(data)
    while (ev := session.next_event()) not in (NEED_DATA, PAUSED):
        seen.append(ev)
        if isinstance(ev, AuthRequested):
            session.auth_result(ev.user)
        elif type(ev) in answers:
            session.relay_reply(answers[type(ev)])
        if isinstance(ev, ConnectionClosed):
            break
    return seen


def test_a_2xx_answer_to_data_does_not_start_reading_a_message():
    """Only a 3xx answer to DATA makes what follows message data: after a
    (nonsense) 250 the client's next line is a command again, never
    swallowed into a message nobody will deliver."""
    s = Session(SessionSettings("mx.test"))
    s.start()
    answers = {MailRequested: R.OK, RcptRequested: R.OK, DataRequested: R.OK}
    _drive(s, LOGIN_ALICE + TXN, answers)
    assert s.state is not State.DATA
    s.data_to_send()
    events = _drive(s, b"RSET\r\n", answers)
    assert codes(s.data_to_send()) == [250]
    assert not any(isinstance(ev, (DataChunk, DataFinished)) for ev in events)
    assert s.state is State.AUTHENTICATED


def test_plain_authzid_naming_someone_else_is_refused_without_asking_the_authenticator():
    """AUTH PLAIN with an authorization identity other than the login name:
    535 and counted, and the password never goes to the authenticator."""
    h = Harness()
    out = h.feed(b"EHLO c.test\r\nAUTH PLAIN "
                 + base64.b64encode(b"bob\0alice\0alice-secret") + b"\r\n")
    assert codes(out) == [250, 535]
    assert h.auth_seen == [] and h.session.user is None
    refused = [ev for ev in h.events if isinstance(ev, AuthRefused)]
    assert [(ev.user, ev.reason) for ev in refused] == [("alice", "authorization identity not allowed")]
    # the same identity twice is no other identity
    out = h.feed(b"AUTH PLAIN " + base64.b64encode(b"alice\0alice\0alice-secret") + b"\r\n")
    assert codes(out) == [235]


def test_messages_the_upstream_refuses_count_as_junk_until_the_session_ends():
    """A refused message (DATA end answered 5xx) moves nothing forward: past
    max_junk of them each one earns an error point, and at max_errors the
    session closes (421). An accepted message clears the count."""
    settings = SessionSettings("mx.test", max_junk=2, max_errors=3)
    refuse = Reply(554, ("5.7.1 Refused by the upstream",))
    s = Session(settings)
    s.start()
    answers = {MailRequested: R.OK, RcptRequested: R.OK, DataRequested: R.START_DATA,
               DataFinished: refuse}
    _drive(s, LOGIN_ALICE, answers)
    replies = []
    for _ in range(8):
        if s.closed:
            break
        _drive(s, TXN + b"x\r\n.\r\n", answers)
        replies.append(codes(s.data_to_send()))
    assert s.closed, replies
    assert replies[-1][-1] == 421
    # the same number of messages, accepted: the session goes on
    s = Session(settings)
    s.start()
    _drive(s, LOGIN_ALICE, {**answers, DataFinished: R.OK})
    for _ in range(8):
        _drive(s, TXN + b"x\r\n.\r\n", {**answers, DataFinished: R.OK})
    assert not s.closed and 421 not in codes(s.data_to_send())


# ------------------------------------------------------------ the user's files


def _lookup(files: dict[str, bytes], owner: int = ALICE.uid, mode: int = 0o100600,
            conf: str = "userInclude = %h/.sendoowayrc\n"):
    """run_plan on these files (as a reader child would read them), the
    answer after its trip through to_wire/from_wire as the daemon sees it."""
    def read(paths):
        return [FileRead(p, "ok", "", mode, owner, len(files[p]), files[p])
                if p in files else FileRead(p, "missing") for p in paths]
    found = run_plan(parse_config(conf, "sendooway.conf"), ALICE, read)
    return from_wire(to_wire(found), ALICE)


FETCHMAILRC = (b'poll pop.example.org proto pop3 user "alice" password "fm-Secret-A1"\n'
               b'#sendooway:server "smtp.example.org"\n#sendooway:address "alice@example.org"\n')


def test_a_password_file_owned_by_someone_else_is_named_in_a_warning():
    found = _lookup({"/home/alice/.fetchmailrc": FETCHMAILRC}, owner=4242)
    assert [a.route.server for a in found.accounts] == ["smtp.example.org"]
    assert "/home/alice/.fetchmailrc: owned by uid 4242, not by alice" in found.warnings
    assert not _lookup({"/home/alice/.fetchmailrc": FETCHMAILRC}).warnings


def test_a_password_file_readable_by_the_group_is_named_in_a_warning():
    found = _lookup({"/home/alice/.fetchmailrc": FETCHMAILRC}, mode=0o100640)
    assert any(w.startswith("/home/alice/.fetchmailrc: unsafe mode 0640: holds passwords")
               for w in found.warnings), found.warnings


def test_more_accounts_than_the_limit_keep_the_first_ones_and_the_lookup_works():
    """Past MAX_ACCOUNTS the rest is dropped with an error, and the answer
    still crosses from the reader child (one more would be refused there,
    every message of the user a temporary failure)."""
    text = b"".join(
        b'poll pop.example.org proto pop3 user "alice" password "fm-Secret-A1"\n'
        b'#sendooway:server "smtp%d.example.org"\n#sendooway:address "a%d@example.org"\n' % (i, i)
        for i in range(MAX_ACCOUNTS + 1))
    found = _lookup({"/home/alice/.fetchmailrc": text})
    assert len(found.accounts) == MAX_ACCOUNTS
    assert found.accounts[-1].route.server == f"smtp{MAX_ACCOUNTS - 1}.example.org"
    assert f"more than {MAX_ACCOUNTS} accounts: the rest are ignored" in found.errors
    assert found.route_for(f"a{MAX_ACCOUNTS}@example.org") is None


# ------------------------------------------------------------ the backoff


def test_failure_counts_fade_once_the_window_has_passed():
    pen = Penalty(base=1.0, cap=64.0, window=60)
    pen.failure("alice", "192.0.2.1", 0)
    pen.failure("alice", "192.0.2.1", 1)
    assert pen.count("alice", "192.0.2.1", 61) == 2     # 60 s after the last: still counted
    assert pen.count("alice", "192.0.2.1", 61.5) == 0   # then gone
    assert pen.failure("alice", "192.0.2.1", 100) == 1.0  # a first failure again
    assert pen.hold("alice", "192.0.2.1", 300) == 0.0


@pytest.mark.parametrize("user,password,asked", [
    ("alice", "p" * 1024, True),
    ("alice", "p" * 1025, False),     # more than the wire protocol carries
    ("u" * 256, "pw", True),
    ("u" * 257, "pw", False),
])
def test_credentials_longer_than_the_wire_allows_are_refused_here(user, password, asked):
    """What could never pass the wire protocol (password 1024, user 256
    characters at most) is a failed login here (535, counted), never a
    request the frontend could not even encode."""
    h = Harness()
    out = h.feed(b"EHLO c.test\r\nAUTH PLAIN " + plain(user, password).encode() + b"\r\n")
    assert codes(out) == [250, 535]
    assert h.auth_seen == ([(user, password)] if asked else [])
    if not asked:
        assert [ev.reason for ev in h.events if isinstance(ev, AuthRefused)] == [
            "password too long" if len(password) > 1024 else "user name too long"]


@pytest.mark.parametrize("line", ["MA\u0131L FROM:<alice@example.org>", "R\u017fET", "QU\u0131T"])
def test_a_verb_with_a_non_ascii_letter_is_unknown(line):
    """Verbs compare in ASCII: str.upper() makes the dotless i "I" and the
    long s "S", so "MA\u0131L" was taken for MAIL."""
    h = Harness()
    h.feed(LOGIN_ALICE)
    out = h.feed(line.encode() + b"\r\n")
    assert codes(out) == [502]
    assert not h.closed and not any(isinstance(ev, MailRequested) for ev in h.events)


def test_a_success_takes_only_that_users_own_failures_off_the_address():
    """A right password clears the user's count and takes the user's own
    failures (a mistyped password, twice) off the address's count; the
    other names guessed from that address still count."""
    pen = Penalty(base=1.0, cap=64.0, window=600)
    pen.failure("alice", "192.0.2.1", 0)
    pen.failure("alice", "192.0.2.1", 1)
    pen.failure("bob", "192.0.2.1", 2)
    assert pen.count("carol", "192.0.2.1", 3) == 3
    pen.success("alice", "192.0.2.1", now=4)
    assert pen.count("alice", "", 5) == 0
    assert pen.count("carol", "192.0.2.1", 5) == 1
    assert pen.failure("carol", "192.0.2.1", 6) == 2.0  # the address's one failure before it


def test_guesses_from_many_addresses_never_push_an_accounts_count_out():
    """Only user names go to the table of real accounts: the addresses a
    guesser uses (free to change, as made-up names are) fill the other
    table, so alice's count survives a thousand addresses guessing carol."""
    pen = Penalty(max_keys=10, window=10_000)
    pen.failure("alice", "192.0.2.1", 0)
    for i in range(1000):
        pen.failure("carol", f"10.0.{i // 250}.{i % 250}", 1 + i)
    assert pen.count("alice", "", 2000) == 1
    assert pen.count("carol", "", 2000) == 1000


# ------------------------------------------------------------ the relay: never 250 unless the upstream said it


@pytest.mark.parametrize("data,chunk", [
    (b"abc\rdefg\r\nmore", 4),   # a bare CR that ends one chunk, the next not starting with LF
    (b"line\r\nabc\r", 65536),   # a message that ends in a lone CR
    (b"line\r\nabc\r", 1),
])
def test_a_bare_cr_at_a_chunk_border_never_reaches_the_upstream(monkeypatch, data, chunk):
    """The one check of the message bytes (the session core's, since the
    relay's second scan went) sees a CR that ends a chunk and is not
    followed by LF, also at the very end: nothing is handed out past it,
    the message is aborted, and the client hears 550 after the end."""
    from sendooway_front import _session

    monkeypatch.setattr(_session, "DATA_CHUNK", chunk)
    h = Harness()
    h.feed(LOGIN_ALICE + b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
    out = h.feed(data + b"\r\n.\r\n")
    chunks = [ev.data for ev in h.events if isinstance(ev, DataChunk)]
    assert not any(map(unchecked_chunk, chunks))
    assert h.messages == [] and h.aborted == 1
    assert codes(out)[-1] == 550


def test_one_reply_too_many_to_the_final_dot_is_never_passed_on_as_250(monkeypatch):
    """An upstream that answers the final dot twice: which reply was the
    dot's is not known, so the client gets 451, never the 250."""
    async def data(up, c):
        await c.send(b"354 go ahead\r\n")
        up.messages.append(await c.message())
        await c.send(b"250 2.0.0 queued\r\n250 2.0.0 queued again\r\n")

    steps = [SCRIPTED_LOGIN, TXN, b"hello\r\n.\r\n", b"QUIT\r\n"]
    out, up, log = converse(monkeypatch, lambda up, c: careful(up, c, data=data), steps)
    got = scripted_codes(out)
    assert got[:6] == [220, 250, 235, 250, 250, 354], out
    assert got[6] == 451, out
    assert "sent more than its replies to the end of the message" in log


def test_a_success_keeps_the_age_of_the_addresss_remaining_failures():
    """What a success leaves of an address's count fades as it would have:
    from the address's last failure, not from the success."""
    pen = Penalty(base=1.0, cap=64.0, window=60)
    pen.failure("bob", "192.0.2.1", 0)
    pen.failure("alice", "192.0.2.1", 1)
    pen.success("alice", "192.0.2.1", now=50)
    assert pen.count("carol", "192.0.2.1", 55) == 1
    assert pen.count("carol", "192.0.2.1", 62) == 0


@pytest.mark.parametrize("stored", [b"-1\n", b"3600\n", b"1e9\n", b"nan\n"])
def test_a_shared_pam_refusal_figure_out_of_range_is_not_used(tmp_path, stored):
    """The shared store's PAM refusal time pads every unknown name's
    refusal: a figure outside 0..3600 s (a corrupt file) is ignored, never
    an hour's wait (or a negative one) for each such login."""
    pen = SharedPenalty.open(str(tmp_path / "p"))
    pen.note_pam_refusal(0.25)
    assert pen.pam_refusal() == 0.25
    with open(tmp_path / "p" / SharedPenalty._PAM_FILE, "wb") as f:
        f.write(stored)
    assert pen.pam_refusal() is None


_NO_PIPELINING, _PIPELINING = b"250 up.test\r\n", b"250-up.test\r\n250 PIPELINING\r\n"
_MAIL = b"MAIL FROM:<alice@example.org>\r\n"


@pytest.mark.parametrize("ehlo,steps,expected", [
    (_NO_PIPELINING, [_MAIL, b"RCPT TO:<bob@example.net>\r\n"], [250, 451]),
    # two RCPTs pipelined behind an answered MAIL: which reply was whose is unknown
    (_PIPELINING, [_MAIL, b"RCPT TO:<carol@example.net>\r\nRCPT TO:<bob@example.net>\r\n"],
     [250, 451, 451]),
    # MAIL and RCPT in one group upstream: the MAIL's 250 is not passed on either
    (_PIPELINING, [_MAIL + b"RCPT TO:<bob@example.net>\r\n"], [451, 451]),
])
def test_one_reply_too_many_to_a_rcpt_is_never_passed_on_as_250(monkeypatch, ehlo, steps, expected):
    """An upstream that answers a RCPT (bob's) twice: every later reply
    would be read one step late, so the connection is left and the
    commands whose replies may be misread are answered 451, whatever the
    upstream said."""
    def answer(line):
        return b"250 2.1.5 ok\r\n250 2.1.5 ok again\r\n" if line.startswith(b"RCPT TO:<bob@") else None

    out, up, log = converse(monkeypatch, lambda up, c: careful(up, c, ehlo=ehlo, answer=answer),
                            [SCRIPTED_LOGIN, *steps, b"QUIT\r\n"])
    assert scripted_codes(out)[:3 + len(expected)] == [220, 250, 235, *expected], out
    assert "sent more than its replies to " in log


def test_no_rcpt_goes_upstream_behind_a_refused_mail(monkeypatch):
    """RCPTs the client pipelined behind a MAIL the upstream refused are
    answered here (503) and never sent: a careless upstream could take
    them into a transaction of its own."""
    def answer(line):
        return b"550 5.7.1 not you\r\n" if line.startswith(b"MAIL") else None

    out, up, log = converse(monkeypatch, lambda up, c: careful(up, c, ehlo=_NO_PIPELINING,
                                                               answer=answer),
                            [SCRIPTED_LOGIN, _MAIL + b"RCPT TO:<bob@example.net>\r\n", b"QUIT\r\n"])
    assert scripted_codes(out)[:5] == [220, 250, 235, 550, 503], out
    assert not any(line.startswith(b"RCPT") for line in up.lines), up.lines


# ------------------------------------------------------------ the wire protocol's checks


@pytest.mark.parametrize("cls,key,limit", [
    (AuthRequest, "user", MAX_USER), (AuthRequest, "password", MAX_PASSWORD),
    (RouteRequest, "sender", MAX_ADDRESS), (Hello, "session", 64), (Hello, "client", 128),
])
def test_a_string_field_is_taken_up_to_its_limit_and_refused_one_past_it(cls, key, limit):
    base = {"type": cls.TYPE, **{f: "x" for f in ("user", "password", "sender", "session",
                                                   "client") if f in cls.__dataclass_fields__}}
    if cls is Hello:
        base["version"] = VERSION
    assert from_map({**base, key: "y" * limit}, REQUESTS)
    with pytest.raises(ProtocolError, match=f"{cls.TYPE}.{key}: longer than {limit}"):
        from_map({**base, key: "y" * (limit + 1)}, REQUESTS)


@pytest.mark.parametrize("value", [0, 1])
def test_a_boolean_field_takes_no_integer(value):
    """route_ok's cert_check and auth are booleans: 0 or 1 where one
    belongs (a frontend of another build, a bug) is a protocol error, not
    quietly "no certificate check"."""
    good = to_map(RouteOk.from_route(ROUTE))
    for key in ("cert_check", "auth"):
        with pytest.raises(ProtocolError, match=f"route_ok.{key}: expected a boolean"):
            from_map({**good, key: value}, REPLIES)
    assert from_map(good, REPLIES) == RouteOk.from_route(ROUTE)


async def _early_250_then_reset(up, c):
    """An upstream that says 250 before the message's end, then resets."""
    await c.send(b"354 go ahead\r\n")
    await c.line()
    await c.send(b"250 2.0.0 ok\r\n")
    await asyncio.sleep(0.1)
    c.w.transport.abort()  # (unread data: the kernel answers with a reset)
    return False


async def _early_250_then_reads_on(up, c):
    """An upstream that says 250 soon after its 354, then takes the message."""
    await c.send(b"354 go ahead\r\n")
    await asyncio.sleep(0.1)
    await c.send(b"250 2.0.0 ok\r\n")
    up.messages.append(await c.message())
    await c.send(b"250 2.0.0 queued\r\n")


@pytest.mark.parametrize("script,body", [
    (_early_250_then_reset, b"first line\r\n" + (b"y" * 98 + b"\r\n") * 40000),
    (_early_250_then_reads_on, b"first line\r\n"),
])
def test_a_250_before_the_end_of_the_message_is_never_the_answer(monkeypatch, script, body):
    """A 2xx the upstream sends during the message answers nothing the
    client asked: whether the write then fails (the upstream reset) or the
    message reaches its end, the client gets a 451, never that 250."""
    steps = [SCRIPTED_LOGIN, TXN, body, b"last line\r\n.\r\n", b"QUIT\r\n"]
    # (no PIPELINING upstream: DATA goes on its own, when the client sends it)
    out, up, log = converse(monkeypatch, lambda up, c: careful(up, c, ehlo=b"250 up.test\r\n",
                                                               data=script), steps)
    got = scripted_codes(out)
    assert got[:6] == [220, 250, 235, 250, 250, 354], out
    assert got[6] == 451, out


def test_every_frame_encode_makes_is_one_the_decoder_takes():
    """encode() refuses what the other side's decoder would refuse: around
    MAX_FRAME, a route_ok either does not encode or decodes as it was."""
    refused = taken = 0
    for extra in range(1500, 1900):
        reply = RouteOk("s" * 255, 587, "starttls", True, "/" + "c" * 4095, "u" * 1024,
                        Secret("p" * 1024), True, "x" * extra, "m" * 8192)
        try:
            frame = encode(reply)
        except ProtocolError as exc:
            assert "exceeds" in str(exc)
            refused += 1
            continue
        taken += 1
        assert FrameDecoder(REPLIES).feed(frame) == [reply]
    assert refused and taken


@pytest.mark.parametrize("key,value,error", [
    ("port", 0, "outside 1..65535"), ("port", 65536, "outside 1..65535"),
    ("server", "", "route_ok.server: empty"), ("tls", "ssl", "unknown mode"),
])
def test_a_route_ok_that_names_no_usable_server_is_a_protocol_error(key, value, error):
    good = to_map(RouteOk.from_route(ROUTE))
    with pytest.raises(ProtocolError, match=error):
        from_map({**good, key: value}, REPLIES)


def _rset_refused_on_the_first_connection(ehlo: bytes):
    """A scripted upstream whose first connection refuses RSET (500), and
    which refuses MAIL from refused@...; each EHLO is one connection."""
    async def script(up, c):
        first = not any(line[:4].upper() == b"EHLO" for line in up.lines)

        def answer(line):
            if line.startswith(b"RSET") and first:
                return b"500 5.5.1 no RSET here\r\n"
            return b"550 5.7.1 not you\r\n" if line.startswith(b"MAIL FROM:<refused@") else None

        await careful(up, c, ehlo=ehlo, answer=answer)
    return script


@pytest.mark.parametrize("ehlo", [b"250-up.test\r\n250 PIPELINING\r\n", b"250 up.test\r\n"])
@pytest.mark.parametrize("before", [
    b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nRSET\r\n",  # the client's RSET
    b"MAIL FROM:<refused@example.org>\r\n",          # the RSET that follows a refused MAIL
])
def test_a_connection_whose_rset_was_refused_is_not_used_again(monkeypatch, ehlo, before):
    """An upstream that refuses RSET may keep the last transaction's sender
    or recipients: the next MAIL goes over a new connection."""
    steps = [SCRIPTED_LOGIN, before, b"MAIL FROM:<alice@example.org>\r\n", b"QUIT\r\n"]
    out, up, log = converse(monkeypatch, _rset_refused_on_the_first_connection(ehlo), steps)
    assert scripted_codes(out)[-2:] == [250, 221], out
    ehlos = [i for i, line in enumerate(up.lines) if line[:4].upper() == b"EHLO"]
    assert len(ehlos) == 2, up.lines
    second = ehlos[1]
    assert up.lines[second + 1].startswith(b"MAIL FROM:<alice@example.org>"), up.lines


def test_a_connection_whose_closing_rset_was_refused_is_not_kept_in_the_cache():
    """At the end of a session with a transaction open the relay sends
    RSET; refused, the connection is QUIT, never kept for the next session."""
    async def go():
        up = await ScriptedUpstream(_rset_refused_on_the_first_connection(b"250 up.test\r\n")).start()
        log, _ = capture_log()
        pool = UpstreamPool(30, log)
        relay = Relay(upstream_config(smarthostCache=30), log, pool)
        route = Route("127.0.0.1", up.port, TlsMode.PLAIN, auth=False, source="review.conf:3")
        try:
            assert (await relay.mail(upstream_info(), route, "alice@example.org", MailParams())).code == 250
            assert (await relay.rcpt("bob@example.net")).code == 250
            await relay.close()
            idle = pool.idle_count()
            await pool.close_all()
            await asyncio.sleep(0.1)
        finally:
            up.server.close()
        return idle, up.lines

    idle, lines = run(go())
    assert idle == 0
    assert [line[:4] for line in lines][-2:] == [b"RSET", b"QUIT"], lines


@pytest.mark.parametrize("user", ["evil\r\nBcc: all@example.org", "a b(c)", "alice\u2028x"])
def test_the_received_header_shows_a_strange_user_name_as_one_harmless_word(user):
    """The account name goes into the Received: header the upstream gets:
    whatever NSS or LDAP calls an account, it can add no header line, no
    comment and no white space there."""
    header = Relay(upstream_config(), capture_log()[0]).received_header(upstream_info(user=user))
    lines = header.decode("ascii").split("\r\n")
    assert len(lines) == 4 and lines[-1] == "" and not lines[0].startswith("Bcc")
    shown = lines[2].split("(authenticated user ", 1)[1].split(")", 1)[0]
    assert all(c.isalnum() or c in "._@+-?" for c in shown), shown


# ------------------------------------------------------------ Secret


def test_a_secret_is_never_pickled_and_holds_only_text():
    """A Secret never lands by accident in a pickle (a cache file, a
    multiprocessing queue), on its own or inside a Route; and it wraps only
    a str, so a password is never bytes shown by a repr elsewhere."""
    import pickle

    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(Secret("Up-pw-93"))
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(ROUTE)
    with pytest.raises(TypeError):
        Secret(b"Up-pw-93")
    assert "Up-pw-93" not in repr(ROUTE) and "Up-pw-93" not in ROUTE.describe()


def test_a_file_without_a_password_gets_no_unsafe_mode_warning():
    """An empty Secret is false: a world-readable ~/.fetchmailrc whose
    account holds no password (noAuth) is no leak and gets no warning."""
    text = (b'poll pop.example.org proto pop3 user "alice"\n'
            b'#sendooway:server "smtp.example.org"\n#sendooway:noAuth\n'
            b'#sendooway:address "alice@example.org"\n')
    found = _lookup({"/home/alice/.fetchmailrc": text}, mode=0o100644)
    [account] = found.accounts
    assert not account.route.password and not account.route.auth
    assert found.warnings == []
    assert not Secret("") and Secret("x")
