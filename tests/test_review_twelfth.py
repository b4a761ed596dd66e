"""Twelfth review: the behaviour behind each sendooway.conf keyword compared
with the original C sendooway (src/client.c, src/proxy.c, src/server.c) and
docs/man/sendooway.conf.5, run through the real session driver, session core
and Relay against a scripted upstream on 127.0.0.1 (tests/scripted_relay.py);
each test failed against the code it was written for, for the reason its
docstring gives.
It is fixed."""

from __future__ import annotations

import base64

from sendooway_shared.config import SmarthostAuth

from .scripted_relay import LOGIN, UP_PASSWORD, UP_USER, careful, codes, converse

ONE_MESSAGE = [LOGIN + b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<r@x.y>\r\n", b"DATA\r\n",
               b"hello\r\n.\r\n", b"QUIT\r\n"]
PLAIN_TOKEN = base64.b64encode(f"\0{UP_USER}\0{UP_PASSWORD}".encode())


def test_always_try_mechanism_the_upstream_lacks_does_not_block_the_advertised_one(monkeypatch):
    """DEFECT (rule: original C sendooway, src/client.c client_connect: with
    credentials it tries CRAM-MD5, then PLAIN, then LOGIN, and any refusal of
    one moves on to the next; docs/man/sendooway.conf.5 smarthostCramMD5 =
    alwaysTry "even when it does not [advertise it]"): with
    `smarthostCramMD5 = alwaysTry` against a Postfix + Dovecot SASL upstream
    that offers only `AUTH PLAIN LOGIN`, Postfix answers the unadvertised
    `AUTH CRAM-MD5` with "535 5.7.8 Error: authentication failed: Invalid
    authentication mechanism" (postfix xsasl_dovecot_server.c returns
    XSASL_AUTH_FAIL for a mechanism not in its list). Now the relay treats
    that 535 as a refused password, never tries the advertised PLAIN, and
    every message gets 454 4.7.0 — the option is unusable against the most
    common upstream, where the original logged in by PLAIN. Correct: a
    mechanism tried only because of alwaysTry (not advertised) whose refusal
    is any 5xx is "not this one" — go on to the next mechanism, so PLAIN
    logs in and the message is relayed (250)."""

    async def auth(up, c, line):
        if line.upper().startswith(b"AUTH CRAM-MD5"):
            await c.send(b"535 5.7.8 Error: authentication failed:"
                         b" Invalid authentication mechanism\r\n")
        elif line.strip() == b"AUTH PLAIN " + PLAIN_TOKEN:
            await c.send(b"235 2.7.0 Authentication successful\r\n")
        else:
            await c.send(b"535 5.7.8 Error: authentication failed\r\n")

    async def script(up, c):
        await careful(up, c, ehlo=b"250-up.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n",
                      auth=auth)

    out, up, log = converse(monkeypatch, script, ONE_MESSAGE, auth=True,
                            smarthostCramMD5=SmarthostAuth.ALWAYS_TRY)
    sent = [line.split(b" ")[:2] for line in up.lines if line[:4].upper() == b"AUTH"]
    assert [b"AUTH", b"PLAIN"] in sent, (sent, log)
    assert codes(out)[:7] == [220, 250, 235, 250, 250, 354, 250], (out, log)
    assert len(up.messages) == 1, log
