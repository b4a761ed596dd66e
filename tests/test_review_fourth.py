"""Fourth review: defects in the authenticator's login scheduling of 4d6b1ff
(`_service.AuthService.authenticate`, `_Turns`, `_penalty.Penalty.hold`,
`success`, the `_next` slot reservations). Each test drives `AuthService`
directly in an event loop with a fake PAM (`_check` overridden: a short
sleep, then the answer for a table of accounts), small failure delays and a
small cap (the code scales: base 1 s, cap 15 s in production), and failed
against the code as reviewed for the reason its docstring gives (each is
fixed: the slot reservations and `held-back` are gone, see
docs/decisions/auth.md)."""

from __future__ import annotations

import asyncio
import logging
import time

from sendooway_auth._penalty import Penalty
from sendooway_auth._service import AuthResult, AuthService, Peer
from sendooway_auth._users import UserInfo
from sendooway_shared.config import parse_config
from sendooway_shared.types import Secret

ACCOUNTS = {"alice": "right-A", "bob": "right-B", "carol": "right-C", "mallory": "right-M"}

NAT = "198.51.100.7"       # an office NAT: several users behind one address
ELSEWHERE = "203.0.113.9"  # an attacker's address
PHONE = "192.0.2.50"       # alice's phone on mobile data: never a failure


class _Readers:
    def prewarm(self, user) -> None:
        pass


class _Service(AuthService):
    """The real scheduling with a fake PAM: `_check` sleeps `pam` seconds
    and answers from ACCOUNTS; `decided` lists (name, loop time) of each
    login handed to PAM, i.e. decided."""

    def __init__(self, penalty: Penalty, timeout: int = 30, pam: float = 0.02,
                 clock=time.time) -> None:
        super().__init__(parse_config(f"timeout = {timeout}\n", "review4.conf"), None,
                         _Readers(), penalty, clock)
        self.pam_time = pam
        self.decided: list[tuple[str, float]] = []

    async def _check(self, name: str, password: Secret, rhost: str = ""):
        self.decided.append((name, asyncio.get_running_loop().time()))
        await asyncio.sleep(self.pam_time)
        if name not in ACCOUNTS:
            return None, "unknown-user"
        if password.reveal() != ACCOUNTS[name]:
            return None, "wrong-password"
        return UserInfo(name, 1000, 1000, "/tmp", (1000,)), ""


async def _login(svc: AuthService, name: str, password: str, client: str
                 ) -> tuple[AuthResult, float]:
    """The result and how long it took."""
    started = time.monotonic()
    result = await svc.authenticate(name, Secret(password), Peer("s", client))
    return result, time.monotonic() - started


async def _until_decided(svc: _Service, count: int, limit: float) -> None:
    """Until `count` logins were handed to PAM, or `limit` seconds."""
    deadline = time.monotonic() + limit
    while len(svc.decided) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # (the last ones' PAM answers are counted)


async def _cancel(tasks) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _quiet() -> None:
    logging.getLogger("sendooway-auth").setLevel(logging.CRITICAL)


def _run(coro):
    _quiet()
    return asyncio.run(asyncio.wait_for(coro, 20))


# ------------------------------------------------------------ the slots


def test_a_users_backoff_reserves_the_whole_cap_on_a_shared_address():
    """DEFECT: `Penalty.hold` reserves the slot after the login on *every*
    key that has a count, each spaced by `step`, the *largest* delay of the
    keys (`self._next[key] = start + step` for all keys). So a user in deep
    backoff (an attacker elsewhere guessing at alice: step = the 15 s cap)
    logging in from an address with one old, long expired failure (an
    office NAT where someone mistyped a password ten minutes ago: its own
    step is 1 s) pushes that *address's* next slot a full cap past alice's
    slot. Any other user's login from the NAT while alice's login waits
    then lies beyond the cap and is refused undecided (`reason=held-back`,
    after 15 s, with the fail2ban line for the office's address), though
    neither bob nor the NAT did anything to earn it; with timing a bit
    different, it merely waits up to 15 s more than the NAT's backoff says.

    Scaled: base 0.1 s, cap 1.6 s; the NAT has one failure (its delay ran
    out long ago), alice has five (from elsewhere: her step is the cap).
    alice logs in from the NAT with her right password (she waits her 1.6 s
    slot); 0.5 s later bob, at the NAT, with his right password, is refused
    `held-back`.

    Correct: each key's next slot is spaced by that key's own delay
    (`self._next[key] = start + delay_of(key)`), so the NAT's slot follows
    alice's by the NAT's 0.1 s, and bob is decided (and let in)."""
    async def scenario():
        penalty = Penalty(base=0.1, cap=1.6)
        svc = _Service(penalty)
        result, _ = await _login(svc, "carol", "mistyped", NAT)  # the NAT's one old failure
        assert result.reason == "wrong-password"
        await asyncio.sleep(0.3)  # its 0.1 s delay has long run out
        for _ in range(5):  # an attacker elsewhere: alice's step is the cap
            penalty.failure("alice", ELSEWHERE, time.time())
        alice = asyncio.ensure_future(_login(svc, "alice", "right-A", NAT))
        await asyncio.sleep(0.5)
        bob = await _login(svc, "bob", "right-B", NAT)
        return await alice, bob

    (alice, _), (bob, bob_took) = _run(scenario())
    assert alice.ok
    assert bob.ok, (
        f"bob (no failure of his own, at an address whose one failure's delay ran out"
        f" long ago) was refused {bob.reason!r} after {bob_took:.2f} s: alice's user"
        f" backoff reserved the NAT's next slot a full cap after hers")


