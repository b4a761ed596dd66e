"""Tests written from a mutation-testing review of the relay's pipelined
groups (_relay.py: mail_group, _mail's group branch, _probe_and_mail,
_group_replies, _overtalked, _refused_behind_354, rcpts, data_start with
DATA's reply read with the group, and reset/_release after a group). Each
pins down behaviour that a small change to that code left unnoticed by the
rest of the suite; each names what it guards. The upstreams are
test_review_mutants10's scripted plain-text servers on loopback, the relay
the real Relay.

Left alive as equivalent: the probe sending group[-1] instead of group[0]
without PIPELINING (the group is MAIL alone then); mail_group's
RCPTs one by one instead of rcpts() when _mail gave one reply (rcpts falls
back to that then); a lone RCPT through rcpts' group path (the same bytes,
one reply); `claimed` without its `_in_tx` test (a RCPT is counted only
inside a transaction); `_data_reply = None` after a refusal
behind the group's 354 (the drop did it already); `_data_reply = None` in
reset (after it no transaction is open: rcpt and data_start answer 503
whatever it holds, the next MAIL clears it); data_start's second look
behind a 354 read with the group (the group's look left the reply buffer
empty, or the connection dropped)."""

from __future__ import annotations

import asyncio

import pytest

from sendooway_front._relay import NO_TRANSACTION
from sendooway_front._relay_api import MailParams
from sendooway_front._upstream import DROPPED

from .test_review_mutants10 import Up, _mail, _relay
from .upstream import info, run

BOB = "bob@example.net"


async def _group(relay, up: Up, recipients: list[str], data: bool, sender: str = "alice@example.org"):
    return await relay.mail_group(info(), up.route(), sender, MailParams(), recipients, data)


async def _deliver(relay, text: bytes = b"Subject: x\r\n\r\nhi"):
    """The client's DATA, its message and the end: (data_start's, data_end's)."""
    start = await relay.data_start()
    if start.code != 354:
        return start, None
    await relay.data_chunk(text)
    return start, await relay.data_end()


async def _done(relay, up: Up) -> None:
    await relay.close()
    await asyncio.sleep(0.1)
    up.server.close()


def _group_then(up: Up, recipients: list[str], data: bool, then):
    """On a new relay, a group (MAIL, RCPTs for `recipients`, maybe DATA),
    then `then(relay)`: the group's replies, what `then` returned, the
    upstream."""
    async def go():
        relay, _ = await _relay(up)
        replies = await _group(relay, up, recipients, data)
        after = await then(relay)
        await _done(relay, up)
        return replies, after, up

    return run(go())


def _after(lines: list[bytes], prefix: bytes) -> list[bytes]:
    """The verbs the upstream got after the last line starting with `prefix`."""
    last = max(i for i, line in enumerate(lines) if line.upper().startswith(prefix))
    return [line[:4].upper() for line in lines[last + 1:]]


# ------------------------------------------------------------------ the group itself

def test_a_surplus_reply_behind_a_group_answers_every_command_451():
    """g07, o02 (g05, g06): one reply too many to the group's last RCPT: which
    reply was whose is unknown, so MAIL and every RCPT get 451 4.5.0 (no
    250 reaches the client), the connection is left and the message has
    its log line."""
    async def go():
        up = Up(RCPT=[b"250 2.1.5 ok\r\n", b"250 2.1.5 ok\r\n250 2.1.5 surplus\r\n"])
        relay, handler = await _relay(up)
        replies = await _group(relay, up, ["a@example.net", "b@example.net"], False)
        gone = relay._client is None
        await _done(relay, up)
        return replies, gone, handler.text

    replies, gone, log = run(go())
    assert [r.code for r in replies] == [451, 451, 451], replies
    assert all(r.lines[0].startswith("4.5.0") for r in replies)
    assert gone
    assert "sent more than its replies to the group" in log
    assert "id=S1-1 route=127.0.0.1" in log and "upstream=not delivered (451)" in log


def test_rcpts_behind_a_mail_refused_on_a_reused_connection_are_never_250():
    """g13: the second transaction on one connection goes upstream as RSET,
    MAIL and RCPT in one group; its MAIL is refused. An upstream that says
    250 to the RCPT all the same must not make the client believe it: the
    RCPT is answered 503 (the last transaction's state does not count)."""
    async def go():
        up = Up(MAIL=[b"250 2.1.0 ok\r\n", b"550 5.7.1 not you\r\n"])
        relay, _ = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        replies = await _group(relay, up, [BOB], False, sender="eve@example.org")
        start = await relay.data_start()
        await _done(relay, up)
        return replies, start, up

    replies, start, up = run(go())
    assert [r.code for r in replies] == [550, 503], replies
    assert replies[1] == NO_TRANSACTION
    assert start == NO_TRANSACTION and up.got(b"DATA") == []


