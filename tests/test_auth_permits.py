"""The permit table and the penalty, as plain function calls (sans-IO)."""

import os

import pytest
from hypothesis import given, strategies as st

from sendooway_auth._logfmt import field, text
from sendooway_auth._penalty import Penalty, SharedPenalty, client_host
from sendooway_auth._permits import PERMITTED, State, Permits, TRANSITIONS, Violation
from sendooway_shared.protocol import VERSION, AuthRequest, Hello, RouteRequest
from sendooway_shared.types import Secret

HELLO = Hello(VERSION, "s", "192.0.2.1")
AUTH = AuthRequest("alice", Secret("pw"))
ROUTE = RouteRequest("a@b.c")


def test_happy_path_and_routes_repeat():
    p = Permits(max_failures=3)
    p.admit(HELLO)
    p.hello(HELLO)
    p.admit(AUTH)
    p.auth_failed()
    p.admit(AUTH)
    p.auth_ok("alice")
    assert p.state is State.AUTHENTICATED and p.user == "alice"
    for _ in range(5):
        p.admit(ROUTE)
        p.route_answered()
    assert p.state is State.AUTHENTICATED


@pytest.mark.parametrize("steps,bad,reason", [
    ([], AUTH, "auth before hello"),
    ([], ROUTE, "route before hello"),
    (["hello"], ROUTE, "route before a successful auth"),
    (["hello"], HELLO, "second hello"),
    (["hello", "fail"], ROUTE, "route before a successful auth"),
    (["hello", "ok"], AUTH, "second auth after a successful one"),
    (["hello", "ok"], HELLO, "hello after auth"),
])
def test_violations_close(steps, bad, reason):
    p = Permits(3)
    for s in steps:
        {"hello": lambda: (p.admit(HELLO), p.hello(HELLO)),
         "fail": lambda: (p.admit(AUTH), p.auth_failed()),
         "ok": lambda: (p.admit(AUTH), p.auth_ok("alice"))}[s]()
    with pytest.raises(Violation, match=reason):
        p.admit(bad)
    assert p.closed
    with pytest.raises(Violation):
        p.admit(HELLO)


def test_bad_version_closes():
    p = Permits(3)
    p.admit(HELLO)
    p.hello(Hello(VERSION + 1, "s", ""))
    assert p.closed


def test_max_failures_closes_after_the_last():
    p = Permits(2)
    p.admit(HELLO), p.hello(HELLO)
    p.admit(AUTH), p.auth_failed()
    assert not p.closed
    p.admit(AUTH), p.auth_failed()
    assert p.closed and p.user is None


def test_reporting_an_outcome_in_the_wrong_state_is_our_bug():
    p = Permits(3)
    with pytest.raises(AssertionError):
        p.auth_ok("alice")


def test_table_is_complete():
    # every state that permits a request has an outcome leaving it
    for state, kind in PERMITTED.items():
        if kind is not None:
            assert any(s is state for s, _ in TRANSITIONS)


@given(st.lists(st.sampled_from(["hello", "auth-ok", "auth-fail", "route"]), max_size=30))
def test_random_sequences_never_route_without_auth(seq):
    p = Permits(3)
    for step in seq:
        msg = {"hello": HELLO, "auth-ok": AUTH, "auth-fail": AUTH, "route": ROUTE}[step]
        try:
            p.admit(msg)
        except Violation:
            assert p.closed
            break
        if step == "hello":
            p.hello(HELLO)
        elif step == "auth-ok":
            p.auth_ok("alice")
        elif step == "auth-fail":
            p.auth_failed()
        else:
            assert p.user == "alice"  # a route is only ever admitted after auth_ok
            p.route_answered()
        if p.closed:
            break
    assert p.failures <= 3


@pytest.fixture(params=["memory", "shared"])
def make_penalty(request, tmp_path):
    def make(**kw):
        if request.param == "memory":
            return Penalty(**kw)
        return SharedPenalty.open(str(tmp_path / "penalty"), **kw)
    return make


def test_penalty_doubles_per_user_and_per_address_and_fades(make_penalty):
    pen = make_penalty(base=0.5, cap=4.0, window=60)
    assert pen.failure("alice", "192.0.2.1", 0) == 0.5
    assert pen.failure("alice", "192.0.2.1", 1) == 1.0
    assert pen.failure("alice", "198.51.100.9", 2) == 2.0    # same user, other address
    assert pen.failure("bob", "192.0.2.1", 3) == 2.0         # same address, other user
    assert pen.failure("carol", "203.0.113.5", 4) == 0.5     # unrelated
    for t in range(5, 10):
        d = pen.failure("alice", "192.0.2.1", t)
    assert d == 4.0                                          # capped
    assert pen.failure("alice", "192.0.2.1", 200) == 0.5     # faded after the window
    pen.success("alice", "192.0.2.1")
    assert pen.count("alice", "192.0.2.1", 201) == 0


