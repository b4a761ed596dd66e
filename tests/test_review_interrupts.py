"""Interruption audit: a peer vanishing, or a signal arriving, at each step
of a session. The frontend half runs serve_listening in-process with the
smarthostCache on, against a scripted upstream that can stall or vanish at
a chosen command; the authenticator half runs the real daemon with a slow
PAM stack. After each interruption the next session (same route, pool on)
must deliver exactly its own message, the dropped one never gets the
upstream's final dot, and the logs have no traceback."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import struct
import time

import pytest

from sendooway_front import _driver, _pool
from sendooway_front._authlink import SocketConnector
from sendooway_front._driver import Frontend
from sendooway_front._relay import Relay
from sendooway_shared.config import Config
from sendooway_shared.protocol import VERSION, AuthFail, AuthOk, AuthRequest, Hello
from sendooway_shared.types import Secret
from tests.auth_helpers import Daemon, add_pam_service, all_passwords, build_test_pam_module, login
from tests.front_util import login_plain
from tests.scripted_relay import LOGIN, RELAY_LOG, Connector, plain_route, serve_on_loopback
from tests.upstream import ListHandler

PAM_DELAY = 1.0  # seconds a failed PAM check takes (pam_unix's failure delay)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")


# ------------------------------------------------------------ authenticator


@pytest.fixture
def slow_daemon(tmp_path, tmp_config, world):
    module = build_test_pam_module(world)
    if module is None:
        pytest.skip("needs a C compiler (cc) to build the slow test PAM module")
    service = add_pam_service(world, "sendooway-intr", module, fail_sleep=PAM_DELAY)
    d = Daemon(tmp_path, tmp_config(f"pamService = {service}\n"))
    d.start()
    yield d
    d.stop()
    log = d.log()
    assert not any(pw in log for pw in all_passwords(world) + ["wrong-Pw-zz"])
    assert "internal error" not in log and "Traceback" not in log, log


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@root_only
def test_a_frontend_leaving_during_a_slow_pam_check_costs_one_failure_and_no_descriptor(
        slow_daemon, world):
    d = slow_daemon
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")  # (warm)
    ch.close()
    time.sleep(0.3)
    baseline = _fds(d.proc.pid)
    gone = d.connect()
    gone.request(Hello(VERSION, "s-gone", "192.0.2.40"))
    gone.send(AuthRequest("alice", Secret("wrong-Pw-zz")))
    time.sleep(0.2)  # the PAM check is under way
    gone.close()
    # the same user from elsewhere: served once the check in flight ends
    t = time.monotonic()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password, client="192.0.2.41") == AuthOk("alice")
    assert time.monotonic() - t < PAM_DELAY + 2
    ch.close()
    d.wait_log("session=s-gone")
    log = d.log()
    assert log.count("auth failed: user=alice") == 1, log
    deadline = time.monotonic() + 5
    while _fds(d.proc.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fds(d.proc.pid) <= baseline


@root_only
def test_sigterm_during_a_slow_pam_check_stops_the_daemon_at_once(slow_daemon, world):
    d = slow_daemon
    ch = d.connect()
    ch.request(Hello(VERSION, "s-term", "192.0.2.42"))
    ch.send(AuthRequest("bob", Secret("wrong-Pw-zz")))
    time.sleep(0.2)
    t = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t < PAM_DELAY + 1
    with pytest.raises((ConnectionError, OSError)):
        ch.receive()
    assert "stopped" in d.log()


@root_only
def test_sighup_during_a_slow_pam_check_answers_it_as_usual(slow_daemon, world):
    d = slow_daemon
    ch = d.connect()
    ch.request(Hello(VERSION, "s-hup", "192.0.2.43"))
    ch.send(AuthRequest("carol", Secret("wrong-Pw-zz")))
    time.sleep(0.2)
    d.proc.send_signal(signal.SIGHUP)
    assert ch.receive() == AuthFail()
    d.wait_log("reloaded")
    ch.close()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password, client="192.0.2.44") == AuthOk("alice")
    ch.close()
    assert d.proc.poll() is None


# ------------------------------------------------------------ frontend

FOREVER = 100.0  # a stall nobody waits out
MAIL = b"MAIL FROM:<alice@example.org>\r\n"
RCPT = b"RCPT TO:<bob@example.net>\r\n"


def _message(tag: bytes) -> list:
    return [LOGIN, MAIL, RCPT, b"DATA\r\n", b"Subject: " + tag + b"\r\n\r\nbody\r\n.\r\nQUIT\r\n"]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Vanish with a reset (SO_LINGER 0), as a crashed peer or a NAT does."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Upstream:
    """A plain upstream with PIPELINING. `stall[VERB]` seconds before it
    answers VERB ("GREET": the greeting, "DOT": the final dot), noticing
    our close meanwhile; at `vanish` (a verb) it resets the connection
    instead of answering. Each connection's lines, and the messages whose
    final dot came (their Subject line)."""

    def __init__(self) -> None:
        self.stall: dict[str, float] = {}
        self.vanish = ""
        self.conns: list[dict] = []
        self.subjects: list[bytes] = []
        self.open = 0

    async def start(self) -> "_Upstream":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _pause(self, reader, writer, me: dict, verb: str) -> bool:
        """The stall for `verb`, leaving what is pipelined behind it unread;
        False when we closed meanwhile (EOF seen: the reader's own flag)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.stall.get(verb, 0)
        while loop.time() < end:
            if reader._eof or writer.transport.is_closing():
                me["closed_in_stall"] = loop.time()
                return False
            await asyncio.sleep(0.02)
        return True

    async def _handle(self, reader, writer) -> None:
        me = {"lines": [], "partial": None}
        self.conns.append(me)
        self.open += 1
        try:
            if not await self._pause(reader, writer, me, "GREET"):
                return
            writer.write(b"220 up.test ESMTP\r\n")
            while line := await reader.readline():
                me["lines"].append(line)
                verb = line[:4].upper().decode()
                if not await self._pause(reader, writer, me, verb):
                    return
                if verb == self.vanish:
                    _reset(writer)
                    return
                if verb == "EHLO":
                    writer.write(b"250-up.test\r\n250 PIPELINING\r\n")
                elif verb in ("MAIL", "RCPT", "RSET"):
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == "DATA":
                    writer.write(b"354 go ahead\r\n")
                    body = b""
                    while (part := await reader.readline()) != b".\r\n":
                        if not part:
                            me["partial"] = body  # (no final dot came)
                            return
                        body += part
                    if not await self._pause(reader, writer, me, "DOT"):
                        return
                    if self.vanish == "DOT":
                        _reset(writer)
                        return
                    self.subjects.append(body.split(b"\r\n", 1)[0])
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"502 5.5.2 what?\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()


class _Front:
    """serve_listening in this process, the Relay with the process's shared
    smarthostCache pool, to `up`; the frontend's and relay's log lines."""

    def __init__(self, monkeypatch, up: _Upstream, timeout: int = 8, grace: float = 0.3,
                 connector=None, **cfg_kw) -> None:
        self.monkeypatch, self.up, self.timeout, self.grace = monkeypatch, up, timeout, grace
        self.connector = connector
        self.cfg_kw = cfg_kw
        self.handler = ListHandler()
        self.handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    async def __aenter__(self) -> "_Front":
        for name in ("sendooway", RELAY_LOG):
            lg = logging.getLogger(name)
            self.monkeypatch.setattr(lg, "level", logging.DEBUG)
            # and a fresh cache of the levels it is enabled for (the old one is
            # given back with the level): one filled by an earlier test in this
            # process, at the old level, kept every INFO line from the handler
            self.monkeypatch.setattr(lg, "_cache", {})
            self.monkeypatch.setattr(lg, "propagate", False)
            lg.addHandler(self.handler)
        relay_log = logging.getLogger(RELAY_LOG)
        self.monkeypatch.setattr(_driver, "make_relay", lambda cfg, log: Relay(
            cfg, relay_log, _pool.shared_pool(cfg.smarthostCache, relay_log)))
        cfg = Config(timeout=self.timeout, smarthostCache=30, localname="relay.test",
                     addReceivedField=False, **self.cfg_kw)
        fe = Frontend(cfg, connector=self.connector or Connector(plain_route(self.up.port)),
                      hostname="mx.test")
        self.port, self.server = serve_on_loopback(fe, self.grace)
        return self

    async def session(self, steps: list) -> bytes:
        """Bytes are sent (0.15 s for the replies), a number is a pause,
        "RST" vanishes; else all the client read until the close."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        out = b""
        for step in steps:
            if isinstance(step, (int, float)):
                await asyncio.sleep(step)
            elif step == "RST":
                _reset(writer)
                return out
            else:
                writer.write(step)
                await writer.drain()
                await asyncio.sleep(0.15)
        try:
            while chunk := await asyncio.wait_for(reader.read(4096), 15):
                out += chunk
        except ConnectionError:
            pass
        writer.close()
        return out

    async def closed(self, sessions: int) -> None:
        """Wait (10 s at most) until `sessions` sessions have logged their end."""
        for _ in range(200):
            if self.handler.text.count(": closed: ") >= sessions:
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> float:
        """SIGTERM (serve_listening's handler); seconds until it stopped."""
        t = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(self.server, 30)
        return time.monotonic() - t

    async def __aexit__(self, *exc) -> None:
        if not self.server.done():
            await self.stop()
        self.up.server.close()
        logging.getLogger("sendooway").removeHandler(self.handler)
        logging.getLogger(RELAY_LOG).removeHandler(self.handler)
        assert "Traceback" not in self.handler.text, self.handler.text


def _after_interruption(monkeypatch, interrupted: list, stall=None, vanish=""):
    """A message goes (its connection is kept), a session is interrupted as
    `interrupted` says, then the next session sends its own message.
    Returns (the next session's output, the upstream, the log)."""

    async def go():
        up = await _Upstream().start()
        async with _Front(monkeypatch, up) as fe:
            assert b"250 2.0.0 queued" in await fe.session(_message(b"first"))
            up.stall, up.vanish = dict(stall or {}), vanish
            await fe.session(interrupted)
            await fe.closed(2)  # the interrupted session is over
            up.stall, up.vanish = {}, ""
            out = await fe.session(_message(b"next"))
        return out, up, fe.handler.text

    return asyncio.run(go())


def test_a_client_reset_while_its_mail_is_upstream_is_one_loss_and_the_kept_connection_is_clean(
        monkeypatch):
    """The client resets while the upstream has its MAIL: the 250 cannot be
    written, and the session used to read from the dead connection anyway
    ("write failed", then "read failed: Connection reset by peer", then
    "closed"; a client that only stopped reading cost a second `timeout`
    there). The connection, RSET, serves the next session."""
    out, up, log = _after_interruption(monkeypatch, [LOGIN, MAIL, 0.1, "RST"], stall={"MAIL": 0.5})
    assert b"250 2.0.0 queued" in out, out
    assert up.subjects == [b"Subject: first", b"Subject: next"]
    [conn] = up.conns  # the one kept connection carried all
    lines = [ln.split(b" ", 1)[0].strip() for ln in conn["lines"]]
    # the dropped session's transaction was RSET before the next MAIL
    assert lines[lines.index(b"MAIL", 2) + 1] == b"RSET", lines
    dropped = [ln for ln in log.splitlines() if "write failed" in ln]
    assert len(dropped) == 1, log
    sid = dropped[0].split()[2]
    lines_of_it = [ln for ln in log.splitlines() if f" {sid} " in ln and "DEBUG" not in ln]
    assert "read failed" not in log, log
    assert len(lines_of_it) == 4, lines_of_it  # connect, login, write failed, closed


HALF = [LOGIN, MAIL, RCPT, b"DATA\r\n", b"Subject: dropped\r\n\r\nthe first half\r\n"]


@pytest.mark.parametrize("interrupted,stall", [
    pytest.param([LOGIN, MAIL, 0.1, "RST"], {"RSET": 0.5}, id="client-gone-in-the-rset-probe"),
    pytest.param([LOGIN, MAIL, RCPT, 0.1, "RST"], {"RCPT": 0.5}, id="client-gone-in-rcpt"),
    pytest.param([LOGIN, MAIL, RCPT, b"DATA\r\n", "RST"], {"DATA": 0.3}, id="client-gone-in-data"),
    pytest.param(HALF + ["RST"], {}, id="client-gone-mid-message"),
    pytest.param([LOGIN, MAIL + RCPT + b"DATA\r\nSubject: dropped\r\n\r\nhalf", "RST"], {"MAIL": 0.3},
                 id="client-gone-in-a-pipelined-group"),
    pytest.param([LOGIN, MAIL, RCPT, b"DATA\r\n", b"Subject: sent\r\n\r\nx\r\n.\r\n", 0.1, "RST"],
                 {"DOT": 0.5}, id="client-gone-awaiting-the-dot-reply"),
])
def test_a_client_vanishing_leaves_the_kept_connection_clean(monkeypatch, interrupted, stall):
    out, up, log = _after_interruption(monkeypatch, interrupted, stall=stall)
    assert b"250 2.0.0 queued" in out, out
    # a message the client ended is delivered; a dropped one never gets its dot
    sent = [b"Subject: sent"] if "DOT" in stall else []
    assert up.subjects == [b"Subject: first", *sent, b"Subject: next"]
    if any(b"dropped" in step for step in interrupted if isinstance(step, bytes)):
        assert "no final dot sent" in log, log
    assert log.count("closed:") == 3, log


@pytest.mark.parametrize("vanish", ["RSET", "MAIL", "RCPT", "DATA", "DOT", "QUIT"])
def test_an_upstream_vanishing_at_each_step_costs_only_its_own_session(monkeypatch, vanish):
    out, up, log = _after_interruption(monkeypatch, _message(b"x"), vanish=vanish)
    assert b"250 2.0.0 queued" in out, out
    # RSET is the kept connection's probe: the session reconnects and sends
    # its message; QUIT is after it: delivered either way
    x = [b"Subject: x"] if vanish in ("RSET", "QUIT") else []
    assert up.subjects == [b"Subject: first", *x, b"Subject: next"]
    if vanish in ("DATA", "DOT"):
        assert "upstream=unknown, connection lost" in log or "not delivered" in log, log


def _stopped_in(monkeypatch, interrupted: list, stall: dict, kept: bool = True):
    """SIGTERM while a session is interrupted at a stalled upstream step:
    (what the client read, the upstream, the log, seconds the stop took)."""

    async def go():
        up = await _Upstream().start()
        async with _Front(monkeypatch, up) as fe:
            if kept:
                assert b"250 2.0.0 queued" in await fe.session(_message(b"first"))
            up.stall = dict(stall)
            client = asyncio.ensure_future(fe.session(interrupted))
            await asyncio.sleep(0.8)
            took = await fe.stop()
            out = await asyncio.wait_for(client, 20)
            await asyncio.sleep(0.2)
        return out, up, fe.handler.text, took

    return asyncio.run(go())


@pytest.mark.parametrize("interrupted,stall,kept", [
    pytest.param([LOGIN, MAIL], {"GREET": FOREVER}, False, id="greeting"),
    pytest.param([LOGIN, MAIL], {"RSET": FOREVER}, True, id="rset-probe"),
    pytest.param([LOGIN, MAIL, RCPT, b"DATA\r\n"], {"DATA": FOREVER}, True, id="data"),
    pytest.param(HALF + [1], {}, True, id="mid-message"),
    # the client left mid-transaction: the session's RSET before keeping
    # the connection is what the stop cuts
    pytest.param([LOGIN, MAIL, RCPT, 0.2, "RST"], {"RSET": FOREVER}, False, id="release-rset"),
])
def test_sigterm_at_a_stalled_step_cuts_the_upstream_without_a_dot(monkeypatch, interrupted, stall, kept):
    out, up, log, took = _stopped_in(monkeypatch, interrupted, stall, kept)
    assert took < 5, took  # grace 0.3 s, 2 s for a 421 between commands, then the cut
    if "RST" not in interrupted:
        assert out.endswith(b"421 4.3.2 Server shutting down, closing connection\r\n"), out
    assert up.open == 0  # every upstream connection closed, kept or cut
    assert up.subjects == ([b"Subject: first"] if kept else [])
    if any(b"dropped" in step for step in interrupted if isinstance(step, bytes)):
        assert "no final dot sent" in log, log
    # every session has its one closing line, a cut one too (it had none)
    sessions = {ln.split()[2] for ln in log.splitlines() if ln.endswith(": connect")}
    assert len(sessions) == 1 + kept
    for sid in sessions:
        closing = [ln for ln in log.splitlines() if f" {sid} " in ln and ": closed: " in ln]
        assert len(closing) == 1, log


@root_only
def test_a_client_gone_while_its_login_is_at_pam_is_one_failure_and_one_closed_session(
        monkeypatch, slow_daemon, world):
    """The real daemon behind the frontend: the client resets while PAM
    checks its (wrong) password; the same user's next session logs in once
    that check is done, the daemon counts one failure, the frontend logs
    the lost session once."""
    d = slow_daemon
    good = login_plain("alice", world.users["alice"].password).encode()
    bad = login_plain("alice", "wrong-Pw-zz").encode()

    async def go():
        up = await _Upstream().start()
        async with _Front(monkeypatch, up, connector=SocketConnector(d.socket_path, 8)) as fe:
            await fe.session([b"EHLO c.test\r\nAUTH PLAIN " + bad + b"\r\n", 0.1, "RST"])
            out = await fe.session([b"EHLO c.test\r\nAUTH PLAIN " + good + b"\r\n", 1.5,
                                    b"QUIT\r\n"])
        return out, fe.handler.text

    out, log = asyncio.run(go())
    assert b"235 " in out, out
    assert log.count("login failed: user='alice'") == 1, log
    assert log.count("closed:") == 2 and "read failed" not in log, log
    d.wait_log("auth ok: user=alice")
    assert d.log().count("auth failed: user=alice") == 1, d.log()


def test_a_balancer_connection_cut_before_its_proxy_header_logs_no_session_end(monkeypatch):
    """The cut's closing line belongs to a session that logged its connect:
    a balancer's connection still without its PROXY header (a health check
    holding it open) has neither."""

    async def go():
        up = await _Upstream().start()
        async with _Front(monkeypatch, up, timeout=30,
                          proxyProtocol=(ipaddress.ip_network("127.0.0.0/8"),)) as fe:
            _reader, writer = await asyncio.open_connection("127.0.0.1", fe.port)
            writer.write(b"PROXY TCP4 192.0.2.9 ")  # and no more
            await asyncio.sleep(0.3)
            took = await fe.stop()
            writer.close()
        return fe.handler.text, took

    log, took = asyncio.run(go())
    assert "sessions cut" in log and took < 5, log
    assert "connect" not in log and "closed:" not in log, log
