"""Tests written from a mutation-testing review of what the earlier ones
left out: the upstream reply reader (_upstream.ReplyReader: line and reply
bounds, multi-line parsing, scrubbing, one deadline a reply) and Reply;
the Received: header and the message log line of _relay.py; the reply
catalogue and _relay_api.py. Each test pins down behaviour
that a small change to that code left unnoticed by the rest of the suite,
and names the mutant it kills. Upstreams are scripted plain-text servers
on loopback (or a socketpair's far end), the relay the real Relay."""

from __future__ import annotations

import base64
import socket

import pytest

from sendooway_front import _catalogue as R
from sendooway_front._reply import Reply
from sendooway_front._stream import Stream
from sendooway_front._upstream import ReplyError, ReplyReader

from .front_harness import Harness
from .scripted_relay import LOGIN, RELAY_LOG, UP_PASSWORD, UP_USER, careful, converse
from .test_upstream_faults import Script, _transaction
from .upstream import run


# ------------------------------------------------------------ the reply reader

def _read(sent: bytes, count: int = 1, timeout: float = 5):
    """Up to `count` replies a ReplyReader reads from a socketpair whose far
    end wrote `sent` and closed; the exception raised instead, if any."""

    async def go():
        near, far = socket.socketpair()
        far.sendall(sent)
        far.shutdown(socket.SHUT_WR)
        stream = await Stream.from_socket(near, timeout=timeout)
        reader = ReplyReader(stream)
        try:
            return [await reader.read_reply() for _ in range(count)]
        except (ReplyError, ConnectionError, TimeoutError) as e:
            return e
        finally:
            stream.abort()
            far.close()

    return run(go())


def test_a_code_outside_2xx_to_5xx_is_a_reply_error_and_the_client_gets_451():
    """R10/R11: the code's first digit is 2 to 5 (RFC 5321 4.2.1). A 1xx or
    6xx line taken as a reply made Reply() raise ValueError, which no relay
    path catches: the session died instead of answering 451."""
    for line in (b"150 2.1.5 ok\r\n", b"099 ok\r\n", b"650 ok\r\n"):
        got = _read(line)
        assert isinstance(got, ReplyError), (line, got)
        replies, log = run(_transaction(Script(RCPT=line)))
        rcpt = replies["rcpt"][0]
        assert rcpt.code == 451 and rcpt.lines[0].startswith("4.5.0"), (line, rcpt)


def test_the_code_is_three_digits_then_space_hyphen_or_the_end():
    """R12: "2500 ok" or "250ok" is no reply line (a fourth digit is not
    text). R13: a bare code with no text is a whole reply (RFC 5321 4.2:
    Reply-code [ SP textstring ] CRLF), and "250-" an empty first line."""
    for line in (b"2500 ok\r\n", b"250ok\r\n", b"250\tok\r\n"):
        assert isinstance(_read(line), ReplyError), line
    [bare] = _read(b"250\r\n")
    assert bare.code == 250 and bare.lines == ("",)
    [multi] = _read(b"250-\r\n250 2.0.0 ok\r\n")
    assert multi.code == 250 and multi.lines == ("", "2.0.0 ok")


def _nasty_dot(reply: bytes):
    """A `careful` upstream whose answer to the final dot is `reply`."""

    async def data(up, c):
        await c.send(b"354 go ahead\r\n")
        up.messages.append(await c.message())
        await c.send(reply)

    return lambda up, c: careful(up, c, data=data)


MESSAGE_STEPS = [
    LOGIN,
    b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n",
    b"Subject: t\r\n\r\nhello\r\n.\r\n",
    b"QUIT\r\n",
]


