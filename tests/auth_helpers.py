"""Helpers for the authenticator's tests: a real sendooway-auth daemon in a
subprocess (inside the fake world), raw-frame clients, extra PAM services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import msgpack
import pytest

from sendooway_shared.protocol import (
    REPLIES, VERSION, AuthRequest, BlockingChannel, FrameDecoder, Hello, Message, RouteRequest,
)
from sendooway_shared.types import Secret

MATRIX = "/usr/lib/x86_64-linux-gnu/pam_wrapper/pam_matrix.so"


# A tiny PAM module for tests: pam_wrapper cannot load the system's modules
# (pam_faildelay, pam_exec, pam_deny: "Module is unknown"), and pam_matrix has
# no delay. It needs no libpam symbols, so it builds without headers.
_TEST_MODULE_C = r"""
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static int arg(int argc, const char **argv, const char *key, long dflt) {
    size_t n = strlen(key);
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], key, n) == 0 && argv[i][n] == '=') return atol(argv[i] + n + 1);
    return dflt;
}
int pam_sm_authenticate(void *h, int f, int argc, const char **argv) {
    long us = arg(argc, argv, "sleep_us", 0);
    if (us > 0) usleep(us);
    return arg(argc, argv, "rc", 25);  /* PAM_IGNORE */
}
int pam_sm_setcred(void *h, int f, int argc, const char **argv) { return 0; }
int pam_sm_acct_mgmt(void *h, int f, int argc, const char **argv) {
    return arg(argc, argv, "rc", 0);
}
"""


def build_test_pam_module(world) -> str | None:
    """Build (once) and return the test PAM module, or None without a C compiler."""
    import shutil
    path = os.path.join(world.root, "pam_sendooway_test.so")
    if os.path.exists(path):
        return path
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = path[:-3] + ".c"
    with open(src, "w") as f:
        f.write(_TEST_MODULE_C)
    res = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", path + ".tmp", src],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return None
    os.rename(path + ".tmp", path)
    return path


def add_pam_service(world, name: str, module: str, fail_sleep: float = 0.0,
                    account_rc: int = 0) -> str:
    """A PAM service in the world (seen by processes started afterwards).

    Passwords are pam_matrix's; fail_sleep makes a failed check take that
    long, as pam_unix's failure delay does on a real system (a good one stays
    fast); account_rc is what the account check returns (13 = expired)."""
    lines = [f"auth [success=done default=ignore] {MATRIX} passdb={world.passdb}",
             f"auth requisite {module} sleep_us={int(fail_sleep * 1e6)} rc=7",
             f"account required {module} rc={account_rc}"]
    path = os.path.join(world.pam_dir, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return name


class Daemon:
    """sendooway-auth as a subprocess, ready when it sent READY=1."""

    def __init__(self, tmp_path, config_path: str, extra_args=(), failure_delay: float = 0.0,
                 env=None, socket_path: str | None = None) -> None:
        self.dir = str(tmp_path)
        self.socket_path = socket_path or os.path.join(self.dir, "run", "auth.sock")
        self.log_path = os.path.join(self.dir, "auth.log")
        self.config_path = config_path
        self.args = [sys.executable, "-m", "sendooway_auth.cli", "-c", config_path,
                     "-l", self.log_path, "--socket", self.socket_path,
                     "--failure-delay", str(failure_delay), *extra_args]
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "Daemon":
        notify_path = os.path.join(self.dir, "notify.sock")
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(0.1)
        env = dict(self.env, NOTIFY_SOCKET=notify_path)
        self.proc = subprocess.Popen(self.args, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    self.ready_message = notify.recv(256).decode()
                    break
                except socket.timeout:
                    # a daemon that stopped (a config error) will never be ready
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"daemon not ready; log: {self.log()}") from None
        finally:
            notify.close()
        return self

    def connect(self, timeout: float = 10.0) -> BlockingChannel:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.socket_path)
        return BlockingChannel(s, REPLIES, timeout=timeout)

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not in log:\n{self.log()}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream:
                    stream.close()


def checked_daemons(tmp_path, tmp_config, secrets: list[str]):
    """The body of a daemon fixture: yields start(conf, **Daemon kwargs) ->
    a started Daemon; at the end each is stopped and its log checked for
    `secrets` and internal errors."""
    started = []

    def start(conf: str = "", **kwargs) -> Daemon:
        d = Daemon(tmp_path / f"d{len(started)}", tmp_config(conf, f"auth{len(started)}.conf"),
                   **kwargs)
        os.makedirs(d.dir, exist_ok=True)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()
        log = d.log()
        for pw in secrets:
            assert pw not in log, f"password leaked into the log: {pw}"
        # our own bugs fail loudly: no connection ever hit an internal error
        assert "internal error" not in log and "Traceback" not in log


@pytest.fixture
def daemon(tmp_path, tmp_config, clean_homes):
    """start(conf, **Daemon kwargs) -> a started Daemon; at the end each is
    stopped and its log checked for passwords and internal errors."""
    yield from checked_daemons(tmp_path, tmp_config,
                               all_passwords(clean_homes) + ["fm-Secret-A1", "wrong-Pw-zz"])


@contextlib.contextmanager
def fd_authenticator(conf: str, log: str):
    """`sendooway-auth --fd N` serving one end of a socketpair, as a frontend
    started as root runs it; yields (process, the other end). Killed at the
    end if it is still running."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # SIGHUP as a frontend's child has it, even under a test run started by nohup
    proc = subprocess.Popen([sys.executable, "-m", "sendooway_auth.cli", "-c", conf, "-l", log,
                             "--fd", str(theirs.fileno())], pass_fds=[theirs.fileno()],
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    theirs.close()
    try:
        yield proc, ours
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def fork_server(d: Daemon) -> int:
    (pid,) = children(d.proc.pid)
    return pid


def workers(d: Daemon, count: int | None = None, timeout: float = 5.0) -> dict[int, int]:
    """The daemon's reader workers: {pid: uid}; with `count`, wait until
    there are that many."""
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for pid in children(fork_server(d)):
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f)
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields["State"].split()[0] != "Z":
                found[pid] = int(fields["Uid"].split()[0])
        if count is None or (len(found) == count and 0 not in found.values()):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} workers, found {found}")
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait (bounded) until the process is no more. (5 s: on a loaded
    machine a worker told to go may wait that long to be scheduled.)"""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def as_user(uid: int, gid: int, action) -> object:
    """Run action() in a forked child that has become uid/gid; its result
    (or the exception's class name) comes back."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                result = action()
            except Exception as exc:  # noqa: BLE001
                result = type(exc).__name__
            os.write(w, msgpack.packb(result))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return msgpack.unpackb(data)


def login(ch: BlockingChannel, user: str, password: str, client: str = "192.0.2.7",
          session: str = "s1") -> Message:
    welcome = ch.request(Hello(VERSION, session, client))
    assert welcome.TYPE == "welcome", welcome
    return ch.request(AuthRequest(user, Secret(password)))


def route(ch: BlockingChannel, sender: str) -> Message:
    return ch.request(RouteRequest(sender))


def raw_frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


async def replies_until_closed(sock: socket.socket) -> list[Message]:
    """Every frame the peer of `sock` (non-blocking, on the running loop)
    sends until it closes the connection or resets it."""
    loop = asyncio.get_running_loop()
    out = b""
    while True:
        try:
            chunk = await loop.sock_recv(sock, 65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return FrameDecoder(REPLIES).feed(out)


def closed_after(ch: BlockingChannel, timeout: float = 5.0) -> bool:
    """True when the peer closes the connection (after anything pending)."""
    ch.sock.settimeout(timeout)
    try:
        while True:
            data = ch.sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def all_passwords(world) -> list[str]:
    return [u.password for u in world.users.values()]
