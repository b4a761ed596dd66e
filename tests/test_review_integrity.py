"""Adversarial review of the relay's message integrity and routing
correctness, end to end (client → session core → driver → Relay → upstream,
with the route lookup). Each test below failed on the code it was written
against, for the reason its docstring gives: the real session driver,
session core and Relay run in-process against a scripted plain-text
upstream on 127.0.0.1 (as in test_review_upstream.py); only the
authenticator link is a stand-in that routes every sender to that upstream;
the client is a raw socket that writes each step and waits for the replies.
Each defect is fixed; the tests stay as their proof.
"""

from __future__ import annotations

import re

from .scripted_relay import LOGIN, converse
from .scripted_relay import careful as _careful, codes as _codes

MESSAGE = b"Subject: x\r\n\r\nhello\r\n"




def _converse(monkeypatch, script, steps: list[bytes], **cfg_kw):
    return converse(monkeypatch, script, steps, **cfg_kw)


TRANSACTION = LOGIN + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<r@x.y>\r\nRCPT TO:<q@x.y>\r\nDATA\r\n"


# ------------------------------------------------------------------ findings

def test_the_message_log_line_counts_the_octets_the_upstream_got(monkeypatch):
    """DEFECT (rule: docs/decisions/relay.md "One log line per message:
    ... bytes=B" and the review brief: the bytes count must match what was
    sent upstream; RFC 1870 section 3: a message's size counts its CR-LF
    pairs, the last line's included): the client sends a 21-octet message
    (three lines, each ending in CRLF, no dot-stuffing), the upstream
    stores those 21 octets, but the relay logs `bytes=19` (and the
    driver's debug line "message of 19 bytes"): the last line's CRLF,
    which the session core hands out as part of the end marker, is never
    counted. Every message's size in the log is 2 octets short. Correct:
    bytes= is the size of the message the upstream got (here 21), i.e.
    Relay._bytes counts the CRLF that data_end sends before the dot when
    the message has a line (not for an empty message)."""
    out, up, log = _converse(monkeypatch, _careful, [TRANSACTION, MESSAGE + b".\r\n", b"QUIT\r\n"])
    assert _codes(out)[-2:] == [250, 221], out
    assert up.messages == [MESSAGE]
    line = [ln for ln in log.splitlines() if ": message user=alice" in ln]
    assert len(line) == 1, log
    assert "from=<a@b.c> rcpts=2" in line[0] and "review.conf:7" in line[0], line
    logged = int(re.search(r"bytes=(\d+)", line[0]).group(1))
    assert logged == len(up.messages[0]) == 21, line[0]


def test_a_message_two_octets_over_the_advertised_size_is_accepted(monkeypatch):
    """DEFECT (rule: RFC 1870 section 3 and 6.3: the message size is "the
    number of octets, including CR-LF pairs, but not the SMTP DATA
    command's terminating dot or doubled quoting dots"; DESIGN.md
    extMessageSize N → `SIZE N`, frontend.md "over extMessageSize: 552
    5.3.4"): with `extMessageSize = 20` the EHLO says `SIZE 20` and a MAIL
    declaring SIZE=21 is refused 552, but a 21-octet message sent without
    SIZE= is relayed and answered 250: the session core's size
    (`_d_size`, checked in `_emit`) leaves out the last line's CRLF, so any
    message up to N+2 octets passes (and doubled dots, which RFC 1870
    excludes, are counted instead). Correct: the size checked against the
    limit is the message's RFC 1870 size (its last CRLF included, stuffed
    dots not), so this message gets 552 5.3.4 and is never sent upstream."""
    out, up, log = _converse(monkeypatch, _careful,
                             [LOGIN + b"MAIL FROM:<a@b.c> SIZE=21\r\n",
                              b"MAIL FROM:<a@b.c>\r\nRCPT TO:<r@x.y>\r\nDATA\r\n",
                              MESSAGE + b".\r\n", b"QUIT\r\n"], extMessageSize=20)
    assert b"250-SIZE 20\r\n" in out
    codes = _codes(out)
    assert codes[3] == 552, out                 # the declared size is checked right
    assert codes[4:7] == [250, 250, 354], out
    assert codes[7] == 552, (out, up.messages)  # the actual size is not: 250 now
    assert up.messages == []


def test_an_upstream_refusing_data_leaves_no_message_log_line(monkeypatch):
    """DEFECT (rule: docs/decisions/relay.md "One log line per message:
    SID: message user=U from=<S> rcpts=N bytes=B route=... upstream=REPLY —
    also for messages that never reached the upstream"; DESIGN.md logging:
    "message size and final reply, refusals"): the upstream accepts MAIL
    and both RCPTs and then refuses DATA with "554 5.7.1 policy says no".
    The client gets that 554 (right), but nothing in the log says so:
    Relay.data_start returns the refusal without _log_message (a refused
    MAIL is logged as "MAIL refused: ...", a lost connection as "not
    reached", but a refused DATA — the upstream's final word on this
    message — leaves no line at all, so an admin asked "why did my mail
    bounce" finds no trace of it). Correct: one message line for it, e.g.
    `message user=alice from=<a@b.c> rcpts=2 bytes=0 route=127.0.0.1:P
    (review.conf:7) upstream=DATA refused: 554 5.7.1 policy says no`."""

    async def data(up, c):
        await c.send(b"554 5.7.1 policy says no\r\n")

    async def script(up, c):
        await _careful(up, c, data=data)

    out, up, log = _converse(monkeypatch, script, [TRANSACTION, b"RSET\r\n", b"QUIT\r\n"])
    assert _codes(out)[-4:] == [250, 554, 250, 221], out
    assert up.messages == []
    lines = [ln for ln in log.splitlines() if ": message user=alice" in ln]
    assert len(lines) == 1, log
    assert "from=<a@b.c>" in lines[0] and "554" in lines[0], lines
