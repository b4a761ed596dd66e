"""Adversarial review (eighth): the newest changes (5d31c2e..HEAD): ext8BitMime = force
refusing BODY=8BITMIME to an upstream without 8BITMIME, a route's CA file loaded in a thread
(asyncio.to_thread) with failed loads remembered per file version and MAX_CA_FILE = 4 MiB,
SENDOOWAY_PRIVATE_AUTH=no in the systemd frontend units, Worker.kill surviving a missing
CAP_KILL, the failed lookup always logged, and the doc fixes. Each test failed on the code as
reviewed for the reason its docstring gives, and passes once that defect is fixed.
Each is fixed."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.auth_helpers import Daemon
from tests.front_util import Frontend, front_config, login_plain, open_tmp
from tests.hardening_util import RawClient, rss_kib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="users and nobody need root")


# ------------------------------------------------------------ helpers


def _distinct_bundles(directory: str, count: int) -> list[str]:
    """`count` files of just under MAX_CA_FILE of distinct self-signed CA certificates
    (the same certificates, each file in another order: a different file each)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from sendooway_front import _tls

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    pems: list[bytes] = []
    total = 0
    i = 0
    while True:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bob-ca-{i}")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
                .serial_number(i + 1).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
        pem = cert.public_bytes(serialization.Encoding.PEM)
        if total + len(pem) >= _tls.MAX_CA_FILE:
            break
        pems.append(pem)
        total += len(pem)
        i += 1
    paths = []
    step = max(1, len(pems) // max(count, 1))
    for n in range(count):
        path = os.path.join(directory, f"bob-ca-{n}.pem")
        with open(path, "wb") as f:
            f.write(b"".join(pems[n * step:] + pems[:n * step]))
        paths.append(path)
    return paths


class _ClosingListener:
    """A TCP server that accepts and closes at once: a TLS route to it fails fast (454)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def _session(front: Frontend, world, user: str, timeout: float = 20.0) -> RawClient:
    client = RawClient(front.host, front.port, timeout=timeout)
    assert client.reply()[0] == 220
    assert client.cmd(f"EHLO {user}.test\r\n".encode())[0] == 250
    password = world.users[user].password
    assert client.cmd(f"AUTH PLAIN {login_plain(user, password)}\r\n".encode())[0] == 235
    return client


def _give_to_bob(world, path: str) -> None:
    os.chown(path, world.users["bob"].uid, world.users["bob"].gid)
    os.chmod(path, 0o644)


# ------------------------------------------------------------ the failed-file cache


def test_a_transient_failure_to_load_the_global_sslca_is_remembered_until_restart():
    """DEFECT (rule: docs/decisions/relay.md and _tls.client_context_for's own contract: "a
    file that failed to load is not tried again until it changes" - the cache is there for a
    file whose *content* is bad; RFC 5321 4.2.1: a transient condition gives a 4yz reply, it
    must not become a lasting state; a careful admin expects a long-running `sendooway -b` to
    recover by itself once the cause is gone): _tls.client_context_for stores every
    TLSConfigError raised by the thread in `_failed_files` under (path, verify, inode, mtime,
    size), whatever its cause. A load that failed for a reason that is not the file's - here
    the process out of descriptors for a moment (EMFILE: client_context opens the file once
    more, and OpenSSL opens /proc/self/fd/N once more: "system lib, BIO lib") - is then answered
    from the cache for as long as the file is unchanged. Observed: with one descriptor left,
    the first load of a good CA bundle fails; after the descriptors are free again, the next
    call still raises the cached TLSConfigError without trying: every TLS route using that
    sslCA (the global one: every user) gets 454 until the admin touches the file or restarts.
    Correct: only a failure that comes from the file's content is remembered (or the entry
    expires); a failure of the process (EMFILE, ENOMEM, an OSError) is retried next time."""
    script = textwrap.dedent(f"""
        import asyncio, os, resource, sys
        sys.path.insert(0, {ROOT!r})
        from sendooway_front import _tls
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        import datetime, tempfile
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin-ca")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(1).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
        fd, ca = tempfile.mkstemp(suffix=".pem")
        os.write(fd, cert.public_bytes(serialization.Encoding.PEM)); os.close(fd)
        _tls.client_context(ca, True)  # a good file: it loads

        async def main():
            fillers = []
            try:
                while True:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            # (as reviewed, one descriptor left made the load fail; the file is
            # now read once, by the caller, so none left is what makes it fail)
            try:
                await _tls.client_context_for(ca, True)
                print("first: ok")
            except _tls.TLSConfigError as e:
                print("first: failed", e)
            for f in fillers:
                os.close(f)
            try:
                await _tls.client_context_for(ca, True)
                print("second: ok")
            except _tls.TLSConfigError as e:
                print("second: failed", e)
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
        asyncio.run(main())
        os.unlink(ca)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert "first: failed" in out.stdout, (out.stdout, out.stderr)  # the transient failure
    assert "second: ok" in out.stdout, (
        "the good CA file failed to load once for want of a descriptor, and is refused from"
        f" the cache ever after although nothing is wrong with it any more: {out.stdout!r}")


