"""Review: real mail software as the client of sendooway, beyond
tests/test_review_realclients.py (swaks, msmtp, curl, smtplib).

Clients here, each against a real `sendooway -b` (STARTTLS port) and
`sendooway -b -s` (implicit-TLS port) next to a real `sendooway-auth`
daemon in the fake world, relaying to an aiosmtpd upstream on loopback
(`addReceivedField = yes`, so the upstream gets our Received: then the
client's bytes):

- Postfix as a null client (satellite): a private instance (its own
  config_directory and queue, no smtpd, `maillog_file`) with `relayhost =
  [127.0.0.1]:PORT`, `smtp_sasl_auth_enable`, a password map by sender,
  `smtp_tls_security_level = encrypt` with the fake world's CA, and an
  `smtps` transport with `smtp_tls_wrappermode = yes` towards the `-s`
  port. Mail goes in with `sendmail -C DIR`; a 5xx from the upstream must
  bounce in Postfix, a 4xx and a refused login must defer (sendooway never
  converts one into the other);
- s-nail (`mta=smtp://` with `smtp-use-starttls`, and `smtps://`);
- neomutt in batch mode (`smtp_url`, GnuTLS and GNU SASL);
- `git send-email` (Perl Net::SMTP, IO::Socket::SSL, Authen::SASL), two
  patches in one session;
- Exim 4 as a smarthost client (manualroute, `hosts_require_tls`/`_auth`,
  plaintext client authenticators PLAIN and LOGIN, `protocol = smtps`),
  run from the unpacked Debian package (exim4 and postfix conflict in apt;
  scripts/setup.sh unpacks it into .venv/mta/exim4).

Each checks the upstream's envelope and bytes, the AUTH mechanism the
client chose (PLAIN with and without an initial response, LOGIN without
one), and that no log holds a traceback or a password.

No defect of sendooway was found with these clients: every test passed
against the code as reviewed. They stay as the proof that each client
works (one end-to-end test per client and transport); what the clients
do on the wire (pipelining, SIZE and BODY=8BITMIME, dot-stuffing, a last
line without its newline, several messages per session, refusals, a wrong
password) is listed in the review's report.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .mta_util import (
    CLEAN_ENV, LATER_RCPT, POSTFIX_SERVICES, REFUSED_RCPT, REFUSED_SENDER, SBIN_PATH, logins as _logins,
    postfix_main_cf, split_ours as _split, system_uid, tool as _tool, wait_upstream as _wait_messages,
)
from .mta_util import clean_client_world, cw  # noqa: F401  (this module's fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")


# ------------------------------------------------------------------ Postfix as a null client

# the null client's own transport for wrapper-mode TLS (to sendooway -s)
SAT_MASTER_CF = """\
smtps      unix - - n - - smtp
  -o smtp_tls_wrappermode=yes
  -o smtp_tls_security_level=encrypt
  -o smtp_sasl_mechanism_filter=login
""" + POSTFIX_SERVICES


def _sat_main_cf(d: Path, ca: str, port: int) -> str:
    return postfix_main_cf(d, "satellite.test", "loopback-only") + f"""\
