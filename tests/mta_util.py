"""What the tests with real MTAs share (Postfix, Exim, Dovecot as the
upstream or as the client): the aiosmtpd sink behind them, waiting for what
it received, a message body that exercises the edges, system uids, and the
master.cf services every private Postfix instance needs."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.controller import Controller

from .auth_helpers import Daemon
from .fakeworld import free_port
from .front_util import Frontend, front_config

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