# ------------------------------------------------------------ the frontend's memory


def test_one_users_4_mib_ca_files_pin_hundreds_of_mib_in_the_listening_frontend(
        world, clean_homes):
    """DEFECT (rule: _tls.MAX_CA_FILE's own reason, "a CA bundle (Debian's is ~220 KiB), not
    a disk image", and docs/decisions/relay.md: a route's sslCA is a path a user chooses;
    DESIGN.md: `-b` serves every user's sessions in one process; docs/security.md bounds what
    one user's files may cost (the readers: 4 MiB a lookup, a worker that grew by 64 MiB
    retires)): the cap was lowered to 4 MiB of PEM, but a 4 MiB file of distinct certificates
    becomes an X509_STORE of ~47 MB in the frontend, and _client_contexts keeps up to 64 of
    them (one per path: only older versions of the *same* path are dropped). Observed: bob
    names eight different 4 MiB CA files in his ~/.sendoowayrc one after the other (the
    authenticator rereads it for each MAIL, and the reader refuses the file as too large, so
    the route names the path and the frontend loads it itself), sending one MAIL FROM for
    each; the serving `sendooway -b` grows by several hundred MiB and keeps it (64 files:
    ~3 GiB; everyone's mail stops when the OOM killer comes). Correct: what one user's CA files
    make the frontend keep is bounded to a small amount (e.g. a budget in bytes or
    certificates for the cached contexts, a certificate-count cap far below 10 000, or no
    caching of user-named files beyond one), so eight such MAILs cost well under 150 MiB."""
    with open_tmp() as tmp:
        bundles = _distinct_bundles(str(tmp), 8)
        for path in bundles:
            _give_to_bob(world, path)
        listener = _ClosingListener()
        mapping = f"smarthostMapping = direct:bob@example.org 127.0.0.1 {listener.port} bob x ssl\n"
        world.write_user_file("bob", ".sendoowayrc", f"sslCA = {bundles[0]}\n" + mapping)
        config = front_config(tmp, world, "timeout = 5\nuserInclude = %h/.sendoowayrc\n")
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            with _session(front, world, "bob") as bob:
                codes = [bob.cmd(b"MAIL FROM:<bob@example.org>\r\n")[0]]
                before = rss_kib(front.proc.pid)
                for path in bundles[1:]:
                    world.write_user_file("bob", ".sendoowayrc", f"sslCA = {path}\n" + mapping)
                    codes.append(bob.cmd(b"MAIL FROM:<bob@example.org>\r\n")[0])
                after = rss_kib(front.proc.pid)
                bob.cmd(b"QUIT\r\n")
            log = front.log()
        finally:
            front.stop()
            daemon.stop()
            listener.close()
    assert codes == [454] * len(bundles), (codes, log[-2000:])
    assert log.count("TLS handshake failed") >= len(bundles), log[-2000:]  # each file loaded
    grown = (after - before) / 1024
    assert grown < 150, (f"bob's {len(bundles) - 1} CA files of 4 MiB made the serving"
                         f" frontend grow by {grown:.0f} MiB, and it keeps them")


# ------------------------------------------------------------ the shared executor