master_service_disable = inet
relayhost = [127.0.0.1]:{port}
transport_maps = texthash:{d}/etc/transport
smtp_helo_name = satellite.test
smtp_host_lookup = native
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:{d}/etc/sasl_passwd
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
smtp_tls_security_level = encrypt
smtp_tls_CAfile = {ca}
smtp_tls_loglevel = 1
smtp_tls_connection_reuse = yes
default_destination_concurrency_limit = 1
smtp_connection_cache_destinations = [127.0.0.1]:{port}
local_header_rewrite_clients =
disable_mime_output_conversion = yes
biff = no
append_dot_mydomain = no
queue_run_delay = 300s
minimal_backoff_time = 300s
maximal_backoff_time = 600s
"""


class Satellite:
    """A private Postfix that only sends: relayhost sendooway's STARTTLS
    port (as alice), *@wrap.example recipients through the `smtps`
    transport (wrapper mode) to the -s port (as bob), *@badpw.example
    recipients to the STARTTLS port as carol with a wrong password."""

    def __init__(self, cw, root: Path) -> None:
        self.dir = root
        etc = root / "etc"
        etc.mkdir(parents=True)
        (root / "spool").mkdir()
        (root / "data").mkdir()
        os.chown(root / "data", system_uid("postfix"), -1)
        (etc / "main.cf").write_text(_sat_main_cf(root, cw.world.ca_file, cw.front.port))
        (etc / "master.cf").write_text(SAT_MASTER_CF)
        # wrap.example by address, not [localhost]: where /etc/hosts also has
        # Debian's "::1 localhost" line (a fresh install's), glibc answers an
        # IPv4 lookup of localhost with 127.0.0.1 twice, and Postfix tries
        # the recipient its upstream deferred (451) again at the "second"
        # address at once: a second session and login. badpw.example needs a
        # name (its sasl_passwd key shares the relayhost's port); its test
        # counts no logins.
        (etc / "transport").write_text(f"wrap.example smtps:[127.0.0.1]:{cw.front_s.port}\n"
                                       f"badpw.example smtp:[localhost]:{cw.front.port}\n")
        (etc / "sasl_passwd").write_text(
            f"[127.0.0.1]:{cw.front.port} alice:{cw.pw('alice')}\n"
            f"[127.0.0.1]:{cw.front_s.port} bob:{cw.pw('bob')}\n"
            f"[localhost]:{cw.front.port} carol:not-{cw.pw('carol')}\n")
        os.chmod(etc / "sasl_passwd", 0o600)
        self.log_path = root / "maillog"

    def postfix(self, *args: str) -> tuple[int, str]:
        from .test_upstream_postfix import _postfix

        return _postfix(self.dir, *args)

    def start(self) -> None:
        self._pickups_at_start = len(self._pickups())
        started = self.log().count("daemon started")
        status, out = self.postfix("start")
        if status != 0:
            raise RuntimeError(f"postfix -c {self.dir / 'etc'} start: exit {status}: {out.strip()} "
                               f"{self.log()[-2000:]}")
        deadline = time.monotonic() + 10
        while self.log().count("daemon started") <= started and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        from .test_upstream_postfix import PostfixInstance

        PostfixInstance.stop(self)  # waits until the master process is gone

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def sendmail(self, sender: str, rcpts: list[str], body: bytes, wait: bool = True) -> str | None:
        """Submit with Postfix's sendmail (postdrop); returns the queue id
        (with `wait`: once pickup took it)."""
        before = len(self._pickups())
        r = subprocess.run(["/usr/sbin/sendmail", "-C", str(self.dir / "etc"), "-i", "-f", sender,
                            "--", *rcpts], input=body, env=CLEAN_ENV, capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return self.picked_up(1, before)[0] if wait else None

    def _pickups(self) -> list[str]:
        return re.findall(r"postfix/pickup\[\d+\]: ([0-9A-F]+):", self.log())

    def picked_up(self, n: int, before: int | None = None) -> list[str]:
        """The queue ids of the next `n` messages pickup takes after the
        `before`-th (default: since the last start)."""
        if before is None:
            before = self._pickups_at_start
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            new = self._pickups()[before:]
            if len(new) >= n:
                return new[:n]
            time.sleep(0.05)
        raise AssertionError(f"pickup never took the messages: {self.log()[-2000:]}")

    def wait_status(self, qid: str, rcpt: str, timeout: float = 20.0) -> str:
        """The delivery line of `rcpt` in message `qid` (sent, bounced, deferred)."""
        pat = re.compile(rf"{qid}: to=<{re.escape(rcpt)}>,[^\n]*status=\w+[^\n]*")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pat.search(self.log())
            if m:
                return m.group(0)
            time.sleep(0.05)
        raise AssertionError(f"no delivery status for {qid} to {rcpt}: {self.log()[-3000:]}")


@pytest.fixture(scope="module")
def sat(cw):
    _tool("postfix")
    users = Path("/etc/passwd").read_text()
    if not re.search(r"^postfix:", users, re.M) or not re.search(r"^postdrop:", Path("/etc/group").read_text(), re.M):
        pytest.skip("postfix is installed but the system user postfix or group postdrop is missing")
    s = Satellite(cw, cw.tmp / "satellite")
    try:
        s.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"the private Postfix instance did not start: {e}")
    try:
        yield s
    finally:
        s.stop()


def _sat_body(tag: str) -> bytes:
    """Headers Postfix would otherwise add itself, dot lines, 8-bit text,
    LF line ends (as a local program writes them) and no final newline."""
    return (f"From: sender@home.example\nTo: r@example.net\nDate: Wed, 25 Nov 2026 12:00:00 +0000\n"
            f"Message-ID: <{tag}@satellite.test>\nSubject: {tag}\nMIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n").encode() + (
        b"first line\n.\n..two dots\n.three\n\xc3\xa4 8-bit\n" + b"y" * 990 + b"\nlast line")


def _crlf(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r\n") + b"\r\n"


PICKUP_RECEIVED = re.compile(
    rb"Received: by satellite\.test \(Postfix, from userid 0\)\r\n"
    rb"\tid (?P<qid>[0-9A-F]+); [^\r\n]+\r\n")


def test_postfix_satellite_starttls_plain_exact_bytes(cw, sat):
    """relayhost over STARTTLS, SASL (Cyrus, PLAIN with an initial response),
    three messages queued while Postfix is stopped: each arrives byte for
    byte with BODY=8BITMIME and SIZE, and Postfix reuses its connection
    (smtp_tls_connection_reuse through tlsproxy) for a later message."""
    start = len(cw.front.log())
    bodies = [_sat_body(f"sat{n}") for n in range(3)]
    # queued while Postfix is stopped, so that it finds all three at start
    sat.stop()
    for b in bodies:
        sat.sendmail("alice@home.example", ["r@example.net", "s@example.net"], b, wait=False)
    sat.start()
    qids = sat.picked_up(3)
    for qid in qids:
        for rcpt in ("r@example.net", "s@example.net"):
            line = sat.wait_status(qid, rcpt)
            assert "status=sent" in line and f"relay=127.0.0.1[127.0.0.1]:{cw.front.port}" in line, line
    msgs = _wait_messages(cw, 3)
    by_qid = {}
    for m in msgs:
        assert (m.mail_from, m.rcpt_tos) == ("alice@home.example", ["r@example.net", "s@example.net"])
        rest = _split(m, "alice", helo=b"satellite.test")
        pk = PICKUP_RECEIVED.match(rest)
        assert pk, rest[:300]
        by_qid[pk.group("qid").decode()] = rest[pk.end():]
        assert "BODY=8BITMIME" in m.mail_options, m.mail_options
        assert any(o.startswith("SIZE=") for o in m.mail_options), m.mail_options
    # (pickup takes the maildrop files in its own order)
    assert set(by_qid) == set(qids)
    assert sorted(by_qid.values()) == sorted(_crlf(b) for b in bodies)
    assert "Trusted TLS connection established to 127.0.0.1" in sat.log()
    assert _logins(cw.front, start).count("PLAIN") >= 1
    # Postfix kept the connection for the messages it found waiting
    # (smtp_tls_connection_reuse): its RSET, then the next MAIL, through us
    assert re.search(r"conn_use=[23],", sat.log()), sat.log()[-3000:]


def test_postfix_satellite_wrappermode_refusals_bounce_or_defer(cw, sat):
    """The `smtps` transport (smtp_tls_wrappermode, SASL LOGIN: Cyrus sends
    no initial response) to the -s port, as bob:
    a 5xx recipient refusal from the upstream bounces in Postfix, a 4xx
    defers (the message stays queued), the accepted recipient is
    delivered: sendooway passes each reply on and converts none."""
    # (transport_maps chooses by recipient domain: all three in wrap.example)
    ok, refused, later = "ok@wrap.example", "nobody@wrap.example", "later@wrap.example"
    start = len(cw.front_s.log())
    cw.up.reject_rcpt.add(refused)
    cw.up.temp_fail_rcpt.add(later)
    try:
        body = _sat_body("wrapped")
        qid = sat.sendmail("bob@home.example", [ok, refused, later], body)
        sent, bounced, deferred = (sat.wait_status(qid, r) for r in (ok, refused, later))
    finally:
        cw.up.reject_rcpt.discard(refused)
        cw.up.temp_fail_rcpt.discard(later)
    port = cw.front_s.port
    assert f"relay=127.0.0.1[127.0.0.1]:{port}" in sent and "status=sent" in sent, sent
    assert "status=bounced" in bounced and "said: 550 5.1.1 no such user here" in bounced, bounced
    assert "(in reply to RCPT TO command)" in bounced
    assert "status=deferred" in deferred and "said: 451 4.3.0 try again later" in deferred, deferred
    msgs = [m for m in _wait_messages(cw, 1) if m.mail_from == "bob@home.example"]
    [m] = msgs
    assert m.rcpt_tos == [ok]
    rest = _split(m, "bob", helo=b"satellite.test")
    pk = PICKUP_RECEIVED.match(rest)
    assert pk and pk.group("qid").decode() == qid and rest[pk.end():] == _crlf(body)
    # the deferred recipient keeps the message in Postfix's queue
    q = subprocess.run(["/usr/sbin/postqueue", "-c", str(sat.dir / "etc"), "-p"], env=CLEAN_ENV,
                       capture_output=True, text=True, timeout=30)
    assert qid in q.stdout and later in q.stdout, q.stdout
    # one session, SASL LOGIN (the route names one address: a [localhost]
    # with two made Postfix try the deferred recipient again at once)
    assert _logins(cw.front_s, start) == ["LOGIN"]
    subprocess.run(["/usr/sbin/postsuper", "-c", str(sat.dir / "etc"), "-d", qid], env=CLEAN_ENV,
                   capture_output=True, timeout=30)


def test_postfix_satellite_wrong_password_defers_and_refused_sender_bounces(cw, sat):
    """carol's wrong password: Postfix hears 535 and defers (its
    smtp_sasl_auth_soft_bounce), nothing reaches the upstream, the
    frontend logs the failed login without the password. A sender the
    upstream refuses (550 at MAIL) bounces in Postfix."""
    start = len(cw.front.log())
    qid = sat.sendmail("carol@home.example", ["x@badpw.example"], _sat_body("badpw"))
    line = sat.wait_status(qid, "x@badpw.example")
    assert "status=deferred" in line and "SASL authentication failed" in line and "535 5.7.8" in line, line
    assert re.search(r"user='carol' mechanism=\w+", cw.front.log()[start:]), cw.front.log()[start:]
    subprocess.run(["/usr/sbin/postsuper", "-c", str(sat.dir / "etc"), "-d", qid], env=CLEAN_ENV,
                   capture_output=True, timeout=30)
    qid = sat.sendmail(REFUSED_SENDER, ["r@example.net"], _sat_body("badsender"))
    line = sat.wait_status(qid, "r@example.net")
    assert "status=bounced" in line and "said: 550 5.7.1 sender refused by fake upstream" in line, line
    assert "(in reply to MAIL FROM command)" in line
    # only Postfix's bounce (null sender, to the refused sender) went upstream
    time.sleep(0.5)
    assert [m.mail_from for m in cw.up.messages if m.mail_from != "<>"] == []


# ------------------------------------------------------------------ MUAs

MUA_BODY = b"first line\n.\n..two dots\n.three\nlast line without newline"


def _snail(cw, tmp_path, url: str, extra: list[str], sender: str, rcpts: list[str],
           subject: str) -> subprocess.CompletedProcess:
    s_nail = _tool("s-nail")
    env = dict(CLEAN_ENV, HOME=str(tmp_path), MAILRC="/dev/null")
    return subprocess.run(
        [s_nail, "-n", "-#", "-v", "-S", "v15-compat", "-S", "ttycharset=utf-8", "-S", f"mta={url}",
         "-S", f"tls-ca-file={cw.world.ca_file}", "-S", "tls-ca-no-defaults", "-S", "tls-verify=strict",
         "-S", "hostname=client.test", "-S", f"from={sender}", "-S", f"DEAD={tmp_path}/dead.letter",
         *extra, "-s", subject, *rcpts],
        input=MUA_BODY, env=env, capture_output=True, timeout=30)


def test_s_nail_starttls_plain_and_smtps_login(cw, tmp_path):
    """s-nail over STARTTLS (AUTH PLAIN, then its initial response on a 334
    line) and over smtps:// (AUTH LOGIN without an initial response), three
    recipients of which the upstream refuses none; then a wrong password
    (535) and a sender the upstream refuses (550), which s-nail reports."""
    start, start_s = len(cw.front.log()), len(cw.front_s.log())
    r = _snail(cw, tmp_path, f"smtp://alice:{cw.pw('alice')}@localhost:{cw.front.port}",
               ["-S", "smtp-use-starttls", "-S", "smtp-auth=plain"], "alice@home.example",
               ["r@example.net", "s@example.net"], "s-nail starttls")
    assert r.returncode == 0, r.stderr
    r = _snail(cw, tmp_path, f"smtps://bob:{cw.pw('bob')}@localhost:{cw.front_s.port}",
               ["-S", "smtp-auth=login"], "bob@home.example", ["t@example.net"], "s-nail smtps")
    assert r.returncode == 0, r.stderr
    msgs = _wait_messages(cw, 2)
    for m, user, rcpts in ((msgs[0], "alice", ["r@example.net", "s@example.net"]),
                           (msgs[1], "bob", ["t@example.net"])):
        assert (m.mail_from, m.rcpt_tos) == (f"{user}@home.example", rcpts)
        rest = _split(m, user)
        head, _, text = rest.partition(b"\r\n\r\n")
        assert b"\r\nUser-Agent: s-nail" in head
        # s-nail writes a "." line as quoted-printable =2E and ends the last
        # line with a soft break; the rest is the body as typed, CRLF ends
        assert text == b"first line\r\n=2E\r\n..two dots\r\n.three\r\nlast line without newline=\r\n", text
    assert _logins(cw.front, start) == ["PLAIN"] and _logins(cw.front_s, start_s) == ["LOGIN"]
    cw.up.messages.clear()
    r = _snail(cw, tmp_path, f"smtp://carol:wrong-{cw.pw('carol')}@localhost:{cw.front.port}",
               ["-S", "smtp-use-starttls", "-S", "smtp-auth=login"], "carol@home.example",
               ["r@example.net"], "wrong password")
    assert r.returncode != 0 and b"535 5.7.8" in r.stderr, r.stderr
    r = _snail(cw, tmp_path, f"smtp://alice:{cw.pw('alice')}@localhost:{cw.front.port}",
               ["-S", "smtp-use-starttls"], REFUSED_SENDER, ["r@example.net"], "refused sender")
    assert r.returncode != 0 and b"550 5.7.1 sender refused by fake upstream" in r.stderr, r.stderr
    assert cw.up.messages == []


def _neomutt(cw, tmp_path, url: str, user: str, auth: str, rcpts: list[str],
             subject: str, debug: Path) -> subprocess.CompletedProcess:
    neomutt = _tool("neomutt")
    home = tmp_path / "nm-home"
    home.mkdir(exist_ok=True)
    env = dict(CLEAN_ENV, HOME=str(home), TERM="dumb")
    return subprocess.run(
        [neomutt, "-n", "-F", "/dev/null", "-d", "2", "-l", str(debug),
         "-e", f"set ssl_ca_certificates_file={cw.world.ca_file}",
         "-e", f"set smtp_url={url}", "-e", f'set smtp_pass="{cw.pw(user)}"',
         "-e", f'set smtp_authenticators="{auth}"', "-e", "set ssl_starttls=yes ssl_force_tls=yes",
         "-e", f"set from={user}@home.example hostname=client.test", "-e", "set record=",
         "-s", subject, "--", *rcpts],
        input=MUA_BODY, env=env, capture_output=True, timeout=40)


def test_neomutt_batch_starttls_plain_and_smtps_login(cw, tmp_path):
    """neomutt -n batch mode: smtp:// with STARTTLS (GNU SASL's PLAIN with
    an initial response that names the user as authorization identity too,
    which is allowed), then smtps:// with LOGIN (no initial response)."""
    start, start_s = len(cw.front.log()), len(cw.front_s.log())
    r = _neomutt(cw, tmp_path, f"smtp://alice@localhost:{cw.front.port}", "alice", "plain",
                 ["r@example.net"], "neomutt starttls", tmp_path / "nm1.log")
    assert r.returncode == 0, (r.stdout, r.stderr)
    r = _neomutt(cw, tmp_path, f"smtps://bob@localhost:{cw.front_s.port}", "bob", "login",
                 ["r@example.net", "s@example.net"], "neomutt smtps", tmp_path / "nm2.log")
    assert r.returncode == 0, (r.stdout, r.stderr)
    msgs = _wait_messages(cw, 2)
    for m, user in zip(msgs, ("alice", "bob")):
        assert m.mail_from == f"{user}@home.example"
        head, _, text = _split(m, user).partition(b"\r\n\r\n")
        assert b"\r\nSubject: neomutt " in head
        # neomutt adds the final newline; dot lines arrive as typed
        assert text == b"first line\r\n.\r\n..two dots\r\n.three\r\nlast line without newline\r\n", text
    assert msgs[1].rcpt_tos == ["r@example.net", "s@example.net"]
    assert _logins(cw.front, start) == ["PLAIN"] and _logins(cw.front_s, start_s) == ["LOGIN"]


