"""Tests written from a second mutation-testing review, of the frontend's
upstream side: the upstream client (_upstream.py), the smarthostCache
(_pool.py), the TLS contexts and checks (_tls.py) and the relay's
connection handling (_relay.py). Each pins down behaviour that a small
change to that code left unnoticed by the rest of the suite; each names
what it guards."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sendooway_front._relay import Relay
from sendooway_front._reply import Reply
from sendooway_front._stream import Stream
from sendooway_front._upstream import (
    MAX_REPLY_LINE, MAX_REPLY_LINES, QUIT_WAIT, ReplyError, ReplyReader, UpstreamClient, parse_ehlo,
)
from sendooway_shared.types import Route, TlsMode

from .test_upstream_faults import Script, _route
from .upstream import capture_log, config, route_for, run, send

ROUTE = _route(25)


# ------------------------------------------------------------ reading the upstream's replies


async def _reading(sent: bytes, then_close: bool = True):
    """A ReplyReader over a socketpair whose far end wrote `sent` (and
    closed, when `then_close`); returns (reader, client, far end)."""
    a, b = socket.socketpair()
    b.sendall(sent)
    if then_close:
        b.shutdown(socket.SHUT_WR)
    stream = await Stream.from_socket(a, timeout=5)
    reader = ReplyReader(stream)
    return reader, UpstreamClient(ROUTE, stream, reader, "relay.test"), b


def _replies(sent: bytes, count: int = 1):
    """The first `count` replies read from `sent`, or the exception raised."""

    async def go():
        reader, client, far = await _reading(sent)
        try:
            return [await reader.read_reply() for _ in range(count)]
        except (ReplyError, ConnectionError) as e:
            return e
        finally:
            client.abort()
            far.close()

    return run(go())


def test_a_reply_line_of_exactly_the_limit_is_taken_and_one_octet_more_is_refused():
    """MAX_REPLY_LINE counts the whole line, CRLF included: a line of that
    many octets is a reply, one octet more is refused (not read on)."""
    at_limit = b"250 " + b"x" * (MAX_REPLY_LINE - 6) + b"\r\n"
    assert len(at_limit) == MAX_REPLY_LINE
    [reply] = _replies(at_limit)
    assert reply.code == 250 and len(reply.lines[0]) == MAX_REPLY_LINE - 6
    over = _replies(b"250 " + b"x" * (MAX_REPLY_LINE - 5) + b"\r\n")
    assert isinstance(over, ReplyError) and "longer than" in str(over)


def test_a_reply_line_without_its_end_is_refused_once_it_fills_the_limit():
    """A line that has filled MAX_REPLY_LINE octets with no LF is refused
    then, not read on until the upstream closes (or the buffer grows)."""
    got = _replies(b"250 " + b"x" * (MAX_REPLY_LINE - 4))
    assert isinstance(got, ReplyError) and "longer than" in str(got)
    short = _replies(b"250 " + b"x" * (MAX_REPLY_LINE - 5))
    assert isinstance(short, ConnectionError)  # shorter: waited for, until the close


def test_a_reply_of_exactly_the_line_count_limit_is_taken_and_one_line_more_is_refused():
    lines = [b"250-line %d\r\n" % i for i in range(MAX_REPLY_LINES - 1)] + [b"250 last\r\n"]
    [reply] = _replies(b"".join(lines))
    assert reply.code == 250 and len(reply.lines) == MAX_REPLY_LINES
    got = _replies(b"250-one more\r\n" + b"".join(lines))
    assert isinstance(got, ReplyError) and "lines" in str(got)


def test_unicode_line_separators_and_c1_controls_never_reach_the_client():
    """Reply text is repeated to the client: C1 controls (CSI U+009B, NEL
    U+0085), DEL and U+2028/U+2029 become "?" like the C0 controls."""
    text = "a\u009b[2Jb\u0085c\u2028d\u2029e\x7ff\tg".encode()
    [reply] = _replies(b"550 " + text + b"\r\n")
    assert reply.lines == ("a?[2Jb?c?d?e?f\tg",)


def test_the_old_auth_equals_form_is_read_in_any_case_and_never_overrides_auth():
    """AUTH=LOGIN (pre-RFC 2554) counts whatever its case, and only when
    the server sent no proper AUTH line, before or after it."""
    assert parse_ehlo(Reply(250, ("up", "auth=LOGIN PLAIN")))["AUTH"] == "LOGIN PLAIN"
    both = parse_ehlo(Reply(250, ("up", "AUTH CRAM-MD5 PLAIN", "AUTH=LOGIN")))
    assert both["AUTH"] == "CRAM-MD5 PLAIN"


def test_bytes_left_behind_a_reply_make_the_connection_one_that_spoke_unasked():
    """Two replies that came in one read: after the first, the second sits
    in the ReplyReader (not in the stream): the connection spoke unasked
    and must not be reused (the pool and the relay ask spoke_unasked)."""

    async def go():
        reader, client, far = await _reading(b"250 one\r\n421 closing\r\n", then_close=False)
        try:
            first = await reader.read_reply()
            return first, reader.buffered, client.spoke_unasked()
        finally:
            client.abort()
            far.close()

    first, buffered, unasked = run(go())
    assert first == Reply(250, ("one",)) and buffered > 0
    assert unasked


def test_a_command_line_with_cr_or_lf_is_never_sent():
    """send_lines refuses a line with CR or LF in it (it would be two
    commands upstream), before anything is written."""

    async def go():
        reader, client, far = await _reading(b"", then_close=False)
        try:
            for bad in ("RCPT TO:<a@b.c>\r\nDATA", b"RSET\rQUIT", "NOOP\n"):
                with pytest.raises(ValueError):
                    await client.send_lines(["NOOP", bad])
            await client.send_lines(["NOOP"])
            far.setblocking(False)
            return await asyncio.get_running_loop().sock_recv(far, 1024)
        finally:
            client.abort()
            far.close()

    assert run(go()) == b"NOOP\r\n"


# ------------------------------------------------------------ logging in upstream


def _session_via(script: Script, tls: TlsMode = TlsMode.PLAIN, user: str = "", cfg=None,
                 messages: int = 1):
    """`messages` transactions of one client session through a Relay to
    the scripted upstream (`user`: log in as that user, password UP_PW).
    Returns (the replies of each, log text)."""

    async def go():
        server, port = await script.serve()
        log, handler = capture_log()
        route = _route(port, tls, user, UP_PW if user else "")
        async with server:
            relay = Relay(cfg or config(timeout=2), log)
            replies = [await send(relay, route, "s@x.y", ["r@x.y"], b"m") for _ in range(messages)]
            await relay.close()
        return replies, handler.text

    return run(go())


def _mail_via(script: Script, tls: TlsMode = TlsMode.PLAIN, user: str = "", cfg=None):
    """One transaction (see _session_via): (its replies, log text)."""
    [replies], log = _session_via(script, tls, user, cfg)
    return replies, log


UP_PW = "Up-Pw-mut2-58"


def _in_sasl(script: Script, challenge: bytes, then: dict[bytes, bytes]) -> None:
    """Makes `script` a server that keeps SASL state: each AUTH gets
    `challenge` (a 334) unless `then` names its start; the line after a
    334 is the client's answer: "*" gets 501, anything else 535. (Script
    answers by verb: the answers it may see, "*" and user "u" in base64,
    are verbs of their own.)"""
    pending = [False]

    async def answer(writer):
        line = script.commands[-1]
        if pending[0]:
            pending[0] = False
            reply = b"501 5.7.0 cancelled\r\n" if line == b"*\r\n" else b"535 5.7.8 refused\r\n"
        else:
            reply = next((v for k, v in then.items() if line.startswith(k)), challenge)
            pending[0] = reply.startswith(b"334")
        writer.write(reply)
        await writer.drain()

    for verb in ("AUTH", "*", "DQ=="):
        script.replies[verb] = answer


def test_a_reply_beyond_the_one_asked_for_after_auth_is_never_taken_for_mails():
    """A surplus after the login's 235 (here a 250) is nonsense: 451
    4.5.0 before MAIL goes. Taken for MAIL's reply, the client would get
    250 for a sender the upstream refused, every later reply a step late."""
    script = Script(EHLO=b"250-x\r\n250 AUTH PLAIN\r\n",
                    AUTH=b"235 2.7.0 ok\r\n250 2.1.0 sender ok\r\n",
                    MAIL=b"550 5.7.1 sender refused\r\n")
    replies, log = _mail_via(script, user="u")
    assert replies["mail"].code == 451 and replies["mail"].lines[0].startswith("4.5.0"), replies
    assert "more than its reply to AUTH" in log and UP_PW not in log


def test_a_greeting_other_than_220_is_not_a_welcome():
    """Only 220 greets (RFC 5321 4.3.2): a 250 greeting is a server not
    ready, 451 4.3.0, and no EHLO goes."""
    script = Script(greeting=b"250 up.test hello\r\n")
    replies, log = _mail_via(script)
    assert replies["mail"].code == 451 and replies["mail"].lines[0].startswith("4.3.0")
    assert "greeting 250" in log
    assert not any(c.startswith(b"EHLO") for c in script.commands)


def test_an_upstream_that_never_greets_is_a_timeout_not_a_lost_connection():
    """The client is told what happened: 451 4.4.2 "timed out" (the
    upstream is slow), not "connection lost"."""
    replies, log = _mail_via(Script(greeting=b""), cfg=config(timeout=1))
    assert replies["mail"].code == 451
    assert replies["mail"].lines[0] == "4.4.2 Upstream server timed out, try again later"
    assert "no greeting within 1s" in log


def test_a_silent_server_on_a_starttls_route_is_named_as_an_implicit_tls_port_in_the_log():
    """A STARTTLS (or plain) route to an implicit-TLS port (465 where 587
    was meant) meets a server that waits silently for a TLS handshake: the
    log used to say only "no answer within Ns" (the reverse mistake, ssl to
    a plain port, has said what it means since a log review). A server
    that greeted and then stalled gets no such hint."""
    replies, log = _mail_via(Script(greeting=b""), tls=TlsMode.STARTTLS, cfg=config(timeout=1))
    assert replies["mail"].code == 451 and replies["mail"].lines[0].startswith("4.4.2"), replies
    line = next(li for li in log.splitlines() if "no greeting within 1s" in li)
    assert "implicit-TLS port (465)" in line and "use ssl, not tls" in line, line

    async def stall(writer):
        await asyncio.sleep(3)

    replies, log = _mail_via(Script(EHLO=stall), tls=TlsMode.STARTTLS, cfg=config(timeout=1))
    assert replies["mail"].code == 451 and replies["mail"].lines[0].startswith("4.4.2"), replies
    assert "no answer within 1s" in log and "implicit-TLS" not in log, log


def test_ehlo_refused_for_now_is_not_retried_as_helo():
    """HELO is the fallback of an EHLO the server does not know (5xx); a
    4xx (421 shutting down, 450) is a server not ready: 451, no HELO."""
    script = Script(EHLO=b"421 4.3.2 shutting down\r\n")
    replies, log = _mail_via(script)
    assert replies["mail"].code == 451 and "EHLO/HELO answered 421" in log
    assert not any(c.startswith(b"HELO") for c in script.commands), script.commands


def test_starttls_answered_other_than_220_is_refused_without_a_handshake():
    """STARTTLS goes on only after its 220: another 2xx is a refusal of
    TLS (454 4.7.0), not the start of a handshake the server is not in."""
    script = Script(EHLO=b"250-x\r\n250 STARTTLS\r\n", STARTTLS=b"250 2.0.0 sure\r\n")
    replies, log = _mail_via(script, tls=TlsMode.STARTTLS)
    assert replies["mail"].code == 454 and replies["mail"].lines[0].startswith("4.7.0"), replies
    assert "STARTTLS answered 250" in log


def test_a_mechanism_answered_504_gives_way_to_the_next_one():
    """504 (mechanism not supported, RFC 4954) refuses the mechanism, not
    the credentials: the next mechanism is tried, and nothing is
    remembered as a refused login."""
    script = Script(EHLO=b"250-x\r\n250 AUTH CRAM-MD5 PLAIN\r\n")
    _in_sasl(script, b"334 PDEyQHVwPg==\r\n", {b"AUTH CRAM-MD5": b"504 5.5.4 not that one\r\n",
                                               b"AUTH PLAIN": b"235 2.7.0 ok\r\n"})
    replies, log = _mail_via(script, user="u")
    assert replies["end"].code == 250, (replies, log)
    assert [c.split()[1] for c in script.commands if c.startswith(b"AUTH")] == [b"CRAM-MD5", b"PLAIN"]


def test_quit_waits_for_its_reply_quit_wait_at_most():
    """QUIT (cache expiry, SIGTERM, a refused login) waits QUIT_WAIT for
    its reply at most, whatever longer `timeout` the stream had."""

    async def go():
        reader, client, far = await _reading(b"221 bye\r\n", then_close=False)
        client.stream.timeout = 10 * QUIT_WAIT
        try:
            await client.quit()
            return client.stream.timeout
        finally:
            far.close()

    assert run(go()) == QUIT_WAIT


def test_an_undecodable_cram_md5_challenge_is_cancelled_before_the_next_mechanism():
    """RFC 4954 4: the client cancels an exchange with "*". Without it the
    server takes the next AUTH line for the CRAM-MD5 answer and refuses
    it: the login that PLAIN would have done fails."""
    script = Script(EHLO=b"250-x\r\n250 AUTH CRAM-MD5 PLAIN\r\n")
    _in_sasl(script, b"334 !!!notbase64\r\n", {b"AUTH PLAIN": b"235 2.7.0 ok\r\n"})
    replies, log = _mail_via(script, user="u")
    assert replies["end"].code == 250, (replies, log)
    assert b"*\r\n" in script.commands


def test_login_stops_when_the_user_name_is_not_answered_334():
    """AUTH LOGIN sends the password only after the server asked for it
    (334): a refusal of the user name ends the exchange, and the password
    never goes, not even as a stray command line."""
    import base64

    script = Script(EHLO=b"250-x\r\n250 AUTH LOGIN\r\n")
    _in_sasl(script, b"334 VXNlcm5hbWU6\r\n", {})
    replies, log = _mail_via(script, user="u")
    assert replies["mail"].code == 454, replies
    sent = b"".join(script.commands)
    assert base64.b64encode(b"u") in sent and base64.b64encode(UP_PW.encode()) not in sent, sent


def test_mechanisms_advertised_in_lower_case_are_used():
    """SMTP keywords are case-insensitive (RFC 5321 2.4): "AUTH plain"
    offers PLAIN, so the route's credentials are used, not left out."""
    script = Script(EHLO=b"250-x\r\n250 AUTH plain\r\n", AUTH=b"235 2.7.0 ok\r\n")
    replies, log = _mail_via(script, user="u")
    assert replies["end"].code == 250, replies
    assert any(c.startswith(b"AUTH PLAIN ") for c in script.commands), script.commands
    assert "no usable AUTH mechanism" not in log


