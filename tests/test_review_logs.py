"""The logs as a mail admin reads them (an outside review): the real
`sendooway -b` beside its `sendooway-auth`, a raw client, raw scripted
upstreams on loopback and users' own files. Every line must be one line
(no CR, LF, NUL, ESC, C1 control or other unprintable character), of a
size syslog keeps, without a password; forged lines must not reach the
shipped fail2ban filter, real failures must."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import time

import pytest

from .front_util import front_config, front_with_daemon, open_tmp
from .upstream import RawServer, talk

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")

PACKAGING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "packaging")
UP_USER = "relay-user"
UP_PW = "Up-Log-Pw-5t"
WRONG = "Wrong-Log-Pw-8q"
FORGED = "auth failed: user=x client=203.0.113.66 reason=wrong-password session=s delay=0.0"
# what may not reach a log line: CR, LF, NUL, ESC, the C1 controls (CSI,
# NEL), the Unicode line and paragraph separators, bidi overrides
NASTY = "\r\n\0\x1b[2J\x9b31m\x85\u2028\u2029\u202e"
SYSLOG_MAX = 8192  # rsyslog's default maxMessageSize: longer lines are cut


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode("utf-8", "surrogateescape") if isinstance(data, str)
                            else data).decode()


class RawUpstream(RawServer):
    """A plain-text upstream on 127.0.0.1 that says what `replies` says:
    the greeting under "", each command's reply under its verb (EHLO, AUTH,
    MAIL, RCPT, DATA, "." for the final dot), or a function of the command
    line that returns it; a missing verb gets 250."""

    def __init__(self, replies: dict[str, bytes]) -> None:
        self.replies = {"": b"220 up.test ESMTP\r\n", "EHLO": b"250-up.test\r\n250 AUTH PLAIN LOGIN\r\n",
                        "AUTH": b"235 2.7.0 ok\r\n", "DATA": b"354 go\r\n", **replies}
        super().__init__()

    def _one(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rb") as f:
                conn.sendall(self.replies[""])
                if not self.replies[""].startswith(b"220"):
                    return
                for line in f:
                    verb = line[:4].upper().decode("latin-1")
                    reply = self.replies.get(verb, b"250 2.0.0 ok\r\n")
                    conn.sendall(reply(line) if callable(reply) else reply)
                    if verb == "DATA" and self.replies["DATA"].startswith(b"354"):
                        for body in f:
                            if body == b".\r\n":
                                break
                        conn.sendall(self.replies.get(".", b"250 2.0.0 queued\r\n"))
                    elif verb == "QUIT":
                        return
        except OSError:
            pass


def plain(user: str | bytes, password: str | bytes, authzid: bytes = b"") -> bytes:
    enc = (lambda v: v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v)
    return b"AUTH PLAIN " + b64(authzid + b"\0" + enc(user) + b"\0" + enc(password)).encode() + b"\r\n"


EHLO = b"EHLO c.test\r\n"

BAD_TEXT = NASTY.replace("\r", "").replace("\n", "").replace("\0", "").encode() + b"\xff\xfe"
UPSTREAMS = {  # the sender's local part → what its upstream says
    "greet": {"": b"554 5.7.1 go away " + BAD_TEXT + FORGED.encode() + b"\r\n"},
    "big": {"MAIL": b"".join(b"550-5.1.0 " + b"x" * 4000 + b"\r\n" for _ in range(90))
            + b"550 5.1.0 end\r\n"},
    "wide": {"MAIL": b"550 5.1.0 " + "\ue000\u200b".encode() * 600 + b"\r\n"},  # escaped: 6 each
    "rcpt": {"RCPT": b"550 5.1.1 no such user " + BAD_TEXT + FORGED.encode() + b"\r\n"},
    "ehlo": {"EHLO": b"250-up.test\r\n250 AUTH X" + BAD_TEXT + b"\r\n"},
    "echo": {"AUTH": lambda line: b"535 5.7.8 you said " + line.strip() + b"\r\n"},
    "bye": {"MAIL": b"421 4.3.2 bye " + BAD_TEXT + FORGED.encode() + b"\r\n"},
    "dot": {".": b"554 5.6.0 " + BAD_TEXT + FORGED.encode() + b"\r\n"},
    "pipe": {"EHLO": b"250-up.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n",
             "RCPT": lambda line: b"550 5.1.1 not here\r\n" if b"<r" in line else b"250 2.1.5 ok\r\n"},
}
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (sendooway|sendooway-auth)\[\d+\]: \S")


class Rig:
    """sendooway-auth, a `sendooway -b` on 127.0.0.1 and one on ::1, and the
    scripted upstreams, one per sender (`UPSTREAMS`)."""

    def __init__(self, world, tmp) -> None:
        from .auth_helpers import Daemon
        from .front_util import Frontend

        self.world, self.tmp = world, tmp
        self.ups = {name: RawUpstream(replies) for name, replies in UPSTREAMS.items()}
        maps = "".join(f"smarthostMapping = direct:{name}@x.test 127.0.0.1 {up.port} {UP_USER} {UP_PW}\n"
                       for name, up in self.ups.items())
        config = front_config(tmp, world, maps + "maxAuthFailures = 50\n", tls=False)
        os.chmod(config, 0o640)  # (it holds upstream passwords)
        self.daemon = Daemon(tmp, config).start()
        self.v4 = Frontend(config, str(tmp / "front4.log")).start()
        self.v6 = Frontend(config, str(tmp / "front6.log"), host="::1").start()

    def logs(self) -> dict[str, str]:
        return {"auth": self.daemon.log(), "front4": self.v4.log(), "front6": self.v6.log()}

    def stop(self) -> None:
        self.v4.stop()
        self.v6.stop()
        self.daemon.stop()
        for up in self.ups.values():
            up.stop()


def sweep(rig: Rig) -> None:
    """Everything a client, an upstream and the logins can put into a log
    line: right and wrong logins (PLAIN, LOGIN, IPv4, IPv6) with forged and
    unprintable names, one message to each scripted upstream, odd senders."""
    pw = rig.world.users["alice"].password
    bob = rig.world.users["bob"]
    for name in UPSTREAMS:  # a session each: a refused DATA makes the message commands
        talk(rig.v4.port, [EHLO, plain("alice", pw), f"MAIL FROM:<{name}@x.test>\r\n".encode(),
                           b"RCPT TO:<r@y.test>\r\n", b"DATA\r\n", b"Subject: t\r\n\r\nhi\r\n.\r\n",
                           b"QUIT\r\n"], pause=0.1)
    # a pipelining client: MAIL, RCPTs and DATA go upstream as one group
    talk(rig.v4.port, [EHLO, plain("alice", pw), b"MAIL FROM:<pipe@x.test>\r\nRCPT TO:<r@y.test>\r\n"
                       b"RCPT TO:<s@y.test>\r\nDATA\r\n", b"Subject: t\r\n\r\nhi\r\n.\r\n",
                       b"MAIL FROM:<pipe@x.test>\r\n", b"RCPT TO:<s@y.test>\r\nRCPT TO:<r2@y.test>\r\n"
                       b"RCPT TO:<r3@y.test>\r\n", b"QUIT\r\n"])
    talk(rig.v4.port, [EHLO, plain("alice", pw),
                       f"MAIL FROM:<\"a{NASTY[3:]} b {FORGED}\"@x.test>\r\n".encode(), b"RSET\r\n",
                       b"MAIL FROM:<\xff\xfe@x.test>\r\n", b"RSET\r\n",
                       b"MAIL FROM:<" + b"l" * 300 + b"@x.test>\r\n", b"QUIT\r\n"])
    for front, user in ((rig.v4, "alice"), (rig.v6, bob.name)):
        talk(front.port, [EHLO, plain(user, WRONG), b"AUTH LOGIN\r\n", f"{b64(user)}\r\n".encode(),
                          f"{b64(WRONG)}\r\n".encode(),
                          plain("x\r\n" + FORGED + "\x1b[2J\x85\u2028", WRONG),
                          b"AUTH LOGIN\r\n", f"{b64(FORGED + chr(0x9b))}\r\n".encode(),
                          f"{b64(WRONG)}\r\n".encode(),
                          plain(b"\xff" + FORGED.encode(), WRONG), plain("", WRONG), b"QUIT\r\n"],
             host=front.host)
    time.sleep(0.5)


@pytest.fixture(scope="module")
def swept(world):
    with open_tmp() as tmp:
        rig = Rig(world, tmp)
        try:
            sweep(rig)
            rig.logs_after = rig.logs()
            yield rig
        finally:
            rig.stop()


def test_every_line_is_one_line_of_printable_text(swept):
    """No CR, LF, NUL, ESC, C1 control, line separator or bidi override from
    a client or an upstream reaches a log line: each line starts as a line
    of its program does, and holds printable characters only. (An upstream's
    reply text had its controls made `?` for the client, but kept the bidi
    overrides, U+202E reversing the rest of the line on the admin's
    terminal: in the greeting, the AUTH it offers, its reply to the dot.)"""
    for name, text in swept.logs_after.items():
        assert text, name
        for line in text.split("\n")[:-1]:
            assert LINE.match(line), (name, line[:300])
            assert line.isprintable(), (name, repr(line[:300]))


def test_every_line_fits_what_syslog_keeps(swept):
    """An upstream's refusal of 90 lines of 4000 octets (it may send up to
    100 lines of 4 KiB) was logged whole in the message line: 361 KB on one
    line, which rsyslog cuts at 8 KiB and which a SOCK_DGRAM /dev/log
    refuses (EMSGSIZE) past ~200 KiB, losing the line. The reply text is
    cut in the log (the client still gets it whole)."""
    for name, text in swept.logs_after.items():
        for line in text.split("\n"):
            assert len(line.encode()) <= SYSLOG_MAX, (name, len(line), line[:200])
    line = next(li for li in swept.logs_after["front4"].splitlines() if "from=<big@x.test>" in li)
    assert "upstream=MAIL refused: 550 5.1.0 xxxx" in line and line.endswith("..."), line[:300]
    # the cut is of what the line shows, escapes included (not of the text
    # before escaping, which grew 6 times: 1000 characters became 6000)
    line = next(li for li in swept.logs_after["front4"].splitlines() if "from=<wide@x.test>" in li)
    shown = line.split("upstream=MAIL refused: ", 1)[1]
    assert shown.startswith("550 5.1.0 \\ue000\\u200b") and len(shown) <= 1003, len(shown)


def test_a_refused_recipient_is_named_in_the_log(swept):
    """An upstream that refused the only RCPT (the client then got 554 to
    DATA, or sent RSET/QUIT): not a word in either log, neither the
    recipient nor the upstream's reply; only the route line of the sender.
    The admin asked why a message to r@y.test never left could not tell."""
    front = swept.logs_after["front4"]
    lines = [li for li in front.splitlines() if "to=<r@y.test>" in li and "refused" in li
             and "from=<rcpt@x.test>" in li]
    assert len(lines) == 1, front
    assert "user=alice" in lines[0] and "550 5.1.1 no such user" in lines[0], lines[0]
    assert "upstream 127.0.0.1:" in lines[0], lines[0]
    # the same to an upstream with PIPELINING: one RCPT at a time, MAIL and
    # RCPTs in one group, RCPTs pipelined behind MAIL: each refused one, once
    piped = [li for li in front.splitlines() if "from=<pipe@x.test>" in li and "refused" in li]
    assert [re.search(r"to=<(\S+)>", li).group(1) for li in piped] == [
        "r@y.test", "r@y.test", "r2@y.test", "r3@y.test"], front
    assert all("550 5.1.1 not here" in li for li in piped), piped
    assert any("from=<pipe@x.test> rcpts=1 " in li and "upstream=250" in li for li in front.splitlines())


def _fail2ban(rig, text: str, name: str) -> list[str]:
    from .test_deploy_auth import _fail2ban_regex

    path = rig.tmp / name
    path.write_text(text)
    r = _fail2ban_regex(path, rig.tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return sorted(r.stdout.split())


@pytest.mark.skipif(not shutil.which("fail2ban-regex"), reason="fail2ban not installed")
def test_fail2ban_counts_each_real_failure_and_nothing_forged(swept):
    """The shipped filter on every line both programs wrote, as one file
    (the socketpair mode's -l FILE holds both) and as syslog writes them:
    each wrong password (PLAIN and LOGIN, from 127.0.0.1 and ::1) and each
    made-up name the authenticator refused is counted once, for the real
    client; the forged `auth failed: ... client=203.0.113.66` in user names,
    senders and upstream replies never."""
    logs = swept.logs_after
    expected = []
    for name, ip in (("front4", "127.0.0.1"), ("front6", "::1")):
        failed = [li for li in logs[name].splitlines()
                  if "login failed:" in li and "refused here" not in li]
        assert any("mechanism=PLAIN" in li for li in failed), logs[name]
        assert any("mechanism=LOGIN" in li for li in failed), logs[name]
        expected += [ip] * len(failed)
    merged = sorted("".join(logs.values()).splitlines(keepends=True), key=lambda li: li[:19])
    assert _fail2ban(swept, "".join(merged), "all.log") == sorted(expected)
    syslog = "".join(f"Nov 29 {li[11:19]} mailhost {li[20:]}" for li in merged)
    assert _fail2ban(swept, syslog, "mail.log") == sorted(expected)


def test_no_password_in_any_log(swept):
    """The users' passwords (right and wrong), the upstream password, and
    their base64 forms, in no line of either log; the upstream that echoed
    the AUTH line in its 535 is logged by its code only."""
    text = "\n".join(swept.logs_after.values())
    forms = []
    for secret in (swept.world.users["alice"].password, WRONG, UP_PW):
        forms += [secret, b64(secret), b64(f"\0alice\0{secret}"), b64(f"\0{UP_USER}\0{secret}")]
    assert [f for f in forms if f in text] == []
    assert "PLAIN: 535 5.7.8" in text and "you said" not in text


@pytest.mark.skipif(not shutil.which("fail2ban-regex"), reason="fail2ban not installed")
def test_proxy_headers_cannot_forge_lines_and_their_client_is_the_one_banned(swept):
    """Behind a trusted balancer (proxyProtocol): broken headers holding
    escapes, a forged failure line or a bare LF make one printable line
    each, matched by no filter; a wrong password from the client a v1 or a
    v2 header names is banned as that client, not as the balancer."""
    import ipaddress
    import struct

    from .front_util import Frontend

    config = front_config(swept.tmp, swept.world, "proxyProtocol = 127.0.0.1/32\nmaxAuthFailures = 50\n",
                          tls=False, name="proxy.conf")
    front = Frontend(config, str(swept.tmp / "proxy.log")).start()
    v2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x21]) + struct.pack("!H", 36)
          + ipaddress.ip_address("2001:db8::7").packed + ipaddress.ip_address("::1").packed
          + struct.pack("!HH", 40000, 587))
    try:
        for header in (b"PROXY TCP4 1.2.3.4\x1b[2J 127.0.0.1 1 2\r\n",
                       f"PROXY TCP4 {FORGED}"[:100].encode() + b"\r\n",
                       b"PROXY TCP6 \xc2\x9b\xe2\x80\xae ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4\n"):
            talk(front.port, [header, EHLO, b"QUIT\r\n"], pause=0.05)
        for header in (b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 587\r\n", v2):
            talk(front.port, [header, EHLO, plain("alice", WRONG), b"QUIT\r\n"])
        time.sleep(0.5)
    finally:
        front.stop()
    log = front.log()
    broken = [li for li in log.splitlines() if "closing without a greeting" in li
              and "closed before a PROXY header" not in li]  # (that one: Frontend.start's probe)
    assert len(broken) == 4, log
    for line in log.splitlines():
        assert LINE.match(line) and line.isprintable(), repr(line)
    auth = swept.daemon.log()
    lines = [li + "\n" for li in (auth + log).splitlines()
             if "198.51.100.9" in li or "2001:db8::7" in li or "PROXY" in li]
    assert _fail2ban(swept, "".join(lines), "proxy-f2b.log") == ["198.51.100.9", "2001:db8::7"], lines


def test_users_files_cannot_forge_lines_and_errors_name_file_and_line(world, clean_homes):
    """What a user writes into ~/.sendoowayrc, ~/.fetchmailrc and a getmail
    rc (and the names of the files it points to) reaches the daemon's log
    as one printable line per error, with FILE:LINE, without the
    passwords in those files; no line matches the fail2ban filter."""
    esc = "\x1b[2J\x9b31m\u202e"
    secret = "File-Pw-3k9"
    odd_dir = f"dir{esc}"
    os.makedirs(os.path.join(world.users["alice"].home, odd_dir), exist_ok=True)
    world.write_user_file("alice", ".sendoowayrc", (
        "smarthostMapping = fetchmail:%h/.fetchmailrc\n"
        "smarthostMapping = getmail:%h/.getmail/getmailrc\n"
        f"smarthostMapping = fetchmail:%h/{odd_dir}\n"
        f"bogus{esc} {FORGED} = 1\n"
        f"bogus\u202e {FORGED} = 1\n").encode())
    world.write_user_file("alice", ".fetchmailrc", (
        f'poll pop.example.org user "al{esc}" pass "{secret}"\n'
        f'#sendooway:server "a{esc}b"\n#sendooway:pass "{secret}"\n'
        f'#sendooway:address "fm{esc}@x.test"\n'
        f'#sendooway:{FORGED} {secret}\n').encode())
    world.write_user_file("alice", ".getmail/getmailrc", (
        f"[sender]\ntype = Simple{esc}\nserver = s{esc}\npassword = {secret}\n"
        f"address = g{esc}@x.test\n{FORGED} = 1\n").encode())
    pw = world.users["alice"].password
    with open_tmp() as tmp:
        config = front_config(tmp, world, "userInclude = %h/.sendoowayrc\n", tls=False)
        with front_with_daemon(tmp, world, config) as front:
            talk(front.port, [EHLO, plain("alice", pw), b"MAIL FROM:<a@x.test>\r\n", b"QUIT\r\n"])
            time.sleep(0.5)
            log = (tmp / "auth.log").read_text()
            front_log = front.log()
    errors = [li for li in log.splitlines() if "user file " in li]
    # (lines 3 and 4 hold ESC and CSI: a control character inside a line of
    # an include is refused at its line since test_review_confdiff, as the
    # original refused it; line 5's bidi override is no control character)
    for where in (".sendoowayrc:3: control character U+001B",
                  ".sendoowayrc:4: control character U+001B",
                  ".sendoowayrc:5: unknown keyword", ".fetchmailrc:4: #sendooway:address",
                  ".fetchmailrc:5: unknown keyword", "getmailrc:2: [sender] unknown type"):
        assert sum(where in li for li in errors) == 1, (where, log)
    # the bad server name at the line that gave it (#sendooway:server), not
    # at the #sendooway:address line that closes the account: an admin sent
    # to line 4 found an address there and no server
    assert sum(".fetchmailrc:2: the server name holds" in li for li in errors) == 1, log
    for line in (log + front_log).splitlines():
        assert LINE.match(line) and line.isprintable(), repr(line)
        assert secret not in line, line
        assert ": auth failed:" not in line, line


def _log_of_one_mail(world, tmp, mapping: str) -> str:
    """The frontend's log after alice logs in and gives a MAIL FROM that
    `mapping` (the only smarthostMapping) routes."""
    config = front_config(tmp, world, f"smarthostMapping = {mapping}\n", tls=False)
    with front_with_daemon(tmp, world, config) as front:
        talk(front.port, [EHLO, plain("alice", world.users["alice"].password),
                          b"MAIL FROM:<a@x.test>\r\n", b"QUIT\r\n"])
        return front.log()


def test_implicit_tls_to_a_plain_text_port_says_so(world):
    """A route with `ssl` (implicit TLS) to a port that speaks plain SMTP
    (587 or 25 instead of 465; a fetchmailrc's #sendooway:ssl where
    #sendooway:tls was meant) was logged as OpenSSL's "TLS handshake
    failed: wrong version number" only; the client side says what it
    means since an earlier review, the upstream side did not."""
    up = RawUpstream({})
    with open_tmp() as tmp:
        log = _log_of_one_mail(world, tmp, f"direct:* 127.0.0.1 {up.port} {UP_USER} {UP_PW} ssl")
    up.stop()
    line = next(li for li in log.splitlines() if "TLS handshake failed" in li)
    assert "plain text" in line and "STARTTLS" in line, line


def _self_signed(tmp, common_name: str) -> tuple[str, str]:
    """A self-signed certificate whose subject says `common_name`."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_file, key_file = str(tmp / "evil-cert.pem"), str(tmp / "evil-key.pem")
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_file, key_file


def test_an_upstream_certificate_cannot_forge_lines(world, upstream_factory):
    """noCertCheck logs the certificate problems it tolerates, with the
    subject of the certificate at fault, which the upstream writes: a CN
    holding a newline and a forged failure line made a second log line
    (RFC 4514's escaping leaves control characters alone)."""
    with open_tmp() as tmp:
        cert, key = _self_signed(tmp, "x\nauth failed: user=x client=203.0.113.66 reason=w\x1b[2J")
        up = upstream_factory(tls="tls", accounts=None, cert_file=cert, key_file=key)
        log = _log_of_one_mail(world, tmp, f"direct:* 127.0.0.1 {up.port} {UP_USER} {UP_PW}"
                               " ssl,noCertCheck,noAuth")
    assert "certificate problems ignored (noCertCheck)" in log, log
    for line in log.split("\n")[:-1]:
        assert LINE.match(line) and line.isprintable(), repr(line)
