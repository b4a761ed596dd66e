"""Review of the frontend ⇄ authenticator boundary, played as a compromised
frontend (code execution as frontendUser), as a local user with a login and
hostile files, and as an Internet client. Every test here failed against
the code it was written for (each is fixed); each docstring says what was
wrong, what it cost and what the documents ask for instead.

All of them talk to a real `sendooway-auth` daemon (tests/auth_helpers.py)
in the fake world (nss_wrapper, pam_wrapper + pam_matrix, a tiny slow PAM
module built with cc where PAM's own refusal delay matters).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time

import pytest

from sendooway_shared.protocol import (
    VERSION, AuthFail, AuthOk, AuthRequest, BlockingChannel, Hello, RouteOk, Welcome, encode,
)
from sendooway_shared.types import Secret
from tests.fakeworld import become
from tests.auth_helpers import (  # noqa: F401 - daemon is a fixture
    MATRIX, add_pam_service, build_test_pam_module, daemon, login, raw_frame, route,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the authenticator runs as root")

# The fail2ban line as the shipped filter sees it in a `-l FILE` log.
F2B = re.compile(r"^\S+ \S+ sendooway-auth\[\d+\]: auth failed: user=(\S*) client=(\S+?)"
                 r"(?::\d+)? reason=")
PAM_NO = 0.6  # seconds the slow test PAM stack takes to refuse a wrong password


@pytest.fixture(scope="module")
def slow_module(world):
    path = build_test_pam_module(world)
    if path is None:
        pytest.skip("needs a C compiler (cc) to build the slow test PAM module")
    return path


def _hello(ch: BlockingChannel, session: str, client: str = "") -> None:
    assert ch.request(Hello(VERSION, session, client)).TYPE == "welcome"


def _reply_within(ch: BlockingChannel, seconds: float):
    """The next reply, or None when none came within `seconds`."""
    ch.sock.settimeout(seconds)
    try:
        return ch.receive()
    except socket.timeout:
        return None


def _timed_auth(d, user: str, password: str) -> tuple[object, float]:
    ch = d.connect()
    try:
        _hello(ch, "t")
        t = time.monotonic()
        reply = ch.request(AuthRequest(user, Secret(password)))
        return reply, time.monotonic() - t
    finally:
        ch.close()


def _read_frames(sock: socket.socket, count: int) -> None:
    """Read `count` reply frames (contents not needed)."""
    buf = b""
    seen = 0
    while seen < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {seen} of {count} replies"
        buf += chunk
        while len(buf) >= 4:
            (length,) = struct.unpack(">I", buf[:4])
            if len(buf) < 4 + length:
                break
            buf = buf[4 + length:]
            seen += 1


# ------------------------------------------------------------ password guessing


def test_failure_backoff_does_not_limit_guesses_that_do_not_wait_for_the_answer(daemon, world):
    """DEFECT: the failure backoff only holds back the *reply* to a failed
    login; the check itself runs at once, and a right password is answered
    at once whatever the backoff. So a caller learns every verdict early:
    no `auth_ok` within PAM's usual time means "wrong", and it moves on to
    the next guess on a new connection. Here six wrong guesses at carol
    (one connection each, given up after 0.25 s) drive her backoff to the
    15 s cap in the daemon's own log (delay=1.0, 2.0, 4.0, 8.0, 15.0,
    15.0), and 1.5 s after the first guess her right password is still
    answered `auth_ok` within milliseconds.

    Impact: a compromised frontend (it also chooses `hello.client`, so the
    per-address count and fail2ban never hit it) — or any client of an
    honest frontend that drops the session after AUTH — guesses one
    user's UNIX password at PAM's full speed; `base × 2ⁿ` (DESIGN.md
    "wrong password 535 after a delay", docs/protocol.md "Failure delay
    and backoff", docs/security.md "Password guessing") bounds nothing.

    Correct: while a user name (or address) is in backoff, the next login
    for it is not decided before the backoff has run out — hold the check
    (or every answer, success included) until then, e.g. a per-key
    "not before" time in `_penalty.Penalty` awaited in
    `_service.AuthService.authenticate` before `_check`."""
    d = daemon(failure_delay=1.0)
    started = time.monotonic()
    for i in range(6):
        ch = d.connect()
        _hello(ch, f"guess{i}")
        ch.send(AuthRequest("carol", Secret(f"guess-{i}")))
        assert _reply_within(ch, 0.25) is None  # no auth_ok in time: the guess was wrong
        ch.close()
    # (since the fix each guess also waits for its turn: one login per user
    # name is decided at a time, so the guesses are decided one delay apart)
    d.wait_log("delay=2.0")  # (which guess comes second is not fixed)
    ch = d.connect()
    _hello(ch, "right")
    ch.send(AuthRequest("carol", Secret(world.users["carol"].password)))
    reply = _reply_within(ch, 2.0)
    took = time.monotonic() - started
    ch.close()
    assert reply is None, (
        f"carol's backoff is at its 15 s cap, yet her right password got {reply} "
        f"{took:.1f} s after the first of six guesses: the backoff never slowed the guessing")


def test_unknown_user_names_cannot_wipe_a_users_backoff(daemon, world):
    """DEFECT: the in-memory backoff keeps at most 10 000 keys and drops the
    oldest, and every failed login for a name that does not even exist
    adds a key (`u:NAME`). Names cost nothing (no PAM call, no client key
    when `hello.client` is not an IP address), so 10 000 made-up names —
    2 to 3 s here, through 50 connections — push the real account's count
    out of the table: carol, at 7 recent failures (her next failure is
    due 1.28 s at this base of 0.01 s), is back to the base delay.

    Impact: an attacker alternates "spray 10 000 junk names" with guesses
    at the real target, which then never get past the first step of the
    backoff (DESIGN.md "wrong password 535 after a delay"; docs/protocol.md
    "Failure delay and backoff"; docs/decisions/auth.md "Failure delay and
    backoff"). The bound itself is documented; that junk names evict real
    users' records is not, and it defeats the per-user count, the one that
    stops guessing from many addresses. (The --fd store,
    `_penalty.SharedPenalty`, has the mirror image: once 10 000 files are
    fresh, new keys are not stored at all, so a sprayed store counts no
    new victim.)

    Correct: keys of unknown names must not displace those of real
    accounts — e.g. keep them in a separate bounded table (or one shared
    key), or evict unknown-name keys first, in `_penalty.Penalty._save`
    (and `SharedPenalty._full`)."""
    d = daemon("maxAuthFailures = 1000\n", failure_delay=0.01)
    ch = d.connect()
    _hello(ch, "before")
    for i in range(7):
        assert ch.request(AuthRequest("carol", Secret(f"guess-{i}"))) == AuthFail()
    ch.close()
    socks = []
    for c in range(50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d.socket_path)
        data = raw_frame({"type": "hello", "version": VERSION, "session": f"spray{c}",
                          "client": ""})
        data += b"".join(raw_frame({"type": "auth", "user": f"nx{c}-{k}", "password": "x"})
                         for k in range(200))
        s.sendall(data)
        socks.append(s)
    for s in socks:
        s.settimeout(30)
        _read_frames(s, 201)
        s.close()
    ch = d.connect()
    _hello(ch, "after")
    assert ch.request(AuthRequest("carol", Secret("guess-7"))) == AuthFail()
    ch.close()
    line = next(ln for ln in d.wait_log("session=after").splitlines() if "session=after" in ln)
    assert "delay=1.3" in line, f"carol's 8th failure should wait 0.01 × 2^7 s: {line}"


@pytest.mark.parametrize("conf, account_rc, what", [
    ("validUser = alice\n", 0, "not-a-valid-user"),
    ("", 13, "account-expired"),
    ("", 12, "password-expired"),
])
def test_a_refusal_does_not_tell_that_the_password_was_right(daemon, world, slow_module, conf,
                                                              account_rc, what):
    """DEFECT: a login refused *after* PAM accepted the password (the
    account is not a `validUser`; `pam_acct_mgmt` says the account or the
    password expired) is answered at once, while a wrong password takes
    as long as PAM takes to say no (pam_unix/pam_faildelay ≈ 2 s; 0.6 s in
    this test's PAM stack). The reply is the same `auth_fail`, but its
    timing says "the password was right". The daemon knows PAM's refusal
    time (`AuthService._pam_no`) and pads only the unknown-user refusal
    with it.

    Impact: anyone who can make a login attempt (an Internet client
    through the frontend, a compromised frontend) gets a password oracle
    for exactly the accounts the admin kept out of the service — root and
    other accounts outside `validUser`, expired and locked accounts whose
    passwords live on elsewhere or come back with the account. DESIGN.md:
    "Failures are generic to the frontend"; docs/protocol.md `auth_fail`:
    "unknown user, wrong password, expired account and 'not a validUser'
    look the same to the frontend"; docs/decisions/auth.md pads unknown
    users "so that the reply's timing does not tell" — the same holds a
    fortiori for "right password".

    Correct: every refusal that did not take PAM's refusal time is held
    back to it (as unknown users are), or validUser is decided before PAM
    is asked (`_service.AuthService.authenticate` / `_check_blocking`)."""
    service = add_pam_service(world, f"sendooway-rv-{what}", slow_module, fail_sleep=PAM_NO,
                              account_rc=account_rc)
    d = daemon(f"pamService = {service}\n{conf}", failure_delay=0.0)
    reply, wrong = _timed_auth(d, "carol", "guess-wrong")
    if what == "not-a-valid-user":
        # (fixed by deciding validUser before PAM: no password of an account
        # kept out is ever tried, both refusals alike)
        assert reply == AuthFail()
        assert d.wait_log("reason=not-a-valid-user").count("reason=not-a-valid-user") == 1
    else:
        assert reply == AuthFail() and wrong >= PAM_NO * 0.9, wrong
    reply, right = _timed_auth(d, "carol", world.users["carol"].password)
    assert reply == AuthFail()
    d.wait_log(f"reason={what}")
    if what == "not-a-valid-user":
        log = d.log()
        assert log.count("reason=not-a-valid-user") == 2 and "wrong-password" not in log
        return  # both refused before PAM, in about no time: nothing to compare
    assert right >= wrong * 0.8, (
        f"{what}: the right password was refused in {right * 1000:.0f} ms, a wrong one in "
        f"{wrong * 1000:.0f} ms: the timing tells the password was right")


def test_an_empty_password_is_refused_by_the_authenticator_itself(daemon, world, tmp_path):
    """DEFECT: the frontend never asks for a login with an empty password
    (`sendooway_front/_session.py` `_auth_ask`: "could never succeed"),
    but the authenticator hands one straight to PAM. It *can* succeed:
    the shipped /etc/pam.d/sendooway includes Debian's common-auth, whose
    `pam_unix.so nullok` accepts "" for an account whose password field is
    empty (a passwordless guest/kiosk account, an image whose root has no
    password). pam_matrix with an empty passdb entry behaves the same:
    `auth {"user": "carol", "password": ""}` gets `auth_ok`, and with it
    carol's routes and upstream passwords.

    Impact: a compromised frontend logs in to every passwordless account
    and reads its upstream credentials, which the SMTP side never allows
    — a rule enforced only on the untrusted side of the boundary
    (DESIGN.md: the authenticator "trusts nothing the frontend says";
    docs/security.md attacker 4). sshd refuses empty passwords by default
    for the same reason (PermitEmptyPasswords no).

    Correct: `_service.AuthService.authenticate` refuses an empty password
    (an ordinary `auth_fail`, reason e.g. `empty-password`) without
    asking PAM."""
    passdb = tmp_path / "passdb-empty"
    passdb.write_text("carol::sendooway-rv-nullok\n")
    os.chmod(passdb, 0o600)
    with open(os.path.join(world.pam_dir, "sendooway-rv-nullok"), "w") as f:
        f.write(f"auth required {MATRIX} passdb={passdb}\n"
                f"account required {MATRIX} passdb={passdb}\n")
    world.write_user_file("carol", ".fetchmailrc",
                          'poll pop.example.org proto pop3 user "carol" password "up-Secret-C3"\n'
                          '#sendooway:server "smtp.example.org"\n#sendooway:tls\n'
                          '#sendooway:address "carol@example.org"\n')
    d = daemon("pamService = sendooway-rv-nullok\n")
    ch = d.connect()
    reply = login(ch, "carol", "")
    got = route(ch, "carol@example.org") if reply == AuthOk("carol") else None
    ch.close()
    assert reply == AuthFail(), (
        f"an empty password got {reply}"
        + (f" and carol's upstream password ({got.server})" if isinstance(got, RouteOk) else ""))


# ------------------------------------------------------------ log forging


def test_a_users_own_route_cannot_forge_log_lines(daemon, world):
    """DEFECT: the `route:` log line writes `Route.describe()` as it is, and
    the upstream server and user name in it come from the user's own
    files, where fetchmail quoting turns `\\n` into a newline (a getmail
    rc's indented continuation line does the same). A user who can log in
    puts a whole fail2ban line into `#sendooway:server "…\\n…"` and sends
    one message: the daemon's log gains a line `auth failed: user=root
    client=203.0.113.9 reason=wrong-password`, with the right prefix, that
    the shipped filter takes for a real failure.

    Impact: any local user with a login gets arbitrary addresses banned
    (the admin's, the office NAT, a partner's relay) and writes fake
    `auth ok`/`auth failed` lines into the audit trail. DESIGN.md and
    docs/protocol.md "Log lines": values from the network and users'
    files "are escaped … so no line can be forged"; docs/security.md
    lists forging log lines under attacker 2. `user file error` lines are
    escaped (`_logfmt.text`); the route line is not.

    Correct: `_service.AuthService.route` logs the route's fields escaped
    (`_logfmt.field` for server and user), and/or the parsers refuse
    control characters in a server or user name (it is no host name
    anyway)."""
    forged = ("2026-01-01 00:00:00 sendooway-auth[1]: auth failed: user=root"
              " client=203.0.113.9 reason=wrong-password session=x delay=0.0")
    world.write_user_file("alice", ".fetchmailrc",
                          'poll pop.example.org proto pop3 user "alice" password "up-Secret-A1"\n'
                          f'#sendooway:server "smtp.example.org\\n{forged}"\n'
                          '#sendooway:tls\n#sendooway:address "alice@example.org"\n')
    d = daemon()
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password, client="192.0.2.7") == AuthOk("alice")
    route(ch, "alice@example.org")
    ch.close()
    log = d.wait_log("route: user=alice")
    hosts = [m.group(2) for m in map(F2B.match, log.splitlines()) if m]
    assert "203.0.113.9" not in hosts, f"forged fail2ban line in the daemon's log:\n{log}"
    for line in log.splitlines():
        assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d sendooway-auth\[\d+\]: ", line), line


# ------------------------------------------------------------ the socket


def test_a_local_user_cannot_squat_the_authenticator_socket(world, tmp_path):
    """DEFECT: the socket's directory is only refused when it is writable by
    everyone *without* the sticky bit (docs/protocol.md "Transports",
    `_server.bind_socket`), so `authSocket = /tmp/sendooway.sock` (or any
    sticky 1777 directory) is accepted; and the frontend trusts whatever
    listens at `authSocket`: started as root it uses a "reachable daemon"
    instead of its own authenticator (`sendooway_front/cli.py`,
    `daemon_reachable`), and it never checks who is at the other end. A
    local user (carol here) who binds that name while no daemon listens —
    always in the xinetd `user = root` set-up, which runs no daemon, and
    at every daemon restart otherwise (a daemon started later exits 2:
    "another authenticator is listening there") — receives `hello` and
    the `auth` request of every SMTP login: the user name and the UNIX
    password in clear.

    Impact: any local account harvests every mail user's UNIX password.
    DESIGN.md: only root and frontendUser may talk to the authenticator;
    the reverse — the frontend talks only to root — holds nowhere.

    Correct: refuse a socket directory that anyone but root may write to,
    sticky or not (`_server.bind_socket`, and the same check in the
    frontend before it trusts `authSocket`), and have the frontend check
    SO_PEERCRED (uid 0) on its connection before it sends a byte
    (`sendooway_front/_authlink.py` `SocketConnector`)."""
    from tests.front_util import FRONT, front_config, login_plain

    shared = tempfile.mkdtemp(prefix="sendooway-rv-sticky-")
    try:
        os.chmod(shared, 0o1777)  # like /tmp
        path = os.path.join(shared, "sendooway.sock")
        carol = world.users["carol"]
        welcome = encode(Welcome(VERSION))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # carol's squatter
            try:
                os.close(r)
                become(carol)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(path)
                os.chmod(path, 0o777)  # the frontend, nobody by then, may connect
                s.listen(8)
                os.write(w, b"R")
                s.settimeout(8)
                got = b""
                for _ in range(3):  # the frontend's probe first, then its session
                    conn, _ = s.accept()
                    conn.settimeout(3)
                    try:
                        while len(got) < 65536:
                            chunk = conn.recv(4096)
                            if not chunk:
                                break
                            if not got:
                                conn.sendall(welcome)  # play the authenticator
                            got += chunk
                    except socket.timeout:
                        pass
                    conn.close()
                    if got:
                        break
                os.write(w, got)
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"R"
        config = front_config(tmp_path, world, f"authSocket = {path}\ntimeout = 5\n", tls=False)
        script = (f"EHLO client.test\r\nAUTH PLAIN {login_plain('alice', world.users['alice'].password)}"
                  "\r\nQUIT\r\n").encode()
        subprocess.run([FRONT, "-c", config, "-l", str(tmp_path / "front.log")], input=script,
                       capture_output=True, timeout=30)
        stolen = b""
        while chunk := os.read(r, 65536):
            stolen += chunk
        os.close(r)
        os.waitpid(pid, 0)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    leaked = world.users["alice"].password.encode() in stolen
    assert not leaked, ("carol's socket at authSocket received alice's UNIX password from a"
                        " root-started frontend")
