"""authBackend = LDAP (the original's LDAP login) against a real OpenLDAP
slapd on loopback: bind as ldapAuthDN with the name, the entry's uid,
uidNumber, gidNumber and homeDirectory are the account (NSS need not know
it), ldaps:// with the certificate and its name checked, a directory that
cannot answer is a temporary failure, never a wrong password. It used to
be refused at start-up ("use PAM with pam_ldap or SSSD"): a deployment of
the original with `authBackend = LDAP` did not start at all."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from sendooway_shared.protocol import AuthFail, AuthOk, Error, NoRoute, RouteOk
from tests.auth_helpers import Daemon, daemon, login, route  # noqa: F401 - daemon is a fixture
from tests.ldap_world import AUTH_DN, Person, Slapd, have_slapd

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root"),
    pytest.mark.skipif(not have_slapd(), reason="slapd is not installed (scripts/setup.sh)"),
]

LENA_UID = 40101  # a directory account NSS does not know
LENA_PW = "Lena-Ldap-Pw-4"
FETCHMAILRC = """\
poll pop.example.org proto pop3 user "lena" password "fm-Lena-Secret-8"
#sendooway:server "127.0.0.1"
#sendooway:port {port}
#sendooway:address "lena@example.org"
"""


@pytest.fixture(scope="module")
def slapd(tmp_path_factory, world):
    homes = os.path.dirname(world.users["alice"].home)
    home = os.path.join(homes, "lena")
    os.makedirs(home, exist_ok=True)
    os.chown(home, LENA_UID, LENA_UID)
    os.chmod(home, 0o700)
    server = Slapd(str(tmp_path_factory.mktemp("slapd")), [
        Person("lena", LENA_PW, LENA_UID, LENA_UID, home),
        Person("zero", "Zero-Ldap-Pw-1", 0, 0, "/root"),
        Person("half", "Half-Ldap-Pw-1", None, None, None),
    ])
    server.home = home
    yield server
    server.stop()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def silent_directory():
    """An ldap:// URI whose server accepts connections and never answers."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(listener.accept()) for _ in range(4)],
                     daemon=True).start()
    yield f"ldap://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn, _addr in held:
        conn.close()


def _conf(slapd, uri=None, extra="") -> str:
    return (f"authBackend = LDAP\nldapUri = {uri or slapd.uri()}\nldapSSLca = {slapd.ca_file}\n"
            f"ldapAuthDN = {AUTH_DN}\ntimeout = 5\n{extra}")


def test_a_directory_login_serves_the_entrys_account_and_files(daemon, slapd):
    """lena exists only in the directory: her right password logs her in as
    the entry's uid, and her route comes from the file in the entry's home,
    read as uidNumber (the worker runs as 40101)."""
    path = os.path.join(slapd.home, ".fetchmailrc")
    with open(path, "w") as f:
        f.write(FETCHMAILRC.format(port=2525))
    os.chown(path, LENA_UID, LENA_UID)
    os.chmod(path, 0o600)
    d = daemon(_conf(slapd))
    ch = d.connect()
    assert login(ch, "lena", LENA_PW) == AuthOk("lena")
    reply = route(ch, "lena@example.org")
    assert isinstance(reply, RouteOk), reply
    assert (reply.server, reply.port, reply.user) == ("127.0.0.1", 2525, "lena")
    assert route(ch, "other@example.org") == NoRoute()
    ch.close()
    log = d.wait_log("route: user=lena")
    assert "auth ok: user=lena" in log
    assert LENA_PW not in log and "fm-Lena-Secret-8" not in log


def _all_refused(d, attempts) -> None:
    """Each (name, password) on a connection of its own: auth_fail."""
    for name, pw in attempts:
        ch = d.connect()
        assert login(ch, name, pw) == AuthFail(), name
        ch.close()


def test_wrong_password_and_unknown_name_look_the_same(daemon, slapd):
    d = daemon(_conf(slapd))
    _all_refused(d, (("lena", "not-Her-Pw-3"), ("nosuch", "any-Pw-33"), ("*", "any-Pw-33"),
                     ("lena,ou=people", LENA_PW)))
    log = d.wait_log("user=nosuch client=192.0.2.7 reason=wrong-password")
    assert "auth failed: user=lena client=192.0.2.7 reason=wrong-password" in log


