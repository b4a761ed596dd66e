"""`sendooway`: the command line of the frontend.

Start-up order matters: config, log, TLS key, listening sockets and the
authenticator link are set up while still root; then every module a session
needs is imported, the privileges are dropped for good, and only then is a
client byte read.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import stat
import sys
import time

from sendooway_shared import __version__
from sendooway_shared.cli import (
    DEFAULT_CONFIG, EXIT_CONFIG, Parser, listen_fds, socket_path_arg, to_devnull,
)
from sendooway_shared.config import AuthBackend, ConfigError, MailerEncryption, load_config
from sendooway_shared.log import setup_logging
from sendooway_shared.paths import closed_directory

EXIT_FAILURE = 1


def build_parser() -> Parser:
    p = Parser(
        prog="sendooway",
        description="Multi-user SMTP submission proxy (frontend). Without -b it serves"
        " one SMTP session on stdin/stdout (inetd, xinetd).",
        epilog="Under systemd socket activation (LISTEN_FDS) it serves the listening"
        " sockets passed (Accept=no), or the one connection passed on fd 3 or on"
        " stdin (Accept=yes). Exit status: 0 done; 1 failure; 2 bad command line,"
        " configuration, certificate, log file or what systemd passed; 3 this"
        " text could not be written. See sendooway(1).",
    )
    p.add_argument("-V", "--version", action="version", version=f"sendooway {__version__}")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("-s", "--ssl", action="store_true",
                     help="start the TLS handshake at once (SMTPS, port 465)")
    tls.add_argument("-S", "--nossl", action="store_true",
                     help="the channel is already safe: no STARTTLS, counts as encrypted")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="CONFIG",
                   help=f"configuration file (default {DEFAULT_CONFIG}; /dev/null = defaults)")
    p.add_argument("-b", "--bind", metavar="[ADDR:]PORT", action="append",
                   help="listen for many sessions on [ADDR:]PORT instead of stdin/stdout"
                   " (may be given more than once)")
    p.add_argument("-l", "--log", metavar="LOGFILE",
                   help="append the log to LOGFILE; '&2' or '-' for stderr, '&1' for stdout"
                   " (with -b only) (default: syslog, mail)")
    p.add_argument("--auth-socket", metavar="PATH", type=socket_path_arg,
                   help="the sendooway-auth daemon's socket (default: authSocket from the config)")
    return p


# Under inetd/xinetd the client's socket is fd 0 and 1, and xinetd makes it
# fd 2 as well: a start-up error printed there would reach the client as
# garbage (and show it the config). The client gets a 421 instead and the
# reason goes to the log (syslog unless -l), and to stderr only when stderr
# is somewhere else (a terminal, systemd's journal).
STARTUP_421 = b"421 4.3.0 Service not available, closing connection\r\n"


def _fstat(fd: int):
    try:
        return os.fstat(fd)
    except OSError:
        return None


def _same(a, b) -> bool:
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class _Startup:
    """Where a start-up error goes: stderr, and for an inetd client a 421.
    Made first thing, before stderr may be muted: fd 0, 1 and 2 as they came."""

    def __init__(self) -> None:
        self._fds = (_fstat(0), _fstat(1), _fstat(2))
        self.one_session = True  # until the command line says -b (or systemd a listener)
        self.closed: set[int] = set()  # of fd 0, 1, 2: came closed (now /dev/null)
        # xinetd's `wait = yes` passes its listening socket, not a connection
        self.listening = _listening(0)
        # systemd Accept=yes without StandardInput=socket: the connection is
        # fd 3 alone (it closed without a word where inetd's client gets 421)
        self.client_fd = 3 if _activated_connection(self._fds[0]) else 0

    @property
    def client(self) -> bool:
        """fd 0 is the client's socket: one session on stdin/stdout, or
        systemd's Accept=yes unit, whose connection is fd 0 and 1 as well
        (StandardInput/Output=socket), or fd 3 alone (client_fd)."""
        if self.client_fd == 3:
            return True
        st0, st1, _st2 = self._fds
        return (st0 is not None and stat.S_ISSOCK(st0.st_mode) and not self.listening
                and (self.one_session or _same(st0, st1)))

    @property
    def stderr_is_client(self) -> bool:
        return self.client and self.client_fd == 0 and _same(self._fds[0], self._fds[2])

    @property
    def stderr_is_listener(self) -> bool:
        """xinetd with `wait = yes`: stderr is the listening socket (no one reads it)."""
        return self.listening and _same(self._fds[0], self._fds[2])

    def fail(self, log: logging.Logger | None, message: str, code: int = EXIT_CONFIG) -> int:
        if log is None and (self.client or self.listening):
            log = _syslog()  # the reason must reach the admin somewhere
        if log is not None:
            log.error("cannot start: %s", message)
        if not (self.stderr_is_client or self.stderr_is_listener) and sys.stderr is not None:
            print(f"sendooway: {message}", file=sys.stderr)  # (None: fd 2 came closed)
        if self.client:
            try:
                os.write(1 if self.client_fd == 0 else self.client_fd, STARTUP_421)
            except OSError:
                pass
            _linger(self.client_fd)
        return code


def _activated_connection(st0) -> bool:
    """Did systemd pass one connection as fd 3 (LISTEN_FDS=1 for this
    process) with stdin not a socket (no StandardInput=socket)? LISTEN_FDS
    read as sd_listen_fds reads it, a number: 01 is 1."""
    passed = listen_fds()
    if (passed is None or passed[1] != 1
            or (st0 is not None and stat.S_ISSOCK(st0.st_mode))):
        return False
    st3 = _fstat(3)
    return st3 is not None and stat.S_ISSOCK(st3.st_mode) and not _listening(3)


def _listening(fd: int) -> bool:
    """Is `fd` a listening socket (SO_ACCEPTCONN)?"""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False  # a terminal, a pipe, /dev/null
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:  # closed
        return False
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False
    finally:
        sock.close()


STDIN_LISTENING = ("stdin is a listening socket: sendooway serves the one connection inetd"
                   " accepted; use wait = no in xinetd (nowait in inetd.conf), or -b / socket"
                   " activation for a listening server")


def _syslog() -> logging.Logger | None:
    """syslog (mail), for a start-up error when the log asked for cannot
    take it (a file nobody may open, '&2' that is the client)."""
    try:
        return setup_logging(None, "sendooway")
    except OSError:
        return None


def _linger(fd: int = 0, seconds: float = 2.0, most: int = 65536) -> None:
    """Close the client's socket (`fd`) gently: what it sent already (a
    pipelining client's EHLO) is read and dropped for a moment (`seconds`
    in all), so that closing does not reset the connection and throw away
    the 421."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    deadline = time.monotonic() + seconds
    try:
        sock.shutdown(socket.SHUT_WR)
        got = 0
        while got < most and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            data = sock.recv(4096)
            if not data:
                break
            got += len(data)
    except OSError:
        pass
    finally:
        sock.close()


