"""A fourth review with real servers as the upstream, in setups the others
(tests/test_upstream_postfix.py, test_review_upstreams3.py: Postfix,
Dovecot, Exim) did not cover:

- **Postfix with postscreen** in front of smtpd (*@screen.example):
  postscreen_access_list empty (else mynetworks would let loopback by),
  greet action enforce with a 1 s pregreet wait (so the greeting is
  "220-" ... "220 "), and the deep protocol tests (pipelining,
  non_smtp_command, bare_newline). A first contact talks to postscreen's
  own SMTP engine, which offers neither PIPELINING nor AUTH and answers
  every RCPT 450 4.3.2; only when that connection ends is the client
  "PASS NEW" and handed to smtpd from then on.
- **Postfix with Cyrus SASL** (sasldb2 filled by saslpasswd2, CRAM-MD5,
  PLAIN and LOGIN): a submission port with STARTTLS and
  `smtpd_tls_auth_only = yes` (*@sub.example), an implicit-TLS port with
  `smtpd_tls_wrappermode = yes` (*@smtps.example).
- **Postfix's anvil limits** seen through the proxy, where every user is
  one client host: smtpd_client_connection_count_limit (1),
  smtpd_client_connection_rate_limit, smtpd_client_message_rate_limit,
  smtpd_client_auth_rate_limit and smtpd_client_new_tls_session_rate_limit
  (spared by our TLS session resumption), each on a port of its own
  (anvil counts per service), with smtpd_client_event_limit_exceptions
  empty (it defaults to mynetworks, which would exempt loopback); and
  smtpd_soft_error_limit, whose per-connection error count the cache
  carried from one user's session to the next.
- **smtp-sink** (Postfix's test server) injecting faults: a command
  refused 4xx (-r) or 5xx (-f), a hang-up without reply (-q) or with 421
  (-Q) after a command or at connect, a delay (-w) longer than our
  `timeout`, an abort after DATA (-A), no ESMTP (-e). Its dump files
  (-d) show what it received.

msmtpd is not here: Debian bookworm's msmtp 1.8.23 does not ship it (no
msmtpd package in the archive), and it offers no TLS and no AUTH of its own
that a route could use, so it could not stand for a smarthost anyway.

Postfix relays to an aiosmtpd `Sink`; what arrives there is Postfix's
Received:, ours, then the client's bytes exactly. The private Postfix runs
as in tests/test_upstream_postfix.py (postfix -c DIR, its log in DIR/maillog).

Three defects were found and fixed (each test says which; decisions in
docs/decisions/relay.md):
- a connection to postscreen's test engine was kept in the cache after its
  450, so every retry within `smarthostCache` seconds met the same 450 and
  the proxy never passed postscreen's test while anyone used the route;
- Postfix's error count of a kept connection went on from one user's
  session to the next: past smtpd_soft_error_limit every reply of every
  later session waited smtpd_error_sleep_time. Now a connection that
  refused is not kept for others (since tests/test_review_upstreams5.py:
  even when it accepted a message after);
- smtp-sink -A 0 (354 and at once 550): a refusal in the same read as the
  354 was called nonsense (451 4.5.0), for a pipelined group all three
  replies; now it is DATA's answer with its class.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from tests.fakeworld import free_port
from tests.front_util import open_tmp, wait_port
from tests.mta_util import (POSTFIX_SERVICES, Sink, login as _login, message_body, postfix_main_cf,
                            postfix_relay_cf, postfix_sasldb, postfix_tree, served)
from tests.test_review_upstreams3 import ONE_RECEIVED, OUR_RECEIVED
from tests.test_upstream_postfix import POSTFIX, PostfixInstance, _postfix

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="the frontend drops to nobody and Postfix starts as root: needs root")

SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
SASLPASSWD2 = shutil.which("saslpasswd2", path=SBIN)
SMTP_SINK = shutil.which("smtp-sink", path=SBIN)
UP_USER = "relayacct"
UP_PASS = "Up-Sasl-Secret-Kx93"
WRONG_PASS = "Wrong-Sasl-Secret-Qq17"
RATE = 3  # smtpd_client_connection_rate_limit / message rate, per minute
AUTH_RATE = 2

SERVICES = ("screen", "sub", "smtps", "count", "rate", "msg", "authrate", "errs", "tlsrate")
REFUSED = "refused@example.net"
# smtpd with SASL, relaying only for an authenticated client
SASL_ONLY = ("  -o smtpd_sasl_auth_enable=yes\n  -o mynetworks=\n"
             "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n")
MASTER_CF = """\
127.0.0.1:{screen} inet n - n - 1 postscreen
smtpd pass - - n - - smtpd
dnsblog unix - - n - 0 dnsblog
127.0.0.1:{sub} inet n - n - - smtpd
  -o syslog_name=postfix/sub
  -o smtpd_tls_auth_only=yes
{sasl_only}127.0.0.1:{smtps} inet n - n - - smtpd
  -o syslog_name=postfix/smtps
  -o smtpd_tls_wrappermode=yes
{sasl_only}127.0.0.1:{count} inet n - n - - smtpd
  -o syslog_name=postfix/count
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_client_connection_count_limit=1
127.0.0.1:{rate} inet n - n - - smtpd
  -o syslog_name=postfix/rate
  -o smtpd_client_connection_rate_limit={rate_limit}
