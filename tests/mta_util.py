"""What the tests with real MTAs and mail clients share (Postfix, Exim,
Dovecot as the upstream or as the client; MUAs and libraries as clients):
the aiosmtpd sink behind them, waiting for what it received, a message body
that exercises the edges, system uids, the master.cf services every private
Postfix instance needs, and the world of the real-client reviews (a daemon,
a STARTTLS and a -s frontend, one upstream with scripted refusals)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from .auth_helpers import Daemon
from .fakeworld import free_port
from .front_util import Frontend, front_config, open_tmp, wait_port
from .upstream import FakeUpstream

# master.cf: the internal services of a private Postfix instance (a test
# puts its own smtpd listeners, or none, and extra transports before them)
POSTFIX_SERVICES = """\
pickup     unix n - n 60 1 pickup
cleanup    unix n - n - 0 cleanup
qmgr       unix n - n 300 1 qmgr
tlsmgr     unix - - n 1000? 1 tlsmgr
rewrite    unix - - n - - trivial-rewrite
bounce     unix - - n - 0 bounce
defer      unix - - n - 0 bounce
trace      unix - - n - 0 bounce
verify     unix - - n - 1 verify
flush      unix n - n 1000? 0 flush
proxymap   unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp       unix - - n - - smtp
relay      unix - - n - - smtp
showq      unix n - n - - showq
tlsproxy   unix - - n - 0 tlsproxy
error      unix - - n - - error
retry      unix - - n - - error
discard    unix - - n - - discard
anvil      unix - - n - 1 anvil
scache     unix - - n - 1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def postfix_main_cf(d, name: str, interfaces: str) -> str:
    """The start of a private Postfix instance's main.cf: everything under
    directory `d`, its log in d/maillog, myhostname `name`, delivering
    nothing locally, listening on `interfaces` (IPv4)."""
    return f"""\
compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
maillog_file_prefixes = {d}
maillog_file = {d}/maillog
myhostname = {name}
mydomain = {name}
myorigin = $myhostname
mydestination =
local_recipient_maps =
relay_domains =
alias_maps =
alias_database =
inet_interfaces = {interfaces}
inet_protocols = ipv4
"""


def postfix_relay_cf(d, sink_port: int) -> str:
    """More of a private Postfix's main.cf: STARTTLS with d/etc/cert.pem and
    key.pem; everything relayed at once to the sink on `sink_port`, headers
    left as they came (so any difference at the sink is sendooway's), retried
    within seconds."""
    return f"""\
relayhost = [127.0.0.1]:{sink_port}
smtpd_banner = $myhostname ESMTP Postfix
smtpd_peername_lookup = no
smtpd_tls_security_level = may
smtpd_tls_cert_file = {d}/etc/cert.pem
smtpd_tls_key_file = {d}/etc/key.pem
local_header_rewrite_clients =
always_add_missing_headers = no
disable_mime_output_conversion = yes
smtp_tls_security_level = none
smtp_helo_name = pfx.test
biff = no
append_dot_mydomain = no
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""


def postfix_tree(world, root: Path, main_cf: str, master_cf: str) -> Path:
    """The directories and files of a private Postfix in `root` (its
    etc, spool and data), the fake world's upstream certificate and key as
    etc/cert.pem and key.pem; returns etc. `root` is world-readable: smtpd
    (user postfix) opens a sasldb2 there (postfix_sasldb)."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    (root / "spool").mkdir()
    (root / "data").mkdir()
    os.chown(root / "data", system_uid("postfix"), -1)
    os.chmod(root, 0o755)
    (etc / "main.cf").write_text(main_cf)
    (etc / "master.cf").write_text(master_cf)
    shutil.copyfile(world.upstream_cert_file, etc / "cert.pem")
    shutil.copyfile(world.upstream_key_file, etc / "key.pem")
    os.chmod(etc / "key.pem", 0o600)
    return etc


