"""Helpers for the frontend's end-to-end tests: the real `sendooway`
command in its modes, next to a real `sendooway-auth` daemon."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
import signal
import smtplib
import socket
import subprocess
import sys
import time

from .fakeworld import free_port

BIN = os.path.dirname(sys.executable)
FRONT = os.path.join(BIN, "sendooway")
NOBODY = 65534


@contextlib.contextmanager
def open_tmp():
    """A temp dir (pathlib.Path) the frontend user can traverse, removed after."""
    d = tempfile.mkdtemp(prefix="sendooway-front-")
    os.chmod(d, 0o755)
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def front_config(tmp, world, extra: str = "", tls: bool = True,
                 name: str = "sendooway.conf", timeout: int = 30) -> str:
    path = os.path.join(str(tmp), name)
    lines = [f"authSocket = {os.path.join(str(tmp), 'run', 'auth.sock')}", f"timeout = {timeout}",
             "localname = mx.test"]
    if tls:
        lines += [f"sslCert = {world.cert_file}", f"sslKey = {world.key_file}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + extra)
    os.chmod(str(tmp), 0o755)
    os.chmod(path, 0o644)
    return path


@contextlib.contextmanager
def front_with_daemon(tmp, world, config: str, *upstreams):
    """A `sendooway -b` on `config` next to its `sendooway-auth` daemon,
    both in `tmp`; yields the Frontend (with .world and .up, the first of
    `upstreams`) and stops all three, and the other upstreams, afterwards."""
    from .auth_helpers import Daemon

    daemon = Daemon(tmp, config).start()
    front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
    front.world, front.up = world, upstreams[0] if upstreams else None
    try:
        yield front
    finally:
        front.stop()
        daemon.stop()
        for up in upstreams:
            up.stop()


def wait_port(host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"frontend exited with {proc.returncode}")
        with socket.socket(family) as s:
            try:
                s.connect((host, port))
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def _listener_is(proc: subprocess.Popen, port: int) -> bool:
    """Does `proc` (or a child of it) hold the socket listening on `port`?
    True when /proc cannot tell (not root: the frontend runs as nobody)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
        except OSError:
            return True
    pids = [proc.pid]
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            pids += [int(c) for c in f.read().split()]
    except (OSError, ProcessLookupError):
        pass
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, ProcessLookupError):
            continue
        except OSError:
            return True  # (not ours to read)
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return True
            except OSError:
                continue
    return False


def pair_authenticator_waiting(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Wait until the `sendooway-auth --fd` child of a root-started stdio
    frontend (`proc`) waits for its first request: its event loop made and
    its main thread asleep. The 220 and the 250 come before that, and under
    load its start (an interpreter and its imports) took a second, which a
    test timing the first AUTH took for the login's delay."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                kids = [int(p) for p in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            kids = []
        for pid in kids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"\0--fd\0" not in f.read():
                        continue
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except (FileNotFoundError, ProcessLookupError):
                continue  # (gone, or a descriptor closed while listed)
            if state == "S" and "anon_inode:[eventpoll]" in links:
                return
        time.sleep(0.02)
    raise AssertionError(f"no authenticator of pid {proc.pid} waiting after {timeout} s")


class Frontend:
    """`sendooway -b` as a subprocess."""

    def __init__(self, config: str, log: str, args=(), host: str = "127.0.0.1",
                 port: int | None = None, bind: str | None = None, env=None, argv0=None) -> None:
        self.host = host
        # a port free_port() picked here may be taken by another process (an
        # xdist worker's server, a client's source port) before the frontend
        # binds it: start() then tries another. A port or -b the test chose
        # is kept as it is.
        self._picked = port is None and bind is None
        self.port = port or free_port(host if host != "::1" else "::1")
        self.log_path = log
        self._argv = lambda bind: [*(argv0 or [FRONT]), "-c", config, "-l", log, "-b", bind, *args]
        self.argv = self._argv(bind or self._bind_for(self.port))
        self.env = env
        self.proc: subprocess.Popen | None = None

    def _bind_for(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    def start(self) -> "Frontend":
        for attempt in range(4):
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                wait_port(self.host, self.port, self.proc)
                if not self._picked or _listener_is(self.proc, self.port):
                    return self
                # another process listens on the port we picked: ours fails
                self.proc.wait(15)
                out, err = self.proc.communicate(timeout=5)
            except (RuntimeError, subprocess.TimeoutExpired):
                if self.proc.poll() is None:
                    self.proc.kill()
                out, err = self.proc.communicate(timeout=5)
            text = err.decode(errors="replace")
            if self._picked and attempt < 3 and f":{self.port}: Address already in use" in text:
                self.port = free_port(self.host)
                self.argv = self._argv(self._bind_for(self.port))
                continue
            raise RuntimeError(f"frontend did not start: {text} {self.log()}")
        raise AssertionError("unreachable")

    def smtp(self, timeout: float = 20) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, local_hostname="client.test", timeout=timeout)

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for s in (self.proc.stdout, self.proc.stderr):
            if s:
                s.close()
        return self.proc.returncode


def proc_ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid and Groups lines of /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                out[key] = [int(v) for v in value.split()]
    return out


class ClaimingSMTP(smtplib.SMTP):
    """smtplib behind a PROXY protocol v1 balancer claiming `client`."""

    def __init__(self, client: str, *a, **kw) -> None:
        self.client = client
        super().__init__(*a, **kw)

    def _get_socket(self, host, port, timeout):
        s = super()._get_socket(host, port, timeout)
        s.sendall(f"PROXY TCP4 {self.client} 127.0.0.1 40000 {port}\r\n".encode())
        return s


def login_plain(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def stdio_session(argv, script: bytes, env=None, timeout: float = 30, user=None):
    """Run the frontend on pipes (fd 0 and fd 1 are different), feed `script`
    and return (stdout, stderr, returncode)."""
    kwargs = {}
    if user is not None:
        kwargs = dict(user=user, group=user, extra_groups=[])
    r = subprocess.run(argv, input=script, capture_output=True, timeout=timeout, env=env, **kwargs)
    return r.stdout, r.stderr, r.returncode


def socket_client_session(argv, send: bytes, stderr_is_client: bool = True,
                          timeout: float = 20, env=None) -> tuple[bytes, int | None]:
    """Run the frontend as inetd would, one end of a socketpair its fd 0 and
    1 (and fd 2 too when `stderr_is_client`, as xinetd does), send `send`
    from the other end and read until the frontend closes it (or `timeout`).
    Returns (all the client read, the exit status)."""
    client, server = socket.socketpair()
    proc = subprocess.Popen(argv, stdin=server.fileno(), stdout=server.fileno(),
                            stderr=server.fileno() if stderr_is_client else subprocess.DEVNULL,
                            env=env)
    server.close()
    client.settimeout(timeout)
    seen = b""
    try:
        client.sendall(send)
        while chunk := client.recv(65536):
            seen += chunk
    except socket.timeout:
        pass
    finally:
        client.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return seen, proc.returncode
