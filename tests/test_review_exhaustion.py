"""Exhaustion review: the real programs (`sendooway -b`, `sendooway-auth`
and its fork server and reader workers) on a host that runs out of
something — descriptors (RLIMIT_NOFILE), processes (a pids cgroup, as
systemd's TasksMax= makes one), disk for the log, memory — and what the
client, the log and the process do meanwhile and once it is back. Each
test failed against the code as reviewed, for the reason its docstring
gives (each is fixed). Limits are real (prlimit, cgroups, tmpfs) and are
taken away in `finally`; tests needing root or a pids cgroup skip
otherwise."""

from __future__ import annotations

import contextlib
import errno
import os
import smtplib
import socket
import subprocess
import time
import uuid

import pytest

from sendooway_shared.protocol import AuthOk

from .auth_helpers import Daemon, fork_server, login, workers
from .front_util import (
    FRONT, NOBODY, Frontend, front_config, login_plain, open_tmp, stdio_session,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real limits and users need root")

RC = """\
poll pop.example.org proto pop3 user "{user}" password "fm-Secret-{user}"
#sendooway:server "127.0.0.1"
#sendooway:port {port}
#sendooway:address "{user}@example.org"
"""


def _pids_root() -> str | None:
    """The pids controller's directory of this process's cgroup (v1 or v2),
    or None when there is none this process may use."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for _id, controllers, path in lines:
        if "pids" in controllers.split(","):
            base = os.path.join("/sys/fs/cgroup/pids", path.lstrip("/"))
            return base if os.access(os.path.join(base, "cgroup.procs"), os.W_OK) else None
    for _id, controllers, path in lines:
        if controllers == "":
            base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
            try:
                with open(os.path.join(base, "cgroup.subtree_control")) as f:
                    if "pids" in f.read().split():
                        return base
            except OSError:
                pass
    return None


@contextlib.contextmanager
def _pids_cgroup(pids):
    """Move the processes `pids` (with their threads) into a new pids
    cgroup and yield a function setting its pids.max ("max", or how many
    tasks it may hold more than now: 0 = no fork or thread may start).
    Afterwards every task in it goes back and the cgroup is removed."""
    parent = _pids_root()
    if parent is None:
        pytest.skip("no pids cgroup controller to limit processes with")
    group = os.path.join(parent, f"sendooway-exhaustion-{uuid.uuid4().hex[:8]}")
    os.mkdir(group)

    def limit(more) -> None:
        if more != "max":
            with open(os.path.join(group, "pids.current")) as f:
                more = int(f.read()) + more
        with open(os.path.join(group, "pids.max"), "w") as f:
            f.write(str(more))

    limit.procs = os.path.join(group, "cgroup.procs")
    try:
        for pid in pids:
            with open(limit.procs, "w") as f:
                f.write(str(pid))
        yield limit
    finally:
        limit("max")
        # a process may fork (a reader worker, a PAM thread) while the
        # others are moved out: move what is left until the group is empty
        deadline = time.monotonic() + 5
        while True:
            with open(limit.procs) as f:
                left = f.read().split()
            for pid in left:
                with contextlib.suppress(OSError), open(os.path.join(parent, "cgroup.procs"), "w") as f:
                    f.write(pid)
            try:
                os.rmdir(group)
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _smtp_login(fe: Frontend, world, user: str) -> smtplib.SMTP:
    c = fe.smtp()
    c.ehlo("client.test")
    assert c.docmd("AUTH PLAIN", login_plain(user, world.users[user].password))[0] == 235
    return c


def _send(c: smtplib.SMTP, sender: str) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA of a short message: the first reply that is not a
    success, or the final reply."""
    for command in (f"MAIL FROM:<{sender}>", "RCPT TO:<rcpt@example.net>", "DATA"):
        code, text = c.docmd(command)
        if code >= 400:
            return code, text
    c.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
    return c.getreply()


# ------------------------------------------------------------ processes


def test_a_reader_worker_that_cannot_be_forked_fails_one_mail_not_the_daemon(
        world, clean_homes, upstream_factory):
    """DEFECT: when fork() fails in the authenticator's reader fork server
    (the unit's TasksMax= / pids cgroup full, or ENOMEM), the OSError went
    up through its loop and the fork server exited; the daemon then logs
    "the reader fork server exited with status 70" and stops itself with
    status 1: every session in the frontend loses its authenticator, and
    under systemd the restarted daemon meets the same full cgroup.
    Correct: that one lookup fails as a temporary failure (MAIL gets 451,
    the log says the fork failed and why), the daemon and every other
    session go on, and the next MAIL after the shortage is served."""
    up = upstream_factory(tls="plain", require_tls=False,
                          accounts={"alice": "fm-Secret-alice", "bob": "fm-Secret-bob"})
    for user in ("alice", "bob"):
        world.write_user_file(user, ".fetchmailrc", RC.format(user=user, port=up.port))
    with open_tmp() as tmp:
        config = front_config(tmp, world, "addReceivedField = no\n")
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            alice = _smtp_login(fe, world, "alice")
            assert _send(alice, "alice@example.org")[0] == 250
            pids = [daemon.proc.pid, fork_server(daemon), *workers(daemon, 1)]
            with _pids_cgroup(pids) as limit:
                limit(0)
                bob = _smtp_login(fe, world, "bob")  # his worker cannot be forked
                code, text = _send(bob, "bob@example.org")
                assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
                assert daemon.proc.poll() is None, daemon.log()[-2000:]
                assert _send(alice, "alice@example.org")[0] == 250  # her worker serves on
                limit("max")
                # (the failed lookup ends bob's session, docs/protocol.md: he comes again)
                bob.close()
                bob = _smtp_login(fe, world, "bob")
                assert _send(bob, "bob@example.org")[0] == 250
            for c in (alice, bob):
                c.quit()
        finally:
            fe.stop()
            daemon.stop()
        log = daemon.log()
        assert "Traceback" not in log and "fork server" not in log, log[-2000:]
        lines = [line for line in log.splitlines() if "cannot fork a reader worker" in line]
        assert lines and "user=bob" in lines[0], log[-2000:]
        assert "Resource temporarily unavailable" in lines[0], lines[0]
        assert len(up.messages) == 3


def test_the_first_login_needs_no_new_process(tmp_path, tmp_config, world):
    """DEFECT: the authenticator loaded libpam at the first login, in a PAM
    thread, through python-pam's ctypes.util.find_library, which runs
    `ldconfig -p` in a child process (and needs descriptors for the pipe):
    with no process to spare at that moment (a pids cgroup full, or out
    of descriptors) find_library found nothing, the login failed with
    "AttributeError: undefined symbol: pam_start" and a traceback in the
    log, and the client's connection was closed. Correct: libpam is
    loaded at start-up (a start-up error if it cannot be), so a login
    needs no process and no descriptor beyond PAM's own."""
    d = Daemon(tmp_path, tmp_config("")).start()
    try:
        with _pids_cgroup([d.proc.pid, fork_server(d)]) as limit:
            limit(0)
            ch = d.connect()
            assert login(ch, "alice", world.users["alice"].password) == AuthOk("alice")
            ch.close()
    finally:
        d.stop()
    log = d.log()
    assert "Traceback" not in log and "internal error" not in log, log[-2000:]


def test_an_authenticator_that_cannot_fork_at_start_says_so(tmp_path, tmp_config):
    """DEFECT: `sendooway-auth` started where no process may be added (the
    unit's TasksMax= reached, a pids cgroup full) could not fork its reader
    fork server and died with a traceback (BlockingIOError out of
    ForkServer.start) on stderr, which systemd puts in the journal, and
    nothing in its log. Correct: "cannot start: Resource temporarily
    unavailable" in the log and on stderr, exit status 1 (a failure, for
    Restart=on-failure)."""
    d = Daemon(tmp_path, tmp_config(""))
    with _pids_cgroup([]) as limit:
        limit(1)  # the process itself, nothing more
        res = subprocess.run(["sh", "-c", 'echo $$ > "$0" && exec "$@"', limit.procs, *d.args],
                             capture_output=True, text=True, timeout=30, env=d.env)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert "cannot start: Resource temporarily unavailable" in res.stderr, res.stderr
    assert "cannot start: Resource temporarily unavailable" in d.log(), d.log()


# ------------------------------------------------------------ descriptors


def _prlimit(pid: int, limit: str) -> None:
    """prlimit(2) on the running frontend, as its own user (nobody: root
    may lack CAP_SYS_RESOURCE here), once it has dropped to it."""
    deadline = time.monotonic() + 10
    while True:
        with open(f"/proc/{pid}/status") as f:
            if next(line for line in f if line.startswith("Uid:")).split()[1:] == [str(NOBODY)] * 4:
                break
        assert time.monotonic() < deadline, "the frontend never dropped to nobody"
        time.sleep(0.02)
    subprocess.run(["prlimit", "--pid", str(pid), limit], check=True,
                   user=NOBODY, group=NOBODY, extra_groups=[])


def _set_nofile(pid: int, soft: int | str, hard: int | str) -> None:
    _prlimit(pid, f"--nofile={soft}:{hard}")


def _full(pid: int) -> int:
    """The soft RLIMIT_NOFILE at which `pid` can open no descriptor more:
    its lowest free descriptor number."""
    held = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(held) + 1)) - held)


