"""`sendooway-auth`: the command line of the root authenticator."""

from __future__ import annotations

import argparse
import logging
import sys
import syslog

from sendooway_shared import __version__
from sendooway_shared.cli import (
    DEFAULT_CONFIG, EXIT_CONFIG, Parser, load_config_or_exit, socket_path_arg,
)
from sendooway_shared.log import setup_logging

EXIT_FAILURE = 1  # the host could not give the start what it needs (processes, descriptors)

DEFAULT_FAILURE_DELAY = 1.0
DEFAULT_THREADS = 8


def build_parser() -> Parser:
    p = Parser(
        prog="sendooway-auth",
        description="sendooway's root authenticator: checks passwords with PAM and reads"
        " the users' files. Runs in the foreground.",
        epilog="Under systemd socket activation (LISTEN_FDS) it serves the listening"
        " socket passed (Accept=no; a connection passed, Accept=yes, is refused)."
        " Exit status: 0 done; 1 --check found no usable mapping, or the daemon"
        " lost a part of itself; 2 bad command line, configuration, log file, or"
        " the daemon cannot start; 3 the text or report could not be written."
        " See sendooway-auth(8).",
    )
    p.add_argument("-V", "--version", action="version", version=f"sendooway-auth {__version__}")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="CONFIG",
                   help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("-l", "--log", metavar="LOGFILE",
                   help="append the log to LOGFILE; '&2' or '-' for stderr (default: syslog, mail)")
    p.add_argument("--socket", metavar="PATH", type=socket_path_arg,
                   help="listen on this UNIX socket (default: authSocket from the config)")
    p.add_argument("--check", metavar="USER",
                   help="print what USER's files say (files, mappings, errors) and exit")
    p.add_argument("--sender", metavar="ADDR",
                   help="with --check: show the route chosen for sender ADDR")
    p.add_argument("--fd", type=int, metavar="N",
                   help="internal: serve the one connected socket inherited as fd N and exit"
                   " when it closes (used by sendooway started as root)")
    # internal, not in -h: stop when the process that started this daemon
    # exits (for sendooway -b started as root and its private authenticator;
    # see docs/decisions/auth.md)
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    # internal, not in -h: the private authenticator of a listening frontend
    # (sendooway -b as root, no daemon): it ignores SIGHUP as the frontend
    # does, which serves on with the config read at start (sendooway(1));
    # a SIGHUP to their process group used to reload this half alone
    p.add_argument("--private", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--failure-delay", type=float, default=DEFAULT_FAILURE_DELAY, metavar="SECONDS",
                   help="base delay before answering a failed login; doubles with each recent"
                   f" failure of the user or client address, up to 15 s (default {DEFAULT_FAILURE_DELAY})")
    p.add_argument("--pam-threads", type=int, default=DEFAULT_THREADS, metavar="N",
                   help=f"PAM worker threads (default {DEFAULT_THREADS})")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    checking = args.check is not None
    if checking and not args.check:
        parser.error("--check needs a user name")
    if args.sender is not None and not checking:
        parser.error("--sender needs --check USER")
    if checking and (args.fd is not None or args.socket is not None):
        parser.error("--check cannot be combined with --fd or --socket")
    if args.fd is not None and args.socket is not None:
        parser.error("--fd and --socket exclude each other")
    if args.socket == "":
        parser.error("--socket needs a path")
    if args.exit_with_parent and (args.fd is not None or checking):
        parser.error("--exit-with-parent is for the daemon (--fd exits when its socket closes)")
    if args.private and (args.fd is not None or checking):
        parser.error("--private is for the daemon of a listening sendooway")
    if not 0 <= args.failure_delay <= 60:
        parser.error("--failure-delay must be from 0 to 60 seconds")
    if not 1 <= args.pam_threads <= 256:
        parser.error("--pam-threads must be from 1 to 256")
    cfg = load_config_or_exit(args.config, "sendooway-auth")

    if checking:
        from .check import report_to_stdout

        return report_to_stdout(cfg, args.check, args.sender)

    from ._server import StartupError, run_daemon, run_fd

    try:
        setup_logging(args.log, "sendooway-auth")
    except OSError as exc:
        print(f"sendooway-auth: cannot open log {args.log}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    # PAM modules log through libc's syslog(); without an ident of ours
    # their lines (pam_unix's failures, pam_faillock's locks) would be
    # tagged with the interpreter's name, python3
    syslog.openlog("sendooway-auth", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    log = logging.getLogger("sendooway-auth")
    try:
        if args.fd is not None:
            code = run_fd(cfg, args.fd, args.failure_delay)
        else:
            code = run_daemon(cfg, args.socket, args.failure_delay, args.pam_threads,
                              args.exit_with_parent,
                              config_path=None if args.private else args.config)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        print(f"sendooway-auth: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except (OSError, RuntimeError) as exc:
        # out of processes, threads or descriptors while starting (the fork
        # server, the PAM threads): a line saying so, not a traceback
        why = getattr(exc, "strerror", None) or str(exc)
        log.error("cannot start: %s", why)
        print(f"sendooway-auth: cannot start: {why}", file=sys.stderr)
        code = EXIT_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main())
