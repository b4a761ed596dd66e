"""The two answers the authenticator gives: is this login valid, and which
route serves this sender for the user logged in. The log says why."""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import functools
import hashlib
import itertools
import logging
import os
import time
from dataclasses import dataclass

from sendooway_shared.config import AuthBackend, Config
from sendooway_shared.protocol import MAX_REFUSAL_PAD
from sendooway_shared.types import Route, Secret

from . import _ldap, _users
from ._logfmt import field, text
from ._pam import PAM_SUCCESS, PamPool, is_temporary, reason_for
from ._penalty import KeyLocks, Penalty, client_host, client_key, user_key
from ._workers import WorkerPool

log = logging.getLogger("sendooway-auth")


@dataclass(frozen=True)
class Peer:
    """Who a connection says it serves (from hello): for logs and backoff."""

    session: str = ""
    client: str = ""

    @functools.cached_property
    def host(self) -> str:  # (parsed once: penalty, logs and backoff all ask)
        return client_host(self.client)

    @functools.cached_property
    def client_field(self) -> str:
        return field(self.host or self.client)

    def fields(self) -> str:
        return f"client={self.client_field} session={field(self.session)}"


@dataclass(frozen=True)
class AuthResult:
    """ok, or failed (`reason` for the log), or `temporary`: the backend is
    down or stuck, the login was neither accepted nor refused."""

    ok: bool
    user: _users.UserInfo | None = None
    reason: str = ""
    delay: float = 0.0
    temporary: bool = False


class _NoTurn(Exception):
    """A login waited longer than it may for its turn."""


@dataclass(eq=False)
class _Waiter:
    """A login waiting for room in `_Turns` (`serial`: its arrival there)."""

    keys: list[tuple[str, int]]
    place: tuple[str, int] | None
    fut: asyncio.Future
    serial: int
    watched: list[str] | None = None  # the keys in whose waiting list it is


