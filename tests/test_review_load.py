"""Load and resource-exhaustion review: defects a mail admin serving a few
hundred users, or a hostile Internet client, would run into. Real
`sendooway-auth` daemons (and `sendooway -b` where it matters) in the fake
world; each test failed against the code as reviewed (each is fixed)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from sendooway_shared.protocol import (
    REPLIES, VERSION, AuthOk, AuthRequest, BlockingChannel, Hello, encode,
)
from sendooway_shared.types import Secret

from .auth_helpers import Daemon, add_pam_service, build_test_pam_module

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")


def _burst(d: Daemon, n: int, user: str, client: str) -> list[socket.socket]:
    """`n` connections from one client address, each sending hello and a
    wrong password at once, the way n SMTP sessions of one client pipelining
    AUTH reach the daemon through the frontend."""
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d.socket_path)
        s.sendall(encode(Hello(VERSION, f"burst{i}", client))
                  + encode(AuthRequest(user, Secret(f"guess-{i}"))))
        socks.append(s)
    return socks


def test_one_address_burst_of_logins_starves_everyones_pam(tmp_path, tmp_config, world):
    """DEFECT: the backoff (`_penalty.Penalty.hold`) only holds back logins
    of a user or address that already *has* counted failures. Logins sent
    side by side from an address with no failure yet are all handed to the
    PAM pool at once, and the pool's queue (`_pam._DaemonThreads`, a plain
    SimpleQueue) is first come, first served for everyone. A PAM stack
    that takes its time over a wrong password (pam_unix/pam_faildelay: ~2 s
    each, in a PAM thread) turns one client's burst into minutes of queue.

    Here: 4 PAM threads, a wrong password costs 0.5 s in PAM, `timeout = 6`.
    One client address opens 48 sessions and sends one wrong password on
    each (48 x 0.5 s / 4 threads = 6 s of PAM work); 0.3 s later alice logs
    in from another address with her right password. All 48 guesses went
    to PAM at once; alice's check queues behind them and is reached only
    when the stranger's leftover guesses are dropped as `pam-timeout` at
    their deadline: she waits the whole `timeout` (measured 5.7 s of a 6 s
    timeout; a little later and hers is the one that times out: a 454).
    Correct behaviour answers her in milliseconds. With the default 8
    threads, pam_unix's ~2 s and `timeout` capped at 60 s, 250 sessions
    from one fresh address (or one IPv6 /64) stall every user's login for
    a minute, and again from the next address; the same burst also has
    dozens of guesses checked at PAM's full speed (28 in 4 s here), which
    the backoff is meant to prevent ("logins sent side by side are decided
    one delay apart", docs/decisions/auth.md).

    Correct: a login whose user or address already has one undecided login
    in PAM waits for that verdict first (count logins under way in
    `Penalty.hold`, or keep one PAM job per key in flight and queue the
    rest per key), so one address occupies at most one PAM thread and
    another user's login is decided at PAM's speed."""
    module = build_test_pam_module(world)
    if module is None:
        pytest.skip("needs a C compiler for the slow test PAM module")
    service = add_pam_service(world, "sendooway-review-slow", module, fail_sleep=0.5)
    d = Daemon(tmp_path, tmp_config(f"pamService = {service}\ntimeout = 6\n"),
               extra_args=["--pam-threads", "4"], failure_delay=1.0).start()
    socks = []
    try:
        socks = _burst(d, 48, "bob", "203.0.113.66")
        time.sleep(0.3)
        ch = BlockingChannel(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), REPLIES, timeout=20)
        ch.sock.connect(d.socket_path)
        assert ch.request(Hello(VERSION, "alice-session", "192.0.2.50")).TYPE == "welcome"
        started = time.monotonic()
        reply = ch.request(AuthRequest("alice", Secret(world.users["alice"].password)))
        took = time.monotonic() - started
        ch.close()
        decided = d.log().count("client=203.0.113.66 reason=wrong-password")
        assert reply == AuthOk("alice") and took < 2.0, (
            f"alice's right password from another address got {reply} after {took:.1f} s,"
            f" queued behind one address's burst of 48 guesses ({decided} of them already"
            " checked by PAM)")
    finally:
        for s in socks:
            s.close()
        d.stop()


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            kids = []
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def test_root_b_frontend_serves_421_forever_once_its_private_authenticator_dies(world):
    """DEFECT: `sendooway -b` started as root with no daemon at `authSocket`
    (the original's standalone server, sendooway(1)) starts a private
    `sendooway-auth --socket /tmp/sendooway-auth-XXXX/auth.sock` behind a
    /bin/sh watcher (`_authlink.spawn_daemon`). Nothing watches that daemon:
    the shell only waits for the frontend's lifeline to close, and the
    frontend, nobody by then, only counts on it. When the daemon dies — a
    PAM/NSS module crashing the process that loads it (here SIGSEGV), the
    OOM killer — the frontend stays up and every client from then on gets
    `421 4.3.0` as its greeting, for ever: the process is alive, so neither
    systemd's Restart= nor an init script notices, and nothing in the
    frontend can start a root daemon again. A total outage of submission
    until an admin restarts it by hand.

    Correct: the loss is noticed and repaired — the watcher restarts the
    daemon (it runs as root and already holds the lifeline loop), or the
    frontend exits non-zero when its private authenticator is gone (it
    holds the watcher's Popen and the notify socket where the daemon says
    STOPPING=1), so that the service manager restarts both. Here: within
    8 s of the daemon's death either the frontend has exited or a new
    session logs in again."""
    from .front_util import Frontend, front_config, login_plain, open_tmp
    from .hardening_util import RawClient

    with open_tmp() as tmp:
        config = front_config(tmp, world, "timeout = 10\n")  # authSocket: nothing listens there
        fe = Frontend(config, os.path.join(str(tmp), "front.log")).start()

        def logs_in() -> int:
            with RawClient(fe.host, fe.port) as c:
                code, _ = c.reply()
                if code != 220:
                    return code
                assert c.cmd(b"EHLO client.test\r\n")[0] == 250
                auth = login_plain("alice", world.users["alice"].password)
                return c.cmd(f"AUTH PLAIN {auth}\r\n".encode())[0]

        try:
            assert logs_in() == 235, fe.log()
            daemons = [p for p in _descendants(fe.proc.pid)
                       if "sendooway-auth" in _cmdline(p) and "/bin/sh" not in _cmdline(p)]
            assert daemons, [(p, _cmdline(p)) for p in _descendants(fe.proc.pid)]
            for pid in daemons:
                os.kill(pid, 11)  # SIGSEGV: what a crashing PAM or NSS module does
            deadline = time.monotonic() + 8
            last = None
            while time.monotonic() < deadline:
                if fe.proc.poll() is not None:
                    return  # exited: a service manager restarts it (and its daemon)
                try:
                    last = logs_in()
                except OSError as e:  # (it exited between the poll and the connect)
                    last = repr(e)
                    time.sleep(0.2)
                    continue
                if last == 235:
                    return
                time.sleep(1)
            pytest.fail(f"8 s after its private authenticator died, sendooway -b (pid"
                        f" {fe.proc.pid}) still runs and a new client gets {last}:"
                        f" {fe.log().splitlines()[-1]}")
        finally:
            fe.stop()


def test_authenticator_connection_cap_ignores_its_descriptor_limit(tmp_path, tmp_config, world):
    """DEFECT: `sendooway-auth` caps its connections at a fixed
    MAX_CONNECTIONS = 4000 and tries to raise RLIMIT_NOFILE to 4200
    (`_server._harden`), but where the hard limit is lower (1024 or 4096 is
    still the hard limit on many hosts and init systems) the cap is never
    lowered to fit, unlike the frontend's `session_limit()`. So connections
    use up every descriptor and the daemon runs into EMFILE instead of its
    cap: PAM (its modules open files per login), NSS and the reader workers'
    socketpairs then fail for the sessions it already holds, and accept()
    fails once a second with a traceback in the log while newer frontend
    sessions sit unanswered in the backlog until their `timeout` (300 s by
    default) instead of being refused at once.

    Here the daemon runs with NOFILE 64 (hard), as a host's 1024 would be
    reached with ~1000 sessions: idle frontend connections take every
    descriptor; then alice, on a connection accepted before, sends her right
    password and gets "temporary failure" (PAM could not open its files;
    the frontend's 454), and the log shows the accept tracebacks.

    Correct: derive the cap from the descriptor limit actually obtained,
    keeping a reserve for PAM, NSS, the log and the workers (64 workers x
    socket + pidfd, the fork server): e.g. min(4000, NOFILE - 300), and
    refuse connections beyond it at once (closing them, as now at 4000), so
    sessions already admitted keep working."""
    limit = 64
    d = Daemon(tmp_path, tmp_config(""), extra_args=["--pam-threads", "1"])
    d.args = ["prlimit", f"--nofile={limit}:{limit}", "--", *d.args]
    d.start()
    hogs: list[socket.socket] = []
    try:
        pid = d.proc.pid
        warm = d.connect()  # the PAM thread's handle made while there are descriptors
        assert warm.request(Hello(VERSION, "warm", "192.0.2.9")).TYPE == "welcome"
        assert warm.request(AuthRequest("bob", Secret(world.users["bob"].password))) == AuthOk("bob")
        warm.close()
        alice = d.connect()
        assert alice.request(Hello(VERSION, "alice", "192.0.2.7")).TYPE == "welcome"
        deadline = time.monotonic() + 10
        while (len(os.listdir(f"/proc/{pid}/fd")) < limit and time.monotonic() < deadline
               and "connection refused:" not in d.log()):  # (since the fix: the cap is met first)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket_path)
            hogs.append(s)
            try:
                s.sendall(encode(Hello(VERSION, f"idle{len(hogs)}", "198.51.100.1")))
            except (BrokenPipeError, ConnectionResetError):
                pass  # over the cap: closed at once
            time.sleep(0.01)
        time.sleep(0.5)
        reply = alice.request(AuthRequest("alice", Secret(world.users["alice"].password)))
        alice.close()
        tracebacks = d.log().count("socket.accept() out of system resource")
        assert reply == AuthOk("alice"), (
            f"alice's right password on an admitted connection got {reply} once {len(hogs)}"
            f" idle connections had used up the daemon's {limit} descriptors (its cap is"
            f" still 4000; {tracebacks} accept() tracebacks logged)")
    finally:
        for s in hogs:
            s.close()
        d.stop()


def _status(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return f.read()


def test_accept_out_of_descriptors_floods_the_log(world):
    """DEFECT: when accept() fails for lack of resources (EMFILE, ENFILE —
    the host's file table full —, ENOBUFS, ENOMEM under memory pressure),
    asyncio's accept loop (Python 3.11, `_accept_connection`) logs an ERROR
    with a traceback and schedules a retry, but does not stop: it goes on
    for `backlog` tries in the same pass, and `serve_listening` (like the
    authenticator's `_serve_daemon`) passes backlog=512. Each retry round
    thus writes up to 512 tracebacks, and the retries it scheduled stack up:
    one waiting client in the listen queue makes `sendooway -b` write ~2,500
    tracebacks (~1 MB) per second to its log (syslog in production) for as
    long as the shortage lasts; the authenticator at its descriptor limit
    did ~3,500 a second. A shortage of memory or descriptors thus also
    fills /var/log, and the CPU spent logging makes it worse.

    Here the running `sendooway -b` (nobody) has its soft RLIMIT_NOFILE
    lowered to the descriptors it holds (a stand-in for ENFILE/ENOMEM: the
    same code path), three clients connect, and the log is counted for 2 s;
    then the limit is restored and the waiting client is served (recovery
    works).

    Correct: a handful of lines per shortage, not thousands a second —
    e.g. a loop exception handler (`loop.set_exception_handler`) in both
    servers that logs "socket.accept() out of system resource" without the
    traceback at most once every few seconds with a count, or an accept
    loop of our own that stops at the first EMFILE."""
    import subprocess

    from .front_util import Frontend, front_config, open_tmp

    with open_tmp() as tmp:
        config = front_config(tmp, world, "timeout = 10\n")
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        clients: list[socket.socket] = []
        as_nobody = dict(user=65534, group=65534, extra_groups=[])  # prlimit(2) on its own uid
        try:
            pid = fe.proc.pid
            deadline = time.monotonic() + 10  # prlimit as nobody: once it has dropped to nobody
            while "Uid:\t65534\t" not in _status(pid):
                assert time.monotonic() < deadline, "the frontend never dropped to nobody"
                time.sleep(0.02)
            with open(f"/proc/{pid}/limits") as f:
                hard = next(line for line in f if line.startswith("Max open files")).split()[4]
            held = len(os.listdir(f"/proc/{pid}/fd"))
            subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={held}:{hard}"],
                           check=True, **as_nobody)
            for _ in range(3):
                s = socket.create_connection((fe.host, fe.port))
                s.settimeout(10)
                clients.append(s)
            time.sleep(0.5)
            before = fe.log().count("out of system resource")
            time.sleep(2.0)
            lines = fe.log().count("out of system resource") - before
            subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={hard}:{hard}"],
                           check=True, **as_nobody)
            assert lines <= 10, (
                f"{lines} 'socket.accept() out of system resource' tracebacks in 2 s while"
                " one client waited in the listen queue")
        finally:
            for s in clients:
                s.close()
            fe.stop()
            daemon.stop()
