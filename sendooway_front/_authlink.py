"""The frontend's side of the authenticator protocol.

One AuthLink per SMTP session (the authenticator permits hello → auth →
route… per connection). A Connector makes links: to the daemon's UNIX socket,
or over the one socketpair to a `sendooway-auth --fd N` child started while
still root. sendooway_front never imports sendooway_auth: the child is a new
program found next to this one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

from sendooway_shared.config import MAX_SOCKET_PATH
from sendooway_shared.log import printable
from sendooway_shared.protocol import (
    MAX_FAILURE_DELAY, MAX_REFUSAL_PAD, VERSION, AsyncChannel, AuthFail, AuthOk, AuthRequest,
    Error, Hello, Message, NoRoute, ProtocolError, RouteOk, RouteRequest, Welcome,
)
from sendooway_shared.types import Route, Secret

log = logging.getLogger("sendooway")

AUTH_PROGRAM = "sendooway-auth"
TRUST_WORDS = ": not trusted with passwords"  # how trusted_peer's refusals end


class AuthLinkError(Exception):
    """The authenticator cannot be reached or broke the protocol."""


class AuthLink:
    """Request/reply with the authenticator for one SMTP session."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self._channel = AsyncChannel(reader, writer)
        self._timeout = timeout
        self._broken = False
        self._welcome_due = False  # hello sent, its Welcome not read yet

    async def _request(self, msg: Message, held_back: float = 0.0) -> Message:
        """`msg`'s answer, waited for `timeout` (plus `held_back`: what the
        authenticator may hold it back on purpose)."""
        if self._broken:
            raise AuthLinkError("link already failed")
        try:
            # (no task per request, unlike wait_for)
            async with asyncio.timeout(self._timeout + held_back):
                return await self._exchange(msg)
        except asyncio.TimeoutError:
            self._broken = True
            raise AuthLinkError("authenticator did not answer in time") from None
        except (ProtocolError, ConnectionError, OSError, EOFError) as exc:
            self._broken = True
            raise AuthLinkError(f"authenticator link failed: {exc}") from None

    @property
    def broken(self) -> bool:
        """A request failed: the link cannot be used any more."""
        return self._broken

    def _unexpected(self, reply: Message) -> AuthLinkError:
        self._broken = True
        if isinstance(reply, Error):  # its word before it closes (a busy login, a refused link)
            return AuthLinkError(f"the authenticator answered: {printable(reply.reason, 200)}")
        return AuthLinkError(f"unexpected {reply.TYPE!r} from the authenticator")

    async def _exchange(self, msg: Message) -> Message:
        if self._welcome_due:
            self._welcome_due = False
            self._check_welcome(await self._channel.receive())
        return await self._channel.request(msg)

    def _check_welcome(self, reply: Message) -> None:
        if not isinstance(reply, Welcome) or reply.version != VERSION:
            raise self._unexpected(reply)

    async def send_hello(self, session_id: str, client: str) -> None:
        """hello without waiting: the Welcome is read before the first
        request's answer. The client gets its greeting one round trip to the
        authenticator sooner; a refusal (version, peer uid) then shows at
        AUTH, as a temporary failure, instead of in the greeting."""
        try:
            async with asyncio.timeout(self._timeout):  # (no task, unlike wait_for)
                await self._channel.send(self._hello(session_id, client))
        except (asyncio.TimeoutError, ConnectionError, OSError) as exc:
            self._broken = True
            raise AuthLinkError(f"authenticator link failed: {exc or type(exc).__name__}") from None
        self._welcome_due = True

    @staticmethod
    def _hello(session_id: str, client: str) -> Hello:
        return Hello(VERSION, session_id[:64], client[:128])

    async def auth(self, user: str, password: Secret) -> str | None:
        """The account name on success, None when the login failed."""
        reply = await self._request(AuthRequest(user, password),
                                    held_back=MAX_REFUSAL_PAD + MAX_FAILURE_DELAY)
        if isinstance(reply, AuthOk):
            return reply.user
        if isinstance(reply, AuthFail):
            return None
        raise self._unexpected(reply)

    async def route(self, sender: str) -> Route | None:
        """The route for `sender` of the user logged in on this link, or None."""
        reply = await self._request(RouteRequest(sender))
        if isinstance(reply, RouteOk):
            return reply.to_route()
        if isinstance(reply, NoRoute):
            return None
        raise self._unexpected(reply)

    def close(self) -> None:
        try:
            self._channel.close()
        except Exception:  # closing a link that already broke
            pass


