"""Conformance from the mail client's side: findings of an adversarial
review (real clients and RFC-minded probes against `sendooway`), each test
failed before its fix; its docstring says what used to happen. Real `sendooway -b` and `sendooway-auth` processes
on loopback with an aiosmtpd upstream (and a scripted one that answers as
qmail does), real smtplib; the sans-IO core where a line of bytes is the
whole point."""

from __future__ import annotations

import os
import re
import smtplib

import pytest

from sendooway_front._reply import Reply

from .front_harness import LOGIN_ALICE, Harness, codes
from .front_util import front_config, front_with_daemon, login_plain, open_tmp
from .hardening_util import RawClient, ScriptedUpstream
from .upstream import FakeUpstream

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")

# The reply address of a GitHub notification (a real one's shape: "reply+"
# and a 88-character token, 94 octets of local part). Mailman's
# LIST-confirm+TOKEN, Asana's and Google Docs' notification addresses are of
# the same kind: every user answers such mails.
GITHUB_REPLY = ("reply+000c89caea14b0bf53caf17fd0c9c67fce378f51fd1af05492cf000000011292f3d892a169ce07601530"
                "@reply.github.com")

# qmail-smtpd (and aiosmtpd) do not offer ENHANCEDSTATUSCODES: their replies
# carry no X.Y.Z. These are qmail's texts.
QMAIL_REPLIES = {
    "EHLO": b"250-qmail.upstream\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
    "MAIL": b"250 ok\r\n", "RCPT": b"250 ok\r\n",  # DATA: the default "354 go ahead"
    "DOT": b"250 ok 1764100000 qp 4242\r\n", "RSET": b"250 flushed\r\n", "QUIT": b"221 qmail.upstream\r\n",
}
ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}( |$)")


@pytest.fixture(scope="module")
def fe(world):
    if os.geteuid() != 0:
        pytest.skip("the frontend drops to nobody: needs root")
    with open_tmp() as tmp:
        up = FakeUpstream(world, tls="plain").start()
        qmail = ScriptedUpstream(replies=dict(QMAIL_REPLIES))

        def rcpt(conn, rfile):  # qmail's refusal of a domain it does not relay for
            refused = b"nobody@" in qmail.commands[-1]
            conn.sendall(b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
                         if refused else b"250 ok\r\n")

        qmail.replies["RCPT"] = rcpt
        qmail.start()
        extra = (f"smarthostMapping = direct:*@qmail.example 127.0.0.1 {qmail.port} noAuth\n"
                 f"smarthostMapping = direct:* 127.0.0.1 {up.port} noAuth\n")
        config = front_config(tmp, world, extra)
        with front_with_daemon(tmp, world, config, up, qmail) as front:
            front.qmail = qmail
            yield front


@pytest.fixture(autouse=True)
def _clear(request):
    if "fe" in request.fixturenames:
        request.getfixturevalue("fe").up.messages.clear()
    yield


def _smtplib(fe) -> smtplib.SMTP:
    s = fe.smtp()
    s.starttls(context=fe.world.ssl_context())
    s.ehlo()
    s.login("alice", fe.world.users["alice"].password)
    return s


BODY = (b"From: alice@home.example\r\nTo: someone\r\nDate: Wed, 25 Nov 2026 12:00:00 +0000\r\n"
        b"Message-ID: <review@client.test>\r\nSubject: review\r\n\r\n")


@needs_root
def test_reply_to_a_github_notification_is_not_refused(fe):
    """RFC 5321 4.5.3.1 sets 64 octets for a local part but also says "to the
    maximum extent possible, implementation techniques that impose no limits
    on the length of these objects should be used", and real addresses
    exceed it: GitHub's reply+TOKEN@reply.github.com (94 octets of local
    part), Mailman's confirmation addresses, Asana, Google Docs. Postfix,
    Exim, Gmail and aiosmtpd (since 1.4.1, aio-libs/aiosmtpd#257, for this
    very reason) accept them. `_address.parse_path` refuses any local part
    over MAX_LOCAL = 64 (_address.py:106) with 553 5.1.3 "Invalid recipient
    address syntax" - a permanent failure: a user answering a GitHub
    notification through sendooway gets a bounce in the client (smtplib
    raises SMTPRecipientsRefused), though the upstream would take it."""
    with _smtplib(fe) as s:
        refused = s.sendmail("alice@home.example", [GITHUB_REPLY], BODY + b"thanks!\r\n")
    assert refused == {}
    assert [m.rcpt_tos for m in fe.up.messages] == [[GITHUB_REPLY]]


@needs_root
def test_dot_stuffed_998_octet_line_is_not_too_long(fe):
    """RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF
    "(but not counting the leading dot duplicated for transparency)". A
    998-octet line that begins with a dot is legal (RFC 5322 2.1.1 allows
    998); the client stuffs it to 999 octets + CRLF. `Session._emit`
    (_session.py:720-724) measures the line as received, stuffing dot
    included, and refuses the message with 550 5.6.0 "line longer than 1000
    octets". smtplib (like every client) stuffs the dot, so the message
    bounces permanently although it is within the limit (aiosmtpd, the
    upstream here, allows 1001 octets for this reason)."""
    line = b"." + b"x" * 997  # 998 octets; sent as 999 + CRLF
    with _smtplib(fe) as s:
        refused = s.sendmail("alice@home.example", ["bob@elsewhere.example"],
                             BODY + line + b"\r\nend\r\n")
    assert refused == {}
    assert len(fe.up.messages) == 1
    assert line + b"\r\nend\r\n" in fe.up.messages[0].data