127.0.0.1:{msg} inet n - n - - smtpd
  -o syslog_name=postfix/msg
  -o smtpd_client_message_rate_limit={rate_limit}
127.0.0.1:{authrate} inet n - n - - smtpd
  -o syslog_name=postfix/authrate
  -o smtpd_client_auth_rate_limit={auth_rate}
{sasl_only}127.0.0.1:{errs} inet n - n - - smtpd
  -o syslog_name=postfix/errs
  -o smtpd_soft_error_limit=1
  -o smtpd_recipient_restrictions=check_recipient_access,texthash:{d}/etc/rcpt_access,permit_mynetworks,reject
127.0.0.1:{tlsrate} inet n - n - - smtpd
  -o syslog_name=postfix/tlsrate
  -o smtpd_client_new_tls_session_rate_limit={rate_limit}
  -o smtpd_tls_loglevel=1
""" + POSTFIX_SERVICES


def _main_cf(d: Path, sink_port: int) -> str:
    return postfix_main_cf(d, "pfx.test", "127.0.0.1") + postfix_relay_cf(d, sink_port) + f"""\
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {d}/etc/sasl
smtpd_sasl_local_domain = pfx.test
postscreen_access_list =
postscreen_greet_wait = 1s
postscreen_greet_action = enforce
postscreen_pipelining_enable = yes
postscreen_non_smtp_command_enable = yes
postscreen_bare_newline_enable = yes
postscreen_cache_map = btree:$data_directory/postscreen_cache
smtpd_client_event_limit_exceptions =
anvil_rate_time_unit = 60s
"""


class Postfix4:
    """The private Postfix of this module: one port per service in SERVICES."""

    def __init__(self, world, root: Path, sink_port: int) -> None:
        self.dir = root
        self.ports = {name: free_port() for name in SERVICES}
        etc = postfix_tree(world, root, _main_cf(root, sink_port),
                           MASTER_CF.format(sasl_only=SASL_ONLY, rate_limit=RATE, auth_rate=AUTH_RATE, d=root,
                                            **self.ports))
        (etc / "rcpt_access").write_text(f"{REFUSED} 550 5.1.1 no such user here\n")
        postfix_sasldb(root, "pfx.test", UP_USER, UP_PASS, "CRAM-MD5 PLAIN LOGIN")
        self.log_path = root / "maillog"

    def start(self) -> None:
        status, out = _postfix(self.dir, "start")
        if status != 0:
            raise RuntimeError(f"postfix -c {self.dir / 'etc'} start: exit {status}: {out.strip()}"
                               f" {self.log()[-2000:]}")
        # one probe, on a port whose counts do not matter: the master opens
        # every listener before it serves any
        wait_port("127.0.0.1", self.ports["sub"], timeout=15)

    stop = PostfixInstance.stop
    log = PostfixInstance.log

    def lines(self, pattern: str) -> list[str]:
        return [ln for ln in self.log().splitlines() if re.search(pattern, ln)]


# ------------------------------------------------------------------ smtp-sink


SINKS = ("good", "r-mail", "f-rcpt", "r-dot", "f-dot", "cut-rcpt", "cut-dot", "421-data", "421-connect",
         "cut-connect", "A-0", "e", "w-data", "t-1", "421-rset", "cut-rset")
SINK_OPTIONS = {
    "good": [], "r-mail": ["-r", "MAIL"], "f-rcpt": ["-f", "RCPT"], "r-dot": ["-r", "."],
    "f-dot": ["-f", "."], "cut-rcpt": ["-q", "RCPT"], "cut-dot": ["-q", "."], "421-data": ["-Q", "DATA"],
    "421-connect": ["-Q", "CONNECT"], "cut-connect": ["-q", "CONNECT"], "A-0": ["-A", "0"], "e": ["-e"],
    "w-data": ["-w", "4"], "t-1": ["-t", "1"], "421-rset": ["-Q", "RSET"], "cut-rset": ["-q", "RSET"],
}


class SmtpSink:
    """`smtp-sink -u nobody OPTIONS 127.0.0.1:PORT`, each transaction dumped
    into its own file under `dumps`."""

    def __init__(self, root: Path, port: int, options: list[str]) -> None:
        self.port = port
        self.dumps = root
        root.mkdir()
        os.chown(root, 65534, 65534)
        self.argv = [SMTP_SINK, "-u", "nobody", "-h", "sink.test", "-d", f"{root}/%H%M%S.", *options,
                     f"127.0.0.1:{port}", "10"]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "SmtpSink":
        self.proc = subprocess.Popen(self.argv, env={"PATH": SBIN, "LANG": "C"}, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port("127.0.0.1", self.port, self.proc, timeout=10)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stderr.close()

    def received(self) -> list[bytes]:
        """Every dumped transaction (smtp-sink writes it at the final dot)."""
        return [p.read_bytes() for p in sorted(self.dumps.rglob("*.*"), key=lambda p: p.stat().st_mtime_ns)]


# ------------------------------------------------------------------ the rig


class Rig:
    pass


def _routes(pf: Postfix4, sink_ports: dict[str, int]) -> str:
    p = pf.ports
    lines = [
        f"*@screen.example localhost {p['screen']} tls,noAuth",
        f"*@sub.example localhost {p['sub']} {UP_USER} {UP_PASS} tls",
        # the same port without TLS: AUTH is not offered there
        f"*@subclear.example localhost {p['sub']} {UP_USER} {UP_PASS}",
        f"*@subbad.example localhost {p['sub']} {UP_USER} {WRONG_PASS} tls",
        f"*@smtps.example localhost {p['smtps']} {UP_USER} {UP_PASS} ssl",
        f"*@count.example localhost {p['count']} {UP_USER} {UP_PASS} tls",
        f"*@count2.example localhost {p['count']} tls,noAuth",
        f"*@rate.example localhost {p['rate']} tls,noAuth",
        f"*@msg.example localhost {p['msg']} tls,noAuth",
        f"*@authrate.example localhost {p['authrate']} {UP_USER} {UP_PASS} tls",
        f"*@errs.example localhost {p['errs']} tls,noAuth",
        f"*@tlsrate.example localhost {p['tlsrate']} tls,noAuth",
        *(f"*@{name}.sink.example 127.0.0.1 {port} noAuth" for name, port in sink_ports.items()),
    ]
    return "".join(f"smarthostMapping = direct:{ln}\n" for ln in lines)


FRONTS = {
    # name: (extra config, the mechanism Postfix should log)
    "on": ("smarthostCache = 30\n", "CRAM-MD5"),
    "off": ("smarthostCache = 0\nsmarthostCramMD5 = never\n", "PLAIN"),
    "login": ("smarthostCache = 0\nsmarthostCramMD5 = never\nsmarthostPlain = never\n", "LOGIN"),
}
LOST = (451, b"4.4.2 Upstream connection lost, try again later")
NOT_READY = (451, b"4.3.0 Upstream server not ready, try again later")  # (the greeting's words: in the log)
SLOW_TIMEOUT = 2  # the "slow" frontend's `timeout`, shorter than smtp-sink -w 4


@pytest.fixture(scope="module")
def rig(world):
    if POSTFIX is None:
        pytest.skip("postfix is not installed (scripts/setup.sh installs it)")
    if SASLPASSWD2 is None:
        pytest.skip("saslpasswd2 is not installed (scripts/setup.sh installs sasl2-bin)")
    if SMTP_SINK is None:
        pytest.skip("smtp-sink is not installed (it comes with Debian's postfix)")
    with open_tmp() as tmp:
        r = Rig()
        r.world, r.tmp = world, tmp
        r.sink = Sink().start()
        r.pf = Postfix4(world, tmp / "postfix", r.sink.port)
        r.sink_ports = {name: free_port() for name in SINKS}
        try:
            try:
                r.pf.start()
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                pytest.skip(f"the private Postfix instance did not start: {e}")
            base = f"sslCA = {world.ca_file}\naddReceivedField = yes\n" + _routes(r.pf, r.sink_ports)
            extras = {name: extra for name, (extra, _m) in FRONTS.items()}
            with served(r, base, {**extras, "slow": "smarthostCache = 30\n"}, {"slow": SLOW_TIMEOUT}):
                yield r
        finally:
            r.pf.stop()
            r.sink.stop()


@pytest.fixture(autouse=True)
def _clear(rig):
    rig.sink.messages.clear()
    yield


def _check(m, sender: str, rcpts: list[str], body: bytes, user: str, proto: bytes) -> None:
    """The sink's message: Postfix's one Received: (`with PROTO`), ours, then `body`."""
    assert (m.mail_from, m.rcpt_tos) == (sender, rcpts)
    theirs = ONE_RECEIVED.match(m.data)
    assert theirs, m.data[:400]
    assert b" (Postfix) with " + proto + b" id " in theirs.group(0), theirs.group(0)
    ours = OUR_RECEIVED.match(m.data, theirs.end())
    assert ours, m.data[:800]
    assert ours.group(1).decode() == user
    assert m.data[ours.end():] == body


def _wait_for(pred, timeout: float = 10.0, what=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pred(), what()


def _send(fe, rig, sender: str, rcpt: str, body: bytes, user: str = "dave"):
    """One session, one message; the client's (code, text) for each step
    up to the first refusal."""
    out = []
    with fe.smtp() as s:
        _login(rig, s, user)
        for step in (lambda: s.mail(sender), lambda: s.rcpt(rcpt), lambda: s.data(body)):
            out.append(step())
            if out[-1][0] >= 400:
                break
    return out


# ------------------------------------------------------------------ postscreen


def test_postscreen_first_contact_450_then_a_retry_delivers(rig):
    """The first contact meets postscreen's engine: its "220-" greeting part
    and the 1 s wait (the pregreet test) are sat out, RCPT gets its 450
    4.3.2 as a 450, a pipelining client's commands go one at a time (the
    engine offers no PIPELINING), and postscreen finds nothing to complain
    about (also in a second transaction of the same session, which meets
    the same 450, as it would directly). A retry a moment later, in a new
    session, must deliver: the
    connection to the engine must not be kept for it (postscreen passes the
    client only when that connection ends).

    Failed before the fix: the cache kept the engine's connection, the
    retry got it back (RSET probe, 250) and met the same 450; with clients
    retrying within `smarthostCache`, the proxy never passed postscreen."""
    fe = rig.fronts["on"]
    body = message_body("postscreen", "screen.example")
    with fe.smtp() as s:
        _login(rig, s)
        s.send("MAIL FROM:<dave@screen.example> BODY=8BITMIME\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
        got = [s.getreply() for _ in range(3)]
        assert got[:2] == [(250, b"2.1.0 Ok"), (450, b"4.3.2 Service currently unavailable")], got
        assert got[2][0] in (503, 554), got  # never a 354: no recipient
        assert s.noop()[0] == 250
        # again in the same session, as directly: the same 450 (our RSET and
        # MAIL go one by one: the engine offers no PIPELINING)
        assert s.rset()[0] == 250
        assert s.mail("dave@screen.example") == (250, b"2.1.0 Ok")
        assert s.rcpt("r@example.net") == (450, b"4.3.2 Service currently unavailable")
    assert fe.proc.poll() is None
    _wait_for(lambda: rig.pf.lines(r"postscreen\[\d+\]: PASS NEW \[127\.0\.0\.1\]"),
              what=lambda: rig.pf.log()[-3000:])
    plog = "\n".join(rig.pf.lines(r"postfix/postscreen\["))
    for bad in ("PREGREET", "BARE NEWLINE", "NON-SMTP COMMAND", "COMMAND PIPELINING", "HANGUP"):
        assert bad not in plog, plog
    # the retry: through smtpd now, delivered
    replies = _send(fe, rig, "dave@screen.example", "r@example.net", body)
    assert [c for c, _ in replies] == [250, 250, 250], replies
    [m] = rig.sink.wait(1)
    _check(m, "dave@screen.example", ["r@example.net"], body, "dave", b"ESMTPS")


def test_postscreen_passed_pipelined_probe_reaches_smtpd(rig):
    """Once passed, the connections go to smtpd: a kept one is probed with
    RSET and MAIL in one write (smtpd offers PIPELINING), a client's
    pipelined group goes as a group, and smtpd logs nothing improper."""
    fe = rig.fronts["on"]
    assert rig.pf.lines(r"PASS NEW"), "runs after the first contact"
    for n in range(2):
        with fe.smtp() as s:
            _login(rig, s)
            s.send(f"MAIL FROM:<dave@screen.example>\r\nRCPT TO:<p{n}@example.net>\r\n"
                   f"RCPT TO:<q{n}@example.net>\r\nDATA\r\n")
            got = [s.getreply()[0] for _ in range(4)]
            assert got == [250, 250, 250, 354], got
            s.send(b"Subject: after the pass\r\n\r\n..dot\r\n.\r\n")
            assert s.getreply()[0] == 250
    msgs = sorted(rig.sink.wait(2), key=lambda m: m.rcpt_tos)
    assert [m.rcpt_tos for m in msgs] == [["p0@example.net", "q0@example.net"], ["p1@example.net", "q1@example.net"]]
    assert all(m.data.endswith(b"\r\n\r\n.dot\r\n") for m in msgs)
    assert rig.pf.lines(r"postscreen\[\d+\]: PASS OLD \[127\.0\.0\.1\]")
    for bad in ("improper command pipelining", "COMMAND PIPELINING", "PREGREET"):
        assert not rig.pf.lines(bad), rig.pf.lines(bad)


# ------------------------------------------------------------------ Cyrus SASL


def _sasl_logins(rig, service: str) -> list[tuple[str, str]]:
    return re.findall(rf"postfix/{service}/smtpd\[\d+\]: \w+: client=unknown\[127\.0\.0\.1\], "
                      r"sasl_method=([\w-]+), sasl_username=([\w@.]+)", rig.pf.log())


SASL_NAME = f"{UP_USER}@pfx.test"  # (the realm: smtpd_sasl_local_domain)


@pytest.mark.parametrize("front", ["on", "off", "login"])
def test_sasl_submission_port_each_mechanism(rig, front):
    """Port 587's setup (STARTTLS, AUTH only over TLS, relay only when
    authenticated): Cyrus SASL's CRAM-MD5, PLAIN or LOGIN, as the tristates
    choose; Postfix says "with ESMTPSA" and the bytes arrive exactly."""
    fe = rig.fronts[front]
    body = message_body(f"sasl {front}", "sub.example")
    before = len(_sasl_logins(rig, "sub"))
    with fe.smtp() as s:
        _login(rig, s)
        assert s.mail("dave@sub.example", ["BODY=8BITMIME"])[0] == 250
        assert s.rcpt("r1@example.net") == (250, b"2.1.5 Ok")
        code, text = s.data(body)
        assert code == 250 and text.startswith(b"2.0.0 Ok: queued as "), text
    [m] = rig.sink.wait(1)
    _check(m, "dave@sub.example", ["r1@example.net"], body, "dave", b"ESMTPSA")
    logins = _sasl_logins(rig, "sub")[before:]
    # the cached connection of an earlier run of "on" may have served it
    assert logins in ([(FRONTS[front][1], SASL_NAME)], []) and (logins or front == "on"), logins


def test_sasl_implicit_tls_port(rig):
    body = message_body("smtps", "smtps.example")
    replies = _send(rig.fronts["off"], rig, "dave@smtps.example", "r@example.net", body)
    assert [c for c, _ in replies] == [250, 250, 250], replies
    [m] = rig.sink.wait(1)
    _check(m, "dave@smtps.example", ["r@example.net"], body, "dave", b"ESMTPSA")
    assert ("PLAIN", SASL_NAME) in _sasl_logins(rig, "smtps")


def test_no_auth_offered_without_tls_the_password_stays_home(rig):
    """A route without TLS to the port with smtpd_tls_auth_only: no AUTH is
    offered, so none is sent (the password never crosses in clear), the
    message goes on without it and Postfix's own 554 refusal reaches the
    client as it is."""
    before = len(rig.pf.lines(r"postfix/sub/smtpd\[\d+\]: disconnect from"))
    replies = _send(rig.fronts["off"], rig, "dave@subclear.example", "r@example.net", b"Subject: x\r\n\r\nx\r\n")
    assert replies == [(250, b"2.1.0 Ok"),
                       (554, b"5.7.1 <r@example.net>: Recipient address rejected: Access denied")], replies
    _wait_for(lambda: len(rig.pf.lines(r"postfix/sub/smtpd\[\d+\]: disconnect from")) > before)
    last = rig.pf.lines(r"postfix/sub/smtpd\[\d+\]: disconnect from")[-1]
    assert "auth=" not in last and "starttls=" not in last, last
    assert "no AUTH" in rig.fronts["off"].log() or "without AUTH" in rig.fronts["off"].log(), \
        rig.fronts["off"].log()[-1500:]
    rig.sink.nothing_more(0, 0.3)


def test_wrong_password_one_failure_at_cyrus_then_remembered(rig):
    """Cyrus refuses (535 5.7.8): the client gets 454, Postfix logs one
    SASL failure; the next session is answered 454 "failed lately" without
    a second try, and no password reaches a log."""
    fe = rig.fronts["off"]
    pattern = r"postfix/sub/smtpd\[\d+\]: warning: unknown\[127\.0\.0\.1\]: SASL PLAIN authentication failed"
    for n in range(2):
        replies = _send(fe, rig, "dave@subbad.example", "r@example.net", b"Subject: x\r\n\r\nx\r\n")
        assert replies[0][0] == 454 and replies[0][1].startswith(b"4.7.0 Login at the upstream server failed")
        if n == 1:
            assert b"lately" in replies[0][1], replies
    _wait_for(lambda: rig.pf.lines(pattern), what=lambda: rig.pf.log()[-2000:])
    time.sleep(0.3)
    assert len(rig.pf.lines(pattern)) == 1, rig.pf.lines(pattern)
    assert re.search(r"PLAIN: 535 5\.7\.8", fe.log()), fe.log()[-1500:]
    for text in (fe.log(), rig.daemon.log(), rig.pf.log()):
        assert WRONG_PASS not in text and UP_PASS not in text


# ------------------------------------------------------------------ anvil limits


def test_connection_count_limit_of_one_two_identities_through_the_cache(rig):
    """smtpd_client_connection_count_limit = 1: the first identity's
    connection stays in the cache, the second identity's greeting is 421;
    the idle one is given back and the second message goes through."""
    fe = rig.fronts["on"]
    for n, sender in enumerate(("dave@count.example", "dave@count2.example")):
        body = b"Subject: count %d\r\n\r\nbody\r\n" % n
        replies = _send(fe, rig, sender, f"c{n}@example.net", body)
        assert [c for c, _ in replies] == [250, 250, 250], (n, replies, fe.log()[-1500:])
    msgs = sorted(rig.sink.wait(2), key=lambda m: m.rcpt_tos)
    assert [m.mail_from for m in msgs] == ["dave@count.example", "dave@count2.example"]
    assert rig.pf.lines(r"postfix/count/smtpd\[\d+\]: warning: Connection concurrency limit exceeded"), \
        rig.pf.log()[-2000:]
    assert "idle ones to it were kept: those closed, connecting again" in fe.log()


def test_connection_rate_limit_cache_spares_it_then_421_is_451(rig):
    """smtpd_client_connection_rate_limit = RATE a minute: through the
    cache, 2 * RATE sessions cost one connection; without it, the
    connection after RATE gets Postfix's 421, which the client sees as a
    temporary failure (never 5xx) while its session goes on."""
    for n in range(2 * RATE):
        replies = _send(rig.fronts["on"], rig, "dave@rate.example", f"on{n}@example.net", b"Subject: r\r\n\r\nx\r\n")
        assert [c for c, _ in replies] == [250, 250, 250], (n, replies)
    assert len(rig.pf.lines(r"postfix/rate/smtpd\[\d+\]: connect from")) == 1
    refused = None
    for n in range(RATE):
        with rig.fronts["off"].smtp() as s:
            _login(rig, s)
            code, text = s.mail("dave@rate.example")
            if code != 250:
                refused = (n, code, text)
                assert s.noop()[0] == 250
                break
            assert s.rcpt(f"off{n}@example.net")[0] == 250 and s.data(b"Subject: r\r\n\r\nx\r\n")[0] == 250
    assert refused is not None and refused[0] == RATE - 1, refused
    assert refused[1:] == NOT_READY, refused
    # (Postfix's log reaches the file through postlogd, after the 421 reached us)
    _wait_for(lambda: rig.pf.lines(r"postfix/rate/smtpd\[\d+\]: warning: Connection rate limit exceeded"),
              what=lambda: rig.pf.log()[-2000:])
    assert "421 4.7.0 pfx.test Error: too many connections from 127.0.0.1" in rig.fronts["off"].log()
    rig.sink.wait(2 * RATE + RATE - 1)


def test_message_rate_limit_450_is_passed_on_and_the_session_goes_on(rig):
    """smtpd_client_message_rate_limit: every user's mail counts for one
    client; past the limit the MAIL gets Postfix's 450 4.7.1, as it is."""
    fe = rig.fronts["on"]
    users = ["alice", "bob", "carol", "dave"]
    with fe.smtp() as s:
        _login(rig, s)
        for n in range(RATE):
            assert s.sendmail("dave@msg.example", [f"m{n}@example.net"], b"Subject: m\r\n\r\nx\r\n") == {}
    for user in users:
        replies = _send(fe, rig, f"{user}@msg.example", "late@example.net", b"Subject: m\r\n\r\nx\r\n", user)
        assert replies == [(450, b"4.7.1 Error: too much mail from 127.0.0.1")], replies
    rig.sink.wait(RATE)
    rig.sink.nothing_more(RATE, 0.3)


