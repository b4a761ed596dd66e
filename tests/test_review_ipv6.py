"""Review from a mail admin's seat on a dual-stack or IPv6-only server:
clients and upstreams over IPv6 and everything that depends on addresses
(logs, the authenticator's backoff keys, fail2ban, the shipped xinetd
blocks). Real processes only: a `sendooway-auth` daemon, `sendooway -b
[::1]:PORT`, xinetd, aiosmtpd upstreams on loopback, smtplib as the client,
host names from an nss_wrapper hosts file. Each test failed on the code as
reviewed, for the reason its docstring gives."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess

import pytest
import trustme

from tests import deploy_world as dw
from tests.auth_helpers import Daemon, login
from tests.deploy_world import deployment, upstream  # noqa: F401 - fixtures
from tests.fakeworld import MACHINE_SKIP, free_port
from tests.front_util import FRONT, Frontend, front_config, open_tmp, wait_port
from tests.test_deploy_auth import _fail2ban_regex
from tests.test_deploy_front import _start_xinetd, _xinetd_block, _xinetd_config
from tests.test_deploy_haproxy import HAPROXY, HAPROXY_DEFAULTS
from tests.test_review_addresses import _session  # (a fixture with .front and .world)
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_v6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason=MACHINE_SKIP + "no ::1 (IPv6 loopback)")
BODY = b"Subject: ipv6 review\r\n\r\nhello\r\n"


UP_PW = "v6-upstream-Secret-41"


class SniRecorder(FakeUpstream):
    """An upstream that notes the server name each TLS client asked for."""

    def _server_context(self):
        ctx = super()._server_context()
        self.sni: list[str | None] = []
        ctx.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        return ctx


class V6World:
    """A daemon, `sendooway -b [::1]:PORT` and upstreams, one config."""


@pytest.fixture(scope="module")
def v6(world):
    if not _has_ipv6_loopback():
        pytest.skip(MACHINE_SKIP + "no ::1 (IPv6 loopback)")
    with open_tmp() as tmp:
        w = V6World()
        w.world = world
        # dual.test resolves to ::1 first, then 127.0.0.1; the upstream
        # listens on 127.0.0.1 only, and [::1] on its port refuses
        for _ in range(20):  # (the port free on 127.0.0.1 may be taken on ::1: another)
            w.up4 = FakeUpstream(world, tls="plain").start()
            w.v6_refuser = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            w.v6_refuser.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                w.v6_refuser.bind(("::1", w.up4.port))  # bound, never listening: refused
                break
            except OSError:
                w.v6_refuser.close()
                w.up4.stop()
        else:
            raise AssertionError("no port free on both 127.0.0.1 and ::1")
        # implicit TLS on [::1] from a CA of the test's own: a certificate
        # for the IP address ::1, and one for the name localhost only
        ca = trustme.CA()
        for name, identity in (("ip", "::1"), ("name", "localhost")):
            leaf = ca.issue_cert(identity)
            leaf.private_key_pem.write_to_path(str(tmp / f"{name}.key"))
            leaf.cert_chain_pems[0].write_to_path(str(tmp / f"{name}.pem"))
        bundle = tmp / "ca-bundle.pem"
        bundle.write_bytes(open(world.ca_file, "rb").read() + ca.cert_pem.bytes())
        w.ip_cert = SniRecorder(world, tls="tls", host="::1", accounts={"u6": UP_PW},
                                cert_file=str(tmp / "ip.pem"), key_file=str(tmp / "ip.key")).start()
        w.name_cert = SniRecorder(world, tls="tls", host="::1", accounts={"u6": UP_PW},
                                  cert_file=str(tmp / "name.pem"),
                                  key_file=str(tmp / "name.key")).start()
        hosts = tmp / "hosts"
        hosts.write_text("::1 dual.test\n127.0.0.1 dual.test\n")
        os.chmod(hosts, 0o644)
        extra = (f"sslCA = {bundle}\naddReceivedField = yes\ncloneEhlo = yes\n"
                 f"smarthostMapping = direct:*@dual.example dual.test {w.up4.port} noAuth\n"
                 f"smarthostMapping = direct:*@ip.example [::1] {w.ip_cert.port} u6 {UP_PW} ssl\n"
                 f"smarthostMapping = direct:*@name.example ::1 {w.name_cert.port} u6 {UP_PW} ssl\n")
        w.config = front_config(tmp, world, extra)
        env = world.env()
        env["NSS_WRAPPER_HOSTS"] = str(hosts)
        w.daemon = Daemon(tmp, w.config, env=env).start()
        w.front = Frontend(w.config, str(tmp / "front.log"), host="::1", env=env).start()
        try:
            yield w
        finally:
            w.front.stop()
            w.daemon.stop()
            for up in (w.up4, w.ip_cert, w.name_cert):
                up.stop()
            w.v6_refuser.close()


def test_an_upstream_address_that_failed_before_the_one_that_answered_is_logged(v6):
    """DEFECT (rule: docs/decisions/relay.md "every address getaddrinfo
    returns (IPv6 and IPv4 ...) one after the other"; an admin needs to see
    a broken IPv6 path to the smarthost: a black-holed address costs every
    new upstream connection 10 s). The smarthost's name resolves to ::1 and
    127.0.0.1; [::1] refuses, 127.0.0.1 takes the message. The fallback
    worked but the log said nothing of [::1]: only the error after every
    address had failed named them."""
    with _session(v6) as s:
        assert s.sendmail("alice@dual.example", ["rcpt@example.net"], BODY) == {}
    assert len(v6.up4.messages) == 1
    log = dw.wait_for(lambda: "message user=alice" in v6.front.log() and v6.front.log(),
                      what="the message line")
    lines = [l for l in log.splitlines() if f"[::1]:{v6.up4.port}" in l]
    assert lines, log
    assert "Connection refused" in lines[0] and f"127.0.0.1:{v6.up4.port}" in lines[0], lines
    assert f"dual.test:{v6.up4.port}" in lines[0], lines


def test_an_upstream_address_that_failed_is_tried_last_for_a_while(v6):
    """DEFECT (an admin's view of the warning above): every new upstream
    connection tried the dead [::1] first again — one warning per message,
    and a black-holed address costs each connection CONNECT_TRY (10 s). An
    address that failed goes after the server's others for FAILED_FOR
    seconds: two fresh connections (cloneEhlo = yes: another EHLO name is
    another kept connection) try [::1] at most once between them and this
    module's first test."""
    refused = f"[::1]:{v6.up4.port} Connection refused"
    for name in ("first.example", "second.example", "third.example"):
        with v6.front.smtp(timeout=15) as s:
            s.starttls(context=v6.world.ssl_context())
            s.ehlo(name)
            s.login("alice", v6.world.users["alice"].password)
            assert s.sendmail("alice@dual.example", ["rcpt@example.net"], BODY) == {}
    dw.wait_for(lambda: v6.front.log().count("message user=alice") >= 3, what="the message lines")
    greeted = {m.helo for m in v6.up4.messages}  # three connections, each greeted anew
    assert {"first.example", "second.example", "third.example"} <= greeted, greeted
    assert v6.front.log().count(refused) == 1, v6.front.log()


def test_failed_addresses_go_last_expire_and_are_never_skipped():
    from sendooway_front._stream import FAILED_FOR, FAILED_KEPT, FailedAddresses

    six, four = (10, 1, 6, ("::1", 25, 0, 0)), (2, 1, 6, ("127.0.0.1", 25))
    memory = FailedAddresses()
    assert memory.order([six, four], 0.0) == [six, four]
    memory.failed(six[3], 100.0)
    assert memory.order([six, four], 101.0) == [four, six]
    assert memory.order([six, four], 100.0 + FAILED_FOR + 1) == [six, four]  # forgotten
    memory.failed(four[3], 102.0)
    assert memory.order([six, four], 103.0) == [six, four]  # both failed: both tried
    memory.answered(four[3])
    assert memory.order([six, four], 104.0) == [four, six]
    for n in range(FAILED_KEPT + 10):
        memory.failed(("192.0.2.1", n), 200.0)
    assert len(memory._until) == FAILED_KEPT


def test_an_ipv6_client_named_by_its_address_literal(v6):
    """(Kept working.) A client from ::1 that says EHLO [IPv6:::1] (what
    msmtp and others send with no host name): cloneEhlo passes the literal
    upstream as it is, and Received: shows it with the connection's address
    in RFC 5321's form."""
    with smtplib.SMTP("::1", v6.front.port, local_hostname="[IPv6:::1]", timeout=20) as s:
        s.starttls(context=v6.world.ssl_context())
        s.ehlo()
        s.login("alice", v6.world.users["alice"].password)
        assert s.sendmail("alice@dual.example", ["rcpt@example.net"], BODY) == {}
    m = v6.up4.messages[-1]
    assert m.helo == "[IPv6:::1]", m.helo
    assert m.data.startswith(b"Received: from [IPv6:::1] ([IPv6:::1])\r\n"), m.data[:100]


# ------------------------------------------------------------ the authenticator's address keys


@pytest.fixture
def auth_daemon(world):
    with open_tmp() as tmp:
        d = Daemon(tmp, front_config(tmp, world), failure_delay=0.1).start()
        try:
            yield d
        finally:
            d.stop()


def _fail(d: Daemon, user: str, client: str, session: str) -> str:
    """One wrong password from `client`; the daemon's fail2ban line for it."""
    ch = d.connect()
    try:
        reply = login(ch, user, "not-the-password", client=client, session=session)
        assert reply.TYPE == "auth_fail", reply
    finally:
        ch.close()
    line = d.wait_log(f"session={session} ")
    return next(l for l in line.splitlines() if f"session={session} " in l and "auth failed" in l)


def _delay(line: str) -> float:
    return float(line.rsplit("delay=", 1)[1].split()[0])


def test_ipv4_clients_behind_the_well_known_nat64_prefix_each_have_their_own_backoff(auth_daemon):
    """DEFECT (rule: docs/decisions/auth.md "IPv4 addresses count one by
    one"). An IPv6-only server reaches IPv4 clients through a stateless
    translator (SIIT-DC, RFC 7755) or NAT64: each IPv4 client arrives as
    64:ff9b::a.b.c.d (RFC 6052's well-known prefix), all in one /64. The
    per-/64 key made every IPv4 client in the world one site: a guesser's
    failures slowed the next IPv4 user's first login. An address in
    64:ff9b::/96 now counts as the IPv4 address it carries; the log keeps
    the address the server saw (what its firewall bans)."""
    d = auth_daemon
    lines = [_fail(d, f"nosuch{i}", "64:ff9b::203.0.113.7", f"nat-a{i}") for i in range(4)]
    assert "client=64:ff9b::cb00:7107 " in lines[0], lines[0]
    assert [_delay(l) for l in lines] == [0.1, 0.2, 0.4, 0.8], lines  # the guesser's grows
    other = _fail(d, "nosuch-other", "64:ff9b::198.51.100.20", "nat-b")
    assert _delay(other) == 0.1, (other, lines)
    # the IPv4 address itself, reached natively on a dual-stack server, is
    # the same client as its translated form
    same = _fail(d, "nosuch-native", "203.0.113.7", "nat-c")
    assert _delay(same) > _delay(lines[0]), (same, lines)


def test_the_mapped_and_plain_forms_of_one_ipv4_address_count_as_one(auth_daemon):
    """(Kept working: a dual-stack socket shows an IPv4 client as
    ::ffff:a.b.c.d; the frontend and the daemon both take it for the IPv4
    address, in the backoff and in the fail2ban line.)"""
    d = auth_daemon
    first = _fail(d, "nosuch-m1", "::ffff:198.51.100.9", "map-1")
    second = _fail(d, "nosuch-m2", "198.51.100.9", "map-2")
    assert "client=198.51.100.9 " in first and "client=198.51.100.9 " in second, (first, second)
    assert _delay(second) > _delay(first), (first, second)


def test_a_link_local_client_is_logged_so_that_fail2ban_finds_it(auth_daemon, tmp_path):
    """DEFECT (rule: docs/deployment.md "packaging/fail2ban/filter.d/
    sendooway.conf matches [the failure lines]"; a careful admin expects
    every failed login's address to be bannable). A client on the server's
    own link may connect to its link-local address: the peer is then
    fe80::...%eth0, and the daemon wrote the zone into the fail2ban line
    (client=fe80::1%eth0), which fail2ban's <HOST> does not match: never
    banned. The line now holds the address alone (ip6tables bans it; the
    frontend's connect line keeps the zone)."""
    d = auth_daemon
    line = _fail(d, "nosuch-ll", "[fe80::1:2%eth0]:50123", "ll-1")
    assert "client=fe80::1:2 " in line, line
    if not shutil.which("fail2ban-regex"):
        pytest.skip("fail2ban not installed")
    log = tmp_path / "auth.log"
    log.write_text(line + "\n")
    r = _fail2ban_regex(log, tmp_path)
    assert r.stdout.split() == ["fe80::1:2"], r.stdout + r.stderr


# ------------------------------------------------------------ the shipped xinetd blocks


def _relay_from(world, host: str, port: int) -> None:
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=30) as client:
        client.starttls(context=world.ssl_context())
        client.ehlo("client.test")
        client.login("alice", world.users["alice"].password)
        assert client.sendmail(dw.SENDER, ["bob@example.net"], BODY) == {}


