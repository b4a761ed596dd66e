"""The processes that read a user's files as that user.

A lookup runs in a process that first drops to the user's uid, gid and
groups (so NFS root_squash, symlinks to /etc/shadow and files the user may
not read behave as they would for the user), is made non-dumpable, changes
to the user's home, reads the files (regular files only, bounded, see
_files), parses them and sends back the result (routes.to_wire). Hostile
files are thus parsed with the user's rights and CPU, never in the root
process, which checks the answer like protocol input.

The daemon keeps one *worker* per user that serves repeated lookups over a
socket (each one read and parsed afresh, within TIME_LIMIT by SIGALRM) and
exits on EOF, on any error and after WORKER_LIFETIME; _workers holds the
daemon's table of them. The daemon has PAM threads, and forking a threaded
process is fragile, so it starts a tiny single-threaded *fork server* before
any thread exists; the fork server only forks workers. `lookup_direct`
forks a one-shot child in place and is for the single-threaded --check.

Control protocol (daemon → fork server, SOCK_SEQPACKET): SPAWN + a user,
with the worker's socket (SCM_RIGHTS); or CONFIG with a memfd holding the
reloaded config (SIGHUP): workers forked after it use it. Messages are taken
in order, so every SPAWN sent after a CONFIG gets the new config.

Worker protocol (daemon → worker on a SOCK_STREAM socketpair): first the
fork server writes the worker's pid (4 bytes, big-endian) with a pidfd of
it (SCM_RIGHTS) on the daemon's end, or when fork() failed a pid of 0 and
the errno (4 bytes each); then per lookup the daemon writes
REQUEST, the worker answers ACK at once (it took the request: from then on a
death is the lookup's failure, not a stale worker) and then a 4-byte length
and the answer.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import resource
import select
import signal
import socket
import struct
import time

import msgpack

from sendooway_shared.config import Config, parse_config

from ._files import Budget, FileRead, read_one
from ._users import UserInfo
from .fetchmail import parse_fetchmailrc
from .getmail import parse_getmailrc
from ._accounts import choose
from .routes import MAX_ACCOUNTS, MAX_WIRE, UserRoutes, WireError, from_wire, run_plan, to_wire

TIME_LIMIT = 5  # seconds one lookup may take
WORKER_LIFETIME = 600  # seconds a worker serves at most
WORKER_MAX_GROWTH = 64 << 20  # bytes of peak memory a worker may add before it retires
REQUEST = b"?"         # a lookup: every account the files give
REQUEST_FOR = b"S"     # + SENDER_LENGTH + the sender: only the account for that sender
SENDER_LENGTH = struct.Struct(">H")
MAX_SENDER = 4096      # octets of a sender in a REQUEST_FOR
ACK = b"+"
SPAWN = b"W"   # control message: fork a worker for this user
CONFIG = b"C"  # control message: use this config for the workers forked from now on
LENGTH = struct.Struct(">I")
_CONTROL_MAX = 64 * 1024
_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4
_libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork or user switch


def _user_to_wire(user: UserInfo) -> bytes:
    return msgpack.packb([user.name, user.uid, user.gid, list(user.groups), user.home])


def _user_from_wire(data: bytes) -> UserInfo:
    name, uid, gid, groups, home = msgpack.unpackb(data, raw=False)
    return UserInfo(name=str(name), uid=int(uid), gid=int(gid), home=str(home),
                    groups=tuple(int(g) for g in groups))


def _failed(user: UserInfo, why: str) -> UserRoutes:
    return UserRoutes(user, errors=[f"lookup failed: {why}"], failure=why)


# ------------------------------------------------------------ as the user


def _not_dumpable() -> None:
    """No ptrace, no /proc/PID/mem, no core: the process holds the daemon's
    memory (global config passwords). A uid change resets the flag to
    fs.suid_dumpable, which an admin may have set to 1."""
    _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    if _libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise PermissionError("could not make the reader non-dumpable")


def _become(user: UserInfo) -> None:
    """Drop to the user for good and become non-dumpable, or raise.

    The real and saved uids stay 0 until the flag is cleared: changing the
    euid resets it, changing only the real and saved uids does not, and
    while they are 0 (and the permitted capabilities are kept) no process of
    the user may ptrace or signal this one or open its memory. No instant is
    both the user's and dumpable."""
    if os.getresuid() == (user.uid,) * 3 and user.uid != 0:
        _not_dumpable()
        return  # already the user (authBackend = none, --check of oneself)
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(0, user.uid, 0)
    _not_dumpable()
    os.setresuid(user.uid, user.uid, user.uid)
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (user.gid,) * 3:
        raise PermissionError("could not switch to the user")
    _not_dumpable()  # checked again after the final switch
    if user.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PermissionError("could regain root")


