"""The session driver in-process: a real Stream over a socketpair, a
stand-in authenticator link and a recording relay, to check exactly what
the relay is told (and never told) for what the client sends."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sendooway_front import _driver
from sendooway_front._authlink import AuthLinkError
from sendooway_front._driver import Frontend, SessionRunner
from sendooway_front._reply import Reply
from sendooway_front._session import DATA_CHUNK
from sendooway_front._stream import Stream
from sendooway_shared.config import Config
from sendooway_shared.types import Route, TlsMode

from .front_harness import unchecked_chunk
from .front_util import login_plain

ROUTE = Route("smtp.example.net", 587, TlsMode.STARTTLS, user="u", source="test:1")


class FakeLink:
    def __init__(self, fail_auth=False, fail_route=False):
        self.fail_auth, self.fail_route = fail_auth, fail_route
        self.closed = False
        self.broken = False  # as AuthLink: a failed request breaks the link

    async def auth(self, user, password):
        if self.fail_auth:
            self.broken = True
            raise AuthLinkError("authenticator gone")
        return user if password.reveal() == "pw-" + user else None

    async def route(self, sender):
        if self.fail_route:
            self.broken = True
            raise AuthLinkError("authenticator gone")
        return None if sender.endswith("@nowhere.example") else ROUTE

    def close(self):
        self.closed = True


class FakeConnector:
    def __init__(self, **kw):
        self.kw = kw
        self.links = []

    def describe(self):
        return "fake"

    async def open(self, session_id, client):
        link = FakeLink(**self.kw)
        self.links.append(link)
        return link


class RecordingRelay:
    def __init__(self, fail_chunk=False, fail_mail=False):
        self.calls = []
        self.data = bytearray()
        self.unchecked = []  # chunks handed over that break the data_chunk promise
        self.fail_chunk, self.fail_mail = fail_chunk, fail_mail
        self.info = None

    async def mail(self, info, route, sender, params):
        self.calls.append("mail")
        self.info = info
        if self.fail_mail:
            raise RuntimeError("boom")
        return Reply(250, ("2.1.0 upstream OK",))

    async def rcpt(self, recipient):
        self.calls.append("rcpt")
        return self._rcpt_reply(recipient)

    async def rcpts(self, recipients):
        self.calls.append(("rcpts", list(recipients)))
        return [self._rcpt_reply(r) for r in recipients]

    @staticmethod
    def _rcpt_reply(recipient):
        if recipient.startswith("nobody@"):
            return Reply(550, (f"5.1.1 <{recipient}> unknown",))
        return Reply(250, (f"2.1.5 <{recipient}> OK",))

    async def data_start(self):
        self.calls.append("data_start")
        return Reply(354, ("go ahead",))

    async def data_chunk(self, chunk):
        assert len(chunk) <= DATA_CHUNK
        if unchecked_chunk(chunk):
            self.unchecked.append(chunk)
        if self.fail_chunk:
            raise ConnectionResetError("upstream vanished")
        self.data += chunk

    async def data_end(self, empty=False):
        self.calls.append("data_end")
        return Reply(250, ("2.0.0 upstream queued",))

    async def data_abort(self, reason="", complete=False):
        self.calls.append("data_abort")

    async def reset(self):
        self.calls.append("reset")

    async def close(self):
        self.calls.append("close")


async def converse(monkeypatch, script, relay=None, connector=None, bytewise=False,
                   config=None, close_early=False, half_close=False):
    """Run one session; the client sends `script` (then EOF with
    `half_close`) and reads until EOF."""
    relay = relay or RecordingRelay()
    monkeypatch.setattr(_driver, "make_relay", lambda cfg, log: relay)
    fe = Frontend(config or Config(), connector=connector or FakeConnector(), hostname="mx.test")
    a, b = socket.socketpair()
    server_stream = await Stream.from_socket(a, 10)
    task = asyncio.ensure_future(SessionRunner(fe, server_stream, "192.0.2.1:4242").run())
    reader, writer = await asyncio.open_connection(sock=b)
    try:
        if bytewise:
            for i in range(len(script)):
                writer.write(script[i:i + 1])
                await writer.drain()
        else:
            writer.write(script)
            await writer.drain()
    except ConnectionError:
        pass  # the server may close first (a 421 greeting)
    if half_close:
        writer.write_eof()
    if close_early:
        await asyncio.sleep(0.1)
        writer.close()
        await task
        return b"", relay
    out = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    await asyncio.wait_for(task, 10)
    return out, relay


def codes(out: bytes) -> list[int]:
    return [int(line[:3]) for line in out.split(b"\r\n") if line[3:4] == b" "]


LOGIN = f"EHLO c.test\r\nAUTH PLAIN {login_plain('alice', 'pw-alice')}\r\n".encode()
TXN = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"


@pytest.mark.parametrize("bytewise", [False, True])
def test_transaction_reaches_the_relay_exactly(monkeypatch, bytewise):
    body = b"Subject: t\r\n\r\n..dot\r\n" + b"x" * 900 + b"\r\nend"
    out, relay = asyncio.run(converse(monkeypatch, LOGIN + TXN + body + b"\r\n.\r\nQUIT\r\n",
                                      bytewise=bytewise))
    assert codes(out) == [220, 250, 235, 250, 250, 354, 250, 221]
    assert b"250 2.0.0 upstream queued" in out
    assert bytes(relay.data) == body and relay.unchecked == []
    assert relay.calls == ["mail", "rcpt", "data_start", "data_end", "close"]
    assert relay.info.user == "alice" and relay.info.client_address == "192.0.2.1:4242"
    assert relay.info.esmtp and not relay.info.tls and relay.info.client_ehlo == "c.test"


def test_smuggled_end_never_reaches_data_end(monkeypatch):
    body = b"a\r\n\n.\r\nMAIL FROM:<evil@x.y>\r\n"
    out, relay = asyncio.run(converse(monkeypatch, LOGIN + TXN + body + b".\r\nQUIT\r\n"))
    assert "data_end" not in relay.calls and "data_abort" in relay.calls
    assert 250 not in codes(out)[5:]
    assert relay.calls.count("mail") == 1
    assert relay.unchecked == []


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("evil", [b"a\n.\nb", b"a\r.\r\nb", b"a\n.\r\nb", b"x\r", b"\n", b"x\r\r\n",
                                  b"\r\n.\n", b"nul\0", b"a\rb"])
def test_bare_line_ends_never_reach_the_relay(monkeypatch, evil, bytewise):
    """The relay is handed only checked chunks (it no longer scans them
    again): whatever the split, a message with a bare CR or LF (or a NUL)
    is refused by the session core and nothing of its bad part, and no
    final dot, reaches the relay."""
    body = b"ok line\r\n" + evil + b"\r\nmore"
    out, relay = asyncio.run(converse(monkeypatch, LOGIN + TXN + body + b"\r\n.\r\nQUIT\r\n",
                                      bytewise=bytewise))
    assert "data_end" not in relay.calls and "data_abort" in relay.calls
    assert codes(out)[:6] == [220, 250, 235, 250, 250, 354] and 250 not in codes(out)[6:-1], out
    assert codes(out)[6] == 421 or codes(out)[6] >= 500, out
    assert relay.unchecked == [] and evil not in bytes(relay.data)


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_message_ending_in_a_lone_cr_never_reaches_data_end(monkeypatch, bytewise):
    """A CR right before the end marker would pair with the CRLF.CRLF the
    relay sends: the message is refused, no final dot."""
    body = b"Subject: a\r\n\r\nends in\r"
    out, relay = asyncio.run(converse(monkeypatch, LOGIN + TXN + body + b"\r\n.\r\nQUIT\r\n",
                                      bytewise=bytewise))
    assert "data_end" not in relay.calls and "data_abort" in relay.calls
    assert codes(out)[6] >= 500 and codes(out)[-1] == 221, out
    assert relay.unchecked == [] and not bytes(relay.data).endswith(b"\r")


def test_relay_failing_mid_data_gives_451_after_the_end(monkeypatch):
    out, relay = asyncio.run(converse(monkeypatch, LOGIN + TXN + b"hello\r\n.\r\nQUIT\r\n",
                                      relay=RecordingRelay(fail_chunk=True)))
    assert codes(out)[-2:] == [451, 221]
    assert "data_end" not in relay.calls and "data_abort" in relay.calls


def test_relay_raising_at_mail_is_temporary(monkeypatch):
    out, relay = asyncio.run(converse(monkeypatch, LOGIN + TXN + b"QUIT\r\n",
                                      relay=RecordingRelay(fail_mail=True)))
    assert codes(out) == [220, 250, 235, 451, 503, 503, 221]


def test_client_vanishing_mid_data_aborts_upstream(monkeypatch):
    out, relay = asyncio.run(converse(monkeypatch, LOGIN + TXN + b"half a mess",
                                      close_early=True))
    assert "data_abort" in relay.calls and "data_end" not in relay.calls
    assert relay.calls[-1] == "close"


def test_no_route_and_link_failures(monkeypatch):
    out, _ = asyncio.run(converse(monkeypatch, LOGIN + b"MAIL FROM:<a@nowhere.example>\r\nQUIT\r\n"))
    assert codes(out) == [220, 250, 235, 550, 221] and b"5.7.1" in out
    # the failed command gets its 454 or 451; then, as the link is gone for
    # the session, 421 and close (every later try of the session failed
    # the same way before a review), so the client comes back on a new link
    # (a QUIT pipelined behind still gets its 221)
    out, _ = asyncio.run(converse(monkeypatch, LOGIN + b"QUIT\r\n",
                                  connector=FakeConnector(fail_auth=True)))
    assert codes(out) == [220, 250, 454, 221]
    out, _ = asyncio.run(converse(monkeypatch, LOGIN, connector=FakeConnector(fail_auth=True)))
    assert codes(out) == [220, 250, 454, 421] and b"421 4.3.0 Authentication service" in out
    out, relay = asyncio.run(converse(monkeypatch, LOGIN + b"MAIL FROM:<a@b.c>\r\n",
                                      connector=FakeConnector(fail_route=True)))
    assert codes(out) == [220, 250, 235, 451, 421] and "mail" not in relay.calls


def test_unreachable_authenticator_greets_421(monkeypatch):
    class Down(FakeConnector):
        async def open(self, session_id, client):
            raise AuthLinkError("cannot connect to the authenticator at /x.sock")

    out, relay = asyncio.run(converse(monkeypatch, b"", connector=Down()))
    assert out.startswith(b"421 4.3.0") and codes(out) == [421]


def test_pipelined_commands_in_one_write(monkeypatch):
    script = LOGIN + TXN + b"body\r\n.\r\n" + TXN + b"again\r\n.\r\nRSET\r\nQUIT\r\n"
    out, relay = asyncio.run(converse(monkeypatch, script))
    assert codes(out) == [220, 250, 235, 250, 250, 354, 250, 250, 250, 354, 250, 250, 221]


def test_421_is_readable_even_with_pipelined_input_behind_it(monkeypatch):
    script = b"BOGUS\r\n" * 25 + b"NOOP " + b"x" * 400 + b"\r\n" * 2000
    out, relay = asyncio.run(converse(monkeypatch, script))
    assert codes(out)[-1] == 421 and b"4.7.0 Too many errors" in out


def _frontend_and_listener() -> tuple[Frontend, socket.socket]:
    """A Frontend with a fake authenticator, and a non-blocking listening
    socket on a free loopback port for serve_listening."""
    fe = Frontend(Config(), connector=FakeConnector(), hostname="mx.test")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.setblocking(False)
    return fe, lsock


def test_a_cancelled_listening_server_forgets_its_address():
    """serve_listening notes its address for the routing-loop check
    (_loops) and forgets it when it stops, also when cancelled (as
    in-process servers of the tests are): a CI run's relay test got 451 for
    an upstream that a cancelled server of an earlier test in the same
    process had listened on (a port handed out again), taken for this
    server."""
    from sendooway_front import _loops
    from sendooway_front._server import serve_listening

    async def main():
        fe, lsock = _frontend_and_listener()
        here = lsock.getsockname()
        server = asyncio.ensure_future(serve_listening(fe, [lsock]))
        for _ in range(200):
            if _loops.leads_back(here, ("127.0.0.1", 1)):
                break
            await asyncio.sleep(0.01)
        serving = _loops.leads_back(here, ("127.0.0.1", 1))
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        return serving, _loops.leads_back(here, ("127.0.0.1", 1))

    serving, after = asyncio.run(main())
    assert serving is True and after is False


def test_listening_server_caps_concurrent_sessions(monkeypatch):
    from sendooway_front._server import serve_listening

    monkeypatch.setattr(_driver, "make_relay", lambda cfg, log: RecordingRelay())

    async def main():
        fe, lsock = _frontend_and_listener()
        port = lsock.getsockname()[1]
        server = asyncio.ensure_future(serve_listening(fe, [lsock], max_sessions=2))
        conns = []
        for _ in range(2):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            assert (await r.readline()).startswith(b"220 ")
            conns.append((r, w))
        r, w = await asyncio.open_connection("127.0.0.1", port)
        third = await r.read(-1)
        w.close()
        for r, w in conns:  # the first two still work
            w.write(b"NOOP\r\n")
            assert (await r.readline()).startswith(b"250 ")
            w.close()
        server.cancel()
        return third

    third = asyncio.run(main())
    assert third.startswith(b"421 4.3.2")


def test_trickling_client_gets_no_more_than_timeout_per_command(monkeypatch):
    """timeout = 1: NOOP every 0.25 s for 2 s is fine; a command line
    trickled one byte every 0.25 s is cut after 1 s with 421."""
    monkeypatch.setattr(_driver, "make_relay", lambda cfg, log: RecordingRelay())

    async def main(trickle: bool) -> list[bytes]:
        fe = Frontend(Config(timeout=1), connector=FakeConnector(), hostname="mx.test")
        a, b = socket.socketpair()
        task = asyncio.ensure_future(
            SessionRunner(fe, await Stream.from_socket(a, 1), "192.0.2.1:1").run())
        reader, writer = await asyncio.open_connection(sock=b)
        await reader.readline()
        lines = []
        for _ in range(8):
            writer.write(b"N" if trickle else b"NOOP\r\n")
            try:
                lines.append(await asyncio.wait_for(reader.readline(), 0.25))
            except asyncio.TimeoutError:
                continue
            if lines[-1].startswith(b"421"):
                break
        writer.close()
        await task
        return lines

    assert asyncio.run(main(trickle=False)) == [b"250 2.0.0 OK\r\n"] * 8
    assert asyncio.run(main(trickle=True))[-1].startswith(b"421 4.4.2")


@pytest.mark.parametrize("peer, shown", [
    (("::ffff:192.0.2.7", 40000, 0, 0), "192.0.2.7:40000"),   # IPv4 client on the dual-stack socket
    (("2001:db8::1", 587, 0, 0), "[2001:db8::1]:587"),
    (("::ffff:0:1:2", 25, 0, 0), "[::ffff:0:1:2]:25"),          # not a mapped address
    (("192.0.2.8", 1), "192.0.2.8:1"),
    ("", ""),
])
def test_describe_peer_shows_ipv4_clients_of_the_dual_stack_socket_as_ipv4(peer, shown):
    assert _driver.describe_peer(peer) == shown


def test_pipelined_rcpts_go_to_the_relay_as_one_group_replies_in_order(monkeypatch):
    """RFC 2920: the RCPTs a client sent in one write reach the relay as one
    group (so they can go upstream in one write); a malformed one ends the
    group and is answered in its turn; every reply keeps its place."""
    script = (LOGIN + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<one@x.y>\r\nRCPT TO:<nobody@x.y>\r\n"
              b"RCPT TO:<two@x.y>\r\nRCPT TO:<bad\r\nRCPT TO:<three@x.y>\r\nDATA\r\n"
              b"body\r\n.\r\nQUIT\r\n")
    out, relay = asyncio.run(converse(monkeypatch, script))
    assert codes(out) == [220, 250, 235, 250, 250, 550, 250, 501, 250, 354, 250, 221]
    text = out.decode()
    order = [text.index(t) for t in ("250 2.1.5 <one@x.y> OK", "550 5.1.1 <nobody@x.y> unknown",
                                     "250 2.1.5 <two@x.y> OK", "501 ", "250 2.1.5 <three@x.y> OK")]
    assert order == sorted(order)
    assert ("rcpts", ["one@x.y", "nobody@x.y", "two@x.y"]) in relay.calls
    assert relay.calls.count("rcpt") == 1  # three@x.y, alone after the malformed one


def test_a_relay_failing_on_a_group_answers_each_rcpt_with_a_4xx(monkeypatch):
    class Failing(RecordingRelay):
        async def rcpts(self, recipients):
            raise RuntimeError("boom")

    script = LOGIN + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<one@x.y>\r\nRCPT TO:<two@x.y>\r\nQUIT\r\n"
    out, relay = asyncio.run(converse(monkeypatch, script, relay=Failing()))
    assert codes(out) == [220, 250, 235, 250, 451, 451, 221]


class GroupingRelay(RecordingRelay):
    """A relay that takes MAIL with the RCPTs (and DATA) behind it."""

    def __init__(self, fail=False):
        super().__init__()
        self.fail = fail

    async def mail_group(self, info, route, sender, params, recipients, data):
        self.calls.append(("group", list(recipients), data))
        if self.fail:
            raise RuntimeError("boom")
        return [Reply(250, ("2.1.0 upstream OK",)), *[self._rcpt_reply(r) for r in recipients]]


def test_rcpts_and_data_pipelined_behind_mail_go_to_the_relay_with_it(monkeypatch):
    script = (LOGIN + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<one@x.y>\r\nRCPT TO:<nobody@x.y>\r\n"
              b"DATA\r\nbody\r\n.\r\nQUIT\r\n")
    out, relay = asyncio.run(converse(monkeypatch, script, relay=GroupingRelay()))
    assert codes(out) == [220, 250, 235, 250, 250, 550, 354, 250, 221]
    assert relay.calls[0] == ("group", ["one@x.y", "nobody@x.y"], True)
    assert "mail" not in relay.calls and "rcpt" not in relay.calls
    assert bytes(relay.data) == b"body"


def test_a_relay_failing_on_a_mail_group_answers_each_command_with_a_4xx(monkeypatch):
    script = (LOGIN + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<one@x.y>\r\nRCPT TO:<two@x.y>\r\n"
              b"DATA\r\nQUIT\r\n")
    out, relay = asyncio.run(converse(monkeypatch, script, relay=GroupingRelay(fail=True)))
    # MAIL and both RCPTs 451; the client's DATA finds no recipient: 503
    assert codes(out) == [220, 250, 235, 451, 451, 451, 503, 221]