def test_terminal_escapes_in_an_upstream_reply_never_reach_the_client(monkeypatch):
    """R24 and the like: ESC (a terminal's CSI/OSC start), BEL, VT and FF in
    the upstream's reply text reach the client (and its user's terminal,
    swaks, a log) as "?"; TAB stays."""
    nasty = b"250 2.0.0 queued \x1b]0;owned\x07 \x1b[2J\x0b\x0c\tend\r\n"
    out, up, log = converse(monkeypatch, _nasty_dot(nasty), MESSAGE_STEPS)
    assert up.messages == [b"Subject: t\r\n\r\nhello\r\n"]
    assert b"250 2.0.0 queued ?]0;owned? ?[2J??\tend\r\n" in out, out
    for control in (b"\x1b", b"\x07", b"\x0b", b"\x0c"):
        assert control not in out and control.decode() not in log


def test_long_lines_and_long_replies_real_servers_send_are_taken():
    """R36/R37: the bounds are far above what real servers send (RFC 5321's
    512-octet line is exceeded by many, an EHLO reply may list 20 and more
    extensions): a 2000-octet line and a 60-line reply are replies, read
    whole, not nonsense."""
    long_line = b"550 5.7.1 " + b"see https://example.net/why?" + b"x" * 1960 + b"\r\n"
    assert len(long_line) == 2000
    [reply] = _read(long_line)
    assert reply.code == 550 and len(reply.lines[0]) == len(long_line) - 6
    ehlo = b"".join(b"250-EXT%d\r\n" % i for i in range(59)) + b"250 SMTPUTF8\r\n"
    [reply] = _read(ehlo)
    assert reply.code == 250 and len(reply.lines) == 60 and reply.lines[-1] == "SMTPUTF8"


def test_utf8_reply_text_reaches_the_client_as_utf8(monkeypatch):
    """P12: the upstream's text is decoded as UTF-8 and sent on as UTF-8
    (a localised server, SMTPUTF8), not re-encoded as Latin-1 (invalid
    UTF-8 for the client); an undecodable octet goes on as U+FFFD."""
    nasty = "250 2.0.0 Nachricht angenommen, Empfänger ok ".encode() + b"\x9b\r\n"
    out, _up, _log = converse(monkeypatch, _nasty_dot(nasty), MESSAGE_STEPS)
    assert "250 2.0.0 Nachricht angenommen, Empfänger ok \ufffd\r\n".encode() in out, out


def test_a_malformed_reply_line_goes_to_the_log_escaped():
    """R31: the log quotes a malformed line (repr): an upstream's ESC
    sequence or CR cannot move the admin's cursor or fake a log line."""
    nasty = b"25\x1b[2J\rrelay: message user=root upstream=250 ok\r\n"
    replies, log = run(_transaction(Script(MAIL=nasty)))
    assert replies["mail"].code == 451 and replies["mail"].lines[0].startswith("4.5.0")
    assert "malformed reply line" in log.text, log.text
    assert "\x1b" not in log.text and "\r" not in log.text, log.text
    assert "\\x1b[2J\\rrelay" in log.text, log.text


def test_a_long_malformed_reply_line_is_logged_cut_short():
    """R32: a malformed line up to MAX_REPLY_LINE octets long goes to the
    log as its first 60 octets and "...", not whole."""
    replies, log = run(_transaction(Script(MAIL=b"25" + b"x" * 3000 + b"\r\n")))
    assert replies["mail"].code == 451
    [line] = [x for x in log.lines if "malformed reply line" in x]
    assert "b'25" + "x" * 58 + "...'" in line, line
    assert "x" * 59 not in line and len(line) < 400, line


def test_reply_itself_refuses_a_code_outside_200_to_599_and_cr_lf_nul_in_its_text():
    """P01-P03: Reply is the last guard before bytes go to a client: a code
    it cannot be (1xx, 6xx) or text with CR, LF or NUL (which would end the
    line and forge the next reply) is a bug, raised at once."""
    for code in (199, 100, 600):
        with pytest.raises(ValueError):
            Reply(code, ("2.0.0 ok",))
    for text in ("ok\r354 go", "ok\n250 forged", "ok\0"):
        with pytest.raises(ValueError):
            Reply(250, ("2.0.0 fine", text))
    assert Reply(200, ("x",)).code == 200 and Reply(599, ("x",)).code == 599


