"""Tests written from a mutation-testing review of the authenticator's
daemon side: the listening socket and its directory, signals during start-up
and in --fd mode, socket activation, --exit-with-parent, the silence limits'
error frame, the fork server's death while stopping, the reader workers'
table and the one-shot reader of --check, and the --check report. Each
pins down behaviour that a small change to that code (a check dropped, a
bound moved, a branch swapped) left unnoticed by the rest of the suite; each
docstring names what it guards. Real parts throughout: the sendooway-auth
daemon in a subprocess or its in-process pieces with a real fork server and
real workers, fake users from nss_wrapper, PAM from pam_wrapper."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sendooway_shared.protocol import (
    REPLIES, VERSION, AuthOk, AuthRequest, BlockingChannel, Error, Hello,
)
from sendooway_shared.types import Secret
from tests.auth_helpers import (  # noqa: F401 - daemon is a fixture
    Daemon, children, daemon, fd_authenticator, login,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")

AUTH = [sys.executable, "-m", "sendooway_auth.cli"]


def refused_start(tmp_path, conf: str, socket_path: str) -> subprocess.CompletedProcess:
    """Run the daemon that must refuse to start; its exit and stderr."""
    d = Daemon(tmp_path / "d", conf, socket_path=socket_path)
    os.makedirs(d.dir, exist_ok=True)
    return subprocess.run(d.args, capture_output=True, text=True, timeout=10)


# ------------------------------------------------------------ the socket and its directory


@pytest.mark.parametrize("mode, owner, error", [
    (0o775, "root", "is writable by others than its owner (mode 0775)"),
    (0o755, "carol", "is owned by uid 40003, not root"),
])
def test_a_socket_directory_others_may_write_to_is_refused(tmp_path, tmp_config, world,
                                                           mode, owner, error):
    """The socket's directory is refused when its group may write to it, or
    when it is another user's (auth.md "Daemon details"): either could
    replace the socket while the daemon is down and hear every login."""
    directory = tmp_path / "run"
    directory.mkdir()
    os.chmod(directory, mode)
    if owner != "root":
        os.chown(directory, world.users[owner].uid, world.users[owner].gid)
    res = refused_start(tmp_path, tmp_config(""), str(directory / "auth.sock"))
    assert res.returncode == 2 and error in res.stderr, res.stderr
    assert not (directory / "auth.sock").exists()


def test_a_file_at_the_socket_path_that_is_no_socket_is_never_removed(tmp_path, tmp_config):
    """Only a stale *socket* is replaced: a regular file at `authSocket`
    (a typo naming the config) makes the daemon exit 2 and stays as it was."""
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "auth.sock"
    path.write_text("precious\n")
    res = refused_start(tmp_path, tmp_config(""), str(path))
    assert res.returncode == 2 and "exists and is not a socket" in res.stderr, res.stderr
    assert path.read_text() == "precious\n"


def test_the_socket_directory_made_by_the_daemon_is_0755_whatever_its_umask(
        tmp_path, tmp_config):
    """A directory the daemon creates is 0755 even under a strict umask
    (systemd's UMask=0077): otherwise the frontend, running as nobody,
    cannot reach the socket inside it."""
    old = os.umask(0o077)
    try:
        d = Daemon(tmp_path / "d", tmp_config(""))
        os.makedirs(d.dir)
        d.start()
    finally:
        os.umask(old)
    try:
        assert os.stat(os.path.dirname(d.socket_path)).st_mode & 0o7777 == 0o755
    finally:
        assert d.stop() == 0


# ------------------------------------------------------------ signals, activation, parent


def _state(pid: int) -> str:
    """The process's state letter in /proc (T: stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def caught_starting(tmp_path, conf: str) -> Daemon:
    """A daemon stopped (SIGSTOP) after it bound its socket and before it
    forked its fork server, so before the event loop takes the signals."""
    for attempt in range(10):
        d = Daemon(tmp_path / f"s{attempt}", conf)
        os.makedirs(d.dir)
        d.proc = subprocess.Popen(d.args, env=d.env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        while d.proc.poll() is None and not os.path.exists(d.socket_path):
            pass
        d.proc.send_signal(signal.SIGSTOP)
        # (the stop takes effect some time after kill() returns: a fork in
        # between would be missed by a look at the children before it)
        deadline = time.monotonic() + 5
        while _state(d.proc.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.001)
        if _state(d.proc.pid) == "T" and not children(d.proc.pid):
            return d
        d.proc.send_signal(signal.SIGCONT)  # too late: try again
        d.stop()
    pytest.fail("the daemon was never caught between its bind and its fork server")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_start_up_is_acted_on_once_serving(tmp_path, tmp_config, sig):
    """A SIGTERM that comes while the daemon starts (socket bound, event
    loop not yet running) stops it cleanly once it serves, and a SIGHUP
    reloads the config then: neither is lost nor kills it with the socket
    file left behind."""
    d = caught_starting(tmp_path, tmp_config(""))
    try:
        d.proc.send_signal(sig)
        d.proc.send_signal(signal.SIGCONT)
        if sig == signal.SIGTERM:
            assert d.proc.wait(10) == 0
            assert not os.path.exists(d.socket_path)
        else:
            assert "reloaded " in d.wait_log("reloaded ")
            assert d.proc.poll() is None
    finally:
        d.stop()
    assert "stopped" in d.log()


def test_sigint_stops_the_daemon_cleanly(daemon):
    """SIGINT (Ctrl-C in a terminal) stops the daemon as SIGTERM does:
    exit 0, the socket file removed, no traceback."""
    d = daemon()
    ch = d.connect()  # served: the event loop has taken the signals over
    assert ch.request(Hello(VERSION, "s", "")).TYPE == "welcome"
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(10) == 0
    assert not os.path.exists(d.socket_path)
    assert "stopped" in d.log()


def test_listen_variables_meant_for_another_process_are_ignored(daemon):
    """LISTEN_FDS counts only when LISTEN_PID is this process (sd_listen_fds):
    variables inherited from a socket-activated parent do not make the
    daemon take its fd 3 for a listening socket."""
    d = daemon("", env=dict(os.environ, LISTEN_PID="1", LISTEN_FDS="1"))
    assert f"started: listening on {d.socket_path}," in d.log()


def test_a_socket_from_systemd_that_is_no_stream_socket_is_refused(tmp_path, tmp_config):
    """The socket systemd passes must be a UNIX stream socket (a unit with
    ListenDatagram= by mistake): exit 2 saying so, not a traceback."""
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fd = dgram.fileno()
    script = 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@"'
    res = subprocess.run(["sh", "-c", script, "sh", *AUTH, "-c", tmp_config(""), "-l", "-",
                          "--socket", str(tmp_path / "unused" / "x.sock")],
                         preexec_fn=lambda: os.dup2(fd, 3), pass_fds=[3],
                         capture_output=True, text=True, timeout=10)
    dgram.close()
    assert res.returncode == 2, res.stderr
    assert "the socket systemd passed is not a UNIX stream socket" in res.stderr
    assert "Traceback" not in res.stderr


def test_exit_with_parent_also_when_a_subreaper_adopts_the_daemon(tmp_path, tmp_config):
    """--exit-with-parent watches for a parent other than the one it had,
    not for pid 1: under a subreaper (a systemd user manager, a container's
    init, tini) the orphaned daemon is adopted by that process."""
    sock = tmp_path / "p" / "auth.sock"
    parent = (
        "import os, subprocess, time\n"
        f"p = subprocess.Popen({[*AUTH, '-c', tmp_config(''), '-l', str(tmp_path / 'p.log'), '--socket', str(sock), '--exit-with-parent']!r},"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        f"while not os.path.exists({str(sock)!r}): time.sleep(0.02)\n"
    )
    reaper = (  # adopts the daemon once `parent` exits, and says whether it ended
        "import ctypes, os, subprocess, sys, time\n"
        "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER\n"
        f"out = subprocess.run([sys.executable, '-c', {parent!r}], capture_output=True, text=True).stdout\n"
        "pid = int(out.split()[0])\n"
        "deadline = time.monotonic() + 5\n"
        "while time.monotonic() < deadline:\n"
        "    done, status = os.waitpid(pid, os.WNOHANG)\n"
        "    if done:\n"
        "        print('exited', os.waitstatus_to_exitcode(status)); break\n"
        "    time.sleep(0.05)\n"
        "else:\n"
        "    os.kill(pid, 9); os.waitpid(pid, 0); print('still running')\n"
    )
    res = subprocess.run([sys.executable, "-c", reaper], capture_output=True, text=True, timeout=30)
    assert res.stdout.strip() == "exited 0", res.stdout + res.stderr
    assert not sock.exists()


def test_a_fork_server_dying_while_the_daemon_stops_is_no_failure(clean_homes):
    """The fork server ending after the stop began (the whole unit signalled
    or killed at once) is no failure: exit 0, no error line. Its death while
    serving is one: exit 1 (for Restart=on-failure)."""
    import asyncio
    import types

    from sendooway_auth._reader import ForkServer
    from sendooway_auth._server import _fork_server_gone
    from sendooway_shared.config import parse_config

    async def gone(stopping: bool):
        forks = ForkServer(parse_config("", "t.conf")).start()
        rt = types.SimpleNamespace(forks=forks, failed=False)
        try:
            os.kill(forks.pid, signal.SIGKILL)
            os.waitid(os.P_PID, forks.pid, os.WEXITED | os.WNOWAIT)
            stop = asyncio.Event()
            if stopping:
                stop.set()
            loop = asyncio.get_running_loop()
            loop.add_reader(forks.pidfd, _fork_server_gone, rt, stop)
            await asyncio.wait_for(stop.wait(), 5)
            await asyncio.sleep(0.05)  # (the reader ran, when it was to)
            return rt.failed
        finally:
            forks.stop()

    assert asyncio.run(gone(stopping=False)) is True
    assert asyncio.run(gone(stopping=True)) is False


# ------------------------------------------------------------ one connection


def test_a_connection_closed_for_silence_is_told_why_first(daemon):
    """A connection closed by a silence limit gets an `error` frame
    `closed: WHAT` before the close (protocol.md, log lines): the frontend
    logs why its link broke instead of a bare EOF."""
    d = daemon("timeout = 1\n")
    ch = d.connect()
    assert ch.receive() == Error("closed: no hello within 1s")
    with pytest.raises(ConnectionError):
        ch.receive()


def test_a_refusal_naming_many_unexpected_keys_still_reaches_the_frontend(daemon, world):
    """The reason of a refusal is cut to 300 characters: the keys a peer
    sends are echoed in it (each cut at 40, but not their number), and a
    reason past the `error` frame's 1024 left the frontend with a bare EOF
    and the log with a line of over a kilobyte (28 keys fit a map of 32)."""
    from tests.auth_helpers import raw_frame

    d = daemon()
    ch = d.connect()
    frame = {"type": "hello", "version": VERSION, "session": "s", "client": ""}
    frame.update({f"k{i:02d}" + "x" * 37: "" for i in range(28)})
    ch.sock.sendall(raw_frame(frame))
    reply = ch.receive()
    assert isinstance(reply, Error) and reply.reason.startswith("protocol error: hello:")
    assert 250 < len(reply.reason) <= 300, reply.reason
    line = next(line for line in d.wait_log("connection closed:").splitlines()
                if "connection closed:" in line)
    assert len(line) < 500, line


def test_an_fd_session_waits_for_its_hello_past_the_timeout_and_ignores_sighup(
        tmp_path, tmp_config, clean_homes):
    """--fd mode keeps no silence limit: its socketpair is the session's own
    and its hello waits for the client's PROXY header and TLS handshake
    (auth.md "Daemon details"); a hello 1.5 s into a session with
    `timeout = 1` is still welcomed. And a SIGHUP (a reload of the
    system's daemons, a closing terminal) does not cut the session: it
    keeps the config it started with."""
    conf = tmp_config(f"timeout = 1\nauthSocket = {tmp_path}/run/auth.sock\n")
    with fd_authenticator(conf, str(tmp_path / "fd.log")) as (proc, ours):
        time.sleep(1.5)
        ch = BlockingChannel(ours, REPLIES, timeout=10)
        assert ch.request(Hello(VERSION, "s", "192.0.2.7")).TYPE == "welcome"
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert ch.request(AuthRequest("alice", Secret(clean_homes.users["alice"].password))) \
            == AuthOk("alice")
        ch.close()
        assert proc.wait(10) == 0


# ------------------------------------------------------------ the reader workers


def test_a_worker_announcing_an_answer_past_the_limit_fails_the_lookup_at_once():
    """A worker parses the user's hostile files: the daemon checks what it
    says like protocol input. An answer announced as longer than MAX_WIRE
    fails the lookup at once, without waiting for (or allocating) it."""
    import asyncio

    from sendooway_auth._reader import ACK, LENGTH
    from sendooway_auth._users import lookup
    from sendooway_auth._workers import Outcome, Worker
    from sendooway_auth.routes import MAX_WIRE

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sleeper = subprocess.Popen(["sleep", "30"])  # the "worker's" pid, killed at the end
    theirs.sendall(LENGTH.pack(sleeper.pid))  # the fork server's word
    ours.setblocking(False)
    worker = Worker(lookup("alice"), ours, 0.0)

    async def ask():
        loop = asyncio.get_running_loop()
        loop.add_reader(theirs, lambda: theirs.recv(1) and theirs.sendall(
            ACK + LENGTH.pack(MAX_WIRE + 1)))
        try:
            return await worker.ask(3.0)
        finally:
            loop.remove_reader(theirs)

    try:
        start = time.monotonic()
        outcome, why = asyncio.run(ask())
        assert (outcome, why) == (Outcome.FAILED, f"reader worker answered {MAX_WIRE + 1} bytes")
        assert time.monotonic() - start < 1
    finally:
        worker.close()
        theirs.close()
        sleeper.wait()


def test_a_worker_that_dies_after_taking_a_lookup_is_not_asked_again(clean_homes, monkeypatch):
    """A worker that took the request (ACK) and then died failed that lookup:
    it is not retried on a fresh worker (a hostile file would cost the
    daemon twice, auth.md "Reader workers"); only one gone before its ACK is."""
    import asyncio

    from sendooway_auth import _reader
    from tests.test_auth_workers import pool, served, write_rc

    write_rc(clean_homes, "alice")
    alice = _reader_user("alice")
    marker = os.path.join(alice.home, "die")
    real = _reader._lookup_wire

    def dying(cfg, who, sender=None):
        if os.path.exists(marker):
            os._exit(70)
        return real(cfg, who, sender)

    monkeypatch.setattr(_reader, "_lookup_wire", dying)  # (before the fork server forks)

    async def scenario(p):
        spawned = []
        spawn = p.forks.spawn
        monkeypatch.setattr(p.forks, "spawn", lambda user: spawned.append(user) or spawn(user))
        await served(p, alice)
        open(marker, "w").close()
        found = await p.lookup(alice)
        assert found.incomplete and "died during the lookup" in found.failure
        assert len(spawned) == 1, "the lookup was asked again of a new worker"

    with pool() as p:
        asyncio.run(scenario(p))


def _reader_user(name: str):
    from sendooway_auth._users import lookup

    return lookup(name)


def test_a_worker_busy_at_a_reload_is_retired_right_after_its_lookup(clean_homes, monkeypatch):
    """A worker that was busy when the config was reloaded answers the
    lookup it took and is then closed at once (auth.md "Reader workers"),
    not left holding the old config (and its direct: passwords) until it
    idles out, when no lookup comes after it."""
    import asyncio

    from sendooway_shared.config import parse_config
    from tests.auth_helpers import gone
    from tests.test_auth_workers import pool, served, slow_lookups, write_rc

    write_rc(clean_homes, "alice")
    alice = _reader_user("alice")
    marker = slow_lookups(monkeypatch, alice, 0.5)

    async def scenario(p):
        pid = await served(p, alice)
        open(marker, "w").close()
        took = asyncio.ensure_future(p.lookup(alice))
        await asyncio.sleep(0.2)  # the worker has taken it
        text = "smarthostMapping = direct:* new.example 25 noAuth\n"
        assert p.forks.reconfigure(text, parse_config(text, "t.conf"))
        p.reconfigured()
        assert not (await took).incomplete
        assert len(p) == 0 and gone(pid)

    with pool() as p:
        asyncio.run(scenario(p))


def test_a_busy_worker_is_never_closed_to_make_room(clean_homes, monkeypatch):
    """When the table is full, only idle workers make room: a lookup under
    way on the least recently used worker is answered, and the table grows
    past the cap by it for the while."""
    import asyncio

    from tests.test_auth_workers import answered, pool, slow_lookups, write_rc

    write_rc(clean_homes, "alice")
    alice, bob = _reader_user("alice"), _reader_user("bob")
    marker = slow_lookups(monkeypatch, alice, 0.6)

    async def scenario(p):
        await answered(p, alice, "alice@example.org")
        open(marker, "w").close()
        busy = asyncio.ensure_future(answered(p, alice, "alice@example.org"))
        await asyncio.sleep(0.2)  # alice's worker has taken it
        await answered(p, bob, "bob@example.org")
        assert len(p) == 2
        assert await busy == "smtp.example.org"

    with pool(cap=1) as p:
        asyncio.run(scenario(p))


def test_a_worker_busy_past_its_idle_time_is_not_closed_under_its_lookup(
        clean_homes, monkeypatch):
    """The idle timer of a worker that is busy when it strikes waits for
    another round: a lookup longer than the idle time is answered, not
    cut by the worker's closing."""
    import asyncio

    from tests.test_auth_workers import answered, pool, slow_lookups, write_rc

    write_rc(clean_homes, "alice")
    alice = _reader_user("alice")
    marker = slow_lookups(monkeypatch, alice, 0.8)

    async def scenario(p):
        open(marker, "w").close()
        assert await answered(p, alice, "alice@example.org") == "smtp.example.org"

    with pool(idle=0.3) as p:
        asyncio.run(scenario(p))


def test_a_worker_used_again_lives_a_full_idle_time_after_its_last_lookup(clean_homes):
    """The idle limit counts from a worker's last lookup, not from its
    start: a worker used again just before its first idle timer strikes is
    kept (and reused) another idle time, not closed under a user who is
    sending mail."""
    import asyncio

    from tests.test_auth_workers import pool, served, write_rc

    write_rc(clean_homes, "alice")
    alice = _reader_user("alice")

    # (idle 2.5 s, the uses 1.5 s apart: 1 s of room for a loaded machine's
    # late wake-up either way; was 1 s and 0.6 s, 0.4 s of room)
    async def scenario(p):
        pid = await served(p, alice)
        await asyncio.sleep(1.5)
        assert await served(p, alice) == pid
        await asyncio.sleep(1.5)  # past the first timer (2.5 s), not 2.5 s after the last use
        assert len(p) == 1 and await served(p, alice) == pid

    with pool(idle=2.5) as p:
        asyncio.run(scenario(p))


def test_one_users_slow_lookup_does_not_hold_up_another_users(clean_homes, monkeypatch):
    """Lookups of different users run side by side (up to IN_FLIGHT at
    once): a user whose files take long to read (a slow NFS home, a huge
    file) does not delay another user's MAIL FROM."""
    import asyncio

    from tests.test_auth_workers import answered, pool, slow_lookups, write_rc

    write_rc(clean_homes, "alice")
    write_rc(clean_homes, "bob")
    alice, bob = _reader_user("alice"), _reader_user("bob")
    # alice's lookup takes 3 s: bob's, held up behind it, would take ~2.7 s;
    # on its own it must take < 1.5 s (was 1.5 s and < 0.6 s: a loaded
    # machine's stall of 0.5 s failed it)
    marker = slow_lookups(monkeypatch, alice, 3.0)

    async def scenario(p):
        await answered(p, bob, "bob@example.org")  # bob's worker is ready
        open(marker, "w").close()
        slow = asyncio.ensure_future(answered(p, alice, "alice@example.org"))
        await asyncio.sleep(0.3)  # alice's lookup is under way
        start = time.monotonic()
        assert await answered(p, bob, "bob@example.org") == "smtp.example.org"
        assert time.monotonic() - start < 1.5
        assert await slow == "smtp.example.org"

    with pool() as p:
        asyncio.run(scenario(p))


def test_a_busy_worker_past_its_age_finishes_its_lookup(clean_homes, monkeypatch):
    """A worker that passes its age (or a reload) while busy is not closed
    under its lookup by the next request for the same user: that request
    waits for it, and both are answered."""
    import asyncio

    from tests.test_auth_workers import answered, pool, slow_lookups, write_rc

    write_rc(clean_homes, "alice")
    alice = _reader_user("alice")
    marker = slow_lookups(monkeypatch, alice, 0.6)

    async def scenario(p):
        open(marker, "w").close()
        first = asyncio.ensure_future(answered(p, alice, "alice@example.org"))
        await asyncio.sleep(0.4)  # busy, and past max_age
        second = asyncio.ensure_future(answered(p, alice, "alice@example.org"))
        assert await first == "smtp.example.org"
        assert await second == "smtp.example.org"

    with pool(max_age=0.2) as p:
        asyncio.run(scenario(p))


def test_a_lookup_waits_for_a_stuck_workers_lock_at_most_its_timeout(clean_homes):
    """One lookup at a time per worker, and the next one waits for it at
    most the lookup timeout (auth.md "Reader workers"): behind a worker its
    user stopped, a second lookup fails as "busy" within its own timeout
    instead of waiting the first one out and then starting over."""
    import asyncio

    from tests.test_auth_workers import pool, served, write_rc

    write_rc(clean_homes, "alice")
    alice = _reader_user("alice")

    async def scenario(p):
        pid = await served(p, alice)
        os.kill(pid, signal.SIGSTOP)
        # (first 2 s, second 0.5 s, bound 1.3 s: waiting the first out and
        # starting over takes ~2.3 s; was 0.6 / 0.3 / 0.5, 0.2 s of room)
        first = asyncio.ensure_future(p.lookup(alice, timeout=2.0))
        await asyncio.sleep(0.2)
        start = time.monotonic()
        second = await p.lookup(alice, timeout=0.5)
        assert second.incomplete and "busy for more than" in second.failure, second.failure
        assert time.monotonic() - start < 1.3
        assert (await first).incomplete

    with pool() as p:
        asyncio.run(scenario(p))


# ------------------------------------------------------------ reading as the user


def test_one_lookup_reads_at_most_max_total_octets_over_all_its_files(tmp_config, clean_homes):
    """The 4 MiB budget is the whole lookup's (auth.md "Reading users'
    files"), not each file's: five mapping files of 1 MiB each give four
    read and the fifth refused as over the lookup's budget."""
    from sendooway_auth._files import MAX_FILE, MAX_TOTAL
    from sendooway_auth._reader import lookup_direct
    from sendooway_shared.config import load_config

    assert MAX_TOTAL == 4 * MAX_FILE
    filler = ("#" * 1023 + "\n") * (MAX_FILE // 1024)
    for i in range(5):
        clean_homes.write_user_file("alice", f"rc{i}", filler)
    cfg = load_config(tmp_config("".join(f"smarthostMapping = fetchmail:%h/rc{i}\n"
                                         for i in range(5))))
    found = lookup_direct(cfg, _reader_user("alice"))
    statuses = [read.status for _role, read in found.files]
    assert statuses == ["ok"] * 4 + ["too-large"], statuses
    assert "budget" in found.files[4][1].detail


def test_a_reload_the_fork_server_cannot_take_keeps_the_old_config_everywhere(daemon, world):
    """A reload whose config cannot be handed to the reader fork server (its
    queue full: here it is stopped) is refused whole: logins keep the old
    config too, so they never use a config the route lookups do not (the
    log says to send SIGHUP again). And the daemon's end of the fork
    server's socket never blocks: a stuck fork server must not stall the
    event loop that serves every login."""
    from tests.auth_helpers import fork_server

    d = daemon("")
    stuck = fork_server(d)
    os.kill(stuck, signal.SIGSTOP)
    try:
        for i in range(2000):  # each reload queues one message for the stopped fork server
            with open(d.config_path, "w") as f:
                f.write(f"# reload {i}\n")
            before = d.log().count("]: reload")
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while d.log().count("]: reload") == before and time.monotonic() < deadline:
                time.sleep(0.001)
            # (a blocking write to the stopped fork server would hang the event loop)
            assert d.log().count("]: reload") > before, "the daemon stopped answering"
            if "cannot hand it to the reader fork server" in d.log():
                break
        else:
            pytest.fail("the fork server's queue never filled")
        with open(d.config_path, "w") as f:
            f.write("validUser = bob\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while d.log().count("cannot hand it") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d.log().count("cannot hand it") == 2, d.log()[-1000:]
        ch = d.connect()
        assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    finally:
        os.kill(stuck, signal.SIGCONT)


def test_an_empty_file_stamped_a_little_in_the_future_is_read_again(tmp_path):
    """An empty file whose mtime is up to SETTLE ahead of the reader's clock
    (an NFS server's clock a little ahead) counts as just written: it is
    read again once SETTLE later, and the content saved meanwhile is seen."""
    import threading

    from sendooway_auth._files import Budget, read_one

    path = tmp_path / "rc"
    path.write_bytes(b"")
    ahead = time.time() + 0.3
    os.utime(path, (ahead, ahead))
    saver = threading.Timer(0.2, path.write_bytes, [b"poll x\n"])
    saver.start()
    try:
        read = read_one(str(path), Budget())
    finally:
        saver.join()
    assert (read.status, read.data) == ("ok", b"poll x\n")


# ------------------------------------------------------------ --check


def test_check_shows_nocertcheck_and_a_file_owner_other_than_the_user(tmp_config, clean_homes):
    """The admin's report says when an account skips the upstream's
    certificate check, and when a file the user's routes come from is
    owned by someone else (it is still used: the daemon warns too); the
    password stays masked."""
    from tests.test_auth_cli import check

    rc = clean_homes.write_user_file("alice", ".fetchmailrc", (
        'poll pop.example.org user "alice" password "fm-Secret-A1"\n'
        '#sendooway:server "smtp.example.org"\n#sendooway:tls\n#sendooway:noCertCheck\n'
        '#sendooway:address "alice@example.org"\n'))
    os.chown(rc, 0, 0)
    os.chmod(rc, 0o644)
    code, out = check(tmp_config(""), "alice", "--sender", "alice@example.org")
    assert code == 0, out
    assert f"{rc} [fetchmail]: found, " in out and ", owner uid 0" in out, out
    assert ("route for alice@example.org: smtp.example.org:587 starttls noCertCheck user alice"
            " password ********") in out, out
    assert "fm-Secret-A1" not in out


def test_check_says_when_the_frontend_cannot_be_told_a_route(tmp_config, clean_homes):
    """A route too big for the wire (a 2000-character upstream user name)
    is refused by the daemon (no_route, 550): --check says so on the route
    line instead of ending in a traceback."""
    from tests.test_auth_cli import check

    clean_homes.write_user_file("alice", ".fetchmailrc", (
        "user " + "u" * 2000 + ' pass p\n#sendooway:server "s.x.org"\n'
        '#sendooway:address "a@x.org"\n'))
    code, out = check(tmp_config(""), "alice", "--sender", "a@x.org")
    assert "error: the frontend cannot be told this route (" in out, out
    assert "mail from a@x.org is refused" in out and "Traceback" not in out
    assert code == 0


def test_check_of_an_unknown_user_under_a_refused_config_exits_2(tmp_config):
    """Exit 2 (bad config) wins over 1 (no usable mapping), also when the
    account does not exist (auth.md "--check")."""
    from tests.test_auth_cli import check

    code, out = check(tmp_config("authBackend = none\n"), "nosuchuser")
    assert "account: nosuchuser does not exist" in out and "error: " in out, out
    assert code == 2, out


# ------------------------------------------------------------ the fork server


def test_the_fork_server_reaps_the_workers_that_end(daemon, world):
    """Workers killed by their user (or retired) are reaped by the fork
    server at once: no zombie per worker ever made, which over weeks would
    fill the process table."""
    from tests.auth_helpers import fork_server, route, workers

    d = daemon()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
    (pid,) = workers(d, 1)
    os.kill(pid, signal.SIGKILL)
    assert route(ch, "alice@example.org").TYPE == "no_route"  # served by a new worker
    deadline = time.monotonic() + 3
    while pid in children(fork_server(d)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pid not in children(fork_server(d)), "the killed worker is left a zombie"
