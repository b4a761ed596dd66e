"""Adversarial review (seventh): the latest changes (1fbd03e..HEAD): the reader worker choosing
the account for the sender, the per-user suppression of repeated file errors, the frontend
opening a route's CA file itself (O_NONBLOCK, regular file of at most 16 MiB, /proc/self/fd/N),
the escaping of the frontend's message log line, the systemd frontend units started as root,
and a user's own sslCA no longer applying to global direct: mappings. Each test runs the real
sendooway-auth daemon and the real `sendooway` frontend in the fake world; each failed on the
code as reviewed for the reason its docstring gives, and passes once that defect is fixed;
each is fixed (the third with the units' SENDOOWAY_PRIVATE_AUTH=no, which the test now
passes as the unit's environment)."""

from __future__ import annotations

import datetime
import os
import pathlib
import socket
import time

import pytest

from tests.auth_helpers import Daemon
from tests.front_util import Frontend, front_config, login_plain, open_tmp
from tests.hardening_util import RawClient

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="users and nobody need root")


def _bob_session(front: Frontend, world) -> RawClient:
    bob = RawClient(front.host, front.port)
    assert bob.reply()[0] == 220
    assert bob.cmd(b"EHLO bob.test\r\n")[0] == 250
    user = world.users["bob"]
    assert bob.cmd(f"AUTH PLAIN {login_plain('bob', user.password)}\r\n".encode())[0] == 235
    return bob


# ------------------------------------------------------------ the frontend's log


def test_a_users_sslca_path_puts_terminal_control_bytes_into_the_frontends_log(world, clean_homes):
    """DEFECT (rule: docs/decisions/relay.md "A route's sslCA opened by the frontend": "A user
    chooses that path" and the log line "escapes the route's source (a file name a user chose)";
    docs/security.md: a user's own files cannot forge log lines): the review's fix escaped only
    the `message ... route=` line (_relay.Relay._log_message), but the user-chosen CA path also
    reaches the frontend's log through the upstream failure line: _tls._open_ca_file raises
    TLSConfigError("{ca_file}: cannot read CA certificates: ..."), _upstream wraps it into
    UpstreamError, and _relay.Relay._mail logs "upstream %s for <%s>: %s" with it raw. Observed:
    bob's ~/.sendoowayrc says `sslCA = /tmp/x<ESC>[2K<CR>forged line` (parse_user_config keeps
    ESC and CR inside a value); after his MAIL FROM the frontend's log holds ESC [2K CR and bob's
    made-up line as they are. Correct: every line that carries text from a user's file is
    escaped (shared/log.printable), so no control byte from bob's config reaches the log.

    Since a later review (test_review_confdiff, docs/decisions/foundation.md) a control
    character inside a line of a user's include is refused at FILE:LINE, as the original
    refused it: bob's sslCA line is no CA path any more; the authenticator names the line,
    his route is checked against the config's trust instead (the TLS fails here), and no
    control byte of his reaches either log."""
    forged = "\x1b[2K\rsendooway: message user=alice upstream=accepted"
    with open_tmp() as tmp:
        listener = socket.create_server(("127.0.0.1", 0))  # bob's "upstream"
        port = listener.getsockname()[1]
        world.write_user_file("bob", ".sendoowayrc",
                              f"sslCA = {tmp}/missing{forged}.pem\n"
                              f"smarthostMapping = direct:bob@example.org 127.0.0.1 {port}"
                              " bob x ssl\n")
        config = front_config(tmp, world, "timeout = 3\nuserInclude = %h/.sendoowayrc\n")
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            with _bob_session(front, world) as bob:
                code = bob.cmd(b"MAIL FROM:<bob@example.org>\r\n")[0]
                assert code in (421, 451, 454), code
                bob.cmd(b"QUIT\r\n")
            deadline = time.monotonic() + 5
            while "message user=bob" not in front.log() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            front.stop()
            daemon.stop()
            listener.close()
        with open(front.log_path, "rb") as f:
            log = f.read()
        with open(daemon.log_path, "rb") as f:
            auth_log = f.read()
    assert b".sendoowayrc:1: control character U+001B" in auth_log, auth_log
    assert b"message user=bob" in log and b"cannot read CA certificates" not in log, log
    bad = [line for line in (log + auth_log).split(b"\n") if b"\x1b" in line or b"\r" in line]
    assert not bad, f"control bytes from bob's sslCA reached a log: {bad!r}"


