"""Both commands: -h lists every option of DESIGN.md, -V prints the version,
a broken config is reported as file:line on stderr with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sendooway_shared import __version__

BIN = os.path.dirname(sys.executable)
FRONT = os.path.join(BIN, "sendooway")
AUTH = os.path.join(BIN, "sendooway-auth")


def run(*args, timeout=30):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("cmd, options", [
    (FRONT, ["-h", "-V", "-s", "-S", "-c", "-b", "-l", "--auth-socket"]),
    (AUTH, ["-c", "-l", "--socket", "--check", "--sender", "-V"]),
])
def test_help_lists_every_option(cmd, options):
    r = run(cmd, "-h")
    assert r.returncode == 0, r.stderr
    for opt in options:
        assert opt in r.stdout, f"{opt} missing from {os.path.basename(cmd)} -h"


@pytest.mark.parametrize("cmd", [FRONT, AUTH])
def test_version(cmd):
    r = run(cmd, "-V")
    assert r.returncode == 0
    assert __version__ in r.stdout


@pytest.mark.parametrize("cmd", [FRONT, AUTH])
def test_broken_config_exits_2_with_file_and_line(cmd, tmp_path):
    conf = tmp_path / "broken.conf"
    conf.write_text("timeout = 30\nsmarthostMaping = fetchmail:%h/.fetchmailrc\n")
    r = run(cmd, "-c", str(conf), "-l", "&2")
    assert r.returncode == 2
    assert f"{conf}:2: unknown keyword 'smarthostMaping'" in r.stderr
    assert "did you mean 'smarthostMapping'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", [FRONT, AUTH])
def test_missing_config_exits_2(cmd, tmp_path):
    r = run(cmd, "-c", str(tmp_path / "missing.conf"), "-l", "&2")
    assert r.returncode == 2
    assert "missing.conf: cannot read" in r.stderr
    assert "Traceback" not in r.stderr