def test_an_unreachable_directory_is_a_temporary_failure_not_a_wrong_password(daemon, slapd):
    """No directory answers: the frontend is told 'temporarily unavailable'
    (Error), the log says why, no failure is counted against the user."""
    d = daemon(_conf(slapd, uri="ldaps://127.0.0.1:1"))
    ch = d.connect()
    reply = login(ch, "lena", LENA_PW)
    assert isinstance(reply, Error), reply
    log = d.wait_log("no directory answered")
    assert "ldaps://127.0.0.1:1: socket connection error" in log
    assert "reason=ldap-unavailable" in log and "auth failed: user=lena" not in log


def test_the_servers_certificate_name_is_checked(daemon, slapd):
    """The certificate is for localhost; reaching the same server as
    127.0.0.1 is refused (a temporary failure), and a second URI that works
    is then tried."""
    d = daemon(_conf(slapd, uri=slapd.uri("127.0.0.1")))
    ch = d.connect()
    assert isinstance(login(ch, "lena", LENA_PW), Error)
    d.wait_log("the server's certificate is not for this name")
    d2 = daemon(_conf(slapd, uri=f"{slapd.uri('127.0.0.1')} {slapd.uri()}"))
    ch = d2.connect()
    assert login(ch, "lena", LENA_PW) == AuthOk("lena")


def test_an_untrusted_certificate_is_refused(daemon, slapd, world):
    d = daemon(_conf(slapd).replace(slapd.ca_file, world.ca_file))  # another CA
    ch = d.connect()
    assert isinstance(login(ch, "lena", LENA_PW), Error)
    d.wait_log("no directory answered")


def test_entries_that_would_read_files_as_root_or_lack_attributes_are_refused(daemon, slapd):
    """Refused like a wrong password (535, counted): a temporary failure
    for a right password only told a client that it had guessed one (a
    review)."""
    d = daemon(_conf(slapd))
    _all_refused(d, (("zero", "Zero-Ldap-Pw-1"), ("half", "Half-Ldap-Pw-1")))
    log = d.wait_log("lacks uidNumber, gidNumber, homeDirectory")
    assert "uidNumber 0 gidNumber 0 refused" in log


def test_valid_user_applies_to_directory_accounts(daemon, slapd):
    d = daemon(_conf(slapd, extra="validUser = alice\n"))
    ch = d.connect()
    assert login(ch, "lena", LENA_PW) == AuthFail()
    d.wait_log("reason=not-a-valid-user")


@pytest.mark.parametrize("text, message", [
    ("authBackend = LDAP\nldapAuthDN = uid=%u,dc=x\n", "ldapUri is not set"),
    ("authBackend = LDAP\nldapUri = ldaps://h\nldapAuthDN = uid=alice,dc=x\n",
     "ldapAuthDN must name the user's entry with %u"),
    ("authBackend = LDAP\nldapUri = ldapi:///run/slapd\nldapAuthDN = uid=%u,dc=x\n",
     "only ldap:// and ldaps:// are supported"),
])
def test_an_incomplete_ldap_config_stops_the_daemon_with_file_and_line(tmp_path, text, message):
    conf = tmp_path / "bad.conf"
    conf.write_text(text)
    d = Daemon(tmp_path, str(conf))
    os.makedirs(d.dir, exist_ok=True)
    with pytest.raises(RuntimeError):
        d.start(timeout=5)
    assert message in d.log()
    assert f"{conf}:" in d.log()


def test_cleartext_ldap_to_another_host_is_warned_about(world, tmp_path):
    conf = tmp_path / "clear.conf"
    conf.write_text("authBackend = LDAP\nldapUri = ldap://ldap.example.org\n"
                    "ldapAuthDN = uid=%u,dc=example,dc=org\n")
    r = subprocess.run([os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", ".venv",
                                     "bin", "sendooway-auth"), "-c", str(conf), "--check", "alice"],
                       capture_output=True, text=True, timeout=30, env=world.env())
    assert "ldap://ldap.example.org: the users' passwords go to the directory in clear" in r.stdout


