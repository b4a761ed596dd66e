"""Logging set-up shared by both programs: -l FILE, -l '&2' / -l - (stderr),
or syslog with the mail facility."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys


def setup_logging(target: str | None, program: str, level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger for `program` and return it.

    The file is opened now (before any privilege drop), in append mode.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if target in ("&2", "-"):
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        fmt = f"%(asctime)s {program}[%(process)d]: %(message)s"
    elif target:
        handler = logging.FileHandler(target, mode="a", encoding="utf-8")
        fmt = f"%(asctime)s {program}[%(process)d]: %(message)s"
    else:
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        fmt = f"{program}[%(process)d]: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    return logging.getLogger(program)
