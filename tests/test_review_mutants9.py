"""Tests written from a mutation-testing review of the authenticator's
decision logic: `_service.AuthService` (authenticate, _decide, _check,
route), `_penalty` (the backoff by user and by address), `_pam`,
`_accounts.choose` and `_users`. Each pins down behaviour that a small
change to that code (a comparison flipped, a key or a condition dropped, a
branch swapped) left unnoticed by the rest of the suite; each docstring
names what it guards. Real parts throughout: the real AuthService with
real PAM (pam_wrapper, pam_matrix) in worker threads and the real reader
fork server, fake users from nss_wrapper, or the real Penalty with the
clock passed in."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess

import pytest

from sendooway_auth._pam import PamPool
from sendooway_auth._penalty import Penalty
from sendooway_auth._reader import ForkServer
from sendooway_auth._service import AuthService, Peer
from sendooway_auth._workers import WorkerPool
from sendooway_shared.config import parse_config
from sendooway_shared.types import Secret
from tests import auth_helpers
from tests.auth_helpers import MATRIX, add_pam_service, build_test_pam_module, login

daemon = auth_helpers.daemon  # a fixture: a real sendooway-auth daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the reader switches users")


@pytest.fixture(scope="module")
def parts(world):
    """The fork server and the PAM threads, shared by the module's services."""
    forks = ForkServer(parse_config("", "m9.conf")).start()
    pool = PamPool("sendooway", threads=4)
    yield forks, pool
    pool.shutdown()
    forks.stop()


@pytest.fixture
def make_service(parts):
    forks, pool = parts

    def make(conf: str = "", penalty: Penalty | None = None) -> AuthService:
        return AuthService(parse_config(conf, "m9.conf"), pool, WorkerPool(forks),
                           penalty if penalty is not None else Penalty(base=0))
    return make


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def auth_log():
    """The authenticator's log lines, as formatted."""
    handler = _Lines()
    logger = logging.getLogger("sendooway-auth")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _login(svc: AuthService, name: str, password: str, client: str = "192.0.2.7",
                 session: str = "s"):
    return await svc.authenticate(name, Secret(password), Peer(session, client))


def _side_by_side(svc: AuthService, *logins: tuple) -> list:
    """The logins (_login's arguments after svc) started at once: their results."""
    async def scenario():
        return await asyncio.gather(*(_login(svc, *login) for login in logins))

    return run(scenario())


def _in_turn(svc: AuthService, *logins: tuple) -> list:
    """The logins (_login's arguments after svc) one after the other: their results."""
    async def scenario():
        return [await _login(svc, *login) for login in logins]

    return run(scenario())


# ------------------------------------------------------------ turns per user


def test_logins_for_one_user_under_names_differing_in_case_take_turns(make_service, world):
    """The login turn is keyed by the case-folded name, as the backoff is:
    "alice" and "ALICE" (one account wherever NSS ignores case) from two
    addresses at once are decided one after the other, the second meeting
    the backoff the first earned (here: past its deadline, so `busy`).
    Keyed by the name as typed, both went to PAM side by side, and a
    guesser doubled its rate by varying the case."""
    svc = make_service("timeout = 1\n", Penalty(base=1.3, cap=1.3))

    results = _side_by_side(svc, ("alice", "wrong-1", "192.0.2.10"),
                            ("ALICE", "wrong-2", "198.51.100.10"))
    reasons = sorted(r.reason for r in results)
    assert not any(r.ok for r in results)
    assert "busy" in reasons, reasons


def test_logins_from_one_ipv6_64_take_turns_as_one_address(make_service, world):
    """The address's login turn is keyed by its /64, as its backoff is: two
    hosts of one IPv6 /64 guessing at two accounts at once are decided one
    after the other, the second meeting the backoff the first earned (past
    its deadline here: `busy`). Keyed by the full address, each host of the
    /64 (2**64 of them) had a turn of its own and guessed side by side."""
    svc = make_service("timeout = 1\n", Penalty(base=1.3, cap=1.3))

    results = _side_by_side(svc, ("bob", "wrong-1", "2001:db8:9:9::1"),
                            ("carol", "wrong-2", "[2001:db8:9:9::2]:4711"))
    reasons = sorted(r.reason for r in results)
    assert reasons == ["busy", "wrong-password"], reasons


