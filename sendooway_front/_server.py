"""The ways sendooway meets its clients: one session on stdin/stdout
(inetd, xinetd, systemd Accept=yes with StandardInput=socket), a listening
server (-b, systemd Accept=no), one socket-activated connection (Accept=yes
without StandardInput=socket). All of them run SessionRunner."""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import logging
import os
import resource
import select
import signal
import socket
import stat
import threading
from dataclasses import dataclass

from sendooway_shared.cli import listen_fds
from sendooway_shared.log import Tally, quiet_accept_errors
from sendooway_shared.types import port_number

from . import _catalogue as R
from . import _loops
from ._driver import Frontend, SessionRunner, describe_peer
from ._limits import AddressLimit
from ._pool import close_shared_pool
from ._proxyproto import unmapped
from ._stream import LfAsCrlf, Stream, set_nodelay

SD_LISTEN_FDS_START = 3
SHUTDOWN_GRACE = 30.0  # seconds running sessions get after SIGTERM
MAX_SESSIONS = 4000    # at once in one listening process (sendooway-auth takes as many)
log = logging.getLogger("sendooway")

# Modules the serving process may need after the privilege drop, when the
# installation tree may no longer be readable: imported now, while still root.
PRELOAD = (
    "encodings.idna", "encodings.ascii", "encodings.latin_1", "stringprep", "unicodedata",
    "asyncio.unix_events", "asyncio.selector_events", "asyncio.sslproto", "selectors",
    "concurrent.futures.thread",  # the loop's executor (getaddrinfo): asyncio imports it late
    "logging.handlers", "base64", "binascii", "hmac", "hashlib", "ipaddress", "email.utils",
    "ssl", "ctypes", "OpenSSL.SSL", "OpenSSL.crypto", "OpenSSL._util",
    "cryptography.x509", "cryptography.hazmat.bindings.openssl.binding",
    "service_identity", "service_identity.pyopenssl", "service_identity.hazmat",
    "msgpack", "idna", "idna.core", "idna.idnadata", "idna.uts46data",
    "sendooway_front._session", "sendooway_shared.smtp_syntax",
    "sendooway_front._catalogue", "sendooway_front._authlink",
    "sendooway_front._tls", "sendooway_front._stream", "sendooway_front._driver",
    "sendooway_front._relay", "sendooway_front._upstream", "sendooway_front._pool",
    "sendooway_front._proxyproto", "sendooway_front._limits",
)


_early: set[int] = set()