# ------------------------------------------------------------ TLS contexts and checks


def _relay_to(up, route, cfg=None):
    """One message to the FakeUpstream `up` over `route`; (replies, log text)."""
    log, handler = capture_log()

    async def go():
        relay = Relay(cfg or config(), log)
        replies = await send(relay, route, "alice@example.com", ["rcpt@example.org"], b"m\r\n")
        await relay.close()
        return replies

    return run(go()), handler.text


def test_the_upstreams_name_goes_as_sni(world):
    """The route's server name is sent as SNI (DESIGN.md "STARTTLS/TLS
    with SNI"): an upstream serving several names picks its certificate by it."""
    from .test_review_ipv6 import SniRecorder

    up = SniRecorder(world, tls="starttls", accounts={"u": UP_PW}).start()
    try:
        replies, _log = _relay_to(up, route_for(up, server="localhost"))
    finally:
        up.stop()
    assert replies["end"].code == 250
    assert up.sni == ["localhost"]


def test_what_the_upstream_offered_before_starttls_is_forgotten_after_a_helo_fallback(world):
    """RFC 3207 4.2: what the server said before STARTTLS is discarded.
    An upstream that offers AUTH and SIZE in clear but refuses EHLO after
    the handshake (so HELO it is) offers nothing: no AUTH, no SIZE= or
    BODY= is used on what the plain-text EHLO said (a HELO server refuses
    MAIL parameters; a man in the middle wrote that EHLO)."""
    from .upstream import FakeUpstream

    class EhloOnlyInClear(FakeUpstream):
        async def handle_EHLO(self, server, session, envelope, hostname, responses):
            if server.transport.get_extra_info("ssl_object") is not None:
                return ["502 5.5.1 EHLO not here"]  # (a str is pushed char by char)
            return await super().handle_EHLO(server, session, envelope, hostname, responses)

    up = EhloOnlyInClear(world, tls="starttls", accounts={"u": UP_PW}, require_tls=False).start()
    try:
        replies, log = _relay_to(up, route_for(up, server="localhost"))
    finally:
        up.stop()
    assert "no usable AUTH mechanism (offered: none)" in log, log
    assert up.logins == [] and up.mechanisms_used == []
    assert replies["mail"].code == 530, replies  # the upstream's own answer: it wants AUTH


