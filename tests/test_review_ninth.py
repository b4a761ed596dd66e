"""Adversarial review (ninth): the newest changes (17c4866..HEAD): a route's CA file read once
by the frontend and its CERTIFICATE blocks, found by a regular expression, parsed by OpenSSL in
a loader thread of its own (one load per file version, contexts kept within a PEM budget), and
BODY=8BITMIME passed on under ext8BitMime = ignore / refused with 550 5.6.3 under force. Each
test failed on the code as reviewed for the reason its docstring gives, and passes once that
defect is fixed.
Each is fixed (a line scan for PEM blocks, `_tls.pem_certificates`)."""

from __future__ import annotations

import base64
import os
import smtplib
import time

import pytest

from tests.auth_helpers import Daemon
from tests.front_util import Frontend, front_config, open_tmp
from tests.hardening_util import RawClient
from tests.upstream import FakeUpstream

from .test_review_eighth import _ClosingListener, _give_to_bob, _session  # the same helpers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="users and nobody need root")


# ------------------------------------------------------------ helpers


def _relabel(pem: bytes, label: str) -> bytes:
    """The certificate(s) of `pem` under another PEM label (same DER inside)."""
    out = []
    for block in pem.split(b"-----END CERTIFICATE-----")[:-1]:
        b64 = block.split(b"-----BEGIN CERTIFICATE-----")[1]
        der = base64.b64decode(b"".join(b64.split()))
        text = base64.b64encode(der)
        lines = [text[i:i + 64] for i in range(0, len(text), 64)]
        out.append(f"-----BEGIN {label}-----\n".encode() + b"\n".join(lines)
                   + f"\n-----END {label}-----\n".encode())
    return b"".join(out)


def _send(front: Frontend, world, user: str, sender: str) -> tuple[int, bytes]:
    """MAIL FROM `sender` and a short message through the frontend: (code, text) of the
    first refusal, or (250, b"") when the upstream took it."""
    with front.smtp() as s:
        s.starttls(context=world.ssl_context())
        s.ehlo()
        s.login(user, world.users[user].password)
        try:
            s.sendmail(sender, ["rcpt@example.net"],
                       b"From: someone\r\nSubject: ninth\r\n\r\nbody\r\n")
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error
        return 250, b""


# ------------------------------------------------------------ the regular expression


