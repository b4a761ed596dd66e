"""Tests written from a mutation-testing review of the relay's message
path (_relay.py: RCPT and DATA relaying, the message stream, the final
dot, data_abort, the Received: header, the per-message log line, the
pipelined groups; _upstream.ReplyReader's bounds and scrubbing; Reply;
the catalogue). Each pins down behaviour that a small change to that code
left unnoticed by the rest of the suite; each names what it guards. The
upstreams are scripted plain-text servers on loopback, the relay the real
Relay."""

from __future__ import annotations

import asyncio

from sendooway_front._relay import NO_TRANSACTION, Relay
from sendooway_front._relay_api import MailParams
from sendooway_shared.types import Route, Secret, TlsMode

from .upstream import capture_log, config, info, run

PIPE_EHLO = b"250-up.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n"
PLAIN_EHLO = b"250-up.test\r\n250 8BITMIME\r\n"


class Up:
    """A scripted upstream: `answers` maps a verb (b"MAIL", b"RCPT", b"DATA",
    b"DOT", ...) to its reply bytes; a list is used up one reply a command
    (its last entry then stays). A 354 to DATA makes it read the message up
    to the dot (kept in `messages`); `lines` holds every line it got,
    message lines too, so anything sent where it must not be shows."""

    def __init__(self, ehlo: bytes = PIPE_EHLO, **answers) -> None:
        self.answers = {b"EHLO": ehlo, b"MAIL": b"250 2.1.0 ok\r\n", b"RCPT": b"250 2.1.5 ok\r\n",
                        b"DATA": b"354 go\r\n", b"DOT": b"250 2.0.0 queued\r\n",
                        b"RSET": b"250 2.0.0 reset\r\n", b"QUIT": b"221 2.0.0 bye\r\n"}
        self.answers.update({k.encode(): v for k, v in answers.items()})
        self.lines: list[bytes] = []
        self.messages: list[bytes] = []
        self.cut = False  # the relay closed a connection inside a message

    def _answer(self, verb: bytes) -> bytes:
        value = self.answers.get(verb, b"502 5.5.2 what?\r\n")
        if isinstance(value, list):
            return value.pop(0) if len(value) > 1 else value[0]
        return value

    async def _handle(self, reader, writer) -> None:
        try:
            writer.write(b"220 up.test ESMTP\r\n")
            while line := await reader.readline():
                self.lines.append(line)
                verb = line[:4].upper()
                reply = self._answer(verb)
                if reply == b"":  # close instead of answering
                    return
                writer.write(reply)
                await writer.drain()
                if verb == b"DATA" and reply.startswith(b"354"):
                    body = b""
                    while (part := await reader.readline()) != b".\r\n":
                        if not part:
                            self.cut = True
                            return
                        self.lines.append(part)
                        body += part
                    self.messages.append(body)
                    writer.write(self._answer(b"DOT"))
                    await writer.drain()
                if verb == b"QUIT":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def start(self) -> "Up":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def route(self) -> Route:
        return Route("127.0.0.1", self.port, TlsMode.PLAIN, auth=False, user="",
                     password=Secret(""), source="m10.conf:3")

    def got(self, prefix: bytes) -> list[bytes]:
        return [line for line in self.lines if line.upper().startswith(prefix)]


async def _relay(up: Up, **cfg):
    await up.start()
    log, handler = capture_log("relay-m10")
    relay = Relay(config(timeout=3, **cfg), log)
    return relay, handler


async def _mail(relay: Relay, up: Up, sender: str = "alice@example.org", **kw):
    return await relay.mail(info(**kw), up.route(), sender, MailParams())


# ------------------------------------------------------------------ RCPT

def test_rcpt_while_a_pipelined_354_waits_is_refused_not_written_into_the_message():
    """r01: after a group whose DATA got its 354, a further RCPT must not
    be sent: the upstream reads it as message text."""
    async def go():
        up = Up()
        relay, _ = await _relay(up)
        replies = await relay.mail_group(info(), up.route(), "alice@example.org", MailParams(),
                                         ["bob@example.net"], True)
        assert [r.code for r in replies] == [250, 250]
        late = await relay.rcpt("eve@example.net")
        await relay.data_abort("test")
        await asyncio.sleep(0.1)
        up.server.close()
        return late, up

    late, up = run(go())
    assert late == NO_TRANSACTION
    assert not [line for line in up.lines if b"eve@" in line]