def _hard_nofile(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        return next(line for line in f if line.startswith("Max open files")).split()[4]


def test_no_descriptor_for_the_upstream_is_a_451_without_a_traceback(world, upstream_factory):
    """DEFECT: with every descriptor of `sendooway -b` in use, a MAIL failed
    twice over outside the connect's error handling: asyncio's getaddrinfo
    imported concurrent.futures.thread at its first use (open() of the
    module: EMFILE), and the socket() for the upstream connection raised
    EMFILE in `_stream.open_tcp` before its try. The client got 451, but
    the log got "relay failed" and a traceback, as for a bug. Correct
    (the module preloaded with the others): a plain line
    saying the connection could not be made and why (no socket: too many
    open files), the same 451, and the session goes on: its next MAIL,
    once descriptors are free, is delivered."""
    up = upstream_factory(tls="plain", require_tls=False, accounts={"u": "p"})
    with open_tmp() as tmp:
        config = front_config(tmp, world, "addReceivedField = no\nsmarthostMapping ="
                              f" direct:*@example.org 127.0.0.1 {up.port} u p\n")
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            pid = fe.proc.pid
            hard = _hard_nofile(pid)
            c = _smtp_login(fe, world, "alice")
            _set_nofile(pid, _full(pid), hard)
            code, text = c.docmd("MAIL FROM:<alice@example.org>")
            _set_nofile(pid, hard, hard)
            assert code == 451, (code, text)
            assert c.docmd("RSET")[0] == 250
            assert _send(c, "alice@example.org")[0] == 250
            c.quit()
        finally:
            fe.stop()
            daemon.stop()
        log = fe.log()
        assert "Traceback" not in log and "relay failed" not in log, log[-3000:]
        assert "cannot open a socket: Too many open files" in log, log[-3000:]
        assert len(up.messages) == 1


def test_the_system_ca_store_read_without_a_descriptor_is_not_kept(world, upstream_factory):
    """DEFECT: a route verified against the system's CA store (no sslCA)
    loads it into a client context that is kept for 5 minutes. OpenSSL's
    set_default_verify_paths() says nothing when it cannot open the store
    (EMFILE): the context was kept empty, and for 5 minutes every such
    upstream's certificate was refused ("unable to get local issuer
    certificate", 454) though descriptors were free again a moment later
    (on systems whose CA directory has no hash links, e.g. Fedora's, or
    with SSL_CERT_FILE naming the store, as here). Correct: a store that
    could not be read is not kept: that MAIL gets 454 with the reason,
    the next one reads it again and is delivered."""
    up = upstream_factory(tls="starttls", accounts={"u": "p"})
    with open_tmp() as tmp:
        store = tmp / "system-ca.pem"  # the host's store, as SSL_CERT_FILE names it
        with open(world.ca_file) as f:
            store.write_text(f.read())
        os.chmod(store, 0o644)
        config = front_config(tmp, world, "addReceivedField = no\nsmarthostMapping ="
                              f" direct:*@example.org 127.0.0.1 {up.port} u p tls\n")
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log"),
                      env=dict(os.environ, SSL_CERT_FILE=str(store))).start()
        try:
            pid = fe.proc.pid
            hard = _hard_nofile(pid)
            c = _smtp_login(fe, world, "alice")
            _set_nofile(pid, _full(pid) + 1, hard)  # one: the upstream's socket
            code, text = c.docmd("MAIL FROM:<alice@example.org>")
            _set_nofile(pid, hard, hard)
            assert code == 454, (code, text)
            assert c.docmd("RSET")[0] == 250
            assert _send(c, "alice@example.org")[0] == 250, fe.log()[-2000:]
            c.quit()
        finally:
            fe.stop()
            daemon.stop()
        log = fe.log()
        assert "Traceback" not in log, log[-3000:]
        assert "cannot read the system's CA certificates" in log, log[-3000:]
        assert len(up.messages) == 1