class _Turns:
    """At most n logins under way per key; a login takes all its keys at
    once, when all have room, and holds none while it waits (a user's login
    waiting for a busy address must not hold up the same user's login from
    elsewhere). A user's logins also keep their order of arrival (`line`):
    one that sleeps a backoff hold stays first in its user's line, so later
    guesses cannot overtake it when the hold runs out. A key's count and
    line live only while someone holds or waits for it. With `locks` (the
    socketpair mode's shared store) a turn is also taken from the other
    processes, polled every LOCK_POLL seconds within the same wait."""

    LOCK_POLL = 0.02

    def __init__(self, locks: KeyLocks | None = None) -> None:
        self._locks = locks
        self._used: dict[str, int] = {}
        self._lines: dict[str, collections.deque] = {}
        self._ranks: dict[int, int] = {}  # ticket → its address's failures when it came
        self._tickets = itertools.count()
        # key → the logins waiting for it, in order of arrival (by serial);
        # a login with a place in a key's line is found there by its ticket
        # (`_placed`), and in its other keys' lists only once it is first
        self._waiting: dict[str, dict[int, _Waiter]] = {}
        self._placed: dict[int, _Waiter] = {}

    def enter(self, key: str, rank: int = 0) -> int:
        """A place in `key`'s line (left with `leave`): behind everyone of
        the same or a lower `rank` (the failures of the login's address),
        ahead of those of a higher one, but never ahead of the first (it may
        be sleeping its hold). So an attacker's queued guesses from addresses
        in backoff do not keep the user's own login from a clean address
        waiting behind all of them until it is refused `busy` (a soak test:
        five connections locked a named user out); each decision still
        waits the user's delay, so guessing is no faster."""
        ticket = next(self._tickets)
        line = self._lines.setdefault(key, collections.deque())
        self._ranks[ticket] = rank
        # (behind the first the line is in order of rank, so the place is
        # found by halving: walking it cost a burst of n logins n²/2 steps)
        line.insert(bisect.bisect_right(line, rank, lo=min(1, len(line)),
                                        key=lambda t: self._ranks.get(t, 0)), ticket)
        return ticket

    async def leave(self, key: str, ticket: int) -> None:
        self._ranks.pop(ticket, None)
        line = self._lines.get(key)
        if line is not None:
            try:
                line.remove(ticket)
            except ValueError:
                pass
            if not line:
                del self._lines[key]
        self._wake([key])

    def _room(self, keys: list[tuple[str, int]], place: tuple[str, int] | None) -> bool:
        if place is not None:
            line = self._lines.get(place[0])
            if line and line[0] != place[1]:
                return False
        return all(self._used.get(key, 0) < n for key, n in keys)

    def _watch(self, waiter: _Waiter) -> None:
        """Puts `waiter` in the waiting lists of its keys (but its line's:
        there it is found as the first)."""
        place = waiter.place
        waiter.watched = [key for key, _n in waiter.keys if place is None or key != place[0]]
        for key in waiter.watched:
            self._waiting.setdefault(key, {})[waiter.serial] = waiter

    def _wake(self, changed: list[str]) -> None:
        """For each of the `changed` keys, wakes the first login waiting
        for it that now has room (one unit freed, one login woken): waking
        them all made a burst of n logins at one name cost n² task
        switches and room checks (a Condition's notify_all: 400 logins at
        once took 0.47 s of the daemon's CPU, 0.26 s now). Of the logins
        in a key's line only the first may go, so only it is looked at;
        the others are in no waiting list until they are first (they were:
        a burst at one name from one address cost n²/2 room checks in
        that address's list, 4.5 million for 3000)."""
        for key in changed:
            line = self._lines.get(key)
            first = self._placed.get(line[0]) if line else None
            if first is not None and not first.fut.done():
                if self._room(first.keys, first.place):
                    first.fut.set_result(None)
                    continue
                if first.watched is None:  # first just now: waits for its other keys too
                    self._watch(first)
            for waiter in self._waiting.get(key, {}).values():
                if not waiter.fut.done() and self._room(waiter.keys, waiter.place):
                    waiter.fut.set_result(None)
                    break

    async def _wait_room(self, keys: list[tuple[str, int]], place: tuple[str, int] | None) -> None:
        loop = asyncio.get_running_loop()
        while not self._room(keys, place):
            waiter = _Waiter(keys, place, loop.create_future(), next(self._tickets))
            line = None
            if place is not None:
                self._placed[place[1]] = waiter
                line = self._lines.get(place[0])
            if not line or line[0] == place[1]:  # (behind the first: watched once first, `_wake`)
                self._watch(waiter)
            leaving = True
            try:
                await waiter.fut
                leaving = False
            finally:
                for key in waiter.watched or ():
                    waiting = self._waiting[key]
                    del waiting[waiter.serial]
                    if not waiting:
                        del self._waiting[key]
                if place is not None:
                    del self._placed[place[1]]
                if waiter.fut.done() and not waiter.fut.cancelled() and (
                        leaving or not self._room(keys, place)):
                    # woken, but gone (timed out as it was woken) or
                    # overtaken: the room it was woken for goes to the next
                    self._wake([key for key, _n in keys])

    @contextlib.asynccontextmanager
    async def take(self, keys: list[tuple[str, int]], wait: float,
                   place: tuple[str, int] | None = None):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        try:
            async with asyncio.timeout_at(deadline):
                await self._wait_room(keys, place)
        except TimeoutError:
            raise _NoTurn() from None
        for key, _n in keys:
            self._used[key] = self._used.get(key, 0) + 1
        held: list = []
        try:
            if self._locks is not None:
                held = await self._lock(keys, deadline)
            yield
        finally:
            if held:  # (by the class: _lock may have given up self._locks meanwhile)
                KeyLocks.release(held)
            for key, _n in keys:
                left = self._used[key] - 1
                if left:
                    self._used[key] = left
                else:
                    del self._used[key]
            self._wake([key for key, _n in keys])

    async def _lock(self, keys: list[tuple[str, int]], deadline: float) -> list:
        """The other processes' side of the turn (see KeyLocks)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                held = self._locks.try_take([key for key, _n in keys])
            except OSError as exc:  # (only the turns across processes are lost)
                log.warning("login turns kept per session only: %s: %s",
                            self._locks.directory, exc.strerror or exc)
                self._locks = None
                return []
            if held is not None:
                return held
            if loop.time() + self.LOCK_POLL >= deadline:
                raise _NoTurn()
            await asyncio.sleep(self.LOCK_POLL)


MAX_AUTH_WAIT = 60.0  # seconds; `timeout` from the config if lower
REPEAT_LOG_AFTER = 600.0  # seconds before unchanged file errors of a user are logged again
MAX_REMEMBERED = 4096     # users whose last logged file errors are remembered
MAX_PAM_PAD = MAX_REFUSAL_PAD  # seconds an unknown user's refusal is held back at most


class AuthService:
    """`cfg` is read afresh by every request: a reload (SIGHUP) replaces it,
    and logins from then on, also on connections opened before, use the new
    one (a login already accepted stays accepted)."""

    def __init__(self, cfg: Config, pam_pool: PamPool, readers: WorkerPool,
                 penalty: Penalty, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.pam = pam_pool
        self.readers = readers
        self.penalty = penalty
        self.clock = clock
        self._process_uid = os.geteuid()  # authBackend = none accepts only this account
        self._turns = _Turns(getattr(penalty, "locks", None))
        # user → (digest of the file errors and warnings last logged, when):
        # each MAIL FROM reads the files afresh, and logging the same 100
        # errors again for every one would let a user flood the log
        self._logged: collections.OrderedDict[str, tuple[bytes, float]] = (
            collections.OrderedDict())

    async def authenticate(self, name: str, password: Secret, peer: Peer) -> AuthResult:
        """Check one login; on failure the answer is held back by the penalty."""
        wait = min(float(self.cfg.timeout), MAX_AUTH_WAIT)
        # One undecided login per user name and one per address at a time:
        # a burst from one client cannot fill the PAM queue that every other
        # user's login waits in, and each of its logins meets the backoff
        # the one before it earned.
        keys = [("u:" + user_key(name), 1)]
        if peer.host:
            keys.append(("c:" + client_key(peer.host), 1))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        rank = self.penalty.client_failures(peer.host, self.clock())
        place = (keys[0][0], self._turns.enter(keys[0][0], rank))
        try:
            while True:
                async with self._turns.take(keys, deadline - loop.time(), place):
                    # While the user or the address is in backoff, nothing is
                    # decided before its delay has run out: a caller that
                    # gives up waiting for a refusal (a success comes at once)
                    # would otherwise guess at PAM's full speed. Asked again
                    # after each wait, under the turn: the login before may
                    # have earned a longer one meanwhile.
                    hold = self.penalty.hold(name, peer.host, self.clock())
                    if hold <= 0:
                        result, pause = await self._decide(name, password, peer, wait)
                        break
                if hold >= deadline - loop.time():
                    # decided only after the frontend gave up waiting for it
                    # (it waits `timeout` as well): a temporary failure now,
                    # and the password is not tried for no one
                    raise _NoTurn()
                await asyncio.sleep(hold)  # holding no turn, keeping its place
        except _NoTurn:
            if rank:
                # from an address in backoff (it failed before): a guesser
                # whose next try would wait past the window. The fail2ban
                # line, so that its address is banned too: these used to be
                # "unavailable" lines only, and an attacker hammering a user
                # earned two or three countable failures per 30 s (a soak)
                log.warning("auth failed: user=%s client=%s reason=busy session=%s delay=0.0",
                            field(name), peer.client_field, field(peer.session))
            else:
                log.error("auth unavailable: user=%s client=%s reason=busy session=%s",
                          field(name), peer.client_field, field(peer.session))
            return AuthResult(False, None, "busy", temporary=True)
        finally:
            await self._turns.leave(*place)
        if pause > 0:
            await asyncio.sleep(pause)
        return result

    async def _decide(self, name: str, password: Secret, peer: Peer,
                      wait: float) -> tuple[AuthResult, float]:
        """The login's result, counted in the backoff, and how long to hold
        its answer back after that (the failure delay, slept without the
        turn). Runs holding the login's turns."""
        started = time.monotonic()
        if not password.reveal():
            # never asked of PAM: pam_unix's nullok lets an account without a
            # password in (the frontend never asks; a compromised one might)
            user, reason = None, "empty-password"
        else:
            try:
                async with asyncio.timeout(wait):  # no extra task per login, unlike wait_for
                    user, reason = await self._check(name, password, peer.host)
            except TimeoutError:  # the worker stays stuck; this login is answered
                ldap = self.cfg.authBackend is AuthBackend.LDAP
                user, reason = None, "ldap-timeout" if ldap else "pam-timeout"
        took = time.monotonic() - started
        pam_no = self.penalty.pam_refusal()
        if reason == "wrong-password":
            # how long PAM takes to say no (pam_faildelay, pam_unix: ~2 s),
            # kept with the penalty counts: the socketpair mode's one-session
            # authenticators share it (each began without it: no padding)
            self.penalty.note_pam_refusal(took)
        elif user is None and pam_no and not is_temporary(reason):
            # refused without PAM's delay (an unknown name, not a validUser,
            # an empty password) or after PAM took the password (an expired
            # account): as slow as a wrong password — and with the turn held
            # as long, so that a second login beside it cannot tell either —,
            # so the timing tells neither which accounts exist nor that a
            # password was right
            await asyncio.sleep(max(0.0, min(pam_no, MAX_PAM_PAD) - took))
        if user is None and is_temporary(reason):
            log.error("auth unavailable: user=%s client=%s reason=%s session=%s",
                      field(name), peer.client_field, reason, field(peer.session))
            return AuthResult(False, None, reason, temporary=True), 0.0
        if user is not None:
            self.penalty.success(name, peer.host, self.clock())
            self.readers.prewarm(user)  # its fork overlaps the client's next round trip
            log.info("auth ok: user=%s %s", field(user.name), peer.fields())
            return AuthResult(True, user), 0.0
        # (an empty password is refused before the name is looked up: it
        # counts as a made-up name's, so names made up with one cannot
        # crowd real accounts out of the table)
        delay = self.penalty.failure(name, peer.host, self.clock(),
                                     account=reason not in ("unknown-user", "empty-password"))
        # The fail2ban line: keep "auth failed: user=U client=HOST reason=" stable.
        log.warning("auth failed: user=%s client=%s reason=%s session=%s delay=%.1f",
                    field(name), peer.client_field, reason, field(peer.session), delay)
        return AuthResult(False, None, reason, delay), delay

    async def _check(self, name: str, password: Secret, rhost: str = ""
                     ) -> tuple[_users.UserInfo | None, str]:
        # NSS (passwd, groups: maybe LDAP/SSSD) and PAM block: one worker job
        return await self.pam.run(self._check_blocking, name, password, rhost)

    def _check_blocking(self, name: str, password: Secret, rhost: str = ""
                        ) -> tuple[_users.UserInfo | None, str]:
        if self.cfg.authBackend is AuthBackend.LDAP:
            # the directory names the account (uid, ids, home): NSS need not
            # know it; validUser is asked of that account after the bind
            user, reason = _ldap.login(self.cfg, name, password)
            if user is not None and not _users.valid_user(self.cfg, user)[0]:
                return None, "not-a-valid-user"
            return user, reason
        user = _users.lookup(name)
        if self.cfg.authBackend is AuthBackend.NONE:
            if user is None or user.uid != self._process_uid:
                return None, "not-process-user"
        elif user is None:
            return None, "unknown-user"
        # before PAM: the password of an account kept out is never tried
        allowed, _why = _users.valid_user(self.cfg, user)
        if not allowed:
            return None, "not-a-valid-user"
        if self.cfg.authBackend is not AuthBackend.NONE:
            try:
                said = self.pam.check_here(name, password, rhost)
            except (ValueError, UnicodeError):
                return None, "invalid-characters"
            if said.code != PAM_SUCCESS:
                if said.messages:  # (pam_faillock: "account locked", not a wrong password)
                    log.info("pam: user=%s said: %s", field(name),
                             text(" | ".join(said.messages)))
                return None, reason_for(said.code)
            if said.user != name:
                # a module mapped the login name to another account
                # (pam_set_item(3): PAM_USER is the one that gets to use the
                # service): that account is served, its own files read, if
                # it exists and may use this service
                log.info("pam: login name %s is the account %s", field(name), field(said.user))
                mapped = _users.lookup(said.user)
                if mapped is None:
                    return None, "pam-mapped-user-unknown"
                if not _users.valid_user(self.cfg, mapped)[0]:
                    return None, "not-a-valid-user"  # (the line above names the account)
                return mapped, ""
        return user, ""

    def _log_anew(self, name: str, errors: list[str], warnings: list[str]) -> bool:
        """Whether this lookup's file errors and warnings are worth logging:
        not when they are the ones logged for this user less than
        REPEAT_LOG_AFTER seconds ago."""
        if not errors and not warnings:
            self._logged.pop(name, None)
            return False
        digest = hashlib.sha256("\0".join(errors + ["\1"] + warnings).encode()).digest()
        now = self.clock()
        last = self._logged.get(name)
        if last is not None and last[0] == digest and now - last[1] < REPEAT_LOG_AFTER:
            return False
        self._logged[name] = (digest, now)
        self._logged.move_to_end(name)
        while len(self._logged) > MAX_REMEMBERED:
            self._logged.popitem(last=False)
        return True

    async def route(self, user: _users.UserInfo, sender: str, peer: Peer
                    ) -> tuple[Route | None, bool]:
        """(route or None, temporary): temporary is True when no route was
        found and some file could not be read for an internal reason."""
        found = await self.readers.lookup(user, sender)
        who = f"user={field(user.name)}"
        # the null sender as `<>`: through field() it was `\x3c\x3e`, which
        # no admin greps for (field escapes < and > of real addresses)
        shown = field(sender) if sender else "<>"
        # a failed lookup (the reader timed out, died) is said every time
        if found.failure or self._log_anew(user.name, found.errors, found.warnings):
            for message in found.errors:
                log.warning("user file error: %s %s", who, text(message))
            for message in found.warnings:
                log.warning("user file warning: %s %s", who, text(message))
        account = found.route_for(sender)
        if account is None:
            temporary = found.incomplete
            log.info("route: %s %s sender=%s result=%s", who, peer.fields(),
                     shown, "temporary-failure" if temporary else "none")
            return None, temporary
        # escaped: the server and user come from the user's own files
        log.info("route: %s %s sender=%s result=%s", who, peer.fields(),
                 shown, text(account.route.describe()))
        return account.route, False