PATCH = b"""\
From 1234567890abcdef1234567890abcdef12345678 Mon Sep 17 00:00:00 2001
From: Alice <alice@home.example>
Date: Wed, 25 Nov 2026 12:00:00 +0000
Subject: [PATCH %d/2] change %d

.a line with a leading dot
.
---
 f | 1 +
 1 file changed, 1 insertion(+)

diff --git a/f b/f
--- a/f
+++ b/f
@@ -0,0 +1 @@
+\xc3\xa4
-- 
2.39.5
"""


def _send_email(cw, tmp_path, port: int, encryption: str, auth: str, rcpts: list[str],
                patches: list[Path]) -> subprocess.CompletedProcess:
    git = _tool("git")
    env = dict(CLEAN_ENV, HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="Alice", GIT_AUTHOR_EMAIL="alice@home.example",
               GIT_COMMITTER_NAME="Alice", GIT_COMMITTER_EMAIL="alice@home.example")
    probe = subprocess.run([git, "send-email", "-h"], env=env, capture_output=True, timeout=30)
    if b"--smtp-server" not in probe.stdout + probe.stderr:
        pytest.skip(f"git send-email does not run (scripts/setup.sh installs git-email and "
                    f"its Perl modules): {probe.stderr[-300:]!r}")
    return subprocess.run(
        [git, "send-email", "--no-validate", "--confirm=never", "--suppress-cc=all", "--no-chain-reply-to",
         "--from", "Alice <alice@home.example>", *[f"--to={r}" for r in rcpts],
         "--smtp-server=localhost", f"--smtp-server-port={port}", f"--smtp-encryption={encryption}",
         "--smtp-user=alice", f"--smtp-pass={cw.pw('alice')}", f"--smtp-auth={auth}",
         f"--smtp-ssl-cert-path={cw.world.ca_file}", "--smtp-domain=client.test", "--smtp-debug=1",
         *map(str, patches)],
        env=env, capture_output=True, timeout=60)


