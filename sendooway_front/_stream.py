"""A byte stream that can turn into TLS halfway (STARTTLS) — both sides use it.

`Stream` moves bytes over an asyncio (reader, writer) pair; after
start_tls_server/start_tls_client the same calls carry TLS, run by pyOpenSSL
over memory BIOs (so any transport works: TCP, a pipe pair under inetd).
`timeout` (seconds, None = none) bounds every read, write drain and
handshake; an expired one raises TimeoutError.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import socket

from OpenSSL import SSL

from sendooway_shared.smtp_syntax import host_a_label

from . import _tls
from ._tls import TLSHandshakeError, TLSVerifyError

RAW_READ = 256 * 1024  # bytes asked of the transport at once
# asyncio pauses reading the socket once 2 x READER_LIMIT octets wait unread:
# a session's input buffer stays near RAW_READ however fast the client sends.
READER_LIMIT = RAW_READ // 2
TLS_BATCH = 256 * 1024  # plaintext octets encrypted before the records are sent
WRITE_BUFFER_HIGH = 256 * 1024  # unsent bytes kept before a write waits for the peer
CONNECT_TRY = 10.0  # seconds one address may take while others are left to try
# Name lookups (getaddrinfo, blocking, in a thread) of one user at once, and
# threads for them in all. A user's route may name a host whose name servers
# never answer: each lookup then holds its thread for the resolver's whole
# timeout (5 s x 2 tries x each server), after our own `timeout` gave up on
# it. In the loop's default executor (CPUs + 4 threads: 6 here) a few of his
# sessions held every thread and everyone's lookups queued behind them (an
# insider review). A turn is given back when the thread is done, not when
# the session stops waiting for it.
LOOKUPS_PER_USER = 2
LOOKUP_THREADS = 32


def set_nodelay(sock: socket.socket | None) -> None:
    """TCP_NODELAY on a TCP socket (Nagle + delayed ACK cost ~40 ms a handshake)."""
    if sock is None:
        return
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class LfAsCrlf:
    """Input whose lines end in LF (a terminal, `echo` into a pipe) made
    CRLF, read by read: every LF that no CR precedes becomes CRLF, also when
    a CRLF is split between two reads; a bare CR stays bare."""

    def __init__(self) -> None:
        self._after_cr = False

    def feed(self, data: bytes) -> bytes:
        lead = b""
        if self._after_cr and data[:1] == b"\n":  # the LF of a split CRLF
            lead, data = b"\n", data[1:]
        self._after_cr = data.endswith(b"\r")
        if b"\n" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return lead + data


class Stream:
    """Plain or TLS bytes over an asyncio (reader, writer) pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        self._conn: SSL.Connection | None = None
        self._tls_ready = False    # the handshake on _conn finished
        # _conn's last recv said WantRead and no octet was fed to it since:
        # a recv now would only say it again (see _read_tls)
        self._rx_empty = False
        self._eof = False          # the transport said EOF
        self._closed = False
        self._unread = b""         # given back by unread(): read before the transport
        self.tls_problems: list[str] = []   # certificate problems tolerated (noCertCheck)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None  # see _wait
        self._deadline = 0.0
        self._waiter: asyncio.Task | None = None
        self._expired: asyncio.Task | None = None
        self._fixed: float | None = None  # one deadline for a whole TLS read or handshake
        self.resumption_failed = False  # a handshake offering a kept session failed
        self.handshake_start = b""  # the peer's first octets in the TLS handshake (up to 8)
        self.lf_lines: LfAsCrlf | None = None  # plain input's bare LFs as CRLF (by hand)
        self.connect_failures: tuple[str, ...] = ()  # open_tcp: addresses tried before this one
        self.connected_to = ""  # open_tcp: the address that answered, as logs show it
        set_nodelay(writer.get_extra_info("socket"))

    # ------------------------------------------------------------ constructors

    @classmethod
    async def from_socket(cls, sock: socket.socket, timeout: float | None = None) -> "Stream":
        """Wrap an already connected socket (accepted, socket-activated, inherited)."""
        set_nodelay(sock)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READER_LIMIT, loop=loop)
        transport, protocol = await loop.create_connection(
            lambda: _SalvagingProtocol(reader, loop=loop), sock=sock)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return cls(reader, writer, timeout)

    @classmethod
    async def from_fds(cls, read_fd: int, write_fd: int, timeout: float | None = None) -> "Stream":
        """Wrap two descriptors (inetd's fd 0 and fd 1). When both are the same
        socket, it is used as one socket; otherwise as a pipe pair."""
        try:
            rsock = socket.socket(fileno=os.dup(read_fd))
        except OSError:
            rsock = None
        if rsock is not None:
            if _same_file(read_fd, write_fd):
                return await cls.from_socket(rsock, timeout)
            rsock.close()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READER_LIMIT)
        rproto = asyncio.StreamReaderProtocol(reader)
        await loop.connect_read_pipe(lambda: rproto, os.fdopen(os.dup(read_fd), "rb", buffering=0))
        wtransport, wproto = await loop.connect_write_pipe(
            _WritePipeProtocol, os.fdopen(os.dup(write_fd), "wb", buffering=0))
        writer = asyncio.StreamWriter(wtransport, wproto, reader, loop)
        return cls(reader, writer, timeout)

    # ------------------------------------------------------------ properties

    @property
    def is_tls(self) -> bool:
        return self._conn is not None

    @property
    def peername(self):
        return self._writer.get_extra_info("peername")

    @property
    def sockname(self):
        return self._writer.get_extra_info("sockname")

    @property
    def socket(self):
        return self._writer.get_extra_info("socket")

    @property
    def closing(self) -> bool:
        """Closed, or closing: the connection is no more, or soon."""
        return self._closed or self._writer.is_closing()

    def tls_version(self) -> str:
        return self._conn.get_protocol_version_name() if self._conn is not None else ""

    def tls_cipher(self) -> str:
        return (self._conn.get_cipher_name() or "") if self._conn is not None else ""

    # ------------------------------------------------------------ I/O

    async def _wait(self, aw):
        """`aw`, bounded by `timeout` (TimeoutError when it runs out).

        One lazy timer per stream instead of a timer armed and cancelled
        for every read: each wait only moves the deadline; the timer, when
        it fires, re-arms itself for the deadline as it then is, and cancels
        the waiting task only when that has passed (the way asyncio.timeout
        does it, uncancel included, so a real cancellation still wins)."""
        timeout = self.timeout
        if timeout is None:
            return await aw
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)  # (given the loop: no getpid() per call on 3.11)
        cancelling = task.cancelling()  # cancels already pending are not ours to absorb
        deadline = self._fixed if self._fixed is not None else loop.time() + timeout
        self._deadline = deadline
        self._waiter = task
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._expire)
        try:
            return await aw
        except asyncio.CancelledError:
            if self._expired is task:
                self._expired = None
                if task.uncancel() <= cancelling:
                    raise TimeoutError from None
            raise
        finally:
            self._waiter = None

    @contextlib.contextmanager
    def timeout_at_most(self, seconds: float):
        """`timeout` no longer than `seconds` inside the block (a probe, a
        look for an early reply), then as it was."""
        saved = self.timeout
        self.timeout = min(seconds, saved or seconds)
        try:
            yield
        finally:
            self.timeout = saved

    def interrupt(self) -> None:
        """End the wait in progress now, as if its timeout had run out
        (TimeoutError in the waiting task); nothing when none is waiting."""
        task = self._waiter
        if task is not None and self._expired is None:
            self._expired = task
            task.cancel()

    # One waiting task per stream (_waiter): only the session's task ever
    # waits on a given stream (the pool QUITs a connection in its own task
    # only after taking it out of the idle list).

    def _expire(self) -> None:
        self._timer = None
        task = self._waiter
        if task is not None and self._expired is task:
            return  # interrupt() got there first in this loop pass: one cancel only
        if task is None:
            return  # nobody waits: the next wait arms the timer again
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._expire)
            return
        self._expired = task
        task.cancel()

    async def _raw_read(self) -> bytes:
        if self._unread:
            data, self._unread = self._unread, b""
            return data
        if self._eof:
            return b""
        try:
            data = await self._wait(self._reader.read(RAW_READ))
        except ConnectionError:
            # A reset after the peer's last words (an upstream's 552, then
            # RST): asyncio raises before handing over what had arrived.
            left = getattr(self._reader, "_buffer", None)
            if not left:
                raise
            data = bytes(left)
            left.clear()
        if not data:
            self._eof = True
        return data

    def said_something(self) -> bool:
        """Input arrived that nobody read yet, or the end of it (a kept
        connection the peer spoke on or closed while idle: 421, a late reply)."""
        reader = self._reader
        return bool(self._unread or self._eof or reader.at_eof() or reader.exception() is not None
                    or getattr(reader, "_buffer", None)
                    or (self._conn is not None and self._conn.pending()))

    def unread(self, data: bytes) -> None:
        """Give back octets read too far (what followed a PROXY protocol
        header): the next read, or the TLS handshake, gets them first."""
        if self._conn is not None:
            raise RuntimeError("unread() is for the plain stream before TLS")
        self._unread = bytes(data) + self._unread

    async def _raw_write(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionResetError("stream closed")
        if self._writer.is_closing():
            raise ConnectionResetError("connection closed by peer")
        self._writer.write(data)
        transport = self._writer.transport
        if transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await self._wait(self._writer.drain())  # the peer is slow: wait (bounded by timeout)

    async def _flush_tls(self) -> None:
        """Send whatever TLS records OpenSSL produced."""
        conn = self._conn
        assert conn is not None
        out = []
        while True:
            try:
                chunk = conn.bio_read(TLS_BATCH + RAW_READ)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            out.append(chunk)
            if len(chunk) < TLS_BATCH + RAW_READ:
                # a memory BIO hands over all it holds up to the size asked:
                # it is empty now (asking again only raises WantReadError)
                break
        if out:
            await self._raw_write(b"".join(out))

    async def read(self, max: int = RAW_READ) -> bytes:
        """Up to `max` bytes; b"" at the end of the stream."""
        if self._conn is None:
            if self._closed:
                return b""
            if self.lf_lines is not None:
                return self.lf_lines.feed(await self._raw_read())
            return await self._raw_read()
        return await self.bounded(self._read_tls(max))

    async def bounded(self, aw):
        """`aw` (many reads: a TLS record, a handshake, a whole SMTP reply)
        under ONE deadline, so a peer sending a byte at a time cannot stretch
        `timeout` for ever. Nested calls keep the outer deadline."""
        if self.timeout is None or self._fixed is not None:
            return await aw
        loop = self._loop or asyncio.get_running_loop()
        self._fixed = loop.time() + self.timeout
        try:
            return await aw
        finally:
            self._fixed = None

    async def _read_tls(self, max: int) -> bytes:
        conn = self._conn
        assert conn is not None
        while True:
            data = None
            if not self._rx_empty:
                try:
                    data = conn.recv(max)
                except SSL.WantReadError:
                    self._rx_empty = True
                except SSL.ZeroReturnError:
                    return b""
                except SSL.SysCallError:
                    return b""  # EOF without close_notify: the end, whatever the peer meant
                except SSL.Error as e:
                    raise ConnectionResetError(f"TLS error: {_tls._describe_openssl(e)}") from None
            if data is not None:
                return self._more_records(conn, data, max)
            await self._flush_tls()  # e.g. a key update the peer asked for
            data = await self._raw_read()
            self._rx_empty = False
            if data:
                conn.bio_write(data)
            else:
                conn.bio_shutdown()

    def _more_records(self, conn: SSL.Connection, data: bytes, max: int) -> bytes:
        """recv gives one TLS record at a time: add what else is already
        decryptable, up to `max`, so big transfers move in fewer, larger reads."""
        if len(data) >= max or not data:
            return data
        parts = [data]
        got = len(data)
        while got < max:
            try:
                more = conn.recv(max - got)
            except SSL.WantReadError:
                self._rx_empty = True  # (the next read goes straight to the transport)
                break
            except SSL.Error:  # close_notify, EOF: the next read sees it
                break
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts) if len(parts) > 1 else data

    async def write(self, data: bytes) -> None:
        """Send all of `data` (waits until the transport took it)."""
        if not data:
            return
        if self._conn is None:
            await self._raw_write(bytes(data))
            return
        conn = self._conn
        if not self._tls_ready:
            # a handshake that never finished (cancelled, timed out): SSL_write
            # would ask to read for ever, and this loop spun without yielding
            raise ConnectionResetError("TLS handshake not finished")
        view = memoryview(data)
        pending = 0
        while view:
            # Each SSL_write makes one record (16 KiB); collect the records of
            # up to TLS_BATCH octets in the memory BIO, then hand them over at once.
            try:
                n = conn.send(view[:RAW_READ])
            except SSL.WantReadError:  # nothing is read here: never wait for it in a loop
                await self._flush_tls()
                raise ConnectionResetError("TLS wants to read while writing") from None
            except SSL.Error as e:
                raise ConnectionResetError(f"TLS error: {_tls._describe_openssl(e)}") from None
            view = view[n:]
            pending += n
            if pending >= TLS_BATCH:
                await self._flush_tls()
                pending = 0
        await self._flush_tls()

    # ------------------------------------------------------------ TLS

    async def _handshake(self, conn: SSL.Connection) -> None:
        await self.bounded(self._handshake_steps(conn))

    async def _handshake_steps(self, conn: SSL.Connection) -> None:
        self._conn = conn
        self._tls_ready = False
        self._rx_empty = False
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                await self._flush_tls()
                data = await self._raw_read()
                if not data:
                    self._conn = None
                    raise TLSHandshakeError("connection closed during the TLS handshake")
                self.handshake_start = self.handshake_start or data[:8]
                conn.bio_write(data)
            except SSL.Error as e:
                # tell the peer why (an alert), then give up
                try:
                    await self._flush_tls()
                except (OSError, TimeoutError):
                    pass
                self._conn = None
                state = conn.get_app_data()
                errors = getattr(state, "errors", None)
                if errors and getattr(state, "verify", True):
                    raise TLSVerifyError("; ".join(errors)) from None
                # (with noCertCheck the certificate problems were let through:
                # the handshake failed for another reason, say which)
                raise TLSHandshakeError(_tls._describe_openssl(e)) from None
        self._tls_ready = True
        await self._flush_tls()

    async def start_tls_server(self, ctx: SSL.Context) -> None:
        """Run the server side of a handshake (STARTTLS after 220, or -s)."""
        if self._conn is not None:
            raise RuntimeError("TLS already started on this stream")
        await self._handshake(_tls.server_connection(ctx))

    async def start_tls_client(self, ctx: SSL.Context, server_hostname: str,
                               check_hostname: bool = True, resume: tuple | None = None) -> list[str]:
        """Run the client side of a handshake with SNI and check the server.

        Raises TLSVerifyError for a bad chain or name when `ctx` verifies;
        otherwise returns the problems found (also kept in tls_problems).
        `resume`: (server name, port) to offer the last session for (see
        _tls.client_connection; remember_tls_session keeps this one's)."""
        if self._conn is not None:
            raise RuntimeError("TLS already started on this stream")
        conn = _tls.client_connection(ctx, server_hostname, resume)
        try:
            await self._handshake(conn)
        except TLSHandshakeError:
            # the server broke a resumed handshake: never offer it one again
            # (a full one failing too clears that: see _tls.resumption_failed)
            self.resumption_failed = _tls.resumption_failed(conn)
            raise
        except OSError as exc:
            # a reset in answer to a resuming ClientHello (the server, or a
            # firewall before it) is a broken resumption too
            self._conn = None
            if _tls.resumption_failed(conn):
                self.resumption_failed = True
                raise TLSHandshakeError(f"connection lost during a resumed TLS handshake"
                                        f" ({exc.strerror or type(exc).__name__})") from None
            raise
        try:
            self.tls_problems = _tls.check_server(conn, server_hostname, check_hostname)
        except TLSVerifyError:
            self._conn = None
            raise
        return self.tls_problems

    @property
    def tls_resumed(self) -> bool:
        state = self._conn.get_app_data() if self._conn is not None else None
        return bool(getattr(state, "resumed", False))

    def remember_tls_session(self) -> None:
        """Keep this connection's TLS session for the next one to the same
        server (after a reply came over TLS, so TLS 1.3 tickets are in)."""
        if self._conn is not None:
            _tls.remember_session(self._conn)

    # ------------------------------------------------------------ closing

    def _stop_timer(self) -> None:
        if self._timer is not None:  # (a cancelled handle lets go of this stream)
            self._timer.cancel()
            self._timer = None

    def abort(self, keep_session: bool = False) -> None:
        """Drop the connection at once (no close_notify, no flush). OpenSSL
        spoils the TLS session of a connection freed without a shutdown;
        `keep_session` (a healthy connection the peer ended) spares it."""
        if keep_session and self._conn is not None:
            self._conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        self._closed = True
        self._stop_timer()
        transport = self._writer.transport
        if transport is not None:
            transport.abort()

    async def shutdown_write(self) -> None:
        """Half-close: TLS close_notify when in TLS, then EOF (FIN) on the
        transport; reading goes on (until the peer closes too). Added by
        the frontend for its lingering close after a 421."""
        if self._closed or self._writer.is_closing():
            return
        if self._conn is not None:
            try:
                self._conn.shutdown()
            except SSL.Error:
                pass
            await self._flush_tls()
        if self._writer.can_write_eof():
            self._writer.write_eof()

    async def aclose(self) -> None:
        """Close politely: TLS close_notify when in TLS, then the transport."""
        if self._closed:
            return
        self._closed = True
        self._stop_timer()
        try:
            if self._conn is not None:
                try:
                    self._conn.shutdown()
                except SSL.Error:
                    pass
                out = []
                while True:
                    try:
                        chunk = self._conn.bio_read(RAW_READ)
                    except SSL.Error:
                        break
                    if not chunk:
                        break
                    out.append(chunk)
                if out and not self._writer.is_closing():
                    self._writer.write(b"".join(out))
            self._writer.close()
            try:
                async with asyncio.timeout(2.0):  # (no task per close, unlike wait_for)
                    await self._writer.wait_closed()
            except (OSError, TimeoutError, asyncio.TimeoutError):
                # a peer that never takes what is left (a zero window, for
                # ever) would keep the socket and its buffers: cut it
                self._writer.transport.abort()
        except OSError:
            pass


