"""Tests written from a mutation-testing review of the product code changed
since a1362e2: shared/protocol.py FrameDecoder.feed and its held error
(`held`, both channels' receive); sendooway_auth/_connection.py, the
silence limits as deadlines (Connection.run's start times, _silence_limit,
_read with asyncio.timeout_at); routes.from_wire/_from_wire's bounds and
`max_accounts`, _reader._decode and WorkerPool.lookup passing it;
sendooway_front/_tls.resumption_failed (the no-resumption mark, now
cleared by a full handshake that fails too) and its two callers in
_stream.start_tls_client. Each test pins down behaviour that a small
change to that code left unnoticed by the suite, and names the mutants it
kills. Real parts: the daemon (real PAM through pam_wrapper, a real reader
fork server), the real WorkerPool against test_review_authframes' hostile
workers, the real relay (open_upstream) against TLS upstreams on loopback
with the fake world's certificates.

56 mutants of the code as it was, one at a time, each against the test
files that exercise its module (protocol: test_protocol, _authframes,
_front_authlink, _auth_fuzz, _auth_daemon, _mutants{,4,11}; connection:
_authframes, _limits, _auth_fuzz, _auth_daemon, _auth_permits,
_mutants{6,11}; routes: test_auth_{routes,faults,second_review,workers,
cli}, _coverage, _localuser, _outside_auth, _authframes, _reload,
_mutants{,3,6}; TLS: test_review_{tls,tlssplits,third,tenth,upstreams4},
test_relay, test_stream_timer_tls_faults, _mutants2): 38 killed, 18
survived. This file kills 13 of them; 5 are equivalent.

MUTANTS ("killed" means by the suite before this file)
FrameDecoder and the channels:
  killed: P01 the held error never raised (the dead decoder's error
  instead); P02 the dead test before the held one (same); P03 every error
  held, none raised at once; P04 every error raised at once (the old
  behaviour); P05 the error never held; P06 the decoder not marked dead;
  P07 `held` always false; P08/P09 the held test dropped from
  BlockingChannel/AsyncChannel.receive (test_review_authframes); P11 the
  hold inverted (test_protocol).
  Equivalent: P10 the held error kept once raised (each feed raises it
  again instead of "connection already broke the protocol"): every
  caller stops at the first ProtocolError (Connection refuses and
  returns, AuthLink marks itself broken, BlockingChannel's users close),
  and the decoder stays dead either way.
Connection's silence limits:
  killed: C02 the frame's start taken anew at every read (the trickle
  again); C05 max for min (a 30 s hello); C08 the latest limit for the
  earliest; C10 the frame's limit from now; C11 asyncio.timeout for
  timeout_at; C12 the start times left at 0; C13 limits also for --fd;
  C17 a held error at EOF dropped; C20 the frame's start reset while a
  frame is pending (test_review_authframes, _limits, _mutants6/11).
  C18/C19 (a frame's start taken from the last answer or the connection's
  start) were killed only through a tie: the hello's two limits then fell
  at the same instant and the other reason won; the first test here
  kills them outright.
  Survived, killed here: C01 the frame's start kept after the frame was
  finished (the next request within `timeout` of the previous frame's
  first octet); C03 the last answer never noted and C09 the login limit
  from the connection's start (4 x `timeout` from connect, not from the
  last answer); C04 the answer noted before it was made (a failure
  delay counted against the peer); C14 3 x `timeout`; C15 no frame limit
  once logged in (test_each_silence_limit_counts_from_its_own_start);
  C16 the daemon reading again before it raises a held error (a peer
  that sent a hello and junk and kept the connection open got its error
  only after 4 x `timeout`: test_the_daemon_refuses_a_broken_frame...).
  Equivalent: C06 the hello's limit from the last answer (nothing is
  answered before the hello: _answered is _opened until then); C07 `if`
  for `elif` (the two states exclude each other).
A worker's answer (routes, _reader, _workers):
  killed: R01/R03 max_array_len or the mappings' bound 1000 (_cap's
  "... and N more" row is the 1001st); R04/R05 1001 or 999 patterns an
  account; R06 MAX_ACCOUNTS for a route request; R07 one account more;
  R08 one account also for a full lookup; R09 MAX_ACCOUNTS for every
  lookup; R11/R12 `max_accounts` not passed on by _decode/from_wire; R13
  R14 a default of one account (--check); R16 none for a route request.
  Survived, killed here: R02 no max_array_len (the per-list checks refuse
  the same answers, after decoding all of them: 1.6 million mapping rows
  cost 0.5 s of the event loop); R10 `if sender` for `if sender is not
  None` (a route for the null sender took 1000 accounts).
TLS sessions (_tls.resumption_failed, _stream.start_tls_client):
  killed: T01 the mark never cleared (test_review_tlssplits); T05 a failed
  full handshake reported as a broken resumption; T08 the clearing
  inverted (a kept session cleared, the mark kept); T09 the stream not
  told (test_stream_timer_tls_faults).
  Survived, killed here: T02 any entry of the context cleared by a full
  handshake that fails, also a session another connection just kept;
  T06 the `checked` test dropped (a certificate refused after the server
  declined the session marked the server); T07 the kept session
  forgotten instead of marked (the server broke every other connection);
  T10 the OSError path consulting resumption_failed only when a session
  was offered (a full handshake reset did not clear the mark).
  Equivalent: T04 the `state.key is None` test dropped (without a key
  nothing was offered and _sessions.get(None) finds nothing: False as
  before); T03 a mark cleared whatever context made it: one key holds one
  entry, and two contexts share a key only while a CA file is replaced
  (the old context serves only sessions already routed) or when a user's
  own sslCA names the config's sslCA file; remember_session already gives
  the slot to whichever context stores last, so the mark was never one
  context's to keep (no new behaviour, not worth a test).
T04, T05 and T06 first looked killed by test_review_upstreams4 (the
Postfix rate-limit and kept-connection tests fail now and then under the
3-worker load); run again without them, T04 and T06 survived.

Found and fixed (147601d): the answer's one map had no bound while its
lists had (R02's killing test measured both): a map of a million keys,
as the answer or inside any list, was decoded whole before the key
check refused it, ~0.8 s of the event loop per route request. Now
max_map_len; the mutant dropping it (R15) is killed here.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import msgpack
import pytest
from OpenSSL import SSL

from sendooway_front import _tls
from sendooway_front._stream import Stream
from sendooway_front._upstream import UpstreamError, open_upstream
from sendooway_shared.protocol import REPLIES, FrameDecoder
from sendooway_shared.types import Route, TlsMode
from tests import auth_helpers
from tests import test_review_tls as review_tls
from tests.test_review_authframes import (
    CONF, PROTOCOL_ERROR, ROOT_ONLY, _alice, _lookup, _wire, frame, packed, requests, seen,
)

daemon = auth_helpers.daemon  # a fixture: real daemons, their logs checked at the end


# ------------------------------------------------ the daemon's silence limits and held error


@ROOT_ONLY
def test_each_silence_limit_counts_from_its_own_start(daemon, world):
    """docs/security.md: hello within `timeout` of the connection's start, a
    begun frame finished within `timeout` of its first octet, each next
    request before a login within 4 x `timeout` of our last answer, and a
    frame begun after a login still finished within `timeout`. One
    connection (timeout = 1, failure delay 1 s) walks past each start
    with half a second to spare either way: a hello in two pieces, a wrong
    login begun 0.8 s after the welcome and finished 0.6 s later, the right
    login 3.5 s after the (delayed) auth_fail, then half a route frame.
    Kills C01 (the frame's start kept after it was finished), C18/C19 (a
    frame's start taken from the last answer / the connection's start),
    C03/C09 (the login limit from the connection's start), C04 (from
    before the answer, the failure delay not counted), C14 (3 x timeout),
    C15 (no frame limit once logged in)."""
    d = daemon(CONF + "timeout = 1\n", failure_delay=1.0)
    good = requests(world.users["alice"].password)
    hello, wrong = frame(packed(good["hello"])), frame(packed(good["wrong"]))
    login, route = frame(packed(good["login"])), frame(packed(good["route"]))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.socket_path)
    start = time.monotonic()
    answers = FrameDecoder(REPLIES)

    def at(when: float, data: bytes) -> None:
        time.sleep(max(0.0, start + when - time.monotonic()))
        s.sendall(data)

    def answer():
        s.settimeout(5)
        while True:
            data = s.recv(65536)
            assert data, "closed without a word"
            got = answers.feed(data)
            if got:
                assert len(got) == 1, got
                return got[0], time.monotonic() - start

    try:
        at(0.3, hello[:9])
        at(0.6, hello[9:])
        assert answer()[0].TYPE == "welcome"
        at(1.4, wrong[:9])  # the hello began at 0.3, the welcome went at 0.6
        at(2.0, wrong[9:])
        reply, failed = answer()
        assert reply.TYPE == "auth_fail" and failed > 2.8, (reply, failed)
        at(failed + 3.5, login)  # 4 x timeout after the auth_fail, not after the login frame
        assert answer()[0].TYPE == "auth_ok"
        s.sendall(route[:5])
        reply, cut = answer()
        assert reply.reason == "closed: a frame left unfinished for 1s", reply
        assert cut - failed - 3.5 < 2.5, cut
    finally:
        s.close()


@ROOT_ONLY
def test_the_daemon_refuses_a_broken_frame_behind_a_good_one_at_once(daemon, world):
    """A hello and a broken frame in one write, the connection left open:
    the hello is answered and the broken frame refused at once, not when
    the peer writes again, closes or runs out of time (4 x `timeout`
    before a login). The channels' side is test_review_authframes';
    kills C16 (the daemon reads again before it raises the held error)."""
    d = daemon(CONF)
    hello = frame(packed(requests(world.users["alice"].password)["hello"]))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.socket_path)
    try:
        s.sendall(hello + frame(b"\xc1"))
        started = time.monotonic()
        s.setblocking(False)
        got = seen(asyncio.run(asyncio.wait_for(auth_helpers.replies_until_closed(s), 3)))
        assert got == [("welcome",), ("error", PROTOCOL_ERROR)], got
        assert time.monotonic() - started < 1.5
    finally:
        s.close()


# ------------------------------------------------ a reader worker's answer (routes.from_wire)


def test_a_workers_answer_is_refused_before_its_overlong_lists_or_maps_are_decoded(world):
    """docs/decisions/auth.md: an answer holds only the lists routes._cap
    leaves, "checked while msgpack decodes", so a worker taken over cannot
    spend the daemon's event loop on 8 MiB of entries. 1.6 million mapping
    rows (a list) and a million keys (a map: the only one in an answer is
    the answer itself, 7 keys) within MAX_WIRE: each refused at its first
    entries, in well under 0.1 s of this thread's CPU (decoding them took
    0.5 s and 0.8 s). Kills R02 (no max_array_len); found the map's
    missing bound, which this review added (R15, max_map_len dropped)."""
    from sendooway_auth.routes import MAX_WIRE, WireError, from_wire

    answer = {"files": [], "mappings": [], "accounts": [], "errors": [], "warnings": [],
              "ca_file": "", "ca_pem": ""}
    rows = msgpack.packb(dict(answer, mappings=[["a", "b"]] * 1_600_000))
    keys = msgpack.packb(dict(answer, errors=[{f"{i:x}": 0 for i in range(1_100_000)}]))
    for body in (rows, keys):
        assert len(body) <= MAX_WIRE
        started = time.thread_time()
        with pytest.raises(WireError):
            from_wire(body, _alice(world), 1)
        assert time.thread_time() - started < 0.1


@ROOT_ONLY
def test_a_route_for_the_null_sender_takes_one_account_too(world):
    """A route request for the null sender (MAIL FROM:<>, a bounce the user
    sends; the daemon logs it as `<>`) names a sender as much as any: the
    worker answers one account, and an answer of two is garbage (a
    temporary failure), not a --check's list. Kills R10 (`if sender` for
    `if sender is not None`: the empty sender let a worker answer 1000
    accounts of 1000 patterns, matched on the event loop)."""
    two = _wire([(["*"], "a.test"), (["*"], "b.test")])
    reply = b"+" + struct.pack(">I", len(two)) + two
    assert _lookup(world, [reply, reply], seed=2, sender="")[:2] == (None, True)


# ------------------------------------------------ upstream TLS sessions (_tls.resumption_failed)


def _upstream_tls(world) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(world.upstream_cert_file)
    ctx.use_privatekey_file(world.upstream_key_file)
    return ctx


def _reset(writer) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _relay_to(world, handle, attempts) -> list:
    """An implicit-TLS upstream on loopback served by `handle(hello, reader,
    writer, stream)`; `attempts(open)` runs the relay's connections (open()
    -> "ok" after a QUIT, or the UpstreamError's code). Sessions forgotten
    before and after."""
    async def go():
        async def serve(reader, writer):
            s = Stream(reader, writer, timeout=5)
            try:
                await handle(await reader.read(65536), s, writer)
            except Exception:  # noqa: BLE001 - the client's side is what is looked at
                pass
            finally:
                await s.aclose()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        route = Route(server="localhost", port=server.sockets[0].getsockname()[1],
                      tls=TlsMode.TLS, ca_file=world.ca_file, auth=False)
        log, _ = review_tls._log()

        async def open_one():
            try:
                client = await open_upstream(route, review_tls._cfg(), "relay.test", log)
            except UpstreamError as e:
                return e.reply.code
            await client.quit()
            return "ok"

        try:
            return await attempts(open_one)
        finally:
            server.close()

    _tls.forget_sessions()
    try:
        return review_tls.run(go())
    finally:
        _tls.forget_sessions()


def test_an_upstream_that_breaks_resumption_is_never_offered_a_session_again(world):
    """docs/decisions/relay.md: a server that fails a resumed handshake is
    reconnected to at once without resumption "and never offered a session
    again". Here one that resets every ClientHello offering a session:
    the second message's connection offers one and is retried afresh, and
    no later one offers a session (each would cost a reset, a retry and a
    log line). Kills T07 (the kept session forgotten instead of marked:
    the next full handshake kept a session again, offered the time after)."""
    seen: list[str] = []
    server = _upstream_tls(world)

    async def handle(hello, s, writer):
        if review_tls._offers_resumption(hello):
            seen.append("resuming")
            _reset(writer)
            return
        seen.append("full")
        s.unread(hello)
        await s.start_tls_server(server)
        await review_tls._smtp_over(s)

    async def attempts(open_one):
        return [await open_one() for _ in range(4)]

    assert _relay_to(world, handle, attempts) == ["ok"] * 4
    assert seen == ["full", "resuming", "full", "full", "full"], seen


def test_a_fresh_handshake_failing_beside_a_good_one_leaves_its_session(world):
    """Two connections to one upstream side by side, neither with a session
    to offer: one logs in (its session kept), the other's handshake is cut
    (a 454 for that message). A full handshake that fails clears only a
    mark that resumption broke, not the session the other connection
    just kept: the next connection offers it. Kills T02 (any kept entry of
    the context cleared: one full handshake more after every such pair)."""
    seen: list[str] = []
    server = _upstream_tls(world)
    first_done, second_hello = asyncio.Event(), asyncio.Event()

    async def handle(hello, s, writer):
        seen.append("resuming" if review_tls._offers_resumption(hello) else "full")
        if len(seen) == 2:  # the second side by side: cut once the first one is done
            second_hello.set()
            await asyncio.wait_for(first_done.wait(), 5)
            return
        if len(seen) == 1:
            # both ClientHellos out before the first keeps its session: on a
            # loaded machine the second was sent after it, offering that
            # session, and its cut was a failed resumption, retried
            await asyncio.wait_for(second_hello.wait(), 5)
        s.unread(hello)
        await s.start_tls_server(server)
        await review_tls._smtp_over(s)
        first_done.set()

    async def attempts(open_one):
        pair = await asyncio.gather(open_one(), open_one())
        return sorted(map(str, pair)) + [await open_one()]

    codes = _relay_to(world, handle, attempts)
    assert codes[1:] == ["ok", "ok"] and codes[0].startswith("4"), codes
    assert seen == ["full", "full", "resuming"], seen


def test_an_upstream_resetting_a_resumed_handshake_and_its_retry_is_resumed_again_later(world):
    """test_review_tlssplits' outage (the resumed handshake and its retry
    both cut) with resets instead of FINs, which _stream takes on its
    OSError path: the full handshake reset as well clears the mark, so
    once the upstream is back its sessions are kept and offered again.
    Kills T10 (the OSError path consulting resumption_failed only for a
    handshake that offered a session: the mark stayed, a full handshake
    on every connection while the context lived)."""
    seen: list[str] = []
    server = _upstream_tls(world)

    async def handle(hello, s, writer):
        seen.append("resuming" if review_tls._offers_resumption(hello) else "full")
        if len(seen) in (2, 3):  # the resumed one and its retry
            _reset(writer)
            return
        s.unread(hello)
        await s.start_tls_server(server)
        await review_tls._smtp_over(s)

    async def attempts(open_one):
        return [str(await open_one()) for _ in range(4)]

    codes = _relay_to(world, handle, attempts)
    assert codes[0] == codes[2] == codes[3] == "ok" and codes[1].startswith("4"), codes
    assert seen == ["full", "resuming", "full", "full", "resuming"], seen


def test_a_certificate_refused_after_a_declined_session_does_not_mark_the_upstream(world, tmp_path):
    """A connection offers the kept session; the server declines it (it
    cannot read the ticket) and shows a certificate that is refused. That
    handshake got to the certificates: resumption was not what failed, and
    the next connection offers the session again. Kills T06 (the
    `checked` test dropped: one refused certificate, an upstream
    mis-served for a moment, lost its resumption for as long as the
    context lived)."""
    import trustme

    seen: list[str] = []
    good = _upstream_tls(world)
    stranger = SSL.Context(SSL.TLS_SERVER_METHOD)
    cert, key = review_tls._write_leaf(tmp_path, trustme.CA())
    stranger.use_certificate_chain_file(cert)
    stranger.use_privatekey_file(key)

    async def handle(hello, s, writer):
        seen.append("resuming" if review_tls._offers_resumption(hello) else "full")
        s.unread(hello)
        await s.start_tls_server(stranger if len(seen) == 2 else good)
        await review_tls._smtp_over(s)

    async def attempts(open_one):
        return [str(await open_one()) for _ in range(3)]

    codes = _relay_to(world, handle, attempts)
    assert codes[0] == codes[2] == "ok" and codes[1].startswith("4"), codes
    assert seen == ["full", "resuming", "resuming"], seen


# ------------------------------------------------ a worker's messages (routes.cut_text)


def test_a_workers_messages_are_held_to_what_a_lookup_reports(world):
    """A lookup reports at most 100 messages and a count, each cut to
    MAX_TEXT and "..." (routes._cap), and the daemon logs what it gets. A
    worker taken over sent 101 errors and 101 warnings of 8192 characters
    each (1.6 MB of log per MAIL FROM) and was believed; such an answer is
    garbage now (a temporary failure), as an over-long list is, while
    messages of the longest length cut_text leaves still pass."""
    from sendooway_auth.routes import MAX_CUT, MAX_MESSAGES

    route = [(["*@example.org"], "up.test")]
    for length, wanted in ((MAX_CUT, ("up.test", False)), (MAX_CUT + 1, (None, True)),
                           (8192, (None, True))):
        texts = ["e" * length] * (MAX_MESSAGES + 1)
        for key in ("errors", "warnings"):
            answer = _wire(route, **{key: texts})
            reply = b"+" + struct.pack(">I", len(answer)) + answer
            assert _lookup(world, [reply, reply], seed=3)[:2] == wanted, (length, key)


def test_a_missing_home_of_a_long_path_still_gives_an_answer_the_daemon_takes(world, monkeypatch):
    """The reader adds "home PATH: why" to the warnings after the cap: a
    home of 4000 octets that cannot be entered (an NFS share not mounted)
    must not make an answer the daemon refuses as over-long, which would
    turn every route of that user into a temporary failure; with 100
    warnings already there, the list keeps its bound too."""
    import os

    from sendooway_auth import _reader, routes
    from sendooway_auth._users import UserInfo
    from sendooway_auth.routes import MAX_CUT, MAX_MESSAGES, from_wire
    from sendooway_shared.config import parse_config

    cfg = parse_config("smarthostMapping = direct:*@example.org up.test 587 noAuth\n")
    home = "/nonexistent/" + "h" * 3990
    user = UserInfo("alice", os.getuid(), os.getgid(), home, (os.getgid(),))
    cwd = os.getcwd()
    try:
        answer = _reader._lookup_wire(cfg, user, "alice@example.org")
        found = from_wire(answer, user, 1)
        assert found.route_for("alice@example.org").route.server == "up.test"
        assert found.warnings[0].startswith("home /nonexistent/hhh")
        assert len(found.warnings[0]) == MAX_CUT

        capped = routes._cap  # 150 warnings of the lookup's own behind the home's

        def crowded(found):
            found.warnings.extend(f"w{i}" for i in range(150))
            capped(found)

        monkeypatch.setattr(routes, "_cap", crowded)
        found = from_wire(_reader._lookup_wire(cfg, user, "alice@example.org"), user, 1)
        assert len(found.warnings) == MAX_MESSAGES + 1
        assert found.warnings[0].startswith("home ") and found.route_for("alice@example.org")
        assert found.warnings[-1] == "... and 51 more"
    finally:
        os.chdir(cwd)
