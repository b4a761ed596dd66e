"""The real sendooway-auth daemon in a subprocess: PAM through pam_wrapper,
users' files through the user-switching reader, raw frames from a hostile
frontend."""

import os
import socket
import struct
import time

import pytest

from sendooway_shared.protocol import (
    VERSION, AuthFail, AuthOk, AuthRequest, Error, Hello, NoRoute, RouteOk, RouteRequest, encode,
)
from sendooway_shared.types import Secret, TlsMode
from tests.auth_helpers import (  # noqa: F401 - daemon is a fixture
    Daemon, closed_after, daemon, fork_server, login, raw_frame, route, workers,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")

FETCHMAILRC = """\
poll pop.example.org proto pop3 user "alice" password "fm-Secret-A1"
#sendooway:server "smtp.example.org"
#sendooway:tls
#sendooway:address "alice@example.org"
"""


def test_ready_notification_and_socket_modes(daemon):
    d = daemon()
    assert d.ready_message == "READY=1"
    st = os.stat(d.socket_path)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_uid == 65534  # frontendUser nobody may connect, nobody else


def test_right_and_wrong_password(daemon, world):
    d = daemon()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    ch.close()
    ch = d.connect()
    assert login(ch, "alice", "wrong-Pw-zz") == AuthFail()
    assert ch.request(AuthRequest("nosuchuser", Secret("x"))) == AuthFail()
    assert ch.request(AuthRequest("bob", Secret(world.users["bob"].password))) == AuthOk("bob")
    log = d.wait_log("auth ok: user=bob")
    assert "auth ok: user=alice client=192.0.2.7 session=s1" in log
    assert "auth failed: user=alice client=192.0.2.7 reason=wrong-password session=s1" in log
    assert "auth failed: user=nosuchuser client=192.0.2.7 reason=unknown-user" in log


def test_not_a_valid_user_by_group(daemon, world):
    d = daemon("validUser = %mailusers\nvalidUser = dave\n")
    for name, expected in (("alice", True), ("bob", True), ("dave", True), ("carol", False)):
        ch = d.connect()
        reply = login(ch, name, world.users[name].password)
        assert (reply == AuthOk(name)) is expected, name
        ch.close()
    d.wait_log("reason=not-a-valid-user")
    assert "auth failed: user=carol client=192.0.2.7 reason=not-a-valid-user" in d.log()


def test_max_auth_failures_closes_the_connection(daemon, world):
    d = daemon("maxAuthFailures = 2\n")
    ch = d.connect()
    assert login(ch, "alice", "wrong-Pw-zz") == AuthFail()
    assert ch.request(AuthRequest("alice", Secret("wrong-Pw-zz"))) == AuthFail()
    assert closed_after(ch)
    assert "auth closed: user=alice client=192.0.2.7 reason=too-many-failures failures=2" in \
        d.wait_log("too-many-failures")


def test_route_for_the_authenticated_user_only(daemon, world):
    world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC)
    d = daemon()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    ok = route(ch, "alice@EXAMPLE.org")
    assert isinstance(ok, RouteOk)
    r = ok.to_route()
    assert (r.server, r.port, r.tls, r.user) == ("smtp.example.org", 587, TlsMode.STARTTLS, "alice")
    assert r.password.reveal() == "fm-Secret-A1"
    assert r.source.endswith("/.fetchmailrc:4")
    assert route(ch, "someone@else.org") == NoRoute()
    assert route(ch, "") == NoRoute()
    ch.close()
    # bob cannot get alice's route, whatever sender he names
    ch = d.connect()
    assert login(ch, "bob", world.users["bob"].password) == AuthOk("bob")
    assert route(ch, "alice@example.org") == NoRoute()
    log = d.wait_log("user=bob client=192.0.2.7 session=s1 sender=alice@example.org result=none")
    assert "route: user=alice client=192.0.2.7 session=s1 sender=alice@EXAMPLE.org" \
        " result=smtp.example.org:587 starttls as alice" in log