def test_git_send_email_two_patches_one_session(cw, tmp_path):
    """git send-email (Net::SMTP): two patches in one session over STARTTLS
    with AUTH PLAIN (initial response), then over implicit TLS with AUTH
    LOGIN (no initial response); each patch arrives byte for byte (dot
    lines, 8-bit text, no BODY= parameter: Net::SMTP sends none)."""
    patches = []
    for n in (1, 2):
        p = tmp_path / f"000{n}.patch"
        p.write_bytes(PATCH % (n, n))
        patches.append(p)
    start, start_s = len(cw.front.log()), len(cw.front_s.log())
    r = _send_email(cw, tmp_path, cw.front.port, "tls", "PLAIN", ["r@example.net"], patches)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _send_email(cw, tmp_path, cw.front_s.port, "ssl", "LOGIN", ["s@example.net"], patches[:1])
    assert r.returncode == 0, r.stderr[-2000:]
    msgs = _wait_messages(cw, 3)
    for m, n, rcpt in zip(msgs, (1, 2, 1), ("r@example.net", "r@example.net", "s@example.net")):
        assert (m.mail_from, m.rcpt_tos) == ("alice@home.example", [rcpt])
        head, _, text = _split(m, "alice").partition(b"\r\n\r\n")
        assert f"\r\nSubject: [PATCH {n}/2] change {n}\r\n".encode() in head, head
        want = (PATCH % (n, n)).split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")
        assert text == want, text
    # one session for both patches on the STARTTLS port
    assert cw.front.log()[start:].count(": connect") == 1, cw.front.log()[start:]
    assert _logins(cw.front, start) == ["PLAIN"] and _logins(cw.front_s, start_s) == ["LOGIN"]


