"""inetd/stdio mode against daemon mode, a differential review.

The same scripted client sessions go through (a) xinetd's root block (the
frontend forks its own authenticator over a socketpair, then drops to
nobody), (b) xinetd's nobody block with the sendooway-auth daemon and
(c) `sendooway -b` with the same daemon; the replies, what the upstream got
and the log lines are compared; -s through the same three. Mode (a)'s
process hygiene is checked after every kind of session end, and stdin and
stdout as two pipes, closed, or with their reader gone.

Pipelined bursts, byte-by-byte commands, over-long lines, NUL, bare CR/LF,
STARTTLS with an injected command, half-closes, resets, a 4 MB message, an
unrouted sender, a refused recipient, a dead upstream and an idle client
gave the same bytes, messages and log lines everywhere. Found and fixed:
- SIGTERM (systemctl stop xinetd, a shutdown) ended a per-connection
  frontend at once: a message whose final dot had gone upstream was
  delivered unheard and unlogged, one in mid-DATA had no log line, and the
  client saw a silent close; `sendooway -b` did all three right. Now the
  one session stops as -b's do, with no grace.
- A stdio session that never opened its socketpair link (a failed -s
  handshake) kept the root authenticator and the client's connection 5 s:
  each waited for the other to close first.
- With stdout closed at start the log file became fd 1: the SMTP replies
  went into the log while the message was relayed.
- The frontend waited `timeout` for an auth answer that the authenticator
  holds back by its failure delay: with a small `timeout` a wrong password
  was answered 454 and 421 "authentication service not available" (seen
  in mode (a), whose private authenticator always has the default delay).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import signal
import struct
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import deploy_world as dw
from .deploy_util import command
from .fakeworld import refused_port
from .upstream import FakeUpstream

PASSWORD_B64_CACHE: dict = {}


@dataclass
class Modes:
    dep: dw.Deployment
    upstream: FakeUpstream
    ports: dict[str, int]
    logs: dict[str, Path]
    xinetd: subprocess.Popen
    daemon: subprocess.Popen
    listener: subprocess.Popen


def _config(dep: dw.Deployment, **changes: str) -> None:
    text = dep.config.read_text()
    for keyword, value in changes.items():
        text, n = re.subn(rf"^{keyword} =.*$", f"{keyword} = {value}", text, flags=re.M)
        assert n == 1, keyword
    dep.config.write_text(text)


def _xinetd_conf(dep: dw.Deployment, ports: dict[str, int], logs: dict[str, Path]) -> Path:
    front = command("sendooway")
    # (a) must not find the daemon (b) and (c) use: it forks its own
    configs = {"a": dep.root / "sendooway-a.conf", "b": dep.config}
    configs["a"].write_text(re.sub(r"^authSocket =.*$", f"authSocket = {dep.root}/none/auth.sock",
                                   dep.config.read_text(), flags=re.M))
    os.chmod(configs["a"], 0o644)
    blocks = []
    configs["as"], configs["bs"] = configs["a"], configs["b"]
    for mode, user, extra in (("a", "root", ""),
                              ("b", "nobody", f" --auth-socket {dep.auth_socket}"),
                              ("as", "root", " -s"),
                              ("bs", "nobody", f" --auth-socket {dep.auth_socket} -s")):
        blocks.append(
            f"service sendooway-{mode}\n{{\n\ttype = UNLISTED\n\tport = {ports[mode]}\n"
            f"\tbind = 127.0.0.1\n\tsocket_type = stream\n\tprotocol = tcp\n\twait = no\n"
            f"\tuser = {user}\n" + ("\tgroup = ssl-cert\n" if user == "nobody" else "")
            + f"\tserver = {front}\n\tserver_args = -c {configs[mode]} -l {logs[mode]}{extra}\n"
            "\tinstances = 50\n}\n")
    conf = dep.root / "xinetd.conf"
    conf.write_text("".join(blocks))
    return conf


class SlowUpstream(FakeUpstream):
    """The fake upstream, which may be told to hold its answer to the final
    dot for `answer_delay` seconds after it took the message (as an MTA
    whose queue has it already); `dot_seen` is set when a dot arrives."""

    answer_delay = 0.0

    async def handle_DATA(self, server, session, envelope):
        answer = await super().handle_DATA(server, session, envelope)
        self.dot_seen.set()
        if self.answer_delay:
            await asyncio.sleep(self.answer_delay)
        return answer


@pytest.fixture(scope="module")
def modes(world):
    up = SlowUpstream(world, tls="starttls", accounts={dw.UPSTREAM_USER: dw.UPSTREAM_PASSWORD})
    up.dot_seen = threading.Event()
    up.start()
    dep = dw.build(world, up.port)
    # a sender whose upstream does not answer: a port nobody listens on (held
    # for the module, so that no parallel test listens there meanwhile)
    held = contextlib.ExitStack()
    down = held.enter_context(refused_port())
    world.write_user_file("alice", ".sendoowayrc", f"sslCA = {world.ca_file}\n"
                          f"smarthostMapping = direct:down@example.org 127.0.0.1"
                          f" {down} alice-up pw noAuth\n", mode=0o644)
    _config(dep, mailerEncryption="allowed", timeout="4", smarthostCache="0")
    logs = {m: dep.root / f"front-{m}.log" for m in ("a", "b", "c", "as", "bs", "cs")}
    for log in logs.values():
        log.touch()
        os.chown(log, dw.NOBODY_UID, -1)
        os.chmod(log, 0o600)
    ports = {m: dw.free_tcp_port() for m in ("a", "b", "as", "bs")}
    daemon = dw.start_auth_daemon(dep, ["--failure-delay", "0"])
    conf = _xinetd_conf(dep, ports, logs)
    xinetd = subprocess.Popen(
        ["xinetd", "-dontfork", "-f", str(conf), "-pidfile", str(dep.root / "xinetd.pid"),
         "-filelog", str(dep.root / "xinetd.log")],
        env=dep.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    dw.wait_for(lambda: all(dw.listening(ports[m]) for m in ("a", "b", "as", "bs")),
                what="xinetd to listen")
    dep.front_log = logs["c"]
    listener, ports["c"] = dw.serve_b(dep)
    ports["cs"] = dw.free_tcp_port()
    tls_listener = subprocess.Popen(
        [command("sendooway"), "-c", str(dep.config), "-l", str(logs["cs"]), "-s",
         "-b", f"127.0.0.1:{ports['cs']}"],
        env=dep.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    dw.wait_for(lambda: dw.listening(ports["cs"], tls_listener), what="sendooway -b -s")
    yield Modes(dep, up, ports, logs, xinetd, daemon, listener)
    for proc in (tls_listener, listener, xinetd, daemon):
        dw.stop(proc)
    up.stop()
    dep.cleanup()
    world.clear_home("alice")
    held.close()


# ------------------------------------------------------------ the scripted client


def _read_all(sock: socket.socket, quiet: float) -> tuple[bytes, str]:
    """Everything until EOF or `quiet` seconds of silence; how it ended."""
    out = b""
    sock.settimeout(quiet)
    while True:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return out, "open"
        except ConnectionResetError:
            return out, "reset"
        if not data:
            return out, "eof"
        out += data


def run_script(port: int, steps) -> tuple[bytes, str]:
    """steps: bytes to send, or ("until", marker) to read up to a reply,
    ("shut",) for SHUT_WR, ("rst",) to reset and stop. Then everything
    up to the server's close (or 3 s of silence). Returns the replies and
    how the connection ended (eof, reset, open, rst)."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for step in steps:
            if isinstance(step, bytes):
                sock.sendall(step)
            elif step[0] == "until":
                got += _until(sock, step[1])
            elif step[0] == "shut":
                sock.shutdown(socket.SHUT_WR)
            elif step[0] == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return got, "rst"
        rest, ended = _read_all(sock, 3)
    return got + rest, ended