def test_an_inetd_session_at_any_descriptor_limit_gets_an_answer(world):
    """DEFECT: `sendooway` under inetd/xinetd (one session on the accepted
    socket, started as root: its own authenticator on a socketpair) with a
    low descriptor limit (xinetd's `rlimit_files`): at some limits the
    socketpair (`_authlink.spawn_pair`, outside its error handling) or,
    after the privilege drop, the stream on stdin/stdout (`serve_stdio`,
    os.dup) raised EMFILE: a traceback on stderr, nothing in the log, and
    the client's connection closed without a word. Correct, at every
    limit: the client hears a greeting or `421`, and the reason is in the
    log, without a traceback."""
    with open_tmp() as tmp:
        config = front_config(tmp, world, "")  # no daemon at its authSocket: a socketpair
        script = (f"EHLO client.test\r\nAUTH PLAIN {login_plain('alice', world.users['alice'].password)}"
                  "\r\nQUIT\r\n").encode()
        runs = {}
        for limit in range(5, 17):  # side by side
            ours, theirs = socket.socketpair()
            runs[limit] = ours, subprocess.Popen(
                ["prlimit", f"--nofile={limit}:{limit}", "--", FRONT, "-c", config,
                 "-l", str(tmp / f"{limit}.log")], stdin=theirs, stdout=theirs,
                stderr=subprocess.PIPE)
            theirs.close()
            with contextlib.suppress(OSError):
                ours.sendall(script)
        for limit, (ours, proc) in runs.items():
            with ours:
                said = _answer(ours, 20)
            _out, err = proc.communicate(timeout=20)
            log = tmp / f"{limit}.log"
            text = log.read_text() if log.exists() else ""
            err = "\n".join(line for line in err.decode().splitlines()
                            if not line.startswith("PWRAP_ERROR"))  # (pam_wrapper's own dlopen)
            assert said.startswith((b"220 ", b"421 ")), (limit, said, err, text)
            assert "Traceback" not in err + text, (limit, err, text)
            if said.startswith(b"421 "):
                assert "Too many open files" in text, (limit, said, err, text)