def test_a_resumed_nocertcheck_connection_still_logs_the_chain_problems(upstream_factory, tmp_path):
    """A resumed handshake shows no certificate: the chain problems found
    when the session was made are logged again (noCertCheck), even when
    the name matches and nothing else would be said."""
    from sendooway_front import _tls

    from .test_relay import _foreign_cert

    _tls.forget_sessions()
    cert, key, _ = _foreign_cert(tmp_path)  # for localhost, from a CA the route does not trust
    up = upstream_factory(tls="starttls", accounts={"u": UP_PW}, cert_file=cert, key_file=key)
    for _ in range(2):
        replies, log = _relay_to(up, route_for(up, server="localhost", cert_check=False))
        assert replies["end"].code == 250
        assert "certificate problems ignored (noCertCheck)" in log
        assert "unable to get local issuer certificate" in log and "does not match" not in log
    assert up.tls_resumed == [False, True]


def test_certificates_passed_in_get_a_verifying_context_whatever_a_nocertcheck_route_made(world):
    """Client contexts for a user's own CA certificates are cached by
    content AND the verify setting: a noCertCheck route's context must
    never serve a verifying route with the same certificates."""
    from sendooway_front import _tls

    pem = open(world.ca_file).read()
    lax = _tls.cached_client_context("", False, pem)
    strict = _tls.cached_client_context("", True, pem)
    assert not _tls.context_verifies(lax)
    assert _tls.context_verifies(strict) and strict is not lax