def normalise(replies: bytes) -> bytes:
    return re.sub(rb"queued as FAKE\d+", b"queued as FAKE", replies)


LOG_LINE = re.compile(r"^\S+ \S+ sendooway\[\d+\]: ([0-9a-f]{10})[ :](.*)$")
FALLBACK = re.compile(r"^ upstream .*; connected to \S+$")


def session_lines(text: str) -> list[str]:
    """The frontend's lines about sessions, without what differs by
    design from one session to the next (time, pid, session and message
    ids, the client's port, the upstream's queue id). Also without the
    warning that one of the upstream's addresses refused (where localhost is
    ::1 too, as Debian's /etc/hosts has it, and the upstream listens on
    127.0.0.1 only): a per-connection frontend warns every session, and
    `sendooway -b` only until it remembers the address (FailedAddresses)."""
    out = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m and not FALLBACK.match(m.group(2)):
            rest = m.group(2).replace(m.group(1), "ID")
            rest = re.sub(r"127\.0\.0\.1:\d+", "CLIENT", rest)
            out.append(re.sub(r"queued as FAKE\d+", "queued as FAKE", rest))
    return out


def _login(world) -> bytes:
    token = base64.b64encode(b"\0alice\0" + world.users["alice"].password.encode())
    return b"EHLO c.test\r\nAUTH PLAIN " + token + b"\r\n"


