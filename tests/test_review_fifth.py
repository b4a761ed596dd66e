"""Fifth review: defects in the login scheduling of c81dcc6
(`_service.AuthService.authenticate`, `_penalty.Penalty.hold`,
`SharedPenalty` on the monotonic clock). The service tests reuse the fourth
review's harness (`_Service`: the real scheduling with a fake PAM); each
test failed against c81dcc6 for the reason its docstring gives."""

from __future__ import annotations

import asyncio
import os
import time

from sendooway_auth._penalty import Penalty, SharedPenalty

from tests.test_review_fourth import NAT, PHONE, _login, _run, _Service


def test_a_login_sleeps_its_hold_past_its_deadline_and_is_decided_after_the_frontend_gave_up():
    """DEFECT (rule: a login gives up with `busy` after about
    min(timeout, 60 s)): `authenticate` checks the deadline only *before*
    sleeping the hold (`if loop.time() >= deadline`), then sleeps the whole
    hold (up to the 15 s cap) however little of its wait is left, and after
    it takes the turn with a timeout of 0 — which succeeds at once when the
    turn is free — and *decides* the login. With `timeout = 5` a login from
    an address in 15-s backoff is answered after 15 s plus PAM's time,
    three times its wait; with the default (60 s wait) up to 75 s. The
    frontend's request timeout is the same `timeout`
    (`_authlink.AuthLink._request`): it has long told the client 454 and
    broken the link when the authenticator asks PAM, so a password is
    tried (and a failure counted, a fail2ban line written, or a success
    logged) for a request nobody waits for any more.

    Scaled: timeout = 2 (a 2 s wait), the NAT in backoff for 4 s; alice's
    right password from the NAT is decided (PAM asked) after ~4 s.

    Correct: a login whose hold runs past its deadline gives up at once
    (`if hold >= deadline - loop.time(): raise _NoTurn()`), or sleeps at
    most what is left of its wait and then answers `busy` without asking
    PAM."""
    async def scenario():
        penalty = Penalty(base=4.0, cap=4.0)
        svc = _Service(penalty, timeout=2, clock=time.monotonic)
        penalty.failure("zz-made-up", NAT, time.monotonic())  # the NAT: 4 s backoff
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result, took = await _login(svc, "alice", "right-A", NAT)
        return result, took, [round(t - t0, 2) for _, t in svc.decided]

    result, took, decided = _run(scenario())
    assert took < 3.0 and not decided, (
        f"a login with a 2 s wait was answered {result.reason or 'ok'!r} after {took:.2f} s;"
        f" PAM was asked at {decided} s, after its wait (and the frontend's timeout) was over")


def _age(directory: str, seconds: float) -> None:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_shared_penalty_files_from_before_a_reboot_count_as_fresh_failures(tmp_path):
    """DEFECT (rule (f): the socketpair mode keeps working on the monotonic
    clock): `SharedPenalty` stores `time.monotonic()` of the failure in its
    files, a clock that starts again at 0 at every boot. The files live in
    `<dirname of authSocket>/penalty/`, and `authSocket` is an ordinary
    keyword (`shared/config.py`): nothing requires it to be under /run, so
    with e.g. `authSocket = /var/lib/sendooway/auth.sock` they survive a
    reboot. After it, a failure stamped by the previous boot (which ran
    longer than this one so far) lies "in the future": `_get` restamps it
    as now (`_restamp`), reviving every count never cleared — however old,
    files are only removed when read after the window or when the store is
    full — as a fresh one for another 15 minutes. A user who mistyped her
    password days ago (or an office NAT with a few old failures) waits up
    to 15 s for a right password right after the reboot, and each of her
    failures from then on starts from the old count. (The other way round,
    a boot that has run longer than the stamps, old failures within 15
    minutes of the new uptime's value count as recent too.) With the wall
    clock the files kept before, an old file simply faded.

    Scaled: alice has 4 failures in the store stamped by a previous boot
    that ran 3 days longer than this one has (the files are 2 days old);
    now `hold` for her right password from her phone says to wait.

    Correct: keep a wall-clock time in the files (the store is shared
    between processes and boots; treat a time in the future as now, as
    already done), or record the boot (`/proc/sys/kernel/random/boot_id`)
    in the store and drop files of another boot, or require/choose a
    directory cleared at boot."""
    directory = str(tmp_path / "penalty")
    previous_boot = SharedPenalty.open(directory, base=1.0, cap=15.0)
    # (since the fix the store converts its caller's clock to the wall clock
    # and back, so the previous boot is its own offset between the two: its
    # monotonic clock ran 3 days ahead of this boot's; the failures were
    # two days ago, at its monotonic time `stamped`)
    prev_offset = (time.time() - time.monotonic()) - 3 * 86400
    previous_boot._offset = lambda: prev_offset
    stamped = (time.time() - 2 * 86400) - prev_offset  # the previous boot's uptime then
    for _ in range(4):
        previous_boot.failure("alice", PHONE, stamped)
    _age(directory, 2 * 86400)

    this_boot = SharedPenalty.open(directory, base=1.0, cap=15.0)
    now = time.monotonic()
    hold = this_boot.hold("alice", PHONE, now)
    count = this_boot.count("alice", PHONE, now)
    assert hold == 0 and count == 0, (
        f"after a reboot, failures two days old in the shared store hold alice's next"
        f" login {hold:.1f} s (count {count}): their monotonic stamps of the previous"
        f" boot were taken for the future and restamped as now")


