"""Adversarial review of this session's fixes in the frontend and relay
(`git diff fc49d49 -- sendooway_front shared/cli.py shared/log.py`): the
421 written when a session is cut at stop, cloneEhlo/Received names
(is_ehlo_name), IDNA server names (host_a_label) and the certificate check,
and the escaped sender of the message log line. Real parts only: the
`sendooway -b` and `sendooway-auth` commands as subprocesses in the fake
world, or the real session driver, session core and Relay in process with a
scripted upstream on loopback. Each test below failed on the code as
reviewed, for the reason its docstring gives.
All are fixed.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tests.auth_helpers import Daemon
from tests.front_util import Frontend, front_config, open_tmp

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")


def _read_until(sock: socket.socket, marker: bytes, seconds: float = 10) -> bytes:
    sock.settimeout(seconds)
    seen = b""
    while marker not in seen:
        chunk = sock.recv(4096)
        if not chunk:
            break
        seen += chunk
    return seen


def _wait_log(front: Frontend, text: str, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in front.log():
            return True
        time.sleep(0.05)
    return False


def _cpu_second(pid: int) -> float:
    """CPU seconds `pid` used over one second of wall time."""
    def ticks() -> int:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    before = ticks()
    time.sleep(1)
    return (ticks() - before) / os.sysconf("SC_CLK_TCK")


def test_stop_does_not_hang_on_a_client_in_mid_starttls_handshake(world):
    """DEFECT (rule: docs/decisions/frontend.md on `-b` and SIGTERM — "2 s
    later whatever still runs is cancelled", "A second SIGTERM/SIGINT ends
    every wait at once", a cut session writes 421 "for at most a second"
    before it closes; the review brief: never a hang): a client that said STARTTLS, got 220 and
    sent no ClientHello (a broken client, a scanner) is in the middle of the
    server-side handshake when the server stops. On the second SIGTERM its
    task is cancelled and the new `SessionRunner._cut`
    (sendooway_front/_driver.py) writes "421 4.3.2" through
    `Stream.write`, whose TLS connection object is still set although the
    handshake never finished: SSL_write answers WANT_READ for ever and
    `Stream.write` (sendooway_front/_stream.py) loops on it without ever
    yielding to the event loop. The process spins at 100% CPU and never
    exits (no further signal can be handled; only SIGKILL ends it). Correct:
    a session whose TLS handshake has not completed is closed without a
    reply (or the 421 goes out only on a usable channel), and the process
    ends within the second signal's few seconds."""
    with open_tmp() as tmp:
        config = front_config(tmp, world)
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        sock = None
        try:
            sock = socket.create_connection((front.host, front.port), timeout=10)
            assert _read_until(sock, b"\r\n").startswith(b"220 ")
            sock.sendall(b"EHLO c.test\r\n")
            assert b"250 " in _read_until(sock, b"250 ")
            sock.sendall(b"STARTTLS\r\n")
            assert _read_until(sock, b"\r\n").startswith(b"220 ")
            # ... and no ClientHello: the server waits in its handshake
            front.proc.send_signal(signal.SIGTERM)
            assert _wait_log(front, "stopping: no new sessions"), front.log()
            front.proc.send_signal(signal.SIGTERM)  # a second signal: cut them now
            try:
                front.proc.wait(8)
            except Exception:
                pass
            exited = front.proc.poll() is not None
            busy = "" if exited else f"; CPU used in the last second: {_cpu_second(front.proc.pid):.2f}s"
            assert exited, ("sendooway still running 8 s after the second SIGTERM" + busy
                            + f"; log: {front.log()[-600:]}")
        finally:
            if sock is not None:
                sock.close()
            if front.proc.poll() is None:
                front.proc.kill()
                front.proc.wait()
            front.stop()
            daemon.stop()


def test_ehlo_name_with_an_ipv6_zone_and_junk_is_not_cloned_or_put_in_received(monkeypatch):
    """DEFECT (rule: RFC 5321 4.1.3 — an IPv6 address literal is
    "[IPv6:" IPv6-addr "]", with no zone and certainly no ';' or
    parentheses — and 4.4 (the Received: From-domain is a Domain or an
    address literal); RFC 5322 3.6.7 (';' ends the received tokens and
    starts the date); the fix's own rule in shared/smtp_syntax.py
    `is_ehlo_name`, which says it admits only what RFC 5321 4.1.2/4.1.3
    write): `is_ehlo_name` hands the inside of `[IPv6:...]` to
    `ipaddress.ip_address`, which since Python 3.9 takes a scope id of any
    text after '%'. A client saying `EHLO [IPv6:fe80::1%eth0;(forged)]`
    with cloneEhlo = yes and addReceivedField = yes makes the relay send
    exactly that name upstream in its EHLO (a strict upstream refuses it,
    and the message with it) and write it into our Received: header, where
    its ';' and '(' break the header's grammar (a parser takes the date
    after the ';'). Correct: an address literal with a zone (or anything
    not an RFC 5321 literal) is not an EHLO name: the relay says EHLO with
    its own localname and the Received: header `from unknown`."""
    from tests.scripted_relay import greeted_message

    name = b"[IPv6:fe80::1%eth0;(forged)]"
    _out, message, ehlo = greeted_message(monkeypatch, b"EHLO " + name + b"\r\n")
    assert ehlo and all(b"%" not in line for line in ehlo), ehlo
    received = message.split(b"\r\n\t")[0]
    assert received.startswith(b"Received: from "), message[:200]
    assert b"%" not in received and b";" not in received, received