def _client_on_stdout() -> bool:
    """Is stdout a client's connection (a TCP socket, or the socket stdin is:
    systemd's StandardInput=socket + StandardOutput=socket), not a terminal,
    a file or the journal?"""
    st0, st1 = _fstat(0), _fstat(1)
    if st1 is None or not stat.S_ISSOCK(st1.st_mode):
        return False
    if _same(st0, st1):
        return True
    try:
        sock = socket.socket(fileno=os.dup(1))
    except OSError:
        return False
    try:
        return sock.family in (socket.AF_INET, socket.AF_INET6)
    finally:
        sock.close()


# glibc serves allocations over 128 KiB (at first) with mmap and returns
# them with munmap: every 128-256 KiB buffer of a big message (a read, a
# chunk, TLS records) was then faulted in page by page afresh. Keeping them
# in the heap cut the frontend's CPU per 64 MiB message by about a fifth
# (bench/bench_relay.py) without a higher peak RSS.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _malloc_for_streaming() -> None:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    mallopt(_M_MMAP_THRESHOLD, 4 << 20)
    mallopt(_M_TRIM_THRESHOLD, 8 << 20)


def _not_dumpable_at_once() -> None:
    """The frontend's first step: no other process of the same user may
    ptrace it or open its memory from now on (root's start gets this from
    the kernel at the drop; a start as a shared user such as nobody would
    otherwise stay open until the drop, past the config and the TLS key)."""
    from ._privileges import PrivilegeError, _not_dumpable

    try:
        _not_dumpable()
    except PrivilegeError:
        pass  # drop_privileges tries again and refuses to serve