class _SalvagingProtocol(asyncio.StreamReaderProtocol):
    """A socket stream's protocol that keeps the peer's last words. When a
    write meets a reset, asyncio drops the connection at once and closes
    the socket: an upstream's 552 sent just before its reset (it refused the
    message and closed with our data unread) lay unread in the socket and
    was lost, and the client got 451 for a permanent refusal. Here what the
    socket still holds is read (SALVAGE octets at most) and handed to the
    reader before the error: _raw_read gives it out first."""

    SALVAGE = 1 << 20

    def __init__(self, reader: asyncio.StreamReader, loop) -> None:
        super().__init__(reader, loop=loop)
        self._salvage_to = reader
        self._salvage_from: asyncio.BaseTransport | None = None

    def connection_made(self, transport) -> None:
        self._salvage_from = transport
        super().connection_made(transport)

    def connection_lost(self, exc) -> None:
        if exc is not None and self._salvage_from is not None:
            self._salvage()
        self._salvage_from = None
        super().connection_lost(exc)

    def _salvage(self) -> None:
        sock = self._salvage_from.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        left = self.SALVAGE
        while fd >= 0 and left > 0:
            try:
                data = os.read(fd, min(left, RAW_READ))
            except OSError:  # (nothing more now, or the reset itself)
                return
            if not data:
                return
            left -= len(data)
            self._salvage_to.feed_data(data)