def test_penalty_memory_is_bounded(tmp_path):
    pen = Penalty(max_keys=100)
    for i in range(1000):
        pen.failure(f"u{i}", f"10.0.{i // 250}.{i % 250}", i)
    assert len(pen._counts) <= 100
    shared = SharedPenalty.open(str(tmp_path / "p"), max_keys=100, window=10)
    for i in range(300):
        shared.failure(f"u{i}", "", i, account=False)   # made-up names
    assert len(set(os.listdir(tmp_path / "p")) - {"turns"}) <= 100  # (turns: the login locks)
    # a real account's count is kept all the same (and there are only so many)
    shared.failure("carol", "", 300)
    assert shared.count("carol", "", 301) == 1
    # in memory, made-up names never push a real account's count out
    pen = Penalty(max_keys=100, window=10_000)
    pen.failure("carol", "", 0)
    for i in range(1000):
        pen.failure(f"nx{i}", "", i, account=False)
    assert pen.count("carol", "", 1000) == 1


def test_shared_penalty_is_seen_by_another_process_and_refuses_open_dirs(tmp_path):
    d = str(tmp_path / "p")
    SharedPenalty.open(d).failure("alice", "192.0.2.1", 100)
    assert SharedPenalty.open(d).count("alice", "192.0.2.1", 101) == 1
    os.chmod(d, 0o755)
    with pytest.raises(PermissionError):
        SharedPenalty.open(d)


@pytest.mark.parametrize("given_,host", [
    ("192.0.2.7", "192.0.2.7"), ("192.0.2.7:5123", "192.0.2.7"),
    ("2001:db8::1", "2001:db8::1"), ("[2001:db8::1]:25", "2001:db8::1"),
    ("2001:DB8:0::1", "2001:db8::1"), ("::ffff:192.0.2.7", "192.0.2.7"),
    ("[::ffff:192.0.2.7]:587", "192.0.2.7"),
    ("", ""), ("evil\nauth ok: user=root", ""), ("localhost", ""),
])
def test_client_host(given_, host):
    assert client_host(given_) == host


def test_log_fields_cannot_forge_lines():
    assert field("alice") == "alice"
    assert field("") == "-"
    v = field("x\nauth ok: user=root client=1.2.3.4")
    assert "\n" not in v and " " not in v and "=" not in v
    assert field("é") == "\\xe9" and len(field("a" * 1000)) < 110


def test_log_text_stays_one_line():
    assert text("/home/a/.fetchmailrc:3: unknown keyword") == "/home/a/.fetchmailrc:3: unknown keyword"
    assert "\n" not in text("a\nauth failed: user=x client=1.2.3.4 reason=y")
    assert text("x\u2028y") == "x\\u2028y" and len(text("a" * 5000)) < 510


def test_penalty_counts_an_ipv6_client_by_its_64_and_a_user_whatever_the_case(make_penalty):
    """A client with a /64 of its own (any IPv6 home or server line) took
    the next address for each guess and started each time afresh: IPv6
    clients are counted per /64. And "ALICE", "Alice" are alice wherever
    NSS ignores case (LDAP, sssd): one count for all the spellings."""
    pen = make_penalty(base=1.0, cap=64.0, window=600)
    for n in range(5):
        pen.failure(f"guess{n}", f"2001:db8:7:9::{n + 1:x}", n)
    assert pen.count("someone", "2001:db8:7:9:ffff::1", 6) == 5
    assert pen.failure("other", "2001:db8:7:9::abcd", 7) == 32.0
    assert pen.count("someone", "2001:db8:7:a::1", 8) == 0     # the next /64 is another site
    assert pen.count("someone", "192.0.2.1", 8) == 0

    for n, spelling in enumerate(["ALICE", "Alice", "aLiCe", "alice"]):
        pen.failure(spelling, f"198.51.100.{n + 1}", 10 + n)
    assert pen.count("alice", "203.0.113.1", 20) == 4
    pen.success("Alice", "203.0.113.1", 21)
    assert pen.count("ALICE", "203.0.113.1", 22) == 0


def test_login_turns_survive_their_store_failing_under_a_holder(tmp_path):
    """The turns across processes (socketpair mode) give up when their store
    fails (ENOSPC, the directory gone): a login holding a turn at that moment
    still lets it go (it hit AttributeError and kept the flock for good),
    and the one that met the failure goes on without."""
    import asyncio

    from sendooway_auth._penalty import KeyLocks
    from sendooway_auth._service import _Turns

    locks = KeyLocks(str(tmp_path))
    real = locks.try_take
    calls = []

    def failing_second(keys):
        calls.append(keys)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(keys)

    locks.try_take = failing_second

    async def main():
        turns = _Turns(locks)

        async def holder():
            async with turns.take([("u:alice", 1)], 5):
                assert len(os.listdir(tmp_path)) == 1  # alice's turn file
                await asyncio.sleep(0.2)

        async def other():
            await asyncio.sleep(0.05)
            async with turns.take([("c:192.0.2.1", 1)], 5):
                return "decided"

        return await asyncio.gather(holder(), other(), return_exceptions=True)

    assert asyncio.run(main()) == [None, "decided"]
    assert os.listdir(tmp_path) == []  # released and removed


def test_a_turns_directory_that_cannot_serve_keeps_the_shared_counts(tmp_path):
    """A `turns` directory that is not private (0755) cost the whole shared
    store (counts kept per session); now only the turns across processes."""
    d = tmp_path / "p"
    os.makedirs(d / "turns", mode=0o700)
    os.chmod(d, 0o700)
    os.chmod(d / "turns", 0o755)
    store = SharedPenalty.open(str(d))
    assert store.locks is None
    store.failure("alice", "192.0.2.1", 100)
    assert SharedPenalty.open(str(d)).count("alice", "192.0.2.1", 101) == 1