def _enter(user: UserInfo) -> None:
    """What every reader does first: die by SIGALRM, no core, become the user."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(TIME_LIMIT)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _become(user)


def _lookup_wire(cfg: Config, user: UserInfo, sender: str | None = None) -> bytes:
    """One lookup, read and parsed afresh: the answer for the daemon. With
    `sender`, only the account chosen for it is sent: the choice among
    what may be 200,000 address patterns of a hostile user's files is made
    here, with the user's CPU, not on the daemon's event loop that serves
    every login (a review). The daemon checks the one account again."""
    home_problem = ""
    try:
        os.chdir(user.home)  # every time: the home may have been replaced
    except OSError as exc:
        os.chdir("/")
        home_problem = f"home {user.home}: {exc.strerror or exc} (its files cannot be read)"
    budget = Budget()
    # (a home not entered: an NFS share not mounted, a directory entry's home never made)
    found = run_plan(cfg, user, lambda paths: [read_one(p, budget) for p in paths],
                     (home_problem,) if home_problem else ())
    if sender is not None:
        account = choose(found.accounts, sender)
        found.accounts = [account] if account is not None else []
        found.mappings = []  # (for --check, which asks for everything)
    return to_wire(found)


def _read_sender(fd: int) -> str:
    """The sender that follows a REQUEST_FOR."""
    (size,) = SENDER_LENGTH.unpack(_read_exactly(fd, SENDER_LENGTH.size))
    if size > MAX_SENDER:
        raise ValueError("sender too long")
    return _read_exactly(fd, size).decode("utf-8", "replace")


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("the daemon closed the socket")
        data += chunk
    return data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _child(cfg: Config, user: UserInfo, out_fd: int) -> None:
    """The one-shot reader of lookup_direct; never returns."""
    code = 70
    try:
        _enter(user)
        _write_all(out_fd, _lookup_wire(cfg, user))
        code = 0
    except BaseException:  # noqa: BLE001 - the child must never return
        code = 70
    finally:
        os._exit(code)


_SAMPLE_FETCHMAILRC = """poll pop.example.org proto pop3 user "u" password 'p\\x41'
#sendooway:server "smtp.example.org"
#sendooway:port 587
#sendooway:tls
#sendooway:address "u@example.org"
"""
_SAMPLE_GETMAILRC = """[retriever]
server = pop.example.org
username = u
password = p
[sender]
type = SimpleSMTPTLSSender
server = smtp.example.org
address = u@example.org
"""


def _warm_up(cfg: Config, user: UserInfo) -> None:
    """Run the lookup's code once on built-in samples (no file is opened):
    the copy-on-write faults of a fresh process then happen here, while the
    client is still between AUTH and MAIL, not in its first lookup."""
    try:
        parse_fetchmailrc(_SAMPLE_FETCHMAILRC, "warm-up")
        parse_getmailrc(_SAMPLE_GETMAILRC, "warm-up")
        to_wire(run_plan(cfg, user, lambda paths: [FileRead(p, "missing") for p in paths]))
    except Exception:  # noqa: BLE001 - only a head start
        pass


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(cfg: Config, user: UserInfo, fd: int) -> None:
    """A user's reader worker: serves lookups on `fd` until EOF, an error,
    too much memory or WORKER_LIFETIME; never returns."""
    code = 70
    try:
        _enter(user)
        _warm_up(cfg, user)
        deadline = time.monotonic() + WORKER_LIFETIME
        base = _peak_rss()
        while (left := deadline - time.monotonic()) > 0:
            signal.alarm(int(left) + 1)  # idle: the lifetime
            kind = os.read(fd, 1)
            if not kind:
                break  # the daemon closed it
            signal.alarm(TIME_LIMIT)
            sender = _read_sender(fd) if kind == REQUEST_FOR else None
            os.write(fd, ACK)
            answer = _lookup_wire(cfg, user, sender)
            _write_all(fd, LENGTH.pack(len(answer)) + answer)
            if _peak_rss() - base > WORKER_MAX_GROWTH:
                break  # a huge parse: give the memory back, the next lookup forks anew
        code = 0
    except BaseException:  # noqa: BLE001 - the worker must never return
        code = 70
    finally:
        os._exit(code)


def _decode(data: bytes, user: UserInfo, max_accounts: int = MAX_ACCOUNTS) -> UserRoutes:
    if not data:
        return _failed(user, "reader child died")
    try:
        return from_wire(data, user, max_accounts)
    except WireError as exc:
        return _failed(user, f"reader child answered garbage: {exc}")


# ------------------------------------------------------------ --check


def lookup_direct(cfg: Config, user: UserInfo) -> UserRoutes:
    """Fork a one-shot reader here and wait for it (single-threaded callers only)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(cfg, user, w)
    os.close(w)
    chunks = []
    total = 0
    # The child runs as the user, who may stop it (SIGSTOP): its own alarm
    # then never fires, so the wait here has a deadline of its own.
    deadline = time.monotonic() + TIME_LIMIT + 2
    with os.fdopen(r, "rb", buffering=0) as f:
        while total <= MAX_WIRE:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([f], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return _failed(user, f"lookup took more than {TIME_LIMIT} s: reader child killed")
            chunk = f.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    _pid, status = os.waitpid(pid, 0)
    found = _decode(b"".join(chunks), user)
    if found.failure and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        # its own alarm (a huge file, a slow home, a loaded machine): the
        # time limit, not a crash ("reader child died" sent admins astray)
        return _failed(user, f"lookup took more than {TIME_LIMIT} s: reader child stopped by its alarm")
    return found


# ------------------------------------------------------------ the fork server


def _max_fd() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY and soft < 1 << 20 else 1 << 16


class ForkServer:
    """A single-threaded child of the daemon that forks reader workers."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._sock: socket.socket | None = None
        self.pid = 0
        self.pidfd = -1  # readable once the fork server exited (-1: Linux < 5.3)

    def start(self) -> "ForkServer":
        """Call before any thread exists."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                # keep nothing of the daemon's: not its listening socket, not
                # a frontend's connection, not the log file
                keep = theirs.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, _max_fd())
                _serve(self.cfg, theirs)
            except BaseException:  # noqa: BLE001
                code = 70
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)  # a stuck fork server must not block the event loop
        self._sock, self.pid = ours, pid
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            self.pidfd = -1
        return self

    def exit_status(self) -> str:
        """How the fork server ended, for the log (it must have ended)."""
        try:
            _pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return "ended"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                return f"killed by {signal.Signals(sig).name}"
            except ValueError:
                return f"killed by signal {sig}"
        if os.WIFEXITED(status):
            return f"exited with status {os.WEXITSTATUS(status)}"
        return "ended"

    def stop(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass

    def reconfigure(self, text: str, cfg: Config) -> bool:
        """Workers forked from now on use the config `cfg`, parsed from
        `text` (a reload): True. False when the fork server is not running
        (it forks nothing any more). Raises OSError when it is running but
        could not be given the config (its queue is full, no memory): it
        keeps the old one."""
        if self._sock is None:
            return False
        # The text, parsed again there (a Secret is not picklable, on
        # purpose), in a memfd: a config may be larger than one message.
        fd = os.memfd_create("sendooway-config", os.MFD_CLOEXEC)
        try:
            _write_all(fd, text.encode())
            try:
                socket.send_fds(self._sock, [CONFIG + cfg.filename.encode()], [fd])
            except (BrokenPipeError, ConnectionResetError):
                return False  # it exited
        finally:
            os.close(fd)
        self.cfg = cfg
        return True

    def spawn(self, user: UserInfo) -> socket.socket:
        """Have a worker forked for `user`; the daemon's end of its socket
        (non-blocking). Raises OSError when the fork server cannot be asked."""
        if self._sock is None:
            raise OSError("reader not running")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(self._sock, [SPAWN + _user_to_wire(user)], [theirs.fileno()])
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return ours


def _read_config(fd: int, filename: str) -> Config:
    """The config the daemon reloaded (see ForkServer.reconfigure). Only
    what the readers use matters here (userInclude, mappings, sslCA); the
    settings a reload keeps (authSocket, frontendUser) are not used."""
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return parse_config(b"".join(chunks).decode(), filename)


def _reap(_signum, _frame) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _serve(cfg: Config, sock: socket.socket) -> None:
    # Workers are reaped here, not by the kernel: until we reap one, its pid
    # cannot be reused, so the pidfd opened after fork() is surely its own.
    signal.signal(signal.SIGCHLD, _reap)
    # a service manager's stop signals the whole unit: we end when the
    # daemon closes our socket, so that our death always means a failure
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the daemon's reload; ours comes as CONFIG
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    gc.freeze()  # the workers share these objects: no collection should touch (copy) them
    while True:
        data, fds, _flags, _addr = socket.recv_fds(sock, _CONTROL_MAX, 1)
        if not data:
            return
        kind, data = data[:1], data[1:]
        if len(fds) != 1 or kind not in (SPAWN, CONFIG):
            for fd in fds:
                os.close(fd)
            continue
        if kind == CONFIG:
            try:
                # an error raises: exiting beats forking workers with the
                # config the daemon has just replaced
                cfg = _read_config(fds[0], data.decode())
            finally:
                os.close(fds[0])
            gc.freeze()
            continue
        conn = socket.socket(fileno=fds[0])
        try:
            user = _user_from_wire(data)
        except Exception:  # noqa: BLE001 - the daemon sees EOF
            conn.close()
            continue
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        word, pidfd = b"", []
        try:
            try:
                pid = os.fork()
            except OSError as exc:
                # out of processes (a pids cgroup: TasksMax=) or memory: this
                # worker is not made, the daemon is told why; we go on
                word = LENGTH.pack(0) + LENGTH.pack(exc.errno or errno.EAGAIN)
            else:
                if pid == 0:
                    sock.close()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                    _worker(cfg, user, conn.fileno())
                word = LENGTH.pack(pid)
                try:
                    pidfd = [os.pidfd_open(pid)]
                except OSError:  # Linux < 5.3: the daemon has only the pid
                    pidfd = []
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        try:
            socket.send_fds(conn, [word], pidfd)
        except OSError:
            pass  # the daemon gave up on it already; the worker sees EOF
        finally:
            for fd in pidfd:
                os.close(fd)
            conn.close()
