"""Slow PAM checks and failure delays must not serialise connections."""

import os
import threading
import time

import pytest

from sendooway_shared.protocol import AuthFail, AuthOk
from tests.auth_helpers import (
    Daemon, add_pam_service, all_passwords, build_test_pam_module, login,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")

PAM_DELAY = 0.6  # seconds the PAM stack makes a failed check take (as pam_unix's ~2 s)


@pytest.fixture(scope="module")
def module(world):
    path = build_test_pam_module(world)
    if path is None:
        pytest.skip("needs a C compiler (cc) to build the slow test PAM module")
    return path


@pytest.fixture
def started(world):
    daemons = []
    yield daemons
    for d in daemons:
        d.stop()
        log = d.log()
        assert "auth failed" in log or "auth ok" in log or "auth unavailable" in log
        assert not any(pw in log for pw in all_passwords(world) + ["wrong-Pw-zz"])
        assert "internal error" not in log and "Traceback" not in log


def _start(tmp_path, tmp_config, conf, started=None, **kw):
    d = Daemon(tmp_path, tmp_config(conf), **kw)
    if started is not None:
        started.append(d)
    return d.start()


def _parallel(jobs):
    """Run callables at once; return their (result, seconds)."""
    out = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i, job):
        barrier.wait()
        t = time.monotonic()
        r = job()
        out[i] = (r, time.monotonic() - t)

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_slow_pam_checks_run_side_by_side(tmp_path, tmp_config, world, module, started):
    service = add_pam_service(world, "sendooway-slow", module, fail_sleep=PAM_DELAY)
    d = _start(tmp_path, tmp_config, f"pamService = {service}\n", started, extra_args=["--pam-threads", "8"])
    try:
        # one failed check alone takes the PAM delay
        ch = d.connect()
        t = time.monotonic()
        assert login(ch, "alice", "wrong-Pw-zz") == AuthFail()
        alone = time.monotonic() - t
        assert alone >= PAM_DELAY * 0.9, alone
        ch.close()

        # (one login per user name is decided at a time, so the side-by-side
        # checks are other users', from other addresses)
        def wrong(i, user):
            return lambda: login(d.connect(), user, "wrong-Pw-zz", client=f"198.51.100.{i}")

        def right():
            return login(d.connect(), "alice", world.users["alice"].password)

        results = _parallel([wrong(i, u) for i, u in enumerate(("bob", "carol", "dave"))]
                            + [right])
        slow = [s for r, s in results[:3]]
        assert all(r == AuthFail() for r, _ in results[:3])
        assert results[3][0] == AuthOk("alice")
        # three slow checks at once take about one delay, not three
        assert max(slow) < 2 * PAM_DELAY, slow
        # and a good login beside them is not held up
        assert results[3][1] < PAM_DELAY * 0.7, results[3][1]
    finally:
        d.stop()


def test_failure_delay_holds_back_only_the_failing_connection(tmp_path, tmp_config, world, started):
    d = _start(tmp_path, tmp_config, "", started, failure_delay=1.0)
    try:
        results = _parallel([
            lambda: login(d.connect(), "carol", "wrong-Pw-zz", client="203.0.113.9"),
            lambda: (time.sleep(0.1), login(d.connect(), "alice", world.users["alice"].password,
                                            client="192.0.2.50"))[1],
        ])
        (fail, fail_s), (ok, ok_s) = results
        assert fail == AuthFail() and fail_s >= 0.95
        # (held up by carol's delay it would take ~0.9 s; 0.75 leaves a loaded
        # machine room for the round trip, was 0.5)
        assert ok == AuthOk("alice") and ok_s < 0.75
        # the backoff grows for that user/address: the second failure waits twice as long
        ch = d.connect()
        t = time.monotonic()
        assert login(ch, "carol", "wrong-Pw-zz", client="203.0.113.9") == AuthFail()
        assert time.monotonic() - t >= 1.9
        assert "reason=wrong-password session=s1 delay=2.0" in d.wait_log("delay=2.0")
    finally:
        d.stop()