def test_a_users_ca_reloads_hold_up_every_other_users_upstream_connection(world, clean_homes):
    """DEFECT (rule: _tls.client_context_for's reason for the thread: parsing a user's CA file
    "on the loop that serves every session ... stalled everyone"; DESIGN.md: `-b` serves many
    concurrent sessions; docs/decisions/relay.md: a route's sslCA is a path a user chooses):
    the load now runs through asyncio.to_thread, i.e. the loop's *default* executor - the one
    loop.getaddrinfo uses for every new upstream connection (_stream.open_tcp, even for an IP
    literal), min(32, CPUs + 4) threads - and loads of the same file are neither shared while
    in flight nor limited. bob touches his 4 MiB sslCA in a loop (each new mtime is a new cache
    key, so every MAIL of his parses it again, ~0.25 s) and keeps 24 sessions sending MAIL
    FROM. Observed: alice's MAIL FROM on her session's kept upstream connection is answered
    in milliseconds (the event loop is fine), but a MAIL FROM of hers that needs a new upstream
    connection, 5 ms when alone, waits seconds (1.6-4.5 s here): its name lookup queues behind
    bob's parses. Correct: user-named CA files load where they cannot hold up other sessions'
    name lookups (their own small executor, one load per file in flight shared by every
    waiter, a rate limit per file), so alice's new connection is made in well under a second."""
    from tests.upstream import FakeUpstream

    with open_tmp() as tmp:
        (bundle,) = _distinct_bundles(str(tmp), 1)
        _give_to_bob(world, bundle)
        listener = _ClosingListener()
        up = FakeUpstream(world, tls="plain", accounts=None, require_tls=False).start()
        world.write_user_file("bob", ".sendoowayrc",
                              f"sslCA = {bundle}\nsmarthostMapping = direct:bob@example.org"
                              f" 127.0.0.1 {listener.port} bob x ssl\n")
        world.write_user_file("alice", ".sendoowayrc",
                              "smarthostMapping = direct:alice@example.org"
                              f" 127.0.0.1 {up.port} noAuth\n")
        # no pool: alice's second session must connect anew
        config = front_config(tmp, world, "timeout = 20\nsmarthostCache = 0\n"
                              "userInclude = %h/.sendoowayrc\n")
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        stop = threading.Event()

        def toucher() -> None:  # bob: while :; do touch ~/ca.pem; done
            n = 0
            while not stop.is_set():
                n += 1
                os.utime(bundle, ns=(n * 1_000_000_000, n * 1_000_000_000))
                time.sleep(0.02)

        def timed(client: RawClient, line: bytes) -> tuple[int, float]:
            started = time.monotonic()
            code = client.cmd(line)[0]
            return code, time.monotonic() - started

        mail = b"MAIL FROM:<alice@example.org>\r\n"
        clients: list[RawClient] = []
        touching = threading.Thread(target=toucher, daemon=True)
        try:
            kept = _session(front, world, "alice")
            clients.append(kept)
            first = timed(kept, mail)  # her session's upstream connection is made
            assert kept.cmd(b"RSET\r\n")[0] == 250
            clients += [_session(front, world, "bob") for _ in range(24)]
            touching.start()
            for bob in clients[1:]:
                bob.send(b"MAIL FROM:<bob@example.org>\r\nRSET\r\n" * 2)
            time.sleep(0.5)
            on_kept = timed(kept, mail)  # no new connection: no name lookup
            fresh = _session(front, world, "alice")
            clients.append(fresh)
            on_new = timed(fresh, mail)  # a new upstream connection: a name lookup
        finally:
            stop.set()
            for c in clients:
                c.sock.close()
            front.proc.kill()  # bob's queued parses would keep a graceful stop waiting
            front.stop()
            daemon.stop()
            listener.close()
            up.stop()
    assert first[0] == on_kept[0] == on_new[0] == 250, (first, on_kept, on_new)
    # the event loop itself answers at once (well under 0.1 s on a quiet
    # machine; the bounds leave room for a loaded one: 0.57 s seen in CI)
    assert on_kept[1] < 2.0, on_kept
    assert on_new[1] < on_kept[1] + 1.0, (f"alice's MAIL FROM on a new upstream connection took"
                             f" {on_new[1]:.2f} s (alone: {first[1]:.3f} s; on her kept"
                             f" connection now: {on_kept[1]:.3f} s) while bob's CA file was"
                             " parsed again and again in the executor her name lookup needs")
