"""Issue 8, the authenticator's side, through the real `sendooway -b` and
`sendooway-auth`: password guessing (failure delay and backoff per user and
per client address, the fail2ban line, forged log lines), sender spoofing
across users, hostile files in a user's home."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import time

import pytest

from .auth_helpers import Daemon
from .deploy_util import system_env
from .front_util import (FRONT, Frontend, front_config, login_plain, open_tmp,
                         pair_authenticator_waiting)
from .hardening_util import RawClient
from .upstream import FakeUpstream

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemons switch users: needs root")

BASE = 0.1  # --failure-delay
PACKAGING = pathlib.Path(__file__).resolve().parent.parent / "packaging"


def greet(fe) -> RawClient:
    c = RawClient(fe.host, fe.port)
    assert c.reply()[0] == 220
    assert c.cmd(b"EHLO client.test\r\n")[0] == 250
    return c


def timed_auth(c: RawClient, user: str, password: str) -> tuple[int, float]:
    t = time.monotonic()
    code, _ = c.cmd(f"AUTH PLAIN {login_plain(user, password)}\r\n".encode())
    return code, time.monotonic() - t


# ------------------------------------------------------------ password guessing


F2B = re.compile(r"^\S+ \S+ sendooway-auth\[\d+\]: auth failed: user=(\S*) client=(\S+?) reason=\S+ ")


def test_failure_delay_backs_off_per_user_and_per_address(world):
    """Wrong passwords are answered after BASE x 2^n, n = recent failures of
    that user or that client address, whichever is more; a right password
    clears both. Two frontends, on 127.0.0.1 and ::1, share one daemon."""
    with open_tmp() as tmp:
        config = front_config(tmp, world, "maxAuthFailures = 10\ntimeout = 10\n")
        daemon = Daemon(tmp, config, failure_delay=BASE).start()
        v4 = Frontend(config, str(tmp / "v4.log")).start()
        v6 = Frontend(config, str(tmp / "v6.log"), host="::1").start()
        try:
            pw = {u: world.users[u].password for u in world.users}

            def expect(c, user, password, n):
                code, took = timed_auth(c, user, password)
                assert code == 535
                want = BASE * 2 ** n
                # the lower bound is the delay; the upper one tells n from
                # n + 1 (2 x want) where it can, with room for a loaded
                # machine's slow round trip through the daemon and PAM
                assert want * 0.9 <= took < max(want + 0.3, want * 1.9), (user, n, took)

            with greet(v4) as c:
                for n in range(3):                       # alice @127.0.0.1: 0.1, 0.2, 0.4
                    expect(c, "alice", "wrong-guess", n)
                expect(c, "bob", "wrong-guess", 3)       # same address: 0.8
            with greet(v6) as c:
                expect(c, "carol", "wrong-guess", 0)     # new user, new address: 0.1
                expect(c, "alice", "wrong-guess", 3)     # alice's own count (3 → 4): 0.8
                code, took = timed_auth(c, "alice", pw["alice"])
                assert code == 235 and took < 0.3        # no delay for a right password
            with greet(v6) as c:                         # success cleared alice and her share
                expect(c, "alice", "wrong-guess", 1)     # of ::1; carol's failure there stays
            log = daemon.log()
        finally:
            v4.stop()
            v6.stop()
            daemon.stop()
    fails = [F2B.match(line) for line in log.splitlines() if "auth failed:" in line]
    assert all(fails) and len(fails) == 7
    hosts = [(m.group(1), m.group(2)) for m in fails]
    assert hosts.count(("alice", "127.0.0.1")) == 3 and ("bob", "127.0.0.1") in hosts
    assert ("carol", "::1") in hosts and hosts.count(("alice", "::1")) == 2
    assert "reason=wrong-password" in log
    for p in pw.values():
        assert p not in log


def test_user_names_cannot_forge_fail2ban_lines(world):
    """A user name holding spaces, `client=` or a newline cannot make the
    failure line name another host: the shipped fail2ban filter (run by the
    real fail2ban-regex when installed) sees only the real client."""
    with open_tmp() as tmp:
        config = front_config(tmp, world, "maxAuthFailures = 10\n")
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, str(tmp / "front.log")).start()
        try:
            with greet(fe) as c:
                for forged in ("x client=203.0.113.9 reason=wrong-password",
                               "y\n2026-11-25 10:00:00 sendooway-auth[1]: auth failed: user=z "
                               "client=203.0.113.10 reason=wrong-password session=s delay=0",
                               "w\rclient=203.0.113.11"):
                    assert timed_auth(c, forged, "wrong-guess")[0] in (535, 421)
            log = daemon.log()
            front_log = fe.log()
        finally:
            fe.stop()
            daemon.stop()
        assert "203.0.113" in log  # the names are logged (escaped) ...
        for line in log.splitlines():
            m = F2B.match(line)
            if m:
                assert m.group(2) == "127.0.0.1", line  # ... but name no host
            else:
                assert "auth failed" not in line, line
        for line in front_log.splitlines():
            assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d sendooway\[\d+\]: ", line), line
        if os.path.exists("/etc/fail2ban/filter.d/common.conf") and shutil.which("fail2ban-regex"):
            fdir = tmp / "fail2ban" / "filter.d"
            fdir.mkdir(parents=True)
            shutil.copy("/etc/fail2ban/filter.d/common.conf", fdir)
            shutil.copy(PACKAGING / "fail2ban" / "filter.d" / "sendooway.conf", fdir)
            (tmp / "auth-copy.log").write_text(log)
            r = subprocess.run(["fail2ban-regex", "--out", "ip", str(tmp / "auth-copy.log"),
                                str(fdir / "sendooway.conf")],
                               capture_output=True, text=True, timeout=60, env=system_env())
            assert r.stdout.split() == ["127.0.0.1"] * 3, (r.stdout, r.stderr)


# ------------------------------------------------------------ sender spoofing


FETCHMAILRC = ('poll pop.example.org proto pop3 user "{user}" password "{pw}"\n'
               '#sendooway:server "127.0.0.1"\n#sendooway:port {port}\n'
               '#sendooway:address "{address}"\n')


def test_a_user_reaches_only_their_own_routes(world, clean_homes):
    """alice cannot send as bob, neither by naming his address nor by pointing
    her own .sendoowayrc (or a symlink) at his .fetchmailrc; bob's upstream
    never sees a connection from her session; her own route works."""
    up_a = FakeUpstream(world, tls="plain", accounts={"alice-up": "A-Up-Secret-71"}).start()
    up_b = FakeUpstream(world, tls="plain", accounts={"bob-up": "B-Up-Secret-72"}).start()
    try:
        world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC.format(
            user="alice-up", pw="A-Up-Secret-71", port=up_a.port, address="alice@alice.example"))
        bob_rc = world.write_user_file("bob", ".fetchmailrc", FETCHMAILRC.format(
            user="bob-up", pw="B-Up-Secret-72", port=up_b.port, address="bob@bob.example"))
        with open_tmp() as tmp:
            config = front_config(tmp, world, "userInclude = %h/.sendoowayrc\n"
                                              "smarthostMapping = fetchmail:%h/.fetchmailrc\n"
                                              "smarthostMapping = getmail:%h/.getmail/getmailrc\n"
                                              "addReceivedField = no\n")
            daemon = Daemon(tmp, config).start()
            fe = Frontend(config, str(tmp / "front.log")).start()
            try:
                def mail_as(user, sender):
                    with greet(fe) as c:
                        assert timed_auth(c, user, world.users[user].password)[0] == 235
                        code, text = c.cmd(f"MAIL FROM:<{sender}>\r\n".encode())
                        if code == 250:
                            assert c.cmd(b"RCPT TO:<r@example.net>\r\n")[0] == 250
                            assert c.cmd(b"DATA\r\n")[0] == 354
                            code, text = c.cmd(b"Subject: t\r\n\r\nbody\r\n.\r\n")
                        c.cmd(b"QUIT\r\n")
                        return code, text

                for sender in ("bob@bob.example", "BOB@BOB.EXAMPLE", "bob@Bob.Example"):
                    code, text = mail_as("alice", sender)
                    assert code == 550 and text[0].startswith(b"5.7.1"), (sender, code, text)
                world.write_user_file("alice", ".sendoowayrc", f"smarthostMapping = fetchmail:{bob_rc}\n")
                os.makedirs(os.path.join(world.users["alice"].home, ".getmail"), exist_ok=True)
                os.symlink(bob_rc, os.path.join(world.users["alice"].home, ".getmail", "getmailrc"))
                assert mail_as("alice", "bob@bob.example")[0] == 550
                assert up_b.logins == [] and up_b.failed_logins == [] and up_b.messages == []
                assert mail_as("alice", "alice@alice.example")[0] == 250
                assert up_a.logins == ["alice-up"] and len(up_a.messages) == 1
                assert mail_as("bob", "bob@bob.example")[0] == 250
                assert up_b.logins == ["bob-up"] and up_b.messages[0].mail_from == "bob@bob.example"
                log = daemon.log()
                assert f"{bob_rc}: unreadable (Permission denied)" in log
                text = log + fe.log()
                for secret in ("A-Up-Secret-71", "B-Up-Secret-72",
                               *(u.password for u in world.users.values())):
                    assert secret not in text
            finally:
                fe.stop()
                daemon.stop()
    finally:
        up_a.stop()
        up_b.stop()


# ------------------------------------------------------------ hostile files


def test_hostile_files_through_the_frontend(world, clean_homes):
    """carol's home holds a 100 MiB (sparse) .fetchmailrc, a getmailrc that is
    not INI, and a .sendoowayrc naming a FIFO, /etc/shadow through a symlink
    and an unbalanced quote: her MAIL gets 550 quickly, the authenticator's
    log names each file and what is wrong, and it keeps serving bob."""
    u = world.users["carol"]
    home = u.home
    big = os.path.join(home, ".fetchmailrc")
    with open(big, "wb") as f:
        f.truncate(100 * 1024 * 1024)
    os.chown(big, u.uid, u.gid)
    os.chmod(big, 0o600)
    getmailrc = world.write_user_file("carol", ".getmail/getmailrc",
                                      "this is not an INI file\nserver = x\n[sender\n")
    fifo = os.path.join(home, "fifo.rc")
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, u.uid, u.gid)
    os.symlink("/etc/shadow", os.path.join(home, "shadow.rc"))
    quotes = world.write_user_file("carol", "quotes.rc",
                                   'user "carol\n#sendooway:pass "x\n#sendooway:address "c@q.example"\n')
    world.write_user_file("carol", ".sendoowayrc",
                          "smarthostMapping = fetchmail:%h/fifo.rc\n"
                          "smarthostMapping = fetchmail:%h/shadow.rc\n"
                          "smarthostMapping = fetchmail:%h/quotes.rc\n")
    with open_tmp() as tmp:
        config = front_config(tmp, world, "userInclude = %h/.sendoowayrc\n"
                                          "smarthostMapping = fetchmail:%h/.fetchmailrc\n"
                                          "smarthostMapping = getmail:%h/.getmail/getmailrc\n")
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, str(tmp / "front.log")).start()
        try:
            with greet(fe) as c:
                assert timed_auth(c, "carol", u.password)[0] == 235
                t = time.monotonic()
                code, text = c.cmd(b"MAIL FROM:<c@q.example>\r\n")
                assert code == 550 and text[0].startswith(b"5.7.1"), (code, text)
                assert time.monotonic() - t < 3
            with greet(fe) as c:
                assert timed_auth(c, "bob", world.users["bob"].password)[0] == 235
                assert c.cmd(b"MAIL FROM:<bob@nowhere.example>\r\n")[0] == 550
            log = daemon.log()
        finally:
            fe.stop()
            daemon.stop()
    errors = [l for l in log.splitlines() if "user file error: user=carol" in l]
    joined = "\n".join(errors)
    assert re.search(re.escape(big) + r": too.large", joined), joined
    assert f"{getmailrc}:1:" in joined and "INI" in joined, joined
    assert f"{fifo}: not-regular (a FIFO)" in joined, joined
    assert f"{home}/shadow.rc: unreadable (Permission denied)" in joined, joined
    assert f"{quotes}:1: unbalanced quote" in joined, joined
    assert "Traceback" not in log and "internal error" not in log


def test_backoff_spans_sessions_of_a_root_started_inetd_frontend(world):
    """xinetd `user = root`: each session forks its own one-session
    authenticator (--fd), yet a password guesser who reconnects for every
    try still meets the doubling delay (1 s, then 2 s: the default base)."""
    import select

    with open_tmp() as tmp:
        config = front_config(tmp, world, "timeout = 20\n")
        took = []
        for attempt in range(2):
            proc = subprocess.Popen([FRONT, "-c", config, "-l", str(tmp / "front.log")],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
            try:
                buf = bytearray()

                def reply():
                    while True:
                        while b"\n" not in buf:
                            r, _, _ = select.select([proc.stdout], [], [], 20)
                            assert r, "no reply"
                            data = os.read(proc.stdout.fileno(), 4096)
                            assert data, "closed"
                            buf.extend(data)
                        end = buf.index(b"\n") + 1
                        line = bytes(buf[:end])
                        del buf[:end]
                        if line[3:4] != b"-":
                            return line

                assert reply().startswith(b"220 ")
                proc.stdin.write(b"EHLO client.test\r\n")
                proc.stdin.flush()
                assert reply().startswith(b"250 ")
                # timed from a started authenticator: its own start (over a
                # second under load) is no part of the delay
                pair_authenticator_waiting(proc)
                t = time.monotonic()
                proc.stdin.write(f"AUTH PLAIN {login_plain('dave', 'guess-' + str(attempt))}\r\n".encode())
                proc.stdin.flush()
                assert reply().startswith(b"535 ")
                took.append(time.monotonic() - t)
                proc.stdin.write(b"QUIT\r\n")
                proc.stdin.flush()
                assert reply().startswith(b"221 ")
            finally:
                proc.stdin.close()
                proc.wait(20)
                proc.stdout.close()
        right = subprocess.run([FRONT, "-c", config, "-l", str(tmp / "front.log")],
                               input=(f"EHLO c\r\nAUTH PLAIN {login_plain('dave', world.users['dave'].password)}"
                                      "\r\nQUIT\r\n").encode(), capture_output=True, timeout=30)
        assert b"235 " in right.stdout
    # The lower bounds are the delays; the upper ones only tell the first
    # step of the doubling from the next (2 s, 4 s), so a loaded machine
    # (two helpers' mutation runs and a suite on 2 CPUs: load ~10) that
    # slows PAM does not fail it (the authenticator's start is not timed).
    assert 0.9 <= took[0] < 1.9 and 1.8 <= took[1] < 3.8, took


def test_socketpair_logins_side_by_side_take_turns_across_processes(world):
    """xinetd `user = root` with many sessions at once: five one-session
    authenticators guessing one user's password at the same moment (PAM
    taking 0.5 s to refuse, as pam_unix's delay does) are decided one at a
    time, each meeting the delay the one before earned (answers at 1.5 s and
    4 s, the third not before 8.5 s). Each process's turns were its own and
    the counts were read by all at once: all five went to PAM together and
    were answered at about 1.5 s."""
    import select
    import signal

    from .auth_helpers import add_pam_service, build_test_pam_module

    module = build_test_pam_module(world)
    assert module, "the test PAM module could not be built"
    service = add_pam_service(world, "slow-refusal", module, fail_sleep=0.5)
    with open_tmp() as tmp:
        config = front_config(tmp, world, f"timeout = 20\npamService = {service}\n")
        procs = [subprocess.Popen([FRONT, "-c", config, "-l", str(tmp / "front.log")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
                 for _ in range(5)]
        seen = {p.stdout.fileno(): b"" for p in procs}

        def read_until(done, seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end and not done():
                r, _, _ = select.select(list(seen), [], [], 0.02)
                for fd in r:
                    data = os.read(fd, 4096)
                    seen[fd] += data
                    if fd not in answered and re.search(rb"^[45]\d\d ", seen[fd], re.M):
                        answered[fd] = time.monotonic() - start
                    if not data:
                        del seen[fd]

        answered: dict[int, float] = {}
        start = time.monotonic()
        try:
            for proc in procs:
                proc.stdin.write(b"EHLO c\r\n")
                proc.stdin.flush()
            # every session ready (its authenticator forked and linked) first
            read_until(lambda: all(b"250 " in seen.get(fd, b"") for fd in seen), 20)
            assert len(seen) == 5 and all(b"250 " in v for v in seen.values()), seen
            for proc in procs:  # (the 250 comes before the authenticator has started)
                pair_authenticator_waiting(proc)
            for i, proc in enumerate(procs):  # then all five guesses at once
                proc.stdin.write(f"AUTH PLAIN {login_plain('dave', f'guess-{i}')}\r\n".encode())
                proc.stdin.flush()
            start = time.monotonic()
            read_until(lambda: False, 5.0)
            replies = [seen.get(p.stdout.fileno(), b"") for p in procs]
        finally:
            for proc in procs:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(20)
                proc.stdin.close()
                proc.stdout.close()
    times = sorted(answered.values())
    assert len(times) == 2, (times, replies)
    assert 1.2 <= times[0] <= 2.2 and 3.6 <= times[1] <= 4.9, times
    assert sum(b"\r\n535 5.7.8 " in r for r in replies) == 2, replies


def test_reader_has_the_users_uid_gid_and_groups_not_roots(world, clean_homes):
    """Through the real daemon: a root-owned file of mode 0600 is unreadable
    in every user's lookup (root would read it), a root:mailusers 0640 file is
    read for alice and bob (supplementary group) but not for carol."""
    from sendooway_shared.protocol import AuthOk, NoRoute, RouteOk

    from .auth_helpers import login, route
    from .fakeworld import GROUPS

    with open_tmp() as tmp:
        rc = FETCHMAILRC.format(user="u", pw="G-Up-Secret-81", port=2525, address="*@grp.example")
        grp = tmp / "group.rc"
        grp.write_text(rc)
        os.chown(grp, 0, GROUPS["mailusers"])
        os.chmod(grp, 0o640)
        root_only = tmp / "root.rc"
        root_only.write_text(rc.replace("grp.example", "root.example"))
        os.chmod(root_only, 0o600)
        config = front_config(tmp, world, f"smarthostMapping = fetchmail:{grp}\n"
                                          f"smarthostMapping = fetchmail:{root_only}\n")
        daemon = Daemon(tmp, config).start()
        try:
            answers = {}
            for user in ("alice", "bob", "carol"):
                ch = daemon.connect()
                assert login(ch, user, world.users[user].password, session=user) == AuthOk(user)
                answers[user] = (route(ch, f"{user}@grp.example"), route(ch, f"{user}@root.example"))
                ch.close()
            log = daemon.log()
        finally:
            daemon.stop()
    for user in ("alice", "bob"):
        assert isinstance(answers[user][0], RouteOk), answers[user]
        assert answers[user][0].to_route().port == 2525
    assert answers["carol"][0] == NoRoute()
    assert all(answers[u][1] == NoRoute() for u in answers)
    assert f"user file error: user=carol {grp}: unreadable (Permission denied)" in log
    for user in answers:
        assert f"user file error: user={user} {root_only}: unreadable (Permission denied)" in log
    assert "G-Up-Secret-81" not in log


def test_reader_children_caught_alive_run_as_the_user_and_not_dumpable(world, clean_homes):
    """The real daemon's user-file readers, caught in /proc while route
    lookups run: once switched they have alice's uid (all four), gid and
    groups, no capabilities, and are not dumpable (their /proc files stay
    root's), so alice cannot ptrace them and read the global configuration
    they hold."""
    import threading

    from .auth_helpers import login, route
    from .fakeworld import GROUPS
    from .hardening_util import proc_status

    world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC.format(
        user="u", pw="R-Up-Secret-91", port=2525, address="a@x.example"))
    alice = world.users["alice"]
    with open_tmp() as tmp:
        daemon = Daemon(tmp, front_config(tmp, world)).start()
        try:
            ch = daemon.connect()
            login(ch, "alice", alice.password)
            with open(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children") as f:
                (fork_server,) = [int(p) for p in f.read().split()]
            stop = threading.Event()

            def lookups():
                for _ in range(3000):
                    if stop.is_set():
                        break
                    route(ch, "a@x.example")
                stop.set()

            t = threading.Thread(target=lookups, daemon=True)
            t.start()
            caught = []
            while not stop.is_set() and len(caught) < 5:
                try:
                    with open(f"/proc/{fork_server}/task/{fork_server}/children") as f:
                        kids = f.read().split()
                except OSError:
                    continue
                for kid in kids:
                    try:
                        owner = os.stat(f"/proc/{kid}/status").st_uid
                        st = proc_status(int(kid))
                    except (OSError, KeyError):
                        continue  # gone already
                    if st["Uid"].split()[0] != "0":
                        caught.append((owner, st))
            stop.set()
            t.join(30)
        finally:
            daemon.stop()
    assert caught, "no reader child caught after its switch"
    for owner, st in caught:
        assert st["Uid"].split() == [str(alice.uid)] * 4
        assert st["Gid"].split() == [str(alice.gid)] * 4
        assert set(st["Groups"].split()) == {str(alice.gid), str(GROUPS["mailusers"])}
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
        assert owner == 0, "a reader child is dumpable: its user could ptrace it"