def test_the_configs_ca_file_read_at_start_serves_nocertcheck_routes_without_verifying(world, monkeypatch):
    """preload_ca_file makes the verifying context of the config's sslCA;
    a noCertCheck route naming that file gets a context of its own that
    does not verify (taking the verifying one would refuse its upstream)."""
    from sendooway_front import _tls

    monkeypatch.setattr(_tls, "_preloaded", {})
    monkeypatch.setattr(_tls, "_preloaded_data", {})
    monkeypatch.setattr(_tls, "_pinned_file", "")
    _tls.preload_ca_file(world.ca_file)

    async def contexts():
        return (await _tls.client_context_for(world.ca_file, True),
                await _tls.client_context_for(world.ca_file, False))

    strict, lax = run(contexts())
    assert _tls.context_verifies(strict) and not _tls.context_verifies(lax)


def test_the_system_store_context_is_renewed_after_its_time(monkeypatch):
    """The system store's client context is reused for SYSTEM_STORE_TTL
    only: a CA bundle updated by the system reaches the routes without a
    restart."""
    from sendooway_front import _tls

    monkeypatch.setattr(_tls, "_client_contexts", {})
    first = _tls.cached_client_context("", False)
    assert _tls.cached_client_context("", False) is first
    monkeypatch.setattr(_tls, "SYSTEM_STORE_TTL", 0.0)
    assert _tls.cached_client_context("", False) is not first