def test_auth_rate_limit_is_temporary_and_not_remembered(rig):
    """smtpd_client_auth_rate_limit: the cache needs one AUTH for many
    sessions; without it the AUTH past the limit gets 450 4.7.1, the client
    a 454 (temporary), and since it is not a refused password the next
    session tries again (it is not the "failed lately" memory)."""
    for n in range(4):
        replies = _send(rig.fronts["on"], rig, "dave@authrate.example", f"a{n}@example.net", b"Subject: a\r\n\r\nx\r\n")
        assert [c for c, _ in replies] == [250, 250, 250], replies
    assert len(rig.pf.lines(r"postfix/authrate/smtpd\[\d+\]: connect from")) == 1
    fe = rig.fronts["off"]
    got = [_send(fe, rig, "dave@authrate.example", f"b{n}@example.net", b"Subject: a\r\n\r\nx\r\n")
           for n in range(3)]
    assert [c for c, _ in got[0]] == [250, 250, 250], got
    assert got[1] == got[2] == [(454, b"4.7.0 Login at the upstream server failed")], got
    # (Postfix's log reaches the file through postlogd, after the reply reached us)
    _wait_for(lambda: len(rig.pf.lines(r"warning: AUTH command rate limit exceeded")) >= 2,
              what=lambda: rig.pf.log()[-2000:])
    assert len(rig.pf.lines(r"warning: AUTH command rate limit exceeded")) == 2
    assert re.search(r"PLAIN: 450 4\.7\.1", fe.log()), fe.log()[-1500:]