ENVELOPE = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"


def _frontend_of(modes: Modes, mode: str) -> int:
    """The pid of the one frontend xinetd runs for `mode` now."""
    def find():
        found = []
        for pid in dw.descendants(modes.xinetd.pid):
            try:
                info = dw.credentials(pid)
            except OSError:
                continue
            if str(modes.logs[mode]) in info["cmdline"] and info["cmdline"][1].endswith("/sendooway"):
                found.append(pid)
        return found

    pids = dw.wait_for(find, what=f"the frontend of mode {mode}")
    assert len(pids) == 1, pids
    return pids[0]


def _until(sock: socket.socket, marker: bytes, seconds: float = 20) -> bytes:
    got = b""
    sock.settimeout(seconds)
    while marker not in got:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"closed before {marker!r}: {got!r}")
        got += data
    return got


def _log_since(path: Path, start: int) -> str:
    return path.read_bytes()[start:].decode()


# ------------------------------------------------------------ SIGTERM to a per-connection frontend


@pytest.mark.parametrize("mode,sig", [("a", signal.SIGTERM), ("b", signal.SIGTERM),
                                      ("a", signal.SIGHUP)])
def test_sigterm_after_the_final_dot_passes_the_upstreams_answer_on(modes, world, mode, sig):
    """SIGTERM to xinetd's child (systemctl stop xinetd: a SIGTERM to the
    whole control group) after the message's final dot went upstream: the
    frontend waits for the upstream's answer, passes it on, logs the
    message, then says 421 4.3.2. Before the fix the process ended at once:
    the upstream delivered the message, the client never heard 250 (it
    sends it again: a duplicate) and the log had no line for it at all,
    where `sendooway -b` waits for that answer (a review). SIGHUP (`pkill
    -HUP sendooway`, which -b logs and ignores) did the same and now stops
    the session as SIGTERM does."""
    up = modes.upstream
    start = modes.logs[mode].stat().st_size
    count = len(up.messages)
    up.dot_seen.clear()
    up.answer_delay = 3.0
    try:
        with socket.create_connection(("127.0.0.1", modes.ports[mode]), timeout=20) as sock:
            sock.sendall(_login(world) + ENVELOPE)
            _until(sock, b"354 ")
            pid = _frontend_of(modes, mode)
            sock.sendall(b"Subject: stopped\r\n\r\nwhile the upstream thinks\r\n.\r\n")
            assert up.dot_seen.wait(10)
            os.kill(pid, sig)
            replies, ended = _read_all(sock, 15)
    finally:
        up.answer_delay = 0.0
    assert len(up.messages) == count + 1
    assert replies.startswith(b"250 2.0.0 queued as FAKE"), replies
    assert replies.endswith(b"421 4.3.2 Server shutting down, closing connection\r\n"), replies
    assert ended == "eof"
    log = _log_since(modes.logs[mode], start)
    assert re.search(r": message user=alice .* upstream=250 2\.0\.0 queued as FAKE", log), log


@pytest.mark.parametrize("mode", ["a", "b"])
def test_sigterm_in_mid_data_aborts_the_message_with_its_log_line(modes, world, mode):
    """SIGTERM to a per-connection frontend while the client sends the
    message text: the upstream never gets a final dot, the message has its
    one log line (aborted) and the session its closing line, and the client
    hears 421 4.3.2 instead of a silent close. Before the fix: a silent
    close and neither line."""
    up = modes.upstream
    start = modes.logs[mode].stat().st_size
    count = len(up.messages)
    with socket.create_connection(("127.0.0.1", modes.ports[mode]), timeout=20) as sock:
        sock.sendall(_login(world) + ENVELOPE)
        _until(sock, b"354 ")
        sock.sendall(b"Subject: cut\r\n\r\nhalf a mess")
        pid = _frontend_of(modes, mode)
        time.sleep(0.5)  # (the text reached the upstream: not needed for the outcome)
        os.kill(pid, signal.SIGTERM)
        replies, ended = _read_all(sock, 15)
    assert replies == b"421 4.3.2 Server shutting down, closing connection\r\n", replies
    assert ended == "eof"
    assert len(up.messages) == count
    log = _log_since(modes.logs[mode], start)
    assert re.search(r": message user=alice .* upstream=aborted", log), log
    assert "closed: cut by the stop" in log, log


