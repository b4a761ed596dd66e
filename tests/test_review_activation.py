"""Review of socket activation and of the authenticator socket, played
hostile (a review named "activation"): both programs started as systemd
starts them, by the real `systemd-socket-activate` and by hand-made
environments (LISTEN_PID/LISTEN_FDS with crafted descriptors on fd 3...),
and the socket between the frontend and the authenticator attacked by a
process that runs as the frontend's own account (nobody, which other
services share).

What it found (each fixed, each test below failed before its fix):
- The frontend trusted a listener at authSocket running as its own account
  (frontendUser, nobody) whatever the authBackend: another service running
  as nobody that could bind the name got every password. Now only root,
  but for authBackend = none (docs/security.md said so already).
- The frontend took what systemd passed without looking: a UDP socket was
  a traceback, an unconnected socket a session going nowhere (exit 0), a
  huge LISTEN_FDS a loop that never ended, a LISTEN_FDS that is no number
  a session on /dev/null. Now one line naming the descriptor, exit 2.
  Whether it serves one inetd session now also looks at LISTEN_PID. On a
  connection passed as fd 3 alone, a start-up failure closed it without
  the 421 an inetd client gets. With -b as well, systemd's sockets were
  held and never served.
- sendooway-auth given a connection (Accept=yes) stopped with "Invalid
  argument", exit 1 (a restart loop); its second and later sockets stayed
  inheritable (PAM helpers got them); a NOTIFY_SOCKET too long was logged
  as ": None".
- --auth-socket / --socket too long for a socket address were not refused
  (the frontend silently used an authenticator of its own, the daemon made
  the directory first); a long TMPDIR kept `sendooway -b` as root from
  starting at all (its private authenticator's socket path).
- A stranger connecting to the daemon in a loop (a socket unit without
  SocketMode=) wrote one log line per attempt.
- A socket directory closed to frontendUser (root 0700) was accepted
  without a word, and the frontend advised giving the socket to nobody,
  whose it already was. Both now name the directory.

Seen and fine: LISTEN_PID of another process ignored (and the variables
removed before any child starts: none reaches the private authenticator),
UNIX and dual-stack listening sockets served (an IPv4 client logged as
IPv4), fd 3 a file, a socket given to the daemon with the wrong family,
NOTIFY_SOCKET missing, abstract, a file or absent, READY=1 only after
listen(), RELOADING=1/READY=1 on SIGHUP, STOPPING=1 on SIGTERM, a symlink
or a file at the daemon's socket path refused, a directory of another
user's refused.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import types

import pytest

from sendooway_shared.cli import EXIT_CONFIG
from sendooway_shared.protocol import VERSION, Welcome, encode
from tests.fakeworld import become
from tests.front_util import FRONT, NOBODY, front_config, login_plain

AUTH = os.path.join(os.path.dirname(FRONT), "sendooway-auth")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts the programs as root")

NOBODY_USER = types.SimpleNamespace(uid=NOBODY, gid=NOBODY)



def welcome_and_listen(conn: socket.socket) -> bytes:
    """A squatter's answer on one connection: Welcome, then all the frontend
    sends (a password among it, if it trusted us) until it closes; closed."""
    got = b""
    conn.settimeout(2)
    try:
        conn.sendall(encode(Welcome(VERSION)))
        while chunk := conn.recv(4096):
            got += chunk
    except OSError:
        pass
    conn.close()
    return got

def _squat(path: str, as_user) -> tuple[int, int]:
    """Fork a process running as `as_user` that listens at `path`, plays
    the authenticator (a welcome) and reports what its connections sent.
    Returns (pid, read end of its report)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            become(as_user)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            os.chmod(path, 0o777)
            s.listen(8)
            os.write(w, b"R")
            s.settimeout(8)
            got = b""
            try:
                for _ in range(4):  # probes first, then the session's link
                    conn, _ = s.accept()
                    got += welcome_and_listen(conn)
            except OSError:
                pass
            os.write(w, got)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"R"
    return pid, r


def _report(pid: int, r: int) -> bytes:
    got = b""
    while chunk := os.read(r, 65536):
        got += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return got