def test_a_login_from_an_address_in_backoff_refused_busy_gets_the_fail2ban_line(
        make_service, auth_log):
    """A login that cannot be decided within its deadline because of the
    backoff is logged as a *failure* (the fail2ban line, `reason=busy`)
    when its address failed before, so that a guesser hammering a user is
    banned; from an address with a clean record it is only "auth
    unavailable" (it may be the user's own login, waiting behind a guesser).
    Taking every address for a clean one dropped the fail2ban line."""
    penalty = Penalty(base=5.0, cap=5.0)
    svc = make_service("timeout = 1\n", penalty)
    import time
    penalty.failure("alice", "203.0.113.66", time.monotonic())
    guesser = run(_login(svc, "alice", "guess-2", "203.0.113.66"))
    own = run(_login(svc, "alice", "also-held", "192.0.2.44"))
    assert guesser.reason == own.reason == "busy" and guesser.temporary and own.temporary
    failed = [line for line in auth_log if line.startswith("auth failed: ")]
    assert failed == ["auth failed: user=alice client=203.0.113.66 reason=busy session=s "
                      "delay=0.0"], auth_log
    assert any(line.startswith("auth unavailable: user=alice client=192.0.2.44 reason=busy")
               for line in auth_log), auth_log


# ------------------------------------------------------------ validUser


@pytest.mark.parametrize("valid, name, allowed", [
    ("%mailusers", "alice", True),    # a supplementary group (not her primary one)
    ("%mailusers", "carol", False),
    ("%nosuchgroup\nvalidUser = bob", "bob", True),  # an unknown group is skipped
    ("ALICE", "alice", True),         # names compared without case, as the original did
    ("al", "alice", False),           # a name, not a part of one
    ("alice2", "alice", False),
])
def test_valid_user_decides_who_may_log_in_with_a_right_password(make_service, world,
                                                                 valid, name, allowed):
    """validUser lets in the accounts named (without regard to case) and the
    members of the groups named, also by supplementary membership, skips a
    group that does not exist, and keeps everyone else out before PAM is
    asked, with the reason `not-a-valid-user`."""
    svc = make_service(f"validUser = {valid}\n")
    result = run(_login(svc, name, world.users[name].password))
    if allowed:
        assert result.ok and result.user.name == name, result
    else:
        assert not result.ok and result.reason == "not-a-valid-user", result


# ------------------------------------------------------------ what is counted, what is logged


@pytest.mark.parametrize("password", ["", "made-up-guess"])
def test_made_up_names_never_push_a_real_accounts_count_out(make_service, world, password):
    """Failures for names that are no account (refused `unknown-user`) and
    logins with an empty password (refused before the name is looked up)
    are counted apart from real accounts': a flood of made-up names, free
    to make up, can fill that table but never evicts alice's backoff."""
    penalty = Penalty(base=0, max_keys=2)
    svc = make_service("", penalty)

    async def scenario():
        first = await _login(svc, "alice", "wrong-Pw", "")
        flood = [await _login(svc, f"nosuch{i}", password, "") for i in range(4)]
        return first, flood

    first, flood = run(scenario())
    assert first.reason == "wrong-password"
    assert {r.reason for r in flood} == {"empty-password" if not password else "unknown-user"}
    import time
    assert penalty.count("alice", "", time.monotonic()) == 1


def test_the_fail2ban_line_names_the_address_without_its_port(make_service, auth_log):
    """The failure line ("auth failed: user=U client=HOST reason=") names the
    client's address alone, as fail2ban's filter expects, also when the
    frontend passed "address:port" or "[v6]:port"."""
    svc = make_service("")

    _in_turn(svc, ("alice", "wrong-Pw", "192.0.2.7:4711", "s1"),
             ("bob", "wrong-Pw", "[2001:db8::7]:4712", "s2"))
    failed = [line for line in auth_log if line.startswith("auth failed: ")]
    assert failed == [
        "auth failed: user=alice client=192.0.2.7 reason=wrong-password session=s1 delay=0.0",
        "auth failed: user=bob client=2001:db8::7 reason=wrong-password session=s2 delay=0.0",
    ], auth_log