def test_a_mail_refused_here_ends_the_last_transaction_before_its_rcpts():
    """g15: the client's second MAIL on one connection needs SMTPUTF8, which
    the upstream does not offer: refused here, its RCPTs and DATA answered
    503. The last transaction upstream must be ended (RSET) first, else
    those RCPTs would join the last sender's open transaction."""
    async def go():
        up = Up()
        relay, _ = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        replies = await relay.mail_group(info(), up.route(), "j\u00f6rg@example.org",
                                         MailParams(smtputf8=True), [BOB], True)
        start = await relay.data_start()
        await _done(relay, up)
        return replies, start, up

    replies, start, up = run(go())
    assert replies[0].code == 553 and replies[1:] == [NO_TRANSACTION], replies
    assert start == NO_TRANSACTION
    assert up.got(b"RCPT") == [] and up.got(b"DATA") == [] and up.got(b"RSET"), up.lines


@pytest.mark.parametrize("second, text", [
    (b"421 4.3.2 going down now\r\n", ("4.3.2 going down now",)),
    (b"", DROPPED.lines),
], ids=["421", "cut"])
def test_the_rest_of_a_group_lost_behind_its_first_rcpt_gets_replies_of_its_own(second, text):
    """r01, r19, r20: the upstream answers the group's second RCPT 421 and
    leaves, or the connection is cut there: every command still gets a
    reply of its own (MAIL's and the first RCPT's from the upstream), no
    reply shifted or missing; the rest, and the client's DATA, get 451 with
    the upstream's text when it gave one (the client knows why), else the
    local 451."""
    replies, start, _ = _group_then(Up(RCPT=[b"250 2.1.5 ok\r\n", second, b""]),
                                    ["a@example.net", "b@example.net", "c@example.net"], True,
                                    lambda relay: relay.data_start())
    assert [r.code for r in replies] == [250, 250, 451, 451], replies
    assert replies[2].lines == replies[3].lines == text
    assert start.code == 451 and start.lines == text


def test_a_group_whose_mail_a_reused_connection_answers_421_goes_on_a_fresh_one():
    """g17: the session's connection, reused for its second message, answers
    the group's MAIL 421 (it was closing): the group goes again on a fresh
    connection, once, and the client sees the new connection's replies, not
    a 451."""
    async def go():
        up = Up(MAIL=[b"250 2.1.0 ok\r\n", b"421 4.4.2 idle too long\r\n", b"250 2.1.0 ok\r\n"])
        relay, handler = await _relay(up)
        assert [r.code for r in await _group(relay, up, [BOB], True)] == [250, 250]
        assert (await _deliver(relay))[1].code == 250
        replies = await _group(relay, up, [BOB], True, sender="carol@example.org")
        start, end = await _deliver(relay)
        await _done(relay, up)
        return replies, end, up, handler.text

    replies, end, up, log = run(go())
    assert [r.code for r in replies] == [250, 250] and end is not None and end.code == 250, replies
    assert len(up.messages) == 2 and len(up.got(b"EHLO")) == 2
    assert "kept connection closing" in log


def test_a_354_no_recipient_will_use_is_left_at_once():
    """r11, r13, r14: MAIL accepted, the group's only RCPT refused, and the
    upstream says 354 to its DATA all the same. No client DATA will claim
    it (the session answers that itself): the connection is left at once,
    not kept waiting for a message, and the next MAIL goes on a new
    connection, never as text into the open message."""
    async def go():
        up = Up(RCPT=b"550 5.1.1 no such user\r\n")
        relay, handler = await _relay(up)
        replies = await _group(relay, up, [BOB], True)
        await asyncio.sleep(0.3)
        cut_at_once = up.cut
        again = await _mail(relay, up, sender="carol@example.org")
        await _done(relay, up)
        return replies, cut_at_once, again, up, handler.text

    replies, cut_at_once, again, up, log = run(go())
    assert [r.code for r in replies] == [250, 550], replies
    assert cut_at_once, "the upstream still waits for a message"
    assert again.code == 250 and up.messages == []
    first = up.lines[:up.lines.index(b"EHLO relay.test\r\n", 1)]
    assert first[-1] == b"DATA\r\n", up.lines
    assert "stale" not in log


