"""Misbehaving upstreams, scripted byte for byte: the relay answers the client
with a 4xx (never 250), keeps its memory bounded and passes no tricks on."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest

from sendooway_shared.config import Ext8BitMime
from sendooway_shared.types import Route, Secret, TlsMode
from sendooway_front._relay import Relay
from sendooway_front._relay_api import MailParams
from sendooway_front._upstream import MAX_REPLY_LINE
from tests.upstream import capture_log, config, info, run, send

DEFAULTS = {
    "EHLO": b"250-fake.upstream\r\n250-8BITMIME\r\n250 SIZE 1000000\r\n",
    "HELO": b"250 fake.upstream\r\n",
    "MAIL": b"250 2.1.0 ok\r\n",
    "RCPT": b"250 2.1.5 ok\r\n",
    "DATA": b"354 go ahead\r\n",
    "DOT": b"250 2.0.0 accepted\r\n",
    "RSET": b"250 2.0.0 reset\r\n",
    "QUIT": b"221 bye\r\n",
}


class Script:
    """A plain-text fake upstream answering each verb from a table; a value may
    be bytes or an async callable(writer) doing something nasty."""

    def __init__(self, greeting=b"220 fake ESMTP\r\n", **replies):
        self.greeting = greeting
        self.replies = {**DEFAULTS, **replies}
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []

    async def _answer(self, key, writer):
        value = self.replies[key]
        if callable(value):
            await value(writer)
        else:
            writer.write(value)
            await writer.drain()

    async def handle(self, reader, writer):
        try:
            if self.greeting:
                writer.write(self.greeting)
                await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    return
                self.commands.append(line)
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper().decode()
                if verb not in self.replies:
                    writer.write(b"502 5.5.2 unknown\r\n")
                    continue
                await self._answer(verb, writer)
                if verb == "DATA" and self.replies["DATA"] == DEFAULTS["DATA"]:
                    data = await reader.readuntil(b"\r\n.\r\n")
                    self.messages.append(data)
                    await self._answer("DOT", writer)
                if verb == "QUIT":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def serve(self):
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return _Served(server), server.sockets[0].getsockname()[1]


class _Served:
    """The scripted upstream's asyncio.Server for `async with`, its end as
    in Python 3.11: since 3.12 Server.wait_closed() also waits for every
    connection, and a script that went silent (or a relay's kept
    connection) holds one open for ever. Its connections are aborted
    (3.13's abort_clients; 3.11 returns without waiting for them)."""

    def __init__(self, server: asyncio.Server) -> None:
        self.server = server

    def __getattr__(self, name):
        return getattr(self.server, name)

    async def __aenter__(self) -> "_Served":
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        abort = getattr(self.server, "abort_clients", None)
        if abort is not None:
            abort()
        await self.server.wait_closed()


def _route(port, tls=TlsMode.PLAIN, user="", password=""):
    """A route to the scripted upstream; with `user`, one that logs in."""
    return Route("127.0.0.1", port, tls, auth=bool(user), user=user, password=Secret(password),
                 source="s:1")


async def _transaction(script, cfg=None, data=b"hello", rcpts=("r@x.y",), params=None):
    server, port = await script.serve()
    log, handler = capture_log()
    relay = Relay(cfg or config(timeout=2), log)
    async with server:
        replies = await send(relay, _route(port), "s@x.y", list(rcpts), data, params=params)
        await relay.close()
    return replies, handler


def test_giant_reply_line_refused():
    async def giant(writer):
        writer.write(b"250-" + b"A" * (10 * 1024 * 1024) + b"\r\n250 ok\r\n")
        try:
            await writer.drain()
        except ConnectionError:
            pass

    replies, log = run(_transaction(Script(EHLO=giant)))
    assert replies["mail"].code == 451 and replies["mail"].lines[0].startswith("4.5.0")
    assert f"longer than {MAX_REPLY_LINE}" in log.text


def test_giant_reply_line_reader_alone():
    """Only the relay's side in the process: a 10 MiB line costs it little."""
    import socket
    import threading

    a, b = socket.socketpair()

    def flood():
        try:
            b.sendall(b"220-" + b"B" * (10 * 1024 * 1024))
        except OSError:
            pass

    t = threading.Thread(target=flood, daemon=True)
    t.start()

    async def go():
        from sendooway_front._stream import Stream
        from sendooway_front._upstream import ReplyError, ReplyReader

        s = await Stream.from_socket(a, timeout=5)
        tracemalloc.start()
        try:
            with pytest.raises(ReplyError):
                await ReplyReader(s).read_reply()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        s.abort()
        return peak

    peak = run(go())
    b.close()
    assert peak < 2 * 1024 * 1024  # not 10 MiB: StreamReader buffer + one bounded line


def test_too_many_reply_lines():
    replies, log = run(_transaction(Script(EHLO=b"250-x\r\n" * 500 + b"250 x\r\n")))
    assert replies["mail"].code == 451 and "lines" in log.text


def test_greeting_554_and_garbage():
    replies, log = run(_transaction(Script(greeting=b"554 go away\r\n")))
    assert replies["mail"].code == 451 and "greeting 554" in log.text
    replies, log = run(_transaction(Script(greeting=b"HTTP/1.0 200 OK\r\n")))
    assert replies["mail"].code == 451 and "malformed reply line" in log.text
    replies, log = run(_transaction(Script(RCPT=b"250-a\r\n251 b\r\n")))
    assert replies["rcpt"][0].code == 451 and "code changed" in log.text


def test_helo_fallback_when_ehlo_refused():
    script = Script(EHLO=b"502 5.5.2 what?\r\n")
    replies, _ = run(_transaction(script, params=MailParams(size=100)))
    assert replies["end"].code == 250
    assert script.commands[:3] == [b"EHLO relay.test\r\n", b"HELO relay.test\r\n", b"MAIL FROM:<s@x.y>\r\n"]


def test_body_8bitmime_to_an_upstream_without_8bitmime_is_refused_under_force():
    """RFC 6152 3: 8-bit content goes only to a server that offered
    8BITMIME; the original gave such an upstream up under ext8BitMime =
    force (the default). A client's BODY=8BITMIME there gets 550 5.6.3 and
    no MAIL goes upstream (it used to go without BODY=, the bytes anyway)."""
    script = Script(EHLO=b"502 5.5.2 what?\r\n")  # HELO only: no extensions at all
    replies, log = run(_transaction(script, params=MailParams(body_8bitmime=True)))
    assert replies["mail"].code == 550 and replies["mail"].lines[0].startswith("5.6.3")
    assert not any(c.startswith(b"MAIL") for c in script.commands), script.commands
    assert "MAIL refused here: 550 5.6.3" in log.text
    # ignore: the original's "use such an upstream anyway", the bytes as they are
    script = Script(EHLO=b"502 5.5.2 what?\r\n")
    replies, _ = run(_transaction(script, params=MailParams(body_8bitmime=True),
                                  cfg=config(ext8BitMime=Ext8BitMime.IGNORE)))
    assert replies["end"].code == 250
    assert b"MAIL FROM:<s@x.y>\r\n" in script.commands


def test_multiline_and_tricky_reply_text_passed_safely():
    rcpt = b"250-first line\r\n250-second\r370 injected\r\n250 2.1.5 last\x00\r\n"
    replies, _ = run(_transaction(Script(RCPT=rcpt)))
    r = replies["rcpt"][0]
    assert r.code == 250
    # lines without an enhanced status code get RCPT's (RFC 2034), the text is kept
    assert r.lines == ("2.1.5 first line", "2.1.5 second?370 injected", "2.1.5 last?")
    assert r.to_bytes() == (b"250-2.1.5 first line\r\n250-2.1.5 second?370 injected\r\n"
                            b"250 2.1.5 last?\r\n")


def test_upstream_stalls_past_timeout():
    async def stall(writer):
        await asyncio.sleep(10)

    replies, log = run(_transaction(Script(RCPT=stall), cfg=config(timeout=1)))
    assert replies["rcpt"][0].code == 451 and replies["rcpt"][0].lines[0].startswith("4.4.2")
    assert "TimeoutError" in log.text


def test_upstream_stalls_after_final_dot():
    async def stall(writer):
        await asyncio.sleep(10)

    replies, _ = run(_transaction(Script(DOT=stall), cfg=config(timeout=1)))
    assert replies["end"].code == 451


def test_upstream_drops_mid_data():
    async def drop(writer):
        writer.write(b"354 go\r\n")
        await writer.drain()
        writer.transport.abort()

    big = (b"x" * 998 + b"\r\n") * 4000  # 4 MB: the writes hit the closed connection
    replies, log = run(_transaction(Script(DATA=drop), data=big))
    assert replies["data"].code == 354
    assert replies["end"].code == 451
    assert "not delivered" in log.text


def test_upstream_421_becomes_451_and_connection_dropped():
    script = Script(RCPT=b"421 4.3.2 shutting down\r\n")
    replies, _ = run(_transaction(script, rcpts=("a@x.y", "b@x.y")))
    assert [str(r) for r in replies["rcpt"]] == ["451 4.3.2 shutting down"] * 2


def test_data_answered_with_other_3xx_is_refused():
    replies, _ = run(_transaction(Script(DATA=b"334 what\r\n")))
    assert replies["data"].code == 451


def test_no_smtputf8_offered():
    script = Script()
    replies, _ = run(_transaction(script, params=MailParams(smtputf8=True)))
    assert replies["mail"].code == 553
    assert not any(c.startswith(b"MAIL") for c in script.commands)


def test_starttls_with_pipelined_injection_refused():
    script = Script(EHLO=b"250-x\r\n250 STARTTLS\r\n",
                    STARTTLS=b"220 go ahead\r\n250 injected\r\n")

    async def go():
        server, port = await script.serve()
        log, handler = capture_log()
        async with server:
            r = await Relay(config(), log).mail(info(), _route(port, TlsMode.STARTTLS), "s@x.y", MailParams())
        return r, handler

    reply, log = run(go())
    assert reply.code == 454 and "pipelined after the STARTTLS" in log.text


def test_cram_md5_undecodable_challenge_then_plain():
    script = Script(EHLO=b"250-x\r\n250 AUTH CRAM-MD5 PLAIN\r\n",
                    AUTH=b"334 !!!notbase64\r\n")

    async def go():
        server, port = await script.serve()
        log, handler = capture_log()
        route = _route(port, user="u", password="pw-x")
        async with server:
            r = await Relay(config(), log).mail(info(), route, "s@x.y", MailParams())
        return r, handler

    reply, log = run(go())
    # the "*" cancel got the scripted 334 again: nonsense, so the login failed → 454
    assert reply.code == 454
    assert "pw-x" not in log.text


def test_pooled_connection_refusing_the_pipelined_probe_is_replaced():
    from sendooway_front._pool import UpstreamPool

    async def rset_421(writer):
        writer.write(b"421 4.3.2 going down\r\n")
        await writer.drain()
        writer.close()

    script = Script(EHLO=b"250-x\r\n250 PIPELINING\r\n", RSET=rset_421)

    async def go():
        server, port = await script.serve()
        log, handler = capture_log()
        pool = UpstreamPool(30, log)
        async with server:
            for n in range(2):
                relay = Relay(config(smarthostCache=30), log, pool)
                r = await send(relay, _route(port), f"s{n}@x.y", ["r@x.y"], b"m")
                assert r["end"].code == 250
                await relay.close()
            await pool.close_all()
        return handler

    log = run(go())
    assert len(script.messages) == 2
    assert "went stale" in log.text
    # the probe and MAIL went in one write: MAIL arrived although RSET was refused
    assert b"RSET\r\n" in script.commands and script.commands.count(b"MAIL FROM:<s1@x.y>\r\n") == 2


def test_same_session_reuse_after_upstream_idle_421_reconnects():
    """Between two messages of one client session the upstream gave up on the
    connection (421 then close): the next MAIL reconnects transparently."""
    state = {"mails": 0}

    async def mail(writer):
        state["mails"] += 1
        if state["mails"] == 2:
            writer.write(b"421 4.4.2 idle timeout\r\n")
            await writer.drain()
            writer.close()
        else:
            writer.write(b"250 2.1.0 ok\r\n")
            await writer.drain()

    script = Script(MAIL=mail)

    async def go():
        server, port = await script.serve()
        log, handler = capture_log()
        relay = Relay(config(), log)
        async with server:
            for n in range(2):
                r = await send(relay, _route(port), f"s{n}@x.y", ["r@x.y"], b"m")
                assert r["end"].code == 250, r
            await relay.close()
        return handler

    log = run(go())
    assert len(script.messages) == 2 and state["mails"] == 3
    assert "kept connection closing" in log.text


def test_upstream_stops_reading_mid_data_bounded_and_451():
    """The upstream takes DATA and then reads nothing more: our writes stop at
    the buffer bound, time out, and the client gets 451 — never 250."""
    hold = []

    async def stop_reading(writer):
        writer.write(b"354 go\r\n")
        await writer.drain()
        writer.transport.pause_reading()
        hold.append(writer)
        await asyncio.sleep(10)

    async def go():
        script = Script(DATA=stop_reading)
        server, port = await script.serve()
        log, handler = capture_log()
        relay = Relay(config(timeout=1), log)
        async with server:
            assert (await relay.mail(info(), _route(port), "s@x.y", MailParams())).code == 250
            assert (await relay.rcpt("r@x.y")).code == 250
            assert (await relay.data_start()).code == 354
            chunk = (b"z" * 998 + b"\r\n") * 64
            t0 = asyncio.get_running_loop().time()
            for _ in range(800):  # 51 MB offered; far more than the socket buffers hold
                await relay.data_chunk(chunk)
            reply = await relay.data_end()
            took = asyncio.get_running_loop().time() - t0
            buffered = relay._client.stream._writer.transport.get_write_buffer_size() if relay._client else 0
            await relay.close()
        return reply, took, buffered, handler

    reply, took, buffered, log = run(go())
    assert reply.code == 451 and reply.lines[0].startswith("4.4.2")
    assert took < 5
    assert buffered == 0  # the connection was dropped, nothing kept queued
    assert "TimeoutError" in log.text


@pytest.mark.parametrize("verb", ["MAIL", "RCPT", "DOT"])
def test_intermediate_reply_where_none_belongs_is_451(verb):
    replies, log = run(_transaction(Script(**{verb: b"354 sure\r\n"})))
    got = {"MAIL": replies["mail"], "RCPT": replies.get("rcpt", [None])[0], "DOT": replies.get("end")}[verb]
    assert got.code == 451 and "unexpected 354" in log.text


def test_old_style_auth_equals_advertisement_is_understood():
    captured = []

    async def auth(writer):
        writer.write(b"235 2.7.0 ok\r\n")
        await writer.drain()

    script = Script(EHLO=b"250-old.server\r\n250 AUTH=LOGIN PLAIN\r\n", AUTH=auth)

    async def go():
        server, port = await script.serve()
        log, _ = capture_log()
        route = _route(port, user="u", password="pw-y")
        async with server:
            r = await send(Relay(config(), log), route, "s@x.y", ["r@x.y"], b"m")
        captured.append(r)

    run(go())
    assert captured[0]["end"].code == 250
    assert any(c.startswith(b"AUTH PLAIN ") for c in script.commands)