def test_rcpt_answered_with_surplus_reply_text_is_451_not_the_250():
    """r03: an upstream without PIPELINING that answers one RCPT with two
    replies: the 250 cannot be trusted (every later reply is shifted)."""
    async def go():
        up = Up(ehlo=PLAIN_EHLO, RCPT=b"250 2.1.5 ok\r\n250 2.1.5 and again\r\n")
        relay, handler = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        reply = await relay.rcpt("bob@example.net")
        await relay.close()
        up.server.close()
        return reply, handler.text

    reply, log = run(go())
    assert reply.code == 451 and reply.lines[0].startswith("4.5.0"), reply
    assert "sent more than its replies to RCPT" in log


def test_pipelined_rcpts_with_a_surplus_reply_are_all_451():
    """r08: which of the replies was whose is unknown: none of the 250s
    may reach the client."""
    async def go():
        up = Up(RCPT=[b"550 5.1.1 no such user\r\n", b"250 2.1.5 ok\r\n250 2.1.5 surplus\r\n"])
        relay, _ = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        replies = await relay.rcpts(["a@example.net", "b@example.net"])
        await relay.close()
        up.server.close()
        return replies

    replies = run(go())
    assert [r.code for r in replies] == [451, 451], replies
    assert all(r.lines[0].startswith("4.5.0") for r in replies)


def test_pipelined_rcpts_cut_after_the_first_reply_answer_every_rcpt():
    """r09: the connection lost in the middle of a group: each of the
    client's RCPTs still gets a reply of its own (the first the upstream's,
    the rest the local 451)."""
    async def go():
        up = Up(RCPT=[b"250 2.1.5 ok\r\n", b""])
        relay, _ = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        replies = await relay.rcpts(["a@example.net", "b@example.net", "c@example.net"])
        await relay.close()
        up.server.close()
        return replies

    replies = run(go())
    assert [r.code for r in replies] == [250, 451, 451], replies
    assert replies[1] == replies[2] and replies[1].lines[0].startswith("4.4.2")


def test_a_421_inside_a_pipelined_rcpt_group_answers_the_rest_with_its_text():
    """r07: behind a 421 the rest of the group is lost with it: those
    RCPTs get the same 451 (the upstream's text), not a read on a
    connection that is gone."""
    async def go():
        up = Up(RCPT=[b"250 2.1.5 ok\r\n", b"421 4.3.2 going down now\r\n", b""])
        relay, _ = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        replies = await relay.rcpts(["a@example.net", "b@example.net", "c@example.net"])
        after = await relay.data_start()
        await relay.close()
        up.server.close()
        return replies, after

    replies, after = run(go())
    assert [r.code for r in replies] == [250, 451, 451], replies
    assert replies[1].lines == replies[2].lines == ("4.3.2 going down now",)
    assert after.code == 451 and after.lines == ("4.3.2 going down now",)


def test_rcpts_behind_a_refused_mail_are_503_and_never_sent():
    """r11: no transaction upstream (MAIL refused): the pipelined RCPTs are
    not sent (a careless upstream might take them)."""
    async def go():
        up = Up(MAIL=b"550 5.7.1 not you\r\n")
        relay, _ = await _relay(up)
        assert (await _mail(relay, up)).code == 550
        replies = await relay.rcpts(["a@example.net", "b@example.net"])
        await relay.close()
        up.server.close()
        return replies, up

    replies, up = run(go())
    assert replies == [NO_TRANSACTION, NO_TRANSACTION]
    assert up.got(b"RCPT") == []


# ------------------------------------------------------------------ DATA

def test_data_behind_a_refused_mail_is_503_and_never_sent():
    """d01: data_start with no transaction upstream sends no DATA."""
    async def go():
        up = Up(MAIL=b"550 5.7.1 not you\r\n")
        relay, _ = await _relay(up)
        assert (await _mail(relay, up)).code == 550
        reply = await relay.data_start()
        await relay.close()
        up.server.close()
        return reply, up

    reply, up = run(go())
    assert reply == NO_TRANSACTION
    assert up.got(b"DATA") == []