class _WritePipeProtocol(asyncio.streams.FlowControlMixin):
    """Write side of a pipe pair: flow control plus a waiter for close."""

    def __init__(self) -> None:
        super().__init__()
        self._closed_fut = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if not self._closed_fut.done():
            self._closed_fut.set_result(None)

    def _get_close_waiter(self, stream):
        return self._closed_fut


def _same_file(fd1: int, fd2: int) -> bool:
    try:
        a, b = os.fstat(fd1), os.fstat(fd2)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class ConnectError(OSError):
    """No address of the server accepted a connection; str() lists each try."""


FAILED_FOR = 300.0  # seconds an address that failed goes after the server's others
FAILED_KEPT = 1024  # addresses remembered at most


class Lately:
    """What happened to a key in the last `ttl` seconds (with a value), in
    this process, for at most `kept` keys: past the cap the expired go
    first, then the oldest. The memory of failed upstream addresses and of
    refused upstream logins."""

    def __init__(self, ttl: float, kept: int) -> None:
        self.ttl = ttl
        self.kept = kept
        self._until: dict = {}  # key -> (until, value), oldest first

    def note(self, key, now: float, value=None) -> None:
        self._until.pop(key, None)
        if len(self._until) >= self.kept:
            for old in [k for k, (until, _) in self._until.items() if until <= now]:
                del self._until[old]
            while len(self._until) >= self.kept:
                del self._until[next(iter(self._until))]  # the oldest
        self._until[key] = (now + self.ttl, value)

    def get(self, key, now: float) -> tuple[float, object] | None:
        """(seconds left, the value) while `key` is remembered, else None."""
        entry = self._until.get(key)
        if entry is None:
            return None
        until, value = entry
        if until <= now:
            del self._until[key]
            return None
        return until - now, value

    def forget(self, key) -> None:
        self._until.pop(key, None)

    def clear(self) -> None:
        self._until.clear()