# ------------------------------------------------------------ the message log line

def test_the_message_log_line_has_what_an_admin_needs_at_info_and_no_password(monkeypatch):
    """L09/L11 (the other fields are guarded elsewhere too): one line a
    message, at INFO (syslog's default keeps it), with
    the session's id, the user, the sender, the recipient count, the bytes
    the client sent (its last CRLF counted, our Received: header not), the
    message id, the route as server:port (mapping file:line) and the
    upstream's final reply; the file name escaped, no password anywhere."""
    steps = [
        LOGIN,
        b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
        b"RCPT TO:<carol@example.net>\r\nDATA\r\n",
        b"Subject: t\r\n\r\nhello\r\n.\r\n",
        b"QUIT\r\n",
    ]

    async def auth(up, c, line):
        await c.send(b"235 2.7.0 ok\r\n")

    def logs_in(up, c):
        return careful(up, c, ehlo=b"250-up.test\r\n250-AUTH PLAIN\r\n250 PIPELINING\r\n", auth=auth)

    out, up, log = converse(monkeypatch, logs_in, steps, auth=True, addReceivedField=True,
                            source="/home/alice/.fetch\x1b[2Jmailrc:7")
    assert b"250 2.0.0 queued" in out
    [login] = [x for x in up.lines if x.startswith(b"AUTH PLAIN ")]
    token = login.split()[2].decode()
    assert base64.b64decode(token) == f"\0{UP_USER}\0{UP_PASSWORD}".encode()
    [message] = up.messages
    assert message.startswith(b"Received: ") and message.endswith(b"Subject: t\r\n\r\nhello\r\n")
    [line] = [x for x in log.splitlines() if ": message user=" in x]
    sid = line.split(" ", 2)[2].split(":", 1)[0]
    assert sid and sid != "-", line
    assert line == (f"{RELAY_LOG} INFO {sid}: message user=alice from=<alice@example.org> rcpts=2"
                    f" bytes=21 id={sid}-1 route=127.0.0.1:{up.port}"
                    f" (/home/alice/.fetch\\x1b[2Jmailrc:7) upstream=250 2.0.0 queued"), line
    assert UP_PASSWORD not in log and token not in log and "pw-alice" not in log
    assert f"{sid}-1".encode() in message.split(b"\r\n\r\n", 1)[0]  # the Received: id


# ------------------------------------------------------------ the catalogue

def test_the_hello_line_echoes_only_a_printable_one_word_name_of_at_most_255_octets():
    """C18/C19/C21: the client's name is repeated only as one word of
    printable ASCII no longer than a domain may be: an ESC sequence, a DEL
    or a blank is not sent back (to the client's terminal, a transcript);
    255 octets are echoed, 256 are not."""
    for name in (b"c\x1b[2J.test", b"a\x7fb.test", b"a b", b"a\tb"):
        h = Harness()
        out = h.feed(b"EHLO " + name + b"\r\nHELO " + name + b"\r\n")
        first = [line for line in out.split(b"\r\n") if b"Hello" in line]
        assert first == [b"250-mx.test Hello", b"250 mx.test Hello"], (name, out)
    h = Harness()
    longest = b"c" * 255
    out = h.feed(b"HELO " + longest + b"\r\nHELO " + longest + b"c\r\n")
    assert out == b"250 mx.test Hello " + longest + b"\r\n250 mx.test Hello\r\n", out


def test_an_empty_auth_challenge_is_the_code_and_one_space():
    """C13: AUTH PLAIN without its response gets "334 " and nothing after
    the space (RFC 4954 4: an empty challenge), not text a client would
    try to decode."""
    h = Harness()
    h.feed(b"EHLO c.test\r\n")
    assert h.feed(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert R.CHALLENGE_EMPTY.to_bytes() == b"334 \r\n"