# ------------------------------------------------------------------ Exim as a smarthost client

# Debian's exim4 conflicts with postfix: scripts/setup.sh unpacks
# exim4-daemon-light into .venv/mta/exim4 (apt-get download, dpkg-deb -x)
# instead of installing it; the binary runs from there with -C.
EXIM_PRIVATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            ".venv", "mta", "exim4", "usr", "sbin", "exim4")

EXIM_CONF = """\
exim_path = {binary}
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
primary_hostname = eximsat.test
keep_environment = LD_PRELOAD : NSS_WRAPPER_PASSWD : NSS_WRAPPER_GROUP
trusted_users = root
message_size_limit = 10M
retry_interval_max = 1h

begin routers
wrapped:
  driver = manualroute
  domains = wrap.example
  transport = smarthost_smtps
  route_list = * localhost::{sport} byname
  self = send
  no_more
smarthost:
  driver = manualroute
  transport = smarthost_smtp
  route_list = * localhost::{port} byname
  self = send
  no_more

begin transports
smarthost_smtp:
  driver = smtp
  helo_data = eximsat.test
  hosts_require_tls = *
  hosts_require_auth = *
  tls_verify_certificates = {ca}
  tls_verify_hosts = *
smarthost_smtps:
  driver = smtp
  protocol = smtps
  helo_data = eximsat.test
  hosts_require_tls = *
  hosts_require_auth = *
  tls_verify_certificates = {ca}
  tls_verify_hosts = *

begin retry
* * F,1h,1h

begin authenticators
plain_client:
  driver = plaintext
  public_name = PLAIN
  client_condition = ${{if eq{{$host_port}}{{{port}}}}}
  client_send = ^alice^{alice_pw}
login_client:
  driver = plaintext
  public_name = LOGIN
  client_condition = ${{if eq{{$host_port}}{{{sport}}}}}
  client_send = : bob : {bob_pw}
"""


