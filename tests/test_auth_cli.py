"""sendooway-auth's other ways in: --fd (the frontend's socketpair), systemd
socket activation, and the admin's --check report."""

import os
import socket
import subprocess
import sys
import time

import pytest

from sendooway_shared.protocol import REPLIES, AuthOk, BlockingChannel, NoRoute, RouteOk
from tests.auth_helpers import all_passwords, fd_authenticator, login, route

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")

AUTH = [sys.executable, "-m", "sendooway_auth.cli"]

FETCHMAILRC = """\
poll pop.example.org proto pop3 user "alice" password "fm-Secret-A1"
#sendooway:server "smtp.example.org"
#sendooway:tls
#sendooway:address "alice@example.org"

poll pop.other.org user "alice2" password "fm-Secret-A2"
#sendooway:server "smtp.other.org"
#sendooway:ssl
#sendooway:port 4650
#sendooway:address "*@other.org"
#sendooway:bogus "fm-Secret-A3"
#sendooway:server "smtp.broken.org"
#sendooway:address "x@broken.org"
"""
SECRETS = ["fm-Secret-A1", "fm-Secret-A2", "fm-Secret-A3", "d-Secret-D1"]


def test_fd_mode_serves_one_socket_and_exits(tmp_path, tmp_config, clean_homes):
    world = clean_homes
    world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC)
    log = tmp_path / "fd.log"
    conf = tmp_config(f"authSocket = {tmp_path}/run/auth.sock\n")  # its penalty dir goes there
    with fd_authenticator(conf, str(log)) as (proc, ours):
        ch = BlockingChannel(ours, REPLIES, timeout=10)
        assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
        assert isinstance(route(ch, "alice@example.org"), RouteOk)
        assert route(ch, "bob@example.org") == NoRoute()
        ch.close()
        assert proc.wait(10) == 0
    text = log.read_text()
    assert "auth ok: user=alice" in text
    assert not any(pw in text for pw in all_passwords(world) + SECRETS)


def test_fd_mode_rejects_a_bad_fd(tmp_config):
    res = subprocess.run([*AUTH, "-c", tmp_config(""), "-l", "-", "--fd", "97"],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 2 and "--fd 97: not an open file descriptor" in res.stderr
    r, w = os.pipe()
    res = subprocess.run([*AUTH, "-c", tmp_config(""), "-l", "-", "--fd", str(r)],
                         capture_output=True, text=True, timeout=20, pass_fds=[r])
    os.close(r)
    os.close(w)
    assert res.returncode == 2 and f"--fd {r}: not a socket" in res.stderr
    assert "Traceback" not in res.stderr
    udp = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    res = subprocess.run([*AUTH, "-c", tmp_config(""), "-l", "-", "--fd", str(udp.fileno())],
                         capture_output=True, text=True, timeout=20, pass_fds=[udp.fileno()])
    udp.close()
    assert res.returncode == 2 and "not a UNIX stream socket" in res.stderr


def test_socket_activation(tmp_path, tmp_config, world):
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    fd = listener.fileno()
    log = tmp_path / "act.log"
    # LISTEN_PID must be the daemon's pid: the shell sets it to its own, then execs
    script = 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@"'
    proc = subprocess.Popen(["sh", "-c", script, "sh", *AUTH, "-c", tmp_config(""), "-l",
                             str(log), "--socket", str(tmp_path / "unused" / "x.sock")],
                            preexec_fn=lambda: os.dup2(fd, 3), pass_fds=[3])
    listener.close()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)  # queued by the kernel even before the daemon accepts
        ch = BlockingChannel(s, REPLIES, timeout=15)
        assert login(ch, "bob", world.users["bob"].password) == AuthOk("bob")
        ch.close()
        assert not os.path.exists(tmp_path / "unused")  # it did not bind its own socket
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    text = log.read_text()
    assert "listening on the socket from systemd" in text
    assert not any(pw in text for pw in all_passwords(world))


