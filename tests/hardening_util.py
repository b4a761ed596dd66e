"""Helpers for the hardening tests (issue 8): a raw SMTP client that sends
exactly the bytes it is given, /proc readings of a process, and a scripted
upstream in a thread that misbehaves on purpose — all for driving the real
`sendooway`/`sendooway-auth` processes."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field


class RawClient:
    """A TCP client that writes bytes as given and reads whole SMTP replies."""

    def __init__(self, host: str, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[bytes]]:
        """One reply: its code and its lines (text after the code); (0, [])
        when the server closed the connection."""
        lines = []
        while True:
            line = self.file.readline(65536)
            if not line:
                return 0, lines
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), [l[4:].rstrip(b"\r\n") for l in lines]

    def cmd(self, data: bytes) -> tuple[int, list[bytes]]:
        self.send(data)
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes (after anything still unread)."""
        self.sock.settimeout(timeout)
        try:
            while self.file.read(65536):
                pass
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


def peak_rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmHWM"].split()[0])


def wait_for(predicate, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


# ---------------------------------------------------------------------------
# A scripted upstream: plain SMTP, one thread per connection; a verb answers
# with bytes, or with a callable(conn, lines) doing something nasty.

@dataclass
class ScriptedUpstream:
    replies: dict = field(default_factory=dict)
    greeting: bytes = b"220 scripted.upstream ESMTP\r\n"
    commands: list[bytes] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)   # what arrived after each 354
    dots: int = 0                                      # final dots received

    DEFAULTS = {
        "EHLO": b"250-scripted.upstream\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n",
        "HELO": b"250 scripted.upstream\r\n",
        "MAIL": b"250 2.1.0 ok\r\n", "RCPT": b"250 2.1.5 ok\r\n", "DATA": b"354 go ahead\r\n",
        "DOT": b"250 2.0.0 delivered\r\n", "RSET": b"250 2.0.0 ok\r\n", "NOOP": b"250 2.0.0 ok\r\n",
        "QUIT": b"221 2.0.0 bye\r\n",
    }

    def start(self) -> "ScriptedUpstream":
        self._lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def answer(self, key: str, conn: socket.socket, rfile) -> None:
        value = self.replies.get(key, self.DEFAULTS.get(key, b"502 5.5.2 what\r\n"))
        if callable(value):
            value(conn, rfile)
        else:
            conn.sendall(value)

    def _serve(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        try:
            if self.greeting:
                conn.sendall(self.greeting)
            while True:
                line = rfile.readline(4096)
                if not line:
                    return
                with self._lock:
                    self.commands.append(line)
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper().decode("ascii", "replace")
                self.answer(verb, conn, rfile)
                if verb == "DATA" and "DATA" not in self.replies:
                    body = bytearray()
                    while not body.endswith(b"\r\n.\r\n") and body != b".\r\n":
                        chunk = rfile.readline(65536)
                        if not chunk:
                            with self._lock:
                                self.data.append(bytes(body))
                            return
                        body += chunk
                    with self._lock:
                        self.data.append(bytes(body))
                        self.dots += 1
                    self.answer("DOT", conn, rfile)
                if verb == "QUIT":
                    return
        except OSError:
            pass
        finally:
            try:
                rfile.close()
                conn.close()
            except OSError:
                pass