def test_internationalized_server_name_written_with_a_capital_passes_the_certificate_check(world):
    """DEFECT (rule: RFC 5891 5 / UTS #46 — the fix's own rule in
    shared/smtp_syntax.py `host_a_label`: a server name is looked up
    and sent as SNI by its UTS #46 A-label, and test_review_addresses asks
    for the same name "for the lookup, SNI and the certificate check alike";
    DNS names are case-insensitive, RFC 4343): a route whose server is
    written `Mail.Bücher.test` connects to mail.xn--bcher-kva.test and
    sends that SNI, but `check_server` (sendooway_front/_tls.py) hands the
    raw Unicode name to service_identity's `verify_hostname`, which encodes
    it with plain IDNA 2008 (no UTS #46 mapping) and refuses the capital
    capital ("certificate does not match Mail.Bücher.test: Codepoint U+0042
    at position 1 of 'Bücher' not allowed"): a certificate valid for
    mail.xn--bcher-kva.test is refused and every message of that route gets
    a temporary TLS failure (the client retries for days). The same name in
    lower case works (and, once it has connected, hides the fault for a
    while: the smarthostCache pool, keyed by the lower-cased name, hands its
    kept connection to the capital spelling). Correct: the certificate is checked against the same
    A-label that was looked up and sent as SNI (host_a_label), so the case
    of the name in the config does not matter."""
    import smtplib

    import trustme

    from tests.upstream import FakeUpstream

    with open_tmp() as tmp:
        ca = trustme.CA()
        leaf = ca.issue_cert("mail.xn--bcher-kva.test")
        ca_file, cert_file, key_file = (str(tmp / n) for n in ("idn-ca.pem", "up.crt", "up.key"))
        ca.cert_pem.write_to_path(ca_file)
        leaf.private_key_pem.write_to_path(key_file)
        with open(cert_file, "wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        hosts = tmp / "hosts"
        hosts.write_text("127.0.0.1 mail.xn--bcher-kva.test\n")
        for path in (ca_file, cert_file, str(hosts)):
            os.chmod(path, 0o644)
        up = FakeUpstream(world, tls="tls", cert_file=cert_file, key_file=key_file).start()
        config = front_config(tmp, world, (
            f"sslCA = {ca_file}\n"
            f"smarthostMapping = direct:*@lower.example mail.bücher.test {up.port} ssl,noAuth\n"
            f"smarthostMapping = direct:*@capital.example Mail.Bücher.test {up.port} ssl,noAuth\n"))
        env = world.env()
        env["NSS_WRAPPER_HOSTS"] = str(hosts)
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, os.path.join(str(tmp), "front.log"), env=env).start()
        try:
            results = {}
            for sender in ("a@capital.example", "a@lower.example"):
                with front.smtp(timeout=15) as s:
                    s.starttls(context=world.ssl_context())
                    s.ehlo()
                    s.login("alice", world.users["alice"].password)
                    try:
                        results[sender] = s.sendmail(sender, ["rcpt@example.net"],
                                                     b"Subject: idn\r\n\r\nhi\r\n")
                    except smtplib.SMTPException as e:
                        results[sender] = e
            detail = [ln for ln in front.log().splitlines() if "upstream" in ln]
            # the reference: the lower-case spelling is looked up, named and checked fine
            assert results["a@lower.example"] == {}, (results, detail)
            assert results["a@capital.example"] == {}, (results, detail)
            assert sorted(m.mail_from for m in up.messages) == ["a@capital.example", "a@lower.example"]
        finally:
            front.stop()
            daemon.stop()
            up.stop()


def test_message_log_line_sender_cannot_close_its_angle_brackets_early(monkeypatch):
    """DEFECT (rule: the fix's own contract in shared/log.py `field` — "One
    `key=value` value that cannot forge a log line (a sender may hold
    spaces, '=' or '>' in a quoted local part)" — and commit e68b7dd "the
    message log line escapes the sender ... so a quoted local part cannot
    add fields"; Postfix's from=<...> convention that log parsers (fail2ban,
    pflogsumm-style scripts) read as `from=<([^>]*)>`): `field` escapes
    space, '=', '"' and '\\' but lets '>' through, and the relay writes the
    value inside `from=<...>` (sendooway_front/_relay.py `_log_message`).
    A sender `"x>y"@example.org` (a valid quoted local part) is logged as
    `from=<\\x22x>y\\x22@example.org>`: the sender's own '>' ends the field,
    a parser reads the sender as `\\x22x` and the rest of the line no
    longer matches. Correct: '>' (and '<') are escaped like '=' and space,
    so from=<...> always holds exactly the whole sender."""
    import re

    from tests.front_util import login_plain
    from tests.scripted_relay import careful, converse

    steps = [
        b"EHLO c.test\r\nAUTH PLAIN " + login_plain("alice", "pw-alice").encode() + b"\r\n",
        b'MAIL FROM:<"x>y"@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n',
        b"Subject: angle\r\n\r\nhello\r\n.\r\nQUIT\r\n",
    ]
    out, up, log = converse(monkeypatch, careful, steps)
    assert b"250 2.0.0 queued" in out, out
    [line] = [ln for ln in log.splitlines() if ": message user=alice" in ln]
    m = re.search(r" from=<([^>]*)> rcpts=\d+ ", line)
    assert m is not None, line
    assert "y" in m.group(1), line