def postfix_sasldb(root: Path, realm: str, user: str, password: str, mechs: str) -> None:
    """Cyrus SASL for the private Postfix in `root` (smtpd_sasl_type cyrus,
    cyrus_sasl_config_path root/etc/sasl): smtpd.conf offering `mechs`, and
    root/sasldb2 (not under etc: postfix-script wants root's files there)
    holding `user` in `realm`, filled by saslpasswd2 and readable by smtpd
    (user postfix)."""
    db = root / "sasldb2"
    (root / "etc" / "sasl").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "sasl" / "smtpd.conf").write_text(
        f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {db}\nmech_list: {mechs}\n")
    saslpasswd2 = shutil.which("saslpasswd2", path=SBIN_PATH)
    r = subprocess.run([saslpasswd2, "-f", str(db), "-c", "-p", "-u", realm, user], input=password.encode(),
                       env={"PATH": SBIN_PATH, "LANG": "C"}, capture_output=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"saslpasswd2: {r.stderr.decode(errors='replace')}")
    os.chown(db, system_uid("postfix"), -1)
    os.chmod(db, 0o600)


def system_uid(name: str) -> int:
    """The uid of a system user from /etc/passwd (nss_wrapper, in this
    process, knows only the fake world's users)."""
    for line in Path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[0] == name:
            return int(fields[2])
    raise LookupError(f"no system user {name}")


@dataclass
class Sunk:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    smtputf8: bool = False


class Sink:
    """An MTA's next hop: aiosmtpd on loopback recording every message as it
    came, SMTPUTF8 and 8BITMIME offered, no size limit. Subclasses may add
    handle_MAIL / handle_RCPT to refuse."""

    def __init__(self) -> None:
        self.messages: list[Sunk] = []
        self._lock = threading.Lock()
        self.port = free_port()
        self._controller: Controller | None = None

    async def handle_DATA(self, server, session, envelope):
        with self._lock:
            self.messages.append(Sunk(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content or b"", list(envelope.mail_options),
                                      bool(envelope.smtp_utf8)))
            return "250 2.0.0 sunk as SINK%d" % len(self.messages)

    def start(self) -> "Sink":
        """Listen (again, after stop) on self.port."""
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, decode_data=False,
                                      enable_SMTPUTF8=True, data_size_limit=0, ready_timeout=10,
                                      server_hostname="sink.test")
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()

    def wait(self, n: int, timeout: float = 15.0, detail=lambda: "") -> list[Sunk]:
        """The messages, once there are `n` (MTAs relay asynchronously)."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.messages) >= n, (self.messages, detail())
        return list(self.messages)

    def nothing_more(self, n: int, settle: float) -> None:
        time.sleep(settle)
        assert len(self.messages) == n, self.messages


def message_body(tag: str, domain: str) -> bytes:
    """A message with Date and Message-ID (no client adds its own), a
    dot-stuffed line, a lone dot line, 8-bit text, a 998-octet line and
    folded whitespace lines."""
    return (f"From: someone@{domain}\r\nTo: r@example.net\r\nDate: Wed, 25 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{tag.replace(' ', '.')}@client.test>\r\nSubject: {tag}\r\n\r\nfirst line\r\n".encode()
            + b"..a dot-stuffed line\r\n.\r\n" + b"\xc3\xa4 8-bit text\r\n" + b"y" * 998
            + b"\r\n \r\n\tindented\r\nlast\r\n")


# ------------------------------------------------------------------ real clients of sendooway

SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Clients run without the suite's nss_wrapper/pam_wrapper (they need the
# system's users, not the fake world's).
CLEAN_ENV = {"PATH": SBIN_PATH, "LANG": "C", "LC_ALL": "C"}

REFUSED_RCPT = "nobody@example.net"     # the upstream answers 550 5.1.1
LATER_RCPT = "later@example.net"        # the upstream answers 451 4.3.0
REFUSED_SENDER = "refused@home.example"  # the upstream answers 550 5.7.1 to MAIL

# Ours: the client's EHLO name (when a domain), our localname, the user.
OUR_RECEIVED = re.compile(
    rb"Received: from (?P<helo>[\w.-]+) \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby mx\.test \(sendooway\) with (?P<proto>ESMTPS?A) id [^\s;]+\r\n"
    rb"\t\(authenticated user (?P<user>\w+)\); \w{3}, \d+ \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n")


def tool(name: str) -> str:
    """The path of a client program scripts/setup.sh installs (skip without)."""
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/setup.sh installs it)")
    return path


class ClientWorld:
    """What client_world() yields: .world, .tmp, .up, .daemon, .front, .front_s."""

    def pw(self, user: str) -> str:
        return self.world.users[user].password


@contextlib.contextmanager
def client_world(world, timeout: int = 30):
    """One daemon, a STARTTLS frontend (.front) and a -s frontend (.front_s),
    one plain upstream (.up) for every sender (`direct:*`, noAuth) refusing
    REFUSED_RCPT (550), LATER_RCPT (451) and REFUSED_SENDER (550 at MAIL);
    `addReceivedField = yes`; the frontends' `timeout`."""
    with open_tmp() as tmp:
        up = FakeUpstream(world, tls="plain", reject_rcpt={REFUSED_RCPT},
                          temp_fail_rcpt={LATER_RCPT}, reject_mail={REFUSED_SENDER}).start()
        config = front_config(tmp, world, "addReceivedField = yes\n"
                                          f"smarthostMapping = direct:* 127.0.0.1 {up.port} noAuth\n",
                              timeout=timeout)
        daemon = Daemon(tmp, config).start()
        front = Frontend(config, str(tmp / "front.log")).start()
        front_s = Frontend(config, str(tmp / "front-s.log"), args=["-s"]).start()
        ns = ClientWorld()
        ns.world, ns.tmp, ns.up, ns.daemon, ns.front, ns.front_s = world, tmp, up, daemon, front, front_s
        try:
            yield ns
        finally:
            front.stop()
            front_s.stop()
            daemon.stop()
            up.stop()


@pytest.fixture(scope="module")
def cw(world):
    """A module's client_world (import it, with clean_client_world, into the test module)."""
    with client_world(world) as ns:
        yield ns