@needs_v6
def _free_dual_stack_port() -> int:
    """A port free for a dual-stack socket on [::], the one xinetd opens with
    `flags = IPv6` (one free on ::1 alone may be held on 127.0.0.1 by
    another test: xinetd then never listened, a CI run)."""
    with socket.socket(socket.AF_INET6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return s.getsockname()[1]


def test_the_shipped_xinetd_block_serves_ipv6_clients_too(world, upstream, deployment):
    """DEFECT (rule: a careful admin on a dual-stack or IPv6-only server
    expects the shipped /etc/xinetd.d/sendooway to take the submission
    port's clients whatever their address family). xinetd opens an IPv4
    socket unless a block says `flags = IPv6`: the shipped blocks answered
    only IPv4 clients (an IPv6-only server: none). With the flag xinetd's
    socket is dual-stack: an IPv6 client is [::1] in the log and
    [IPv6:::1] in Received:, an IPv4 one (::ffff:127.0.0.1 on that socket)
    stays 127.0.0.1."""
    dep = deployment
    attrs = _xinetd_block("submission-root")
    assert attrs.get("flags") == "= IPv6", attrs
    assert _xinetd_block("submission-nobody").get("flags") == "= IPv6"
    port = _free_dual_stack_port()
    proc = _start_xinetd(dep, _xinetd_config(dep, attrs, port, bind=None), port)
    try:
        _relay_from(world, "::1", port)
        _relay_from(world, "127.0.0.1", port)
    finally:
        dw.stop(proc)
    heads = [m.data.split(b"\r\n")[0] for m in upstream.messages]
    assert heads == [b"Received: from client.test ([IPv6:::1])",
                     b"Received: from client.test ([127.0.0.1])"], heads
    log = dep.front_log.read_text()
    assert "client=[::1]:" in log and "client=127.0.0.1:" in log, log
    assert "::ffff:" not in log, log


def test_an_ip_literal_upstream_is_checked_against_its_ip_address_without_sni(v6):
    """(Kept working.) A route naming [::1] with TLS: no SNI (RFC 6066 3
    allows no IP address in it), and the certificate must hold the address
    as an iPAddress SAN: one for ::1 is taken, one for the name localhost
    alone is refused before any password goes out."""
    with _session(v6) as s:
        assert s.sendmail("alice@ip.example", ["rcpt@example.net"], BODY) == {}
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            s.sendmail("alice@name.example", ["rcpt@example.net"], BODY)
    assert refused.value.smtp_code == 454, refused.value
    assert v6.ip_cert.sni[1:] == [None], v6.ip_cert.sni  # (the first: the readiness probe)
    assert v6.ip_cert.logins == ["u6"]
    assert v6.name_cert.logins == [] and v6.name_cert.messages == []
    log = v6.front.log()
    assert "certificate does not match ::1" in log, log


# ------------------------------------------------------------ -b


def test_bind_to_an_ipv4_mapped_address_listens_on_that_ipv4_address(world):
    """DEFECT (rule: DESIGN.md `-b [ADDR:]PORT`; a careful admin copying
    the address `ss -lnt` shows for an IPv4 client of a dual-stack socket).
    `-b [::ffff:127.0.0.1]:PORT` failed to start with "cannot listen on
    127.0.0.1:PORT: Invalid argument": our IPv6 sockets are V6ONLY, which
    refuses a mapped address, and the message named an address that would
    have worked. The mapped address is now bound as the IPv4 address."""
    port = free_port()
    with open_tmp() as tmp:
        config = front_config(tmp, world)
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, str(tmp / "front.log"), bind=f"[::ffff:127.0.0.1]:{port}", port=port,
                      env=world.env())
        try:
            fe.start()
            with fe.smtp() as s:
                assert s.ehlo()[0] == 250
            assert f"listening on 127.0.0.1:{port}" in fe.log(), fe.log()
        finally:
            fe.stop()
            daemon.stop()


