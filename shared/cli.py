"""Small pieces both command lines share."""

from __future__ import annotations

import os
import sys

from .config import Config, ConfigError, load_config

DEFAULT_CONFIG = "/etc/sendooway.conf"
EXIT_CONFIG = 2


def to_devnull(fd: int) -> None:
    """Point `fd` at /dev/null (what is written there is dropped)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    os.dup2(null, fd)
    os.close(null)


def load_config_or_exit(path: str, program: str) -> Config:
    """Load the config; on error print `program: file:line: what` and exit 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