class SocketConnector:
    """Links to the sendooway-auth daemon on a UNIX socket."""

    def __init__(self, path: str, timeout: float, also: int | None = None,
                 private: bool = False, only_root: bool = False) -> None:
        self.path = path
        self.timeout = timeout
        self.also = also  # a uid trusted besides root and our own (trusted_peer)
        self.only_root = only_root  # or root alone (trusted_peer)
        # our own daemon (spawn_daemon): if it is gone, nobody will start it
        # again while we run, so we stop (exit 1) for the service manager to
        # restart both, instead of greeting every client with 421 for ever
        self.private = private
        self.gone = False

    def describe(self) -> str:
        return self.path

    async def open(self, session_id: str, client: str) -> AuthLink:
        try:
            async with asyncio.timeout(self.timeout):  # (no task per session, unlike wait_for)
                reader, writer = await asyncio.open_unix_connection(self.path, limit=65536)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            if (self.private and not self.gone
                    and getattr(exc, "errno", None) in (errno.ECONNREFUSED, errno.ENOENT)):
                self.gone = True
                log.error("the private authenticator at %s is gone: stopping (exit 1) so that"
                          " it can be started again with sendooway", self.path)
                os.kill(os.getpid(), signal.SIGTERM)  # the graceful stop of serve_listening
            raise AuthLinkError(f"cannot connect to the authenticator at {self.path}: {reason}") from None
        why = trusted_peer(writer.get_extra_info("socket"), self.also, self.only_root)
        if why is not None:
            writer.transport.abort()
            raise AuthLinkError(f"refusing the authenticator at {self.path}: {why}")
        link = AuthLink(reader, writer, self.timeout)
        await link.send_hello(session_id, client)
        return link


