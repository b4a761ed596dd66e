"""Passwords at odd places in live sessions (an outside review): the real
`sendooway -b` beside its `sendooway-auth`, a raw client and a raw
upstream that echoes what it got. Neither the user's UNIX password nor the
upstream password (nor its base64 forms) may reach either log, a reply to
the client, or /proc of any of the processes."""

from __future__ import annotations

import base64
import os
import socket

import pytest

from .front_util import front_config, front_with_daemon, open_tmp
from .upstream import RawServer
from .upstream import talk as upstream_talk

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")

UP_USER = "relayuser"
UP_PW = "Up-Echo-Pw-4m"


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def forms(secret: str) -> list[str]:
    """A secret as it may show up: plain, and base64 inside the tokens sent."""
    return [secret, b64(secret), b64(f"\0{UP_USER}\0{secret}"), b64(f"\0alice\0{secret}")]


class EchoUpstream(RawServer):
    """Greets, offers AUTH PLAIN, and answers the AUTH with 235 and, unasked,
    a 421 quoting the AUTH line it got (a broken box in front of a server)."""

    def _one(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            conn.sendall(b"220 up.test ESMTP\r\n")
            for line in f:
                if line[:4].upper() == b"EHLO":
                    conn.sendall(b"250-up.test\r\n250 AUTH PLAIN\r\n")
                elif line[:4].upper() == b"AUTH":
                    conn.sendall(b"235 2.7.0 ok\r\n421 4.3.0 you said " + line.strip() + b"\r\n")
                    return
                else:
                    conn.sendall(b"221 bye\r\n")
                    return


def plain(authzid: bytes, user: bytes, password: bytes) -> bytes:
    return b"AUTH PLAIN " + b64(authzid + b"\0" + user + b"\0" + password).encode() + b"\r\n"


def talk(port: int, lines: list[bytes], pause: float = 0.3) -> bytes:
    return upstream_talk(port, lines, pause)


WRONG = "Wrong-Client-Pw-9z"
W = WRONG.encode()
EHLO = b"EHLO c.test\r\n"


@pytest.fixture(scope="module")
def rig(world):
    up = EchoUpstream()
    with open_tmp() as tmp:
        config = front_config(tmp, world, f"smarthostMapping = direct:* 127.0.0.1 {up.port}"
                              f" {UP_USER} {UP_PW}\nmaxAuthFailures = 3\n", tls=False)
        with front_with_daemon(tmp, world, config) as front:
            front.tmp = tmp
            yield front
    up.stop()


def leaked(front, replies: list[bytes], secrets: list[str]) -> list[str]:
    """The forms of `secrets` found in either log, the replies, or the
    command line and environment of any sendooway process (the daemons,
    the reader fork server and its workers)."""
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            if b"sendooway" in cmd:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    procs.append((cmd + b"\n" + f.read()).decode("latin-1"))
        except OSError:
            pass
    assert procs, "no sendooway process found"
    with open(os.path.join(str(front.tmp), "auth.log")) as f:
        auth_log = f.read()
    blob = "\n".join([front.log(), auth_log, *procs] + [r.decode("latin-1") for r in replies])
    return [form for secret in secrets for form in forms(secret) if form in blob]


def test_malformed_logins_never_log_or_answer_a_password(rig):
    """PLAIN with the fields one place off (`alice\\0SECRET\\0`: an
    authorization identity and no password) was refused as "authorization
    identity not allowed" and logged with user='SECRET'. Also swept: the
    password in clear where base64 belongs, as a command line after a
    cancelled exchange, NUL inside, not UTF-8, too long, bad base64,
    maxAuthFailures' close, a drop mid-exchange. (A password typed into
    the user name slot with a password after it is a user name to us, and
    logged as one, as every server does.)"""
    pw = rig.world.users["alice"].password
    replies = [talk(rig.port, script) for script in (
        [EHLO, plain(b"", b"alice", pw.encode()), b"QUIT\r\n"],
        [EHLO, b"AUTH LOGIN\r\n", f"{b64('alice')}\r\n".encode(), f"{WRONG}!\r\n".encode(),
         f"{WRONG}\r\n".encode(), f"{b64(WRONG)}\r\n".encode(), b"QUIT\r\n"],
        [EHLO, b"AUTH LOGIN\r\n", f"{b64('alice')}\r\n".encode(), b"*\r\n",
         f"{b64(WRONG)}\r\n".encode(), f"AUTH {WRONG}\r\n".encode(), b"QUIT\r\n"],
        [EHLO, plain(b"", b"alice", W + b"\0x"), b"AUTH PLAIN " + b64(b"alice\0" + W).encode() + b"\r\n",
         b"AUTH PLAIN " + b64(W + b"\0").encode() + b"\r\n", plain(b"", b"alice", W + b"\xff"),
         plain(b"", b"alice", W * 200), plain(b"alice", W, b""),
         b"AUTH PLAIN " + W + b"==\r\n", b"QUIT\r\n"],
        [EHLO] + [plain(b"", b"alice", W)] * 3,
        [EHLO, b"AUTH LOGIN\r\n", f"{b64('alice')}\r\n".encode(), f"{b64(WRONG)[:6]}".encode()],
    )]
    assert "authorization identity not allowed" in rig.log()
    assert rig.log().count("login failed") >= 5, rig.log()
    assert leaked(rig, replies, [pw, WRONG]) == []


def test_an_upstream_quoting_the_auth_line_after_its_235_is_not_passed_on(rig):
    """upstream.py _no_surplus: a 421 right after the 235 to AUTH (Dovecot
    says one when its relay is down) went to the log and, as a 451, to the
    client with its words; a box quoting the AUTH line it got put the
    base64 PLAIN token of the global direct: mapping's credentials (the
    admin's relay password) into both."""
    pw = rig.world.users["alice"].password
    reply = talk(rig.port, [EHLO, plain(b"", b"alice", pw.encode()),
                            b"MAIL FROM:<alice@example.org>\r\n", b"QUIT\r\n"])
    assert b"\r\n451 4.3.0 " in reply, reply
    assert "closing: 421" in rig.log(), rig.log()
    assert leaked(rig, [reply], [UP_PW]) == []