def test_postfix_error_count_is_not_carried_from_one_session_to_the_next(rig):
    """Postfix counts a client's errors per connection until it accepts a
    message, and past smtpd_soft_error_limit (10 by default; 1 here) it
    sleeps smtpd_error_sleep_time (1 s) before every reply; at
    smtpd_hard_error_limit it says 421. Directly, a client's errors stay in
    its own connection. Through the cache (one route, one connection for
    every user) they were carried on: after one user's refused recipient
    every later session on that connection, whoever's, waited 1 s for each
    reply (and past the hard limit lost the connection).

    Failed before the fix (also with the 4xx-only rule of the postscreen
    fix): the second and third sessions took 2-3 s. Now a connection that
    refused something is not reused."""
    fe = rig.fronts["on"]
    connects = len(rig.pf.lines(r"postfix/errs/smtpd\[\d+\]: connect from"))
    for user in ("dave", "alice", "bob"):
        with fe.smtp() as s:
            _login(rig, s, user)
            t0 = time.monotonic()
            assert s.mail(f"{user}@errs.example") == (250, b"2.1.0 Ok")
            assert s.rcpt(REFUSED) == (550, f"5.1.1 <{REFUSED}>: Recipient address rejected: no such user here".encode())
            took = time.monotonic() - t0
            assert s.rset()[0] == 250  # (this one waits 1 s: Postfix's own, as directly)
        # (carried errors cost 1 s a reply, >= 2 s here: bound 1.8 s, was
        # 0.8 s, tight for a fresh Postfix connection on a loaded machine)
        assert took < 1.8, (user, took)
    t0 = time.monotonic()
    replies = _send(fe, rig, "carol@errs.example", "ok@example.net", b"Subject: e\r\n\r\nx\r\n", "carol")
    assert [c for c, _ in replies] == [250, 250, 250] and time.monotonic() - t0 < 2.7, replies
    rig.sink.wait(1)
    # a fresh connection after each refusal; none slowed down
    _wait_for(lambda: len(rig.pf.lines(r"postfix/errs/smtpd\[\d+\]: connect from")) - connects >= 4,
              what=lambda: rig.pf.log()[-2000:])  # (postlogd: the log lags the replies)
    assert len(rig.pf.lines(r"postfix/errs/smtpd\[\d+\]: connect from")) - connects == 4
    assert not rig.pf.lines("too many errors")