def _pump(a, b) -> None:
    """Move what each of two memory-BIO connections wrote to the other."""
    from OpenSSL import SSL

    for src, dst in ((a, b), (b, a)):
        try:
            dst.bio_write(src.bio_read(1 << 16))
        except SSL.WantReadError:
            pass


def _step(step) -> None:
    from OpenSSL import SSL

    try:
        step()
    except SSL.WantReadError:
        pass


def test_an_upstream_asking_for_renegotiation_gets_none(world):
    """No renegotiation (OP_NO_RENEGOTIATION; CVE-2009-3555 lived there):
    a TLS 1.2 upstream sending a HelloRequest after the handshake does not
    get a new handshake from us. (A client's renegotiation is refused by
    OpenSSL's own default since 3.0; a server's is not.)"""
    from OpenSSL import SSL

    from sendooway_front import _tls

    sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    sctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    sctx.use_certificate_chain_file(world.upstream_cert_file)
    sctx.use_privatekey_file(world.upstream_key_file)
    server = SSL.Connection(sctx, None)
    server.set_accept_state()
    client = _tls.client_connection(_tls.client_context(world.ca_file), "localhost")
    for _ in range(6):
        _step(client.do_handshake)
        _pump(client, server)
        _step(server.do_handshake)
        _pump(client, server)
    assert client.get_protocol_version_name() == "TLSv1.2"
    assert server.renegotiate()
    for _ in range(6):
        _step(server.do_handshake)
        _pump(client, server)
        _step(lambda: client.recv(1024))
        _pump(client, server)
    assert client.total_renegotiations() == 0


def test_the_server_context_keeps_no_session_cache(world):
    """No server-side session cache (tickets are off: every TLS 1.3
    handshake would leave sessions there for two hours, filled without a
    login)."""
    from OpenSSL import SSL

    from sendooway_front import _tls

    ctx = _tls.server_context(world.upstream_cert_file, world.upstream_key_file)
    assert ctx.get_session_cache_mode() == SSL.SESS_CACHE_OFF