@pytest.fixture(autouse=True)
def clean_client_world(cw):
    """Each test starts with no upstream message and leaves no traceback
    and no password in any log."""
    cw.up.messages.clear()
    yield
    logs = cw.front.log() + cw.front_s.log() + cw.daemon.log()
    assert "Traceback" not in logs
    for u in cw.world.users.values():
        assert u.password not in logs


def wait_upstream(cw, n: int, timeout: float = 15.0) -> list:
    """The upstream's messages, once there are `n`."""
    deadline = time.monotonic() + timeout
    while len(cw.up.messages) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(cw.up.messages) >= n, cw.up.messages
    return list(cw.up.messages)


def split_ours(m, user: str, helo: bytes | None = b"client.test") -> bytes:
    """The upstream's message: our Received: (checked: the user, ESMTPSA, the
    client's EHLO name unless `helo` is None), then what is returned."""
    ours = OUR_RECEIVED.match(m.data)
    assert ours, m.data[:400]
    assert ours.group("user").decode() == user, ours.group(0)
    assert helo is None or ours.group("helo") == helo, ours.group(0)
    assert ours.group("proto") == b"ESMTPSA"
    return m.data[ours.end():]


def instance(rig, name: str):
    """rig.NAME, the module's private server of that name, or a skip that
    says why there is none (rig.skips[NAME])."""
    inst = getattr(rig, name)
    if inst is None:
        pytest.skip(rig.skips[name])
    return inst


def stop_all(rig, names: list[str]) -> None:
    """Stop each private server rig.NAME there is, then the rig's sink."""
    for name in names:
        if getattr(rig, name) is not None:
            getattr(rig, name).stop()
    rig.sink.stop()


def login(rig, s, user: str = "dave") -> None:
    """STARTTLS and AUTH as fake-world `user` on a session with a frontend
    (`rig.world`: the world)."""
    s.starttls(context=rig.world.ssl_context())
    s.ehlo()
    s.login(user, rig.world.users[user].password)


def logins(front: Frontend, since: int) -> list[str]:
    """The mechanisms of the logins a frontend logged after offset `since`."""
    return re.findall(r"login: mechanism=(\S+)", front.log()[since:])


@contextlib.contextmanager
def served(rig, base: str, extras: dict[str, str], timeouts: dict[str, int] | None = None):
    """A real sendooway-auth on config `base` (rig.config, rig.daemon) and a
    `sendooway -b` per name in `extras` with `base` + that extra and its
    `timeouts` entry (default 30) as `timeout` (rig.fronts), all stopped
    after; rig.tmp and rig.world say where and for whom."""
    tmp, world = rig.tmp, rig.world
    rig.config = front_config(tmp, world, base)
    rig.daemon = Daemon(tmp, rig.config).start()
    rig.fronts = {}
    try:
        for name, extra in extras.items():
            conf = front_config(tmp, world, base + extra, name=f"front-{name}.conf",
                                timeout=(timeouts or {}).get(name, 30))
            rig.fronts[name] = Frontend(conf, os.path.join(str(tmp), f"front-{name}.log")).start()
        yield rig
    finally:
        for fe in rig.fronts.values():
            fe.stop()
        rig.daemon.stop()


# ------------------------------------------------------------------ private server processes


def wait_for(pred, timeout: float = 10.0, what=lambda: "") -> None:
    """Poll `pred` until true (assert it then; `what()` says why not)."""
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pred(), what()


class ServerProcess:
    """A private server started by a test: `argv` with a clean environment
    in a session of its own, its output in `out_path`; started when every
    port in `ports` answers on 127.0.0.1; stopped with SIGTERM to its whole
    process group (the processes serving connections too; SIGKILL after
    15 s; and the groups of its earlier starts), or to the first process
    only (`daemon_only`)."""

    def __init__(self, argv: list[str], ports: list[int], out_path) -> None:
        self.argv, self.ports, self.out_path = argv, ports, Path(out_path)
        self.proc = None
        self.groups: list[int] = []  # the process group of each start

    def start(self) -> "ServerProcess":
        with open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=CLEAN_ENV, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(self.proc.pid)
        try:
            for port in self.ports:
                wait_port("127.0.0.1", port, self.proc, timeout=15)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"{' '.join(self.argv)}: {self.output()[-1500:]}") from None
        return self

    def output(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, daemon_only: bool = False) -> None:
        if self.proc is None:
            return
        if daemon_only:
            self.proc.terminate()
        else:
            self._signal_groups(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self._signal_groups(signal.SIGKILL)
            self.proc.wait()
        if not daemon_only:
            deadline = time.monotonic() + 15  # the groups' others: gone too
            while self._signal_groups(0) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._signal_groups(signal.SIGKILL)
            self.groups.clear()

    def _signal_groups(self, sig: int) -> bool:
        """Signal each process group of ours (its id is the pid its start
        made): False when no process of them is left."""
        left = False
        for group in self.groups:
            try:
                os.killpg(group, sig)
                left = True
            except ProcessLookupError:
                pass
        return left