def test_the_shipped_socket_units_are_dual_stack_whatever_the_sysctl_says():
    """DEFECT (rule: docs/decisions/frontend.md "-b PORT: one dual-stack
    socket", which sendooway sets itself with IPV6_V6ONLY off). The shipped
    sendooway.socket and sendooways.socket said `ListenStream=587` alone:
    systemd then follows net.ipv6.bindv6only, and on a host where an admin
    set it to 1 the units took IPv6 clients only. (A sysctl cannot be
    changed by a test on a shared machine: the unit is read as systemd
    reads it, and systemd-analyze verify checks it in test_packaging.)"""
    import configparser

    for name in ("sendooway.socket", "sendooways.socket"):
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.optionxform = str  # type: ignore[assignment]
        cp.read_string((dw.PACKAGING / "systemd" / name).read_text())
        assert cp["Socket"].get("BindIPv6Only") == "both", name


# ------------------------------------------------------------ behind HAProxy over IPv6

HAPROXY_V6 = HAPROXY_DEFAULTS + """\
frontend submission
    bind [::1]:{v6_port}
    bind [::ffff:127.0.0.1]:{v4_port}
    default_backend sendooway
backend sendooway
    server mx1 [::1]:{backend} {send_proxy}
"""


@needs_v6
@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
def test_haproxy_on_ipv6_passes_ipv6_and_mapped_ipv4_clients(world, send_proxy):
    """(Kept working.) HAProxy reaching sendooway over ::1 sends TCP6
    headers (v1 and v2); an IPv4 client on its dual-stack listener arrives
    as ::ffff:127.0.0.1 inside the header. Each client's own address is the
    one in the log, the fail2ban line and Received:, IPv4 shown as IPv4."""
    if not os.access(HAPROXY, os.X_OK):
        pytest.fail("haproxy is missing: scripts/setup.sh installs it")
    with open_tmp() as tmp:
        up = FakeUpstream(world, tls="plain").start()
        config = front_config(tmp, world, "addReceivedField = yes\nproxyProtocol = ::1\n"
                                          f"smarthostMapping = direct:* 127.0.0.1 {up.port} noAuth\n")
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, str(tmp / "front.log"), host="::1").start()
        v6_port, v4_port = free_port("::1"), free_port()
        (tmp / "haproxy.cfg").write_text(HAPROXY_V6.format(
            v6_port=v6_port, v4_port=v4_port, backend=front.port, send_proxy=send_proxy))
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp / "haproxy.cfg")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_port("::1", v6_port, proc)
            wait_port("127.0.0.1", v4_port, proc)
            for host, port in (("::1", v6_port), ("127.0.0.1", v4_port)):
                with smtplib.SMTP(host, port, local_hostname="client.test", timeout=20) as s:
                    s.starttls(context=world.ssl_context())
                    s.ehlo()
                    with pytest.raises(smtplib.SMTPAuthenticationError):
                        s.login("carol", "not-carols-password")
                with smtplib.SMTP(host, port, local_hostname="client.test", timeout=20) as s:
                    s.starttls(context=world.ssl_context())
                    s.ehlo()
                    s.login("alice", world.users["alice"].password)
                    s.sendmail("alice@example.org", ["friend@example.net"], BODY)
        finally:
            proc.terminate()
            proc.wait(10)
            front.stop()
            daemon.stop()
            up.stop()
        heads = [m.data.split(b"\r\n")[0] for m in up.messages]
        assert heads == [b"Received: from client.test ([IPv6:::1])",
                         b"Received: from client.test ([127.0.0.1])"], heads
        kind = "v2 TCP6" if send_proxy.endswith("v2") else "v1 TCP6"
        log = front.log()
        for shown in (r"\[::1\]", r"127\.0\.0\.1"):
            assert re.search(rf"client={shown}:\d+: connect via \[::1\]:\d+ \(PROXY {kind}\)", log), log
        failed = tmp / "failed.log"
        failed.write_text(daemon.log())
        hosts = _fail2ban_regex(failed, tmp).stdout.split()
        assert set(hosts) == {"::1", "127.0.0.1"}, hosts


def test_localname_with_a_link_local_zone_is_a_config_error(tmp_path):
    """DEFECT (rule: docs/decisions: localname is "a host name ... or an
    address literal ([192.0.2.1], [IPv6:2001:db8::1])", RFC 5321 4.1.3,
    whose IPv6 literal has no zone). An admin on a host with only a
    link-local address wrote `localname = [IPv6:fe80::1%eth0]`: Python's
    ipaddress takes the zone, so the greeting, the EHLO sent upstream and
    Received: carried a literal every upstream refuses. It is now refused
    at start, with file:line."""
    conf = tmp_path / "sendooway.conf"
    conf.write_text("localname = [IPv6:fe80::1%eth0]\n")
    r = subprocess.run([FRONT, "-c", str(conf), "-l", "&2"], input=b"QUIT\r\n",
                       capture_output=True, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"{conf}:1".encode() in r.stderr and b"220 " not in r.stdout, r.stderr