def test_account_expired_is_logged_as_such(tmp_path, tmp_config, world, module, started):
    service = add_pam_service(world, "sendooway-expired", module, account_rc=13)
    d = _start(tmp_path, tmp_config, f"pamService = {service}\n", started)
    try:
        assert login(d.connect(), "alice", world.users["alice"].password) == AuthFail()
        assert "auth failed: user=alice client=192.0.2.7 reason=account-expired" in \
            d.wait_log("reason=account-expired")
    finally:
        d.stop()


def test_hundreds_of_concurrent_connections(tmp_path, tmp_config, world, started):
    d = _start(tmp_path, tmp_config, "", started)
    try:
        conns = [d.connect() for _ in range(300)]
        for i, ch in enumerate(conns):
            from sendooway_shared.protocol import VERSION, Hello
            ch.send(Hello(VERSION, f"s{i}", "192.0.2.1"))
        assert all(ch.receive().TYPE == "welcome" for ch in conns)
        from sendooway_shared.protocol import AuthRequest
        from sendooway_shared.types import Secret
        for ch in conns:
            ch.send(AuthRequest("alice", Secret(world.users["alice"].password)))
        assert all(ch.receive() == AuthOk("alice") for ch in conns)
        for ch in conns:
            ch.close()
    finally:
        d.stop()


def test_one_pam_thread_does_serialise(tmp_path, tmp_config, world, module, started):
    """The control for the test above: with a single PAM thread the same
    slow checks queue up, so that test measures the pool, not luck."""
    service = add_pam_service(world, "sendooway-slow1", module, fail_sleep=PAM_DELAY)
    d = _start(tmp_path, tmp_config, f"pamService = {service}\n", started, extra_args=["--pam-threads", "1"])
    try:
        results = _parallel([
            (lambda i=i: login(d.connect(), "bob", "wrong-Pw-zz", client=f"198.51.100.{i}"))
            for i in range(3)])
        assert max(s for _, s in results) >= 3 * PAM_DELAY * 0.9
    finally:
        d.stop()


@pytest.mark.parametrize("sleep,conf,reason", [
    (0, "", "pam-unavailable"),          # e.g. the LDAP server behind pam_ldap is down
    (3.0, "timeout = 1\n", "pam-timeout"),  # PAM stuck: answered after `timeout`
])
def test_backend_trouble_is_temporary_and_not_for_fail2ban(tmp_path, tmp_config, world, module,
                                                           started, sleep, conf, reason):
    from sendooway_shared.protocol import Error
    from tests.auth_helpers import MATRIX
    path = os.path.join(world.pam_dir, f"sendooway-down-{reason}")
    with open(path, "w") as f:
        f.write(f"auth required {module} sleep_us={int(sleep * 1e6)} rc=9\n"
                f"account required {MATRIX} passdb={world.passdb}\n")
    d = _start(tmp_path, tmp_config, conf + f"pamService = {os.path.basename(path)}\n", started,
               failure_delay=1.0)
    ch = d.connect()
    t = time.monotonic()
    reply = login(ch, "alice", world.users["alice"].password)
    assert isinstance(reply, Error) and reply.reason.startswith("temporary failure")
    assert time.monotonic() - t < 2.5  # no failure delay, and the timeout held
    log = d.wait_log("auth unavailable")
    assert f"auth unavailable: user=alice client=192.0.2.7 reason={reason}" in log
    assert "auth failed" not in log
    if sleep:  # a stuck worker does not hold up the others: they time out on their own
        t = time.monotonic()
        assert isinstance(login(d.connect(), "bob", "x"), Error)
        assert time.monotonic() - t < 2.5
        t = time.monotonic()
        assert d.stop() == 0  # SIGTERM is not held up by the stuck workers
        assert time.monotonic() - t < 1.5