def test_a_squatter_running_as_the_frontend_user_gets_no_password(world, tmp_path):
    """DEFECT: the frontend trusted a listener at authSocket that runs as
    its own account (frontendUser, nobody by default) whatever the
    authBackend, where docs/security.md says: uid 0, or its own uid only
    for `authBackend = none` (the single-user daemon). nobody is shared by
    other services (the shipped units start the frontend as root for that
    very reason); one of them that could bind authSocket (a directory
    others may write to: no daemon refuses it in the xinetd `user = root`
    set-up, which runs none) got every login's user name and UNIX password
    from a root-started frontend.
    Now: with authBackend PAM (or LDAP) only a root listener is trusted;
    the frontend treats the squatter as no daemon and starts its own
    authenticator."""
    shared = tempfile.mkdtemp(prefix="sendooway-rv-act-")
    try:
        os.chmod(shared, 0o1777)
        path = os.path.join(shared, "auth.sock")
        pid, r = _squat(path, NOBODY_USER)
        try:
            config = front_config(tmp_path, world, f"authSocket = {path}\ntimeout = 5\n", tls=False)
            password = world.users["alice"].password
            script = f"EHLO c.test\r\nAUTH PLAIN {login_plain('alice', password)}\r\nQUIT\r\n"
            res = subprocess.run([FRONT, "-c", config, "-l", str(tmp_path / "front.log")],
                                 input=script.encode(), capture_output=True, timeout=30)
        finally:
            stolen = _report(pid, r)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert password.encode() not in stolen, "nobody's listener at authSocket heard alice's password"
    assert b"\r\n235 " in res.stdout, res.stdout  # her login, by the frontend's own authenticator
    log = (tmp_path / "front.log").read_text()
    assert password not in log


# ------------------------------------------------------------ socket activation


def _activated(argv, fds, count: str, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
               **kwargs) -> subprocess.Popen:
    """`argv` started as systemd starts it: `fds` become 3, 4, ... and
    LISTEN_PID is its own pid (the shell's, which then execs)."""
    script = f'export LISTEN_PID=$$ LISTEN_FDS={count}; exec "$@"'

    def place():
        for i, fd in enumerate(fds):
            os.dup2(fd, 3 + i)

    return subprocess.Popen(["sh", "-c", script, "sh", *argv], preexec_fn=place,
                            pass_fds=[3 + i for i in range(len(fds))], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=stderr, text=True, **kwargs)


def _finish(proc: subprocess.Popen, seconds: float = 30) -> tuple[int | None, str, str]:
    """(status, stdout, stderr); status None when it was still running after
    `seconds` (then killed)."""
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def _udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return [s], "1"


def _unconnected():
    return [socket.socket(socket.AF_INET, socket.SOCK_STREAM)], "1"


def _too_many():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    return [s], "100000000"


@pytest.mark.parametrize("make,said", [
    (_udp, "systemd passed no usable socket: fd 3 is not a TCP or UNIX stream socket"),
    (_unconnected, "systemd passed no usable socket: fd 3 is neither listening nor connected"),
    (_too_many, "systemd passed 100000000 descriptors: fd 4 is not open"),
    (lambda: ([], "many"), "LISTEN_FDS='many' is not a number of sockets"),
    (lambda: ([], "-1"), "LISTEN_FDS='-1' is not a number of sockets"),
    (lambda: ([], "\u00b2"), "LISTEN_FDS='\u00b2' is not a number of sockets"),
], ids=["udp", "unconnected", "huge-count", "garbage", "negative", "superscript"])
def test_the_frontend_refuses_what_systemd_passed_that_it_cannot_serve(world, tmp_path, make, said):
    """DEFECT: the frontend took every descriptor from systemd that was a
    socket but not listening for the one connection (Accept=yes): a UDP
    socket (a unit with ListenDatagram=) ended in a traceback
    ("A Stream Socket was expected"), a socket neither listening nor
    connected was "served" (a session that wrote its greeting nowhere, exit
    0); LISTEN_FDS=100000000 with one socket made it try every number up to
    there (it never started); a LISTEN_FDS that is no number was taken for
    0 and a session served on stdin (/dev/null under systemd).
    Now: one line naming the descriptor (or the variable), exit 2, before
    any authenticator is started."""
    socks, count = make()
    config = front_config(tmp_path, world, tls=False)
    proc = _activated([FRONT, "-c", config, "-l", "&2"], [s.fileno() for s in socks], count)
    for s in socks:
        s.close()
    status, out, err = _finish(proc)
    assert status == EXIT_CONFIG, (status, err)
    assert f"sendooway: {said}" in err
    assert "Traceback" not in err and "sendooway-auth" not in err
    assert out == ""


