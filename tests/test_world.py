"""The fake world itself: nss_wrapper users, pam_wrapper PAM, fake upstreams."""

import grp
import os
import pwd
import smtplib
import ssl

import pam
import pytest


def test_fake_users_are_visible(world):
    alice = pwd.getpwnam("alice")
    assert alice.pw_uid == world.users["alice"].uid
    assert alice.pw_dir == world.users["alice"].home
    assert "alice" in grp.getgrnam("mailusers").gr_mem
    assert pwd.getpwnam("nobody").pw_uid == 65534


def test_homes_owned_by_users(world):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    st = os.stat(world.users["bob"].home)
    assert st.st_uid == world.users["bob"].uid


def test_pam_right_password_passes_wrong_fails(world):
    p = pam.pam()
    assert p.authenticate("alice", world.users["alice"].password, service="sendooway")
    assert not p.authenticate("alice", "wrong", service="sendooway")
    assert not p.authenticate("nosuchuser", "x", service="sendooway")
    # bob's password is not alice's
    assert not p.authenticate("alice", world.users["bob"].password, service="sendooway")


@pytest.mark.parametrize("mode", ["plain", "starttls", "tls"])
def test_fake_upstream_records_messages(world, upstream_factory, mode):
    up = upstream_factory(tls=mode, accounts={"u1": "p1"})
    ctx = ssl.create_default_context(cafile=world.ca_file)
    if mode == "tls":
        client = smtplib.SMTP_SSL("localhost", up.port, context=ctx)
    else:
        client = smtplib.SMTP("localhost", up.port)
    with client:
        client.ehlo("test")
        if mode == "starttls":
            client.starttls(context=ctx)
            client.ehlo("test")
        client.login("u1", "p1")
        client.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nhello\r\n")
    assert len(up.messages) == 1
    m = up.messages[0]
    assert m.mail_from == "a@example.org"
    assert m.rcpt_tos == ["b@example.net"]
    assert m.login == "u1"
    assert b"hello" in m.data


def test_fake_upstream_rejects_bad_login_and_scripted_rcpt(world, upstream_factory):
    up = upstream_factory(tls="plain", accounts={"u1": "p1"}, reject_rcpt={"no@example.net"})
    with smtplib.SMTP("127.0.0.1", up.port) as c:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("u1", "bad")
        c.login("u1", "p1")
        c.mail("a@example.org")
        code, _ = c.rcpt("no@example.net")
        assert code == 550
    assert set(up.failed_logins) == {"u1"}
    assert up.logins == ["u1"]