def test_a_refused_data_of_a_group_answers_the_clients_data_and_is_not_sent_again():
    """r22 (r16): the group's DATA refused with 554: the client's DATA gets
    that reply, relayed as any upstream reply is (with an enhanced status
    code, which it lacked), and no second DATA goes upstream."""
    replies, start, up = _group_then(Up(DATA=b"554 no data today\r\n"), [BOB], True,
                                     lambda relay: relay.data_start())
    assert [r.code for r in replies] == [250, 250], replies
    assert start.code == 554 and start.lines == ("5.0.0 no data today",), start
    assert len(up.got(b"DATA")) == 1, up.lines


def test_a_421_to_data_that_no_recipient_claims_still_ends_the_connection():
    """r17: the group's only RCPT refused and its DATA answered 421 (the
    upstream leaves): a RCPT the client adds next is answered 451 with
    that text, not sent on the closing connection."""
    up = Up(RCPT=[b"550 5.1.1 no such user\r\n", b"250 2.1.5 ok\r\n"],
            DATA=b"421 4.3.2 going down now\r\n")
    replies, late, up = _group_then(up, ["nobody@example.net"], True, lambda relay: relay.rcpt(BOB))
    assert [r.code for r in replies] == [250, 550], replies
    assert late.code == 451 and late.lines == ("4.3.2 going down now",), late
    assert len(up.got(b"RCPT")) == 1, up.lines


# ------------------------------------------------------------------ behind a refused MAIL

def _behind_a_refused_mail(rcpt: bytes):
    """A group whose MAIL the upstream refuses, its RCPT answered `rcpt`,
    then another MAIL: the group's replies, the next MAIL's, the upstream."""
    async def go():
        up = Up(MAIL=[b"550 5.7.1 not you\r\n", b"250 2.1.0 ok\r\n"], RCPT=rcpt)
        relay, _ = await _relay(up)
        replies = await _group(relay, up, [BOB], False, sender="eve@example.org")
        again = await _mail(relay, up)
        await _done(relay, up)
        return replies, again, up

    return run(go())


@pytest.mark.parametrize("rcpt", [b"250 2.1.5 ok\r\n", b"354 what?\r\n"])
def test_a_careless_upstream_behind_a_refused_mail_is_left(rcpt):
    """r05, r06: the upstream refuses MAIL but says yes (or nonsense, a 3xx)
    to the RCPT behind it: the client's RCPT gets 503, never that reply,
    and the connection is left (whatever the upstream kept of the RCPT must
    not join the next transaction): the next MAIL goes on a new one."""
    replies, again, up = _behind_a_refused_mail(rcpt)
    assert [r.code for r in replies] == [550, 503] and replies[1] == NO_TRANSACTION, replies
    assert again.code == 250 and len(up.got(b"EHLO")) == 2, up.lines


def test_a_421_behind_a_refused_mail_is_451_and_the_connection_is_left():
    """r04: a RCPT behind a refused MAIL answered 421: the client gets 451
    with the upstream's text (a 421 would end its session with us), and
    the next MAIL goes on a new connection, not the closing one."""
    replies, again, up = _behind_a_refused_mail(b"421 4.3.2 going down now\r\n")
    assert [r.code for r in replies] == [550, 451], replies
    assert replies[1].lines == ("4.3.2 going down now",)
    assert again.code == 250 and len(up.got(b"EHLO")) == 2, up.lines


# ------------------------------------------------------------------ rcpts

def test_data_after_rcpts_that_said_too_much_is_a_temporary_failure():
    """c07: one RCPT accepted, then two pipelined ones answered with a
    reply too many (all 451 4.5.0): the client's DATA, which its first
    recipient allows, gets 451 4.5.0 (try again later), not a permanent
    503 that would bounce the message."""
    async def go():
        up = Up(RCPT=[b"250 2.1.5 ok\r\n", b"250 2.1.5 ok\r\n",
                      b"250 2.1.5 ok\r\n250 2.1.5 surplus\r\n"])
        relay, _ = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        assert (await relay.rcpt(BOB)).code == 250
        replies = await relay.rcpts(["a@example.net", "b@example.net"])
        start = await relay.data_start()
        await _done(relay, up)
        return replies, start

    replies, start = run(go())
    assert [r.code for r in replies] == [451, 451], replies
    assert start.code == 451 and start.lines[0].startswith("4.5.0"), start


