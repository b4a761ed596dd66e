"""Logging set-up shared by both programs: -l FILE, -l '&2' / -l - (stderr),
-l '&1' (stdout), or syslog with the mail facility."""

from __future__ import annotations

import asyncio
import atexit
import logging
import logging.handlers
import os
import sys
import time


DATEFMT = "%Y-%m-%d %H:%M:%S"
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


class _Formatter(logging.Formatter):
    """The standard formatter without two costs of every line: the pid is
    known once per process (not a getpid() per record) and the date is
    formatted once per second."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt, datefmt=DATEFMT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(DATEFMT, time.localtime(second))
            self._second = second
        return self._stamp

    def format(self, record: logging.LogRecord) -> str:
        if record.process is None:
            record.process = _PID[0]
        return super().format(record)


# the characters field() keeps as they are: printable ASCII but space and ="\\<>
_FIELD_PLAIN = "".join(chr(o) for o in range(33, 127) if chr(o) not in '="\\<>')


def field(value: str | None, limit: int = 96) -> str:
    """One `key=value` value that cannot forge a log line (a sender may hold
    spaces, '=' or '>' in a quoted local part): printable ASCII without
    space, '=', '"', '\\', '<' or '>'; everything else as \\xHH (\\uHHHH); '-' when
    empty; longer than `limit`, cut with '...'."""
    if not value:
        return "-"
    if type(value) is str and len(value) <= limit and not value.strip(_FIELD_PLAIN):
        return value  # (the common case: nothing to escape, nothing to cut)
    out = []
    for c in value[:limit]:
        o = ord(c)
        if 33 <= o < 127 and c not in '="\\<>':
            out.append(c)
        elif o < 256:
            out.append(f"\\x{o:02x}")
        else:
            out.append(f"\\u{o:04x}")
    return "".join(out) + ("..." if len(value) > limit else "")


def printable(value: str, limit: int = 500) -> str:
    """Free text for a log line (a file name, a parse error from a user's
    file): kept readable, control characters escaped so it stays one line
    and cannot move a terminal's cursor."""
    if type(value) is str and len(value) <= limit and value.isprintable():
        return value  # (the common case: nothing to escape, nothing to cut)
    out = []
    for c in value[:limit]:
        if c.isprintable():
            out.append(c)
        elif ord(c) < 256:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(f"\\u{ord(c):04x}")
    return "".join(out) + ("..." if len(value) > limit else "")


LOG_FAILURE_EVERY = 60.0  # seconds between two notes that the log cannot be written