@pytest.mark.parametrize("mode", ["a", "b"])
def test_sigterm_between_commands_says_421(modes, world, mode):
    """SIGTERM to a per-connection frontend waiting for a command: 421 4.3.2
    and a closing line at once (the stop must stay prompt: no grace here, the
    process serves no one else). Before the fix: a silent close, no line."""
    start = modes.logs[mode].stat().st_size
    with socket.create_connection(("127.0.0.1", modes.ports[mode]), timeout=20) as sock:
        sock.sendall(_login(world))
        _until(sock, b"235 ")
        os.kill(_frontend_of(modes, mode), signal.SIGTERM)
        replies, ended = _read_all(sock, 10)
    assert replies == b"421 4.3.2 Server shutting down, closing connection\r\n", replies
    assert ended == "eof"
    assert "server stopping: closing the session" in _log_since(modes.logs[mode], start)


# ------------------------------------------------------------ process hygiene of mode (a)


def _children_named(parent: int, name: str) -> list[int]:
    out = []
    for pid in dw.descendants(parent):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == name:
                    out.append(pid)
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    """The process exists (a zombie counts: nobody reaped it yet)."""
    return os.path.exists(f"/proc/{pid}")


def test_a_failed_implicit_tls_handshake_leaves_no_root_authenticator_behind(modes):
    """xinetd's root block with -s: a client whose TLS handshake fails (a
    plain-text client, a scanner) ended the session before it used its
    link to the private authenticator, and nothing closed that link: the
    frontend then waited 5 s for the root child to exit, the child waited
    for the link to close, and the client's connection stayed open all
    that time (a scanner kept a root process per connection). Now the
    unused link is closed first: by the time the client sees the close,
    the authenticator is gone (reaped)."""
    with socket.create_connection(("127.0.0.1", modes.ports["as"]), timeout=20) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello record's header: 512 octets due
        front = dw.wait_for(lambda: [p for p in _children_named(modes.xinetd.pid, "sendooway")
                                     if str(modes.logs["as"]) in dw.credentials(p)["cmdline"]],
                            what="the frontend")
        auth = dw.wait_for(lambda: _children_named(front[0], "sendooway-auth"),
                           what="its private authenticator")
        assert dw.credentials(auth[0])["Uid"][0] == 0
        sock.sendall(b"\r\n" * 256)  # no ClientHello: the handshake fails
        replies, ended = _read_all(sock, 20)
    assert ended == "eof" and replies.startswith(b"\x15"), replies  # a TLS alert, then the close
    assert [p for p in auth if _alive(p)] == []
    assert "TLS handshake failed" in modes.logs["as"].read_text()


# ------------------------------------------------------------ the differential


