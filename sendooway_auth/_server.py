"""Drivers: the daemon on a UNIX socket (or systemd's), and one inherited
socket (--fd, the frontend's socketpair). They only move bytes; the rules
live in _connection and _permits. The daemon re-reads its config on SIGHUP
(Runtime.reload); --fd ignores SIGHUP (each session's authenticator reads
the config when it starts)."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import resource
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import replace

from sendooway_shared.config import (
    AuthBackend, Config, ConfigError, parse_config, read_text,
)
from sendooway_shared.log import Tally, log_failure, quiet_accept_errors
from sendooway_shared.paths import closed_directory

from ._connection import SILENT, Connection
from ._logfmt import text
from ._pam import PamPool, auth_warnings, load_libpam
from ._penalty import Penalty, SharedPenalty
from ._reader import ForkServer
from ._service import AuthService
from ._workers import WorkerPool

log = logging.getLogger("sendooway-auth")
SD_LISTEN_FDS_START = 3
MAX_CONNECTIONS = 4000  # one per SMTP session; beyond this, new ones are closed at once
# descriptors kept free besides the connections: PAM and NSS, the log, the
# fork server, and each reader worker's socket and pidfd (64 workers)
FD_RESERVE = 200
# Bound when the daemon started (the socket it listens on and its owner, the
# uids let in): a reload keeps them and says so.
RESTART_ONLY = ("authSocket", "frontendUser")


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def _harden() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # passwords pass through this process
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_CONNECTIONS + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def connection_limit() -> int:
    """Connections served at once: MAX_CONNECTIONS, or fewer where the
    descriptor limit would run out first (then the connections admitted
    would find no descriptor left for PAM, NSS or a reader worker)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, soft - FD_RESERVE))


def backend_words(cfg: Config) -> str:
    """Which backend serves logins, for the start and reload lines."""
    if cfg.authBackend is AuthBackend.PAM:
        return f"PAM service {cfg.pamService}"
    return f"auth backend {text(cfg.describe_backend())}"


def check_backend(cfg: Config) -> None:
    """Refuse a backend this process must not serve (LDAP; none as root)."""
    refusal = cfg.backend_refusal(os.geteuid())
    if refusal:
        raise StartupError(refusal)


def load_backend(cfg: Config) -> None:
    """Load what the backend needs before any login asks for it (libpam)."""
    if cfg.authBackend is AuthBackend.PAM and (why := load_libpam()):
        raise StartupError(f"cannot load the PAM library libpam: {why}")


def frontend_uid(cfg: Config) -> int | None:
    try:
        return pwd.getpwnam(cfg.frontendUser).pw_uid
    except KeyError:
        log.warning("frontendUser %s does not exist: only root may connect", cfg.frontendUser)
        return None