def test_a_login_that_came_first_is_overtaken_by_later_guesses_after_sleeping_its_hold():
    """DEFECT (rules: logins side by side are decided one after the other;
    a legitimate user is never locked out): `_Turns` says waiters are
    served in the order they came, but a login that must sleep a hold lets
    its turn go and, when the hold runs out, competes afresh with every
    other login sleeping to the same instant (all holds end at the same
    `last + delay`): whichever task's timer fires first takes the user's
    turn. Logins that came later overtake it at random. An attacker who
    keeps k guesses at alice in flight (from anywhere, each costing
    nothing while it sleeps) wins each round with chance k/(k+1); each won
    round is a failure that restarts the user's backoff (up to 15 s), so
    alice's right password from her phone — sent *before* the guesses —
    waits several rounds or ends `busy` after min(timeout, 60 s): a
    lock-out of a named account for one guess per backoff delay, the rate
    the backoff grants the attacker anyway.

    Scaled: alice's user key is in backoff (0.3 s); her right password
    comes from her phone, then ten guesses at alice from ten addresses.
    Three trials; in each, alice's login came first and should be decided
    first, at the end of the hold (~0.35 s). Against c81dcc6 it is decided
    after 1 to 5 guesses, or answered `busy`, in most trials (10/11 per
    trial).

    Correct: a login keeps its place while it sleeps: e.g. `_Turns` hands
    out a ticket per key on arrival and a key's turn goes to the earliest
    ticket whose hold has run out (a sleeping login's ticket blocks later
    ones on the same key), so logins side by side are decided in the order
    they came."""
    async def trial():
        penalty = Penalty(base=0.3, cap=0.3)
        svc = _Service(penalty, timeout=2, pam=0.05, clock=time.monotonic)
        penalty.failure("alice", "203.0.113.9", time.monotonic())  # an attacker's guess
        alice = asyncio.ensure_future(_login(svc, "alice", "right-A", PHONE))
        await asyncio.sleep(0.01)
        guesses = [asyncio.ensure_future(_login(svc, "alice", f"guess-{i}", f"203.0.113.{20 + i}"))
                   for i in range(10)]
        result, took = await alice
        for g in guesses:
            g.cancel()
        await asyncio.gather(*guesses, return_exceptions=True)
        return result.reason or "ok", round(took, 2)

    async def scenario():
        return [await trial() for _ in range(3)]

    trials = _run(scenario())
    assert all(reason == "ok" and took < 0.6 for reason, took in trials), (
        f"alice's right password, sent before ten guesses at her account, got (answer,"
        f" seconds) {trials}: after sleeping the hold, later guesses took her turn first")
