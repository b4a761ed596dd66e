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


def test_each_test_process_lives_in_a_world_of_its_own(world, tmp_path):
    """Under pytest-xdist each worker builds its own world (conftest.py):
    its nss files, homes and PAM services, seen by the worker itself and by
    the processes it starts, so two tests side by side never share ~alice."""
    import subprocess
    import sys

    from tests.fakeworld import _find_pam_module

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        assert os.path.basename(world.root).startswith(f"sendooway-world-{worker}-")
    assert os.environ["SENDOOWAY_TEST_WORLD"] == world.root
    child = subprocess.run([sys.executable, "-c", "import pwd; print(pwd.getpwnam('dave').pw_dir)"],
                           env=world.env(), capture_output=True, text=True, timeout=30)
    assert child.stdout.strip() == world.users["dave"].home == pwd.getpwnam("dave").pw_dir
    # PAM in the processes it starts reads this world's service folder: a
    # service only this world has (pam_wrapper takes the services there are
    # when a process first uses PAM, so a fresh process is asked)
    passdb = tmp_path / "passdb"
    passdb.write_text("dave:only-here-Pw-5:sendooway-own-world\n")
    os.chmod(passdb, 0o600)
    matrix = _find_pam_module("pam_matrix.so")
    service = os.path.join(world.pam_dir, "sendooway-own-world")
    with open(service, "w") as f:
        f.write(f"auth required {matrix} passdb={passdb}\naccount required {matrix} passdb={passdb}\n")
    check = ("import pam, sys; p = pam.pam(); print(p.authenticate('dave', sys.argv[1],"
             " service='sendooway-own-world'))")
    try:
        for password, expected in (("only-here-Pw-5", "True"), (world.users["dave"].password, "False")):
            child = subprocess.run([sys.executable, "-c", check, password], env=world.env(),
                                   capture_output=True, text=True, timeout=30)
            assert child.stdout.strip() == expected, child.stderr
    finally:
        os.unlink(service)
