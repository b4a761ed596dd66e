"""Review of socket activation and of the authenticator socket, played
hostile (a review named "activation"): both programs started as systemd
starts them, by the real `systemd-socket-activate` and by hand-made
environments (LISTEN_PID/LISTEN_FDS with crafted descriptors on fd 3...),
and the socket between the frontend and the authenticator attacked by a
process that runs as the frontend's own account (nobody, which other
services share).

What it found (each fixed, each test below failed before its fix):
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import types

import pytest

from sendooway_shared.protocol import VERSION, Welcome, encode
from tests.fakeworld import become
from tests.front_util import FRONT, NOBODY, front_config, login_plain

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts the programs as root")

NOBODY_USER = types.SimpleNamespace(uid=NOBODY, gid=NOBODY)


def _squat(path: str, as_user) -> tuple[int, int]:
    """Fork a process running as `as_user` that listens at `path`, plays
    the authenticator (a welcome) and reports what its connections sent.
    Returns (pid, read end of its report)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            become(as_user)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            os.chmod(path, 0o777)
            s.listen(8)
            os.write(w, b"R")
            s.settimeout(8)
            got = b""
            try:
                for _ in range(4):  # probes first, then the session's link
                    conn, _ = s.accept()
                    conn.settimeout(2)
                    try:
                        conn.sendall(encode(Welcome(VERSION)))
                        while chunk := conn.recv(4096):
                            got += chunk
                    except OSError:
                        pass
                    conn.close()
            except OSError:
                pass
            os.write(w, got)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"R"
    return pid, r


def _report(pid: int, r: int) -> bytes:
    got = b""
    while chunk := os.read(r, 65536):
        got += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return got


def test_a_squatter_running_as_the_frontend_user_gets_no_password(world, tmp_path):
    """DEFECT: the frontend trusted a listener at authSocket that runs as
    its own account (frontendUser, nobody by default) whatever the
    authBackend, where docs/security.md says: uid 0, or its own uid only
    for `authBackend = none` (the single-user daemon). nobody is shared by
    other services (the shipped units start the frontend as root for that
    very reason); one of them that could bind authSocket (a directory
    others may write to: no daemon refuses it in the xinetd `user = root`
    set-up, which runs none) got every login's user name and UNIX password
    from a root-started frontend.
    Now: with authBackend PAM (or LDAP) only a root listener is trusted;
    the frontend treats the squatter as no daemon and starts its own
    authenticator."""
    shared = tempfile.mkdtemp(prefix="sendooway-rv-act-")
    try:
        os.chmod(shared, 0o1777)
        path = os.path.join(shared, "auth.sock")
        pid, r = _squat(path, NOBODY_USER)
        try:
            config = front_config(tmp_path, world, f"authSocket = {path}\ntimeout = 5\n", tls=False)
            password = world.users["alice"].password
            script = f"EHLO c.test\r\nAUTH PLAIN {login_plain('alice', password)}\r\nQUIT\r\n"
            res = subprocess.run([FRONT, "-c", config, "-l", str(tmp_path / "front.log")],
                                 input=script.encode(), capture_output=True, timeout=30)
        finally:
            stolen = _report(pid, r)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert password.encode() not in stolen, "nobody's listener at authSocket heard alice's password"
    assert b"\r\n235 " in res.stdout, res.stdout  # her login, by the frontend's own authenticator
    log = (tmp_path / "front.log").read_text()
    assert password not in log
