"""Benchmark sendooway-auth: auth checks/s, route lookup latency, and slow
PAM checks side by side. Run: .venv/bin/python -m bench.bench_auth
(or .venv/bin/python bench/bench_auth.py)

Builds a throw-away fake world (nss_wrapper users, pam_wrapper + pam_matrix),
re-executes itself inside it, starts the real daemon and talks to it over its
UNIX socket. Each figure is printed next to its direct counterpart measured in
the same run (PAM called in-process; the route parsed without the
user-switching worker), as a ratio. A user's first lookup (no worker yet) is
measured on an in-process worker table, since the daemon keeps its workers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# run as a script (bench/bench_auth.py) as well as a module: the project's
# root must be importable (tests.fakeworld, bench.*), also in the re-executed child
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ROOT_FLAG = "SENDOOWAY_BENCH_WORLD"
CLIENTS = 32
AUTH_SECONDS = 3.0
ROUTES = 300
SLOW = 0.5


def _reexec_in_world() -> None:
    from tests.fakeworld import World

    root = tempfile.mkdtemp(prefix="sendooway-bench-")
    World.create(root)
    env = World.load(root).env()
    env[ROOT_FLAG] = root
    code = subprocess.call([sys.executable, "-m", "bench.bench_auth"], env=env, cwd=ROOT)
    shutil.rmtree(root, ignore_errors=True)
    sys.exit(code)


async def _login(path: str, user: str, password: str, client: str) -> str:
    from sendooway_shared.protocol import VERSION, AsyncChannel, AuthRequest, Hello
    from sendooway_shared.types import Secret

    reader, writer = await asyncio.open_unix_connection(path)
    ch = AsyncChannel(reader, writer)
    await ch.request(Hello(VERSION, "bench", client))
    reply = await ch.request(AuthRequest(user, Secret(password)))
    ch.close()
    return reply.TYPE


async def _auth_rate(path: str, accounts: list[tuple[str, str]], seconds: float) -> float:
    """Logins/s, CLIENTS at once, client i logging in as accounts[i % n]."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        user, password = accounts[i % len(accounts)]
        while time.monotonic() < stop:
            assert await _login(path, user, password, f"192.0.2.{i}") == "auth_ok"
            done += 1

    t = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(CLIENTS)))
    return done / (time.monotonic() - t)


def _direct_pam_rate(password: str, seconds: float) -> float:
    import pam

    p = pam.pam()
    n = 0
    t = time.monotonic()
    while time.monotonic() - t < seconds:
        assert p.authenticate("alice", password, service="sendooway", resetcreds=False)
        n += 1
    return n / (time.monotonic() - t)


async def _route_latency(path: str, password: str, sender: str, user: str = "alice"
                         ) -> list[float]:
    from sendooway_shared.protocol import VERSION, AsyncChannel, AuthRequest, Hello, RouteRequest
    from sendooway_shared.types import Secret

    reader, writer = await asyncio.open_unix_connection(path)
    ch = AsyncChannel(reader, writer)
    await ch.request(Hello(VERSION, "bench", "192.0.2.1"))
    assert (await ch.request(AuthRequest(user, Secret(password)))).TYPE == "auth_ok"
    times = []
    for _ in range(ROUTES):
        t = time.perf_counter()
        reply = await ch.request(RouteRequest(sender))
        times.append(time.perf_counter() - t)
        assert reply.TYPE == "route_ok", reply
    ch.close()
    return times


async def _route_rate(path: str, password: str, sender: str, clients: int, seconds: float) -> float:
    """Route lookups per second with `clients` connections asking at once."""
    from sendooway_shared.protocol import VERSION, AsyncChannel, AuthRequest, Hello, RouteRequest
    from sendooway_shared.types import Secret

    done = 0
    stop = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        reader, writer = await asyncio.open_unix_connection(path)
        ch = AsyncChannel(reader, writer)
        await ch.request(Hello(VERSION, f"b{i}", "192.0.2.1"))
        assert (await ch.request(AuthRequest("alice", Secret(password)))).TYPE == "auth_ok"
        while time.monotonic() < stop:
            assert (await ch.request(RouteRequest(sender))).TYPE == "route_ok"
            done += 1
        ch.close()

    t = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    return done / (time.monotonic() - t)