def test_a_pam_stuck_past_the_timeout_is_a_temporary_failure_counted_against_no_one(
        world, daemon):
    """PAM that does not answer within `timeout` (a dead LDAP server behind
    pam_ldap) is `pam-timeout`: a temporary failure ("auth unavailable", no
    fail2ban line). As a wrong password it would be a countable failure:
    fail2ban banned the users' addresses for the server's fault."""
    module = build_test_pam_module(world)
    if module is None:
        pytest.skip("no C compiler for the test PAM module")
    service = add_pam_service(world, "m9-stuck", module, fail_sleep=1.3)
    d = daemon(f"pamService = {service}\ntimeout = 1\n")
    reply = login(d.connect(), "alice", "wrong-Pw-zz", client="192.0.2.81")
    assert reply.TYPE == "error" and "temporary failure" in reply.reason, reply
    log = d.wait_log("reason=pam-timeout")
    assert "auth unavailable: user=alice client=192.0.2.81 reason=pam-timeout" in log, log
    assert "auth failed:" not in log, log


def test_a_full_shared_store_keeps_fresh_counts_and_refuses_new_made_up_ones(tmp_path):
    """The socketpair mode's shared store, when full, removes only counts
    whose window ran out: fresh ones (alice's backoff) are kept, and the
    count of one more made-up name is simply not stored. Removing every
    file when full let a flood of made-up names wipe every backoff."""
    import time
    from sendooway_auth._penalty import SharedPenalty
    store = SharedPenalty.open(str(tmp_path / "store"), base=1.0, max_keys=4, window=900)
    now = time.monotonic()
    store.failure("alice", "", now)
    for i in range(3):
        store.failure(f"made-up{i}", "", now, account=False)
    store.failure("made-up-more", "", now, account=False)
    assert store.count("alice", "", now) == 1
    assert [store.count(f"made-up{i}", "", now) for i in range(3)] == [1, 1, 1]
    assert store.count("made-up-more", "", now) == 0


# ------------------------------------------------------------ what is held back, what is not
# (bounds with a wide margin: each answer comes at once on the real code, and
# several seconds late on the mutants these guard against)


def test_a_right_password_is_never_held_back_by_the_refusal_padding(make_service, world):
    """Only refusals without PAM's delay (an unknown name, not a validUser,
    an empty password) are padded to PAM's refusal time: a right password
    is answered at once, however slow PAM's refusals are. Padding the
    successes as well held every user's login back by PAM's failure delay
    (pam_faildelay: ~2 s on each login)."""
    penalty = Penalty(base=0)
    penalty.note_pam_refusal(9.0)  # PAM takes 9 s to refuse
    svc = make_service("", penalty)
    result = run(asyncio.wait_for(_login(svc, "alice", world.users["alice"].password), 4.5))
    assert result.ok and result.user.name == "alice"


def test_a_login_whose_hold_runs_past_its_deadline_is_answered_busy_at_once(make_service):
    """A login whose backoff hold lasts longer than the frontend waits for
    it is answered `busy` at once (nothing would hear a later answer), not
    after sleeping the hold out with a connection and a turn held."""
    import time
    penalty = Penalty(base=8.0, cap=8.0)
    svc = make_service("timeout = 1\n", penalty)
    penalty.failure("bob", "203.0.113.67", time.monotonic())
    result = run(asyncio.wait_for(_login(svc, "bob", "guess-2", "203.0.113.67"), 4.0))
    assert result.reason == "busy" and result.temporary, result