def test_one_queued_guess_a_slot_ahead_locks_the_user_out_everywhere():
    """DEFECT (rule: a legitimate user is never locked out): the user key's
    slots are shared by every address, and a login whose slot lies beyond
    the cap is refused undecided (`held-back`). An attacker who keeps one
    guess at alice queued (sent, its slot not yet come; one new login from
    anywhere every 15 s, never waiting for an answer) keeps alice's next
    slot more than a cap away at all times, so *every* login of alice's,
    from any address and with the right password, is refused `held-back`
    after 15 s — a complete lockout of a named account for four requests
    a minute, each refusal writing a fail2ban line that bans alice's own
    address, and counting as a failure against her session.

    Scaled: base 0.1 s, cap 1.6 s; alice has five failures (step = cap),
    the attacker's next guess waits its slot; alice's phone (an address
    without a single failure) sends her right password and is refused
    `held-back`.

    Correct: a login is refused undecided only for its own address's line
    (the address, or user and address, whose side-by-side logins exceed the
    slots), not because someone else queued on the user's key: e.g. space
    and cap the slots per address and per (user, address), and let the
    user key impose only the delay of its last counted failure (`last +
    delay`), or let a login from an address with no reservation wait its
    turn behind the user's slot instead of refusing it."""
    async def scenario():
        penalty = Penalty(base=0.1, cap=1.6)
        svc = _Service(penalty)
        for _ in range(5):
            penalty.failure("alice", ELSEWHERE, time.time())
        guess = asyncio.ensure_future(_login(svc, "alice", "guess-1", ELSEWHERE))
        await asyncio.sleep(0.1)
        phone = await _login(svc, "alice", "right-A", PHONE)
        guess.cancel()
        return phone

    phone, took = _run(scenario())
    assert phone.ok, (
        f"alice's right password from her phone (an address with no failure) was refused"
        f" {phone.reason!r} after {took:.2f} s, because an attacker elsewhere has one"
        f" guess at alice queued for her next slot")