def test_a_directory_user_sends_mail_through_the_frontend(world, slapd, tmp_path, upstream_factory):
    """End to end with a real client: lena logs in to sendooway with her
    directory password and her message reaches the upstream her file names."""
    from tests.front_util import Frontend, front_config

    up = upstream_factory(tls="plain", require_tls=False, accounts=None)
    path = os.path.join(slapd.home, ".fetchmailrc")
    with open(path, "w") as f:
        f.write(FETCHMAILRC.format(port=up.port).replace("#sendooway:address",
                                                         "#sendooway:noAuth\n#sendooway:address"))
    os.chown(path, LENA_UID, LENA_UID)
    os.chmod(path, 0o600)
    conf = front_config(tmp_path, world, _conf(slapd))
    daemon_ = Daemon(tmp_path / "d", conf)
    os.makedirs(daemon_.dir, exist_ok=True)
    daemon_.start()
    fe = Frontend(conf, str(tmp_path / "front.log"), args=["--auth-socket", daemon_.socket_path]).start()
    try:
        with fe.smtp() as c:
            c.starttls(context=world.ssl_context())
            c.login("lena", LENA_PW)
            c.sendmail("lena@example.org", ["bob@example.net"], b"Subject: ldap\r\n\r\nhello\r\n")
    finally:
        fe.stop()
        daemon_.stop()
    [message] = up.messages
    assert message.mail_from == "lena@example.org" and b"hello" in message.data


@pytest.mark.parametrize("name", ["lena ", " lena", "\tlena", "\uff4c\uff45\uff4e\uff41", "\u2113ena"])
def test_spellings_the_directory_folds_onto_a_name_are_refused_before_the_bind(daemon, slapd, name):
    """slapd matches uid loosely (blanks around it, a tab, full-width
    letters): each such spelling bound as lena with a backoff count and a
    login queue of its own, so guesses from many addresses went N times
    faster than the per-user backoff allows (a review). Only plain names
    are bound; the others are unknown names."""
    d = daemon(_conf(slapd))
    ch = d.connect()
    assert login(ch, name, LENA_PW) == AuthFail()
    ch.close()
    d.wait_log("reason=unknown-user")


def test_an_unusable_ldapSSLca_stops_the_daemon_with_file_and_line(tmp_path, slapd):
    conf = tmp_path / "ca.conf"
    conf.write_text(_conf(slapd).replace(slapd.ca_file, str(tmp_path / "no-such-ca.pem")))
    d = Daemon(tmp_path, str(conf))
    os.makedirs(d.dir, exist_ok=True)
    with pytest.raises(RuntimeError):
        d.start(timeout=5)
    assert f"{conf}:3: {tmp_path}/no-such-ca.pem: cannot load CA certificates" in d.log()


def test_a_silent_directory_holds_a_login_seconds_not_the_whole_timeout(world, silent_directory):
    """A directory that accepts connections and then says nothing (hung,
    or a firewall): each try is bounded by a few seconds, not by `timeout`
    (300 s by default), during which the login held a PAM worker thread:
    eight such logins left every other one waiting."""
    import time

    from sendooway_auth import _ldap
    from sendooway_shared.config import parse_config
    from sendooway_shared.types import Secret

    cfg = parse_config(f"authBackend = LDAP\nldapUri = {silent_directory}\n"
                       "ldapAuthDN = uid=%u,dc=example,dc=test\n", "silent.conf")  # timeout 300
    started = time.monotonic()
    assert _ldap.login(cfg, "lena", Secret(LENA_PW)) == (None, "ldap-unavailable")
    assert time.monotonic() - started < _ldap.READ_LIMIT + 3


def test_a_hung_first_directory_leaves_time_for_the_next_and_is_named(daemon, slapd,
                                                                     silent_directory):
    """ldapUri with a first server that accepts and then says nothing: with
    timeout = 10 each try took up to 10 s, the login's whole wait, so the
    good second server was never asked (454 for everyone) and the log named
    neither (an admin's review). All tries now share one budget, and the
    hung one is named even though the next one answered."""
    hung = silent_directory
    d = daemon(_conf(slapd, uri=f"{hung} {slapd.uri()}").replace("timeout = 5", "timeout = 10"))
    ch = d.connect()
    assert login(ch, "lena", LENA_PW) == AuthOk("lena")
    log = d.wait_log("auth ok: user=lena")
    assert f"ldap: {hung}: " in log and "timed out" in log
    assert "auth backend LDAP (" in log  # the start line says which backend serves


def test_check_says_the_daemon_serves_the_directory_account(world, slapd, tmp_path):
    """A name NSS knows too: --check shows the NSS account, and says that
    the daemon serves the directory entry instead (an admin's review: its
    uid, home and validUser verdict may all differ)."""
    conf = tmp_path / "check.conf"
    conf.write_text(_conf(slapd))
    r = subprocess.run([os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", ".venv",
                                     "bin", "sendooway-auth"), "-c", str(conf), "--check", "alice"],
                       capture_output=True, text=True, timeout=30, env=world.env())
    assert "the daemon serves the directory entry's uidNumber" in r.stdout, r.stdout