@pytest.fixture(scope="module")
def exim(cw):
    binary = shutil.which("exim4", path=SBIN_PATH) or (EXIM_PRIVATE if os.path.exists(EXIM_PRIVATE) else None)
    if binary is None:
        pytest.skip("no exim4 binary (scripts/setup.sh unpacks exim4-daemon-light into .venv/mta/exim4)")
    from .fakeworld import _find_lib

    d = cw.tmp / "exim"
    (d / "spool").mkdir(parents=True)
    (d / "log").mkdir()
    # Exim's delivery processes run as its compiled-in user Debian-exim, which
    # exists only when the package is installed: nss_wrapper maps it to nobody
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    if not re.search(r"^Debian-exim:", passwd, re.M):
        passwd += "Debian-exim:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
    if not re.search(r"^Debian-exim:", group, re.M):
        group += "Debian-exim:x:65534:\n"
    (d / "passwd").write_text(passwd)
    (d / "group").write_text(group)
    os.chown(d / "spool", 65534, 65534)
    os.chown(d / "log", 65534, 65534)
    conf = d / "exim.conf"
    conf.write_text(EXIM_CONF.format(binary=binary, d=d, port=cw.front.port, sport=cw.front_s.port, ca=cw.world.ca_file,
                                     alice_pw=cw.pw("alice"), bob_pw=cw.pw("bob")))
    # root's and readable: Exim's deliveries run as Debian-exim (nobody here)
    # and read it again (the test world's passwords only, in a temp dir)
    os.chmod(conf, 0o644)
    env = dict(CLEAN_ENV, LD_PRELOAD=_find_lib("libnss_wrapper.so"),
               NSS_WRAPPER_PASSWD=str(d / "passwd"), NSS_WRAPPER_GROUP=str(d / "group"))
    r = subprocess.run([binary, "-C", str(conf), "-bV"], env=env, capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"exim4 -bV fails here: {r.stdout[-300:]!r} {r.stderr[-300:]!r}")
    ns = type("Exim", (), {})()
    ns.binary, ns.conf, ns.env, ns.dir = binary, conf, env, d

    def run(*args, body: bytes = b""):
        return subprocess.run([binary, "-C", str(conf), *args], env=env, input=body,
                              capture_output=True, timeout=60)

    def log() -> str:
        p = d / "log" / "mainlog"
        return p.read_text(errors="replace") if p.exists() else ""

    ns.run, ns.log = run, log
    yield ns