def _quiet_failures(handler: logging.Handler, program: str, where: str) -> None:
    """A record the handler cannot write (a full disk, syslog gone) costs a
    one-line note on stderr at most every LOG_FAILURE_EVERY seconds, with a
    count of the lines lost, instead of logging's default: a traceback with
    the record's message and arguments on stderr for every line. (Under
    xinetd stderr is the client's connection; the frontend points it at
    /dev/null there, see its cli.)"""
    state = {"last": -LOG_FAILURE_EVERY, "lost": 0, "reason": ""}

    def note() -> None:
        try:
            sys.stderr.write(f"{program}: cannot write the log to {where} ({state['reason']}):"
                             f" {state['lost']} line(s) lost\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - nowhere left to say it
            pass
        state["lost"] = 0

    def handle_error(_record: logging.LogRecord) -> None:
        state["lost"] += 1
        exc = sys.exc_info()[1]
        state["reason"] = getattr(exc, "strerror", None) or type(exc).__name__
        now = time.monotonic()
        if now - state["last"] >= LOG_FAILURE_EVERY:
            state["last"] = now
            note()

    def at_exit() -> None:  # the lines lost since the last note
        if state["lost"] and os.getpid() == owner:
            note()

    owner = os.getpid()
    handler.handleError = handle_error  # type: ignore[method-assign]
    atexit.register(at_exit)


def setup_logging(target: str | None, program: str, level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger for `program` and return it.

    The file is opened now (before any privilege drop), in append mode.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if target in ("&2", "-", "&1"):
        stream = sys.stdout if target == "&1" else sys.stderr
        handler: logging.Handler = logging.StreamHandler(stream)
        fmt = f"%(asctime)s {program}[%(process)d]: %(message)s"
        where = "stdout" if target == "&1" else "stderr"
    elif target:
        # a new log file is 0640, whatever the umask (xinetd's gives 0644):
        # it names users, senders and client addresses
        os.close(os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOCTTY
                         | os.O_CLOEXEC, 0o640))
        handler = logging.FileHandler(target, mode="a", encoding="utf-8")
        fmt = f"%(asctime)s {program}[%(process)d]: %(message)s"
        where = target
    else:
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        fmt = f"{program}[%(process)d]: %(message)s"
        where = "syslog"
    handler.setFormatter(_Formatter(fmt))
    _quiet_failures(handler, program, where)
    # Neither program logs thread or process names: not looked up per line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Nor the caller's file, line or function: no walk up the stack per line
    # (the logging HOWTO's "Optimization"; the formats above show none).
    logging._srcfile = None
    root.addHandler(handler)
    root.setLevel(level)
    return logging.getLogger(program)


def log_failure(log: logging.Logger, message: str, *args) -> None:
    """log.exception(message, *args) in an `except` block: the traceback a
    bug needs; but a MemoryError is a shortage (RLIMIT_AS, RLIMIT_DATA),
    not a bug: one line saying so, without the dozens of lines a traceback
    takes for each session it ends."""
    if isinstance(sys.exc_info()[1], MemoryError):
        log.error(message + ": out of memory", *args)
    else:
        log.exception(message, *args)


ACCEPT_LOG_EVERY = 10.0  # seconds between two lines about failing accept()s


def quiet_accept_errors(loop, log: logging.Logger) -> None:
    """Make the event loop's report of a failing accept() (out of file
    descriptors or memory) one line every ACCEPT_LOG_EVERY seconds with a
    count, without a traceback (and any MemoryError it reports one line,
    without a traceback either). asyncio (3.11) logs an ERROR with a
    traceback for each of `backlog` tries in one pass, every second, for as
    long as the shortage lasts: thousands of lines a second into the log.
    Anything else goes to the handler there was."""
    previous = loop.get_exception_handler()
    state = {"last": -ACCEPT_LOG_EVERY, "count": 0}

    def handler(loop, context) -> None:
        message = str(context.get("message", ""))
        if isinstance(context.get("exception"), MemoryError):
            # (a transport that could not take the data it read: asyncio
            # closes it; its session ends with its own line)
            log.error("%s: out of memory", message)
            return
        if not message.startswith("socket.accept() out of system resource"):
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        state["count"] += 1
        now = time.monotonic()
        if now - state["last"] < ACCEPT_LOG_EVERY:
            return
        exc = context.get("exception")
        reason = getattr(exc, "strerror", None) or str(exc or "") or "unknown"
        log.error("cannot accept connections (%s: %s): %d time(s) in the last %.0f s;"
                  " clients wait in the listen queue until it passes", message, reason,
                  state["count"], min(now - state["last"], ACCEPT_LOG_EVERY))
        state["last"] = now
        state["count"] = 0

    loop.set_exception_handler(handler)


class Tally:
    """A warning about something a peer can repeat at will (a connection
    refused at a limit, one closed for silence): the first at once, then at
    most one line every EVERY seconds with how many happened since; those
    not told yet are told EVERY seconds after the last line, or by close(),
    so a burst is never left half said. `fmt` takes note()'s arguments (of
    the latest event) and then the count. Used from the event loop."""

    EVERY = 10.0

    def __init__(self, log: logging.Logger, fmt: str) -> None:
        self.log = log
        self.fmt = fmt
        self.args: tuple = ()
        self.last = float("-inf")
        self.unsaid = 0
        self.later: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def note(self, *args) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # (a timer of a loop that has ended never runs)
            self.loop, self.later = loop, None
        self.unsaid += 1
        self.args = args
        wait = self.last + self.EVERY - loop.time()
        if wait <= 0:
            self._say()
        elif self.later is None:
            self.later = loop.call_later(wait, self._say)

    def _say(self) -> None:
        self.later = None
        if not self.unsaid:
            return
        self.log.warning(self.fmt, *self.args, self.unsaid)
        self.last, self.unsaid = self.loop.time(), 0  # (note() set it: unsaid > 0)

    def close(self) -> None:
        if self.later is not None:
            self.later.cancel()
        self._say()
