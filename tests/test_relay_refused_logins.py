"""A login the upstream refused (535) is remembered for a few minutes per
route and password (sendooway_front._pool.refused_logins): the client gets
454 4.7.0 at once, the upstream sees no second failed login. Found after the
real-Dovecot review (tests/test_review_upstreams3.py): Dovecot delays every
login from an address after a failure there, fail2ban bans it, and the
proxy's address is every user's, so one stale password in one user's file,
retried by a satellite MTA once per queued message, slowed or locked out all
the users of that smarthost. Before, every MAIL of every retry logged in
upstream again (each test below failed that way).
"""

from __future__ import annotations

import os

import pytest

from sendooway_front import _pool

from .auth_helpers import Daemon
from .front_util import Frontend, front_config, open_tmp
from .scripted_relay import LOGIN, careful, codes, converse
from .upstream import FakeUpstream

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")

RIGHT = "Right-Up-Pw-5hQ2"
STALE = "Stale-Up-Pw-8kW3"


@pytest.fixture(scope="module")
def fw(world):
    """`sendooway -b` (cache off: the memory must not depend on the cache)
    with dave's route in his own ~/.sendoowayrc, to an upstream whose
    account is x/RIGHT."""
    with open_tmp() as tmp:
        up = FakeUpstream(world, tls="starttls", accounts={"x": RIGHT}).start()
        config = front_config(tmp, world, f"sslCA = {world.ca_file}\nsmarthostCache = 0\n"
                                          "userInclude = %h/.sendoowayrc\n")
        world.clear_home("dave")
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            yield world, up, front, daemon
        finally:
            front.stop()
            daemon.stop()
            up.stop()
            world.clear_home("dave")


def _route(world, up, password: str) -> None:
    world.write_user_file("dave", ".sendoowayrc",
                          f"smarthostMapping = direct:*@stale.example localhost {up.port} x {password} tls\n")


def _mail(world, front) -> tuple[int, bytes, int]:
    """MAIL of dave@stale.example in a new session; the RCPT's code when it was accepted."""
    with front.smtp() as s:
        s.starttls(context=world.ssl_context())
        s.ehlo()
        s.login("dave", world.users["dave"].password)
        code, text = s.mail("dave@stale.example")
        rcpt = s.rcpt("to@example.net")[0] if code == 250 else 0
        s.rset()
        return code, text, rcpt


def test_a_refused_login_is_not_tried_again_until_the_password_changes(fw):
    world, up, front, daemon = fw
    _route(world, up, STALE)
    first = _mail(world, front)
    assert first[:1] == (454,) and first[1].startswith(b"4.7.0 Login at the upstream server failed")
    assert up.failed_logins == ["x"]
    # a client retrying, three more sessions: answered here, nothing upstream
    for _ in range(3):
        code, text, _ = _mail(world, front)
        assert code == 454 and b"not tried again" in text, text
    assert up.failed_logins == ["x"] and up.logins == []
    log = front.log()
    assert "not tried again with the same password" in log and "535" in log
    assert STALE not in log and RIGHT not in log and STALE not in daemon.log()
    # the user puts the right password in the file: tried at once, and it works
    _route(world, up, RIGHT)
    code, _, rcpt = _mail(world, front)
    assert (code, rcpt) == (250, 250)
    assert up.logins == ["x"] and up.failed_logins == ["x"]


def _auth_refusing(code: bytes):
    """A scripted upstream offering AUTH PLAIN that refuses it with `code`."""

    async def auth(up, c, line):
        await c.send(code)

    async def script(up, c):
        await careful(up, c, ehlo=b"250-up.test\r\n250-AUTH PLAIN\r\n250 PIPELINING\r\n", auth=auth)

    return script


def _two_mails(monkeypatch, script) -> tuple[list[int], int, str]:
    """One session, MAIL twice (the client trying again after a 454):
    the codes it read, the AUTH commands the upstream saw, the log."""
    mail = b"MAIL FROM:<a@b.example>\r\n"
    out, up, log = converse(monkeypatch, script, [LOGIN, mail, b"RSET\r\n", mail, b"QUIT\r\n"], auth=True)
    return codes(out), sum(1 for line in up.lines if line.upper().startswith(b"AUTH")), log


def test_a_temporary_refusal_is_not_remembered(monkeypatch):
    """454 to AUTH (the upstream's own trouble) is tried again at the next MAIL."""
    got, auths, _ = _two_mails(monkeypatch, _auth_refusing(b"454 4.7.0 try later\r\n"))
    assert auths == 2
    assert got[-4:] == [454, 250, 454, 221], got
    assert not _pool.refused_logins._until


def test_a_535_is_remembered_and_forgotten_after_its_time(monkeypatch):
    got, auths, log = _two_mails(monkeypatch, _auth_refusing(b"535 5.7.8 no\r\n"))
    assert auths == 1, log
    assert got[-4:] == [454, 250, 454, 221], got
    assert "not tried again with the same password" in log and "Up-Pw" not in log
    [(key, (until, detail))] = list(_pool.refused_logins._until.items())
    when = until - _pool.LOGIN_REFUSED_FOR
    assert key.user == "u" and "535 5.7.8" in detail and "Up-Pw" not in detail
    assert key.ehlo_name == ""  # kept for the credentials, whatever name the client gave (cloneEhlo)
    left, _ = _pool.refused_logins.get(key, when + 10)
    assert _pool.LOGIN_REFUSED_FOR - left == pytest.approx(10)
    assert _pool.refused_logins.get(key, when + _pool.LOGIN_REFUSED_FOR) is None
    assert not _pool.refused_logins._until  # an expired entry goes


def test_clients_of_other_ehlo_names_share_the_memory(monkeypatch):
    """With cloneEhlo each client's EHLO name makes its own pool key; the
    refusal is the credentials', so a client greeting with another name
    gets the remembered 454 too (one AUTH upstream in all)."""
    script = _auth_refusing(b"535 5.7.8 no\r\n")
    mail = b"MAIL FROM:<a@b.example>\r\n"
    steps = [LOGIN, mail, b"RSET\r\n", b"EHLO other.test\r\n", mail, b"QUIT\r\n"]
    out, up, log = converse(monkeypatch, script, steps, auth=True, cloneEhlo=True)
    assert [ln for ln in up.lines if ln.upper().startswith(b"EHLO")] == [b"EHLO c.test\r\n"]
    assert sum(1 for line in up.lines if line.upper().startswith(b"AUTH")) == 1
    assert codes(out)[-2:] == [454, 221], out


def test_the_memory_is_bounded_and_a_success_forgets():
    from sendooway_shared.types import Route, Secret, TlsMode

    from sendooway_front._stream import Lately

    memory = Lately(60, 4)
    keys = [_pool.PoolKey.of(Route(server="up.test", port=p, tls=TlsMode.STARTTLS, ca_file="", user="u",
                                   password=Secret("p"), auth=True, source="t:1"), "", "mx.test")
            for p in range(1, 7)]
    for i, k in enumerate(keys):
        memory.note(k, float(i), "535")
    assert len(memory._until) == 4 and memory.get(keys[0], 6.0) is None
    assert memory.get(keys[5], 6.0) is not None
    memory.forget(keys[5])
    assert memory.get(keys[5], 6.0) is None
