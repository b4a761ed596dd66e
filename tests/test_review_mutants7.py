"""Tests written from a mutation-testing review of the frontend's start-up
and privilege handling: the drop to frontendUser (_privileges), the command
line (cli) and the listening server (_server). Each pins down behaviour that
a small change to that code (a check dropped, an id swapped, a branch
turned) left unnoticed by the rest of the suite; each docstring names what
it guards. Real parts throughout: the installed `sendooway` started as root
in the fake world (nss_wrapper users), read from outside via /proc."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time

import pytest

from sendooway_front._server import listen_sockets, parse_bind

from .auth_helpers import alive as _alive, children
from .fakeworld import free_port, free_port_everywhere
from .front_util import (
    FRONT, Frontend, front_config, open_tmp, proc_ids, socket_client_session, wait_port,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend starts as root")

SPLIT_UID, SPLIT_GID = 40077, 41001  # a frontendUser whose gid is not its uid


def _config(tmp_path, extra: str = "") -> str:
    cfg = tmp_path / "front.conf"
    cfg.write_text(f"authSocket = {tmp_path / 'none.sock'}\ntimeout = 10\n{extra}")
    os.chmod(tmp_path, 0o755)
    os.chmod(cfg, 0o644)
    return str(cfg)


def _world_with_split_user(world, tmp_path) -> dict[str, str]:
    """The world's environment with one more account, `split`, whose primary
    group (mailusers) differs from its uid."""
    passwd = tmp_path / "passwd"
    with open(world.passwd) as f:
        text = f.read()
    passwd.write_text(text + f"split:x:{SPLIT_UID}:{SPLIT_GID}:split:/nonexistent:/bin/sh\n")
    os.chmod(passwd, 0o644)
    env = dict(os.environ)
    env["NSS_WRAPPER_PASSWD"] = str(passwd)
    return env


def _start(argv, env=None, prefix=()) -> subprocess.Popen:
    return subprocess.Popen([*prefix, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def _end(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    if proc.poll() is None:
        proc.stdin.write(b"QUIT\r\n")
        proc.stdin.flush()
    try:
        return proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=5)


def test_the_drop_takes_frontend_users_own_group_not_its_uid(world, tmp_path):
    """The serving process's four gids are frontendUser's primary group and
    its four uids its uid, with no supplementary groups left: with nobody
    (uid == gid) a drop that set the gid from the uid, or kept root's groups,
    looked right."""
    env = _world_with_split_user(world, tmp_path)
    cfg = _config(tmp_path, "frontendUser = split\n")
    proc = _start([FRONT, "-c", cfg, "-l", "&2"], env=env)
    try:
        first = proc.stdout.readline()
        assert first.startswith(b"220 "), (first, proc.poll())
        ids = proc_ids(proc.pid)
        assert ids["Uid"] == [SPLIT_UID] * 4
        assert ids["Gid"] == [SPLIT_GID] * 4
        assert ids.get("Groups", []) == []
    finally:
        _end(proc)


def test_a_start_that_keeps_capabilities_across_the_uid_change_is_refused(world, tmp_path):
    """Started with SECBIT_NO_SETUID_FIXUP (a service manager's securebits)
    the kernel keeps every capability when root becomes frontendUser: setuid(0)
    then works, and the frontend must refuse to serve (exit 1, not even a
    greeting) instead of serving nobody-with-root's-powers."""
    cfg = _config(tmp_path)
    proc = _start([FRONT, "-c", cfg, "-l", "&2"],
                  prefix=("setpriv", "--securebits", "+no_setuid_fixup"))
    out, err = _end(proc)
    assert proc.returncode == 1, (out, err)
    assert out == b""
    assert b"root could be regained" in err


def test_a_start_with_real_uid_root_and_another_effective_uid_is_refused(world):
    """Real uid root, effective uid nobody (a wrapper that set only the euid,
    and the egid: root's group would be refused a checkout below a 0701
    directory such as mktemp -d's, which the test script opens only for others):
    the process could take root back with seteuid(0), so it is no
    "non-root start" to be served as it is: the drop is tried, fails, and the
    frontend refuses to serve (exit 1, no greeting)."""
    proc = _start([FRONT, "-c", "/dev/null", "-l", "&2"],
                  prefix=("setpriv", "--euid", "65534", "--egid", "65534", "--clear-groups"))
    out, err = _end(proc)
    assert proc.returncode == 1, (out, err)
    assert out == b""
    assert b"cannot become nobody" in err


@pytest.mark.parametrize("group, extra_groups", [(0, None), (41002, [41002])])
def test_the_socket_probe_asks_without_roots_group_or_supplementary_groups(world, group,
                                                                          extra_groups):
    """The authenticator's socket probe runs as frontendUser will: its gid and
    no supplementary groups. A socket root:GROUP 0660 lets the root frontend
    in through its group (its own gid 0, or a supplementary group), never
    nobody: the probe must find it root-only (the error names the fix, a
    private authenticator serves), not "there" with every session then 421."""
    import socket

    with open_tmp() as tmp:
        path = str(tmp / "auth.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(8)
            os.chown(path, 0, group)
            os.chmod(path, 0o660)
            r = subprocess.run([FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket", path],
                               input=b"QUIT\r\n", capture_output=True, timeout=30,
                               extra_groups=extra_groups)
        finally:
            listener.close()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"220 "), r.stdout
    assert b"lets root connect but not frontendUser nobody" in r.stderr, r.stderr
    assert b"started socketpair to sendooway-auth" in r.stderr, r.stderr


def test_ssl_and_nossl_together_are_a_usage_error():
    """-s (TLS at once) and -S (the channel is already safe, no TLS) contradict
    each other: a usage error (exit 2) before anything starts, not a server
    that picks one of them silently."""
    r = subprocess.run([FRONT, "-s", "-S", "-c", "/dev/null", "-l", "&2"], input=b"",
                       capture_output=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stdout == b""
    assert b"not allowed with argument" in r.stderr, r.stderr


def test_every_bind_option_listens_and_a_restart_binds_again_at_once(world):
    """-b may be given more than once: every address listens (here two ports),
    not only the last -b. And a restart right after a stop listens again on
    the same ports although the sessions it closed left TIME_WAIT behind
    (SO_REUSEADDR): the admin's restart must not fail "address in use"."""
    import socket

    with open_tmp() as tmp:
        config = front_config(tmp, world, tls=False)
        log = str(tmp / "front.log")
        for _run in (1, 2):
            if _run == 1:
                # free_port()'s pick may be taken by another process before the
                # first start binds it: then another pick (the restart, run 2,
                # must bind the same ports again: that is the point)
                for attempt in range(4):
                    other = free_port()
                    try:
                        fe = Frontend(config, log, args=("-b", f"127.0.0.1:{other}")).start()
                        break
                    except RuntimeError as exc:
                        if attempt == 3 or f"127.0.0.1:{other}: Address already in use" not in str(exc):
                            raise
            else:
                fe = Frontend(config, log, port=fe.port, args=("-b", f"127.0.0.1:{other}")).start()
            try:
                for port in (fe.port, other):
                    wait_port("127.0.0.1", port, fe.proc)
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                        c.sendall(b"NOOP\r\nQUIT\r\n")
                        got = b""
                        while chunk := c.recv(4096):  # until the server closes first
                            got += chunk
                    assert b"\r\n250 " in got and b"\r\n221 " in got, got
            finally:
                assert fe.stop() == 0, fe.log()


def test_bind_with_an_empty_host_is_every_address():
    """`-b :587` (an empty host) means every address, as `-b 587` does:
    parse_bind gives None, not "" (which getaddrinfo would refuse)."""
    assert parse_bind(":587") == (None, 587)
    assert parse_bind("[]:587") == (None, 587)


def test_bind_to_ipv6_any_and_ipv4_any_on_one_port_both_listen():
    """`-b [::]:PORT -b 0.0.0.0:PORT` (the admin naming both families): the
    IPv6 socket is IPv6 only (V6ONLY), so that the IPv4 one can bind too,
    instead of the start failing "address in use"."""
    port = free_port_everywhere()  # (bound on both families)
    socks = []
    try:
        socks += listen_sockets(*parse_bind(f"[::]:{port}"))
        socks += listen_sockets(*parse_bind(f"0.0.0.0:{port}"))
        assert len(socks) == 2
    finally:
        for s in socks:
            s.close()


def test_socket_activation_variables_for_another_process_are_ignored():
    """LISTEN_PID naming another process (variables a parent left behind):
    the frontend takes no fd 3 for systemd's socket and serves its one
    session on stdin/stdout as asked."""
    env = dict(os.environ, LISTEN_PID="1", LISTEN_FDS="1")
    r = subprocess.run([FRONT, "-c", "/dev/null", "-l", "&2"], input=b"QUIT\r\n",
                       capture_output=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"220 ") and b"\r\n221 " in r.stdout, (r.stdout, r.stderr)


def test_the_session_cap_stays_at_max_sessions_with_many_descriptors():
    """A low soft descriptor limit (1024) is raised to the hard one before the
    session cap is counted (else ~320 sessions), and however high that is,
    one listening frontend takes at most MAX_SESSIONS sessions at once: the
    authenticator takes as many connections, no more."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and (hard - 64) // 3 <= 4000:
        pytest.skip(f"a hard descriptor limit of {hard} is below the cap anyway")
    probe = ("import resource\n"
             "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
             "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))\n"
             "from sendooway_front._server import MAX_SESSIONS, session_limit\n"
             "print(session_limit(), MAX_SESSIONS)\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    got, cap = map(int, r.stdout.split())
    assert got == cap == 4000


@contextlib.contextmanager
def _root_b_serving(world):
    """A root `sendooway -b` with no daemon, serving: (the Frontend, the pid
    of its private authenticator's watcher). Waits for its "listening on": the
    port listens from early in the start-up on, before the authenticator
    and the drop, when a signal is only noted."""
    with open_tmp() as tmp:
        fe = Frontend(front_config(tmp, world, tls=False), str(tmp / "front.log")).start()
        try:
            deadline = time.monotonic() + 10
            # (its own line: the private authenticator logs "listening on" too)
            while f"sendooway[{fe.proc.pid}]: listening on" not in fe.log():
                assert time.monotonic() < deadline, fe.log()
                time.sleep(0.05)
            (watcher,) = children(fe.proc.pid)
            yield fe, watcher
        finally:
            fe.stop()


def test_sigint_stops_a_listening_frontend_cleanly(world):
    """SIGINT (Ctrl-C in a terminal running `sendooway -b`) stops the server
    as SIGTERM does: it exits 0 at once and logs that it stopped, instead of
    noting the signal and serving on; and the private authenticator it
    started as root (no daemon here) is told to stop at once (its lifeline
    closed), not waited for in vain for 10 s."""
    import signal

    with _root_b_serving(world) as (fe, watcher):
        fe.proc.send_signal(signal.SIGINT)
        assert fe.proc.wait(5) == 0, fe.log()
        assert "stopped" in fe.log(), fe.log()
        assert not _alive(watcher)


def test_log_to_stderr_where_stderr_is_the_client_is_a_start_up_error(tmp_path):
    """xinetd makes the connection fd 0, 1 and 2; with `-l '&2'` there the
    log could only be thrown away (stderr is muted so that nothing reaches
    the client): the start fails with 421 to the client and exit 2, instead
    of serving sessions whose every log line is lost."""
    seen, rc = socket_client_session(
        [FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket", str(tmp_path / "none.sock")],
        b"EHLO client.test\r\n")
    assert seen.startswith(b"421 "), seen
    assert rc == 2


def test_a_log_that_cannot_be_opened_exits_2():
    """-l naming a file in a directory that does not exist: a start-up error
    with the configuration's exit status 2 (what the admin must fix), and
    not a byte to the client."""
    r = subprocess.run([FRONT, "-c", "/dev/null", "-l", "/nonexistent-dir/front.log"],
                       input=b"QUIT\r\n", capture_output=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stdout == b""
    assert b"cannot open log /nonexistent-dir/front.log" in r.stderr, r.stderr


def test_implicit_tls_with_an_unreadable_key_is_a_start_up_error_in_one_session(tmp_path):
    """-s (SMTPS) on stdin/stdout with a key that cannot be loaded: nothing
    can be served (the client expects a TLS handshake first), so the start
    fails with exit 2 naming the key, as with -b; only a STARTTLS session
    may go on with STARTTLS refused."""
    cfg = _config(tmp_path, f"sslCert = {tmp_path / 'no.pem'}\nsslKey = {tmp_path / 'no.key'}\n")
    r = subprocess.run([FRONT, "-s", "-c", cfg, "-l", "&2"], input=b"",
                       capture_output=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stdout == b""
    assert b"no.pem" in r.stderr or b"no.key" in r.stderr, r.stderr


def test_implicit_tls_without_a_certificate_is_a_start_up_error():
    """-s with no sslCert/sslKey configured (-c /dev/null): exit 2 naming the
    missing sslCert, not a server that cannot do the handshake it promised."""
    r = subprocess.run([FRONT, "-s", "-c", "/dev/null", "-l", "&2"], input=b"",
                       capture_output=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stdout == b""
    assert b"no TLS certificate file configured (sslCert)" in r.stderr, r.stderr


@pytest.mark.parametrize("bind", ["127.0.0.1:99999", "busy"])
def test_a_bind_that_cannot_listen_exits_2(bind):
    """-b with a bad port, or an address someone else listens on: a start-up
    error with exit 2 (the admin's to fix) that says what, not exit 1."""
    import socket

    with socket.socket() as taken:
        if bind == "busy":
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            bind = "127.0.0.1:%d" % taken.getsockname()[1]
        r = subprocess.run([FRONT, "-c", "/dev/null", "-l", "&2", "-b", bind],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert b"port must be a number" in r.stderr or b"cannot listen on" in r.stderr, r.stderr


def test_a_root_frontend_refuses_to_start_a_root_authenticator_for_authbackend_none(tmp_path):
    """authBackend = none logs in the authenticator's own account without a
    password; the private authenticator a root frontend starts runs as root:
    the frontend refuses at start (exit 2, the line named), before greeting
    anyone, rather than leaving it to the authenticator it starts."""
    cfg = _config(tmp_path, "authBackend = none\n")
    r = subprocess.run([FRONT, "-c", cfg, "-l", "&2"], input=b"QUIT\r\n",
                       capture_output=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stdout == b""
    assert b"front.conf:3: authBackend = none logs in the account" in r.stderr, r.stderr


def test_a_private_authenticator_that_died_makes_the_frontend_exit_1(world):
    """sendooway(1): a root `sendooway -b` whose private authenticator died
    stops with exit status 1, so that a service manager starts both again;
    a regular stop is 0 (the test above). Killed here with SIGKILL; the next
    login finds it gone."""
    import signal
    import socket

    with _root_b_serving(world) as (fe, watcher):
        # (the watcher's other child is the reader of its lifeline, a shell)
        (daemon,) = [pid for pid in children(watcher)
                     if b"sendooway-auth" in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[1]]
        os.kill(daemon, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while _alive(daemon):  # (its listening socket goes with it)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        while fe.proc.poll() is None:  # logins until one finds it gone
            assert time.monotonic() < deadline, fe.log()
            try:
                with socket.create_connection((fe.host, fe.port), timeout=5) as c:
                    c.sendall(b"EHLO client.test\r\nAUTH PLAIN AGFsaWNlAHdyb25n\r\n")
                    while c.recv(4096):
                        pass
            except OSError:
                time.sleep(0.1)
        assert fe.proc.wait(10) == 1, fe.log()
        assert "private authenticator" in fe.log() and "is gone" in fe.log(), fe.log()


def test_out_of_descriptors_at_start_is_one_line_and_exit_1_not_a_traceback():
    """A service with a very low descriptor limit (here 10): the start runs
    out of descriptors where no step looks for it; the admin reads one line
    saying why (exit 1), not a traceback."""
    r = subprocess.run(["prlimit", "--nofile=10", FRONT, "-c", "/dev/null", "-l", "&2"],
                       input=b"QUIT\r\n", capture_output=True, timeout=30)
    assert r.returncode == 1, r.stderr
    assert b"Traceback" not in r.stderr, r.stderr
    assert b"sendooway: Too many open files" in r.stderr, r.stderr


def test_a_usage_error_under_inetd_gives_the_client_a_421():
    """A wrong option in inetd's server_args: the client hears 421 (and the
    admin finds the usage error in syslog), not a closed connection with
    argparse's usage text on a stderr that is the client."""
    seen, rc = socket_client_session([FRONT, "--no-such-option"], b"EHLO client.test\r\n")
    assert seen.startswith(b"421 ") and b"usage" not in seen, seen
    assert rc == 2


def test_a_start_as_nobody_warns_that_the_account_is_shared():
    """Started as nobody (xinetd `user = nobody`): the log warns that other
    services' processes running as nobody could open its memory until it
    made itself non-dumpable, and says to start it as root or an account of
    its own."""
    r = subprocess.run([FRONT, "-c", "/dev/null", "-l", "&2"], input=b"QUIT\r\n",
                       capture_output=True, timeout=30, user=65534, group=65534, extra_groups=[])
    assert r.stdout.startswith(b"220 "), (r.stdout, r.stderr)
    assert b"started as nobody, an account other services may share" in r.stderr, r.stderr
