"""The authenticator's login turns (`_service._Turns`) under a burst: one
login per user name and one per client address are decided at a time, and
a freed turn wakes one waiting login, not all of them.

A Condition's notify_all woke every waiting login at every change: n
logins at one name at once cost n² wake-ups and room checks (bench: 400
at once took 0.47 s of the daemon's CPU, 0.26 s with one wake-up per
freed turn). These run the real class on a real event loop; the room
checks are counted by wrapping the instance's own `_room`.
"""

from __future__ import annotations

import asyncio

from sendooway_auth._service import _NoTurn, _Turns


def _counting(turns: _Turns) -> list[int]:
    calls = [0]
    real = turns._room

    def room(keys, place):
        calls[0] += 1
        return real(keys, place)

    turns._room = room
    return calls


def burst_at_one_name(n: int, address, rank: int = 0) -> tuple[list[int], int, _Turns]:
    """n logins for bob at once, the i-th from `address(i)` (its address
    key), all in bob's line with `rank`, each holding its turns for one
    loop step: (the order they were decided in, the room checks, the
    turns afterwards)."""

    async def main():
        turns = _Turns()
        calls = _counting(turns)
        order = []

        async def login(i: int, ticket: int):
            try:
                async with turns.take([("u:bob", 1), (f"c:{address(i)}", 1)], 30, ("u:bob", ticket)):
                    order.append(i)
                    await asyncio.sleep(0)
            finally:
                await turns.leave("u:bob", ticket)

        tickets = [turns.enter("u:bob", rank) for _ in range(n)]
        await asyncio.gather(*(login(i, t) for i, t in enumerate(tickets)))
        return order, calls[0], turns

    return asyncio.run(main())


def test_a_burst_at_one_name_is_decided_in_order_with_a_linear_number_of_room_checks():
    n = 300
    order, checks, turns = burst_at_one_name(n, lambda i: f"192.0.2.{i % 250}")
    assert order == list(range(n))  # their order of arrival
    assert checks < 10 * n, checks  # notify_all: ~n²/2 (45 000)
    assert turns._waiting == {} and turns._used == {} and turns._lines == {}


def test_many_names_from_one_address_all_get_their_turn():
    """Each waiting login is first in its own name's line; one address
    turn at a time, every one of them decided."""
    n = 200

    async def main():
        turns = _Turns()
        calls = _counting(turns)
        done = []

        async def login(i: int):
            key = f"u:user{i}"
            ticket = turns.enter(key)
            try:
                async with turns.take([(key, 1), ("c:198.51.100.7", 1)], 30, (key, ticket)):
                    done.append(i)
                    await asyncio.sleep(0)
            finally:
                await turns.leave(key, ticket)

        await asyncio.gather(*(login(i) for i in range(n)))
        return sorted(done), calls[0]

    done, checks = asyncio.run(main())
    assert done == list(range(n))
    assert checks < 10 * n, checks


def test_a_login_woken_as_it_gives_up_passes_the_turn_on():
    """An address's turn freed wakes the first login waiting for it; if that
    one is cancelled (its wait ran out) in the same moment, the turn goes
    to the next: woken one at a time, it would otherwise wait for a change
    that never comes."""

    async def main():
        turns = _Turns()
        key = [("c:203.0.113.9", 1)]
        holding = asyncio.Event()
        release = asyncio.Event()

        async def holder():
            async with turns.take(key, 5):
                holding.set()
                await release.wait()
            first.cancel()  # woken by the release just now, not yet run

        async def waiter():
            async with turns.take(key, 5):
                return "decided"

        hold = asyncio.ensure_future(holder())
        await holding.wait()
        first = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.01)
        release.set()
        await hold
        try:
            await first
            first_result = "decided"
        except asyncio.CancelledError:
            first_result = "cancelled"
        return first_result, await asyncio.wait_for(second, 2)

    assert asyncio.run(main()) == ("cancelled", "decided")


def test_a_login_still_waits_while_its_name_is_taken_and_gives_up_at_its_wait():
    async def main():
        turns = _Turns()
        async with turns.take([("u:carol", 1)], 5):
            loop = asyncio.get_running_loop()
            t = loop.time()
            try:
                async with turns.take([("u:carol", 1)], 0.2):
                    return "decided while taken"
            except _NoTurn:
                return round(loop.time() - t, 1)

    assert asyncio.run(main()) == 0.2
