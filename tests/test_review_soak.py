"""Soak review: long-running daemons must not leak. `sendooway -b` and
`sendooway-auth` (with its fork server and reader workers) run for months;
every table they keep must stay bounded whatever the number of distinct
keys (client addresses, users, upstream names, CA files) seen, and every
descriptor, task, thread and child of a session must go when it ends.

What was reviewed: bench/bench_soak.py drove 3000 sessions of mixed kinds
(whole sessions with smarthostCache on and off, 76 users, wrong passwords
and clients gone mid-AUTH from thousands of PROXY-protocol addresses,
unrouted senders, RCPT 550, DATA 554, the upstream down, clients gone
mid-DATA, mid-MAIL, right after connecting and mid-TLS-handshake, failed
handshakes, clients idling into `timeout` at a command and in DATA, broken
PROXY headers, a SIGHUP to the authenticator every 250 sessions) through
real daemons, and compared every process's descriptors, RSS and threads,
and (tests/soak_hook.py, a test-only SIGUSR2 dump of the product's
containers by name) every table, after a warm-up and after each half.
No defect was found: descriptors, threads and tasks came back to their
warm-up figures, no zombie stayed, RSS grew less in the second half than
in the first, and the only table that grew with the keys seen is the
authenticator's failure memory by client address (Penalty, bounded by
max_keys and its window; unit-tested in test_auth_permits.py).

So these tests keep one bound each, measured in the real daemons after
more distinct keys than the bound (each fails if its table kept every key,
or a session's descriptor, task or count stayed behind):
- per session: descriptors, tasks, threads, the per-address session
  counts (AddressLimit) and every product container of the frontend and the
  authenticator come back after sessions of every kind from distinct
  addresses; the failure memory grows by three entries (name, address, both) per failing
  login;
- the upstream pool (MAX_IDLE) and the TLS session cache (MAX_SESSIONS)
  after more distinct upstream names than either holds;
- the failed-address memory (FAILED_KEPT) after more refused addresses;
- the reader worker table (MAX_WORKERS) and the CA-context cache
  (_MAX_CACHED) after more users, each with their own sslCA, than either
  holds; no zombie.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import smtplib
import socket
import sys
import time

import pytest

from .auth_helpers import Daemon, children, workers
from .fakeworld import refused_port
from .front_util import ClaimingSMTP, Frontend, front_config, login_plain, open_tmp

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real daemons and users need root")

HOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "soak_hook.py")


# ------------------------------------------------------------ the daemons, watched


def _hooked_daemon(tmp, config: str, out: str) -> Daemon:
    d = Daemon(tmp, config)
    d.args[1:3] = [HOOK, out, "sendooway_auth.cli"]
    return d.start()


def _hooked_frontend(tmp, config: str, out: str) -> Frontend:
    return Frontend(config, os.path.join(str(tmp), "front.log"),
                    argv0=[sys.executable, HOOK, out, "sendooway_front.cli"]).start()


def _tables(pid: int, out: str) -> dict[str, int]:
    """The process's container sizes by name (tests/soak_hook.py)."""
    path = os.path.join(out, f"tables-{pid}.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                found = json.load(f)
        except (OSError, ValueError):
            time.sleep(0.02)
            continue
        assert "(hook failed)" not in found, found.get("error")
        return found
    raise AssertionError(f"no tables from {pid}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_targets(pid: int) -> list[str]:
    """What a process's descriptors are (for a failure's message)."""
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def _zombies(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            try:
                with open(f"/proc/{c}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        found.append(c)
            except (FileNotFoundError, ProcessLookupError):
                continue
            todo.append(c)
    return found


def _out_dir(tmp) -> str:
    out = os.path.join(str(tmp), "tables")
    os.makedirs(out, exist_ok=True)
    os.chmod(out, 0o777)  # (the frontend writes as nobody)
    return out


def _grown(before: dict, after: dict, more_than: int, exempt=()) -> dict:
    return {k: (before.get(k, 0), v) for k, v in after.items()
            if v - before.get(k, 0) > more_than and not k.startswith(tuple(exempt))}


def _rst(s: smtplib.SMTP) -> None:
    s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    s.close()


# ------------------------------------------------------------ per session


def _mixed(fe: Frontend, world, i: int) -> str:
    """Session kind i % 11 from client address 198.18.x.y (distinct per i)."""
    client = f"198.18.{i // 250 % 250}.{i % 250 + 1}"
    kind = i % 11
    if kind == 0:  # gone right after connecting (before its PROXY header)
        socket.create_connection((fe.host, fe.port)).close()
        return "gone"
    s = ClaimingSMTP(client, fe.host, fe.port, local_hostname="client.test", timeout=20)
    try:
        if kind == 1:  # idles into the timeout
            s.sock.settimeout(10)
            return f"idle {s.getreply()[0] if s.ehlo()[0] else 0}"
        if kind == 2:  # gone in the middle of the TLS handshake
            s.ehlo()
            s.docmd("STARTTLS")
            s.sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            return "gone mid-TLS"
        s.starttls(context=world.ssl_context())
        s.ehlo()
        if kind == 3:  # wrong password
            return f"AUTH {s.docmd('AUTH PLAIN', login_plain(f'ghost{i}', 'wrong-Pw-zz'))[0]}"
        if kind == 4:  # gone while the authenticator decides
            s.send(f"AUTH PLAIN {login_plain(f'ghost{i}', 'wrong-Pw-zz')}\r\n")
            _rst(s)
            return "gone during AUTH"
        assert s.docmd("AUTH PLAIN", login_plain("alice", world.users["alice"].password))[0] == 235
        sender = {5: "nobody@unrouted.example", 6: "alice@down.example"}.get(kind, "alice@ok.example")
        code = s.docmd(f"MAIL FROM:<{sender}>")[0]
        if code != 250:
            return f"MAIL {code}"
        if kind == 7:
            return f"RCPT {s.docmd('RCPT TO:<refused@example.net>')[0]}"
        assert s.docmd("RCPT TO:<rcpt@example.net>")[0] == 250
        assert s.docmd("DATA")[0] == 354
        if kind == 8:  # gone mid-DATA
            s.send(b"Subject: cut\r\n\r\n" + b"half a message\r\n" * 100)
            _rst(s)
            return "gone mid-DATA"
        s.send(b"Subject: soak\r\n\r\nhello\r\n.\r\n")
        return f"DATA {s.getreply()[0]}"
    finally:
        with contextlib.suppress(Exception):
            s.close()


def test_sessions_of_every_kind_from_distinct_addresses_leave_nothing_behind(
        world, clean_homes, upstream_factory):
    """After 330 sessions of eleven kinds (whole messages, a wrong password,
    gone mid-AUTH, unrouted, upstream down, RCPT 550, gone mid-DATA, gone
    at connect and mid-TLS, idle into the timeout), each from its own
    client address (PROXY protocol), the frontend and the authenticator
    hold what they held after the warm-up: descriptors, asyncio tasks,
    threads, no zombie, the per-address session counts empty, and no
    container of the product larger by more than a handful, except the
    failure memory, by three entries (name, address, both) per failure. A table keyed
    by client address, or a session's descriptor or task left behind,
    grows by hundreds here."""
    up = upstream_factory(tls="starttls", accounts={"u": "p"}, reject_rcpt={"refused@example.net"})
    with refused_port() as down, open_tmp() as tmp:  # (nothing listens on down)
        out = _out_dir(tmp)
        config = front_config(tmp, world, (
            "timeout = 2\nsmarthostCache = 30\nproxyProtocol = 127.0.0.1\n"
            "maxSessionsPerAddress = 2\naddReceivedField = no\n"
            f"sslCA = {world.ca_file}\n"
            f"smarthostMapping = direct:*@ok.example localhost {up.port} u p tls\n"
            f"smarthostMapping = direct:*@down.example localhost {down} u p tls\n"))
        daemon = _hooked_daemon(tmp, config, out)
        fe = _hooked_frontend(tmp, config, out)
        try:
            def run(first: int, n: int) -> dict:
                with concurrent.futures.ThreadPoolExecutor(6) as pool:
                    results = list(pool.map(lambda i: _mixed(fe, world, i), range(first, first + n)))
                time.sleep(3.5)  # the idle ones meet the timeout (2 s), everything settles
                return results

            run(10000, 44)  # warm-up: every kind, the pool and the caches in use
            f0, a0 = _tables(fe.proc.pid, out), _tables(daemon.proc.pid, out)
            fd0, afd0 = _fds(fe.proc.pid), _fds(daemon.proc.pid)
            results = run(0, 330)
            f1, a1 = _tables(fe.proc.pid, out), _tables(daemon.proc.pid, out)
            assert results.count("DATA 250") >= 50 and results.count("AUTH 535") == 30, results
            assert results.count("MAIL 451") == 30 and results.count("MAIL 550") == 30, results
            idle = "sendooway_front._pool._Idle"  # (kept upstream connections: up to 4 either time)
            assert _fds(fe.proc.pid) - f1.get(idle, 0) <= fd0 - f0.get(idle, 0) + 2, (
                os.listdir(f"/proc/{fe.proc.pid}/fd"))
            assert _fds(daemon.proc.pid) <= afd0 + 2
            assert f1["(asyncio tasks)"] <= f0["(asyncio tasks)"], (f0, f1)
            assert a1["(asyncio tasks)"] <= a0["(asyncio tasks)"], (a0, a1)
            assert f1["(threads)"] <= f0["(threads)"] + 1 and a1["(threads)"] <= a0["(threads)"]
            assert f1.get("sendooway_front._limits.AddressLimit.open", 0) == 0
            assert not _grown(f0, f1, 5), _grown(f0, f1, 5)
            # wrong passwords and those gone mid-AUTH, each its own address and
            # made-up name: a count by name, by address and by both (Penalty.failure)
            failing = 30 + 30
            penalty = "sendooway_auth._penalty.Penalty._counts"
            assert a1[penalty] - a0[penalty] <= 3 * failing, (a0[penalty], a1[penalty])
            assert not _grown(a0, a1, 5, exempt=[penalty]), _grown(a0, a1, 5, exempt=[penalty])
            assert not _zombies(daemon.proc.pid)
        finally:
            fe.stop()
            daemon.stop()


# ------------------------------------------------------------ per upstream name


def test_upstream_pool_and_tls_sessions_stay_at_their_caps_over_many_upstream_names(
        world, clean_homes, upstream_factory):
    """300 senders, each routed to its own upstream name (127.0.x.y, all the
    same upstream), with smarthostCache on: the pool keeps at most MAX_IDLE
    idle connections (and their descriptors) and the TLS session cache
    MAX_SESSIONS names; both would hold 300 if they kept every name."""
    from sendooway_front._pool import MAX_IDLE
    from sendooway_front._tls import MAX_SESSIONS

    names = 300
    up = upstream_factory(tls="starttls", accounts={"u": "p"}, host="0.0.0.0")
    lines = "".join(f"smarthostMapping = direct:*@d{n}.example 127.0.{n // 200 + 1}.{n % 200 + 2}"
                    f" {up.port} u p tls,noCertCheck\n" for n in range(names))
    with open_tmp() as tmp:
        out = _out_dir(tmp)
        config = front_config(tmp, world, "smarthostCache = 60\naddReceivedField = no\n" + lines)
        daemon = _hooked_daemon(tmp, config, out)
        fe = _hooked_frontend(tmp, config, out)
        try:
            with fe.smtp() as c:
                c.starttls(context=world.ssl_context())
                c.ehlo()
                c.login("alice", world.users["alice"].password)
                # counted once the frontend is serving: its event loop's epoll
                # and self-pipe and its link to the authenticator are made by
                # then (counted before, as they sometimes were, the 3-4 of
                # them ate the slack below); the client's socket is one too
                fd0 = _fds(fe.proc.pid)
                fd_start = _fd_targets(fe.proc.pid)
                for n in range(names):
                    assert c.sendmail(f"a@d{n}.example", ["rcpt@example.net"], b"Subject: x\r\n\r\nx\r\n") == {}
            tables = _tables(fe.proc.pid, out)
            assert tables["sendooway_front._tls._sessions"] == MAX_SESSIONS
            assert tables["sendooway_front._pool.UpstreamPool._idle"] <= MAX_IDLE
            assert tables["sendooway_front._pool._Idle"] <= MAX_IDLE
            # (a QUIT still under way in the background holds its socket a
            # moment: a loaded full run once counted one more; a leak stays)
            deadline = time.monotonic() + 5
            while _fds(fe.proc.pid) > fd0 + MAX_IDLE + 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _fds(fe.proc.pid) <= fd0 + MAX_IDLE + 2, "\n".join(
                ["at the start:", *fd_start, "now:", *_fd_targets(fe.proc.pid)])
        finally:
            fe.stop()
            daemon.stop()


# 1100 refused MAILs, each a route lookup: 65 s on 2 CPUs at load ~10,
# over half the default timeout (120 s); a slower or busier CI machine gets room
@pytest.mark.timeout(300)
def test_failed_address_memory_stays_at_its_cap_over_many_refused_addresses(
        world, clean_homes):
    """1100 senders routed to 1100 addresses where nothing listens (each
    451): the frontend remembers FAILED_KEPT failed addresses, not every
    one it ever met."""
    from sendooway_front._stream import FAILED_KEPT

    names = FAILED_KEPT + 76
    owner = {n: ("alice", "bob")[n % 2] for n in range(names)}  # (at most 1000 mappings a lookup)
    # (held, not listening, on every address: refused on each of the 127.0.x.y)
    with refused_port() as down:
        for user in ("alice", "bob"):
            world.write_user_file(user, ".sendoowayrc", "".join(
                f"smarthostMapping = direct:*@d{n}.example 127.0.{n // 200 + 1}.{n % 200 + 2}"
                f" {down} u p tls\n" for n in range(names) if owner[n] == user))
        with open_tmp() as tmp:
            out = _out_dir(tmp)
            config = front_config(tmp, world, "smarthostCache = 0\nuserInclude = %h/.sendoowayrc\n",
                                  tls=False)
            daemon = _hooked_daemon(tmp, config, out)
            fe = _hooked_frontend(tmp, config, out)
            try:
                for user in ("alice", "bob"):
                    mine = [n for n in range(names) if owner[n] == user]
                    while mine:  # (90 refused MAILs a session: under the junk limit)
                        with fe.smtp() as c:
                            c.ehlo()
                            assert c.docmd("AUTH PLAIN", login_plain(user, world.users[user].password))[0] == 235
                            for n in mine[:90]:
                                reply = c.docmd(f"MAIL FROM:<a@d{n}.example>")
                                assert reply[0] == 451, (n, reply)
                            del mine[:90]
                tables = _tables(fe.proc.pid, out)
                assert tables["sendooway_front._stream.failed_addresses._until"] == FAILED_KEPT
            finally:
                fe.stop()
                daemon.stop()


# ------------------------------------------------------------ per user


@contextlib.contextmanager
def _more_users(world, n: int):
    """n more users in the fake world (nss_wrapper, pam_matrix), homes under
    the world's root; the world's files as they were afterwards."""
    saved = {p: open(p).read() for p in (world.passwd, world.group, world.passdb)}
    homes = os.path.join(world.root, "home-soak")
    users = {f"soak{i:03d}": (43000 + i, f"soak-Pw-{i:03d}x", os.path.join(homes, f"soak{i:03d}"))
             for i in range(n)}
    try:
        os.makedirs(homes, exist_ok=True)
        os.chmod(homes, 0o755)
        with open(world.passwd, "a") as p, open(world.group, "a") as g, open(world.passdb, "a") as d:
            for name, (uid, pw, home) in users.items():
                p.write(f"{name}:x:{uid}:{uid}:{name}:{home}:/bin/sh\n")
                g.write(f"{name}:x:{uid}:\n")
                d.write(f"{name}:{pw}:sendooway\n")
                os.makedirs(home, exist_ok=True)
                os.chown(home, uid, uid)
                os.chmod(home, 0o700)
        yield users
    finally:
        for path, text in saved.items():
            with open(path, "w") as f:
                f.write(text)
        shutil.rmtree(homes, ignore_errors=True)


def _own_file(path: str, text: str, uid: int) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chown(path, uid, uid)
    os.chmod(path, 0o600)


def test_worker_table_and_ca_cache_stay_at_their_caps_over_many_users(
        world, clean_homes, upstream_factory):
    """76 users, each with a ~/.fetchmailrc route and a ~/.sendoowayrc
    naming their own copy of the CA as sslCA, each sends a message: the
    authenticator keeps at most MAX_WORKERS reader workers (the processes
    too, and no zombie of those it let go), the frontend at most
    _MAX_CACHED contexts of users' CA files; both would hold 76."""
    from sendooway_auth._workers import MAX_WORKERS
    from sendooway_front._tls import _MAX_CACHED

    up = upstream_factory(tls="starttls", accounts={"u": "p"})
    import trustme

    with open(world.ca_file) as f:
        ca = f.read()
    # each user's bundle: the world's CA and their own subset of 7 other CAs
    others = [trustme.CA().cert_pem.bytes().decode() for _ in range(7)]
    with _more_users(world, MAX_WORKERS + 12) as users, open_tmp() as tmp:
        for name, (uid, _pw, home) in users.items():
            _own_file(os.path.join(home, ".fetchmailrc"), (
                'poll pop.example.org proto imap user "u" password "p"\n'
                f'#sendooway:server "localhost"\n#sendooway:port {up.port}\n#sendooway:tls\n'
                f'#sendooway:address "{name}@soak.example"\n'), uid)
            n = int(name[4:]) + 1
            _own_file(os.path.join(home, "ca.pem"),
                      ca + "".join(o for b, o in enumerate(others) if n >> b & 1), uid)
            _own_file(os.path.join(home, ".sendoowayrc"), f"sslCA = {home}/ca.pem\n", uid)
        out = _out_dir(tmp)
        config = front_config(tmp, world, "userInclude = %h/.sendoowayrc\nsmarthostCache = 0\n"
                              "addReceivedField = no\n")
        daemon = _hooked_daemon(tmp, config, out)
        fe = _hooked_frontend(tmp, config, out)
        try:
            def one(name: str) -> dict:
                with fe.smtp() as c:
                    c.starttls(context=world.ssl_context())
                    c.ehlo()
                    c.login(name, users[name][1])
                    return c.sendmail(f"{name}@soak.example", ["rcpt@example.net"], b"Subject: x\r\n\r\nx\r\n")

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                assert list(pool.map(one, sorted(users))) == [{}] * len(users)
            auth, front = _tables(daemon.proc.pid, out), _tables(fe.proc.pid, out)
            assert auth["sendooway_auth._workers.WorkerPool._workers"] == MAX_WORKERS
            assert len(workers(daemon)) <= MAX_WORKERS
            assert not _zombies(daemon.proc.pid)
            # (a user's sslCA travels with the route: cached by its certificates)
            assert front["sendooway_front._tls._client_contexts"] == _MAX_CACHED, front
        finally:
            fe.stop()
            daemon.stop()
