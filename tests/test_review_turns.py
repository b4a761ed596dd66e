"""Review of the login turns' one-at-a-time wake-ups (`_service._Turns`).

The real class on a real event loop. The randomized runs drive logins
shaped like `AuthService.authenticate`'s (a place in the user's line, the
user's and the address's turn, backoff holds slept without the turn, waits
that run out, clients that go away at any await) and check after every
step of the loop that no login waits while it could take its turns with no
one woken to pass them on (a lost wake-up: it would wait until `busy`),
that a key is held by one login at a time and only by the first of its
line, that a user's logins of the same rank are decided in their order of
arrival, and that every table is empty at the end.

Found by this review (each failed before): a burst of n logins at one name
from one address cost n²/2 room checks (every login behind the first stood
in the address's waiting list, and each freed address turn looked at all of
them: 4.5 million for 3000), and taking a place in a line walked the line
(n²/2 steps for a burst; 3 s for 10 000).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random

import pytest

from sendooway_auth._penalty import KeyLocks
from sendooway_auth._service import _NoTurn, _Turns
from sendooway_shared.protocol import VERSION, AuthOk, AuthRequest, Hello
from sendooway_shared.types import Secret
from tests.test_auth_turns import burst_at_one_name
from tests.auth_helpers import Daemon


def _registered(turns: _Turns) -> list:
    found = {id(w): w for w in turns._placed.values()}
    for waiting in turns._waiting.values():
        found.update((id(w), w) for w in waiting.values())
    return list(found.values())


def _lost_wakeups(turns: _Turns) -> list:
    """Waiting logins that have room, though no login woken (and not yet
    run) shares a key with them: nothing would ever wake them."""
    waiters = _registered(turns)
    woken = set()
    for w in waiters:
        if w.fut.done() and not w.fut.cancelled():
            woken.update(key for key, _n in w.keys)
    return [w for w in waiters
            if not w.fut.done() and turns._room(w.keys, w.place)
            and not woken.intersection(key for key, _n in w.keys)]


def _assert_empty(turns: _Turns) -> None:
    assert (turns._used, turns._lines, turns._ranks, turns._waiting, turns._placed) == (
        {}, {}, {}, {}, {})


async def _run_random(seed: int, n: int, locks_dir: str | None = None) -> collections.Counter:
    rnd = random.Random(seed)
    loop = asyncio.get_running_loop()
    shares = [_Turns(KeyLocks(locks_dir)) if locks_dir else _Turns()]
    if locks_dir:  # a second authenticator process: the same store, its own turns
        shares.append(_Turns(KeyLocks(locks_dir)))
        for t in shares:
            t.LOCK_POLL = 0.001
    users = ["u:alice", "u:bob", "u:carol"] + [f"u:user{i}" for i in range(rnd.choice([0, 6]))]
    addrs = ["c:192.0.2.1", "c:192.0.2.2", "c:198.51.100.7", None]
    held: collections.Counter = collections.Counter()
    decided: dict[tuple[str, int], list[tuple[int, int]]] = collections.defaultdict(list)
    outcome: collections.Counter = collections.Counter()
    violations: list = []
    by_ticket: dict[int, asyncio.Task] = {}
    started = [0]  # (a login cancelled before its first step never starts)

    async def login(turns: _Turns, user: str, addr: str | None, rank: int, wait: float,
                    holds: list[float], work: float) -> None:
        keys = [(user, 1)] + ([(addr, 1)] if addr else [])
        started[0] += 1
        ticket = turns.enter(user, rank)
        by_ticket[ticket] = asyncio.current_task()
        deadline = loop.time() + wait
        try:
            while True:
                async with turns.take(keys, deadline - loop.time(), (user, ticket)):
                    for key, _n in keys:
                        held[key] += 1
                        if held[key] > 1:
                            violations.append(("two holders", key))
                    if turns._lines[user][0] != ticket:
                        violations.append(("not first", user, ticket))
                    try:
                        hold = holds.pop() if holds else 0.0
                        if not hold:
                            await asyncio.sleep(work)
                            decided[user, shares.index(turns)].append((rank, ticket))  # (a line per process)
                    finally:
                        for key, _n in keys:
                            held[key] -= 1
                if rnd.random() < 0.3:  # a login woken just now is gone before it runs
                    woken = [w for w in _registered(turns) if w.fut.done()]
                    if woken:
                        by_ticket[rnd.choice(woken).place[1]].cancel()
                if not hold:
                    break
                if hold >= deadline - loop.time():
                    raise _NoTurn()
                await asyncio.sleep(hold)  # no turn held, its place kept
            outcome["decided"] += 1
        except _NoTurn:
            outcome["busy"] += 1
        except asyncio.CancelledError:
            outcome["cancelled"] += 1
            raise
        finally:
            await turns.leave(user, ticket)

    async def checker() -> None:
        while True:
            for turns in shares:
                lost = _lost_wakeups(turns)
                if lost:
                    violations.append(("lost wake-up", [(w.keys, w.place) for w in lost]))
            await asyncio.sleep(0)

    check = asyncio.ensure_future(checker())
    tasks = []
    for _ in range(n):
        if rnd.random() < 0.5:
            await asyncio.sleep(rnd.choice([0, 0, 0.001, 0.003]))
        holds = [rnd.choice([0.001, 0.002, 0.005]) for _ in range(rnd.choice([0, 0, 0, 1, 2]))]
        task = asyncio.ensure_future(login(
            rnd.choice(shares), rnd.choice(users), rnd.choice(addrs), rnd.choice([0, 0, 0, 1, 3]),
            rnd.choice([0.0, 0.01, 0.03, 0.1, 5.0, 5.0, 5.0]), holds,
            rnd.choice([0, 0, 0.001, 0.002])))
        tasks.append(task)
        if rnd.random() < 0.15:  # a client gone, at whatever await its login is
            victim = rnd.choice(tasks)
            loop.call_later(rnd.choice([0, 0.0005, 0.002, 0.01]), victim.cancel)
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)
    check.cancel()
    assert violations == [], (seed, violations[:5])
    assert sum(outcome.values()) == started[0] > n // 2, (started, outcome)
    for user, got in decided.items():  # order of arrival, within a rank
        for rank in {r for r, _t in got}:
            tickets = [t for r, t in got if r == rank]
            assert tickets == sorted(tickets), (seed, user, rank, tickets)
    for turns in shares:
        _assert_empty(turns)
    return outcome


def test_random_interleavings_lose_no_wake_up_and_leave_nothing_behind():
    total: collections.Counter = collections.Counter()
    for seed in range(60):
        total += asyncio.run(_run_random(seed, 60))
    # every path was taken: decided, given up (busy) and cancelled
    assert min(total["decided"], total["busy"], total["cancelled"]) > 20, total


def test_random_interleavings_across_two_processes_sharing_the_store(tmp_path):
    total: collections.Counter = collections.Counter()
    for seed in range(12):
        d = tmp_path / str(seed)
        d.mkdir(mode=0o700)
        total += asyncio.run(_run_random(1000 + seed, 40, str(d)))
        assert list(d.iterdir()) == []  # every lock file removed by its holder
    assert total["decided"] > 100, total


def test_a_burst_at_one_name_from_one_address_costs_linear_room_checks():
    """An attacker's connections from one address all guessing at bob: each
    freed address turn looked at every login behind the first."""
    n = 1000
    order, checks, turns = burst_at_one_name(n, lambda i: "192.0.2.66", rank=2)
    _assert_empty(turns)
    assert order == list(range(n))
    assert checks < 10 * n, checks  # before: ~n²/2 (500 000)


class _CountingRanks(dict):
    looked = 0

    def __getitem__(self, key):
        _CountingRanks.looked += 1
        return super().__getitem__(key)

    def get(self, key, default=None):
        _CountingRanks.looked += 1
        return super().get(key, default)


def test_taking_a_place_in_a_long_line_does_not_walk_it():
    n = 2000
    turns = _Turns()
    turns._ranks = _CountingRanks()
    _CountingRanks.looked = 0
    tickets = [turns.enter("u:bob", 3) for _ in range(n)]
    clean = turns.enter("u:bob", 0)  # bob himself, from a clean address
    assert _CountingRanks.looked < 30 * n, _CountingRanks.looked  # before: n²/2
    line = list(turns._lines["u:bob"])
    assert line == [tickets[0], clean] + tickets[1:]


@pytest.mark.parametrize("ranks", [[0, 2, 1, 2, 0, 5, 1, 0], [4, 4, 0, 0, 3, 1, 1, 9, 0]])
def test_the_place_in_line_is_as_before(ranks):
    """Behind everyone of the same or a lower rank, ahead of the higher,
    never ahead of the first (the rule the walk kept)."""
    turns = _Turns()
    expected: list[tuple[int, int]] = []
    for rank in ranks:
        ticket = turns.enter("u:bob", rank)
        where = len(expected)
        for i in range(1, len(expected)):
            if expected[i][0] > rank:
                where = i
                break
        expected.insert(where, (rank, ticket))
    assert list(turns._lines["u:bob"]) == [t for _r, t in expected]


def test_a_login_behind_the_first_is_woken_when_it_is_first_and_its_address_frees():
    """Behind the first it waits in no address list; once first, it must
    still be woken by its address's turn (held by another user's login)."""

    async def main():
        turns = _Turns()
        addr = ("c:192.0.2.9", 1)
        carol_in = asyncio.Event()
        carol_go = asyncio.Event()

        async def carol():
            t = turns.enter("u:carol")
            try:
                async with turns.take([("u:carol", 1), addr], 5, ("u:carol", t)):
                    carol_in.set()
                    await carol_go.wait()
            finally:
                await turns.leave("u:carol", t)

        async def bob(ticket: int, hold: float):
            try:
                async with turns.take([("u:bob", 1), addr], 5, ("u:bob", ticket)):
                    await asyncio.sleep(hold)
                    return turns._lines["u:bob"][0] == ticket
            finally:
                await turns.leave("u:bob", ticket)

        first, second = turns.enter("u:bob"), turns.enter("u:bob")
        c = asyncio.ensure_future(carol())
        await carol_in.wait()
        b1 = asyncio.ensure_future(bob(first, 0))
        b2 = asyncio.ensure_future(bob(second, 0))
        await asyncio.sleep(0.01)
        assert _lost_wakeups(turns) == []
        carol_go.set()
        return await asyncio.wait_for(asyncio.gather(c, b1, b2), 2), turns

    (_c, *firsts), turns = asyncio.run(main())
    assert firsts == [True, True]
    _assert_empty(turns)


@pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")
def test_the_daemon_decides_a_burst_of_every_users_logins_from_two_addresses(
        tmp_path, tmp_config, world):
    """600 connections at once, the fake world's users by turns, from two
    addresses, two PAM threads: every login is decided (a lost wake-up
    would leave some waiting until `busy`)."""
    d = Daemon(tmp_path, tmp_config(""), extra_args=["--pam-threads", "2"]).start()
    try:
        names = sorted(world.users)
        conns = [d.connect() for _ in range(600)]
        for i, ch in enumerate(conns):
            ch.send(Hello(VERSION, f"s{i}", "192.0.2.1" if i % 3 else "192.0.2.2"))
        assert all(ch.receive().TYPE == "welcome" for ch in conns)
        for i, ch in enumerate(conns):
            name = names[i % len(names)]
            ch.send(AuthRequest(name, Secret(world.users[name].password)))
        got = [ch.receive() for ch in conns]
        assert got == [AuthOk(names[i % len(names)]) for i in range(600)]
        for ch in conns:
            ch.close()
    finally:
        d.stop()