def test_exim_smarthost_starttls_plain_and_smtps_login(cw, exim):
    """Exim (-odi: delivers at once) to its smarthost: STARTTLS, certificate
    verified, AUTH PLAIN with an initial response, SIZE passed on; a
    second route over implicit TLS with LOGIN.
    Byte-exact body; the upstream's 550 to one recipient becomes Exim's
    bounce ("**"), its 451 a deferral ("==", still queued)."""
    start, start_s = len(cw.front.log()), len(cw.front_s.log())
    body = (b"From: alice@home.example\nTo: r@example.net\nDate: Wed, 25 Nov 2026 12:00:00 +0000\n"
            b"Message-ID: <exim1@eximsat.test>\nSubject: exim\n\n"
            b"first\n.\n..two\n.three\n" + b"z" * 990 + b"\nlast without newline")
    r = exim.run("-odi", "-oi", "-f", "alice@home.example", "r@example.net", REFUSED_RCPT, LATER_RCPT,
                 body=body)
    assert r.returncode == 0, (r.stdout, r.stderr, exim.log()[-2000:])
    body2 = body.replace(b"exim1@", b"exim2@")
    r = exim.run("-odi", "-oi", "-f", "bob@home.example", "w@wrap.example", body=body2)
    assert r.returncode == 0, (r.stdout, r.stderr, exim.log()[-2000:])
    log = exim.log()
    assert re.search(r"=> r@example\.net R=smarthost T=smarthost_smtp H=localhost \[127\.0\.0\.1\] "
                     r"X=TLS[^\n]* CV=yes A=plain_client C=\"250 2\.0\.0 queued as FAKE\d+\"", log), log
    assert re.search(rf"\*\* {REFUSED_RCPT} R=smarthost T=smarthost_smtp[^\n]*"
                     r"550 5\.1\.1 no such user here", log), log
    assert re.search(rf"== {LATER_RCPT} R=smarthost T=smarthost_smtp defer[^\n]*451 4\.3\.0 try again later",
                     log), log
    assert re.search(r"=> w@wrap\.example R=wrapped T=smarthost_smtps [^\n]*CV=yes A=login_client", log), log
    q = exim.run("-bp")
    assert LATER_RCPT in q.stdout.decode(), q.stdout
    msgs = [m for m in _wait_messages(cw, 2) if m.mail_from != "<>"]
    assert [(m.mail_from, m.rcpt_tos) for m in msgs] == [("alice@home.example", ["r@example.net"]),
                                                         ("bob@home.example", ["w@wrap.example"])]
    for m, user, b in ((msgs[0], "alice", body), (msgs[1], "bob", body2)):
        assert any(o.startswith("SIZE=") for o in m.mail_options), m.mail_options
        rest = _split(m, user, helo=b"eximsat.test")
        exim_received = re.match(rb"Received: from root by eximsat\.test with local \(Exim 4\.[\d.]+\)\r\n"  # 4.96, 4.98.2
                                 rb"\t\(envelope-from <[^>]+>\)\r\n(?:\t[^\r\n]*\r\n)+", rest)
        assert exim_received, rest[:400]
        assert rest[exim_received.end():] == _crlf(b), rest[exim_received.end():][:400]
    # (Exim's bounce to alice went through the same route: a second PLAIN login)
    assert set(_logins(cw.front, start)) == {"PLAIN"} and _logins(cw.front_s, start_s) == ["LOGIN"]


