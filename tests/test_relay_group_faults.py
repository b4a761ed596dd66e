"""The pipelined MAIL/RCPT/DATA group against upstreams that break the
rules (found by a review of the group, each failed before its fix). The
real session driver, session core and Relay run against a scripted
plain-text upstream on 127.0.0.1; only the authenticator link is a stand-in
(every sender routes to that upstream)."""

from __future__ import annotations

import asyncio
import logging
import socket

from sendooway_front import _driver
from sendooway_front._driver import Frontend, SessionRunner
from sendooway_front._relay import Relay
from sendooway_front._stream import Stream
from sendooway_shared.config import Config
from sendooway_shared.types import Route, Secret, TlsMode

from .front_util import login_plain

LOGIN = f"EHLO c.test\r\nAUTH PLAIN {login_plain('alice', 'pw-alice')}\r\n".encode()


class _Upstream:
    """A scripted upstream offering PIPELINING. `hook(state, verb, line)`
    may return reply bytes, ("data", reply) to read a message after the
    reply, or None for the default behaviour (a careful server)."""

    def __init__(self, hook=None):
        self.hook = hook
        self.messages: list[tuple[list[str], bytes]] = []
        self.lines: list[str] = []

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _message(self, r, w, st):
        body = b""
        while (part := await r.readline()) != b".\r\n":
            if not part:
                return
            body += part
        self.messages.append((list(st["rcpts"]), body))
        st["mail"], st["rcpts"] = False, []
        w.write(b"250 2.0.0 queued\r\n")

    async def _handle(self, r, w):
        st = {"mail": False, "rcpts": []}
        w.write(b"220 up.test ESMTP\r\n")
        try:
            while line := await r.readline():
                verb = line[:4].upper().decode()
                self.lines.append(line.decode().rstrip("\r\n"))
                act = self.hook(st, verb, line) if self.hook else None
                if isinstance(act, tuple):
                    w.write(act[1])
                    await w.drain()
                    await self._message(r, w, st)
                elif act is not None:
                    w.write(act)
                elif verb == "EHLO":
                    w.write(b"250-up.test\r\n250 PIPELINING\r\n")
                elif verb == "MAIL":
                    st["mail"], st["rcpts"] = True, []
                    w.write(b"250 2.1.0 ok\r\n")
                elif verb == "RCPT":
                    if not st["mail"]:
                        w.write(b"503 5.5.1 need MAIL\r\n")
                    elif b"nobody" in line:
                        w.write(b"550 5.1.1 unknown\r\n")
                    else:
                        st["rcpts"].append(line.decode().strip())
                        w.write(b"250 2.1.5 ok\r\n")
                elif verb == "DATA":
                    if st["mail"] and st["rcpts"]:
                        w.write(b"354 go ahead\r\n")
                        await w.drain()
                        await self._message(r, w, st)
                    else:
                        w.write(b"554 5.5.1 no valid recipients\r\n")
                elif verb == "RSET":
                    st["mail"], st["rcpts"] = False, []
                    w.write(b"250 2.0.0 reset\r\n")
                elif verb == "QUIT":
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    break
                else:
                    w.write(b"250 ok\r\n")
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()


class _Link:
    broken = False  # never fails

    def __init__(self, port):
        self.port = port

    async def auth(self, user, password):
        return user if password.reveal() == "pw-" + user else None

    async def route(self, sender):
        return Route(server="127.0.0.1", port=self.port, tls=TlsMode.PLAIN, ca_file="", user="",
                     password=Secret(""), auth=False, source="faults:1")

    def close(self):
        pass


class _Connector:
    def __init__(self, port):
        self.port = port

    def describe(self):
        return "faults"

    async def open(self, session_id, client):
        return _Link(self.port)


def _codes(out: bytes) -> list[int]:
    return [int(line[:3]) for line in out.split(b"\r\n") if line[3:4] == b" "]


def _converse(monkeypatch, hook, steps: list[bytes]):
    """One client session through the real driver and Relay: each step is
    written, then the client waits 0.3 s for the replies (a client that
    pipelines within a step and waits between steps). Returns what the
    client read, and the upstream."""

    async def go():
        up = await _Upstream(hook).start()
        monkeypatch.setattr(_driver, "make_relay",
                            lambda cfg, log: Relay(cfg, logging.getLogger("faults"), None))
        cfg = Config(timeout=5, smarthostCache=0, localname="relay.test", addReceivedField=False)
        fe = Frontend(cfg, connector=_Connector(up.port), hostname="mx.test")
        a, b = socket.socketpair()
        task = asyncio.ensure_future(
            SessionRunner(fe, await Stream.from_socket(a, 5), "192.0.2.1:4242").run())
        reader, writer = await asyncio.open_connection(sock=b)
        for step in steps:
            writer.write(step)
            await writer.drain()
            await asyncio.sleep(0.3)
        out = await asyncio.wait_for(reader.read(-1), 15)
        writer.close()
        await asyncio.wait_for(task, 15)
        up.server.close()
        return out, up

    return asyncio.run(go())