def _scripts(world) -> dict[str, list]:
    login = _login(world)
    text = b"Subject: differential\r\n\r\n..a dot-stuffed line\r\nhello\r\n.\r\n"
    return {
        # pipelined burst: login, two messages (one recipient refused
        # upstream), an unrouted sender, RSET, QUIT
        "pipelined": [login + ENVELOPE, ("until", b"354 "), text
                      + b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<refused@example.net>\r\n"
                      b"RCPT TO:<carol@example.net>\r\nDATA\r\n", ("until", b"354 "),
                      b"x\r\n.\r\nMAIL FROM:<mallory@example.com>\r\nRCPT TO:<b@example.net>\r\n"
                      b"DATA\r\nRSET\r\nQUIT\r\n"],
        # one byte a write; an over-long line, NUL, bare CR and bare LF
        "bytewise_junk": [bytes([c]) for c in b"EHLO c.test\r\nNOOP\r\n"]
        + [b"NOOP " + b"x" * 600 + b"\r\nNO\0OP\r\nNOOP\rx\r\nNOOP\nNOOP\r\nQUIT\r\n"],
        # STARTTLS with a command injected behind it, then half-closed
        "starttls_injected": [b"EHLO c.test\r\nSTARTTLS\r\nNOOP\r\n", ("until", b"250 2.0.0"),
                              ("shut",)],
        # the client half-closes in mid-DATA: the message is dropped
        "shut_in_data": [login + ENVELOPE, ("until", b"354 "), b"Subject: half\r\n\r\nhal",
                         ("shut",)],
        # the client half-closes right after the final dot (`nc -N`): the
        # message goes and the client still hears its 250
        "shut_after_dot": [login + ENVELOPE, ("until", b"354 "), b"Subject: nc\r\n\r\nn\r\n.\r\n",
                           ("shut",)],
        # the client half-closes in mid-command
        "shut_in_command": [login + b"NOO", ("until", b"235 "), ("shut",)],
        # the client resets the connection in mid-DATA
        "reset_in_data": [login + ENVELOPE, ("until", b"354 "), b"Subject: reset\r\n\r\nha",
                          ("rst",)],
        # a 4 MB message (lines of 998 octets, one starting with a dot)
        "huge": [login + ENVELOPE, ("until", b"354 "), b"Subject: big\r\n\r\n..dot\r\n"
                 + (b"y" * 998 + b"\r\n") * 4000 + b".\r\nQUIT\r\n"],
        # the upstream of the sender is down; then another sender's message goes
        "upstream_down": [login + b"MAIL FROM:<down@example.org>\r\n", ("until", b" 4.4.1 "),
                          b"RSET\r\n" + ENVELOPE, ("until", b"354 "),
                          b"after the refusal\r\n.\r\nQUIT\r\n"],
    }


@pytest.mark.parametrize("name", ["pipelined", "bytewise_junk", "starttls_injected",
                                  "shut_in_data", "shut_in_command", "reset_in_data",
                                  "upstream_down", "huge", "shut_after_dot"])
def test_the_three_modes_answer_deliver_and_log_alike(modes, world, name):
    """The same session through xinetd's root block (private authenticator),
    its nobody block (daemon) and `sendooway -b`: the same replies, the same
    messages upstream (never a half one), the same session log lines."""
    modes.upstream.reject_rcpt.add("refused@example.net")
    script = _scripts(world)[name]
    seen = {}
    for mode in "abc":
        start = modes.logs[mode].stat().st_size
        count = len(modes.upstream.messages)
        replies, ended = run_script(modes.ports[mode], script)
        got = [(m.rcpt_tos, re.sub(rb"^Received: .*?\r\n(?![ \t])", b"", m.data, flags=re.S))
               for m in modes.upstream.messages[count:]]
        # the closing line is written as the session ends, maybe after our EOF
        lines = dw.wait_for(lambda: (lambda ls: ls if ls and "closed: " in ls[-1] else None)(
            session_lines(_log_since(modes.logs[mode], start))), what="the closing line")
        seen[mode] = (normalise(replies), ended, got, lines)
    assert seen["a"] == seen["b"] == seen["c"]
    replies, ended, got, lines = seen["a"]
    assert ended == ("rst" if name == "reset_in_data" else "eof")
    if name == "pipelined":
        assert got == [(["bob@example.net"],
                        b"Subject: differential\r\n\r\n.a dot-stuffed line\r\nhello\r\n"),
                       (["carol@example.net"], b"x\r\n")]
        assert sum(l.startswith(" message user=alice ") for l in lines) == 2
    elif name == "shut_after_dot":
        assert got == [(["bob@example.net"], b"Subject: nc\r\n\r\nn\r\n")]
        assert replies.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"
                                b"250 2.0.0 queued as FAKE\r\n"), replies
    elif name == "huge":
        assert got == [(["bob@example.net"], b"Subject: big\r\n\r\n.dot\r\n"
                        + (b"y" * 998 + b"\r\n") * 4000)]
    elif name == "upstream_down":
        assert got == [(["bob@example.net"], b"after the refusal\r\n")]
        assert re.search(rb"\r\n4\d\d 4\.\d\.\d [^\r]*\r\n250 2\.0\.0 OK", replies), replies
    else:
        assert got == []
    if name in ("shut_in_data", "reset_in_data"):
        assert any("upstream=aborted, no final dot sent" in l for l in lines), lines


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def _listening_inodes() -> set[str]:
    """The socket inodes of every listening TCP and UNIX socket."""
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as f:
            for row in list(f)[1:]:
                cols = row.split()
                if cols[3] == "0A":  # LISTEN
                    found.add(cols[9])
    with open("/proc/net/unix") as f:
        for row in list(f)[1:]:
            cols = row.split()
            if int(cols[3], 16) & 0x10000:  # __SO_ACCEPTCON
                found.add(cols[6])
    return found


