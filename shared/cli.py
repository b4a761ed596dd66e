"""Small pieces both command lines share."""

from __future__ import annotations

import argparse
import os
import sys

from .config import Config, ConfigError, load_config, socket_path_fits

DEFAULT_CONFIG = "/etc/sendooway.conf"
EXIT_CONFIG = 2
EXIT_NOT_WRITTEN = 3


class Parser(argparse.ArgumentParser):
    """argparse whose --help, --version and usage messages fail without a
    traceback: a reader that went away (`| head -1`) ends it quietly, another
    write error (a full disk) is one line on stderr; exit EXIT_NOT_WRITTEN.
    `fail`, when set, takes a usage error instead of stderr (an inetd
    client must get a 421, not the usage text) and returns the exit code."""

    fail = None

    def error(self, message):
        if self.fail is not None:
            raise SystemExit(self.fail(f"{message} (see {self.prog} --help)"))
        super().error(message)

    def _print_message(self, message, file=None):  # argparse's one writer
        if not message:
            return
        stream = file if file is not None else sys.stderr
        if stream is None:  # started with that descriptor closed
            return
        try:
            stream.write(message)
            stream.flush()
        except OSError as exc:
            tell_not_written(stream, exc, self.prog, "the text")
            if stream is not sys.stderr:  # a usage error keeps its own exit code
                raise SystemExit(EXIT_NOT_WRITTEN) from None


def listen_fds() -> tuple[str, int | None] | None:
    """systemd's LISTEN_FDS when LISTEN_PID names this process (sd_listen_fds(3);
    those of another, left in the environment, are not ours), else None: its
    text and the number it is (None when it is no plain ASCII number: no
    sign, no blank, no "²"; 00 is 0 and 01 is 1, as sd_listen_fds reads it)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    text = os.environ.get("LISTEN_FDS", "0")
    if not (text.isascii() and text.isdigit()):
        return text, None
    try:
        return text, int(text.lstrip("0") or "0")
    except ValueError:  # (more digits than int() takes from a string)
        return text, None


def socket_path_arg(value: str) -> str:
    """argparse type of a UNIX socket path option (--socket, --auth-socket)."""
    try:
        return socket_path_fits(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def tell_not_written(stream, exc: OSError, program: str, what: str) -> None:
    """After a failed write of `what` to `stream`: drop what is still
    buffered there (it must not fail again at exit) and say why on stderr,
    unless the reader just went away (`| head -1`) or stderr itself failed."""
    try:
        to_devnull(stream.fileno())
    except (OSError, ValueError):
        pass
    if stream is sys.stderr or isinstance(exc, BrokenPipeError):
        return
    try:
        print(f"{program}: cannot write {what}: {exc.strerror or exc}", file=sys.stderr)
    except (OSError, AttributeError, ValueError):
        pass


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
