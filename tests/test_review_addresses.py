"""Adversarial review of addresses, names and IPv6 end to end: `sendooway -b`
on IPv6 and its bind options, upstream server names (IPv6-only, several
addresses, internationalized, malformed), the route chosen for a sender's
spelling, and how an IPv6 upstream is shown to the admin. Real parts only:
a `sendooway-auth` daemon, `sendooway -b [::1]:PORT` as a subprocess (host
names from an nss_wrapper hosts file), aiosmtpd upstreams on loopback and
smtplib as the client. Each test below failed on the code as reviewed, for
the reason its docstring gives.
All are fixed."""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from tests.auth_helpers import Daemon
from tests.fakeworld import free_port
from tests.front_util import FRONT, Frontend, front_config, open_tmp
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")

AUTH = [sys.executable, "-m", "sendooway_auth.cli"]
V6_PW = "v6-Up-Secret-93"
BODY = b"Subject: review\r\n\r\nhello\r\n"


class AddrWorld:
    """Upstreams, a daemon and `sendooway -b [::1]:PORT` sharing one config."""

    def __init__(self, world, tmp) -> None:
        self.world = world
        self.tmp = tmp
        self.ups: dict[str, FakeUpstream] = {}

    def up(self, name: str, **kw) -> FakeUpstream:
        u = FakeUpstream(self.world, **kw).start()
        self.ups[name] = u
        return u


@pytest.fixture(scope="module")
def aw(world):
    with open_tmp() as tmp:
        w = AddrWorld(world, tmp)
        exact = w.up("exact", tls="plain")
        domain = w.up("domain", tls="plain")
        # Two upstreams on one port: the IDNA 2008 A-label of straße.test
        # (xn--strae-oqa.test) is ::1, its IDNA 2003 mapping strasse.test is
        # 127.0.0.1. Which one receives the message tells how it was looked up.
        for _ in range(20):  # (the port free on ::1 may be taken on 127.0.0.1: try another)
            idn_right = w.up("idn-right", tls="plain", host="::1")
            try:
                w.up("idn-wrong", tls="plain", host="127.0.0.1", port=idn_right.port)
                break
            except OSError:
                idn_right.stop()
        else:
            raise AssertionError("no port free on both ::1 and 127.0.0.1")
        v6 = w.up("v6", tls="starttls", host="::1", accounts={"v6-user": V6_PW})
        hosts = tmp / "hosts"
        hosts.write_text("::1 xn--strae-oqa.test\n127.0.0.1 strasse.test\n")
        os.chmod(hosts, 0o644)
        w.hosts = str(hosts)
        w.unused_port = free_port()
        extra = (
            f"sslCA = {world.ca_file}\n"
            f"smarthostMapping = direct:alice@exact.example 127.0.0.1 {exact.port} noAuth\n"
            f"smarthostMapping = direct:*@exact.example 127.0.0.1 {domain.port} noAuth\n"
            f"smarthostMapping = direct:*@idn.example straße.test {idn_right.port} noAuth\n"
                f"smarthostMapping = direct:*@nowhere.example nosuchhost.invalid {w.unused_port} noAuth\n"
            f"smarthostMapping = direct:*@v6.example ::1 {v6.port} v6-user {V6_PW} tls\n"
        )
        w.config = front_config(tmp, world, extra)
        w.daemon = Daemon(tmp, w.config).start()
        env = world.env()
        env["NSS_WRAPPER_HOSTS"] = w.hosts
        w.env = env
        w.front = Frontend(w.config, os.path.join(str(tmp), "front.log"), host="::1", env=env).start()
        try:
            yield w
        finally:
            w.front.stop()
            w.daemon.stop()
            for u in w.ups.values():
                u.stop()


@pytest.fixture(autouse=True)
def _clear(aw):
    for u in aw.ups.values():
        u.messages.clear()
    yield


def _session(aw) -> smtplib.SMTP:
    s = aw.front.smtp(timeout=15)
    s.starttls(context=aw.world.ssl_context())
    s.ehlo()
    s.login("alice", aw.world.users["alice"].password)
    return s


def _send(aw, sender: str) -> dict:
    with _session(aw) as s:
        return s.sendmail(sender, ["rcpt@example.net"], BODY)


def test_quoted_local_part_takes_the_route_of_the_same_mailbox(aw):
    """DEFECT (rule: RFC 5322 3.2.4 "quoted-string is identical to atom,
    semantically" and 3.4.1, RFC 5321 4.1.2 (a quoted local part that needs
    no quoting names the same mailbox); DESIGN.md Configuration: the route is
    picked by the envelope sender, an exact ADDRESS beating `*@domain`):
    `MAIL FROM:<"alice"@exact.example>` is the mailbox alice@exact.example,
    which has an exact mapping of its own. Now the route lookup compares the
    local part with its quotes (sendooway_auth/_address.py `_split`), misses
    the exact mapping and relays through the `*@exact.example` account: the
    message leaves by another upstream and another login (the test upstream,
    like any RFC parser, records the sender as alice@exact.example). Correct:
    the local part is compared in its canonical form (quotes and
    quoted-pair backslashes removed where the content is a dot-string), so the
    exact route serves it."""
    assert _send(aw, '"alice"@exact.example') == {}
    got = {name: [m.mail_from for m in u.messages] for name, u in aw.ups.items() if u.messages}
    assert got == {"exact": ["alice@exact.example"]}, got