class PairConnector:
    """The one connection to a `sendooway-auth --fd N` child (stdio mode)."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen, timeout: float) -> None:
        self.sock: socket.socket | None = sock
        self.proc = proc
        self.timeout = timeout

    def describe(self) -> str:
        return f"socketpair to {AUTH_PROGRAM} pid {self.proc.pid}"

    async def open(self, session_id: str, client: str) -> AuthLink:
        sock, self.sock = self.sock, None
        if sock is None:
            raise AuthLinkError("the socketpair serves one session only")
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=65536)
        link = AuthLink(reader, writer, self.timeout)
        await link.send_hello(session_id, client)
        return link

    def reap(self) -> None:
        if self.sock is not None:
            # the session ended before it opened its link (a failed TLS
            # handshake with -s): the child exits when its end closes; it
            # used to wait for the frontend's exit, and the frontend 5 s
            # for the child, the client's connection open all that time
            self.sock.close()
            self.sock = None
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it exits when the link closes; do not wait forever
            pass


class AbsentLink:
    """The link of a session that has no authenticator (see AbsentConnector):
    every request fails, as a link that broke would."""

    def __init__(self, why: str) -> None:
        self._why = why
        self.broken = False

    async def auth(self, user: str, password: Secret) -> str | None:
        self.broken = True
        raise AuthLinkError(self._why)

    async def route(self, sender: str) -> Route | None:
        self.broken = True
        raise AuthLinkError(self._why)

    def close(self) -> None:
        pass


class AbsentConnector:
    """No authenticator at all: a test session typed or piped by a user
    who is not root (`sendooway -c /dev/null -l '&2'`, as the original's
    own checks ran it) with no daemon running. The session runs as far as
    it can without one; a login gets 454 4.7.0 (a temporary failure, never
    a wrong password) and then 421."""

    def __init__(self, why: str) -> None:
        self.why = why

    def describe(self) -> str:
        return "no authenticator"

    async def open(self, session_id: str, client: str) -> AbsentLink:
        return AbsentLink(self.why)


def daemon_reachable(path: str, also: int | None = None, only_root: bool = False) -> bool:
    """True when an authenticator we may trust accepts connections on
    `path` (see trusted_peer: a local user's squatter is not one)."""
    return not daemon_problem(path, also, only_root)


def daemon_problem(path: str, also: int | None = None, only_root: bool = False) -> str:
    """Why no authenticator we may trust accepts connections on `path`
    (connect's error, or trusted_peer's refusal); "" when one does."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
        return trusted_peer(probe, also, only_root) or ""
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    finally:
        probe.close()


def trusted_peer(sock: socket.socket, also: int | None = None,
                 only_root: bool = False) -> str | None:
    """None when the process at the other end of `sock` may hear logins:
    root (the authenticator), our own user or `also` (frontendUser's uid,
    asked before the drop to it: authBackend = none, where the daemon runs
    as the frontend's account); with `only_root` (any other authBackend,
    whose daemon is root's) root alone; else why not. Whoever could bind
    the authSocket name (a local user, in a directory others may write to;
    another service running as nobody, the default frontendUser) would
    otherwise receive every user's password."""
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as exc:
        return f"cannot tell who listens there ({exc.strerror or exc}){TRUST_WORDS}"
    _pid, uid, _gid = struct.unpack("3i", data)
    if uid == 0 or (not only_root and (uid == os.geteuid() or (also is not None and uid == also))):
        return None
    return f"the process listening there runs as uid {uid}, not root{TRUST_WORDS}"


def find_auth_program() -> str:
    """sendooway-auth from the same bin directory as this program."""
    dirs = []
    if sys.argv and sys.argv[0]:
        dirs.append(os.path.dirname(os.path.abspath(sys.argv[0])))
    dirs.append(os.path.dirname(sys.executable))
    dirs.append(os.path.dirname(os.path.realpath(sys.executable)))
    for d in dirs:
        candidate = os.path.join(d, AUTH_PROGRAM)
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(AUTH_PROGRAM)
    if found:
        return found
    raise AuthLinkError(f"{AUTH_PROGRAM} not found next to {sys.argv[0] or sys.executable}")


def _auth_args(config_path: str, log_target: str | None) -> list[str]:
    args = ["-c", config_path]
    if log_target:
        args += ["-l", log_target]
    return args


def spawn_pair(config_path: str, log_target: str | None, timeout: float,
               stderr_is_client: bool = False) -> PairConnector:
    """Fork+exec `sendooway-auth --fd N` on one end of a socketpair (as root,
    before the privilege drop). Its stdin/stdout are /dev/null: under inetd
    they are the client's connection."""
    program = find_auth_program()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # xinetd makes the client's socket stderr too: what the child would print
    # there (a start-up error naming the config) must not reach the client
    stderr = subprocess.DEVNULL if stderr_is_client else None
    try:
        proc = subprocess.Popen(
            [program, "--fd", str(theirs.fileno()), *_auth_args(config_path, log_target)],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=None if log_target == "&1" else subprocess.DEVNULL,  # ('&1' is never the client)
            stderr=stderr, close_fds=True)
    except OSError as exc:
        ours.close()
        raise AuthLinkError(f"cannot start {program}: {exc.strerror}") from None
    finally:
        theirs.close()
    return PairConnector(ours, proc, timeout)


# A root-side watcher made of /bin/sh alone (no frontend code runs as root):
# it starts the daemon, and a reader of its stdin (fd 3: an asynchronous
# list's stdin is /dev/null) stops the daemon at EOF (the frontend's end of
# a pipe closes when the frontend exits, however it exits). PR_SET_PDEATHSIG
# cannot do this: once the frontend has dropped to nobody, the kernel does
# not let its death signal a root process. It ignores the SIGTERM that
# systemd sends the whole group (the lifeline says when) — the daemon itself
# starts with SIGTERM's default disposition, so a stop while it is still
# starting is not lost (SIGINT and SIGQUIT stay ignored, as sh leaves them
# for a background job: a ^C reaches it through the lifeline) — and once
# the daemon is gone, whyever, it removes the private directory, which the
# frontend (nobody by then) cannot, and exits with the
# daemon's status: a daemon killed before it was ready (the same group stop)
# ends the frontend's wait for it at once, where the watcher used to wait
# for the lifeline and the frontend for 20 s (an admin-docs review).
_LIFELINE = ('trap "" INT HUP TERM; exec 3<&0 </dev/null;'
             ' (trap - INT HUP TERM; exec "$0" "$@") 3<&- & d=$!;'
             ' (read _ <&3; kill -TERM $d 2>/dev/null) & r=$!; exec 3<&-;'
             ' wait $d; s=$?; kill -KILL $r 2>/dev/null;'
             ' rm -f "$SENDOOWAY_PRIVATE_DIR/auth.sock" "$SENDOOWAY_PRIVATE_DIR/notify";'
             ' rmdir "$SENDOOWAY_PRIVATE_DIR"; exit $s')


def _private_directory(frontend_user: str | None) -> str:
    """A new directory (mode 0711) for the private authenticator's socket,
    one `frontend_user` can reach: under $TMPDIR (tempfile's choice), else
    /run, else /tmp. A TMPDIR the frontend user may not search (root's
    TMPDIR=/root/tmp, mode 0700) used to hold it, and every session then got
    421 "Permission denied" for as long as sendooway ran (an outside review)."""
    from ._privileges import acting_as

    tried = []
    for base in dict.fromkeys((tempfile.gettempdir(), "/run", "/tmp")):
        # a long TMPDIR: the socket's path would not fit in a socket address
        # ("cannot start: AF_UNIX path too long", with /run and /tmp untried)
        longest = os.path.join(base, "sendooway-auth-" + "x" * 8, "auth.sock")
        if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
            tried.append(f"{base} (too long a path for a socket in it)")
            continue
        try:
            directory = tempfile.mkdtemp(prefix="sendooway-auth-", dir=base)
        except OSError as exc:
            tried.append(f"{base} ({exc.strerror})")
            continue
        os.chmod(directory, 0o711)  # the frontend user may reach the socket, not list the dir
        if frontend_user is None:
            return directory
        with acting_as(frontend_user):
            reachable = os.access(directory, os.X_OK, effective_ids=True)
        if reachable:
            return directory
        os.rmdir(directory)
        tried.append(f"{base} (frontendUser {frontend_user} cannot reach it)")
    raise AuthLinkError("no directory for the private authenticator's socket: "
                        + ", ".join(tried))


def spawn_daemon(config_path: str, log_target: str | None, timeout: float,
                 ready_timeout: float = 20.0,
                 frontend_user: str | None = None) -> tuple[SocketConnector, subprocess.Popen, int]:
    """Start a private `sendooway-auth --socket` child for a listening frontend
    started as root with no daemon running (a socketpair would serve only one
    session). Returns the connector, the watcher process and the write end of
    its lifeline: keep it open while serving; the daemon stops once it closes.
    Its socket is put where `frontend_user` can reach it."""
    program = find_auth_program()
    directory = _private_directory(frontend_user)
    path = os.path.join(directory, "auth.sock")
    notify_path = os.path.join(directory, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, SENDOOWAY_PRIVATE_DIR=directory)
    life_r, life_w = os.pipe()
    os.set_inheritable(life_w, False)
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", _LIFELINE, program, "--socket", path, "--private",
             *_auth_args(config_path, log_target)],
            stdin=life_r, stdout=None if log_target == "&1" else subprocess.DEVNULL,
            close_fds=True, env=env)
        deadline = time.monotonic() + ready_timeout
        notify.settimeout(0.2)
        while True:
            try:
                if b"READY=1" in notify.recv(256):
                    break
            except socket.timeout:
                pass
            if proc.poll() is not None:
                # (killed before its trap, as by a stop of the whole group,
                # the watcher could not remove the directory: we still can)
                shutil.rmtree(directory, ignore_errors=True)
                raise AuthLinkError(f"{program} exited with status {proc.returncode} at start")
            if time.monotonic() > deadline:
                raise AuthLinkError(f"{program} did not become ready")  # lifeline closes: it stops
    except (OSError, AuthLinkError) as exc:
        os.close(life_w)
        notify.close()
        if isinstance(exc, AuthLinkError):
            raise  # (the watcher stops the daemon and removes the directory)
        shutil.rmtree(directory, ignore_errors=True)  # no watcher was started
        raise AuthLinkError(f"cannot start {program}: {exc.strerror}") from None
    finally:
        os.close(life_r)
    connector = SocketConnector(path, timeout, private=True, only_root=True)
    connector.notify = notify  # stays bound: the daemon also says STOPPING=1 there
    return connector, proc, life_w