# ------------------------------------------------------------ disk


@contextlib.contextmanager
def _full_tmpfs(path):
    """A 64 KiB tmpfs at `path` (made 0755), then filled up: a new file can
    still be made, no byte can be written. Unmounted afterwards."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(path)],
                   check=True)
    try:
        fd = os.open(os.path.join(path, ".filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_full_run_directory_leaves_no_half_written_backoff_files(world):
    """DEFECT: the backoff store that the one-session authenticators of a
    root-started inetd frontend share (`penalty/` next to authSocket, in
    /run, a tmpfs that journald or a runaway program may fill) writes each
    count to a temporary file `KEY.PID` and renames it; when the write
    failed (ENOSPC) the temporary file stayed: one more empty file per
    failed login and per process, which the store counts as keys until
    it thinks itself full. Correct: a count that cannot be written only
    weakens the backoff (as documented) and leaves nothing behind; the
    sessions themselves go on (a right password logs in, a wrong one gets
    535)."""
    with open_tmp() as tmp, _full_tmpfs(tmp / "run") as run:
        config = front_config(tmp, world, "")  # authSocket in run/: nothing listens there
        replies = []
        for password in ("wrong-Pw-1", "wrong-Pw-2", world.users["alice"].password):
            script = (f"EHLO client.test\r\nAUTH PLAIN {login_plain('alice', password)}\r\n"
                      "QUIT\r\n").encode()
            out, err, rc = stdio_session([FRONT, "-c", config, "-l", str(tmp / "front.log")],
                                         script)
            replies.append([line[:3] for line in out.split(b"\r\n") if line[3:4] == b" "])
        left = [name for name in os.listdir(run / "penalty") if "." in name]
        assert replies == [[b"220", b"250", b"535", b"221"]] * 2 + [
            [b"220", b"250", b"235", b"221"]], replies
        assert left == [], left
        assert "Traceback" not in (tmp / "front.log").read_text()


# ------------------------------------------------------------ memory


def _vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmSize")).split()[1]) * 1024


def _set_as(pid: int, soft: int | str) -> None:
    """The running frontend's soft RLIMIT_AS (its hard limit stays
    unlimited, so it can be given back)."""
    _prlimit(pid, f"--as={soft}:unlimited")


def _answer(s: socket.socket, timeout: float = 10.0) -> bytes:
    """All the peer says until it closes (or resets)."""
    s.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
            data += chunk
    return data


def _first_line(s: socket.socket) -> bytes:
    s.settimeout(10)
    data = b""
    with contextlib.suppress(OSError):
        while b"\n" not in data and (chunk := s.recv(4096)):
            data += chunk
    return data


def test_out_of_memory_mid_message_ends_that_session_with_421_and_one_line(
        world, upstream_factory):
    """DEFECT: a MemoryError in `sendooway -b` (RLIMIT_AS or RLIMIT_DATA
    reached while a client sends a message) ended the session with a
    silent close — the client never heard why — and wrote tracebacks, one
    from asyncio ("Fatal error: protocol.data_received() call failed") and
    one "internal error, closing the session", for every session that met
    the shortage; a session starting meanwhile (its hello to the
    authenticator failing) was closed before its greeting. Correct (and
    so it was: the process goes on, the upstream never gets the final
    dot): the client gets 421 4.3.0 when it can be written (a new session
    is greeted or refused with a word, never closed in silence), the log
    one line per session saying it was memory, and once memory is back the
    next message is delivered."""
    up = upstream_factory(tls="plain", require_tls=False, accounts={"u": "p"},
                          data_size_limit=0)
    with open_tmp() as tmp:
        config = front_config(tmp, world, "addReceivedField = no\nsmarthostMapping ="
                              f" direct:*@example.org 127.0.0.1 {up.port} u p\n")
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log"))
        fe.argv = ["prlimit", "--as=unlimited:unlimited", "--", *fe.argv]
        fe.start()
        try:
            pid = fe.proc.pid
            s = socket.create_connection((fe.host, fe.port), timeout=10)
            s.sendall(b"EHLO client.test\r\nAUTH PLAIN "
                      + login_plain("alice", world.users["alice"].password).encode()
                      + b"\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<rcpt@example.net>\r\n"
                      b"DATA\r\n")
            said = b""
            while b"354 " not in said:
                said += s.recv(4096)
            _set_as(pid, _vm_size(pid))  # not one more page
            try:
                line = b"x" * 998 + b"\r\n"
                with contextlib.suppress(OSError):
                    for _ in range(400):
                        s.sendall(line * 10)
                answer = _answer(s)
                _set_as(pid, _vm_size(pid))  # (what that session held may be free again)
                greetings = []
                for _ in range(3):  # sessions starting meanwhile
                    with socket.create_connection((fe.host, fe.port), timeout=10) as other:
                        greetings.append(_first_line(other))
            finally:
                _set_as(pid, "unlimited")
            s.close()
            assert fe.proc.poll() is None, fe.log()[-3000:]
            assert b"250" not in answer, answer
            refusal = b"421 4.3.0 Service not available, closing connection\r\n"
            assert answer in (b"", refusal), answer  # (b"": asyncio's read failed, it closed)
            # greeted, or refused with a word; never closed in silence
            assert all(g.startswith(b"220 ") or g == refusal for g in greetings), greetings
            c = _smtp_login(fe, world, "alice")
            assert _send(c, "alice@example.org")[0] == 250
            c.quit()
        finally:
            fe.stop()
            daemon.stop()
        log = fe.log()
        assert "Traceback" not in log, log[-3000:]
        assert "out of memory" in log and "no final dot sent" in log, log[-3000:]
        assert len(up.messages) == 1 and b"Subject: x" in up.messages[0].data


# ------------------------------------------------------------ threads


def test_no_thread_to_spare_is_a_plain_temporary_failure(world, clean_homes, upstream_factory):
    """DEFECT: the frontend runs as nobody, whose RLIMIT_NPROC counts every
    process and thread of every daemon that runs as nobody. With none to
    spare, asyncio's getaddrinfo (a thread of the loop's executor, started
    at its first use) and the loader of a CA file the frontend opens
    itself (a route's sslCA too big to travel with the route) raised
    RuntimeError("can't start new thread"): every MAIL got 451 with
    "relay failed" and a traceback in the log, even for an upstream named
    by its address, which needs no lookup at all. Correct: an address is
    taken as it is (no thread); a name that cannot be looked up now is a
    plain temporary failure (451, "cannot look the name up now"), a CA
    file that cannot be loaded now a 454, both logged in one line, and
    tried again with the next MAIL, which works once threads are back."""
    up = upstream_factory(tls="starttls", accounts={"u": "p"})
    with open_tmp() as tmp:
        bundle = tmp / "bundle.pem"  # more than a route carries (8 KiB): the frontend opens it
        with open(world.ca_file) as f:
            bundle.write_text(f.read() * 16)
        os.chmod(bundle, 0o644)
        world.write_user_file("bob", ".sendoowayrc", f"sslCA = {bundle}\nsmarthostMapping ="
                              f" direct:bob@example.org 127.0.0.1 {up.port} u p tls\n")
        config = front_config(tmp, world, f"sslCA = {world.ca_file}\naddReceivedField = no\n"
                              "userInclude = %h/.sendoowayrc\nsmarthostMapping ="
                              f" direct:*@example.org 127.0.0.1 {up.port} u p tls\n"
                              f"smarthostMapping = direct:*@example.com localhost {up.port} u p tls\n")
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            pid = fe.proc.pid
            with open(f"/proc/{pid}/limits") as f:
                hard = next(line for line in f if line.startswith("Max processes")).split()[3]
            _prlimit(pid, f"--nproc=1:{hard}")
            try:
                alice = _smtp_login(fe, world, "alice")
                assert _send(alice, "alice@example.org")[0] == 250  # by address: no thread
                code, text = _send(alice, "alice@example.com")  # by name
                assert code == 451, (code, text)
                bob = _smtp_login(fe, world, "bob")
                code, text = _send(bob, "bob@example.org")
                assert code == 454, (code, text)
            finally:
                _prlimit(pid, f"--nproc={hard}:{hard}")
            assert _send(alice, "alice@example.com")[0] == 250
            assert _send(bob, "bob@example.org")[0] == 250
            for c in (alice, bob):
                c.quit()
        finally:
            fe.stop()
            daemon.stop()
        log = fe.log()
        assert "Traceback" not in log and "relay failed" not in log, log[-3000:]
        assert "localhost: cannot look the name up now (can't start new thread)" in log, log[-3000:]
        assert f"{bundle}: cannot load CA certificates now" in log, log[-3000:]
        assert len(up.messages) == 3
