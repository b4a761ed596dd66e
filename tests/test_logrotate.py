"""The shipped logrotate file, run by the real logrotate against running
programs that log to files: `sendooway -b` (with its private authenticator)
and the `sendooway-auth` daemon keep their log files open for as long as
they run, so the rotation must leave them logging into the emptied file,
with every line either in the rotated file or in the new one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests import deploy_world as dw
from tests.deploy_world import deployment, upstream  # noqa: F401 - fixtures

PACKAGED = Path(__file__).resolve().parent.parent / "packaging" / "logrotate" / "sendooway"

pytestmark = pytest.mark.skipif(not shutil.which("logrotate"), reason="logrotate not installed")


def _rotate(dep: dw.Deployment) -> None:
    """The packaged file with its path pointed at the deployment's logs,
    forced (as on its weekly run), with a private state file."""
    text = PACKAGED.read_text()
    assert "/var/log/sendooway*.log {" in text
    conf = dep.root / "logrotate.conf"
    conf.write_text(text.replace("/var/log/sendooway*.log", str(dep.root / "*.log")))
    r = subprocess.run(["logrotate", "-f", "-s", str(dep.root / "logrotate.state"), str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _sessions_in(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_rotating_the_log_of_a_running_sendooway_b(world, deployment):
    dep = deployment
    proc, port = dw.serve_b(dep)
    try:
        first = dw.smtp_session(world, port, body="Subject: one\r\n\r\nfirst\r\n")
        assert first["refused"] == {}
        dw.wait_for(lambda: "alice" in dep.front_log.read_text(), what="the first session's line")
        before = dep.front_log.read_text()
        _rotate(dep)
        rotated = dep.root / "front.log.1"
        assert rotated.read_text() == before  # the copy, delaycompress: not compressed yet
        assert dep.front_log.stat().st_size == 0

        second = dw.smtp_session(world, port, body="Subject: two\r\n\r\nsecond\r\n")
        assert second["refused"] == {}
        dw.wait_for(lambda: "alice" in dep.front_log.read_text(), what="the second session's line")
        after = dep.front_log.read_bytes()
        # appended: the new lines start the emptied file (no hole of NULs
        # up to the old size, as a writer without O_APPEND would leave)
        assert b"\0" not in after and after.startswith(b"20"), after[:80]
        assert proc.poll() is None  # still serving
        assert dw.smtp_session(world, port)["refused"] == {}
    finally:
        dw.stop(proc)


def test_rotating_the_log_of_the_running_daemon(world, deployment):
    dep = deployment
    daemon = dw.start_auth_daemon(dep, ["--failure-delay", "0"])
    try:
        dw.wait_for(lambda: dep.auth_log.read_text(), what="the daemon's start-up line")
        before = dep.auth_log.read_text()
        _rotate(dep)
        assert (dep.root / "auth.log.1").read_text() == before
        # a failed login makes the daemon log a line
        port = dw.free_tcp_port()
        front = subprocess.Popen(
            [dw.command("sendooway"), "-c", str(dep.config), "-l", str(dep.front_log),
             "-b", f"127.0.0.1:{port}"],
            env=dep.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)
        try:
            dw.wait_for(lambda: dw.listening(port), timeout=30, what="sendooway -b to listen")
            assert dw.wrong_password_session(port, world) == [535]
        finally:
            dw.stop(front)
        dw.wait_for(lambda: "alice" in dep.auth_log.read_text(), what="the failed login's line")
        after = dep.auth_log.read_bytes()
        assert b"\0" not in after and after.startswith(b"20"), after[:80]
        assert daemon.poll() is None
    finally:
        dw.stop(daemon)