def test_a_success_frees_the_slots_other_users_reserved_at_the_address():
    """DEFECT (rule: logins side by side are decided one delay apart):
    `Penalty.success` pops `_next["c:<address>"]`, the *latest* slot
    handed out at that address — which is another login's when logins were
    queued after the successful one. The chain of slots restarts at the
    last failure's delay, so logins sent after the success are slotted
    beside the ones already queued: two guesses decided side by side
    instead of one delay apart. An attacker with an account of their own
    (the very setting of a multi-user host) who mixes logins to it into a
    stream of guesses from one address restarts the chain with each and
    gets a parallel stream of guesses each time (up to the address's two
    turns at PAM's speed) instead of one guess per (up to 15 s) delay.

    Scaled: base 0.1 s; the address is in backoff (delay 0.4 s). mallory
    logs in to her own account, then guesses g1 and g2 are sent side by
    side (slots 0.4 s apart after hers); after her success g3 and g4
    follow. g4 is decided 0.1 s after g1.

    Correct: a success frees only its own reservation (pop the address's
    slot only if it is still the one this login took, i.e. no login was
    slotted after it), or frees nothing at the address at all."""
    async def scenario():
        penalty = Penalty(base=0.1, cap=3.2)
        svc = _Service(penalty)
        for _ in range(3):  # the address's record: delay 0.4 s
            penalty.failure("zz-made-up", NAT, time.time())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = [asyncio.ensure_future(_login(svc, "mallory", "right-M", NAT))]
        await asyncio.sleep(0.02)
        tasks += [asyncio.ensure_future(_login(svc, g, "x", NAT)) for g in ("g1", "g2")]
        while not any(name == "mallory" for name, _ in svc.decided):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # mallory's success is counted
        tasks.append(asyncio.ensure_future(_login(svc, "g3", "x", NAT)))
        await asyncio.sleep(0.05)
        tasks.append(asyncio.ensure_future(_login(svc, "g4", "x", NAT)))
        # (which of mallory, g1 and g2 takes the address's first turn when
        # their holds end together is the timers' draw: when a guess wins
        # it, the chain of delays is one step longer, 0.4+0.8+1.6+3.2 s)
        await _until_decided(svc, 5, 8.0)
        await _cancel(tasks[1:])  # (their failure delays need not be slept)
        return tasks[0].result(), [(n, round(t - t0, 2)) for n, t in svc.decided]

    (mallory, _), decided = _run(scenario())
    assert mallory.ok
    guesses = sorted(t for n, t in decided if n != "mallory")
    gaps = [b - a for a, b in zip(guesses, guesses[1:])]
    assert len(guesses) == 4 and min(gaps) >= 0.3, (
        f"guesses from an address in backoff (delay 0.4 s and more) were decided"
        f" {min(gaps):.2f} s apart (decisions at {decided}): mallory's success freed"
        f" the slot g2 had reserved, and the logins after it were slotted beside g1, g2")


def test_a_login_slotted_for_its_users_backoff_skips_the_addresss_backoff():
    """DEFECT (rule: while an address is in backoff a login is not decided
    before its delay has run out): `hold` is asked once; after sleeping it
    (`slept`), `authenticate` decides the login without asking again. A
    login slotted only for its *user's* backoff (the address had no count
    then) is therefore decided at its slot even if its address earned a
    backoff meanwhile. An attacker sends, from a fresh address, guesses at
    many users that are each in backoff (one failure each, from anywhere):
    each gets a slot on its own user's key only, and all are decided
    together when the slots come — two at a time, at PAM's speed — while
    the address's own backoff, earned by the first of them, is ignored for
    all the others. Users in backoff (which the attacker can arrange, one
    guess each) make the address's spacing void.

    Scaled: base 0.2 s; six names have one failure each from other
    addresses; six guesses at them are sent side by side from a fresh
    address. They are all decided within a few hundredths of a second,
    where the address's backoff (0.2, 0.4, 0.8 ... s after its first two
    failures) spaces them over seconds.

    Correct: after the hold is slept, ask `hold` again for the keys it did
    not reserve (or for all, honouring this login's own reservation), or
    reserve a slot on the address key even when it has no count yet."""
    names = [f"victim{i}" for i in range(6)]

    async def scenario():
        penalty = Penalty(base=0.2, cap=6.4)
        svc = _Service(penalty)
        for i, name in enumerate(names):
            penalty.failure(name, f"192.0.2.{100 + i}", time.time())
        tasks = [asyncio.ensure_future(_login(svc, n, "guess", NAT)) for n in names]
        await _until_decided(svc, len(names), 1.5)
        await _cancel(tasks)  # (their failure delays need not be slept)
        return sorted(t for _, t in svc.decided)

    times = _run(scenario())
    assert len(times) < len(names) or times[-1] - times[0] >= 0.5, (
        f"six guesses from one address were all decided within"
        f" {times[-1] - times[0]:.2f} s although its first failures put it in backoff:"
        f" each was slotted on its user's key only and decided without the address's hold")


# ------------------------------------------------------------ the clock