def test_a_data_reply_read_with_a_group_that_no_data_claims_does_not_block_later_rcpts(monkeypatch):
    """MAIL, RCPT (refused upstream) and DATA in one write: the upstream
    answers 250, 550 and 554 (no valid recipients). The session answers the
    client's DATA itself (554, no recipient), so the upstream's DATA reply
    kept in Relay._data_reply is never claimed; the transaction is still
    open on both sides (the session is in MAIL state, the upstream too).
    The client then adds a good recipient: the upstream's unclaimed DATA
    reply is forgotten, so the RCPT goes upstream and the message is
    delivered, as it would be direct or without a group."""
    out, up = _converse(monkeypatch, None, [
        LOGIN + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<nobody@x.y>\r\nDATA\r\n",
        b"RCPT TO:<good@x.y>\r\nDATA\r\n",
        b"hello\r\n.\r\nQUIT\r\n",
    ])
    assert _codes(out) == [220, 250, 235, 250, 550, 554, 250, 354, 250, 221], out
    assert up.messages == [(["RCPT TO:<good@x.y>"], b"hello\r\n")]


def test_a_nonsense_3xx_to_data_in_a_group_is_a_temporary_failure(monkeypatch):
    """The upstream answers the DATA of a group with a 3xx that is not 354
    (here 334), after accepting MAIL and the RCPT: the connection is left
    and the client's DATA gets 451 4.5.0 (try again later), as without a
    group — not a permanent 503 that would bounce the message."""

    def hook(st, verb, line):
        return b"334 what?\r\n" if verb == "DATA" else None

    out, up = _converse(monkeypatch, hook, [
        LOGIN + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<one@x.y>\r\nDATA\r\n",
        b"QUIT\r\n",
    ])
    assert _codes(out) == [220, 250, 235, 250, 250, 451, 221], out
    assert b"451 4.5.0" in out


def test_rcpts_a_careless_upstream_took_behind_a_refused_mail_never_join_the_next_message(
        monkeypatch):
    """RCPTs pipelined behind a MAIL go upstream before the MAIL is answered.
    A careless upstream refuses MAIL FROM:<no@b.c> but still records RCPT
    TO:<secret@x.y> (and its next MAIL does not clear it); the client is told
    503 for secret@x.y. The connection is dropped, so the next message goes
    on a fresh one and never reaches secret@x.y."""

    def hook(st, verb, line):
        if verb == "MAIL":  # never clears the recipients
            st["mail"] = b"no@" not in line
            return b"250 2.1.0 ok\r\n" if st["mail"] else b"550 5.7.1 sender refused\r\n"
        if verb == "RCPT":  # careless: takes a recipient without a sender
            st["rcpts"].append(line.decode().strip())
            return b"250 2.1.5 ok\r\n"
        if verb == "DATA" and st["mail"] and st["rcpts"]:
            return ("data", b"354 go ahead\r\n")
        return None

    out, up = _converse(monkeypatch, hook, [
        LOGIN + b"MAIL FROM:<no@b.c>\r\nRCPT TO:<secret@x.y>\r\n",
        b"MAIL FROM:<ok@b.c>\r\nRCPT TO:<public@x.y>\r\nDATA\r\n",
        b"hello\r\n.\r\nQUIT\r\n",
    ])
    assert _codes(out) == [220, 250, 235, 550, 503, 250, 250, 354, 250, 221], out
    assert up.messages == [(["RCPT TO:<public@x.y>"], b"hello\r\n")], up.lines


def test_an_upstream_that_says_more_than_it_was_asked_gets_451_not_shifted_replies(monkeypatch):
    """One reply too many (two lines for each RCPT): every later reply
    would be read one step late, the extra 250 taken for the next command's.
    Caught when the surplus is already read (the whole group answered 451)
    or when the shifted reply makes no sense (a 250 read as DATA's): either
    way the client gets 451 4.5.0, never a 354, and nothing is delivered."""

    def hook(st, verb, line):
        if verb == "RCPT":
            st["rcpts"].append(line.decode().strip())
            return b"250 2.1.5 ok\r\n250 2.1.5 and an extra one\r\n"
        return None

    out, up = _converse(monkeypatch, hook, [
        LOGIN + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<one@x.y>\r\nRCPT TO:<two@x.y>\r\nDATA\r\n",
        b"QUIT\r\n",
    ])
    codes = _codes(out)
    assert len(codes) == 8 and codes[:3] == [220, 250, 235] and codes[-1] == 221, out
    assert 451 in codes[3:7] and 354 not in codes and b"451 4.5.0" in out, out
    assert up.messages == []


def test_a_250_to_data_is_nonsense_never_passed_on(monkeypatch):
    """A 2xx to DATA (alone or in a group) would tell the client its DATA
    was taken without a 354: 451 4.5.0 and the connection left."""

    def hook(st, verb, line):
        return b"250 2.0.0 sure\r\n" if verb == "DATA" else None

    for steps in ([LOGIN + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<one@x.y>\r\nDATA\r\n", b"QUIT\r\n"],
                  [LOGIN + b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<one@x.y>\r\n", b"DATA\r\n",
                   b"QUIT\r\n"]):
        out, up = _converse(monkeypatch, hook, steps)
        assert _codes(out) == [220, 250, 235, 250, 250, 451, 221], out
        assert b"451 4.5.0" in out and up.messages == []