def test_internationalized_server_name_is_resolved_by_its_idna2008_name(aw):
    """DEFECT (rule: RFC 5890/5891 (IDNA 2008) and UTS #46 non-transitional
    processing, the rules the project itself applies to domains
    (docs/decisions/auth.md "Route choice": domains compare as IDNA 2008
    A-labels); DESIGN.md: the frontend relays to "the upstream smarthost
    chosen"): a route whose server is written `straße.test` is looked up by
    Python's built-in IDNA 2003 codec (`socket.getaddrinfo` in
    sendooway_front/_stream.py `open_tcp`, and the SNI in _tls.py
    `client_connection` uses `.encode("idna")` too), which maps ß to "ss":
    the frontend connects to strasse.test, a different host (here another
    upstream that takes the message), instead of xn--strae-oqa.test. Correct:
    the name is converted with IDNA 2008 (the `idna` package the
    authenticator already uses), so straße.test means xn--strae-oqa.test
    for the lookup, SNI and the certificate check alike."""
    assert _send(aw, "someone@idn.example") == {}
    assert [m.mail_from for m in aw.ups["idn-right"].messages] == ["someone@idn.example"]
    assert aw.ups["idn-wrong"].messages == []


def test_malformed_server_name_is_a_clean_unreachable_not_a_traceback(aw):
    """DEFECT (rule: DESIGN.md SMTP behaviour "upstream unreachable ... →
    451/421 (temporary)" with docs/decisions/relay.md "Local replies:
    unreachable 451 4.4.1 ... detail in the log", and the review brief's "never
    a traceback"): a server name with an empty label (a typo such as
    `smtp..example.org`, or a leading dot, or a label over 63 octets) makes
    `socket.getaddrinfo` raise UnicodeError from Python's idna codec, which
    `open_tcp` (sendooway_front/_stream.py) does not catch (only gaierror and
    timeouts). The client gets the catch-all "451 4.3.0 Relay failed" and the
    frontend's log a 40-line traceback ("relay failed"), with no message line
    naming the route. Correct: the same as any name that does not resolve —
    451 4.4.1 with one log line naming the server (and ideally --check
    flagging the name at its file:line)."""
    # (fixed twice over: such a direct: server is now a file:line error in the
    # config, and a name that still reaches the frontend is a clean 4.4.1)
    import asyncio

    from sendooway_front._stream import ConnectError, open_tcp
    from sendooway_shared.config import parse_direct

    with pytest.raises(ValueError, match="not a valid host name"):
        parse_direct(f"*@typo.example smtp..example.org {aw.unused_port} noAuth")
    with pytest.raises(ConnectError, match="not a valid host name"):
        asyncio.run(open_tcp("smtp..example.org", aw.unused_port, 5))
    with _session(aw) as s:
        code, text = s.docmd("MAIL FROM:<someone@nowhere.example>")
        assert code == 451 and text.startswith(b"4.4.1"), (code, text)  # the reference behaviour
    log = aw.front.log()
    assert "Traceback" not in log, log[-3000:]


def test_check_shows_an_ipv6_server_with_brackets(aw):
    """DEFECT (rule: DESIGN.md "`sendooway-auth --check USER [--sender ADDR]`:
    the admin's report", STYLE.md "Errors carry context a user can act on";
    RFC 3986 3.2.2 / RFC 5952 6: an IPv6 address with a port is written
    [addr]:port, since addr:port is ambiguous): for a route to the IPv6
    server ::1 on port N, --check (and every log line built from
    shared/types.py `Route.describe`, and the relay's `route=` field) prints
    `::1:N`, which is itself a valid IPv6 address (0:0:0:0:0:0:1:N): the
    admin cannot tell host from port. The frontend's own connect errors
    already write `[::1]:N`. Correct: `[::1]:N` wherever a server and port
    are shown together."""
    port = aw.ups["v6"].port
    r = subprocess.run([*AUTH, "-c", aw.config, "--check", "alice", "--sender", "a@v6.example"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("route for a@v6.example:")]
    assert line, r.stdout
    assert V6_PW not in r.stdout
    assert f"[::1]:{port}" in line[0], line[0]


def test_second_bind_option_is_not_silently_dropped(aw):
    """DEFECT (rule: what a careful admin expects from DESIGN.md "with -b a
    listening server" — e.g. `-b 127.0.0.1:587 -b [::1]:587` to serve
    loopback on both families, where `localhost` resolves to 127.0.0.1 only
    as on this machine; the review brief: clear errors, never a silent
    misconfiguration): `-b` is a plain argparse option
    (sendooway_front/cli.py `build_parser`), so with two of them the last one
    wins and the first address is silently not listened on: the frontend
    starts, logs "listening on [::1]:P2" and nothing answers on 127.0.0.1:P1.
    Correct: listen on every -b given (append), or refuse the second one with
    a usage error (exit 2) naming -b."""
    p1, p2 = free_port("127.0.0.1"), free_port("::1")
    log = os.path.join(str(aw.tmp), "twobinds.log")
    proc = subprocess.Popen([FRONT, "-c", aw.config, "-l", log, "-b", f"127.0.0.1:{p1}",
                             "-b", f"[::1]:{p2}"], env=aw.world.env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        listening = {}
        while time.monotonic() < deadline and proc.poll() is None:
            for host, port in (("127.0.0.1", p1), ("::1", p2)):
                fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(fam) as s:
                    listening[host] = s.connect_ex((host, port)) == 0
            if listening.get("::1") or listening.get("127.0.0.1"):
                time.sleep(0.3)  # both sockets are bound before serving starts
                for host, port in (("127.0.0.1", p1), ("::1", p2)):
                    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                    with socket.socket(fam) as s:
                        listening[host] = s.connect_ex((host, port)) == 0
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            err = proc.stderr.read().decode()
            assert proc.returncode == 2 and "-b" in err, (proc.returncode, err)
        else:
            assert listening == {"127.0.0.1": True, "::1": True}, listening
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in (proc.stdout, proc.stderr):
            f.close()
