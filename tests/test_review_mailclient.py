"""Review from a mail client's side: the real `sendooway -b` and
`sendooway-auth` on loopback, driven by smtplib with odd but legal input,
relaying to an aiosmtpd upstream. Each test failed on the code as reviewed,
for the reason its docstring gives."""

from __future__ import annotations

import os
import smtplib

import pytest

from .front_util import front_config, front_with_daemon, login_plain, open_tmp
from .upstream import FakeUpstream

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")


@pytest.fixture(scope="module")
def fe(world):
    with open_tmp() as tmp:
        up = FakeUpstream(world, tls="plain").start()
        config = front_config(tmp, world, f"smarthostMapping = direct:* 127.0.0.1 {up.port} noAuth\n")
        with front_with_daemon(tmp, world, config, up) as front:
            yield front


def test_ehlo_after_a_login_in_clear_does_not_offer_the_starttls_it_refuses(fe):
    """mailerEncryption = allowed, a login without TLS, then EHLO again
    (RFC 4954 keeps the login): the reply listed STARTTLS, and a client
    that takes up what is offered got 503 "STARTTLS not permitted after
    AUTH". An EHLO reply lists what the session will do (RFC 5321 4.1.1.1),
    as it already leaves AUTH out once logged in."""
    with fe.smtp() as s:
        s.ehlo()
        assert s.has_extn("starttls")
        s.login("alice", fe.world.users["alice"].password)
        s.ehlo()
        assert not s.has_extn("starttls") and not s.has_extn("auth")
        with pytest.raises(smtplib.SMTPNotSupportedError):
            s.starttls()  # smtplib itself now refuses what is not offered
        assert s.sendmail("alice@example.org", ["r@example.net"], b"Subject: x\r\n\r\nhi\r\n") == {}
    assert [m.rcpt_tos for m in fe.up.messages] == [["r@example.net"]]


def test_an_initial_response_too_long_gets_rfc_4954s_5_5_6_as_a_continuation_does(fe):
    """RFC 4954 6: an AUTH exchange line longer than the server takes is
    "500 5.5.6 Authentication Exchange line is too long". A 3000-character
    password sent as a 334 continuation got it, the same sent as the AUTH
    command's initial response (what smtplib and most clients send) got
    the generic "500 5.5.2 Line too long" — also when the line came in
    pieces. The session goes on either way."""
    token = login_plain("alice", "p" * 3000)
    with fe.smtp() as s:
        s.ehlo()
        assert s.docmd("AUTH", "PLAIN " + token) == (500, b"5.5.6 Authentication exchange line too long")
        assert s.docmd("AUTH PLAIN") == (334, b"")
        assert s.docmd(token) == (500, b"5.5.6 Authentication exchange line too long")
        line = f"AUTH PLAIN {token}\r\n".encode()
        for i in range(0, len(line), 1000):  # pieces beyond the line limit: the rest is dropped
            s.send(line[i:i + 1000])
        assert s.getreply() == (500, b"5.5.6 Authentication exchange line too long")
        assert s.docmd("MAIL FROM:<a@b.example> SIZE=" + "9" * 1100)[0] == 500  # not an AUTH line
        assert s.noop()[0] == 250