class FailedAddresses(Lately):
    """The addresses (with their port) a connection to failed lately, in
    this process: tried after the server's other addresses while
    remembered, so a broken path (typically IPv6 to the smarthost, each try
    up to CONNECT_TRY when black-holed) costs one failed try, and one
    warning, every FAILED_FOR seconds rather than every new connection. An
    address is never skipped: when all have failed, all are tried."""

    def __init__(self) -> None:
        super().__init__(FAILED_FOR, FAILED_KEPT)

    def order(self, candidates: list, now: float) -> list:
        """`candidates` (family, type, proto, addr) with the remembered ones last."""
        bad = [c for c in candidates if self._until.get(c[3], (0.0,))[0] > now]
        return [c for c in candidates if c not in bad] + bad

    def failed(self, addr: tuple, now: float) -> None:
        self.note(addr, now)

    def answered(self, addr: tuple) -> None:
        self.forget(addr)


failed_addresses = FailedAddresses()


_lookup_pool: concurrent.futures.ThreadPoolExecutor | None = None
_lookup_turns: dict[tuple, list] = {}  # (loop, user) -> [Semaphore, holders and waiters]


async def _lookup(name: str, port: int, who: str) -> list:
    """getaddrinfo in a thread of the lookup pool, at most LOOKUPS_PER_USER
    of `who`'s at once (`who` "": no turn needed)."""
    global _lookup_pool
    loop = asyncio.get_running_loop()
    if _lookup_pool is None:
        _lookup_pool = concurrent.futures.ThreadPoolExecutor(LOOKUP_THREADS,
                                                             thread_name_prefix="lookup")
    turn = None
    if who:
        key = (loop, who)
        turn = _lookup_turns.get(key)
        if turn is None:
            turn = _lookup_turns[key] = [asyncio.Semaphore(LOOKUPS_PER_USER), 0]
        turn[1] += 1

    def leave() -> None:
        turn[1] -= 1
        if not turn[1] and _lookup_turns.get(key) is turn:
            del _lookup_turns[key]

    def give_back() -> None:  # the turn taken, and the place in the table
        if turn is not None:
            turn[0].release()
            leave()

    answer = loop.create_future()

    def settle(done: concurrent.futures.Future) -> None:  # in the loop, once the thread is free
        give_back()
        if not answer.done():  # (else its session stopped waiting)
            exc = done.exception()
            if exc is not None:
                answer.set_exception(exc)
            else:
                answer.set_result(done.result())

    def finished(done: concurrent.futures.Future) -> None:  # in the thread
        try:
            loop.call_soon_threadsafe(settle, done)
        except RuntimeError:  # the loop is closed (the process ends): nobody waits
            pass

    try:
        if turn is not None:
            await turn[0].acquire()
    except BaseException:
        leave()
        raise
    dropped = False

    def look_up() -> list:
        # submit() queues the work before it starts a thread: when no thread
        # could start, the work stays queued, without a turn, and the next
        # thread that starts would look the name up for nobody first
        return [] if dropped else socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)

    try:
        _lookup_pool.submit(look_up).add_done_callback(finished)
    except BaseException:  # no thread could be started (RLIMIT_NPROC): open_tcp says so
        dropped = True
        give_back()
        raise
    return await answer