@needs_root
def test_every_reply_carries_an_enhanced_status_code_once_advertised(fe):
    """RFC 2034 (section 3, with RFC 3463): a server that advertises
    ENHANCEDSTATUSCODES prefaces the text of every 2xx, 4xx and 5xx reply
    (greeting and EHLO/HELO excepted) with a status code. sendooway
    advertises it (_session.py:454) but from MAIL on passes the upstream's
    replies through verbatim (_relay.py:160-177 `_upstream_reply` leaves the
    text alone): an upstream without the extension - qmail, aiosmtpd, many
    small ISP smarthosts - gives the client "250 ok" to MAIL, RCPT and the
    final dot, and a 5xx refusal with no X.Y.Z at all, so a client that
    classifies failures by the enhanced code (as RFC 3463 intends; the basic
    code alone does not tell a bad mailbox from a policy refusal) has none."""
    with RawClient(fe.host, fe.port) as c:
        assert c.reply()[0] == 220
        assert c.cmd(b"EHLO client.test\r\n")[0] == 250
        auth = login_plain("alice", fe.world.users["alice"].password)
        assert c.cmd(f"AUTH PLAIN {auth}\r\n".encode())[0] == 235
        answers = {}
        for name, cmd in (("MAIL", b"MAIL FROM:<alice@qmail.example>\r\n"),
                          ("RCPT", b"RCPT TO:<bob@elsewhere.example>\r\n"),
                          ("RCPT refused", b"RCPT TO:<nobody@elsewhere.example>\r\n"),
                          ("DATA", b"DATA\r\n"), ("DOT", b"Subject: x\r\n\r\nhi\r\n.\r\n"),
                          ("RSET", b"RSET\r\n")):
            answers[name] = c.cmd(cmd)
    assert answers["DATA"][0] == 354 and answers["RCPT refused"][0] == 553 and fe.qmail.dots == 1
    missing = {name: (code, lines) for name, (code, lines) in answers.items()
               if code != 354 and not all(ENHANCED.match(line) for line in lines)}
    assert missing == {}


def test_mail_from_line_may_grow_by_its_extensions():
    """RFC 5321 4.5.3.1.4 bounds a command line at 512 octets but "SMTP
    extensions may be used to increase this limit", and the extensions
    sendooway advertises do: SIZE adds 26 (RFC 1870 section 3, item 5),
    BODY= (RFC 6152/1652), and AUTH's MAIL parameter 500 octets (RFC 4954
    section 3). `Session._next_line` (_session.py:359-380, limit at 362) applies
    MAX_COMMAND_LINE = 512 to every command, so a MAIL FROM with a long
    (valid) path, SIZE, BODY and AUTH=<same address> - all accepted by
    `_cmd_mail` - is answered 500 5.5.6 "Line too long" and dropped."""
    local = "a" * 64
    domain = ".".join(["b" * 60, "c" * 60, "d" * 50, "example"])
    address = f"{local}@{domain}"  # 244 octets: a legal path (<= 256 with brackets)
    line = (f"MAIL FROM:<{address}> SIZE=1000 BODY=8BITMIME AUTH={address.replace('@', '+40')}\r\n"
            .encode())
    assert 512 < len(line) < 512 + 26 + 16 + 500
    h = Harness()
    assert codes(h.feed(LOGIN_ALICE))[-1] == 235
    reply = h.feed(line)
    assert codes(reply) == [250], reply



@pytest.mark.parametrize("reply, success, expected", [
    (Reply(250, ("ok",)), "1.5", ("2.1.5 ok",)),
    (Reply(250, ("2.1.5 kept",)), "1.0", ("2.1.5 kept",)),          # has one: untouched
    (Reply(553, ("sorry (#5.7.1)",)), "1.5", ("5.0.0 sorry (#5.7.1)",)),
    (Reply(451, ("",)), "1.0", ("4.0.0",)),
    (Reply(354, ("go ahead",)), "0.0", ("go ahead",)),              # 3xx: none (RFC 3463)
    (Reply(250, ("first", "2.0.0 second", "2.0.0x")), "0.0",
     ("2.0.0 first", "2.0.0 second", "2.0.0 2.0.0x")),
    # the first line's code goes to the lines without one (RFC 2034 3)
    (Reply(550, ("5.7.1 refused", "see https://x.example/", "")), "1.5",
     ("5.7.1 refused", "5.7.1 see https://x.example/", "5.7.1")),
    (Reply(250, ("2.1.5 a", "2.1.5 b")), "1.0", ("2.1.5 a", "2.1.5 b")),
])
def test_enhanced_code_added_only_where_missing(reply, success, expected):
    assert reply.with_enhanced(success).lines == expected