def _name_of(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


def _uid_of(user: str) -> int | None:
    """frontendUser's uid (None when there is no such account: the drop
    says so later)."""
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except (KeyError, TypeError):
        return None


def _root_only_socket(path: str, user: str, reason: str, private: bool) -> str:
    """The start-up error for an authenticator socket root may connect to
    and frontendUser may not: what is wrong, what happens now, the fix."""
    import grp
    import pwd

    try:
        st = os.stat(path)
    except OSError:
        found = ""
    else:
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        found = f" (owner {owner}:{group}, mode {stat.S_IMODE(st.st_mode):04o})"
    then = ("a private authenticator serves the sessions instead" if private else
            "sessions get 421 (SENDOOWAY_PRIVATE_AUTH=no: no authenticator is started here)")
    closed = closed_directory(path, user)
    if closed is not None:
        # the socket may well be frontendUser's already: its directory is
        # what keeps it out, and "give the socket to nobody" misled
        directory, dst = closed
        return (f"the authenticator's socket {path}{found} lets root connect but not"
                f" frontendUser {user}, which every session runs as ({reason}): {then};"
                f" the directory {directory} (mode {stat.S_IMODE(dst.st_mode):04o}) is closed"
                f" to {user}: let it search it (chmod o+x {directory}, or 0755)")
    return (f"the authenticator's socket {path}{found} lets root connect but not frontendUser"
            f" {user}, which every session runs as ({reason}): {then}; give the socket to"
            f" {user} (sendooway-auth does; SocketUser= in sendooway-auth.socket), or make"
            " frontendUser the user it belongs to")


def _reopen_closed_std_fds() -> set[int]:
    """Which of fd 0, 1 and 2 came closed; each is /dev/null now. Else the
    first descriptor opened takes the number: with stdout closed the log
    file became fd 1 and the session wrote its SMTP replies into the log
    (or into syslog's socket), and the session went on and relayed the
    message of a client that never heard a reply (a differential review)."""
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
    for fd in sorted(closed):  # (the lowest free number: this one)
        got = os.open(os.devnull, os.O_RDWR)
        if got != fd:
            os.dup2(got, fd)
            os.close(got)
    return closed


def main(argv: list[str] | None = None) -> int:
    closed = _reopen_closed_std_fds()
    _not_dumpable_at_once()
    startup = _Startup()
    startup.closed = closed
    try:
        return _main(argv, startup)
    except OSError as exc:
        # out of descriptors or processes where no step looked for it (an
        # xinetd service with a low rlimit_files): the client hears 421 and
        # the log why, never a traceback on a stderr no one reads
        log = logging.getLogger("sendooway") if logging.getLogger().handlers else None
        return startup.fail(log, exc.strerror or str(exc), EXIT_FAILURE)


def _main(argv: list[str] | None, startup: _Startup) -> int:
    if startup.stderr_is_client or startup.stderr_is_listener:
        # xinetd made the client's connection our stderr too: whatever Python
        # or a library might print there (a warning, a note that the log
        # cannot be written, argparse's usage text) would land in the SMTP
        # dialogue (or fail on a listening socket, with a traceback)
        to_devnull(2)
    parser = build_parser()
    if startup.client or startup.listening:  # a usage error is a start-up failure: 421, syslog
        parser.fail = lambda message: startup.fail(None, message)
    args = parser.parse_args(argv)
    from ._server import socket_activated

    one_session = not args.bind and not socket_activated()
    startup.one_session = one_session
    if one_session and startup.listening:
        # Before anything else, an authenticator forked as root above all:
        # taken for a session, it failed ("Transport endpoint is not
        # connected") and xinetd started it again at once, dozens of times a
        # second, each forking a root authenticator (an outside review).
        log = None
        if args.log != "&1" and not (args.log in ("&2", "-") and startup.stderr_is_listener):
            try:
                log = setup_logging(args.log, "sendooway")
            except OSError:
                pass  # (fail falls back to syslog)
        return startup.fail(log, STDIN_LISTENING)
    if args.log in ("&2", "-") and startup.stderr_is_client:  # xinetd: stderr is the client
        return startup.fail(None, "-l '&2': stderr is the SMTP client here (xinetd makes the"
                                  " connection stderr too); log to a file or syslog (no -l)")
    if args.log == "&1" and (one_session or _client_on_stdout()):  # the original's stdout
        return startup.fail(None, "-l '&1': stdout is the SMTP client here (-b is where"
                                  " '&1' works); log to '&2', a file, or syslog (no -l)")
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        log = None
        if startup.client:  # the reason must reach the admin somewhere: the log
            try:
                log = setup_logging(args.log, "sendooway")
            except OSError:
                pass  # (fail falls back to syslog)
        return startup.fail(log, str(exc))
    try:
        setup_logging(args.log, "sendooway")
    except OSError as exc:
        return startup.fail(None, f"cannot open log {args.log}: {exc.strerror}")
    log = logging.getLogger("sendooway")
    if one_session and startup.closed & {0, 1}:
        names = " and ".join(("stdin", "stdout")[fd] for fd in sorted(startup.closed & {0, 1}))
        return startup.fail(log, f"{names} closed: no SMTP client to serve (without -b the session"
                          " is on stdin and stdout)", EXIT_FAILURE)
    if os.geteuid() != 0 and _name_of(os.geteuid()) == "nobody":
        log.warning("started as nobody, an account other services may share: until this"
                    " process made itself non-dumpable, their processes could open its"
                    " memory; start sendooway as root (it drops to frontendUser) or as an"
                    " account of its own")
    _fail = startup.fail

    from ._authlink import (
        TRUST_WORDS, AbsentConnector, AuthLinkError, SocketConnector, daemon_problem,
        daemon_reachable, spawn_daemon, spawn_pair,
    )
    from ._driver import Frontend
    from ._privileges import PrivilegeError, acting_as, drop_privileges
    from ._server import (
        ActivationError, BindError, activated_sockets, catch_early_signals, listen_sockets,
        parse_bind, preload, serve_connection, serve_listening, serve_stdio, stop_requested,
    )
    from ._tls import TLSConfigError, preload_ca_file, server_context

    # TLS: the key is read now, as root.
    tls_context = None
    tls_broken = False
    if cfg.sslCert or cfg.sslKey or args.ssl:
        try:
            tls_context = server_context(cfg.sslCert, cfg.sslKey)
        except TLSConfigError as exc:
            problem = f"{cfg.where(exc.keyword)}: {exc}"
            if not one_session or args.ssl:
                return _fail(log, problem)
            # One session (inetd, a test session): served as the original
            # served it, which loaded the files only at STARTTLS. STARTTLS
            # is still offered and refused (454), so that a client set to
            # use it stops instead of logging in without it; every session
            # logs why.
            log.error("%s; STARTTLS is refused in this session (454 4.7.0)", problem)
            tls_broken = True
    # and the upstreams' CA certificates (sslCA), which frontendUser may not
    # be able to read: a bad file is a start-up error, as a bad key is
    if cfg.sslCA:
        try:
            preload_ca_file(cfg.sslCA)
        except TLSConfigError as exc:
            return _fail(log, f"{cfg.where('sslCA')}: sslCA {exc}")

    # Where the clients come from.
    listening = []
    connection = None
    try:
        activation = activated_sockets()
    except ActivationError as exc:
        return _fail(log, str(exc))
    if args.bind or (activation is not None and activation.listening):
        # before the sockets listen: a stop request as soon as the port is
        # up (a service manager, a script polling for it) is a clean stop,
        # also when this process is descheduled right after listen()
        catch_early_signals()
    if args.bind and activation is not None:
        # systemd's sockets would be held and never served: their clients
        # wait in the backlog for ever (or -b fails: "Address already in use")
        return _fail(log, "-b and the sockets systemd passed (LISTEN_FDS) exclude each other:"
                          " remove -b from ExecStart=, or the .socket unit")
    if args.bind:
        try:
            for where in args.bind:
                listening += listen_sockets(*parse_bind(where))
        except BindError as exc:
            for sock in listening:
                sock.close()
            return _fail(log, str(exc))
    elif activation is not None:
        listening, connection = activation.listening, activation.connection
        if not listening and connection is None:
            return _fail(log, "systemd passed no usable socket")
    many = bool(listening)

    # The authenticator.
    path = args.auth_socket or cfg.authSocket
    is_root = os.geteuid() == 0
    spawned = None
    lifeline = -1
    frontend_uid = _uid_of(cfg.frontendUser) if is_root else None
    # The shipped systemd units sandbox the frontend (ProtectHome, three
    # capabilities) and say so: an authenticator started there could not
    # read one user's file and would answer "no route" (550) for every
    # sender, so there a missing daemon is a 421 as for nobody
    sandboxed = os.environ.get("SENDOOWAY_PRIVATE_AUTH", "").lower() == "no"
    # Only authBackend = none has a daemon running as an ordinary account
    # (the frontend's own): with any other, a listener that is not root is
    # a squatter (nobody is shared by other services), never trusted.
    only_root = cfg.authBackend is not AuthBackend.NONE
    try:
        # asked as every session will connect: as frontendUser, after the drop
        with acting_as(cfg.frontendUser):
            refusal = daemon_problem(path, frontend_uid, only_root)
        reachable = not refusal
        # root may reach what frontendUser may not (a root 0644 socket that
        # systemd-socket-activate made, one of another frontendUser): a
        # root probe alone said "there", and every session then got 421
        root_only = bool(refusal) and is_root and daemon_reachable(path, frontend_uid, only_root)
    except PrivilegeError as exc:
        return _fail(log, str(exc), EXIT_FAILURE)
    if root_only:
        log.error("%s", _root_only_socket(path, cfg.frontendUser, refusal, private=not sandboxed))
    elif refusal.endswith(TRUST_WORDS):  # a squatter, or a daemon run as the wrong account
        whom = (f"with authBackend = {cfg.authBackend.value} only a root authenticator does"
                if only_root else f"only one running as root or frontendUser {cfg.frontendUser}")
        log.warning("authSocket %s: %s; it gets no logins (%s)", path, refusal, whom)
    by_hand = one_session and not startup.client and connection is None
    if not reachable and not is_root and by_hand:
        # a session typed or piped by a user (the original's own checks ran
        # `sendooway -c /dev/null -l '&2'` so): served without authenticator
        # rather than refused with 421 at once; an inetd client (a socket on
        # stdin) still gets the 421, its service is down
        why = f"no authenticator at {path} (sendooway runs as uid {os.geteuid()}, not root)"
        connector = AbsentConnector(why)
        log.warning("%s: a session without logins (AUTH gets 454); run it as root, or"
                    " start sendooway-auth, for a real one", why)
    elif reachable or not is_root or sandboxed:
        connector = SocketConnector(path, cfg.timeout, frontend_uid, only_root=only_root)
        if not reachable and not root_only:
            log.warning("no authenticator at %s: sessions get 421 until it runs%s", path,
                        " (SENDOOWAY_PRIVATE_AUTH=no: none is started here; start"
                        " sendooway-auth.socket)" if is_root else "")
    else:
        # our own authenticator will run as root: refuse what it would refuse
        refusal = cfg.backend_refusal(0)
        if refusal:
            return _fail(log, refusal)
        config_path = os.path.abspath(args.config)
        try:
            if many:
                connector, spawned, lifeline = spawn_daemon(
                    config_path, args.log, cfg.timeout, frontend_user=cfg.frontendUser)
            else:
                connector = spawn_pair(config_path, args.log, cfg.timeout,
                                       stderr_is_client=startup.stderr_is_client)
        except AuthLinkError as exc:
            if many and stop_requested():
                # stopped while its authenticator was starting: a stop of the
                # whole process group (systemd's KillMode=control-group, ^C)
                # ended that too; a clean stop, not a failure to start
                log.info("stopped while starting (%s)", exc)
                return 0
            return _fail(log, str(exc), EXIT_FAILURE)
        if root_only:
            log.info("started %s instead of the authenticator at %s", connector.describe(), path)
        else:
            log.info("no authenticator at %s: started %s", path, connector.describe())

    frontend = Frontend(cfg, tls_context=tls_context, implicit_tls=args.ssl,
                        channel_safe=args.nossl, connector=connector, tls_broken=tls_broken)
    if (cfg.mailerEncryption is MailerEncryption.REQUIRED and tls_context is None
            and not args.nossl and not tls_broken):  # (a broken one was logged above)
        log.warning("mailerEncryption = required but no sslCert/sslKey and no -S:"
                    " no client can log in")
    frontend.settings()  # fail now, not in a session, if the settings are wrong

    preload()
    _malloc_for_streaming()
    loop = asyncio.new_event_loop()
    try:
        uid, gid = drop_privileges(cfg.frontendUser)
    except PrivilegeError as exc:
        loop.close()
        return _fail(log, str(exc), EXIT_FAILURE)
    log.debug("running as uid %d gid %d", uid, gid)

    try:
        if many:
            loop.run_until_complete(serve_listening(frontend, listening))
        elif connection is not None:
            loop.run_until_complete(serve_connection(frontend, connection))
        else:
            loop.run_until_complete(serve_stdio(frontend))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
        if many:  # (serve_listening's SIGHUP handler does nothing once the loop is closed)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # "SIGHUP changes nothing", also now
        reap = getattr(connector, "reap", None)
        if reap is not None:
            reap()
        if lifeline >= 0:
            os.close(lifeline)  # the private authenticator stops
            try:
                spawned.wait(10)
            except Exception:  # it runs as root: nothing more we could do anyway
                pass
    if getattr(connector, "gone", False) and spawned is not None and spawned.returncode:
        # our private authenticator died (the watcher exits with its status;
        # one stopped with us, by the same stop, exits 0): a restart starts both
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())