async def open_tcp(host: str, port: int, timeout: float | None, who: str = "") -> Stream:
    """Connect to every address `host` resolves to (IPv4 and IPv6), one after
    the other; the first that answers wins (the stream's connect_failures
    lists the tries before it, for the log). Each try is bounded by `timeout`,
    but by at most CONNECT_TRY seconds while other addresses are left, so one
    black-holed address (typically IPv6) cannot eat the client's patience;
    an address that failed lately goes last (FailedAddresses)."""
    loop = asyncio.get_running_loop()
    try:
        name = host_a_label(host)
    except ValueError as e:
        raise ConnectError(errno.EINVAL, f"{host}: not a valid host name ({e})") from None
    try:
        try:  # an address needs no lookup, and no thread of the loop's executor
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            infos = await asyncio.wait_for(_lookup(name, port, who), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        raise ConnectError(errno.ETIMEDOUT, f"{host}: name lookup timed out") from None
    except socket.gaierror as e:
        raise ConnectError(errno.EHOSTUNREACH, f"{host}: {e.strerror or e}") from None
    except (UnicodeError, ValueError) as e:  # what Python's own codec still refuses
        raise ConnectError(errno.EINVAL, f"{host}: not a valid host name ({e})") from None
    except RuntimeError as e:  # the executor could start no thread (RLIMIT_NPROC of frontendUser)
        raise ConnectError(errno.EAGAIN, f"{host}: cannot look the name up now ({e})") from None
    tried: list[str] = []
    unique = []
    for family, type_, proto, _canon, addr in infos:
        if (family, addr) not in {(f, a) for f, _t, _p, a in unique}:
            unique.append((family, type_, proto, addr))
    unique = failed_addresses.order(unique, loop.time())
    for i, (family, type_, proto, addr) in enumerate(unique):
        this_try = timeout
        if i < len(unique) - 1 and (timeout is None or timeout > CONNECT_TRY):
            this_try = CONNECT_TRY
        try:
            sock = socket.socket(family, type_, proto)
        except OSError as e:  # out of descriptors or memory here: no other address does better
            raise ConnectError(e.errno or errno.EMFILE, "cannot open a socket:"
                               f" {os.strerror(e.errno) if e.errno else e}") from None
        sock.setblocking(False)
        set_nodelay(sock)
        shown = f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"
        try:
            async with asyncio.timeout(this_try):  # (no task per connection, unlike wait_for)
                await loop.sock_connect(sock, addr)
        except (TimeoutError, asyncio.TimeoutError):
            sock.close()
            tried.append(f"{shown} timed out")
            failed_addresses.failed(addr, loop.time())
            continue
        except OSError as e:
            sock.close()
            tried.append(f"{shown} {os.strerror(e.errno) if e.errno else e}")
            failed_addresses.failed(addr, loop.time())
            continue
        failed_addresses.answered(addr)
        stream = await Stream.from_socket(sock, timeout)
        stream.connect_failures, stream.connected_to = tuple(tried), shown
        return stream
    raise ConnectError(errno.ECONNREFUSED, "; ".join(tried) or f"{host}: no address")