def test_exim_queue_run_sends_several_messages_down_one_connection(cw, exim):
    """Three messages queued (-odq), then a forced two-stage queue run: Exim
    passes its open connection on from message to message (continued
    delivery), so sendooway relays several in one session."""
    start = len(cw.front.log())
    bodies = [b"Subject: queued %d\nMessage-ID: <q%d@eximsat.test>\n\nbody %d\n..\n" % (n, n, n) for n in range(3)]
    for b in bodies:
        r = exim.run("-odq", "-oi", "-f", "alice@home.example", "q@example.net", body=b)
        assert r.returncode == 0, r.stderr
    r = exim.run("-qqff")  # two-stage run: routing first, then one connection per host
    assert r.returncode == 0, r.stderr
    msgs = [m for m in _wait_messages(cw, 3) if m.rcpt_tos == ["q@example.net"]]
    assert len(msgs) == 3
    got = sorted(_split(m, "alice", helo=b"eximsat.test") for m in msgs)
    for rest, b in zip(got, bodies):
        assert rest.endswith(b"\r\n\r\n" + _crlf(b.split(b"\n\n", 1)[1][:-1])), rest
    # a session relayed several (Exim may start the first alone; the forced
    # run may also retry another test's deferred message in a session of its own)
    log = cw.front.log()[start:]
    sessions = {}
    for sid, n in re.findall(r"\bid=(\w+)-(\d+) ", log):
        sessions.setdefault(sid, []).append(int(n))
    assert any(n[:2] == [1, 2] for n in sessions.values()), log