# ------------------------------------------------------------ the frontend's event loop


def _big_ca_bundle(path: str, size: int) -> None:
    """Just under `size` octets of PEM certificates, ending in a broken one (the load fails)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    pems = []
    for i in range(100):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bob-ca-{i}")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(i + 1).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
        pems.append(cert.public_bytes(serialization.Encoding.PEM))
    tail = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    block = b"".join(pems)
    data = block * ((size - len(tail) - 1) // len(block))
    with open(path, "wb") as f:
        f.write(data + tail)


def test_a_users_16_mib_sslca_stalls_the_listening_frontend_for_everyone(world, clean_homes):
    """DEFECT (rule: docs/decisions/relay.md "A route's sslCA opened by the frontend": a user
    chooses that path, and the checks exist because a user's file "used to block the whole
    `sendooway -b` on its event loop"; DESIGN.md: `-b` serves many concurrent sessions;
    _files.MAX_FILE: a user's file is at most 1 MiB): the reader worker refuses bob's sslCA
    (16 MiB, "too-large"), so the route names the path and the frontend loads it itself
    (_tls.cached_client_context -> client_context -> load_verify_locations) synchronously on the
    event loop that serves every session. MAX_CA_FILE lets 16 MiB through (16 times what the
    readers accept; a system bundle is ~0.2 MiB), parsing that takes ~1 s here, and a load that
    fails is not remembered, so every MAIL FROM of bob's parses it again. Observed: while bob
    pipelines two MAIL FROMs in each of three sessions, alice's greeting, EHLO and three NOOPs
    (a few ms otherwise) take several seconds: her replies wait for bob's parses (each
    ~0.5-1 s here, "cannot load CA certificates" every time). Correct: a CA file far larger than any bundle (or than the readers' 1 MiB) is
    refused before it is parsed, or a failed load is remembered while the file is unchanged,
    or the load runs off the event loop; alice is greeted at once."""
    with open_tmp() as tmp:
        ca = os.path.join(str(tmp), "ca.pem")
        _big_ca_bundle(ca, 16 << 20)
        os.chown(ca, world.users["bob"].uid, world.users["bob"].gid)
        os.chmod(ca, 0o644)
        listener = socket.create_server(("127.0.0.1", 0))  # bob's "upstream"
        port = listener.getsockname()[1]
        world.write_user_file("bob", ".sendoowayrc",
                              f"sslCA = {ca}\n"
                              f"smarthostMapping = direct:bob@example.org 127.0.0.1 {port}"
                              " bob x ssl\n")
        config = front_config(tmp, world, "timeout = 3\nuserInclude = %h/.sendoowayrc\n")
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        bobs: list[RawClient] = []
        alice = None
        try:
            bobs = [_bob_session(front, world) for _ in range(3)]
            for bob in bobs:  # three sessions of his, each with two MAIL FROMs in one go
                bob.send(b"MAIL FROM:<bob@example.org>\r\nRSET\r\n" * 2)
            time.sleep(0.3)
            started = time.monotonic()
            alice = RawClient(front.host, front.port, timeout=20)
            replies = [alice.reply()[0], alice.cmd(b"EHLO alice.test\r\n")[0]]
            replies += [alice.cmd(b"NOOP\r\n")[0] for _ in range(3)]
            waited = time.monotonic() - started
            codes = [bobs[0].reply()[0] for _ in range(4)]
        finally:
            for c in (alice, *bobs):
                if c is not None:
                    c.sock.close()
            front.stop()
            daemon.stop()
            listener.close()
    assert replies == [220, 250, 250, 250, 250], replies
    assert codes == [454, 250] * 2, codes
    assert waited < 1.0, (f"alice waited {waited:.2f} s for her greeting, EHLO and three NOOPs"
                          " while bob's 16 MiB sslCA was parsed on the frontend's event loop")


# ------------------------------------------------------------ the systemd units


def _unit_service(name: str):
    import configparser
    import pathlib

    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment]
    cp.read_string((pathlib.Path(__file__).resolve().parent.parent / "packaging" / "systemd"
                    / name).read_text())
    return cp["Service"]


def _unit_environment() -> dict[str, str]:
    unit = (pathlib.Path(__file__).parent.parent / "packaging" / "systemd" / "sendooway@.service")
    return dict(line.split("=", 2)[1:] for line in unit.read_text().splitlines()
                if line.startswith("Environment="))


def test_the_root_started_unit_serves_mail_through_a_private_authenticator_blind_to_homes(
        world, clean_homes):
    """DEFECT (rule: DESIGN.md "MAIL FROM: route lookup; no route -> 550 (5.7.1); upstream
    unreachable -> 451/421 (temporary)"; docs/decisions/deployment.md: the systemd frontend has
    `ProtectHome=yes` "(the frontend never reads homes)"; RFC 5321 4.2.5: a transient condition
    is a 4yz reply): the frontend units now start as root, and a root frontend that finds no
    authenticator at authSocket starts a private one (cli.main -> spawn_pair) inside the
    frontend's own sandbox: ProtectHome=yes, ProtectSystem=strict and a bounding set of only
    CAP_SETUID CAP_SETGID CAP_DAC_OVERRIDE. Its reader workers cannot see any home, so every
    user's ~/.fetchmailrc reads as missing. Run as the unit runs it (setpriv with the unit's
    bounding set and no_new_privs; ProtectHome emulated by a private mount namespace with an
    empty tmpfs over the homes) while sendooway-auth is down: alice logs in and her MAIL FROM,
    which her ~/.fetchmailrc routes, gets `550 5.7.1 Sender address not allowed` - a permanent
    bounce of a message that is fine (and at the session's end the private authenticator dies
    with a PermissionError traceback: without CAP_KILL it cannot SIGKILL its reader workers,
    which run as alice). With `User=nobody` (before) the same outage gave 421/451 and the client
    retried. Correct: a frontend started by the shipped units never starts an
    authenticator of its own in the unit's sandbox (e.g. only under inetd, or an option the
    units pass), and a session during an authenticator outage gets a 4yz reply."""
    import shlex

    from tests.front_util import FRONT, stdio_session

    svc = _unit_service("sendooway@.service")
    assert "User" not in svc and svc["ProtectHome"] == "yes" and svc["NoNewPrivileges"] == "yes"
    caps = ",".join("+" + c.lower().removeprefix("cap_") for c in svc["CapabilityBoundingSet"].split())
    alice = world.users["alice"]
    world.write_user_file("alice", ".fetchmailrc",
                          'poll pop.example.org user "alice" password "fm-Secret-A1"\n'
                          '#sendooway:server "127.0.0.1"\n#sendooway:port 2\n'
                          '#sendooway:address "alice@example.org"\n')
    homes = os.path.dirname(alice.home)
    with open_tmp() as tmp:
        config = front_config(tmp, world, "timeout = 5\n", tls=False)  # its authSocket: nothing
        log = os.path.join(str(tmp), "front.log")
        front = shlex.join(["setpriv", "--inh-caps=-all", f"--bounding-set=-all,{caps}",
                            "--no-new-privs", "--", FRONT, "-c", config, "-l", log])
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f"mount -t tmpfs -o mode=0755 none {shlex.quote(homes)} && exec {front}"]
        script = (f"EHLO client.test\r\nAUTH PLAIN {login_plain('alice', alice.password)}\r\n"
                  "MAIL FROM:<alice@example.org>\r\nQUIT\r\n").encode()
        # the unit's environment (Environment= lines)
        env = dict(world.env(), **_unit_environment())
        out, err, rc = stdio_session(argv, script, env=env, timeout=30)
        with open(log, "rb") as f:
            front_log = f.read()
    replies = [line for line in out.split(b"\r\n") if line[3:4] == b" "]
    mail_reply = next((r for r in replies if r[:1] in b"45"), b"")
    assert mail_reply.startswith(b"4") and not any(r.startswith(b"5") for r in replies), (
        f"alice's routed MAIL FROM got a permanent {mail_reply!r} from the private authenticator"
        f" the unit started in its sandbox; frontend log: {front_log[-800:]!r}")