def test_listen_variables_of_another_process_leave_the_inetd_checks_in_place(world, tmp_path):
    """DEFECT: whether the frontend serves one session (inetd) was decided
    by LISTEN_FDS alone, though the variables count only when LISTEN_PID
    is its own pid (sd_listen_fds(3); activated_sockets did look). With
    variables a socket-activated parent left behind, xinetd's `wait = yes`
    (a listening socket on stdin) was no longer refused at start: the
    frontend forked a root authenticator and sat on the listening socket
    (the loop the outside review ended). Now the same refusal as without
    those variables."""
    config = front_config(tmp_path, world, tls=False)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    env = dict(os.environ, LISTEN_PID="1", LISTEN_FDS="1")
    proc = subprocess.Popen([FRONT, "-c", config, "-l", "&2"], stdin=listener.fileno(), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listener.close()
    status, _out, err = _finish(proc)
    assert status == EXIT_CONFIG, (status, err)
    assert "stdin is a listening socket" in err
    assert "sendooway-auth" not in err


def test_the_authenticator_refuses_a_connection_for_its_listening_socket(tmp_path, tmp_config):
    """DEFECT: a connected socket as fd 3 (sendooway-auth.socket with
    Accept=yes, a sendooway-auth@.service made after the frontend's) made
    the daemon stop with "cannot start: Invalid argument" (listen() on a
    connection), exit 1: Restart=on-failure starts it again and again and
    nothing says what is wrong. Now exit 2 saying so."""
    ours, theirs = socket.socketpair()
    proc = _activated([AUTH, "-c", tmp_config(""), "-l", "&2", "--socket",
                       str(tmp_path / "own" / "x.sock")], [theirs.fileno()], "1")
    theirs.close()
    status, _out, err = _finish(proc)
    ours.close()
    assert status == EXIT_CONFIG, (status, err)
    assert ("sendooway-auth: the socket systemd passed is a connection, not a listening socket:"
            " sendooway-auth.socket must not have Accept=yes") in err
    assert "Invalid argument" not in err and "Traceback" not in err
    assert not (tmp_path / "own").exists()


def _cloexec(pid: int, fd: int) -> bool:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        flags = next(line for line in f if line.startswith("flags:")).split()[1]
    return bool(int(flags, 8) & 0o2000000)


def test_the_sockets_the_authenticator_does_not_use_reach_no_child(tmp_path, tmp_config):
    """DEFECT: given two sockets, the daemon serves the first and says so,
    but left the second inheritable: every program it or PAM executes
    (unix_chkpwd, a pam_exec script) got a listening socket of the
    authenticator's. Now close-on-exec, like the first."""
    listeners = []
    for name in ("first.sock", "second.sock"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / name))
        s.listen(4)
        listeners.append(s)
    log = tmp_path / "auth.log"
    proc = _activated([AUTH, "-c", tmp_config(""), "-l", str(log)],
                      [s.fileno() for s in listeners], "2")
    for s in listeners:
        s.close()
    try:
        deadline = time.monotonic() + 20
        while "started: listening on the socket from systemd" not in (
                log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        assert _cloexec(proc.pid, 3)
        assert _cloexec(proc.pid, 4), "the second socket would reach the daemon's children"
    finally:
        proc.terminate()
        assert _finish(proc)[0] == 0


def test_a_notify_socket_path_too_long_is_named_with_its_reason(tmp_path, tmp_config):
    """DEFECT: NOTIFY_SOCKET longer than a UNIX socket path may be (a
    mistyped drop-in) was logged as "cannot notify systemd at PATH: None":
    that OSError has no strerror. Now the reason; the daemon serves on."""
    long_path = "/run/" + "n" * 120
    log = tmp_path / "auth.log"
    proc = subprocess.Popen([AUTH, "-c", tmp_config(""), "-l", str(log), "--socket",
                             str(tmp_path / "run" / "auth.sock")],
                            env=dict(os.environ, NOTIFY_SOCKET=long_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while "cannot notify systemd" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        assert (tmp_path / "run" / "auth.sock").exists()
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    line = next(x for x in log.read_text().splitlines() if "cannot notify systemd" in x)
    assert line.endswith(f"cannot notify systemd at {long_path}: AF_UNIX path too long"), line


# ------------------------------------------------------------ socket paths


def test_socket_path_options_too_long_are_usage_errors(world, tmp_path, tmp_config):
    """DEFECT: `--auth-socket` longer than a socket address may be (the
    config's authSocket is refused so, the option was not) was a daemon
    "not there": a root frontend served with an authenticator of its own,
    silently ignoring the option (under the units: 421 for every session),
    and `sendooway-auth --socket` made that path's directory (as root)
    before failing to bind in it. Now both are usage errors, nothing made."""
    where = tmp_path / ("d" * 110)
    long_path = str(where / "auth.sock")
    config = front_config(tmp_path, world, tls=False)
    res = subprocess.run([FRONT, "-c", config, "-l", "&2", "--auth-socket", long_path],
                         input=b"QUIT\r\n", capture_output=True, timeout=30)
    assert res.returncode == EXIT_CONFIG, res
    assert b"argument --auth-socket: path too long for a UNIX socket" in res.stderr
    assert b"220 " not in res.stdout and b"sendooway-auth" not in res.stderr
    res = subprocess.run([AUTH, "-c", tmp_config(""), "-l", "&2", "--socket", long_path],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == EXIT_CONFIG, res
    assert "argument --socket: path too long for a UNIX socket" in res.stderr
    assert not where.exists()


def test_a_long_tmpdir_does_not_keep_a_listening_frontend_from_starting(world, tmp_path):
    """DEFECT: `sendooway -b` started as root with no daemon puts its
    private authenticator's socket in a new directory under $TMPDIR; a
    TMPDIR of some 80 characters made that path too long for a socket and
    the start failed ("cannot start: AF_UNIX path too long"), /run and
    /tmp untried. Now a base too long is skipped like one frontendUser
    cannot reach."""
    from tests.front_util import Frontend

    base = tempfile.mkdtemp(prefix="sendooway-rv-act-")  # (tmp_path: root's alone)
    try:
        os.chmod(base, 0o755)  # frontendUser may reach what is made in it
        long_tmp = os.path.join(base, "t" * 80)
        os.mkdir(long_tmp, 0o755)
        config = front_config(tmp_path, world, tls=False)
        front = Frontend(config, str(tmp_path / "front.log"), env=dict(os.environ, TMPDIR=long_tmp))
        try:
            front.start()
            with front.smtp() as client:
                assert client.ehlo()[0] == 250
        finally:
            assert front.stop() == 0, front.log()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert "no authenticator at" in front.log() and "started /" in front.log()


def test_the_real_socket_activate_with_accept_gets_the_clear_refusal(tmp_path, tmp_config):
    """The same as a unit would do it: `systemd-socket-activate --accept`
    (sendooway-auth.socket with Accept=yes, as the frontend's socket has)
    starts the daemon per connection with that connection as fd 3: each
    start logs why it cannot serve it (was: "cannot start: Invalid
    argument") and the connection is closed without a byte."""
    if not shutil.which("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate not installed")
    path, log = tmp_path / "auth.sock", tmp_path / "auth.log"
    proc = subprocess.Popen(["systemd-socket-activate", "--accept", "-l", str(path),
                             AUTH, "-c", tmp_config(""), "-l", str(log)],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.settimeout(30)
        assert client.recv(64) == b""  # closed by the daemon's exit, nothing sent
        client.close()
        while "cannot start" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(15)
    text = log.read_text()
    assert ("cannot start: the socket systemd passed is a connection, not a listening socket:"
            " sendooway-auth.socket must not have Accept=yes") in text, text
    assert "Invalid argument" not in text and "Traceback" not in text


# ------------------------------------------------------------ the daemon's peers


def test_a_stranger_connecting_in_a_loop_writes_no_line_per_attempt(world, tmp_path, tmp_config):
    """DEFECT: every connection of a uid neither root nor frontendUser was
    refused with a line of its own. Where others may connect at all (a
    socket unit written without SocketMode=, whose default is 0666; the
    shipped one has 0600), a local user connecting in a loop filled the
    log (and syslog's disk) at thousands of lines a second. Now a Tally,
    like the other refusals a peer can repeat: the first at once, then at
    most one line every 10 s with the count (and the rest at the stop)."""
    from tests.auth_helpers import Daemon

    base = tempfile.mkdtemp(prefix="sendooway-rv-act-")  # (tmp_path: root's alone)
    os.chmod(base, 0o755)
    d = Daemon(tmp_path, tmp_config(""), socket_path=os.path.join(base, "auth.sock")).start()
    attempts = 200
    try:
        os.chmod(d.socket_path, 0o666)
        carol = world.users["carol"]
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                become(carol)
                for _ in range(attempts):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(d.socket_path)
                    s.settimeout(10)
                    assert s.recv(16) == b""  # refused: closed without a byte
                    s.close()
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        assert d.stop() == 0
        shutil.rmtree(base, ignore_errors=True)
    lines = [x for x in d.log().splitlines() if "peer refused: " in x]
    assert 1 <= len(lines) <= 3, f"{len(lines)} lines for {attempts} attempts"
    assert all(f"peer refused: uid={carol.uid} pid=" in x for x in lines)
    told = sum(int(x.rsplit("; ", 1)[1].split()[0]) for x in lines)
    assert told == attempts, lines
    assert "auth failed" not in d.log()  # not her login failures


def test_a_start_up_failure_on_an_activated_connection_tells_the_client(world, tmp_path):
    """DEFECT: with systemd's Accept=yes and no StandardInput=socket (the
    connection is fd 3 alone, a mode the frontend serves and documents), a
    start-up failure (a config error after an edit) closed the client's
    connection without a word, where an inetd client or the shipped
    units' (fd 0) gets `421 4.3.0 Service not available`. Now the same
    421 on fd 3."""
    bad = tmp_path / "bad.conf"
    bad.write_text("localname = mx.test\nnoSuchKeyword = 1\n")
    ours, theirs = socket.socketpair()
    proc = _activated([FRONT, "-c", str(bad), "-l", "&2"], [theirs.fileno()], "1")
    theirs.close()
    status, _out, err = _finish(proc)
    ours.settimeout(10)
    heard = ours.recv(4096)
    ours.close()
    assert status == EXIT_CONFIG, err
    assert heard == b"421 4.3.0 Service not available, closing connection\r\n"
    assert "bad.conf:2: unknown keyword" in err


def test_bind_and_systemds_sockets_together_are_refused(world, tmp_path):
    """DEFECT: `-b` given to a service that systemd also passes sockets to
    (a socket unit with Accept=no and an ExecStart= copied from a -b set-up)
    took systemd's listening socket, never served it and listened on -b:
    clients of the unit's port waited in its backlog for ever (or -b on the
    same port failed with "Address already in use"). Now a start-up error
    saying to drop one of the two."""
    from tests.fakeworld import free_port

    unit_port = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    unit_port.bind(("127.0.0.1", 0))
    unit_port.listen(4)
    config = front_config(tmp_path, world, tls=False)
    proc = _activated([FRONT, "-c", config, "-l", "&2", "-b", f"127.0.0.1:{free_port()}"],
                      [unit_port.fileno()], "1")
    unit_port.close()
    status, _out, err = _finish(proc, 20)
    assert status == EXIT_CONFIG, (status, err)
    assert "sendooway: -b and the sockets systemd passed (LISTEN_FDS) exclude each other" in err


def test_a_socket_directory_closed_to_the_frontend_user_is_named(world, tmp_path, tmp_config):
    """DEFECT: the daemon accepted an existing socket directory of root's
    mode 0700 (not writable by others: safe) without a word, though
    frontendUser cannot search it and so never reaches the socket; the
    frontend then said the socket "lets root connect but not frontendUser
    nobody" and advised to "give the socket to nobody" — which it already
    was (owner nobody, 0600). An admin following that changed nothing.
    Now the daemon warns at start and the frontend names the directory."""
    from tests.auth_helpers import Daemon

    base = tempfile.mkdtemp(prefix="sendooway-rv-act-")
    try:
        os.chmod(base, 0o755)
        closed = os.path.join(base, "run")
        os.mkdir(closed, 0o700)
        sock = os.path.join(closed, "auth.sock")
        d = Daemon(tmp_path, tmp_config(f"authSocket = {sock}\n"), socket_path=sock).start()
        try:
            warning = d.wait_log("cannot reach")
            config = front_config(tmp_path, world, f"authSocket = {sock}\n", tls=False,
                                  name="front.conf")
            res = subprocess.run([FRONT, "-c", config, "-l", "&2"], input=b"QUIT\r\n",
                                 capture_output=True, text=False, timeout=30)
        finally:
            assert d.stop() == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert (f"frontendUser nobody cannot reach {sock}: the directory {closed} (mode 0700) is"
            " closed to it") in warning
    err = res.stderr.decode()
    assert (f"the directory {closed} (mode 0700) is closed to nobody: let it search it"
            f" (chmod o+x {closed}, or 0755)") in err, err
    assert "give the socket to" not in err
    assert b"\r\n221 " in res.stdout  # served, by an authenticator of its own