@pytest.mark.parametrize("end", ["quit", "rst_in_data", "sigkill", "sigterm_in_data"])
def test_mode_a_leaves_nothing_running_and_holds_nothing_it_should_not(modes, world, end):
    """xinetd's root block: while a session runs, the frontend is nobody
    through and through (four uids and gids, no groups, no capabilities)
    and holds neither the config, the key nor a listening socket; its
    root authenticator (and that one's helpers) hold no copy of the client's
    socket. However the session ends (QUIT, a reset in mid-DATA, the
    frontend SIGKILLed or SIGTERMed), every process it had is gone."""
    with socket.create_connection(("127.0.0.1", modes.ports["a"]), timeout=20) as sock:
        sock.sendall(_login(world) + ENVELOPE)
        _until(sock, b"354 ")
        sock.sendall(b"Subject: hygiene\r\n\r\nhalf")
        front = _frontend_of(modes, "a")
        helpers = dw.descendants(front)
        assert helpers, "no private authenticator"
        st = _status(front)
        assert st["Uid"].split() == [str(dw.NOBODY_UID)] * 4
        assert st["Gid"].split() == [str(dw.NOBODY_UID)] * 4
        assert st["Groups"].split() in ([], [str(dw.NOBODY_UID)])
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
        fds = _fds(front)
        client = fds[0]
        assert client.startswith("socket:") and fds[1] == client
        assert not {str(modes.dep.config), str(modes.dep.root / "sendooway-a.conf"),
                    str(modes.dep.key)} & set(fds.values()), fds
        listening = {f"socket:[{i}]" for i in _listening_inodes()}
        assert not listening & set(fds.values()), fds
        for pid in helpers:
            assert client not in _fds(pid).values(), (pid, _fds(pid))
        if end == "quit":
            sock.sendall(b"\r\n.\r\nQUIT\r\n")
            _until(sock, b"221 ")
        elif end == "rst_in_data":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif end == "sigkill":
            os.kill(front, signal.SIGKILL)
        else:
            os.kill(front, signal.SIGTERM)
            _until(sock, b"421 4.3.2")
    dw.wait_for(lambda: not [p for p in [front, *helpers] if _alive(p)], timeout=15,
                what="the session's processes to be gone")


# ------------------------------------------------------------ stdin and stdout


def _stdio_session(modes: Modes, world, close_fd: int | None = None, stdout=None):
    """`sendooway` as root on mode (a)'s config, a whole session piped into
    its stdin (the original's test scripts' way); fd `close_fd` closed
    before it starts. (exit status, what came to the stdout pipe, its new
    log text, the messages the upstream got)."""
    log = modes.logs["a"]
    start = log.stat().st_size
    count = len(modes.upstream.messages)
    session = _login(world) + ENVELOPE + b"Subject: piped\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    proc = subprocess.run(
        [command("sendooway"), "-c", str(modes.dep.root / "sendooway-a.conf"), "-l", str(log)],
        env=modes.dep.env, input=session, stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE, timeout=60,
        preexec_fn=None if close_fd is None else (lambda: os.close(close_fd)))
    return (proc.returncode, proc.stdout or b"", _log_since(log, start),
            modes.upstream.messages[count:])


def test_a_piped_session_on_separate_stdin_and_stdout_works(modes, world):
    """stdin and stdout two pipes (not inetd's one socket): the session runs
    as through xinetd, the message goes upstream and is logged."""
    code, out, log, got = _stdio_session(modes, world)
    assert code == 0
    assert out.startswith(b"220 ") and b"250 2.0.0 queued as FAKE" in out and out.endswith(b"221 2.0.0 Bye\r\n")
    assert len(got) == 1
    assert re.search(r": message user=alice .* upstream=250 2\.0\.0 queued as FAKE", log), log


def test_a_closed_stdout_is_a_startup_error_not_replies_in_the_log(modes, world):
    """`sendooway >&-` (stdout closed, as a script or a supervisor may start
    it): the log file, opened first, took fd 1, and the session wrote its
    SMTP replies into the log (with syslog: into syslog's socket) while it
    relayed the message of a client that never heard one. Now a closed
    fd 0, 1 or 2 is /dev/null at once, and without -b a closed stdin or
    stdout is a start-up error in the log: nothing is relayed."""
    code, _out, log, got = _stdio_session(modes, world, close_fd=1, stdout=subprocess.DEVNULL)
    assert "220 proxy.test" not in log and "235 2.7.0" not in log, log
    assert got == []
    assert code == 1
    assert "cannot start: stdout closed: no SMTP client to serve" in log, log


