"""Tests written from a mutation review of the security-critical modules
earlier mutation reviews touched least: the frontend's drop to frontendUser
(sendooway_front/_privileges.py), PAM through ctypes (sendooway_auth/_pam.py),
the authenticator's permit table (sendooway_auth/_permits.py) and its log
values (sendooway_auth/_logfmt.py). Each mutant was made by hand, one at a
time, and run against the existing tests naming the module; a survivor is
either equivalent (why below) or pinned by a test here.

TABLE
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from sendooway_auth._logfmt import field, text

from .auth_helpers import (  # noqa: F401 - daemon is a fixture
    MATRIX, Daemon, add_pam_service, build_test_pam_module, children, daemon, login,
)
from .front_util import FRONT, NOBODY, proc_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts processes as root and nobody")


@pytest.fixture
def pam_module(world):
    path = build_test_pam_module(world)
    if path is None:
        pytest.skip("needs a C compiler (cc) to build the test PAM module")
    return path


def _greeted(argv, **popen) -> subprocess.Popen:
    """A one-session frontend that has sent its 220 (it drops privileges before)."""
    env = {k: v for k, v in os.environ.items() if k != "SENDOOWAY_PRIVATE_AUTH"}
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, **popen)
    first = proc.stdout.readline()
    if not first.startswith(b"220 "):
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        pytest.fail(f"no greeting: {first!r} {err!r}")
    return proc


def _quit(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.write(b"QUIT\r\n")
        proc.stdin.flush()
        proc.communicate(timeout=15)
    except (BrokenPipeError, subprocess.TimeoutExpired):
        proc.kill()
        proc.communicate(timeout=5)


# ------------------------------------------------------------------ _privileges


def test_a_frontend_started_as_nobody_is_not_dumpable_while_it_serves(tmp_path):
    """Mutants P2 (no PR_SET_DUMPABLE 0) and P11 (PR_SET_DUMPABLE 1): a
    frontend exec'd as nobody (xinetd `user = nobody`) stays dumpable unless
    it says otherwise, and any other process of nobody may then ptrace it or
    read /proc/PID/mem, where passwords pass. The kernel shows a process
    that is not dumpable with its /proc/PID/mem owned by root (else by its
    own uid); the frontend's, while it serves, must be."""
    proc = _greeted([FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket",
                     str(tmp_path / "none.sock")],
                    user=NOBODY, group=NOBODY, extra_groups=[])
    try:
        assert proc_ids(proc.pid)["Uid"] == [NOBODY] * 4
        assert os.stat(f"/proc/{proc.pid}/mem").st_uid == 0
    finally:
        _quit(proc)


def test_the_private_authenticator_starts_with_roots_own_group_and_groups(tmp_path):
    """Mutants A4 (the egid not taken back after the socket probe) and A5 (the
    supplementary groups not given back): acting_as must leave root exactly
    as it found it. The probe runs before a root frontend starts its own
    authenticator, which inherits the ids: with nobody's egid it created
    files as group nobody and checked access with nobody's group."""
    proc = _greeted([FRONT, "-c", "/dev/null", "-l", "&2", "--auth-socket",
                     str(tmp_path / "none.sock")], extra_groups=[41002, 41003])
    try:
        kids = children(proc.pid)
        assert len(kids) == 1, kids
        ids = proc_ids(kids[0])
        assert ids["Uid"] == [0] * 4
        assert ids["Gid"] == [0] * 4
        assert sorted(ids["Groups"]) == [41002, 41003]
        assert proc_ids(proc.pid)["Uid"] == [NOBODY] * 4  # (and the frontend dropped)
    finally:
        _quit(proc)


# ------------------------------------------------------------------ _pam

# A module that leaves data with PAM, as pam_sss, pam_krb5 or pam_systemd do;
# its cleanup, run by pam_end, notes the status pam_end was given.
_STATUS_MODULE_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <security/pam_modules.h>
static void noted(pam_handle_t *h, void *data, int status) {
    FILE *f = fopen((const char *)data, "w");
    if (f) { fprintf(f, "%d", status & ~(PAM_DATA_REPLACE | PAM_DATA_SILENT)); fclose(f); }
    free(data);
}
int pam_sm_authenticate(pam_handle_t *h, int flags, int argc, const char **argv) {
    pam_set_data(h, "sendooway-mut24", strdup(argv[0]), noted);
    return PAM_IGNORE;
}
int pam_sm_setcred(pam_handle_t *h, int flags, int argc, const char **argv) { return 0; }
"""


@pytest.fixture
def status_module(tmp_path):
    src = tmp_path / "pam_mut24_status.c"
    src.write_text(_STATUS_MODULE_C)
    path = tmp_path / "pam_mut24_status.so"
    cc = subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(src), "-lpam"],
                        capture_output=True, text=True)
    if cc.returncode != 0:
        pytest.skip(f"cannot build the test PAM module: {cc.stderr[-200:]}")
    return str(path)


def test_pam_end_tells_the_modules_how_the_login_ended(tmp_path, tmp_config, world,
                                                        status_module, pam_module):
    """Mutant Q9 (pam_end always given PAM_SUCCESS): pam_end(3) hands its
    status to every module's cleanup, and modules act on it (a Kerberos
    module keeps the credential cache of a login that succeeded and removes
    a failed one's). A wrong password must end as PAM_AUTH_ERR (7), a right
    one as PAM_SUCCESS."""
    noted = tmp_path / "status"
    path = os.path.join(world.pam_dir, "sendooway-mut24-status")
    with open(path, "w") as f:
        f.write(f"auth optional {status_module} {noted}\n"
                f"auth required {MATRIX} passdb={world.passdb}\n"
                f"account required {pam_module} rc=0\n")
    d = Daemon(tmp_path, tmp_config("pamService = sendooway-mut24-status\n")).start()
    try:
        for password, status in (("wrong-Pw-zz", "7"), (world.users["alice"].password, "0")):
            if noted.exists():
                noted.unlink()
            reply = login(d.connect(), "alice", password)
            assert (reply.TYPE == "auth_ok") == (status == "0"), reply
            deadline = time.monotonic() + 5
            while not noted.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert noted.read_text() == status, password == "wrong-Pw-zz"
    finally:
        d.stop()


def test_a_password_pam_says_must_be_changed_is_logged_as_expired(daemon, world, pam_module):
    """Mutant Q18 (PAM_NEW_AUTHTOK_REQD dropped from the reasons): the
    account check's "this password must be changed" (12) is a refusal the
    log names `password-expired`, as docs/protocol.md lists it, so that the
    admin sees why a right password was refused, not `pam-error-12`."""
    service = add_pam_service(world, "mut24-chpw", pam_module, account_rc=12)
    d = daemon(f"pamService = {service}\n")
    reply = login(d.connect(), "dave", world.users["dave"].password, client="192.0.2.88")
    assert reply.TYPE == "auth_fail", reply
    assert "auth failed: user=dave client=192.0.2.88 reason=password-expired " in (
        d.wait_log("auth failed:"))


# ------------------------------------------------------------------ _logfmt


def test_log_values_are_cut_exactly_at_their_documented_lengths():
    """Mutants L1 (field cut at 97) and L3 (text cut at 501): a user name or
    sender is kept whole up to 96 characters and a free text up to 500,
    one more is cut with '...', so a line stays within what a log reader
    (and fail2ban's filter) was written for."""
    assert field("u" * 96) == "u" * 96
    assert field("u" * 97) == "u" * 96 + "..."
    assert text("t" * 500) == "t" * 500
    assert text("t" * 501) == "t" * 500 + "..."