@pytest.mark.parametrize("steps,bad,reason", [
    ([], RouteRequest("alice@example.org"), "route before hello"),
    (["hello"], RouteRequest("alice@example.org"), "route before a successful auth"),
    (["hello", "fail"], RouteRequest("alice@example.org"), "route before a successful auth"),
    (["hello", "ok"], "second-auth", "second auth after a successful one"),
    (["hello"], Hello(VERSION, "s", ""), "second hello"),
    ([], Hello(VERSION + 7, "s", ""), "unsupported protocol version"),
])
def test_requests_out_of_order_are_refused(daemon, world, steps, bad, reason):
    world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC)
    d = daemon()
    ch = d.connect()
    for step in steps:
        if step == "hello":
            assert ch.request(Hello(VERSION, "s", "192.0.2.9")).TYPE == "welcome"
        elif step == "fail":
            assert ch.request(AuthRequest("alice", Secret("wrong-Pw-zz"))) == AuthFail()
        elif step == "ok":
            assert ch.request(AuthRequest("alice", Secret(world.users["alice"].password))) \
                == AuthOk("alice")
    if bad == "second-auth":
        bad = AuthRequest("bob", Secret(world.users["bob"].password))
    reply = ch.request(bad)
    assert isinstance(reply, Error) and reason in reply.reason
    assert "fm-Secret-A1" not in repr(reply)
    assert closed_after(ch)
    d.wait_log(reason)
    # the daemon keeps serving everyone else
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")


@pytest.mark.parametrize("payload,reason", [
    (raw_frame({"type": "route", "sender": "a@b.c", "user": "alice"}), "unexpected keys"),
    (raw_frame({"type": "su", "user": "root"}), "unexpected message type"),
    (raw_frame([1, 2, 3]), "one map"),
    (raw_frame({"type": "hello", "version": True, "session": "s", "client": ""}), "integer"),
    (struct.pack(">I", 1 << 30) + b"x" * 100, "frame length"),
    (struct.pack(">I", 0), "frame length"),
    (struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", "undecodable"),
])
def test_malformed_frames_get_an_error_and_close(daemon, world, payload, reason):
    d = daemon()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.socket_path)
    s.sendall(payload)
    s.settimeout(5)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    assert b"error" in data and reason.encode() in data
    assert "Traceback" not in d.wait_log("protocol error")
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")


def test_frames_split_byte_by_byte_and_pipelined(daemon, world):
    world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC)
    d = daemon()
    from sendooway_shared.protocol import encode
    blob = (encode(Hello(VERSION, "s", "192.0.2.1"))
            + encode(AuthRequest("alice", Secret(world.users["alice"].password)))
            + encode(RouteRequest("alice@example.org")))
    ch = d.connect()
    for i in range(len(blob)):
        ch.sock.sendall(blob[i:i + 1])
    assert ch.receive().TYPE == "welcome"
    assert ch.receive() == AuthOk("alice")
    assert ch.receive().TYPE == "route_ok"


def test_other_uids_are_refused(daemon, world):
    import shutil
    import tempfile
    public = tempfile.mkdtemp(prefix="sendooway-test-")  # reachable by carol
    os.chmod(public, 0o755)
    try:
        _other_uids_are_refused(daemon, world, os.path.join(public, "run", "auth.sock"))
    finally:
        shutil.rmtree(public, ignore_errors=True)