def test_a_clock_stepped_back_locks_out_everyone_with_a_recent_failure():
    """DEFECT (rules: a right password after a wrong one by a client that
    waited is not delayed; no one is locked out): the penalty's times are
    wall-clock (`AuthService.clock = time.time`), and `hold` waits until
    `last + delay` of a count. When the system clock is stepped back (an
    NTP step after a suspend or at boot, a VM restored, an admin's `date`),
    every recorded failure lies in the future: `until - now` is the step
    plus the delay. Beyond the cap, every login of every user and address
    with a failure in the last 15 minutes is refused undecided
    (`held-back`, 15 s, a fail2ban line each) until the clock catches up
    with the step — an hour's step back locks them out for an hour; below
    the cap, each such login waits as long as the step. The counts also
    never fade during that time (`now - last > window` is false).

    Scaled: alice mistypes once on her phone and waits for her refusal
    (0.1 s); the clock is stepped back 30 s; her right password is refused
    `held-back` instead of being let in at once.

    Correct: measure the backoff with a monotonic clock in the daemon
    (`time.monotonic`), and where a wall clock must be shared (the
    socketpair mode's files) treat a `last` in the future as now
    (`last = min(last, now)`), likewise the `_next` times."""
    step = [0.0]

    def clock() -> float:
        return time.time() + step[0]

    async def scenario():
        svc = _Service(Penalty(base=0.1, cap=0.8), clock=clock)
        first, _ = await _login(svc, "alice", "mistyped", PHONE)
        step[0] = -30.0  # the clock is stepped back
        return first, await _login(svc, "alice", "right-A", PHONE)

    first, (second, took) = _run(scenario())
    assert first.reason == "wrong-password"
    assert second.ok and took < 0.5, (
        f"after the clock was stepped back 30 s, alice's right password (after one wrong"
        f" one whose refusal her phone waited for) got {second.reason or 'ok'!r} after"
        f" {took:.2f} s")


def test_queued_guesses_from_addresses_in_backoff_do_not_lock_the_user_out():
    """A soak test: five connections hammering wrong passwords at bob, each
    from its own address, kept every login of bob's own from a fresh
    address waiting behind all their queued guesses (one user delay each)
    until it was refused `busy`: a named account locked out, no password
    needed. A login from an address with no failures now queues ahead of
    the guesses from addresses in backoff (never ahead of the one being
    decided), so it is decided after at most two of the user's delays.

    Scaled: base 0.1 s, cap 1.6 s, timeout 5 s (the wait window): five
    attackers in a loop; once bob's delay is at the cap, his phone sends the
    right password. Before: about six caps in line, refused busy. Guessing
    is no faster: attackers' decisions stay one user delay apart."""
    async def scenario():
        penalty = Penalty(base=0.1, cap=1.6)
        svc = _Service(penalty, timeout=5)

        attackers = _hammering(svc, "bob", 5)
        try:
            await _until_decided(svc, 6, 15)  # bob's count is past the cap's
            phone = await _login(svc, "bob", "right-B", PHONE)
        finally:
            await _cancel(attackers)
        guesses = [t for name, t in svc.decided if name == "bob"]
        return phone, guesses

    (phone, took), decided = asyncio.run(asyncio.wait_for(_quiet_then(scenario()), 40))
    assert phone.ok, f"bob's right password from a clean address: {phone.reason!r} after {took:.1f} s"
    assert took < 2 * 1.6 + 0.8, took
    gaps = [b - a for a, b in zip(decided, decided[1:])][4:]
    assert gaps and min(gaps) > 0.4, f"decisions for bob came faster than his delay: {gaps}"


def _hammering(svc: AuthService, name: str, count: int) -> list:
    """`count` guessers at `name`, each from its own address, in a loop."""
    async def attacker(i: int) -> None:
        while True:
            await _login(svc, name, f"guess-{i}", f"203.0.113.{i + 1}")

    return [asyncio.ensure_future(attacker(i)) for i in range(count)]


async def _quiet_then(coro):
    _quiet()
    return await coro


def test_busy_refusals_of_addresses_in_backoff_are_fail2ban_lines():
    """A guesser whose next try would wait past the window is refused
    `busy` without PAM; from an address that already failed, that refusal
    is now logged as `auth failed: ... reason=busy` (the fail2ban filter's
    line), so hammering from a few addresses gets them banned. It used to
    be an `auth unavailable` line only: five connections earned two or
    three countable failures per 30 s each (a soak test)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    async def scenario():
        penalty = Penalty(base=0.1, cap=1.6)
        svc = _Service(penalty, timeout=2)

        attackers = _hammering(svc, "bob", 5)
        try:
            await asyncio.sleep(6)
        finally:
            await _cancel(attackers)

    logger = logging.getLogger("sendooway-auth")
    handler = Keep()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    busy = [r for r in records if "reason=busy" in r]
    assert any(r.startswith("auth failed: user=bob client=203.0.113.") for r in busy), busy[:5]
    assert all("client=203.0.113." in r for r in busy)