def test_a_closed_stderr_changes_nothing(modes, world):
    """fd 2 closed: the session is served as with it open."""
    code, out, log, got = _stdio_session(modes, world, close_fd=2)
    assert code == 0 and out.endswith(b"221 2.0.0 Bye\r\n") and len(got) == 1


def test_a_stdout_whose_reader_went_away_is_logged_without_a_traceback(modes, world):
    """stdout a pipe whose reader goes away after the 354 (EPIPE): the
    message the client sent whole still goes upstream (the frontend cannot
    know before its next write that nobody reads) and keeps its log line
    with the upstream's answer; the failed write is logged, no traceback,
    exit 0. (Pinned as found: nothing to fix.)"""
    log = modes.logs["a"]
    start = log.stat().st_size
    count = len(modes.upstream.messages)
    proc = subprocess.Popen(
        [command("sendooway"), "-c", str(modes.dep.root / "sendooway-a.conf"), "-l", str(log)],
        env=modes.dep.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(_login(world) + ENVELOPE)
        proc.stdin.flush()
        got = b""
        while b"354 " not in got:
            data = os.read(proc.stdout.fileno(), 4096)
            assert data, got
            got += data
        proc.stdout.close()
        proc.stdin.write(b"Subject: unheard\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    proc.stderr.close()
    text = _log_since(log, start)
    assert len(modes.upstream.messages) == count + 1
    assert re.search(r": message user=alice .* upstream=250 2\.0\.0 queued as FAKE", text), text
    assert "write failed" in text, text
    assert "Traceback" not in text and b"Traceback" not in err, (text, err)


@pytest.mark.parametrize("passing", ["--inetd", "LISTEN_FDS"])
def test_sigterm_to_a_systemd_accept_yes_session_says_421_and_finishes_the_message(
        modes, world, passing):
    """systemd's Accept=yes (systemd-socket-activate --accept), the
    connection on stdin/stdout or as fd 3: a SIGTERM (systemctl stop, a
    shutdown) while the upstream holds its answer to the final dot is
    answered as under xinetd: the upstream's 250, then 421 4.3.2, and the
    message's log line. It ended at once before the fix, the message
    delivered unheard and unlogged."""
    if not shutil.which("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate not installed")
    up = modes.upstream
    log = modes.logs["a"]
    start = log.stat().st_size
    count = len(up.messages)
    port = dw.free_tcp_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--accept",
         *(["--inetd"] if passing == "--inetd" else []),
         *[a for k, v in modes.dep.env.items() if re.match(r"(LD_|NSS_|PAM_|PATH$)", k)
           for a in ("-E", f"{k}={v}")],
         command("sendooway"), "-c", str(modes.dep.root / "sendooway-a.conf"), "-l", str(log)],
        env=modes.dep.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    up.dot_seen.clear()
    up.answer_delay = 3.0
    try:
        dw.wait_for(lambda: dw.listening(port, proc), what="systemd-socket-activate")
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(_login(world) + ENVELOPE)
            _until(sock, b"354 ")
            front = dw.wait_for(lambda: [p for p in dw.descendants(proc.pid)
                                         if dw.credentials(p)["Uid"][0] == dw.NOBODY_UID],
                                what="the frontend")
            sock.sendall(b"Subject: accept=yes\r\n\r\nstopped\r\n.\r\n")
            assert up.dot_seen.wait(10)
            os.kill(front[0], signal.SIGTERM)
            replies, ended = _read_all(sock, 15)
    finally:
        up.answer_delay = 0.0
        dw.stop(proc)
    assert len(up.messages) == count + 1
    assert replies.startswith(b"250 2.0.0 queued as FAKE"), replies
    assert replies.endswith(b"421 4.3.2 Server shutting down, closing connection\r\n"), replies
    assert ended == "eof"
    assert re.search(r": message user=alice .* upstream=250 2\.0\.0 queued as FAKE",
                     _log_since(log, start))


@pytest.mark.parametrize("client", ["tls", "plain"])
def test_the_three_modes_serve_implicit_tls_alike(modes, world, client):
    """-s (port 465) through xinetd's two blocks and `sendooway -b -s`: a TLS
    client's whole session, and a plain-text client on the TLS port (its
    handshake fails, the connection closes), answer and log alike."""
    ctx = world.ssl_context()
    seen = {}
    for mode in ("as", "bs", "cs"):
        start = modes.logs[mode].stat().st_size
        count = len(modes.upstream.messages)
        with socket.create_connection(("127.0.0.1", modes.ports[mode]), timeout=20) as raw:
            if client == "tls":
                with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                    sock.sendall(_login(world) + ENVELOPE)
                    replies = _until(sock, b"354 ")
                    sock.sendall(b"Subject: 465\r\n\r\nimplicit\r\n.\r\nQUIT\r\n")
                    replies += _until(sock, b"221 ")
            else:
                raw.sendall(b"EHLO c.test\r\n")
                replies, ended = _read_all(raw, 10)
                assert ended == "eof", replies
        lines = dw.wait_for(lambda: (lambda ls: ls if ls and re.search(
            "closed: |TLS handshake failed", ls[-1]) else None)(
            session_lines(_log_since(modes.logs[mode], start))), what="the last line")
        seen[mode] = (normalise(replies), len(modes.upstream.messages) - count, lines)
    assert seen["as"] == seen["bs"] == seen["cs"]
    assert seen["as"][1] == (1 if client == "tls" else 0)


def test_the_three_modes_time_an_idle_client_out_alike(modes, world):
    """A client that logs in and then says nothing for longer than `timeout`
    (4 s here): 421 4.4.2 and the same closing line in every mode (the three
    sessions run side by side)."""
    seen = {}

    def one(mode: str) -> None:
        start = modes.logs[mode].stat().st_size
        replies, ended = run_script(modes.ports[mode], [_login(world), ("until", b"235 "),
                                                        ("until", b"421 ")])
        lines = dw.wait_for(lambda: (lambda ls: ls if ls and "closed: " in ls[-1] else None)(
            session_lines(_log_since(modes.logs[mode], start))), what="the closing line")
        seen[mode] = (replies, ended, lines)

    threads = [threading.Thread(target=one, args=(mode,)) for mode in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen["a"] == seen["b"] == seen["c"]
    replies, ended, lines = seen["a"]
    assert replies.endswith(b"235 2.7.0 Authentication successful\r\n"
                            b"421 4.4.2 Timeout waiting for input, closing connection\r\n")
    assert ended == "eof"
    assert lines[-1].endswith("closed: timeout"), lines


def test_the_three_modes_refuse_wrong_passwords_up_to_max_auth_failures_alike(modes, world):
    """maxAuthFailures (3) wrong passwords: 535, 535, then 421 and the close,
    in every mode. Mode (a)'s authenticator holds each refusal back by its
    failure delay (1, 2, 4 s: the default, which a private one always has);
    the third outlasted the frontend's `timeout` (4 s here), and the
    client heard 454 "temporary authentication failure" and 421
    "authentication service not available" for a wrong password, logged as
    an authenticator that does not answer. Now the frontend waits for an
    auth answer `timeout` plus what the authenticator may hold one back
    (padding and failure delay, shared/protocol.py)."""
    bad = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0not-her-password") + b"\r\n"
    seen = {}
    for mode in "abc":
        start = modes.logs[mode].stat().st_size
        steps = [b"EHLO c.test\r\n" + bad, ("until", b"535 "), bad, ("until", b"535 5.7.8 A"), bad,
                 ("until", b"\r\n")]
        replies, ended = run_script(modes.ports[mode], steps)
        lines = dw.wait_for(lambda: (lambda ls: ls if ls and "closed: " in ls[-1] else None)(
            session_lines(_log_since(modes.logs[mode], start))), what="the closing line")
        seen[mode] = (replies, ended, lines)
        # (a success clears the backoff of alice and of this address for the next tests)
        run_script(modes.ports[mode], [_login(world), ("until", b"235 "), b"QUIT\r\n"])
    assert seen["a"] == seen["b"] == seen["c"]
    replies, ended, lines = seen["a"]
    assert replies.endswith(b"535 5.7.8 Authentication credentials invalid\r\n" * 2
                            + b"421 4.7.0 Too many authentication failures, closing connection\r\n")
    assert ended == "eof"
    assert lines[-1].endswith("closed: too many authentication failures"), lines

