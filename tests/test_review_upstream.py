"""The relay against hostile, broken or merely unusual upstreams: findings of
an adversarial review (the reviewer playing the upstream), each test failed
against the code it was written for (each is fixed).

The real session driver, session core and Relay run in-process against a
scripted plain-text upstream on 127.0.0.1 (as in test_relay_group_faults.py);
only the authenticator link is a stand-in that routes every sender to that
upstream. The client is a raw socket that writes each step and then waits,
so the replies it reads are exactly what a real client would see.
"""

from __future__ import annotations

import asyncio
import base64

import pytest

from sendooway_front import _pool

from .scripted_relay import LOGIN, UP_PASSWORD, UP_USER, converse
from .scripted_relay import careful as _careful, codes as _codes


def _converse(monkeypatch, script, steps: list, timeout: int = 3, auth: bool = False):
    return converse(monkeypatch, script, steps, auth=auth, source="review:1", timeout=timeout)


ONE_BY_ONE = [LOGIN + b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<r@x.y>\r\n", b"DATA\r\n"]


# ------------------------------------------------------------------ findings

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_credentials_echoed_back_as_a_malformed_line_stay_out_of_the_log(monkeypatch, mechanism):
    """An upstream (or a broken middlebox in front of it) that echoes the
    AUTH line it got, without any reply code, as some line-based proxies
    and "fixup"/inspection boxes do when confused. The relay refuses the
    line as malformed (451 4.5.0, fine), but its log line quotes the first
    60 octets of it: "malformed reply line b'AUTH PLAIN AHUAVXAt...'" (the
    base64 of NUL user NUL password) or, with LOGIN, the base64 password
    line itself — the upstream password in syslog, readable by whoever
    reads mail logs. DESIGN.md: the frontend "holds an upstream password
    only while it needs it and never logs it"; relay.md logs AUTH refusals
    by code only for exactly this reason (an echoing upstream), but the
    malformed-line path (ReplyError text, raised inside _login and logged
    through UpstreamError in Relay._mail) quotes the raw bytes. Correct:
    while the credentials are in flight (any ReplyError raised by an AUTH
    step), log that the reply was malformed, never its text."""

    async def auth(up, c, line):
        if mechanism == "LOGIN":
            await c.send(b"334 VXNlcm5hbWU6\r\n")
            await c.line()                     # the user name
            await c.send(b"334 UGFzc3dvcmQ6\r\n")
            line = await c.line()              # the password
        await c.send(line.rstrip(b"\r\n") + b"\r\n")  # echoed, no code

    async def script(up, c):
        await _careful(up, c, ehlo=b"250-up.test\r\n250 AUTH " + mechanism.encode() + b"\r\n",
                       auth=auth)

    out, up, log = _converse(monkeypatch, script, [LOGIN + b"MAIL FROM:<a@b.c>\r\n", b"QUIT\r\n"],
                             auth=True)
    assert _codes(out)[3] // 100 == 4, out             # a local temporary failure
    secrets = [UP_PASSWORD, base64.b64encode(UP_PASSWORD.encode()).decode(),
               base64.b64encode(f"\0{UP_USER}\0{UP_PASSWORD}".encode()).decode()]
    leaked = [s for s in secrets if s in log]
    assert not leaked, log


def test_a_reply_sent_during_the_message_is_not_taken_for_the_final_dots(monkeypatch):
    """The upstream answers DATA with 354 and then, unasked and in a
    separate segment, once more with "250" (two replies to one command);
    after the message it scans it and refuses it: 554. The relay never
    looks at what arrived while it was sending the message: after the
    final dot it reads the stray 250 as the answer to the dot and tells the
    client 250 — the message is lost silently (the client deletes it, the
    upstream refused it). The overtalk check (`_overtalked`) only sees a
    surplus that came in the same segment as the 354 or the final reply.
    RFC 5321 4.1.1.4: the reply to the end of data is what says whether
    the message was accepted; relay.md: "never a 250 whose command is
    unknown". Correct: before the final dot (data_end, and best in
    data_chunk too) anything the upstream sent since its 354 is either an
    early refusal (4xx/5xx: the answer, the connection dropped without
    the dot) or nonsense (451 4.5.0, connection dropped) — never 250."""

    async def data(up, c):
        await c.send(b"354 go ahead\r\n")
        await asyncio.sleep(0.1)
        await c.send(b"250 2.0.0 ok\r\n")          # a second reply to DATA
        up.messages.append(await c.message())
        await asyncio.sleep(0.5)                    # scanning the message...
        await c.send(b"554 5.7.1 message refused by content filter\r\n")

    async def script(up, c):
        await _careful(up, c, data=data)

    out, up, log = _converse(monkeypatch, script,
                             ONE_BY_ONE + [b"hello\r\n.\r\n", 1.0, b"QUIT\r\n"])
    codes = _codes(out)
    assert codes[:6] == [220, 250, 235, 250, 250, 354], out
    final = codes[6]
    assert final != 250 and final >= 400, (out, log)


def test_an_early_refusal_from_an_upstream_that_then_stops_reading_keeps_its_5xx(monkeypatch):
    """Mid-message the upstream answers 552 5.3.4 (too big) and stops
    reading, without closing. The relay's writes back up until `timeout`
    and the TimeoutError path of _fail_during_data does not even look at
    the reply that has long arrived: the client gets 451 4.4.2 "timed out,
    try again" — a permanent refusal turned temporary, so the client
    retries the same too-big message for days (and each try costs
    `timeout`). relay.md ("An early refusal keeps its code") and the
    review rules: a failure permanent by the upstream's own 5xx is passed
    as 5xx. Correct: when a write fails or times out, take the upstream's
    reply if one is already there (reader.buffered / stream.said_something,
    read without waiting) before falling back to 451."""

    async def data(up, c):
        await c.send(b"354 go ahead\r\n")
        await c.r.read(100_000)
        await c.send(b"552 5.3.4 message too big for this system\r\n")
        await asyncio.sleep(15)                     # never reads again

    async def script(up, c):
        await _careful(up, c, data=data)

    message = (b"x" * 998 + b"\r\n") * 8000        # 8 MB: more than the socket buffers hold
    out, up, log = _converse(monkeypatch, script,
                             ONE_BY_ONE + [message + b".\r\n", 1.5, b"QUIT\r\n"], timeout=2)
    codes = _codes(out)
    assert codes[:6] == [220, 250, 235, 250, 250, 354], out
    assert codes[6] == 552, (out[-200:], log)


@pytest.mark.parametrize("idle", ["at once", "after KEPT_IDLE"])
def test_a_late_extra_reply_between_messages_is_not_taken_for_the_next_mails(
        monkeypatch, idle):
    """The upstream answers the final dot twice ("250 queued", then the
    same again a moment later: two replies to one command). The session
    keeps its connection for the client's next message, and the stray 250
    is read as the answer to the next command: here the next MAIL, which
    the upstream refuses (550), is answered 250 to the client — every
    later reply one step late (the RCPT would get MAIL's 550, and so on).
    The same with the idle probe (RSET pipelined with MAIL after
    KEPT_IDLE): the stray 250 is taken for RSET's, RSET's for MAIL's. The
    pool never reuses a kept connection the upstream spoke on while idle
    (said_something), but the session's own connection is reused without
    that check. DESIGN.md: from MAIL on "every reply is the upstream's";
    RFC 5321 4.2: one reply per command. Correct: before a session reuses
    its connection (probed or not), unread bytes or EOF
    (reader.buffered / stream.said_something) mean it is dropped and a
    fresh one is used, as the pool does."""
    if idle != "at once":
        monkeypatch.setattr(_pool, "KEPT_IDLE", 0.2, raising=False)

    async def data(up, c):
        await c.send(b"354 go ahead\r\n")
        up.messages.append(await c.message())
        await c.send(b"250 2.0.0 queued\r\n")
        await asyncio.sleep(0.1)
        await c.send(b"250 2.0.0 queued\r\n")      # the same reply once more

    def mail(line):
        return b"550 5.7.1 sender refused\r\n" if b"bad@" in line else b"250 2.1.0 ok\r\n"

    async def script(up, c):
        await _careful(up, c, data=data, mail=mail)

    out, up, log = _converse(monkeypatch, script, ONE_BY_ONE + [
        b"hello\r\n.\r\n", 0.3, b"MAIL FROM:<bad@b.c>\r\n", b"QUIT\r\n"])
    codes = _codes(out)
    assert codes[:7] == [220, 250, 235, 250, 250, 354, 250], out
    assert codes[7] == 550, (out, up.lines)