def test_new_tls_session_rate_limit_spared_by_resumption(rig):
    """smtpd_client_new_tls_session_rate_limit (RATE a minute) counts only
    handshakes that resumed no session. Without the cache every message is
    a new connection and STARTTLS, but we offer the last TLS session back:
    2 * RATE messages all go (one full handshake), and the limit is still
    there for clients that do not resume (smtplib): refused at the latest
    on its RATE + 1st new session."""
    fe = rig.fronts["off"]
    for n in range(2 * RATE):
        replies = _send(fe, rig, "dave@tlsrate.example", f"t{n}@example.net", b"Subject: t\r\n\r\nx\r\n")
        assert [c for c, _ in replies] == [250, 250, 250], (n, replies)
    _wait_for(lambda: len(rig.pf.lines(r"postfix/tlsrate/smtpd\[\d+\]: Anonymous TLS connection established"))
              >= 2 * RATE, what=lambda: rig.pf.log()[-2000:])  # (postlogd: the log lags the replies)
    assert len(rig.pf.lines(r"postfix/tlsrate/smtpd\[\d+\]: Anonymous TLS connection established")) == 2 * RATE
    assert not rig.pf.lines("too many new TLS sessions")
    refused = None
    for k in range(RATE + 1):
        try:
            with smtplib.SMTP("127.0.0.1", rig.pf.ports["tlsrate"], local_hostname="direct.test", timeout=10) as s:
                s.starttls(context=rig.world.ssl_context())
                s.ehlo()
        except smtplib.SMTPResponseException as e:
            refused = (k, e.smtp_code, e.smtp_error)
            break
    # (454 to STARTTLS, or 421 right after the handshake: anvil's count may lag)
    assert refused is not None and refused[1] in (421, 454), refused
    assert b"Error: too many new TLS sessions from unknown[127.0.0.1]" in refused[2], refused
    rig.sink.wait(2 * RATE)