def check(conf_path, *args):
    res = subprocess.run([*AUTH, "-c", conf_path, "--check", *args],
                         capture_output=True, text=True, timeout=30)
    return res.returncode, res.stdout + res.stderr


def test_check_report(tmp_config, clean_homes):
    world = clean_homes
    fm = world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC, mode=0o640)
    home = world.users["alice"].home
    conf = tmp_config("validUser = %mailusers\n"
                      "smarthostMapping = fetchmail:%h/.fetchmailrc\n"
                      "smarthostMapping = getmail:%h/.getmail/getmailrc\n"
                      "smarthostMapping = direct:* fallback.example.com 587 du d-Secret-D1 tls\n")
    code, out = check(conf, "alice", "--sender", "alice@example.org")
    assert code == 0, out
    assert "account: alice uid=40001" in out and "groups=alice,mailusers" in out
    assert "valid user: yes (member of group mailusers" in out
    assert f"{fm} [fetchmail]: found, " in out and "mode 0640" in out
    assert f"{home}/.getmail/getmailrc [getmail]: missing" in out
    assert (f"{fm}:4: alice@example.org -> smtp.example.org:587 starttls user alice"
            " password ********") in out
    assert (f"{fm}:10: *@other.org -> smtp.other.org:4650 implicit-tls user alice2"
            " password ********") in out
    assert f"{conf}:4: * -> fallback.example.com:587 starttls user du password ********" in out
    assert f"{fm}:11: unknown keyword '#sendooway:bogus'" in out
    assert f"{fm}: unsafe mode 0640" in out
    assert "route for alice@example.org: smtp.example.org:587 starttls" in out
    assert not any(pw in out for pw in all_passwords(world) + SECRETS)

    code, out = check(conf, "alice", "--sender", "x@nowhere.net")
    assert code == 0 and "route for x@nowhere.net: fallback.example.com:587" in out
    assert not any(pw in out for pw in SECRETS)


def test_check_exit_codes(tmp_config, tmp_path, clean_homes):
    world = clean_homes
    conf = tmp_config("validUser = %mailusers\n")
    code, out = check(conf, "carol", "--sender", "carol@example.org")
    assert code == 1, out
    assert "valid user: no (not named in validUser and in none of its groups)" in out
    assert "route for carol@example.org: none" in out and "result: no usable mapping" in out
    code, out = check(conf, "nosuchuser")
    assert code == 1 and "account: nosuchuser does not exist" in out
    bad = tmp_config("smarthostMaping = direct:* a 25 noAuth\n", "bad.conf")
    code, out = check(bad, "alice")
    assert code == 2 and f"{bad}:1: unknown keyword 'smarthostMaping'" in out
    # a user whose only file is broken has no usable mapping
    world.write_user_file("bob", ".getmail/getmailrc", "this is not ini\n")
    code, out = check(conf, "bob")
    assert code == 1 and "getmailrc:1: text before the first [section]" in out