# ------------------------------------------------------------ the smarthostCache


def _kept_then(up, first: Route, second: Route):
    """A message over `first`, its connection kept in a pool, then one over
    `second`: (the second's replies, the pool's hits)."""
    from sendooway_front._pool import UpstreamPool

    async def go():
        log, _ = capture_log()
        pool = UpstreamPool(30, log)
        try:
            replies = []
            for route in (first, second):
                relay = Relay(config(smarthostCache=30), log, pool)
                replies.append(await send(relay, route, "s@x.y", ["r@x.y"], b"m\r\n"))
                await relay.close()
            assert replies[0]["end"].code == 250, replies
            return replies[1], pool.hits
        finally:
            await pool.close_all()

    return run(go())


def test_a_plain_connection_kept_is_never_used_for_a_tls_route(upstream_factory):
    """The TLS mode is part of the cache's key: a message for a route that
    says STARTTLS never goes over a kept plain-text connection to the same
    server, port and user."""
    up = upstream_factory(tls="starttls", require_tls=False, accounts={"u": UP_PW})
    replies, hits = _kept_then(up, route_for(up, tls=TlsMode.PLAIN), route_for(up))
    assert replies["end"].code == 250 and hits == 0
    assert [m.tls for m in up.messages] == [False, True]


@pytest.mark.parametrize("lax", ["noCertCheck", "another sslCA"])
def test_a_connection_kept_under_a_laxer_check_is_never_used_for_a_verifying_route(
        upstream_factory, tmp_path, lax):
    """The certificate check (noCertCheck, the CA file) is part of the
    cache's key: a connection to a server with a certificate the route's
    CA does not vouch for, kept for a route that took it, is never used
    for a route that would refuse it (454, no message)."""
    from .test_relay import _foreign_cert

    cert, key, foreign_ca = _foreign_cert(tmp_path)
    up = upstream_factory(tls="starttls", accounts={"u": UP_PW}, cert_file=cert, key_file=key)
    first = (route_for(up, server="localhost", cert_check=False) if lax == "noCertCheck"
             else route_for(up, server="localhost", ca_file=foreign_ca))
    replies, hits = _kept_then(up, first, route_for(up, server="localhost"))
    assert replies["mail"].code == 454 and hits == 0, replies
    assert len(up.messages) == 1


# ------------------------------------------------------------ the relay's connection


def test_a_command_timing_out_upstream_is_told_as_a_timeout():
    """A reply the upstream never sends (here to RCPT) is 451 4.4.2 "timed
    out", not "connection lost": the client and the log say what happened."""

    async def stall(writer):
        await asyncio.sleep(30)

    replies, log = _mail_via(Script(RCPT=stall), cfg=config(timeout=1))
    assert replies["rcpt"][0].lines[0] == "4.4.2 Upstream server timed out, try again later"
    assert "RCPT failed: TimeoutError" in log


def test_the_sessions_own_connection_is_probed_after_idling(monkeypatch):
    """A client's next message after KEPT_IDLE seconds probes the
    session's own upstream connection (RSET with its MAIL), as a kept one
    is: a link that died silently costs PROBE_TIMEOUT, not `timeout`."""
    from sendooway_front import _pool

    monkeypatch.setattr(_pool, "KEPT_IDLE", -1.0)  # every pause is long
    script = Script()
    replies, _log = _session_via(script, messages=2)
    assert [r["end"].code for r in replies] == [250, 250]
    verbs = [c.split()[0].split(b":")[0] for c in script.commands]
    assert verbs[verbs.index(b"DATA") + 1:][:2] == [b"RSET", b"MAIL"], script.commands


def test_a_refused_probe_is_never_followed_on_that_connection(monkeypatch):
    """An RSET probe answered other than 250 (a server out of step, or
    closing) leaves the connection: the next MAIL goes over a new one."""
    rsets = []

    async def rset(writer):
        rsets.append(1)
        writer.write(b"500 5.5.1 out of step\r\n")
        await writer.drain()

    from sendooway_front import _pool

    monkeypatch.setattr(_pool, "KEPT_IDLE", -1.0)  # the second MAIL probes
    script = Script(RSET=rset)
    replies, _log = _session_via(script, messages=2)
    assert [r["end"].code for r in replies] == [250, 250] and rsets == [1]
    assert script.commands.count(b"EHLO relay.test\r\n") == 2, script.commands
