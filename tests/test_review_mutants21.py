"""Mutation and false-positive review of the routing-loop checks
(sendooway_front/_loops.py, their calls in _upstream, _driver, _server) and
the name-lookup pool (_stream._lookup), as of abaff9d.

False positives (a legitimate route refused as a loop), real setups:
- DEFECT: a client was taken for one of our own upstream connections by
  its address alone. Linux gives one ephemeral port to connections to
  different destinations at once: a local client leaving from the address
  and port of our open connection to the local MTA (kept in the
  smarthostCache or in use) had its AUTH refused with 421 4.4.6. Fixed:
  both ends must match (the client's address and the address it reached,
  the PROXY header's source and destination, or the destination before a
  kernel port redirect). Pinned in a network namespace of the test's own
  with one ephemeral port (the kernel's choice made certain).
- no false positive found in: -b 127.0.0.1:P1 with a local MTA on P2;
  127.0.0.2:P or [::1]:P (IPv6 only) beside ours on 127.0.0.1:P or
  0.0.0.0:P; a dual-stack [::]:P with an upstream on another host's
  address and port P; HAProxy in front with a route to another local MTA
  (the PROXY source is the remote client); inetd and Accept=yes (the
  accepted socket's own address only). The weak dict of our connections
  drops an entry when its stream goes, and a closed or closing stream does
  not count. A user with many parallel sessions to a slow name server only
  waits for his turn (2 lookups at once), within `timeout` (300 s).

MUTANTS (each run against test_review_insider and this file; "killed"
means by test_review_insider)
_loops: killed: L01 IPv4-mapped not unmapped; L03 every unspecified
  listener taken as dual-stack; L04 IPV6_V6ONLY read inverted; L05 unserve
  a no-op; L06 the exact (address, port) not looked at; L07 the wildcard
  families swapped; L08 no "*" (dual-stack); L09 `and` -> `or`; L11 any
  local address taken as the host's own; L12 a wildcard never covers a
  non-loopback address; L13 the (local, peer) key swapped; L14 a closing
  connection still counted; L15 only the first destination looked at;
  N03 the peer's end not in the key.
  Killed only here: L02 the %scope kept instead of the address (a
  link-local upstream never ours); L10 loopback not covered by a wildcard
  listener (127.0.0.2:P with us on 0.0.0.0:P: the kernel's source is
  127.0.0.1); L16 SO_ORIGINAL_DST's port read little-endian.
  Equivalent: L17 the None-key test dropped (a (None, dest) key is never
  stored: the same False).
_stream._lookup: killed: S01 no per-user turns; S05 one turn for all
  users; S10 a pool of 2 threads; S11 the user not passed (no turn).
  Killed only here: S02 a finished lookup keeps its turn (the user's third
  lookup never starts); S03/S04 the cap off by one (3, 1 at once); S06 an
  answer handed to a session that stopped waiting (InvalidStateError in
  the loop's exception handler); S07 a lookup given up while waiting for
  its turn keeps its count (the user's entry stays); S08 the user's entry
  dropped while lookups of his still hold or wait for turns (his next
  start beside them: 4 at once); S09 the closed loop's RuntimeError not
  caught (a traceback logged by concurrent.futures).
_upstream, _driver, _server: killed: U01 leads_back's arguments swapped;
  U03 our connection not noted; U04 the user not passed to open_tcp; D01
  the PROXY destination not kept; D02 the PROXY source not kept; N02 the
  PROXY source taken as the destination; V01 the inetd socket not noted;
  V04 the -b listeners not noted.
  Killed only here: U02 the connection that leads back not aborted (the
  hop's session on our side held until `timeout`); D03 no return after
  the 421 (the authenticator still asked: a PAM login per hop; killed by
  an assertion added to test_review_insider's balancer test); V02 the
  Accept=yes socket on fd 3 not noted (the route to its address
  connected and waited until `timeout`).
  Equivalent: V03 no unserve at the stop (the process ends after
  serve_listening; only in-process servers of tests would see it); N01
  the client's own address not among its destinations (a direct
  connection to us is refused by leads_back before it logs in; it stays
  as a second line for a source-preserving path leads_back cannot see).

42 mutants: 26 killed by the suite, 16 survived; this file kills 13, 3
are equivalent. Not tested here: a real kernel port redirect (no
iptables on this machine; SO_ORIGINAL_DST's parsing is tested on the
kernel's struct as bytes)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import shutil
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from sendooway_front import _loops, _stream
from tests.auth_helpers import Daemon
from tests.fakeworld import bound_on_both
from tests.front_util import FRONT, Frontend, front_config, login_plain, open_tmp
from tests.hardening_util import RawClient, wait_for
from tests.upstream import FakeUpstream
from tests.test_review_insider import _bob_mails

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="users and nobody need root")
CLONE_NEWNET = 0x40000000
PORT = 40000  # the only ephemeral port of the test's own network namespace


def _in_own_netns(scenario) -> str:
    """Run `scenario()` in a forked child in a network namespace of its own
    (loopback up, one ephemeral port: the kernel's choice made certain);
    returns what it returned (a str), or the child's error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            _port_range(PORT - 8000, PORT - 1)  # the setup's own connections
            out = scenario()
        except BaseException:  # reported to the parent
            import traceback
            out = "child error: " + traceback.format_exc()
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def _port_range(low: int, high: int) -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write(f"{low} {high}\n")


def _login(s: smtplib.SMTP, world, user: str) -> int:
    s.ehlo("client.test")
    return s.docmd("AUTH", "PLAIN " + login_plain(user, world.users[user].password))[0]


@needs_root
@pytest.mark.skipif(not shutil.which("ip"), reason="no ip(8)")
def test_a_client_sharing_the_source_port_of_an_upstream_connection_is_no_loop(world, clean_homes):
    """DEFECT (false positive): _loops knew our own upstream connections by
    their local end alone (address, port). Linux gives the same ephemeral
    port to connections to different destinations: alice's open upstream
    connection from 127.0.0.1:P to the local MTA, and bob's client from
    127.0.0.1:P to sendooway, exist at once (certain here: one ephemeral
    port). bob's AUTH was refused with 421 4.4.6 "routing loop" and he was
    disconnected, though his connection has nothing to do with ours.
    Correct: a client is one of our upstream connections only when both
    ends match (its address ours, its destination that connection's peer);
    bob logs in (235)."""
    def scenario() -> str:
        up = FakeUpstream(world, tls="plain", require_tls=False).start()
        with open_tmp() as tmp:
            config = front_config(tmp, world, "userInclude = %h/.sendoowayrc\n")
            daemon = Daemon(tmp, config).start()
            front = Frontend(config, os.path.join(str(tmp), "front.log"), port=39001).start()
            world.write_user_file("alice", ".sendoowayrc",
                                  f"smarthostMapping = direct:* 127.0.0.1 {up.port} noAuth\n")
            try:
                _port_range(PORT, PORT)
                # alice from a port of her own choosing, outside the range
                with smtplib.SMTP(front.host, front.port, source_address=("127.0.0.1", 39002),
                                  timeout=20) as alice:
                    assert _login(alice, world, "alice") == 235
                    assert alice.docmd("MAIL", "FROM:<alice@example.org>")[0] == 250
                    with smtplib.SMTP(front.host, front.port, timeout=20) as bob:
                        port = bob.sock.getsockname()[1]
                        code = _login(bob, world, "bob")
            finally:
                front.stop()
                daemon.stop()
                up.stop()
        return f"{port} {code}"

    out = _in_own_netns(scenario)
    assert out == f"{PORT} 235", out


def test_a_scoped_ipv6_address_is_compared_without_its_scope():
    """Kills L02 (the scope kept instead of the address: "fe80::1%eth0" read
    as "eth0", no address, never a loop). An upstream at a link-local
    address of this host with our port, while we listen on an IPv6-only ::,
    is us; Python names such addresses with their %scope."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::", 0))
    s.listen(1)
    try:
        port = _loops.serving(s)[1]
        assert _loops.leads_back(("fe80::1%lo", port, 0, 1), ("fe80::1%lo", 40000, 0, 1))
        assert not _loops.leads_back(("fe80::1%lo", port, 0, 1), ("fe80::2%lo", 40000, 0, 1))
    finally:
        _loops.reset()
        s.close()


def test_an_ipv4_wildcard_listener_is_not_an_ipv6_mta_on_the_same_port():
    """False-positive check (none found; pins the family of the wildcard):
    sendooway on 0.0.0.0:P, a local MTA on [::1]:P (IPv6 only): a route to
    [::1]:P is no loop, one to 127.0.0.2:P is (0.0.0.0 covers it; the kernel
    takes 127.0.0.1 as the source). Real sockets: the MTA listens, and the
    route's connection is made."""
    v4, v6 = bound_on_both("0.0.0.0", "::1")
    port = v4.getsockname()[1]
    v4.listen(4)
    v6.listen(4)
    conns = []
    try:
        assert _loops.serving(v4) == ("0.0.0.0", port)
        results = []
        for addr in ("::1", "127.0.0.2"):
            c = socket.create_connection((addr, port), 5)
            conns.append(c)
            results.append(_loops.leads_back(c.getpeername(), c.getsockname()))
        assert conns[1].getsockname()[0] == "127.0.0.1"
        assert results == [False, True]
    finally:
        _loops.reset()
        for c in conns:
            c.close()
        v4.close()
        v6.close()


class _Redirected:
    """A socket as getsockopt(SO_ORIGINAL_DST) answers it after a REDIRECT
    (this machine has no iptables: the kernel's struct, as bytes)."""

    def __init__(self, family, raw):
        self.family, self.raw = family, raw

    def getsockopt(self, level, name, size):
        assert name == 80 and len(self.raw) <= size
        return self.raw


def test_a_client_redirected_from_the_port_our_upstream_connection_named_is_ours():
    """Kills L15 (only the client's own destination looked at: a kernel port
    redirect from the route's port to ours never seen) and L16 (the port of
    SO_ORIGINAL_DST read little-endian). Our upstream connection left
    127.0.0.1:40001 for 127.0.0.1:2525, redirected to our 127.0.0.1:25."""
    v4 = (socket.AF_INET.to_bytes(2, "little") + (2525).to_bytes(2, "big")
          + socket.inet_aton("127.0.0.1") + bytes(8))
    v6 = (socket.AF_INET6.to_bytes(2, "little") + (2525).to_bytes(2, "big") + bytes(4)
          + socket.inet_pton(socket.AF_INET6, "::1") + bytes(4))
    assert _loops.original_destination(_Redirected(socket.AF_INET, v4)) == ("127.0.0.1", 2525)
    assert _loops.original_destination(_Redirected(socket.AF_INET6, v6)) == ("::1", 2525)
    assert _loops.original_destination(None) is None

    class Open:
        closing = False

    stream = Open()
    try:
        _loops.outgoing(("127.0.0.1", 40001), ("127.0.0.1", 2525), stream)
        assert _loops.from_ourselves(("127.0.0.1", 40001), [("127.0.0.1", 25), ("127.0.0.1", 2525)])
        assert not _loops.from_ourselves(("127.0.0.1", 40001), [("127.0.0.1", 25), None])
    finally:
        _loops.reset()


class _Resolver:
    """socket.getaddrinfo in the lookup pool's threads, held until released:
    counts the lookups of each name running at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.gates = {name: threading.Semaphore(0) for name in ("alice.test", "bob.test", "slow.test")}
        self.real = socket.getaddrinfo

    def release(self, name, n=1):
        for _ in range(n):
            self.gates[name].release()

    def __call__(self, name, port, *a, **kw):
        with self.lock:
            self.running[name] = self.running.get(name, 0) + 1
            self.most[name] = max(self.most.get(name, 0), self.running[name])
        self.gates[name].acquire()
        with self.lock:
            self.running[name] -= 1
        return self.real("127.0.0.1", port, *a, **kw)


def test_one_users_lookups_two_at_a_time_and_his_turns_given_back(monkeypatch):
    """Kills S01 (no turns: 5 at once), S03 (3 at once), S04 (1 at once),
    S05 (one turn for all users: bob's lookup waits for alice's), S02 (a
    finished lookup does not give its turn back: alice's later lookups
    never start), S07 (a lookup given up while waiting for its turn leaves
    its count: the user's entry stays), S08 (the user's entry dropped while
    lookups of his are still waiting: his next ones start beside them, 3+
    at once) and S06 (an answer handed to a session that stopped waiting:
    InvalidStateError in the loop's exception handler). The blocking
    getaddrinfo stands in for a slow name server; the pool and the turns
    are the product's."""
    resolver = _Resolver()
    monkeypatch.setattr(socket, "getaddrinfo", resolver)

    async def until(cond):
        for _ in range(500):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("not reached")

    async def scenario():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
        alice = [asyncio.ensure_future(_stream._lookup("alice.test", 25, "alice")) for _ in range(5)]
        bob = asyncio.ensure_future(_stream._lookup("bob.test", 25, "bob"))
        await until(lambda: resolver.running.get("alice.test") == 2 and resolver.running.get("bob.test") == 1)
        await asyncio.sleep(0.1)
        first = dict(resolver.running)
        # alice's first given up while running, two while waiting for her turn
        alice[0].cancel()
        alice[4].cancel()
        gone = asyncio.ensure_future(asyncio.wait_for(_stream._lookup("alice.test", 25, "alice"), 0.05))
        await asyncio.gather(gone, return_exceptions=True)
        resolver.release("bob.test")
        resolver.release("alice.test")  # one of her two
        await until(lambda: bob.done())
        await asyncio.sleep(0.3)
        late = [asyncio.ensure_future(_stream._lookup("alice.test", 25, "alice")) for _ in range(2)]
        await asyncio.sleep(0.1)
        resolver.release("alice.test", 10)
        await until(lambda: all(f.done() for f in alice[1:4] + late))
        # alice[0] was given up while its thread ran: its turn comes back
        # when that thread is done, which on a loaded machine may be after
        # the others' answers; wait for it (bounded), not a fixed time
        mine = lambda: {k: v for k, v in _stream._lookup_turns.items() if k[0] is loop}
        try:
            await until(lambda: not mine())
        except AssertionError:
            pass
        answers = [f.result()[0][4][0] for f in alice[1:4] + late + [bob]]
        return first, answers, errors, mine()

    try:
        first, answers, errors, turns = asyncio.run(scenario())
    finally:
        resolver.release("alice.test", 20)
        resolver.release("bob.test", 20)
    assert first == {"alice.test": 2, "bob.test": 1}
    assert resolver.most["alice.test"] == 2
    assert answers == ["127.0.0.1"] * 6
    assert not errors, errors
    assert not turns


@needs_root
def test_an_accept_yes_session_whose_route_names_its_own_address_is_a_loop(world, clean_homes):
    """Kills V02 (the connected socket systemd passes on fd 3 not noted as
    ours). Under Accept=yes each session is a process given the accepted
    TCP connection: a route naming the address and port systemd listens on
    (here the test's listener, which systemd would serve) leads back.
    Correct: 451 4.4.6 at once; the mutant connected and waited for a
    greeting until `timeout` (451 4.4.2)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    port = lst.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), 5)
    conn, _ = lst.accept()
    with open_tmp() as tmp:
        config = front_config(tmp, world, "timeout = 3\nuserInclude = %h/.sendoowayrc\n")
        daemon = Daemon(tmp, config).start()
        world.write_user_file("bob", ".sendoowayrc",
                              f"smarthostMapping = direct:* 127.0.0.1 {port} noAuth\n")
        fd = conn.fileno()
        proc = subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"', FRONT, "-c", config,
             "-l", os.path.join(str(tmp), "front.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3,), preexec_fn=lambda: os.dup2(fd, 3))
        conn.close()
        login = login_plain("bob", world.users["bob"].password)
        seen = b""
        try:
            client.settimeout(20)
            client.sendall(b"EHLO bob.test\r\nAUTH PLAIN " + login.encode()
                           + b"\r\nMAIL FROM:<bob@example.org>\r\nQUIT\r\n")
            while chunk := client.recv(65536):
                seen += chunk
        finally:
            client.close()
            proc.wait(20)
            daemon.stop()
            lst.close()
    assert b"\r\n451 4.4.6 " in seen, seen


def test_a_lookup_answered_after_its_loop_closed_is_dropped_quietly(monkeypatch, caplog):
    """Kills S09 (the RuntimeError of call_soon_threadsafe on a closed loop
    not caught: concurrent.futures logs "exception calling callback" with a
    traceback, under inetd at the end of every session whose lookup was
    still blocked). The loop ends while the thread is blocked; then the
    thread finishes."""
    resolver = _Resolver()
    monkeypatch.setattr(socket, "getaddrinfo", resolver)

    async def scenario():
        task = asyncio.ensure_future(_stream._lookup("slow.test", 25, "bob"))
        for _ in range(500):
            if resolver.running.get("slow.test"):
                break
            await asyncio.sleep(0.01)
        task.cancel()
        return resolver.running.get("slow.test")

    with caplog.at_level(logging.DEBUG):
        assert asyncio.run(scenario()) == 1
        resolver.release("slow.test")
        for _ in range(500):
            if not resolver.running.get("slow.test"):
                break
            time.sleep(0.01)
        time.sleep(0.2)  # the thread's done callback runs after getaddrinfo returned
    assert "exception calling callback" not in caplog.text, caplog.text


@needs_root
def test_a_route_back_closes_its_connection_to_ourselves_at_once(world, clean_homes):
    """Kills U02 (the connection that leads back not aborted when the route
    is refused: the hop's session on our own side waits for a greeting
    answer until `timeout`, holding a session slot). bob's MAIL gets 451
    4.4.6; the hop session ends while bob's session still runs."""
    with open_tmp() as tmp:
        config = front_config(tmp, world, "timeout = 30\nuserInclude = %h/.sendoowayrc\n")
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log"))
        bob_user = world.users["bob"]
        world.write_user_file("bob", ".sendoowayrc",
                              f"smarthostMapping = direct:* 127.0.0.1 {front.port} noAuth\n")
        front.start()
        try:
            with RawClient(front.host, front.port, timeout=30) as bob:
                code, lines = _bob_mails(bob, bob_user.password)
                # every session but bob's has ended (the start's probe, the hop)
                ended = wait_for(lambda: _others_closed(front.log()), 10)
        finally:
            front.stop()
            daemon.stop()
        log = front.log()
    assert (code, lines[0][:5]) == (451, b"4.4.6"), (code, lines)
    assert ended, log


def _others_closed(log: str) -> bool:
    sessions = re.findall(r" (\w+) client=\S+: connect$", log, re.M)
    closed = set(re.findall(r" (\w+) client=\S+(?: user=\S+)?: closed: ", log))
    return len(sessions) >= 2 and len(set(sessions) - closed) == 1