def activated_socket() -> socket.socket | None:
    """The socket systemd passed (LISTEN_FDS/LISTEN_PID), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets; using the first", count)
        # the others stay open but reach no child (a PAM helper, pam_exec)
        for fd in range(SD_LISTEN_FDS_START + 1, SD_LISTEN_FDS_START + min(count, 1 << 20)):
            try:
                os.set_inheritable(fd, False)
            except OSError:
                break  # the first one not open: none beyond it is systemd's
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError:
        raise StartupError("the descriptor systemd passed (fd 3) is not a socket") from None
    os.set_inheritable(sock.fileno(), False)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise StartupError("the socket systemd passed is not a UNIX stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        try:
            sock.getpeername()
        except OSError:
            pass  # bound, not listening yet: listen() below makes it so
        else:
            # listen() on it failed with a bare "Invalid argument" (exit 1,
            # and Restart=on-failure started it again and again)
            raise StartupError("the socket systemd passed is a connection, not a listening"
                               " socket: sendooway-auth.socket must not have Accept=yes")
    return sock


def bind_socket(path: str, owner_uid: int | None) -> socket.socket:
    """Listen on `path`: safe directory, stale socket removed, mode 0600
    owned by the frontend user (root can always connect)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o755)
            os.chmod(directory, 0o755)
        except OSError as exc:
            raise StartupError(f"cannot create {directory}: {exc.strerror or exc}") from None
    st = os.stat(directory)
    if st.st_mode & (stat.S_IWOTH | stat.S_IWGRP):
        # sticky or not: another user could bind the name while we are down
        # and hear every login (the frontend checks its peer too)
        raise StartupError(f"{directory} is writable by others than its owner (mode"
                           f" {st.st_mode & 0o7777:04o}): refusing to put the socket there;"
                           " use a directory of root's such as /run/sendooway")
    if st.st_uid not in (0, os.getuid()):
        raise StartupError(f"{directory} is owned by uid {st.st_uid}, not root")
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise StartupError(f"{path} exists and is not a socket: remove it yourself")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            log.info("removed stale socket %s", path)
        else:
            raise StartupError(f"{path}: another authenticator is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    try:
        # the mode first: once the socket is the frontend user's, changing
        # it needs CAP_FOWNER, which the shipped unit does not keep
        os.chmod(path, 0o600)
        if owner_uid is not None and os.geteuid() == 0:
            os.chown(path, owner_uid, -1)
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot prepare the socket {path}: {exc.strerror or exc}") from None
    return sock


def notify(state: str) -> None:
    """sd_notify(3) without libsystemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc.strerror or exc)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


class Runtime:
    """What both drivers set up: the fork server first (no threads yet),
    then the PAM pool and the service."""

    def __init__(self, cfg: Config, failure_delay: float, threads: int,
                 shared_penalty: bool = False) -> None:
        check_backend(cfg)
        _harden()
        self.cfg = cfg
        self.forks = ForkServer(cfg).start()
        load_backend(cfg)  # (after the fork server: it needs no libpam)
        self.readers = WorkerPool(self.forks)
        self.pam = PamPool(cfg.pamService, threads)  # NSS lookups need it with any backend
        self.penalty = Penalty(base=failure_delay)
        if shared_penalty:  # one process per session: keep the counts where all see them
            directory = os.path.join(os.path.dirname(os.path.abspath(cfg.authSocket)), "penalty")
            try:
                self.penalty = SharedPenalty.open(directory, base=failure_delay)
            except OSError as exc:
                log.warning("failure backoff kept per session only: %s: %s", directory,
                            exc.strerror or exc)
        self.service: AuthService | None = None
        self.failed = False  # the daemon stops because a part of it died: exit 1

    def make_service(self) -> AuthService:
        self.service = AuthService(self.cfg, self.pam, self.readers, self.penalty)
        return self.service

    def reload(self, path: str) -> None:
        """SIGHUP: read `path` again. If it passes the start-up checks, every
        request from now on uses it (logins, and route lookups through
        workers forked after this); otherwise the old config stays. Runs on
        the event loop, so requests see either config whole, never a mix,
        and a second SIGHUP waits for this one. systemd is told (RELOADING=1,
        then READY=1), so `systemctl reload` shows the reload and its end."""
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        done = self._reload(path)
        notify("READY=1\nSTATUS=" + ("serving" if done else
                                     "reload failed, old config kept (see the log)"))

    def _reload(self, path: str) -> bool:
        old = self.cfg
        try:
            source = read_text(path)
            new = parse_config(source, path)
            check_backend(new)
            load_backend(new)
        except (ConfigError, StartupError) as exc:
            log.error("reload failed, old config kept: %s", text(str(exc)))
            return False
        changed = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
        new = replace(new, **{name: getattr(old, name) for name in RESTART_ONLY})
        try:
            if not self.forks.reconfigure(source, new):
                log.warning("reload: the reader fork server is not running: route lookups"
                            " fail until a restart")
        except OSError as exc:  # it did not take the new config: keep the old one everywhere
            log.error("reload failed, old config kept: cannot hand it to the reader fork"
                      " server (%s); send SIGHUP again", exc.strerror or exc)
            return False
        self.readers.reconfigured()
        self.cfg = new
        self.pam.service = new.pamService
        if self.service is not None:
            self.service.cfg = new
        for name in changed:
            log.warning("reload: %s changed; it takes effect only after a restart", name)
        for warning in auth_warnings(new):
            log.warning("%s", text(warning))
        log.info("reloaded %s: %s", text(path), backend_words(new))
        return True

    def close(self) -> None:
        self.readers.close()
        self.pam.shutdown()
        self.forks.stop()


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """--exit-with-parent: PR_SET_PDEATHSIG cannot do this for a root child
    of a parent that dropped privileges (the kernel checks the dying
    parent's right to signal us), so look."""
    while not stop.is_set():
        await asyncio.sleep(0.25)
        if os.getppid() != parent:
            log.info("parent process %d went away", parent)
            stop.set()


class _EarlySignals:
    """Signals before the event loop takes them over (during start-up, with
    the socket already bound): noted instead of the default (death, which
    left the socket file behind). A SIGHUP is the reload done once serving
    (only with a config file to read again), a SIGTERM or SIGINT the stop."""

    def __init__(self, hangup: bool) -> None:
        self.seen: set[int] = set()
        sigs = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hangup else [])
        for sig in sigs:
            signal.signal(sig, self._note)

    def _note(self, signum, _frame) -> None:
        self.seen.add(signum)


async def _serve_daemon(rt: Runtime, sock: socket.socket, allowed: set[int], where: str,
                        parent: int | None = None, config_path: str | None = None,
                        early: _EarlySignals | None = None) -> None:
    service = rt.make_service()
    tasks: set[asyncio.Task] = set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop, log)
    limit = connection_limit()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, _reloader(rt, config_path))
    watcher = asyncio.ensure_future(_watch_parent(parent, stop)) if parent else None
    if rt.forks.pidfd >= 0:
        loop.add_reader(rt.forks.pidfd, _fork_server_gone, rt, stop)

    # a process filling the table and connecting on wrote a line per
    # attempt (300 lines a second in a review)
    refused = Tally(log, "connection refused: %d connections open (limit %d); %d refused"
                    " since the last such line")
    # another local user connecting in a loop (a socket unit without
    # SocketMode=, whose default is 0666) wrote a line per attempt
    strangers = Tally(log, "peer refused: uid=%d pid=%d (only root and frontendUser may"
                      " connect); %d refused since the last such line")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        tasks.add(task)
        try:
            if len(tasks) > limit:
                refused.note(len(tasks) - 1, limit)
                writer.close()
                return
            pid, uid, _gid = peer_credentials(writer.get_extra_info("socket"))
            if uid not in allowed:
                strangers.note(uid, pid)
                writer.close()
                return
            await Connection(service, reader, writer, f"uid={uid} pid={pid}",
                             limit_silence=True).run()
        except asyncio.CancelledError:
            writer.close()
            raise
        except Exception:  # noqa: BLE001 - a bug must not take the others down
            log_failure(log, "internal error on one connection (closed it)")
            writer.close()
        finally:
            tasks.discard(task)

    # backlog: asyncio listens again on the socket (default 100), which would
    # undo listen(512) and systemd's Backlog=; a burst of sessions must queue.
    # cleanup_socket: Python 3.13's asyncio removes the socket's path when the
    # server closes, also a socket systemd passed: sendooway-auth.socket went
    # on listening with no path, and after a restart of the service every
    # session got 421 (no such file). A socket bound here is removed below.
    keep_path = {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}
    server = await asyncio.start_unix_server(handle, sock=sock, limit=65536, backlog=512,
                                             **keep_path)
    log.info("started: listening on %s, %s, %d PAM threads, maxAuthFailures %d",
             where, backend_words(rt.cfg), rt.pam.threads, rt.cfg.maxAuthFailures)
    notify("READY=1")
    if early is not None and early.seen & {signal.SIGTERM, signal.SIGINT}:
        stop.set()
    elif early is not None and signal.SIGHUP in early.seen and config_path is not None:
        _reloader(rt, config_path)()
    await stop.wait()
    if config_path is not None:  # stopping: a SIGHUP now neither reloads nor kills
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    notify("STOPPING=1")
    refused.close()  # (what they had not told yet)
    strangers.close()
    SILENT.close()
    log.info("stopping")
    if rt.forks.pidfd >= 0:
        loop.remove_reader(rt.forks.pidfd)
    if watcher is not None:
        watcher.cancel()
    server.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _fork_server_gone(rt: Runtime, stop: asyncio.Event) -> None:
    """The reader fork server died (the OOM killer, a stray kill): no route
    lookup can work any more, and forking a new one from this threaded
    process is not safe. Stop with status 1, so that the service manager
    (Restart=on-failure) starts a whole new authenticator."""
    asyncio.get_running_loop().remove_reader(rt.forks.pidfd)
    if stop.is_set():
        return  # stopping anyway
    log.error("the reader fork server %s; route lookups cannot work without it:"
              " stopping (exit status 1) for the service manager to restart us",
              rt.forks.exit_status())
    rt.failed = True
    stop.set()