def test_a_refusal_right_behind_the_354_answers_data_and_no_byte_is_sent():
    """d05: "354" and "554" in one write (smtp-sink -A does so): DATA's
    answer is the 554, not the 354, and the message never leaves."""
    async def go():
        up = Up(ehlo=PLAIN_EHLO, DATA=b"354 go\r\n554 5.7.1 not from you\r\n")
        relay, handler = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        assert (await relay.rcpt("bob@example.net")).code == 250
        reply = await relay.data_start()
        if reply.code == 354:  # (the mutant: the client would send the message)
            await relay.data_chunk(b"Subject: x\r\n\r\nsecret body")
            await relay.data_end()
        await relay.close()
        await asyncio.sleep(0.1)
        up.server.close()
        return reply, up, handler.text

    reply, up, log = run(go())
    assert reply.code == 554 and reply.lines == ("5.7.1 not from you",), reply
    assert not [line for line in up.lines if b"secret body" in line]
    assert "not delivered (554 5.7.1 not from you)" in log


def test_a_refused_data_has_its_message_log_line():
    """d10: one log line per message, also when DATA is refused."""
    async def go():
        up = Up(DATA=b"554 5.3.0 no data today\r\n")
        relay, handler = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        assert (await relay.rcpt("bob@example.net")).code == 250
        reply = await relay.data_start()
        await relay.close()
        up.server.close()
        return reply, handler.text

    reply, log = run(go())
    assert reply.code == 554
    assert "message user=alice from=<alice@example.org> rcpts=1 bytes=0" in log
    assert "upstream=DATA refused: 554 5.3.0 no data today" in log


def test_message_bytes_after_a_refused_data_are_never_written_as_commands():
    """c07: DATA refused (554), the connection kept: message bytes the
    relay is handed all the same must not reach the upstream, where they
    would be read as commands."""
    async def go():
        up = Up(DATA=b"554 5.3.0 no data today\r\n")
        relay, _ = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        assert (await relay.rcpt("bob@example.net")).code == 250
        assert (await relay.data_start()).code == 554
        await relay.data_chunk(b"MAIL FROM:<smuggled@example.org>\r\n")
        await relay.data_chunk(b"RCPT TO:<victim@example.net>\r\n")
        end = await relay.data_end()
        await relay.close()
        await asyncio.sleep(0.1)
        up.server.close()
        return end, up

    end, up = run(go())
    assert end == NO_TRANSACTION
    assert not [line for line in up.lines if b"smuggled" in line or b"victim" in line]


# ------------------------------------------------------------------ the message stream

def _message_of_chunks(*chunks: bytes):
    """MAIL, RCPT, DATA, then the message in `chunks` and its end: the end's
    reply, the upstream and the relay's log."""
    async def go():
        up = Up()
        relay, handler = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        assert (await relay.rcpt("bob@example.net")).code == 250
        assert (await relay.data_start()).code == 354
        for chunk in chunks:
            await relay.data_chunk(chunk)
        end = await relay.data_end()
        await relay.close()
        await asyncio.sleep(0.1)
        up.server.close()
        return end, up, handler.text

    return run(go())


def _speaks_during_the_message(text: bytes):
    """An upstream that answers DATA with 354 and, 0.2 s later, unasked,
    with `text` (before the message has come)."""
    up = Up(ehlo=PLAIN_EHLO)
    handle = up._handle

    async def _handle(reader, writer):
        orig_write = writer.write

        def write(data: bytes) -> None:
            orig_write(data)
            if data.startswith(b"354"):
                asyncio.get_running_loop().call_later(0.2, orig_write, text)

        writer.write = write
        await handle(reader, writer)

    up._handle = _handle
    return up