# ------------------------------------------------------------------ the RSET probe

@pytest.mark.parametrize("probe", [b"502 5.5.2 what?\r\n", b"354 go on\r\n"],
                         ids=["refused", "nonsense"])
def test_a_probe_rset_answered_other_than_250_means_a_fresh_connection(probe):
    """p02 (p03): the next transaction on the session's connection goes as
    RSET and MAIL in one round trip; an RSET answered anything but 250 (a
    refusal, or nonsense such as a 3xx) means the connection is not clean:
    MAIL's reply on it is not taken, the message goes on a fresh
    connection."""
    async def go():
        up = Up(RSET=[probe, b"250 2.0.0 reset\r\n"])
        relay, handler = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        replies = await _group(relay, up, [BOB], True, sender="carol@example.org")
        start, end = await _deliver(relay)
        await _done(relay, up)
        return replies, end, up, handler.text

    replies, end, up, log = run(go())
    assert [r.code for r in replies] == [250, 250] and end is not None and end.code == 250
    assert len(up.got(b"EHLO")) == 2, up.lines
    assert _after(up.lines, b"EHLO")[:3] == [b"MAIL", b"RCPT", b"DATA"], up.lines
    assert "kept connection went stale" in log


# ------------------------------------------------------------------ reset and the session's end after a group

@pytest.mark.parametrize("then", ["rset", "close", "mail"])
def test_an_unused_354_from_a_group_gets_nothing_written_into_its_message(then):
    """g12, e01, e03, e08: the group's DATA got 354 but the client's DATA
    never came (it sent RSET, a new MAIL, or left). The upstream waits for
    message text: no RSET, MAIL or QUIT may go to it (it would take them
    as text, then wait: a stall of the timeout); the connection is dropped
    at once, and a new MAIL goes on a new one."""
    async def go():
        up = Up()
        relay, handler = await _relay(up)
        assert [r.code for r in await _group(relay, up, [BOB], True)] == [250, 250]
        again = None
        if then == "rset":
            await relay.reset()
        elif then == "close":
            await relay.close()
        else:
            again = await _mail(relay, up, sender="carol@example.org")
        await asyncio.sleep(0.1)
        cut = up.cut
        await _done(relay, up)
        return again, cut, up, handler.text

    again, cut, up, log = run(go())
    assert cut and up.messages == []
    ehlos = [i for i, line in enumerate(up.lines) if line.startswith(b"EHLO")]
    first = up.lines[:ehlos[1]] if len(ehlos) > 1 else up.lines  # the group's connection
    assert first[-1] == b"DATA\r\n", up.lines
    assert "stale" not in log
    if then == "mail":
        assert again is not None and again.code == 250 and len(ehlos) == 2


def test_a_refused_data_of_a_group_leaves_the_connection_usable():
    """e02: the group's DATA refused (451): nothing waits for a message, so
    the client's RSET ends the transaction with an RSET upstream and the
    next message goes on the same connection (no new login)."""
    async def go():
        up = Up(DATA=[b"451 4.3.0 not now\r\n", b"354 go\r\n"])
        relay, _ = await _relay(up)
        assert [r.code for r in await _group(relay, up, [BOB], True)] == [250, 250]
        await relay.reset()
        replies = await _group(relay, up, [BOB], True, sender="carol@example.org")
        start, end = await _deliver(relay)
        await _done(relay, up)
        return replies, end, up

    replies, end, up = run(go())
    assert [r.code for r in replies] == [250, 250] and end is not None and end.code == 250
    assert len(up.got(b"EHLO")) == 1 and len(up.messages) == 1, up.lines


def test_a_client_rset_with_nothing_open_upstream_costs_no_round_trip():
    """e05: after a delivered message nothing is open upstream: the
    client's RSET is not sent on (an RSET costs a round trip), and the
    next message goes on the same connection."""
    async def go():
        up = Up()
        relay, _ = await _relay(up)
        assert [r.code for r in await _group(relay, up, [BOB], True)] == [250, 250]
        assert (await _deliver(relay))[1].code == 250
        await relay.reset()
        replies = await _group(relay, up, [BOB], True, sender="carol@example.org")
        end = (await _deliver(relay))[1]
        await _done(relay, up)
        return replies, end, up

    replies, end, up = run(go())
    assert [r.code for r in replies] == [250, 250] and end is not None and end.code == 250
    assert up.got(b"RSET") == [] and len(up.messages) == 2, up.lines
