"""`sendooway`: the command line of the frontend."""

from __future__ import annotations

import argparse
import sys

from sendooway_shared import __version__
from sendooway_shared.cli import DEFAULT_CONFIG, load_config_or_exit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sendooway",
        description="Multi-user SMTP submission proxy (frontend). Without -b it serves"
        " one SMTP session on stdin/stdout (inetd, xinetd).",
    )
    p.add_argument("-V", "--version", action="version", version=f"sendooway {__version__}")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("-s", "--ssl", action="store_true",
                     help="start the TLS handshake at once (SMTPS, port 465)")
    tls.add_argument("-S", "--nossl", action="store_true",
                     help="the channel is already safe: no STARTTLS, counts as encrypted")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="CONFIG",
                   help=f"configuration file (default {DEFAULT_CONFIG}; /dev/null = defaults)")
    p.add_argument("-b", "--bind", metavar="[ADDR:]PORT",
                   help="listen for many sessions on [ADDR:]PORT instead of stdin/stdout")
    p.add_argument("-l", "--log", metavar="LOGFILE",
                   help="append the log to LOGFILE; '&2' or '-' for stderr (default: syslog, mail)")
    p.add_argument("--auth-socket", metavar="PATH",
                   help="the sendooway-auth daemon's socket (default: authSocket from the config)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_config_or_exit(args.config, "sendooway")
    print("sendooway: the SMTP frontend is not built yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
