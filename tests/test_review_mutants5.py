"""Tests written from a mutation-testing review of the upstream connection
cache (_pool.py: which kept connection is taken, the caps and evictions,
expiry, give-back, close_all) and of the relay's connection handling
(_relay.py: _connect, _open, _mail, _release). Each pins down behaviour
that a small change to that code left unnoticed by the rest of the suite;
each names what it guards."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from sendooway_front._pool import UpstreamPool
from sendooway_front._relay import Relay
from sendooway_front._relay_api import MailParams

from .scripted_relay import Upstream
from .test_upstream_faults import _route
from .upstream import capture_log, config, info, run

REPLIES = {b"MAIL": b"250 2.1.0 ok\r\n", b"RCPT": b"250 2.1.5 ok\r\n"}


class _Up(Upstream):
    """A scripted plain upstream (PIPELINING) that numbers its connections:
    `verbs` holds (connection, verb) for every command, `ended` how each
    connection ended ("quit" once its QUIT is being answered, "cut" when we
    closed it without one, "refused" at the greeting, None while open).
    `slow_quit`: the connections whose QUIT is answered after 0.2 s;
    `late`: those that send one reply too many 0.1 s after their message's
    (while idle); `silent`: connection -> the verb after whose first reply
    it answers nothing more (a NAT forgot it); `mail`: connection -> its
    reply to MAIL (None: it closes instead); `limit`: connections counted at once, beyond which the
    greeting is `421 ... (N)`, N the connection's number; a connection is
    counted `reap` s after its end (a server counts one until it has reaped
    the process that served it); `auth`: connection -> (delay, reply) to
    AUTH PLAIN, offered when given; `rset`: the reply to RSET."""

    def __init__(self, slow_quit: tuple[int, ...] = (), late: tuple[int, ...] = (), silent: dict | None = None,
                 mail: dict | None = None, limit: int = 0, reap: float = 0.0, auth: dict | None = None,
                 rset: bytes = b"250 2.0.0 reset\r\n") -> None:
        super().__init__(_Up._serve)
        self.slow_quit, self.late, self.silent, self.mail = slow_quit, late, silent or {}, mail or {}
        self.limit, self.reap, self.auth = limit, reap, auth
        self.replies = {**REPLIES, b"RSET": rset,
                        b"EHLO": b"250-up.test\r\n" + (b"250-AUTH PLAIN\r\n" if auth else b"")
                        + b"250 PIPELINING\r\n"}
        self.verbs: list[tuple[int, bytes]] = []
        self.ended: list[str | None] = []
        self.counted = 0

    def on(self, n: int) -> list[bytes]:
        """The verbs connection `n` got."""
        return [verb for i, verb in self.verbs if i == n]

    async def _serve(self, c) -> None:
        n = len(self.ended)
        if self.limit and self.counted >= self.limit:
            self.ended.append("refused")
            await c.send(b"421 4.7.0 up.test too many connections (%d)\r\n" % n)
            return
        self.counted += 1
        self.ended.append(None)
        mute = False  # silent from now on
        try:
            await c.send(b"220 up.test ESMTP\r\n")
            while line := await c.line():
                verb = line[:4].upper()
                self.verbs.append((n, verb))
                if mute:
                    continue
                mute = self.silent.get(n) == verb
                if verb == b"QUIT":
                    await asyncio.sleep(0.2 if n in self.slow_quit else 0)
                    self.ended[n] = "quit"
                    await c.send(b"221 2.0.0 bye\r\n")
                    return
                if verb == b"MAIL" and n in self.mail:
                    if self.mail[n] is None:
                        return
                    await c.send(self.mail[n])
                elif verb == b"AUTH":
                    delay, reply = self.auth[n]
                    await asyncio.sleep(delay)
                    await c.send(reply)
                elif verb != b"DATA":
                    await c.send(self.replies.get(verb, b"502 5.5.2 what?\r\n"))
                else:
                    await c.send(b"354 go ahead\r\n")
                    self.messages.append(await c.message())
                    await c.send(b"250 2.0.0 queued\r\n")
                    if n in self.late:
                        asyncio.get_running_loop().call_later(0.1, c.w.write, b"250 2.0.0 late\r\n")
        finally:
            if self.ended[n] is None:
                self.ended[n] = "cut"
            asyncio.get_running_loop().call_later(self.reap, self._uncount)

    def _uncount(self) -> None:
        self.counted -= 1


def _relay(pool: UpstreamPool, log) -> Relay:
    return Relay(config(smarthostCache=30, cloneEhlo=True), log, pool)


async def _open_sessions(up: _Up, pool: UpstreamPool, log, ehlos: list[str], server: str = "127.0.0.1"):
    """One session per EHLO name (cloneEhlo: each name its own pool key),
    each in a transaction at once (so each on a connection of its own)."""
    relays = []
    for ehlo in ehlos:
        relay = _relay(pool, log)
        reply = await relay.mail(info(client_ehlo=ehlo), _at(up, server), "s@x.y", MailParams())
        assert reply.code == 250, reply
        relays.append(relay)
    return relays


async def _ended(up: _Up, bound: float = 5.0) -> None:
    """Wait (bounded) until every connection the upstream had has ended:
    after a fixed pause a loaded machine may not have run the last steps
    yet (the QUIT or the close read upstream). One left open stays None."""
    deadline = asyncio.get_running_loop().time() + bound
    while None in up.ended and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


def _at(up: _Up, server: str = "127.0.0.1"):
    return dataclasses.replace(_route(up.port), server=server)


async def _started(up: _Up, max_idle: int = 32, max_per_key: int = 4, ttl: float = 30):
    log, handler = capture_log()
    await up.start()
    return UpstreamPool(ttl, log, max_idle=max_idle, max_per_key=max_per_key), log, handler


# ------------------------------------------------------------ which kept connection is taken


def test_the_connection_kept_last_is_the_one_taken_first():
    """The pool hands out the most recently kept connection of an identity
    (LIFO): it is the least likely to have been timed out by the upstream,
    and the others, unused, age out (smarthostCache) instead of being kept
    alive in turn."""
    async def go():
        up = _Up()
        pool, log, _ = await _started(up)
        first, second = await _open_sessions(up, pool, log, ["c.test", "c.test"])
        await first.close()
        await second.close()  # connection 1, kept after connection 0
        relay = _relay(pool, log)
        assert (await relay.mail(info(client_ehlo="c.test"), _at(up), "t@x.y", MailParams())).code == 250
        relay.abort()
        await pool.close_all()
        return up

    up = run(go())
    assert [n for n, verb in up.verbs if verb == b"MAIL"] == [0, 1, 1] and len(up.ended) == 2


def test_a_kept_connection_that_spoke_while_idle_is_closed_and_the_next_kept_one_serves():
    """Of two connections kept for one identity, the newer one got a reply
    nobody asked for while idle: the next session closes it at once (not
    left open, unreferenced, until the process ends) and takes the older
    one, with no new connection."""
    async def go():
        up = _Up(late=(1,))
        pool, log, _ = await _started(up)
        first, second = await _open_sessions(up, pool, log, ["c.test", "c.test"])
        for relay in (first, second):
            assert (await relay.rcpt("r@x.y")).code == 250
            assert (await relay.data_start()).code == 354
            await relay.data_chunk(b"m\r\n")
            assert (await relay.data_end()).code == 250
        await first.close()
        await second.close()
        await asyncio.sleep(0.3)  # connection 1's surplus reply arrives
        relay = _relay(pool, log)
        assert (await relay.mail(info(client_ehlo="c.test"), _at(up), "t@x.y", MailParams())).code == 250
        await asyncio.sleep(0.1)
        ended = list(up.ended)
        relay.abort()
        await pool.close_all()
        return up, ended

    up, ended = run(go())
    assert [n for n, verb in up.verbs if verb == b"MAIL"] == [0, 1, 0], up.verbs
    assert ended == [None, "cut"], ended


def test_an_identity_whose_last_kept_connection_is_taken_leaves_nothing_behind():
    """Taking an identity's last kept connection forgets the identity: with
    cloneEhlo every client's EHLO name makes a key of its own, and an empty
    list left behind for each would grow for as long as the server runs."""
    async def go():
        up = _Up()
        pool, log, _ = await _started(up)
        for n in range(3):
            [relay] = await _open_sessions(up, pool, log, [f"c{n}.test"])
            await relay.close()
            [relay] = await _open_sessions(up, pool, log, [f"c{n}.test"])
            left = dict(pool._idle)
            relay.abort()
            assert left == {}, left
        await pool.close_all()

    run(go())


# ------------------------------------------------------------ caps, expiry, close_all


@pytest.mark.parametrize("caps, ehlos, ended", [
    (dict(max_per_key=2), ["c.test"] * 3, ["quit", None, None]),
    (dict(max_idle=3), ["a.test", "a.test", "b.test", "c.test"], ["cut", None, None, None]),
])
def test_past_a_cap_the_connection_kept_longest_goes(caps, ehlos, ended):
    """A third connection kept for an identity (max_per_key = 2) pushes out
    the one of that identity kept longest, with QUIT. Over max_idle in all,
    the one kept longest of any identity goes (not the newest one, not the
    oldest of the newest's identity); cut, not QUIT: kept plus QUITs under
    way would then exceed max_idle. The others stay."""
    async def go():
        up = _Up()
        pool, log, _ = await _started(up, **caps)
        for relay in await _open_sessions(up, pool, log, ehlos):
            await relay.close()
        await asyncio.sleep(0.1)
        got = list(up.ended)
        await pool.close_all()
        return got

    assert run(go()) == ended


def test_a_kept_connection_past_its_time_is_quit_politely():
    """When smarthostCache seconds have passed, a kept connection is QUIT
    (not cut, not forgotten while left open)."""
    async def go():
        up = _Up()
        pool, log, _ = await _started(up, ttl=0.2)
        [relay] = await _open_sessions(up, pool, log, ["c.test"])
        await relay.close()
        await asyncio.sleep(0.5)
        await _ended(up)
        return list(up.ended), pool.idle_count()

    assert run(go()) == (["quit"], 0)


def test_every_eviction_quits_however_many_came_before():
    """QUITs under way count against max_idle (so an upstream that never
    answers them cannot pile sockets up), but only while under way: after
    many evictions one after the other, each finished before the next, the
    next evicted connection is still QUIT, not cut."""
    async def go():
        up = _Up()
        pool, log, _ = await _started(up, max_idle=2, max_per_key=1)
        for _n in range(3):  # two at once: the second one kept pushes the first out
            for relay in await _open_sessions(up, pool, log, ["c.test"] * 2):
                await relay.close()
            await asyncio.sleep(0.1)
        ended = list(up.ended)
        await pool.close_all()
        return ended

    assert run(go()) == ["quit", "quit", "quit", None]


def test_close_all_waits_for_every_quit_under_way():
    """close_all (SIGTERM, the end of a single session) returns once every
    QUIT was answered: those of the connections it closes and those of
    evictions still under way (the evicted one here takes 0.2 s to answer)."""
    async def go():
        up = _Up(slow_quit=(0,))
        pool, log, _ = await _started(up, max_per_key=1)
        for relay in await _open_sessions(up, pool, log, ["c.test"] * 2):
            await relay.close()  # the second one kept pushes the first out
        await pool.close_all()
        return list(up.ended)

    assert run(go()) == ["quit", "quit"]


def test_a_connection_released_after_close_all_is_quit_not_kept():
    """After close_all (the server stopping) a session that ends QUITs its
    connection: the pool keeps nothing more, or it would be cut when the
    process ends."""
    async def go():
        up = _Up()
        pool, log, _ = await _started(up)
        [relay] = await _open_sessions(up, pool, log, ["c.test"])
        await pool.close_all()
        await relay.close()
        return list(up.ended), pool.idle_count()

    assert run(go()) == (["quit"], 0)


# ------------------------------------------------------------ give-back


def test_give_back_finds_the_kept_connections_whatever_case_the_route_writes_the_server_in():
    """A route naming its server `LocalHost` (keys hold it in lower case):
    when a new connection is refused at the greeting (a limit per client
    host), the idle connection kept to that server is still found, QUIT,
    and the new connection made."""
    async def go():
        up = _Up(limit=1)
        pool, log, handler = await _started(up)
        [relay] = await _open_sessions(up, pool, log, ["a.test"], server="LocalHost")
        await relay.close()
        [relay] = await _open_sessions(up, pool, log, ["b.test"], server="LocalHost")
        relay.abort()
        await pool.close_all()
        return list(up.ended), handler.text

    ended, text = run(go())
    assert ended[:2] == ["quit", "refused"] and len(ended) == 3, (ended, text)
    assert "those closed, connecting again" in text


def test_the_connection_made_after_a_give_back_waits_for_the_server_to_count_it_out():
    """A server counts a connection until it has reaped the process that
    served it, a moment after its 221 (here 0.15 s): the new connection is
    tried again after each of the GIVE_BACK_PAUSES, not all at once, and
    the one that gets through is a fresh login: MAIL comes first on it, no
    RSET probe as on a kept connection."""
    async def go():
        up = _Up(limit=1, reap=0.15)
        pool, log, handler = await _started(up)
        [relay] = await _open_sessions(up, pool, log, ["a.test"])
        await relay.close()
        [relay] = await _open_sessions(up, pool, log, ["b.test"])
        relay.abort()
        await pool.close_all()
        return up, handler.text

    up, text = run(go())
    assert up.ended[0] == "quit" and up.ended[1:-1] and set(up.ended[1:-1]) == {"refused"}, (up.ended, text)
    assert up.on(len(up.ended) - 1)[:2] == [b"EHLO", b"MAIL"], up.verbs


def test_give_back_that_does_not_help_answers_with_the_last_refusal(monkeypatch):
    """The server still refuses after our idle connection was QUIT (it
    counts that one long after): the client's MAIL gets 451 and the log
    names the last refusal (the fourth connection's), not the first."""
    from sendooway_front import _pool

    monkeypatch.setattr(_pool, "GIVE_BACK_PAUSES", (0.01, 0.01, 0.01))

    async def go():
        up = _Up(limit=1, reap=30)
        pool, log, handler = await _started(up)
        [relay] = await _open_sessions(up, pool, log, ["a.test"])
        await relay.close()
        relay = _relay(pool, log)
        reply = await relay.mail(info(client_ehlo="b.test"), _at(up), "s@x.y", MailParams())
        await pool.close_all()
        return reply, list(up.ended), handler.lines[-2]

    reply, ended, warning = run(go())
    assert reply.code == 451 and ended == ["quit"] + ["refused"] * 4, (reply, ended)
    assert warning.endswith("too many connections (4)"), warning


# ------------------------------------------------------------ the relay's own connection


def test_a_connection_whose_closing_rset_got_a_4xx_is_quit_not_kept():
    """At a session's end with a transaction open, the relay's RSET is
    answered 451: whatever the upstream kept of that transaction, the
    connection is QUIT, not kept for the next session (as after a 5xx)."""
    async def go():
        up = _Up(rset=b"451 4.3.0 not now\r\n")
        pool, log, _ = await _started(up)
        [relay] = await _open_sessions(up, pool, log, ["c.test"])
        await relay.close()
        return list(up.ended), pool.idle_count()

    assert run(go()) == (["quit"], 0)


def test_a_login_that_succeeds_forgets_a_refusal_noted_meanwhile(monkeypatch):
    """Two sessions log in with the same credentials at once: one is
    refused (535, remembered), the other accepted a moment later (an
    upstream's temporary lock, a password changed in between). The success
    forgets the refusal: the next MAIL logs in instead of getting 454
    "failed lately" for five minutes."""
    from sendooway_front import _pool
    from sendooway_front._stream import Lately

    monkeypatch.setattr(_pool, "refused_logins", Lately(_pool.LOGIN_REFUSED_FOR, 8))
    route = _route(0, user="u", password="Up-Pw-5")

    async def go():
        up = _Up(auth={0: (0.0, b"535 5.7.8 no\r\n"), 1: (0.3, b"235 2.7.0 ok\r\n"),
                       2: (0.0, b"235 2.7.0 ok\r\n")})
        log, handler = capture_log()
        await up.start()
        at = dataclasses.replace(route, port=up.port)
        relays = [Relay(config(), log) for _ in range(3)]
        first = await asyncio.gather(*(r.mail(info(), at, "s@x.y", MailParams()) for r in relays[:2]))
        third = await relays[2].mail(info(), at, "s@x.y", MailParams())
        for relay in relays:
            relay.abort()
        return sorted(r.code for r in first), third, handler.text

    first, third, text = run(go())
    assert first == [250, 454], text
    assert third.code == 250, (third, text)


def test_a_connection_whose_closing_rset_got_nonsense_is_cut_at_once():
    """The RSET at a session's end is answered with a line that is no
    reply: the connection is closed there and then, not left open and
    unreferenced until the upstream times it out."""
    async def go():
        up = _Up(rset=b"hello there\r\n")
        pool, log, _ = await _started(up)
        [relay] = await _open_sessions(up, pool, log, ["c.test"])
        await relay.close()
        await asyncio.sleep(0.1)
        await _ended(up)
        return list(up.ended), pool.idle_count()

    assert run(go()) == (["cut"], 0)


def _message(relay: Relay):
    """The rest of a transaction after an accepted MAIL: one RCPT, a message."""
    async def go():
        assert (await relay.rcpt("r@x.y")).code == 250
        assert (await relay.data_start()).code == 354
        await relay.data_chunk(b"m\r\n")
        return await relay.data_end()
    return go()


def test_after_a_kept_connection_went_silent_the_retry_connects_afresh(monkeypatch):
    """Both connections kept for an identity died silently (a NAT forgot
    them). The next MAIL's probe of the first times out; the one retry
    makes a new connection, not the other kept one, or it would time out
    as well and the client get 451. The one given up is closed at once."""
    from sendooway_front import _relay, _upstream

    monkeypatch.setattr(_relay, "PROBE_TIMEOUT", 0.3)
    monkeypatch.setattr(_upstream, "QUIT_WAIT", 0.2)  # (close_all: the other one never answers)

    async def go():
        up = _Up(silent={0: b"DATA", 1: b"DATA"})
        pool, log, handler = await _started(up)
        for relay in await _open_sessions(up, pool, log, ["c.test", "c.test"]):
            assert (await _message(relay)).code == 250
            await relay.close()
        relay = _relay.Relay(config(smarthostCache=30, cloneEhlo=True), log, pool)
        reply = await relay.mail(info(client_ehlo="c.test"), _at(up), "t@x.y", MailParams())
        await asyncio.sleep(0.05)
        ended = list(up.ended)
        relay.abort()
        await pool.close_all()
        return reply, ended, handler.text

    reply, ended, text = run(go())
    assert reply.code == 250 and ended == [None, "cut", None], (reply, ended, text)


def test_a_refused_greeting_with_no_idle_connection_kept_there_is_not_tried_again():
    """The server refuses a new connection at its greeting (421) while the
    pool keeps nothing for it (someone else holds its slots): there is
    nothing to give back, so that refusal is the answer at once, with no
    further tries."""
    async def go():
        up = _Up(limit=1)
        pool, log, handler = await _started(up)
        _reader, other = await asyncio.open_connection("127.0.0.1", up.port)
        await asyncio.sleep(0.05)
        relay = _relay(pool, log)
        reply = await relay.mail(info(client_ehlo="c.test"), _at(up), "s@x.y", MailParams())
        ended = list(up.ended)
        other.close()
        return reply, ended, handler.text

    reply, ended, text = run(go())
    assert reply.code == 451 and ended == [None, "refused"], (reply, ended, text)
    assert "connecting again" not in text


def test_a_kept_connection_whose_probe_gets_a_4xx_is_left_for_a_new_one():
    """The RSET probing a kept connection is answered 451: that connection
    is not clean (whatever it kept may join the message), so the MAIL goes
    over a new connection, as after a 5xx."""
    async def go():
        up = _Up(rset=b"451 4.3.0 not now\r\n")
        pool, log, _ = await _started(up)
        [relay] = await _open_sessions(up, pool, log, ["c.test"])
        assert (await _message(relay)).code == 250
        await relay.close()
        [relay] = await _open_sessions(up, pool, log, ["c.test"])
        assert (await _message(relay)).code == 250
        relay.abort()
        await pool.close_all()
        return up

    up = run(go())
    assert [n for n, verb in up.verbs if verb == b"DATA"] == [0, 1], up.verbs


@pytest.mark.parametrize("answer", [None, b"421 4.3.2 up.test going down\r\n"])
def test_a_new_connection_failing_its_first_mail_is_the_answer_not_tried_again(answer):
    """Only a kept connection (or the session's own, from before) is
    retried once on a new one when MAIL finds it gone or closing: a
    connection made for this very MAIL that closes at it (or says 421) is
    the upstream's answer, 451, with no second connection."""
    async def go():
        up = _Up(mail={0: answer})
        log, handler = capture_log()
        await up.start()
        relay = Relay(config(), log)
        reply = await relay.mail(info(), _at(up), "s@x.y", MailParams())
        relay.abort()
        return reply, len(up.ended), handler.text

    reply, connections, text = run(go())
    assert reply.code == 451 and connections == 1, (reply, text)
    if answer:
        assert reply.lines == ("4.3.2 up.test going down",), reply


def test_after_a_message_dropped_mid_data_the_next_transactions_connection_is_kept():
    """A message is dropped with its connection during DATA (the session
    core refused it half-way, say for a bare LF); the next transaction of the session goes over a
    new connection, and at the session's end that one is RSET and kept,
    not taken for one still waiting for a message and cut."""
    async def go():
        up = _Up()
        pool, log, _ = await _started(up)
        [relay] = await _open_sessions(up, pool, log, ["c.test"])
        assert (await relay.rcpt("r@x.y")).code == 250
        assert (await relay.data_start()).code == 354
        await relay.data_chunk(b"a\r\nb\r\n")
        await relay.data_abort("bare CR or LF in message")
        assert (await relay.mail(info(client_ehlo="c.test"), _at(up), "t@x.y", MailParams())).code == 250
        assert (await relay.rcpt("r@x.y")).code == 250
        await relay.close()
        got = list(up.ended), pool.idle_count()
        await pool.close_all()
        return got

    assert run(go()) == (["cut", None], 1)


def test_a_mail_for_another_route_keeps_the_last_routes_connection():
    """A session's MAIL for another upstream releases the connection it
    had: kept in the pool for the next message on that route, not cut."""
    async def go():
        first, second = _Up(), _Up()
        pool, log, _ = await _started(first)
        await second.start()
        [relay] = await _open_sessions(first, pool, log, ["c.test"])
        assert (await _message(relay)).code == 250
        assert (await relay.mail(info(client_ehlo="c.test"), _at(second), "t@x.y", MailParams())).code == 250
        got = list(first.ended), pool.idle_count()
        relay.abort()
        await pool.close_all()
        return got

    assert run(go()) == ([None], 1)


def test_a_client_rset_after_idling_on_a_dead_link_costs_the_probe_timeout(monkeypatch):
    """The session's own connection idled past KEPT_IDLE with a transaction
    open and died silently meanwhile: the client's RSET gives it up after
    PROBE_TIMEOUT (here 0.3 s), not the whole `timeout` (here 5 s)."""
    import time

    from sendooway_front import _pool, _relay

    monkeypatch.setattr(_pool, "KEPT_IDLE", 0.1)
    monkeypatch.setattr(_relay, "PROBE_TIMEOUT", 0.3)

    async def go():
        up = _Up(silent={0: b"MAIL"})
        pool, log, _ = await _started(up)
        [relay] = await _open_sessions(up, pool, log, ["c.test"])
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await relay.reset()
        took = time.monotonic() - t0
        relay.abort()
        return took, up.on(0)

    took, verbs = run(go())
    assert took < 2 and verbs[-1] == b"RSET", (took, verbs)