def _reloader(rt: Runtime, config_path: str):
    def reload() -> None:
        try:
            rt.reload(config_path)
        except Exception as exc:  # noqa: BLE001 - a bug must not end the daemon (nor log a trace)
            log.error("reload of %s failed, internal error (%s): some of the new config"
                      " may be in use; restart the daemon", text(config_path),
                      type(exc).__name__)
    return reload


def run_daemon(cfg: Config, path: str | None, failure_delay: float, threads: int,
               exit_with_parent: bool = False, config_path: str | None = None) -> int:
    """The daemon; it re-reads `config_path` on SIGHUP. Without one (the
    private authenticator of sendooway -b, --private) SIGHUP is ignored."""
    if config_path is None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    early = _EarlySignals(hangup=config_path is not None)
    check_backend(cfg)  # before the socket exists: nothing to clean up on refusal
    for warning in auth_warnings(cfg):
        log.warning("%s", text(warning))
    parent = os.getppid() if exit_with_parent else None
    sock = activated_socket()
    bound_path = None
    if sock is None:
        path = path or cfg.authSocket
        owner = frontend_uid(cfg)
        sock = bind_socket(path, owner)
        bound_path = path
        where = path
        closed = closed_directory(path, cfg.frontendUser)
        if closed is not None:  # (an existing directory: one made here is 0755)
            log.warning("frontendUser %s cannot reach %s: the directory %s (mode %04o) is"
                        " closed to it; every frontend finds no authenticator until it may"
                        " search it (chmod o+x %s, or 0755)", cfg.frontendUser, path,
                        closed[0], stat.S_IMODE(closed[1].st_mode), closed[0])
    else:
        owner = frontend_uid(cfg)
        where = "the socket from systemd"
    allowed = {0} | ({owner} if owner is not None else set())
    try:
        rt = Runtime(cfg, failure_delay, threads)
    except BaseException:
        sock.close()
        if bound_path:
            os.unlink(bound_path)
        raise
    try:
        asyncio.run(_serve_daemon(rt, sock, allowed, where, parent, config_path, early))
    finally:
        # the loop gave SIGHUP back to its default (death): not while stopping
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        rt.close()
        sock.close()
        if bound_path:
            try:
                os.unlink(bound_path)
            except OSError:
                pass
    log.info("stopped")
    return 1 if rt.failed else 0