# ------------------------------------------------------------------ smtp-sink faults


def _dump_fields(dump: bytes) -> dict[str, str]:
    return dict(re.findall(rb"^(X-[\w-]+): ([^\n]*)\n", dump, re.M))


@pytest.fixture
def sinks(rig):
    def start(name: str) -> SmtpSink:
        return SmtpSink(rig.tmp / f"dump-{name}-{time.monotonic_ns()}", rig.sink_ports[name], SINK_OPTIONS[name])
    return start


def _good_after(rig, s, good: SmtpSink) -> None:
    """The session goes on: a message to the good sink is delivered."""
    assert s.noop()[0] == 250
    assert s.rset()[0] == 250  # (a MAIL accepted before the fault is still open)
    assert s.sendmail("dave@good.sink.example", ["after@example.net"], b"Subject: after\r\n\r\nafter\r\n") == {}
    _wait_for(lambda: good.received(), 5)


CASES = {
    # name: (the step the fault hits, its reply to the client)
    "r-mail": ("mail", (450, b"4.3.0 Error: command failed")),
    "f-rcpt": ("rcpt", (500, b"5.3.0 Error: command failed")),
    "r-dot": ("dot", (450, b"4.3.0 Error: command failed")),
    "f-dot": ("dot", (500, b"5.3.0 Error: command failed")),
    "cut-rcpt": ("rcpt", LOST),
    "cut-dot": ("dot", LOST),
    "421-data": ("data", (451, b"4.0.0 Server closing connection")),
    "421-connect": ("mail", NOT_READY),
    "cut-connect": ("mail", LOST),
    # 550 right behind the 354 (usually in the same read: see
    # test_a_refusal_in_the_same_read_as_the_354_keeps_its_class)
    "A-0": ("data", (550, b"5.0.0 This violates SMTP")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_smtp_sink_faults_reach_the_client_as_their_class(rig, sinks, case):
    """Each fault of smtp-sink reaches the client at the step it hits, with
    its class kept (4xx stays 4xx, 5xx stays 5xx; a hang-up is 451), never
    a 250 for a message the sink did not take; the session goes on and
    the log has no traceback."""
    step, (code, text) = CASES[case]
    fe = rig.fronts["on"]
    sender = f"dave@{case}.sink.example"
    with sinks(case) as bad, sinks("good") as good, fe.smtp() as s:
        _login(rig, s)
        got = {}
        got["mail"] = s.mail(sender)
        if got["mail"][0] == 250:
            got["rcpt"] = s.rcpt("r@example.net")
        if got.get("rcpt", (0,))[0] == 250:
            got["data"] = s.docmd("DATA")
        if got.get("data", (0,))[0] == 354:
            s.send(b"Subject: fault\r\n\r\nbody\r\n.\r\n")
            got["dot"] = s.getreply()
        assert list(got)[-1] == step or (case == "A-0" and list(got)[-1] == "dot"), got
        step = list(got)[-1]
        assert got[step][0] == code, got
        if text is not None:
            assert got[step][1] == text, got
        if step != "dot":
            assert all(c == 250 or (k == "data" and c == 354) for k, (c, _) in got.items() if k != step), got
        _good_after(rig, s, good)
        if step == "dot" and case != "A-0":
            assert len(bad.received()) in (0, 1)  # smtp-sink may dump what it then refused
    log = fe.log()
    assert "Traceback" not in log and "internal error" not in log
    lines = [ln for ln in log.splitlines() if f"from=<{sender}>" in ln and " message " in ln]
    assert not any("upstream=250" in ln for ln in lines), lines
    if step != "rcpt":  # (a transaction the client gave up before DATA is no message)
        assert len(lines) == 1, log[-2000:]


def test_smtp_sink_without_esmtp_helo_and_exact_bytes(rig, sinks):
    """smtp-sink -e answers EHLO 500: we fall back to HELO (with our
    localname) and the message arrives exactly, ours first."""
    body = b"Subject: helo\r\n\r\nline\r\n..dot\r\n"
    with sinks("e") as sink, rig.fronts["on"].smtp() as s:
        _login(rig, s)
        assert s.sendmail("dave@e.sink.example", ["h@example.net"], body) == {}
        _wait_for(lambda: sink.received(), 5)
    [dump] = sink.received()
    fields = _dump_fields(dump)
    assert fields[b"X-Helo-Args"] == b"mx.test" and fields[b"X-Client-Proto"] == b"SMTP", fields
    assert fields[b"X-Mail-Args"] == b"<dave@e.sink.example>", fields
    assert fields[b"X-Rcpt-Args"] == b"<h@example.net>", fields
    assert re.search(rb"\nReceived: from client\.test \(\[127\.0\.0\.1\]\)\n\tby mx\.test \(sendooway\) "
                     rb"with ESMTPSA id [^\n]+\n\t[^\n]+\nSubject: helo\n\nline\n\.\.dot\n", dump), dump
    # (smtp-sink dumps the data as it came: dot-stuffed)


def test_smtp_sink_slower_than_our_timeout_at_data(rig, sinks):
    """smtp-sink -w 4 waits longer than our `timeout` (2 s) before it
    answers DATA: 451 4.4.2, the session goes on, nothing was accepted."""
    fe = rig.fronts["slow"]
    with sinks("w-data") as sink, sinks("good") as good, fe.smtp() as s:
        _login(rig, s)
        assert s.mail("dave@w-data.sink.example")[0] == 250
        assert s.rcpt("w@example.net")[0] == 250
        t0 = time.monotonic()
        code, text = s.docmd("DATA")
        assert (code, text) == (451, b"4.4.2 Upstream server timed out, try again later"), (code, text)
        assert SLOW_TIMEOUT - 0.5 < time.monotonic() - t0 < SLOW_TIMEOUT + 2
        _good_after(rig, s, good)
        assert b"Subject" not in b"".join(sink.received())
    assert "Traceback" not in fe.log()


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("refusal", [b"550 5.7.1 no, not this one", b"451 4.3.0 not now"])
def test_a_refusal_in_the_same_read_as_the_354_keeps_its_class(monkeypatch, refusal, pipelined):
    """DEFECT (found with smtp-sink -A 0, which answers DATA 354 and then at
    once 550 without reading the message): the refusal came in the same
    read as the 354 and was taken for reply text beyond DATA's, so the
    client got "451 4.5.0 Upstream server answered nonsense": a permanent
    refusal turned temporary (the client retries for days), where the same
    refusal a moment later, during the message, reaches it as a 5xx. A
    client's pipelined MAIL, RCPT, DATA fared worse: all three got 451.
    Deterministic with a scripted upstream writing both at once. Fixed:
    such a surplus is read; a 4xx/5xx is the answer to DATA, its class
    kept, the connection dropped, nothing of the message sent."""
    from .scripted_relay import LOGIN, careful, codes, converse

    async def data(up, c):
        await c.send(b"354 go ahead\r\n" + refusal + b"\r\n")
        return False  # and reads no more

    transaction = [b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<r@d.e>\r\n", b"DATA\r\n"]
    steps = [LOGIN + b"".join(transaction)] if pipelined else [LOGIN, *transaction]
    out, up, log = converse(monkeypatch, lambda up, c: careful(up, c, data=data),
                            [*steps, b"RSET\r\nNOOP\r\nQUIT\r\n"])
    assert codes(out) == [220, 250, 235, 250, 250, int(refusal[:3]), 250, 250, 221], out
    assert b"\r\n" + refusal + b"\r\n" in out, out
    assert b"354" not in out and up.messages == []
    assert "nonsense" not in log and "more than its replies" not in log, log


@pytest.mark.parametrize("case", ["t-1", "421-rset", "cut-rset"])
def test_smtp_sink_dropping_a_kept_connection(rig, sinks, case):
    """The cached connection is gone when the next session comes: smtp-sink
    -t 1 closed it after 1 s idle without a word; -Q RSET / -q RSET close
    it at our probe (RSET, pipelined with the MAIL: smtp-sink offers
    PIPELINING), with a 421 or without. The next message goes through a
    fresh connection, transparently, and the client never sees a failure."""
    fe = rig.fronts["on"]
    sender = f"dave@{case}.sink.example"
    with sinks(case) as sink:
        for n in range(2):
            body = b"Subject: kept %d\r\n\r\nbody\r\n" % n
            replies = _send(fe, rig, sender, f"k{n}@example.net", body)
            assert [c for c, _ in replies] == [250, 250, 250], (n, replies, fe.log()[-1500:])
            _wait_for(lambda: len(sink.received()) > n, 5)
            if n == 0 and case == "t-1":
                # smtp-sink's 1 s idle timer has struck (a loaded machine's
                # timers may run late: 1.5 s of room, was 0.6 s)
                time.sleep(2.5)
        assert [re.search(rb"Subject: kept (\d)", d).group(1) for d in sink.received()] == [b"0", b"1"]
    assert re.search(r"(cached|kept) connection (went stale|closing)", fe.log()), fe.log()[-1500:]


def test_zz_logs_clean(rig):
    """Last: no password, no traceback in any log of the module."""
    logs = "".join(fe.log() for fe in rig.fronts.values()) + rig.daemon.log()
    assert logs
    for secret in (UP_PASS, WRONG_PASS, *(u.password for u in rig.world.users.values())):
        assert secret not in logs
        assert base64.b64encode(f"\0{UP_USER}\0{secret}".encode()).decode() not in logs
    assert "Traceback" not in logs and "internal error" not in logs