def test_a_users_ca_file_of_begin_lines_freezes_every_session_of_the_frontend(
        world, clean_homes):
    """DEFECT (rule: docs/decisions/relay.md "A route's sslCA opened by the frontend": a
    route's sslCA is a path a user chooses, and it is parsed in a thread of its own because
    "a 16 MiB file parsed on the loop for each MAIL stalled everyone"; DESIGN.md: `-b` serves
    many concurrent sessions in one process): _tls.client_context finds the certificates with
    `_PEM_CERT.findall` - `-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----` with
    re.S. For every BEGIN without an END after it, the lazy `.+?` runs to the end of the file:
    quadratic in the file's size, and Python's `re` holds the GIL all the while, so the loader
    thread being "of its own" does not help - the event loop that serves every session stops.
    Observed: bob names as his sslCA a file of ~170 KiB consisting of
    "-----BEGIN CERTIFICATE-----" lines (the authenticator finds no certificate in it, so the
    route names the path and the frontend opens it itself) and sends one MAIL FROM; alice's
    NOOP on her established session, answered in milliseconds otherwise, waits ~3-4 s
    (a 1 MiB file, within MAX_CA_FILE: ~2 minutes of a frozen `sendooway -b`; touching the
    file makes a new version to parse again; a SIGTERM waits for it too). Correct: finding the
    PEM blocks is linear in the file (e.g. search BEGIN and END lines with str.find / a
    line scan, or let OpenSSL's PEM reader walk the bytes), so alice's NOOP is answered at
    once while bob's file is looked at."""
    with open_tmp() as tmp:
        bomb = os.path.join(str(tmp), "bob-ca.pem")
        with open(bomb, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\n" * (170_000 // 28))
        _give_to_bob(world, bomb)
        listener = _ClosingListener()
        world.write_user_file("bob", ".sendoowayrc",
                              f"sslCA = {bomb}\nsmarthostMapping = direct:bob@example.org"
                              f" 127.0.0.1 {listener.port} bob x ssl\n")
        config = front_config(tmp, world, "timeout = 30\nuserInclude = %h/.sendoowayrc\n")
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        clients: list[RawClient] = []
        try:
            alice = _session(front, world, "alice")
            clients.append(alice)
            started = time.monotonic()
            assert alice.cmd(b"NOOP\r\n")[0] == 250
            alone = time.monotonic() - started
            bob = _session(front, world, "bob")
            clients.append(bob)
            bob.send(b"MAIL FROM:<bob@example.org>\r\n")
            time.sleep(0.4)  # the route is looked up, the frontend opens bob's file
            started = time.monotonic()
            code = alice.cmd(b"NOOP\r\n")[0]
            stalled = time.monotonic() - started
            bob_code = bob.reply()[0]
            log = front.log()
        finally:
            for c in clients:
                c.sock.close()
            front.proc.kill()  # a frozen frontend would keep a graceful stop waiting
            front.stop()
            daemon.stop()
            listener.close()
    assert code == 250 and bob_code == 454, (code, bob_code, log[-1500:])
    # bob's file was the frontend's to open, and it is no CA file
    assert "bob-ca.pem: cannot" in log, log[-1500:]
    assert stalled < 0.5, (f"alice's NOOP took {stalled:.2f} s (alone: {alone:.3f} s) while"
                           " the frontend looked for certificates in bob's CA file: the"
                           " regular expression held the GIL and froze every session")


# ------------------------------------------------------------ what OpenSSL used to read


def test_a_global_sslca_of_trusted_certificate_blocks_no_longer_loads(world, clean_homes):
    """DEFECT (rule: docs/decisions/relay.md "A route's sslCA opened by the frontend": the
    file's certificates are parsed "as lenient as load_verify_locations"; the original C
    sendooway and this code up to 17c4866 gave sslCA to OpenSSL's
    SSL_CTX_load_verify_locations, which reads PEM "CERTIFICATE", "X509 CERTIFICATE" and
    "TRUSTED CERTIFICATE" blocks; DESIGN.md: the configuration files of the original keep
    working unchanged): the frontend now takes only blocks matching
    `-----BEGIN CERTIFICATE-----` (_tls._PEM_CERT). A bundle in OpenSSL's trusted format -
    e.g. RHEL/Fedora's /etc/pki/ca-trust/extracted/openssl/ca-bundle.trust.crt, which
    update-ca-trust makes "for OpenSSL" - has no such block. Observed: the global
    `sslCA =` names the fake world's CA written as a TRUSTED CERTIFICATE block (the same
    DER); OpenSSL's load_verify_locations took it before this change, now every TLS route gets
    454 "TLS with the upstream server failed" and the log says "no PEM certificate in it" (a
    bundle mixing both forms silently loses the trusted-form CAs: certificate refused).
    Correct: every block load_verify_locations reads is read (let OpenSSL's
    PEM_X509_INFO / X509_load_cert_crl_file-style reader walk the bytes, or accept TRUSTED
    CERTIFICATE and X509 CERTIFICATE with d2i_X509_AUX), so the message is delivered."""
    with open_tmp() as tmp:
        with open(world.ca_file, "rb") as f:
            trusted = _relabel(f.read(), "TRUSTED CERTIFICATE")
        assert trusted.startswith(b"-----BEGIN TRUSTED CERTIFICATE-----")
        ca = os.path.join(str(tmp), "ca-bundle.trust.crt")
        with open(ca, "wb") as f:
            f.write(trusted)
        os.chmod(ca, 0o644)
        up = FakeUpstream(world, tls="tls", accounts=None, require_tls=False).start()
        config = front_config(tmp, world, f"timeout = 10\nsslCA = {ca}\nsmarthostMapping ="
                              f" direct:alice@example.org localhost {up.port} ssl,noAuth\n")
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            code, text = _send(front, world, "alice", "alice@example.org")
            log = front.log()
            got = len(up.messages)
        finally:
            front.stop()
            daemon.stop()
            up.stop()
    assert (code, got) == (250, 1), (
        f"a CA file in OpenSSL's trusted-certificate form, which load_verify_locations read,"
        f" is refused now: MAIL got {code} {text!r}; log: {log[-1200:]}")


def test_a_ca_file_whose_last_certificate_is_cut_off_loads_without_a_word(world, clean_homes):
    """DEFECT (rule: DESIGN.md "Errors carry context a user can act on" (STYLE.md) and
    docs/decisions/relay.md: the CA file is parsed "as lenient as load_verify_locations", which
    refuses a cut-off PEM block ("PEM routines: bad end line"); the code up to 17c4866 and the
    original C sendooway reported such an sslCA as unusable): _tls._PEM_CERT only matches
    complete BEGIN...END pairs, so a certificate whose END line is missing - a bundle cut
    short by a full disk, an interrupted copy, a bad paste - is skipped silently and the rest
    loads. Observed: the global sslCA holds a complete unrelated CA and then the fake world's
    CA cut in the middle of its base64; the frontend logs nothing about the file and the
    upstream's certificate is "refused: ... unable to get local issuer certificate" - the
    admin is sent to look at the upstream, not at the broken file. Correct: a BEGIN without
    its END (or any block OpenSSL cannot read) makes the file fail to load, with its name and
    the reason in the log ("cannot load CA certificates"), as load_verify_locations did."""
    import trustme

    with open_tmp() as tmp:
        other = trustme.CA().cert_pem.bytes()
        with open(world.ca_file, "rb") as f:
            ours = f.read()
        ca = os.path.join(str(tmp), "bundle.pem")
        with open(ca, "wb") as f:
            f.write(other + ours[: len(ours) // 2])
        os.chmod(ca, 0o644)
        config = front_config(tmp, world, f"timeout = 10\nsslCA = {ca}\n")
        # Since an outside review the global sslCA is loaded at start, before
        # the privilege drop: the broken file is a start-up error naming it
        # (it was a 454 at MAIL, with the reason in the log)
        with pytest.raises(RuntimeError, match=r"bundle\.pem: cannot load CA certificates") as e:
            Frontend(config, os.path.join(str(tmp), "front.log")).start()
        assert "sslCA" in str(e.value), str(e.value)
