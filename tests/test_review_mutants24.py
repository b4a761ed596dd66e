"""Tests written from a mutation review of the security-critical modules
earlier mutation reviews touched least: the frontend's drop to frontendUser
(sendooway_front/_privileges.py), PAM through ctypes (sendooway_auth/_pam.py),
the authenticator's permit table (sendooway_auth/_permits.py) and its log
values (sendooway_auth/_logfmt.py). Each mutant was made by hand, one at a
time, and run against the existing tests naming the module; a survivor is
either equivalent (why below) or pinned by a test here. 79 mutants: 52
killed by the suite before, 11 by the tests here, 13 equivalent, 3 left
(Q14, Q19, Q26: why below). Q21's survivor hid a defect, fixed with
its test: a pamService naming a path went without the missing-file
warning. Mutants were run against test_front_privileges, test_review_
mutants7 (its privilege tests), test_review_localuser, test_review_pam,
test_review_mutants9, test_auth_faults, test_review_mutants,
test_auth_permits, test_review_mutants17/18, test_review_authframes,
test_review_authboundary, test_review_logs, test_auth_cli,
test_review_coverage and test_auth_workers, as each module needed.

Killed-by names are test files (tests/...) and, shortened, their tests;
"new" is a test in this file, checked to fail with its mutant and pass
without it.

id   place                          change                                  result
---  -----------------------------  --------------------------------------  ------------------------------
P1   _privileges.drop_privileges    no RLIMIT_CORE (0, 0)                   test_front_privileges: drop_to_nobody
P2   drop_privileges                no _not_dumpable()                      equivalent: cli.main made it
                                                                            undumpable at start already; both
                                                                            removed: new, started_as_nobody
P3   drop_privileges                non-root test `and` -> `or`             mutants7: real_uid_root
P4   drop_privileges                root frontendUser accepted              test_front_privileges: root_is_refused
P5   drop_privileges                no setgroups([])                        test_front_privileges: drop_to_nobody
P6   drop_privileges                gids set from the uid                   mutants7: own_group_not_its_uid
P7   drop_privileges                the ids are not verified after          equivalent: setgroups/setresgid/
                                                                            setresuid take effect whole or
                                                                            raise; no real kernel differs
P8   drop_privileges                no regain attempts                      mutants7: keeps_capabilities
P9   drop_privileges                regain loop stops after setuid(0)       equivalent: the three regains need
                                                                            the capabilities a uid change keeps
                                                                            or drops together (a start without
                                                                            CAP_SETUID cannot drop at all)
P10  drop_privileges                saved uid left 0                        test_front_privileges: drop_to_nobody
P11  _not_dumpable                  PR_SET_DUMPABLE 1                       new: started_as_nobody_is_not_dumpable
P12  drop_privileges                a non-root start drops as well          new: started_as_nobody_is_not_dumpable
P13  acting_as                      unknown user raises KeyError            test_front_privileges: drop_fails
P14  acting_as                      also for a root frontendUser            equivalent: the drop refuses root
P15  _back_to_root                  seteuid(0) not first                    new: private_authenticator_starts
P16  acting_as                      saves the real gid, not the egid        equivalent whenever gid == egid (any
                                                                            start by a service manager or inetd)
A1   acting_as                      switches only when not root             mutants7: real_uid_root
A2   acting_as                      keeps supplementary groups              mutants7: socket_probe[41002]
A3   acting_as                      keeps egid 0                            mutants7: socket_probe[0]
A4   _back_to_root                  egid not taken back                     new: private_authenticator_starts
A5   _back_to_root                  groups not given back                   new: private_authenticator_starts
A6   acting_as                      restore not in `finally`                equivalent: the blocks (socket probe,
                                                                            os.access) return, never raise
A7   acting_as                      no restore before PrivilegeError        equivalent: every caller then ends
                                                                            the frontend (exit 1)
Q1   _pam.pam_login                 password not checked for NUL            mutants9: nul_is_refused
Q2   converse                       count <= 0 -> count < 0                 equivalent in practice: pam_conv(3)
                                                                            has num_msg > 0; Linux-PAM's own
                                                                            prompts never send 0
Q3   converse                       echo-on prompt gets the password        mutants9: echo_on_prompt
Q4   converse                       9 messages kept                         mutants9: logged_bounded
Q5   converse                       messages not cut at 200                 mutants9: logged_bounded
Q6   pam_login                      PAM_RHOST never set                     review_pam: rhost
Q7   pam_login                      no pam_acct_mgmt                        mutants9: expired_account
Q8   pam_login                      PAM_USER not read back                  review_pam: account_pam_authenticated
Q9   pam_login                      pam_end always told PAM_SUCCESS         new: pam_end_tells_the_modules
Q10  pam_login                      a failed pam_start reported as success  new: pam_cannot_start_never_logs_anyone_in
Q11  TEMPORARY_CODES                9 dropped                               equivalent: code 9 is named
                                                                            pam-unavailable, which
                                                                            is_temporary lists itself
Q12  is_temporary                   pam-unavailable not temporary           mutants9: decides_between
Q13  _REASONS                       unknown-user dropped                    mutants9: decides_between
Q14  converse                       copies not wiped on the error path      left: freed heap, not observable
                                                                            without reading root's memory
Q15  pam_login                      result.code not set                     review_pam: unknown_name
Q16  pam_login                      acct_mgmt after a failed authenticate   review_pam: unknown_name
Q17  converse                       resp_retcode not set                    equivalent: calloc zeroes it
Q18  _REASONS                       password-expired dropped                new: must_be_changed_is_logged
Q19  converse                       an unexpected error answered SUCCESS    left: needs a module sending a NULL
                                                                            message pointer (a broken module)
Q20  is_temporary                   pam-error-N never temporary             mutants9: decides_between[1]
Q21  service_file_warning           a name with '/' looked up as a path     a defect behind it: new,
                                                                            service_named_by_a_path
Q22  service_file_warning           name not lower-cased                    test_auth_cli: pam_service_with_no_file
Q23  pam_login                      PAM_RHOST "" set with no address        equivalent: pam_access, pam_unix
                                                                            take an empty PAM_RHOST as unset
Q24  MAX_PAM_MESSAGES               8 -> 7                                  mutants9: logged_bounded
Q25  PamPool.check_here             rhost not passed                        review_pam: rhost
Q26  load_libpam                    its error hidden                        left: needs a system without libpam
Q27  auth_warnings                  file warning for the wrong backend      test_auth_cli: pam_service_with_no_file
Q28  converse                       responses not handed to the module      review_pam: rhost (the login fails)
Q29  service_file_warning           isdir test inverted                     review_coverage: outside_pam_wrapper
Q30  converse                       the block freed after handing it over   review_pam: rhost (the login fails)
Q31  pam_login                      the name not checked for NUL            equivalent: the protocol refuses a
                                                                            name with NUL (auth.user) first
Q33  _DaemonThreads._work           the stop marker taken for a job         review_pam: prompt_that_is_not_utf8
R1   _permits.admit                 `is` -> `is not`                        test_auth_permits: happy_path
R2   admit                          a violation leaves the state open       test_auth_permits: violations_close
R3   hello                          version test inverted                   test_auth_permits: happy_path
R4   auth_ok                        the user not kept                       test_auth_permits: happy_path
R5   auth_failed                    `>=` -> `>`                             test_auth_permits: max_failures
R6   auth_failed                    failures not counted                    test_auth_permits: max_failures
R7   TRANSITIONS                    a failed auth closes                    test_auth_permits: happy_path
R8   TRANSITIONS                    an answered route closes                test_auth_permits: happy_path
R9   TRANSITIONS                    a route's temporary failure stays open  test_auth_workers: stopped_worker
R10  TRANSITIONS                    an undecided login stays open           mutants: unavailable_backend
R11  TRANSITIONS                    a bad version goes on                   test_auth_permits: bad_version
R12  PERMITTED                      auth permitted after auth               test_auth_permits: happy_path
R13  PERMITTED                      route permitted before auth             test_auth_permits: happy_path
R14  _move                          an outcome in the wrong state ignored   test_auth_permits: our_bug
R15  closed                         never true                              test_auth_permits: violations_close
R16  TRANSITIONS                    AUTH_OK stays in EXPECT_AUTH            test_auth_permits: happy_path
R17  _REASONS                       "second auth" reason dropped            test_auth_permits: violations_close
R18  auth_ok                        user set after the move                 equivalent: differs only when the
                                                                            move raises (our bug), then with
                                                                            no user at all
L1   _logfmt.field                  cut at 97                               new: cut_exactly
L2   field                          never cut                               test_auth_permits: log_fields
L3   text                           cut at 501                              new: cut_exactly
L4   text                           not escaped                             test_auth_permits: log_text
L5   field                          printable() instead of field()          test_auth_permits: log_fields
L6   text                           never cut                               test_auth_permits: log_text
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sendooway_auth._logfmt import field, text
from sendooway_auth._pam import service_file_warning

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


def test_a_pam_service_pam_cannot_start_never_logs_anyone_in(daemon, world):
    """Mutant Q10 (pam_start's failure not recorded): the result then kept
    its PAM_SUCCESS, and a login whose PAM never started, let alone asked
    for a password, was a success. A service PAM cannot start (no file
    and no `other` under pam_wrapper: PAM_ABORT) must give no one a login,
    right password or not."""
    d = daemon("pamService = sendooway-mut24-no-such-service\n")
    for password in ("wrong-Pw-zz", world.users["alice"].password):
        reply = login(d.connect(), "alice", password, client="192.0.2.89")
        assert reply.TYPE != "auth_ok", reply


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


_LOGIN_CODE = ("import sys; from sendooway_auth._pam import pam_login;"
               " print(pam_login(sys.argv[1], 'alice', 'any').code)")


def test_a_pam_service_named_by_a_path_is_looked_up_as_pam_does(world, pam_module, tmp_path):
    """Mutant Q21 survived, and showed a defect: Linux-PAM's pam_start keeps
    only the part of the service name after its last '/', so `pamService =
    /etc/pam.d/sendooway-site` (an admin naming the file) is the service
    sendooway-site. The warning skipped every name with a '/': with no such
    file PAM silently used its `other` stack, the very case the warning is
    for. Now the name is looked up as PAM looks it up."""
    present = os.path.join(world.pam_dir, "sendooway-mut24-site")
    with open(present, "w") as f:
        f.write(f"auth required {pam_module} rc=0\naccount required {pam_module} rc=0\n")
    # what PAM itself does with such a name: that file's stack decides (in a
    # process of its own: pam_wrapper has few temp dirs for the test process)
    said = subprocess.run([sys.executable, "-c", _LOGIN_CODE, f"{tmp_path}/sendooway-mut24-site"],
                          capture_output=True, text=True, timeout=30)
    assert said.stdout.strip() == "0", said
    assert service_file_warning("/etc/pam.d/sendooway-mut24-site") is None
    warning = service_file_warning("/etc/pam.d/sendooway-mut24-gone")
    assert warning is not None
    assert f"no file {os.path.join(world.pam_dir, 'sendooway-mut24-gone')}:" in warning


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