def _other_uids_are_refused(daemon, world, path):
    d = daemon(socket_path=path)
    carol = world.users["carol"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a process running as carol tries to talk to the daemon
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(carol.gid)
            os.setuid(carol.uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(d.socket_path)
                os.write(w, b"connected")
            except PermissionError:
                os.write(w, b"denied")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    assert os.read(r, 100) == b"denied"  # the socket's mode keeps carol out
    os.waitpid(pid, 0)
    os.close(r)
    # with the mode opened up, SO_PEERCRED still refuses her
    os.chmod(d.socket_path, 0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(carol.gid)
            os.setuid(carol.uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket_path)
            s.settimeout(5)
            from sendooway_shared.protocol import encode
            try:  # the daemon may already have closed it: both count as refused
                s.sendall(encode(Hello(VERSION, "s", "")))
                answer = s.recv(100)
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
            os.write(w, b"closed" if answer == b"" else b"answered")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    assert os.read(r, 100) == b"closed"
    os.waitpid(pid, 0)
    os.close(r)
    assert f"peer refused: uid={carol.uid}" in d.wait_log("peer refused")


def test_hostile_files_do_not_stall_the_daemon(daemon, world):
    u = world.users["alice"]
    fifo = os.path.join(u.home, ".fetchmailrc")
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, u.uid, u.gid)
    os.symlink("/etc/shadow", os.path.join(u.home, "shadow.rc"))
    world.write_user_file("alice", "quotes.rc", 'user a pass "fm-Secret-A1\n#sendooway:address "x@y.z"\n')
    world.write_user_file("alice", ".getmail/getmailrc", b"\x00\x01 not ini \xff" * 1000)
    d = daemon("smarthostMapping = fetchmail:%h/.fetchmailrc\n"
               "smarthostMapping = fetchmail:%h/shadow.rc\n"
               "smarthostMapping = fetchmail:%h/quotes.rc\n"
               "smarthostMapping = getmail:%h/.getmail/getmailrc\n"
               "smarthostMapping = direct:*@lan.example relay.lan 25 noAuth\n")
    ch = d.connect()
    assert login(ch, "alice", u.password) == AuthOk("alice")
    t = time.monotonic()
    assert route(ch, "x@y.z") == NoRoute()
    ok = route(ch, "a@lan.example")
    assert time.monotonic() - t < 3
    assert ok.to_route().server == "relay.lan" and not ok.to_route().auth
    log = d.wait_log("getmailrc:1: contains NUL bytes")
    assert f"user file error: user=alice {fifo}: not-regular (a FIFO)" in log
    assert f"{u.home}/shadow.rc: unreadable (Permission denied)" in log
    assert f"{u.home}/quotes.rc:1: unbalanced quote" in log


def test_sigterm_exits_cleanly_and_removes_the_socket(daemon, world):
    d = daemon()
    ch = d.connect()  # an open connection does not hold up the exit
    login(ch, "alice", world.users["alice"].password)
    assert d.stop() == 0
    assert not os.path.exists(d.socket_path)
    assert "stopped" in d.log()


def test_stale_socket_is_replaced_but_a_live_one_is_not(tmp_path, tmp_config, world):
    conf = tmp_config("")
    d1 = Daemon(tmp_path / "a", conf)
    os.makedirs(d1.dir)
    os.makedirs(os.path.dirname(d1.socket_path))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(d1.socket_path)
    stale.close()  # a socket file nobody listens on
    d1.start()
    try:
        assert "removed stale socket" in d1.log()
        d2 = Daemon(tmp_path / "a", conf)
        d2.log_path = os.path.join(d1.dir, "second.log")
        import subprocess
        res = subprocess.run(d2.args, capture_output=True, text=True, timeout=20)
        assert res.returncode == 2
        assert "another authenticator is listening" in res.stderr
        ch = d1.connect()
        assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    finally:
        assert d1.stop() == 0


def test_ldap_backend_without_its_settings_is_refused_at_startup(tmp_path, tmp_config):
    import subprocess
    import sys
    conf = tmp_config("authBackend = LDAP\n")
    res = subprocess.run([sys.executable, "-m", "sendooway_auth.cli", "-c", conf, "-l", "-",
                          "--socket", str(tmp_path / "s" / "auth.sock")],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 2
    assert "authBackend = LDAP: " in res.stderr and "ldapUri is not set" in res.stderr
    assert "ldapAuthDN must name the user's entry with %u" in res.stderr
    assert not (tmp_path / "s" / "auth.sock").exists()


def test_backend_none_is_refused_for_a_root_authenticator(tmp_path, tmp_config):
    """authBackend = none logs in the account sendooway-auth runs as without a
    password: as root that would be root, from the network."""
    import subprocess
    import sys
    conf = tmp_config("\nauthBackend = none\n")
    res = subprocess.run([sys.executable, "-m", "sendooway_auth.cli", "-c", conf, "-l", "-",
                          "--socket", str(tmp_path / "s" / "auth.sock")],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 2
    assert f"{conf}:2: authBackend = none logs in the account sendooway-auth runs as" in res.stderr
    assert not (tmp_path / "s" / "auth.sock").exists()


def test_backend_none_accepts_only_the_process_user(world):
    """The rule itself, for a sendooway-auth run as one user (here: alice)."""
    from sendooway_auth._service import AuthService
    from sendooway_shared.config import parse_config

    svc = AuthService(parse_config("authBackend = none\n", "c"), None, None, None)
    svc._process_uid = world.users["alice"].uid
    user, reason = svc._check_blocking("alice", Secret("whatever"))
    assert user is not None and user.name == "alice" and reason == ""
    assert svc._check_blocking("bob", Secret(world.users["bob"].password)) == (
        None, "not-process-user")


def test_a_route_that_cannot_be_sent_is_no_route(daemon, world):
    # (a user name too long for the wire: a 300-octet server name is now a
    # file:line error of its own, see test_config's server checks)
    world.write_user_file("alice", ".fetchmailrc", (
        'user ' + "u" * 2000 + ' pass p\n#sendooway:server "s.x.org"\n#sendooway:address "a@x.org"\n'
        'user u pass p\n#sendooway:server "fine.x.org"\n#sendooway:address "b@x.org"\n'))
    d = daemon()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    assert route(ch, "a@x.org") == NoRoute()
    assert route(ch, "b@x.org").to_route().server == "fine.x.org"
    log = d.wait_log("route unusable: user=alice")
    assert "Traceback" not in log and "internal error" not in log


def test_a_dead_fork_server_stops_the_daemon_with_status_1_for_a_restart(daemon, world):
    """Without its fork server no route lookup can work (every MAIL would
    get 451 until someone restarts it by hand), and a new one cannot safely
    be forked from the threaded daemon: it says so and exits 1, which
    systemd's Restart=on-failure turns into a new authenticator. It used
    to serve on, answering every new user's lookup with a temporary
    failure."""
    world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC)
    d = daemon()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    os.kill(fork_server(d), 9)
    assert d.proc.wait(10) == 1
    log = d.wait_log("stopped")
    assert "reader fork server killed by SIGKILL" in log
    assert "restart" in log and "Traceback" not in log
    assert not os.path.exists(d.socket_path)


def test_fork_server_and_workers_keep_no_daemon_descriptors(daemon, world):
    d = daemon()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    assert route(ch, "alice@example.org") == NoRoute()  # the worker is there
    for pid in (fork_server(d), *workers(d, 1)):
        # (the fork server holds a socketpair for a moment while it makes a
        # worker: seen as 3 descriptors once in a loaded run; a leak stays)
        deadline = time.monotonic() + 3
        while True:
            fds = os.listdir(f"/proc/{pid}/fd")
            targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds if int(fd) > 2]
            assert not any(d.log_path in t for t in targets)
            if len(targets) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(targets) == 1 and targets[0].startswith("socket:"), targets


def test_no_core_dumps_where_passwords_live(daemon):
    d = daemon()
    with open(f"/proc/{d.proc.pid}/limits") as f:
        line = next(l for l in f if l.startswith("Max core file size"))
    assert line.split()[4:6] == ["0", "0"], line


def test_a_crafted_user_name_cannot_frame_another_address(daemon):
    """fail2ban must ban the real client, whatever the user name says."""
    import re
    d = daemon()
    ch = d.connect()
    evil = "x client=203.0.113.66 reason=wrong-password\nauth failed: user=y client=203.0.113.67"
    assert login(ch, evil, "wrong-Pw-zz") == AuthFail()
    log = d.wait_log("auth failed:")
    failregex = re.compile(r"auth failed: user=\S* client=(?P<host>[0-9a-fA-F.:]+)(?::\d+)? reason=")
    hosts = [m.group("host") for m in map(failregex.search, log.splitlines()) if m]
    assert hosts == ["192.0.2.7"]


def test_connections_past_the_limit_are_refused_with_one_log_line_now_and_then(tmp_path,
                                                                              tmp_config):
    """With the descriptor limit at 260 the daemon serves 60 connections at
    once (260 - 200 kept for PAM, NSS and workers). The connections past it
    are closed at once; their warning came once per attempt (a flood of 300
    lines a second from one process), now once per 10 s with a count."""
    d = Daemon(tmp_path / "d", tmp_config("", "auth.conf"))
    d.args = ["prlimit", "--nofile=260:260", "--", *d.args]
    os.makedirs(d.dir)
    d.start()
    held = []
    try:
        for _ in range(60):
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.socket_path)
            held.append(s)
        time.sleep(0.3)
        closed = 0
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect(d.socket_path)
            closed += s.recv(1) == b""  # closed at once by the daemon
            s.close()
        assert closed == 40
        held[0].close()  # one slot free again: a new connection is served
        time.sleep(0.3)
        s = socket.socket(socket.AF_UNIX)
        s.connect(d.socket_path)
        s.sendall(encode(Hello(VERSION, "s1", "127.0.0.1")))
        s.settimeout(5)
        assert s.recv(4096)
        s.close()
    finally:
        for s in held:
            s.close()
        d.stop()  # (the refusals not yet told are told when it stops)
    lines = [line for line in d.log().splitlines() if "connection refused:" in line]
    assert len(lines) == 2, lines
    assert "(limit 60); 1 refused since the last such line" in lines[0], lines
    assert "(limit 60); 39 refused since the last such line" in lines[1], lines