def test_sender_needs_check(tmp_config):
    res = subprocess.run([*AUTH, "-c", tmp_config(""), "--sender", "a@b.c"],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 2 and "--sender needs --check USER" in res.stderr


def test_help_mentions_the_internal_fd_option():
    res = subprocess.run([*AUTH, "-h"], capture_output=True, text=True, timeout=20)
    assert res.returncode == 0 and "--fd N" in res.stdout and "internal" in res.stdout


def _run_as(user, argv: list[str]) -> subprocess.CompletedProcess:
    """`argv` run as `user` (its uid and gid, no other groups), from /."""
    def drop():
        os.setgroups([])
        os.setgid(user.gid)
        os.setuid(user.uid)

    return subprocess.run(argv, capture_output=True, text=True, timeout=30, preexec_fn=drop,
                          cwd="/")


def test_check_as_the_user_itself_without_root(tmp_config, clean_homes):
    """--check run by alice for alice (no root): her files are read as is."""
    world = clean_homes
    world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC)
    conf = world.write_user_file("alice", "sendooway.conf", "")  # readable by her
    res = _run_as(world.users["alice"], [*AUTH, "-c", conf, "--check", "alice", "--sender",
                                         "alice@example.org"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "route for alice@example.org: smtp.example.org:587" in res.stdout
    assert "fm-Secret-A1" not in res.stdout


def test_exit_with_parent_even_after_the_parent_dropped_root(tmp_path, tmp_config):
    """A root frontend starts a private daemon, drops to nobody and exits:
    PR_SET_PDEATHSIG would not reach the root child, --exit-with-parent does."""
    log = tmp_path / "private.log"
    sock = tmp_path / "p" / "auth.sock"
    parent = (
        "import os, subprocess, sys, time\n"
        f"p = subprocess.Popen({[*AUTH, '-c', tmp_config(''), '-l', str(log), '--socket', str(sock), '--exit-with-parent']!r})\n"
        "print(p.pid, flush=True)\n"
        f"while not os.path.exists({str(sock)!r}): time.sleep(0.05)\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    )
    res = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=30)
    daemon_pid = int(res.stdout.split()[0])
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{daemon_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{daemon_pid}")
    assert not sock.exists()
    text = log.read_text()
    assert "went away" in text and "stopped" in text


def test_fd_mode_backoff_is_shared_between_sessions(tmp_path, tmp_config, world):
    """One process per session must not reset the backoff: the second
    session's failure from the same address waits twice as long."""
    run = tmp_path / "run"
    conf = tmp_config(f"authSocket = {run}/auth.sock\n")
    log = tmp_path / "fd.log"

    def session() -> float:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = subprocess.Popen([*AUTH, "-c", conf, "-l", str(log), "--failure-delay", "0.3",
                                 "--fd", str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        ch = BlockingChannel(ours, REPLIES, timeout=10)
        from sendooway_shared.protocol import VERSION, AuthFail, AuthRequest, Hello
        from sendooway_shared.types import Secret
        assert ch.request(Hello(VERSION, "s", "198.51.100.77:4444")).TYPE == "welcome"
        t = time.monotonic()
        assert ch.request(AuthRequest("carol", Secret("wrong-Pw-zz"))) == AuthFail()
        took = time.monotonic() - t
        ch.close()
        assert proc.wait(10) == 0
        return took

    first, second = session(), session()
    assert 0.25 < first < 0.55 and 0.55 < second < 0.9, (first, second)
    st = os.stat(run / "penalty")
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == 0
    assert "delay=0.6" in log.read_text()


def test_check_of_another_user_without_root_says_it_needs_root(tmp_config, clean_homes):
    """--check run by alice for bob: the reader cannot become bob, which read
    as "lookup failed: reader child died" and "files: (none: only direct
    mappings)" (an outside review). Now one clear result line, exit 1."""
    world = clean_homes
    conf = world.write_user_file("alice", "sendooway.conf", "")  # readable by her
    res = _run_as(world.users["alice"], [*AUTH, "-c", conf, "--check", "bob"])
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.rstrip().endswith(
        "result: not checked: only root may read bob's files (run sendooway-auth --check bob"
        " as root)"), res.stdout
    assert "reader child died" not in res.stdout + res.stderr


def test_check_warns_of_a_pam_service_with_no_file(tmp_config, clean_homes):
    """pamService naming a service PAM has no file for: Linux-PAM silently
    uses its `other` service (pam_deny on many systems: every login fails
    and nothing says why). --check and the start say so; a name differing
    only in case is the same service (Linux-PAM lowercases it)."""
    world = clean_homes
    code, out = check(tmp_config("pamService = sendoowy\n"), "alice")
    missing = os.path.join(world.pam_dir, "sendoowy")
    assert f"warning: PAM service sendoowy has no file {missing}" in out, out
    assert "'other' service" in out
    for fine in ("pamService = SendooWay\n", ""):
        code, out = check(tmp_config(fine), "alice")
        assert "has no file" not in out, out
    code, out = check(tmp_config("pamService = sendoowy\nauthBackend = none\n"), "alice")
    assert "has no file" not in out, out  # no PAM login at all
