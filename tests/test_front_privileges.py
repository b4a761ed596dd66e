"""The privilege drop: uid, gid and groups become the frontend user's, root
cannot be regained, and a drop that cannot happen means no service."""

from __future__ import annotations

import subprocess
import sys

from .front_util import FRONT

PROBE = """
import os, sys
os.setgroups([0, 4, 27])
from sendooway_front._privileges import PrivilegeError, drop_privileges
try:
    print(drop_privileges(sys.argv[1]))
except PrivilegeError as e:
    print("refused:", e); sys.exit(3)
print(os.getresuid(), os.getresgid(), os.getgroups())
for f in (lambda: os.setuid(0), lambda: os.seteuid(0), lambda: os.setgroups([0])):
    try:
        f(); print("REGAINED")
    except PermissionError:
        pass
import resource; print("core", resource.getrlimit(resource.RLIMIT_CORE))
"""


def probe(user):
    return subprocess.run([sys.executable, "-c", PROBE, user], capture_output=True, text=True,
                          timeout=30)


def test_drop_to_nobody_is_complete_and_final(world):
    r = probe("nobody")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "(65534, 65534)"
    assert lines[1] == "(65534, 65534, 65534) (65534, 65534, 65534) []"
    assert "REGAINED" not in r.stdout
    assert "core (0, 0)" in r.stdout


def test_unknown_or_root_frontend_user_is_refused(world):
    r = probe("no-such-user")
    assert r.returncode == 3 and "does not exist" in r.stdout
    r = probe("root")
    assert r.returncode == 3 and "is root" in r.stdout


def test_frontend_does_not_serve_when_the_drop_fails(world, tmp_path):
    cfg = tmp_path / "c.conf"
    cfg.write_text("frontendUser = no-such-user\n")
    r = subprocess.run([FRONT, "-c", str(cfg), "-l", "&2", "--auth-socket", str(tmp_path / "x")],
                       input=b"EHLO x\r\n", capture_output=True, timeout=30)
    assert r.returncode == 1
    assert r.stdout == b""  # not even a greeting
    assert b"frontendUser 'no-such-user' does not exist" in r.stderr