async def _serve_fd(rt: Runtime, sock: socket.socket) -> None:
    service = rt.make_service()
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=65536)
    task = asyncio.ensure_future(
        Connection(service, reader, writer, f"fd={sock.fileno()}").run())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        writer.close()


def _inherited_socket(fd: int) -> socket.socket:
    try:
        os.fstat(fd)
    except OSError:
        raise StartupError(f"--fd {fd}: not an open file descriptor") from None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        raise StartupError(f"--fd {fd}: not a socket") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise StartupError(f"--fd {fd}: not a UNIX stream socket")
    os.set_inheritable(fd, False)
    return sock


def run_fd(cfg: Config, fd: int, failure_delay: float) -> int:
    # One session, which keeps the config it started with; the next session's
    # authenticator reads the file anew. A hang-up is not a reason to cut it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    check_backend(cfg)
    # each session is a start here (inetd, xinetd: the original's way, with
    # no daemon to log them once), as the frontend logs an unusable sslCert
    # at every session: else only --check ever showed them (an outside review)
    for warning in auth_warnings(cfg):
        log.warning("%s", text(warning))
    sock = _inherited_socket(fd)  # before anything is set up
    rt = Runtime(cfg, failure_delay, threads=2, shared_penalty=True)
    try:
        asyncio.run(_serve_fd(rt, sock))
    finally:
        rt.close()
    return 0