def catch_early_signals() -> None:
    """Until serve_listening takes them over, SIGTERM, SIGINT and SIGHUP are
    noted instead of killing a server still starting (a service manager
    stopping it at once): then it stops cleanly, or says what SIGHUP does."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: _early.add(signum))


def stop_requested() -> bool:
    """A SIGTERM or SIGINT arrived before serve_listening took them over."""
    return bool(_early & {signal.SIGTERM, signal.SIGINT})


def preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    "preload".encode("idna")  # the codec machinery, not only the module
    from OpenSSL import SSL

    SSL.Context(SSL.TLS_SERVER_METHOD)  # cffi bindings fully initialised


# ------------------------------------------------------------ addresses


class BindError(Exception):
    """A -b value or address that cannot be listened on."""


def parse_bind(value: str) -> tuple[str | None, int]:
    """'587' → (None, 587); '127.0.0.1:587', '[::1]:587', 'host:587';
    'submission', '127.0.0.1:smtps' (service names). An IPv4-mapped
    address ('[::ffff:192.0.2.1]:587') is the IPv4 address: bound as such
    (an IPv6 socket of ours cannot take it: V6ONLY)."""
    host: str | None
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1:end + 2] != ":":
            raise BindError(f"-b {value}: expected [ADDRESS]:PORT")
        host, port_text = value[1:end], value[end + 2:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif ":" in value:
        raise BindError(f"-b {value}: write an IPv6 address as [ADDRESS]:PORT")
    else:
        host, port_text = None, value
    if host and ":" in host:
        try:  # ::ffff:a.b.c.d, as ss and netstat show IPv4 on a dual-stack socket
            mapped = unmapped(ipaddress.IPv6Address(host))
        except ValueError:
            mapped = None
        if mapped is not None and mapped.version == 4:
            host = str(mapped)
    try:  # a number or a service name (`-b submission`), as the original took
        port = port_number(port_text)
    except ValueError:
        raise BindError(f"-b {value}: the port must be a number from 1 to 65535"
                        " or a service name such as submission") from None
    return (host or None), port


def listen_sockets(host: str | None, port: int) -> list[socket.socket]:
    """Listening sockets for -b: all addresses (IPv6 and IPv4) when no host."""
    if host is None:
        try:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            return [_bind(s, ("::", port))]
        except OSError:
            return [_bind(socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port))]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"-b {host}:{port}: {exc.strerror}") from None
    out, seen = [], set()
    for family, type_, proto, _c, addr in infos:
        if (family, addr[:2]) in seen:
            continue
        seen.add((family, addr[:2]))
        s = socket.socket(family, type_, proto)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        out.append(_bind(s, addr))
    return out


def _bind(s: socket.socket, addr) -> socket.socket:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(512)
    except OSError as exc:
        s.close()
        raise BindError(f"cannot listen on {describe_peer(addr)}: {exc.strerror}") from None
    s.setblocking(False)
    return s


@dataclass
class Activation:
    """What systemd passed: listening sockets (Accept=no) or one connection."""

    listening: list[socket.socket]
    connection: socket.socket | None


class ActivationError(Exception):
    """What systemd passed cannot be served; the message says why."""


def socket_activated() -> bool:
    """Are the LISTEN_* variables meant for this process (sd_listen_fds(3):
    LISTEN_PID is our pid) and do they pass anything (LISTEN_FDS=0 does
    not, nor 00: sd_listen_fds reads a number)? Those of another (a
    socket-activated parent's, left in the environment) are not ours."""
    passed = listen_fds()
    return passed is not None and passed[1] != 0


def activated_sockets() -> Activation | None:
    """Sockets from systemd (LISTEN_PID/LISTEN_FDS), or None. The variables
    are removed either way (children never see them). Every descriptor
    passed must be a TCP or UNIX stream socket, listening (Accept=no) or
    connected (Accept=yes), else ActivationError: a unit passing something
    else (ListenDatagram=, a FIFO, a LISTEN_FDS larger than what is open)
    is refused at start, not served in part or with a traceback."""
    passed = listen_fds()
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if passed is None:
        return None
    text, count = passed
    if count is None or len(text) > 9:
        raise ActivationError(f"LISTEN_FDS={text[:20]!r} is not a number of sockets")
    if count < 1:
        return None
    listening, connection = [], None
    taken: list[socket.socket] = []

    def refuse(fd: int, why: str) -> ActivationError:
        for s in taken:
            s.close()
        what = "no usable socket" if count == 1 else f"{count} descriptors"
        return ActivationError(f"systemd passed {what}: fd {fd} {why}")

    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:  # stop at the first: a huge LISTEN_FDS ends here
            raise refuse(fd, "is not open") from None
        if not stat.S_ISSOCK(mode):
            raise refuse(fd, "is not a socket")
        s = socket.socket(fileno=fd)
        taken.append(s)
        os.set_inheritable(fd, False)
        if s.type != socket.SOCK_STREAM or s.family not in (
                socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            raise refuse(fd, "is not a TCP or UNIX stream socket (ListenStream= is what"
                             " sendooway serves)")
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            s.setblocking(False)
            listening.append(s)
            continue
        try:
            s.getpeername()
        except OSError:
            raise refuse(fd, "is neither listening nor connected") from None
        if connection is not None:
            raise refuse(fd, "is a second connection (Accept=yes passes one)")
        connection = s
    if listening and connection is not None:
        raise refuse(connection.fileno(), "is a connection among listening sockets")
    return Activation(listening, connection)


# ------------------------------------------------------------ modes


def _hangup() -> None:
    """SIGHUP to a listening frontend (an admin's reload habit): it cannot
    re-read its config or its key as frontendUser, so it says so and serves on."""
    log.warning("SIGHUP ignored: sendooway -b reads its config (and TLS key) only at start,"
                " before dropping privileges; restart it to apply changes")


def _hangup_soon(loop: asyncio.AbstractEventLoop) -> None:
    """SIGHUP's handler: _hangup on the loop, or nothing once it is closed
    (the server stopping)."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(_hangup)


async def _wind_down(frontend: Frontend, tasks: set, runners: set, task_of: dict,
                     grace: float) -> None:
    """After SIGTERM/SIGINT: the running sessions (`tasks`, each running
    the runner `task_of` maps to it) may go on for `grace` seconds; then a
    client between two commands gets 421 4.3.2 and the rest is cut 2 s
    later, except a session whose final dot went upstream: it waits for the
    upstream's answer first. A second SIGTERM/SIGINT ends every wait."""
    loop = asyncio.get_running_loop()
    # a second SIGTERM/SIGINT: no more waiting for anyone
    hurry = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, hurry.set)
    hurried = asyncio.ensure_future(hurry.wait())

    async def still_running(these: set, seconds: float) -> set:
        """Wait until `these` are done, `seconds` passed or a second signal
        came; those still running."""
        deadline = loop.time() + seconds
        left = {t for t in these if not t.done()}
        while left and not hurry.is_set() and (remaining := deadline - loop.time()) > 0:
            done, _ = await asyncio.wait(left | {hurried}, timeout=remaining,
                                         return_when=asyncio.FIRST_COMPLETED)
            left -= done
        return {t for t in left if not t.done()}

    if tasks:
        pending = await still_running(set(tasks), grace)
        if pending:
            # the grace is over: "421 4.3.2 shutting down" to every client
            # between two commands (not a silent close), the rest is cut
            for runner in list(runners):
                runner.request_stop()
            pending = await still_running(pending, 2)
        # A message whose final dot went upstream waits for its answer (the
        # dot's write and the answer's read: at most `timeout` each): cut
        # now, the upstream may deliver it while the client hears nothing
        # and sends it again (a review). A second signal cuts it anyway.
        answering = {task_of[r] for r in list(runners) if r.awaiting_final_reply} & pending
        if answering and not hurry.is_set():
            log.info("stopping: %d sessions wait for the upstream's answer to a message"
                     " (a second SIGTERM cuts them)", len(answering))
            await still_running(answering, 2 * frontend.config.timeout + 1)
            pending = {t for t in pending if not t.done()}
        for t in pending:
            t.cancel()
        if pending:
            log.info("stopping: %d sessions cut %s", len(pending),
                     "(a second signal)" if hurry.is_set() else f"after {grace}s")
            await asyncio.wait(pending, timeout=5)
    hurried.cancel()


async def serve_one(frontend: Frontend, stream: Stream, peer: str) -> None:
    """The one session of a per-connection process (inetd, xinetd, systemd
    Accept=yes). SIGTERM/SIGINT/SIGHUP stop it as `sendooway -b` stops its
    sessions, with no grace (the process serves no one else, and whoever
    stops it wants it gone): 421 4.3.2 between two commands, a message in
    mid-DATA cut without its final dot (and logged), one whose final dot
    went upstream first gets the upstream's answer. The process used to end
    at once: the upstream could deliver that message while the client never
    heard it and there was no log line for it (a differential review)."""
    loop = asyncio.get_running_loop()
    runner = SessionRunner(frontend, stream, peer)
    task = asyncio.ensure_future(runner.run())
    stop = asyncio.Event()
    # SIGHUP too: `pkill -HUP sendooway` (an admin's reload habit; -b logs
    # and ignores it) or a terminal that went away ended the session at
    # once, with the same loss as SIGTERM did
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            log.info("stopping on a signal: the session ends")
            await _wind_down(frontend, {task}, {runner}, {runner: task}, 0)
            if not task.done():  # (it did not end within the wait for it)
                task.cancel()
    finally:
        stopped.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
    await asyncio.wait({task})


async def serve_stdio(frontend: Frontend) -> None:
    """One session on fd 0 (input) and fd 1 (output)."""
    peer = ""
    try:
        s = socket.socket(fileno=os.dup(0))
        try:
            set_nodelay(s)
            peer = describe_peer(s.getpeername())
            _loops.serving(s)
        except OSError:
            pass
        finally:
            s.close()
    except OSError:
        pass
    bridges: list = []
    rfd = _streamable(0, reading=True, bridges=bridges)
    wfd = _streamable(1, reading=False, bridges=bridges)
    stream = await Stream.from_fds(rfd, wfd, frontend.config.timeout)
    # Not a socket: a terminal, a pipe or a file (`sendooway -c /dev/null
    # -l '&2'` by hand, the original's test scripts piping `echo` lines).
    # Their LF line ends are read as CRLF; a network client's bare LF is
    # still refused (inetd, xinetd and systemd give a socket).
    if not stat.S_ISSOCK(os.fstat(0).st_mode):
        stream.lf_lines = LfAsCrlf()
    await serve_one(frontend, stream, peer)
    await close_shared_pool()
    for fd in {rfd, wfd} - {0, 1}:
        try:
            os.close(fd)
        except OSError:
            pass
    for t in bridges:
        t.join(5)


def _pollable(fd: int) -> bool:
    """Can epoll watch `fd`? (Not /dev/null: EPERM.)"""
    with select.epoll() as ep:
        try:
            ep.register(fd, select.EPOLLIN)
        except OSError:
            return False
    return True


def _streamable(fd: int, reading: bool, bridges: list) -> int:
    """`fd` itself when asyncio can poll it (pipe, socket, tty); for a regular
    file (`sendooway < in > out`) or a device epoll refuses (/dev/null,
    a unit's StandardInput=null) a pipe fed or drained by a thread."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and _pollable(fd)):
        return fd
    r, w = os.pipe()

    def pump(src: int, dst: int) -> None:
        try:
            while True:
                data = os.read(src, 65536)
                if not data:
                    break
                os.write(dst, data)
        except OSError:
            pass
        finally:
            os.close(w if reading else r)

    t = threading.Thread(target=pump, args=(fd, w) if reading else (r, fd), daemon=True)
    t.start()
    bridges.append(t)
    return r if reading else w


async def serve_connection(frontend: Frontend, sock: socket.socket) -> None:
    """One session on an already connected socket (systemd Accept=yes)."""
    try:
        peer = describe_peer(sock.getpeername())
        _loops.serving(sock)
    except OSError:
        peer = ""
    stream = await Stream.from_socket(sock, frontend.config.timeout)
    await serve_one(frontend, stream, peer)
    await close_shared_pool()


def session_limit() -> int:
    """How many sessions one listening process takes at once: each needs
    two descriptors (client, authenticator) and maybe an upstream. Raises
    the soft RLIMIT_NOFILE to the hard one first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    usable = 65536 if soft == resource.RLIM_INFINITY else soft
    return max(8, min(MAX_SESSIONS, (usable - 64) // 3))


async def serve_listening(frontend: Frontend, sockets: list[socket.socket],
                          grace: float = SHUTDOWN_GRACE, max_sessions: int | None = None) -> None:
    """Accept sessions until SIGTERM/SIGINT; then stop accepting and give the
    running sessions `grace` seconds to finish. Beyond `max_sessions` at
    once, a new client gets a 421 greeting. SIGHUP is logged and changes
    nothing: the config and the key were read before the privilege drop."""
    if max_sessions is None:
        max_sessions = session_limit()
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop, log)
    stop = asyncio.Event()
    tasks: set[asyncio.Task] = set()
    runners: set[SessionRunner] = set()
    task_of: dict[SessionRunner, asyncio.Task] = {}
    frontend.per_address = AddressLimit(frontend.config.maxSessionsPerAddress)
    # one line per burst: a client reconnecting in a loop wrote one per try
    refused = Tally(log, "%d sessions running (limit %d): refusing %s with 421;"
                    " %d refused since the last such line")

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(tasks) >= max_sessions:
            refused.note(len(tasks), max_sessions, describe_peer(writer.get_extra_info("peername")))
            writer.write(R.TOO_MANY_SESSIONS.to_bytes())
            writer.close()
            return
        tasks.add(task)
        runner = None
        try:
            stream = Stream(reader, writer, frontend.config.timeout)
            runner = SessionRunner(frontend, stream, describe_peer(writer.get_extra_info("peername")))
            runners.add(runner)
            task_of[runner] = task
            await runner.run()
        finally:
            tasks.discard(task)
            runners.discard(runner)
            task_of.pop(runner, None)

    servers = []
    served = []
    for s in sockets:
        served.append(_loops.serving(s))
        # backlog: asyncio listens again (default 100, undoing listen(512))
        servers.append(await asyncio.start_server(on_client, sock=s, limit=128 * 1024, backlog=512))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP by a plain handler, not add_signal_handler: loop.close() gives a
    # signal it handled back to SIG_DFL (death), and a SIGHUP in the moment
    # between that and main()'s SIG_IGN killed a stopping server
    signal.signal(signal.SIGHUP, lambda _signum, _frame: _hangup_soon(loop))
    if _early & {signal.SIGTERM, signal.SIGINT}:
        stop.set()  # asked to stop while starting up
    if signal.SIGHUP in _early:
        _hangup()
    where = ", ".join(describe_peer(s.getsockname()) for s in sockets)
    log.info("listening on %s", where)
    try:
        await stop.wait()
        log.info("stopping: no new sessions, %d running", len(tasks))
        refused.close()  # (what they had not told yet)
        frontend.per_address.refused.close()
        for srv in servers:
            srv.close()
        await _wind_down(frontend, tasks, runners, task_of, grace)
        await close_shared_pool()  # the smarthostCache's idle upstream connections: QUIT
    finally:
        # also when cancelled (an in-process server of the tests): an address
        # left here made a later upstream on that port "this server" (451)
        for key in served:
            _loops.unserve(key)
    log.info("stopped")