def _direct_route_latency(cfg_text: str, sender: str, user: str = "alice") -> list[float]:
    """The same lookup in-process, reading files as root (no user switch, no worker)."""
    from sendooway_auth import _users
    from sendooway_auth._files import Budget, read_one
    from sendooway_auth.routes import run_plan
    from sendooway_shared.config import parse_config

    cfg = parse_config(cfg_text, "bench.conf")
    user = _users.lookup(user)
    times = []
    for _ in range(ROUTES):
        t = time.perf_counter()
        budget = Budget()
        found = run_plan(cfg, user, lambda paths: [read_one(p, budget) for p in paths])
        assert found.route_for(sender) is not None
        times.append(time.perf_counter() - t)
    return times


def _first_lookup_latency(cfg_text: str, gap: float | None) -> list[float]:
    """A user's first lookup through a fresh worker table and fork server:
    without a worker (gap None: fork + lookup), or `gap` seconds after the
    pre-warm a login does (the client's AUTH -> MAIL round trip)."""
    from sendooway_auth import _users
    from sendooway_auth._reader import ForkServer
    from sendooway_auth._workers import WorkerPool
    from sendooway_shared.config import parse_config

    user = _users.lookup("alice")
    forks = ForkServer(parse_config(cfg_text, "bench.conf")).start()
    pool = WorkerPool(forks)

    async def rounds() -> list[float]:
        times = []
        for _ in range(ROUTES // 3):
            pool.close()
            if gap is not None:
                pool.prewarm(user)
                await asyncio.sleep(gap)
            t = time.perf_counter()
            assert not (await pool.lookup(user)).incomplete
            times.append(time.perf_counter() - t)
        return times

    try:
        return asyncio.run(rounds())
    finally:
        pool.close()
        forks.stop()


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    if not os.environ.get(ROOT_FLAG):
        _reexec_in_world()
    if os.geteuid() != 0:
        print("bench_auth: run as root (the authenticator switches users)", file=sys.stderr)
        return 1
    from tests.auth_helpers import Daemon, add_pam_service, build_test_pam_module
    from tests.fakeworld import World

    world = World.load(os.environ[ROOT_FLAG])
    alice = world.users["alice"].password
    work = tempfile.mkdtemp(prefix="bench-auth-")
    fetchmailrc = "".join(
        f'poll pop{i}.example.org user "a{i}" password "p{i}"\n'
        f'#sendooway:server "smtp{i}.example.org"\n#sendooway:tls\n'
        f'#sendooway:address "alice{i}@example.org"\n' for i in range(20))
    world.write_user_file("alice", ".fetchmailrc", fetchmailrc)
    world.write_user_file("alice", ".sendoowayrc",
                          "smarthostMapping = fetchmail:%h/.fetchmailrc\n")
    world.write_user_file("bob", ".fetchmailrc", 'poll pop.example.org user "b" password "p"\n'
                          '#sendooway:server "smtp.example.org"\n#sendooway:tls\n'
                          '#sendooway:address "bob@example.org"\n')
    conf_plain = ""
    conf_include = "userInclude = %h/.sendoowayrc\n"
    results = []

    def config(name: str, text: str) -> str:
        path = os.path.join(work, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    try:
        d = Daemon(os.path.join(work, "d1"), config("a.conf", conf_plain))
        os.makedirs(d.dir)
        d.start()
        try:
            direct = _direct_pam_rate(alice, 1.0)
            # one user's logins are decided one after the other (the failure
            # delay's turns, docs/decisions/auth.md); other users' side by side
            for label, accounts in (
                    ("one user", [("alice", alice)]),
                    (f"{len(world.users)} users", [(u.name, u.password) for u in world.users.values()])):
                rate = asyncio.run(_auth_rate(d.socket_path, accounts, AUTH_SECONDS))
                results.append((f"auth checks/s (daemon, 32 clients, new connection each, {label})",
                                f"{rate:8.0f}", f"direct PAM in-process {direct:.0f}/s",
                                f"{rate / direct:.2f}x"))
            for label, text in (("route lookup (default mappings, reader worker)", conf_plain),):
                lat = asyncio.run(_route_latency(d.socket_path, alice, "alice19@example.org"))
                dl = _direct_route_latency(text, "alice19@example.org")
                results.append((label + " median/p95 ms",
                                f"{statistics.median(lat) * 1e3:.2f}/{_pct(lat, .95) * 1e3:.2f}",
                                f"in-process {statistics.median(dl) * 1e3:.2f} ms",
                                f"{statistics.median(lat) / statistics.median(dl):.1f}x"))
            bob = world.users["bob"].password
            lat1 = asyncio.run(_route_latency(d.socket_path, bob, "bob@example.org", "bob"))
            dl1 = _direct_route_latency(conf_plain, "bob@example.org", "bob")
            results.append(("route lookup (1-account fetchmailrc, reader worker) median/p95 ms",
                            f"{statistics.median(lat1) * 1e3:.2f}/{_pct(lat1, .95) * 1e3:.2f}",
                            f"in-process {statistics.median(dl1) * 1e3:.2f} ms",
                            f"{statistics.median(lat1) / statistics.median(dl1):.1f}x"))
            rate = asyncio.run(_route_rate(d.socket_path, alice, "alice19@example.org", 16, 2.0))
            one = 1 / statistics.median(lat)
            results.append(("route lookups/s (16 connections at once)", f"{rate:8.0f}",
                            f"one connection {one:.0f}/s", f"{rate / one:.2f}x"))
        finally:
            d.stop()
        d = Daemon(os.path.join(work, "d2"), config("b.conf", conf_include))
        os.makedirs(d.dir)
        d.start()
        try:
            lat = asyncio.run(_route_latency(d.socket_path, alice, "alice19@example.org"))
            dl = _direct_route_latency(conf_include, "alice19@example.org")
            results.append(("route lookup (userInclude + file, reader worker) median/p95 ms",
                            f"{statistics.median(lat) * 1e3:.2f}/{_pct(lat, .95) * 1e3:.2f}",
                            f"in-process {statistics.median(dl) * 1e3:.2f} ms",
                            f"{statistics.median(lat) / statistics.median(dl):.1f}x"))
        finally:
            d.stop()
        for label, gap in (("first lookup, no worker yet (fork + lookup)", None),
                           ("first lookup 1 ms after the login's pre-warm", 0.001)):
            lat = _first_lookup_latency(conf_plain, gap)
            results.append((label + " median/p95 ms",
                            f"{statistics.median(lat) * 1e3:.2f}/{_pct(lat, .95) * 1e3:.2f}",
                            f"in-process {statistics.median(dl) * 1e3:.2f} ms",
                            f"{statistics.median(lat) / statistics.median(dl):.1f}x"))
        module = build_test_pam_module(world)
        if module:
            service = add_pam_service(world, "bench-slow", module, fail_sleep=SLOW)
            d = Daemon(os.path.join(work, "d3"), config("c.conf", f"pamService = {service}\n"))
            os.makedirs(d.dir)
            d.start()
            try:
                async def slow_batch(users: list[str]) -> float:
                    t = time.monotonic()
                    replies = await asyncio.gather(*(
                        _login(d.socket_path, user, "wrong", f"198.51.100.{i}")
                        for i, user in enumerate(users)))
                    assert set(replies) == {"auth_fail"}
                    return time.monotonic() - t
                one = asyncio.run(slow_batch(["bob"]))
                # different users from different addresses are checked side
                # by side by the PAM threads; one user's logins are decided
                # one after the other (each one failure delay after the last:
                # docs/decisions/auth.md "Failure delay and backoff")
                names = sorted(world.users)
                side = asyncio.run(slow_batch(names))
                results.append((f"{len(names)} failed checks at once, {len(names)} users,"
                                f" PAM taking {SLOW} s each (s)",
                                f"{side:8.2f}", f"one alone {one:.2f} s",
                                f"{side / one:.2f}x ({len(names)}.00x if serialised)"))
            finally:
                d.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"sendooway-auth benchmark ({os.cpu_count()} CPUs)")
    for label, value, base, ratio in results:
        print(f"  {label:62} {value:>12}   vs {base:32} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