@pytest.mark.parametrize("code, reason, temporary", [
    (9, "pam-unavailable", True),   # PAM_AUTHINFO_UNAVAIL: the directory is down
    (1, "pam-error-1", True),       # PAM_OPEN_ERR: a module cannot be loaded
    (10, "unknown-user", False),    # PAM_USER_UNKNOWN
])
def test_what_pam_says_decides_between_a_refusal_and_a_temporary_failure(
        world, daemon, code, reason, temporary):
    """PAM's codes that say the server side is broken are temporary
    failures: "auth unavailable", no fail2ban line (users are not banned
    for a dead LDAP server or a broken PAM stack); a wrong password is a
    refusal with the fail2ban line."""
    module = build_test_pam_module(world)
    if module is None:
        pytest.skip("no C compiler for the test PAM module")
    service = f"m9-rc{code}"
    with open(os.path.join(world.pam_dir, service), "w") as f:
        f.write(f"auth requisite {module} rc={code}\naccount required {module} rc=0\n")
    d = daemon(f"pamService = {service}\n")
    reply = login(d.connect(), "alice", "wrong-Pw-zz", client="192.0.2.82")
    if temporary:  # (the frontend answers 454, not 535)
        assert reply.TYPE == "error" and "temporary failure" in reply.reason, reply
    else:
        assert reply.TYPE == "auth_fail", reply
    log = d.wait_log(f"reason={reason}")
    kind = "auth unavailable" if temporary else "auth failed"
    assert f"{kind}: user=alice client=192.0.2.82 reason={reason} " in log, log
    if temporary:
        assert "auth failed:" not in log, log


def test_a_right_password_clears_the_users_backoff(make_service, world):
    """A login with the right password clears the user's failure count (and
    the address's share of it): her next mistyped password is answered
    after the first delay again, not after a doubled one."""
    import time
    penalty = Penalty(base=0)
    svc = make_service("", penalty)

    async def scenario():
        for _ in range(3):
            await _login(svc, "carol", "mistyped", "192.0.2.83")
        before = penalty.count("carol", "192.0.2.83", time.monotonic())
        ok = await _login(svc, "carol", world.users["carol"].password, "192.0.2.83")
        return before, ok

    before, ok = run(scenario())
    assert before == 3 and ok.ok
    assert penalty.count("carol", "192.0.2.83", time.monotonic()) == 0


def test_a_password_with_a_nul_is_refused_and_never_cut_short_for_pam(make_service, world):
    """A NUL in the password is refused (`invalid-characters`), never handed
    to PAM as a C string, which would end at the NUL: the right password
    followed by NUL and anything would let its owner's guesser, or a
    client's bug, log in with a password that is not the password."""
    svc = make_service("")
    result = run(_login(svc, "alice", world.users["alice"].password + "\0anything"))
    assert not result.ok and result.reason == "invalid-characters", result



# ------------------------------------------------------------ a PAM module that maps the name

# PAM_USER set to `to=NAME` (as pam_winbind or a site's own module may do);
# the account check lets everyone through.
_MAP_C = r"""
#include <stdlib.h>
#include <string.h>
#include <security/pam_modules.h>
#include <security/pam_appl.h>
static const char *sarg(int argc, const char **argv, const char *key) {
    size_t n = strlen(key);
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], key, n) == 0 && argv[i][n] == '=') return argv[i] + n + 1;
    return NULL;
}
static int ask(pam_handle_t *h, int style, const char *text, char **answer) {
    const struct pam_conv *conv = NULL;
    struct pam_message msg = {style, text};
    const struct pam_message *pm = &msg;
    struct pam_response *resp = NULL;
    int rc = pam_get_item(h, PAM_CONV, (const void **)&conv);
    if (rc != PAM_SUCCESS || !conv) return PAM_CONV_ERR;
    rc = conv->conv(1, &pm, &resp, conv->appdata_ptr);
    if (rc == PAM_SUCCESS && resp) {
        if (answer && resp->resp) *answer = strdup(resp->resp);
        free(resp->resp);
        free(resp);
    }
    return rc;
}
int pam_sm_authenticate(pam_handle_t *h, int f, int argc, const char **argv) {
    const char *p;
    if ((p = sarg(argc, argv, "say"))) {
        const char *t = sarg(argc, argv, "times");
        for (int i = 0; i < (t ? atoi(t) : 1); i++) ask(h, PAM_ERROR_MSG, p, NULL);
        return PAM_AUTH_ERR;
    }
    if (sarg(argc, argv, "askname")) {
        const void *user = NULL;
        char *answer = NULL;
        pam_get_item(h, PAM_USER, &user);
        if (ask(h, PAM_PROMPT_ECHO_ON, "login: ", &answer) != PAM_SUCCESS) return PAM_AUTH_ERR;
        int same = answer && user && strcmp(answer, (const char *)user) == 0;
        free(answer);
        return same ? PAM_SUCCESS : PAM_AUTH_ERR;
    }
    if ((p = sarg(argc, argv, "to"))) return pam_set_item(h, PAM_USER, p);
    return PAM_SUCCESS;
}
int pam_sm_setcred(pam_handle_t *h, int f, int argc, const char **argv) { return PAM_SUCCESS; }
int pam_sm_acct_mgmt(pam_handle_t *h, int f, int argc, const char **argv) { return PAM_SUCCESS; }
"""


