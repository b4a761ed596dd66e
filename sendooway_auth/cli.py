"""`sendooway-auth`: the command line of the root authenticator."""

from __future__ import annotations

import argparse
import sys

from sendooway_shared import __version__
from sendooway_shared.cli import DEFAULT_CONFIG, load_config_or_exit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sendooway-auth",
        description="sendooway's root authenticator: checks passwords with PAM and reads"
        " the users' files. Runs in the foreground.",
    )
    p.add_argument("-V", "--version", action="version", version=f"sendooway-auth {__version__}")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="CONFIG",
                   help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("-l", "--log", metavar="LOGFILE",
                   help="append the log to LOGFILE; '&2' or '-' for stderr (default: syslog, mail)")
    p.add_argument("--socket", metavar="PATH",
                   help="listen on this UNIX socket (default: authSocket from the config)")
    p.add_argument("--check", metavar="USER",
                   help="print what USER's files say (files, mappings, errors) and exit")
    p.add_argument("--sender", metavar="ADDR",
                   help="with --check: show the route chosen for sender ADDR")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sender and not args.check:
        build_parser().error("--sender needs --check USER")
    load_config_or_exit(args.config, "sendooway-auth")
    print("sendooway-auth: not built yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