async def _message_with_a_pause(up: Up):
    relay, handler = await _relay(up)
    assert (await _mail(relay, up)).code == 250
    assert (await relay.rcpt("bob@example.net")).code == 250
    assert (await relay.data_start()).code == 354
    await relay.data_chunk(b"Subject: a\r\n\r\nfirst")
    await asyncio.sleep(0.5)
    await relay.data_chunk(b" line\r\nlast")
    end = await relay.data_end()
    await relay.close()
    await asyncio.sleep(0.1)
    up.server.close()
    return end, handler.text


def test_a_4xx_the_upstream_says_during_the_message_is_the_answer_with_its_text():
    """f06: an early 4xx (not only a 5xx) is the upstream's answer, passed
    on as it is, and the message gets no final dot."""
    up = _speaks_during_the_message(b"452 4.3.1 Insufficient system storage\r\n")
    end, log = run(_message_with_a_pause(up))
    assert end.code == 452 and end.lines == ("4.3.1 Insufficient system storage",), end
    assert up.messages == []
    assert "refused the message during DATA" in log


def test_a_421_the_upstream_says_during_the_message_reaches_the_client_as_451():
    """f03: a 421 during the message becomes 451 with its text (the
    client's session with us goes on), never a 421."""
    up = _speaks_during_the_message(b"421 4.3.2 System shutting down\r\n")
    end, _ = run(_message_with_a_pause(up))
    assert end.code == 451 and end.lines == ("4.3.2 System shutting down",), end
    assert up.messages == []


def test_half_a_reply_during_the_message_is_nonsense_and_no_dot_follows():
    """f05: "25" unasked, the rest never coming: not TLS housekeeping to
    carry on after, but nonsense (451 4.5.0); the message gets no dot."""
    up = _speaks_during_the_message(b"25")
    end, log = run(_message_with_a_pause(up))
    assert end.code == 451 and end.lines[0].startswith("4.5.0"), end
    assert up.messages == []
    assert "part of a reply" in log


async def _in_the_message(up: Up):
    relay, handler = await _relay(up)
    assert (await _mail(relay, up)).code == 250
    assert (await relay.rcpt("bob@example.net")).code == 250
    assert (await relay.data_start()).code == 354
    await relay.data_chunk(b"Subject: a\r\n\r\nfirst line\r\n")
    await relay.data_chunk(b"second line")
    return relay, handler


def test_data_abort_cuts_the_upstream_connection_at_once():
    """a03: a message aborted (client gone, bare LF) is cut right away,
    not left open until the session ends, and never gets its dot."""
    async def go():
        up = Up()
        relay, handler = await _in_the_message(up)
        await relay.data_abort("client vanished")
        await asyncio.sleep(0.3)
        cut_before_close = up.cut
        await relay.close()
        up.server.close()
        return cut_before_close, up, handler.text

    cut, up, log = run(go())
    assert cut and up.messages == []
    assert "upstream=aborted (client vanished), no final dot sent" in log


def test_reset_during_the_message_sends_no_rset_into_it():
    """a04: RSET cannot leave a message without its dot: the connection
    is dropped, nothing more is written."""
    async def go():
        up = Up()
        relay, _ = await _in_the_message(up)
        await relay.reset()
        await asyncio.sleep(0.3)
        await relay.close()
        up.server.close()
        return up

    up = run(go())
    assert up.got(b"RSET") == [] and up.messages == [] and up.cut


def test_two_replies_to_the_final_dot_are_never_passed_as_250():
    """e09: which reply answered the dot is unknown: 451 4.5.0, and the
    message is not counted as delivered."""
    async def go():
        up = Up(DOT=b"250 2.0.0 queued\r\n250 2.0.0 queued again\r\n")
        relay, handler = await _relay(up)
        assert (await _mail(relay, up)).code == 250
        assert (await relay.rcpt("bob@example.net")).code == 250
        assert (await relay.data_start()).code == 354
        await relay.data_chunk(b"Subject: a\r\n\r\nbody")
        end = await relay.data_end()
        await relay.close()
        up.server.close()
        return end, relay.messages, handler.text

    end, delivered, log = run(go())
    assert end.code == 451 and end.lines[0].startswith("4.5.0"), end
    assert delivered == 0
    assert "sent more than its replies to the end of the message" in log