@pytest.fixture
def m9_module(world) -> str:
    """The module above, built once per world."""
    path = os.path.join(world.root, "pam_m9_map.so")
    if not os.path.exists(path):
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.skip("no C compiler for the test PAM module")
        src = path[:-3] + ".c"
        with open(src, "w") as f:
            f.write(_MAP_C)
        res = subprocess.run([cc, "-shared", "-fPIC", "-o", path + ".tmp", src, "-lpam"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"the test PAM module does not build: {res.stderr[:200]}")
        os.rename(path + ".tmp", path)
    return path


def pam_service(world, name: str, lines: list[str]) -> str:
    with open(os.path.join(world.pam_dir, name), "w") as f:
        f.write("\n".join(lines) + "\n")
    return name


@pytest.fixture
def mapping_service(world, m9_module):
    """A PAM service that maps the login name to `to` and checks that
    account's password with pam_matrix; its name."""
    path = m9_module

    def make(to: str, after: bool = False) -> str:
        """after: the name typed is checked, then mapped."""
        name = f"m9-map-{to}{'-after' if after else ''}"
        lines = [f"auth required {path} to={to}", f"auth required {MATRIX} passdb={world.passdb}"]
        with open(os.path.join(world.pam_dir, name), "w") as f:
            f.write("\n".join(lines[::-1] if after else lines) + f"\naccount required {path}\n")
        return name
    return make


def test_a_login_name_pam_maps_is_logged_in_as_the_account_it_maps_to(daemon, world,
                                                                       mapping_service):
    """When PAM maps the login name to another account, that account is the
    one logged in, and the "auth ok" line names it (the account whose files
    are read and whose mail is relayed), not the name typed."""
    d = daemon(f"pamService = {mapping_service('bob')}\n")
    reply = login(d.connect(), "alice", world.users["bob"].password, client="192.0.2.84")
    assert reply.TYPE == "auth_ok" and reply.user == "bob", reply
    log = d.wait_log("auth ok:")
    assert "auth ok: user=bob client=192.0.2.84 " in log, log
    assert "auth ok: user=alice" not in log, log


def test_validuser_is_asked_of_the_account_pam_maps_to(daemon, world, mapping_service):
    """validUser is asked of the account PAM maps the name to: with only
    alice allowed, a login as "alice" that PAM maps to carol is refused
    `not-a-valid-user`, whoever the typed name is."""
    d = daemon(f"pamService = {mapping_service('carol')}\nvalidUser = alice\n")
    reply = login(d.connect(), "alice", world.users["carol"].password, client="192.0.2.85")
    assert reply.TYPE == "auth_fail", reply
    log = d.wait_log("auth failed:")
    assert "auth failed: user=alice client=192.0.2.85 reason=not-a-valid-user " in log, log


def test_a_login_pam_maps_to_an_account_that_does_not_exist_is_refused(daemon, world,
                                                                       mapping_service):
    """A login that PAM authenticates and then maps to a name that is no
    account here is refused (`pam-mapped-user-unknown`), never served as
    the account of the name typed: PAM said who may use the service, and
    it is not alice."""
    d = daemon(f"pamService = {mapping_service('nosuchacct', after=True)}\n")
    reply = login(d.connect(), "alice", world.users["alice"].password, client="192.0.2.86")
    assert reply.TYPE == "auth_fail", reply
    log = d.wait_log("auth failed:")
    assert "reason=pam-mapped-user-unknown " in log, log


def test_without_a_client_address_the_password_is_still_checked(make_service, world):
    """A login whose client address is unknown (a frontend on a UNIX socket,
    stdio mode) still goes through pam_authenticate: PAM_RHOST is merely
    left unset, and a wrong password is a wrong password."""
    svc = make_service("")

    wrong, right = _in_turn(svc, ("alice", "wrong-Pw", ""),
                            ("alice", world.users["alice"].password, ""))
    assert not wrong.ok and wrong.reason == "wrong-password", wrong
    assert right.ok and right.user.name == "alice", right


def test_an_expired_account_is_refused_with_its_right_password(daemon, world):
    """PAM's account check (pam_acct_mgmt) runs after the password check:
    an expired or locked account is refused (`account-expired`) although
    its password is right."""
    module = build_test_pam_module(world)
    if module is None:
        pytest.skip("no C compiler for the test PAM module")
    service = add_pam_service(world, "m9-expired", module, account_rc=13)
    d = daemon(f"pamService = {service}\n")
    reply = login(d.connect(), "dave", world.users["dave"].password, client="192.0.2.87")
    assert reply.TYPE == "auth_fail", reply
    assert "auth failed: user=dave client=192.0.2.87 reason=account-expired " in (
        d.wait_log("auth failed:"))



def test_an_echo_on_prompt_gets_the_login_name_never_the_password(daemon, world, m9_module):
    """The conversation answers a PAM_PROMPT_ECHO_ON prompt ("login: ")
    with the login name and only a PAM_PROMPT_ECHO_OFF one with the
    password: a module that asks for the name (and may echo or log the
    answer as a name) never gets the password."""
    name = pam_service(world, "m9-askname", [
        f"auth required {m9_module} askname=1",
        f"auth required {MATRIX} passdb={world.passdb}",
        f"account required {m9_module}"])
    d = daemon(f"pamService = {name}\n")
    reply = login(d.connect(), "alice", world.users["alice"].password, client="192.0.2.88")
    assert reply.TYPE == "auth_ok" and reply.user == "alice", (reply, d.log())


def test_what_pam_says_on_a_refusal_is_logged_bounded(daemon, world, m9_module):
    """The messages a module sends while refusing (pam_faillock: "the
    account is locked") are logged with the refusal, so that the admin sees
    why a right password failed: at most 8 of them, each cut at 200
    characters, so that a module cannot flood the log."""
    long = "L" * 300
    name = pam_service(world, "m9-say", [
        f"auth required {m9_module} say={long}",
        f"auth required {m9_module} say=account-is-locked times=12",
        f"account required {m9_module}"])
    d = daemon(f"pamService = {name}\n")
    reply = login(d.connect(), "alice", world.users["alice"].password, client="192.0.2.89")
    assert reply.TYPE == "auth_fail", reply
    log = d.wait_log("auth failed:")
    said = [line for line in log.splitlines() if "pam: user=alice said: " in line]
    assert len(said) == 1, log
    parts = said[0].split("said: ", 1)[1].split(" | ")
    assert parts == ["L" * 200] + ["account-is-locked"] * 7, said


# ------------------------------------------------------------ which account, which log lines


def test_an_account_serves_each_of_its_addresses_not_only_its_first():
    """An account listing several sender addresses serves each of them,
    also one after a pattern that does not match; the most specific pattern
    over all accounts still wins."""
    from sendooway_auth._accounts import Account, choose
    from sendooway_shared.types import Route, TlsMode
    work = Account(("alice@work.example", "alice@home.example"), Route("work", 25, TlsMode.PLAIN))
    other = Account(("*@home.example",), Route("other", 25, TlsMode.PLAIN))
    assert choose([other, work], "alice@home.example").route.server == "work"
    assert choose([other, work], "bob@home.example").route.server == "other"
    assert choose([work], "carol@home.example") is None


def test_a_users_file_errors_are_logged_again_when_they_change_or_after_a_while(make_service):
    """The same file errors of a user are logged once per REPEAT_LOG_AFTER
    (each MAIL FROM reads the files afresh: no log flood), but a different
    set of errors is logged at once, and the same one again once that time
    has passed."""
    from sendooway_auth import _service
    now = [1000.0]
    svc = make_service("")
    svc.clock = lambda: now[0]
    first = svc._log_anew("alice", ["f:1: bad"], [])
    again = svc._log_anew("alice", ["f:1: bad"], [])
    changed = svc._log_anew("alice", ["f:2: bad"], [])
    warning = svc._log_anew("alice", ["f:2: bad"], ["f:3: odd"])
    now[0] += _service.REPEAT_LOG_AFTER + 1
    later = svc._log_anew("alice", ["f:2: bad"], ["f:3: odd"])
    assert (first, again, changed, warning, later) == (True, False, True, True, True)


def test_a_users_logins_are_decided_in_their_order_of_arrival_first_one_first(
        make_service, world, auth_log):
    """A user's logins wait in one line: the first, sleeping its backoff
    hold, stays first (a login from a cleaner address does not overtake
    it), and logins from addresses of the same record keep their order of
    arrival (a later one never jumps ahead of an earlier one)."""
    import time
    penalty = Penalty(base=0.4, cap=0.4)
    svc = make_service("", penalty)
    penalty.failure("alice", "203.0.113.70", time.monotonic())  # her own typo, a moment ago
    password = world.users["alice"].password

    async def scenario():
        first = asyncio.ensure_future(_login(svc, "alice", password, "203.0.113.70", "s1"))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(_login(svc, "alice", password, "192.0.2.91", "s2"))
        await asyncio.sleep(0.05)
        third = asyncio.ensure_future(_login(svc, "alice", password, "192.0.2.92", "s3"))
        return await asyncio.gather(first, second, third)

    results = run(scenario())
    assert all(r.ok for r in results), results
    order = [line.rsplit("session=", 1)[1] for line in auth_log if line.startswith("auth ok:")]
    assert order == ["s1", "s2", "s3"], auth_log


# ------------------------------------------------------------ the backoff's arithmetic


def test_the_hold_is_the_longest_of_the_users_and_the_addresss_and_ends_with_the_delay():
    """Before a login is decided it waits until the delay of the last
    failure counted for its user *or* its address has run out, whichever is
    later, and no longer: a client that waited for its refusal is decided
    at once."""
    pen = Penalty(base=1.0, cap=60.0, window=900)
    for _ in range(3):  # alice guessed at from X: her delays 1, 2, 4
        pen.failure("alice", "203.0.113.71", 100.0)
    pen.failure("carol", "192.0.2.93", 100.0)  # Y: one failure, its delay 1
    assert pen.hold("alice", "192.0.2.93", 100.5) == pytest.approx(3.5)  # alice's 4, not Y's 1
    assert pen.hold("bob", "192.0.2.93", 100.5) == pytest.approx(0.5)
    assert pen.hold("carol", "192.0.2.93", 101.0) == 0.0  # waited for its refusal: no more
    assert pen.hold("alice", "", 104.0) == 0.0


def test_an_ipv6_guessers_address_counts_by_its_64_for_the_busy_fail2ban_line(make_service,
                                                                              auth_log):
    """The failures an address earned are found for its whole IPv6 /64,
    where the backoff keeps them: a guesser from 2001:db8:7:7::1 that
    failed, retrying from ::2, is logged with the fail2ban line when its
    login is refused `busy`, as an IPv4 guesser is."""
    import time
    penalty = Penalty(base=5.0, cap=5.0)
    svc = make_service("timeout = 1\n", penalty)
    penalty.failure("bob", "2001:db8:7:7::1", time.monotonic())
    result = run(_login(svc, "bob", "guess-2", "2001:db8:7:7::2"))
    assert result.reason == "busy", result
    assert [line for line in auth_log if line.startswith("auth failed: ")] == [
        "auth failed: user=bob client=2001:db8:7:7::2 reason=busy session=s delay=0.0"], auth_log


def test_the_pam_refusal_figure_rises_at_once_and_falls_only_slowly():
    """PAM's refusal time (the padding of refusals PAM never saw) follows a
    slower refusal a fifth of the way at once, and a faster one (pam_faillock
    refusing a locked account at once) only by 2 % of the gap: fast
    refusals cannot wear the padding down and bring the timing oracle back."""
    pen = Penalty()
    pen.note_pam_refusal(2.0)
    pen.note_pam_refusal(3.0)
    assert pen.pam_refusal() == pytest.approx(2.2)
    pen.note_pam_refusal(0.0)
    assert pen.pam_refusal() == pytest.approx(2.2 - 0.044)


def test_backoff_keys_fold_case_and_name_an_address_as_fail2ban_bans_it():
    """"ALICE" counts against alice; an IPv4 address mapped into IPv6 is
    the IPv4 address, and a link-local zone is left out (fail2ban bans the
    address, and cannot match one with a zone)."""
    from sendooway_auth._penalty import client_host
    pen = Penalty(base=1.0, cap=60.0)
    pen.failure("ALICE", "", 100.0)
    pen.failure("Alice", "", 100.0)
    assert pen.count("alice", "", 100.0) == 2
    assert client_host("[::ffff:192.0.2.7]:4711") == "192.0.2.7"
    assert client_host("fe80::1%eth0") == "fe80::1"


def test_a_failure_stamped_in_the_future_counts_as_now_and_locks_no_one_out():
    """A clock stepped back (the failure's time now lies ahead) counts the
    failure as made now: the hold is its ordinary delay, and the count fades
    a window later, not the cap (nor a window after the future time)."""
    pen = Penalty(base=1.0, cap=60.0, window=100)
    pen.failure("alice", "203.0.113.72", 1500.0)  # the clock then stepped back 500 s
    assert pen.hold("alice", "203.0.113.72", 1000.0) == pytest.approx(1.0)
    assert pen.count("alice", "203.0.113.72", 1101.0) == 0


def test_empty_passwords_for_a_real_account_add_to_its_count(make_service):
    """Once a real account has a count, its failures keep adding to that
    count whatever refused them: empty passwords (counted as a made-up
    name's, as they are refused before the name is looked up) after a wrong
    password make alice's count 3, not a second count beside the first."""
    import time
    penalty = Penalty(base=0)
    svc = make_service("", penalty)

    results = _in_turn(svc, *(("alice", pw, "") for pw in ("wrong-Pw", "", "")))
    assert [r.reason for r in results] == ["wrong-password", "empty-password", "empty-password"]
    assert penalty.count("alice", "", time.monotonic()) == 3


def test_a_full_count_table_forgets_its_oldest_count_never_the_newest():
    """The in-process table is bounded: when full, the count that was
    touched longest ago goes, so the newest failure (a guesser's latest
    address) is always counted."""
    pen = Penalty(base=1.0, max_keys=3)
    for name in ("made-up1", "made-up2", "made-up3", "made-up4"):
        pen.failure(name, "", 100.0, account=False)
    assert [pen.count(f"made-up{i}", "", 100.0) for i in (1, 2, 3, 4)] == [0, 1, 1, 1]


def test_a_full_shared_store_still_counts_a_real_accounts_first_failure(tmp_path):
    """A real account's count is always stored, also when made-up names
    and addresses have filled the shared store: there are only so many
    accounts, and their backoff is what guards them."""
    import time
    from sendooway_auth._penalty import SharedPenalty
    store = SharedPenalty.open(str(tmp_path / "store"), base=1.0, max_keys=2, window=900)
    now = time.monotonic()
    for i in range(3):
        store.failure(f"made-up{i}", "", now, account=False)
    store.failure("bob", "", now)
    assert store.count("bob", "", now) == 1


def test_logging_in_again_and_again_takes_ones_own_failures_off_the_address_once():
    """A success takes the user's own failures off the address's count once
    (and forgets them): logging in to one's own account again and again
    between guesses at others' accounts never wears the address's record
    of those guesses down."""
    pen = Penalty(base=1.0, cap=60.0)
    for _ in range(2):
        pen.failure("alice", "203.0.113.73", 100.0)  # her own typos
    for _ in range(3):
        pen.failure("bob", "203.0.113.73", 100.0)    # guesses at bob
    for _ in range(3):
        pen.success("alice", "203.0.113.73", 101.0)
    assert pen.client_failures("203.0.113.73", 101.0) == 3
