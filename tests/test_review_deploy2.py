"""Second deployment review: a fresh clone deployed exactly as README.md,
docs/deployment.md, the man pages and packaging/ say, and a migration from
the original C sendooway (its sendooway.conf, its command line). Each test
below failed on the code it was written against, for the reason its
docstring gives; it passes once that defect is fixed.
All are fixed."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import smtplib
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from sendooway_shared.protocol import VERSION, BlockingChannel, Hello, Welcome

from . import deploy_world as dw
from .deploy_world import deployment, upstream  # noqa: F401 - fixtures
from .deploy_util import PACKAGING, rewrite_paths
from .fakeworld import MACHINE_SKIP


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment]
    cp.read_string((PACKAGING / "systemd" / name).read_text())
    return cp


def _exec_start(unit: str, config: Path) -> list[str]:
    line = rewrite_paths(_unit(unit)["Service"]["ExecStart"])
    return [str(config) if a == "/etc/sendooway.conf" else a for a in shlex.split(line)]


def _as_the_unit(unit: str) -> list[str]:
    """setpriv as systemd runs the shipped unit: root (User=root or none),
    only the unit's CapabilityBoundingSet, NoNewPrivileges."""
    svc = _unit(unit)["Service"]
    assert svc.get("User", "root") == "root" and svc["NoNewPrivileges"] == "yes"
    caps = ",".join("+" + c.lower().removeprefix("cap_")
                    for c in svc["CapabilityBoundingSet"].split())
    return ["setpriv", "--inh-caps=-all", f"--bounding-set=-all,{caps}", "--no-new-privs", "--"]


def _host_names() -> set[str]:
    """What this host calls itself: gethostname() (what the original C
    sendooway used for an empty localname) and `hostname -f`."""
    names = {socket.gethostname()}
    try:
        r = subprocess.run(["hostname", "-f"], capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            names.add(r.stdout.strip())
    except OSError:
        pass
    return names


# ------------------------------------------------------------ localname


def test_empty_localname_greets_and_ehlos_with_this_hosts_name(world, deployment, upstream):
    """DEFECT (rule: sendooway.conf(5) "localname ... Default: empty, meaning
    this host's name"; the original C sendooway's sendooway.conf(5): "If no
    value is given ... Sendooway will use the return value of gethostname()";
    both the shipped example config and the original's sample have
    `localname =`): with the shipped config left as installed, the frontend
    calls itself "localhost" in its EHLO reply, in EHLO to the upstream and in
    the Received: header on this machine, whose name is what gethostname()
    and `hostname -f` say (default_localname uses socket.getfqdn(), which
    takes the first name of the host's address in /etc/hosts). An upstream
    sees `EHLO localhost` (refused by reject_non_fqdn_helo_hostname, a spam
    sign elsewhere) and Received: claims the mail passed through localhost.
    Correct: the host's name, as gethostname() (or its canonical name)."""
    dep = deployment
    text = dep.config.read_text()
    text, n = re.subn(r"^localname =.*$", "localname =", text, flags=re.M)  # as shipped
    assert n == 1
    dep.config.write_text(text)
    names = _host_names()
    assert "localhost" not in names, "this machine calls itself localhost: nothing to show"

    proc, port = dw.serve_b(dep)
    try:
        ctx = world.ssl_context()
        with smtplib.SMTP("localhost", port, timeout=30) as client:
            client.ehlo("client.test")
            ehlo_name = client.ehlo_resp.decode().split()[0]
            client.starttls(context=ctx)
            client.ehlo("client.test")
            client.login("alice", world.users["alice"].password)
            client.sendmail(dw.SENDER, ["bob@example.net"],
                            "Subject: localname\r\n\r\nbody\r\n")
    finally:
        dw.stop(proc)
    assert len(upstream.messages) == 1
    m = upstream.messages[0]
    received = m.data.split(b"\r\n\r\n")[0].decode()
    by = re.search(r"\bby (\S+) \(sendooway\)", received)
    seen = {"EHLO reply": ehlo_name, "EHLO upstream": m.helo,
            "Received by": by.group(1) if by else None}
    assert all(v in names for v in seen.values()), (seen, names)


# ------------------------------------------------------------ sendooway-auth.service


def test_auth_unit_without_socket_activation_starts_under_its_own_capabilities(world, tmp_path):
    """DEFECT (rule: packaging/systemd/sendooway-auth.service keeps
    RuntimeDirectory=sendooway "The socket directory when started without
    sendooway-auth.socket" and docs/decisions/deployment.md keeps CAP_CHOWN
    "give the socket to frontendUser when started without the .socket unit";
    DESIGN.md: never a traceback, clear errors): the unit's ExecStart run as
    the unit runs it (root, only CAP_SETUID CAP_SETGID CAP_KILL CAP_CHOWN
    CAP_AUDIT_WRITE, NoNewPrivileges) and without a socket from systemd dies
    at once with a Python traceback (PermissionError in bind_socket): it
    chowns the new socket to nobody and then chmods a file it no longer owns,
    which needs CAP_FOWNER. No socket, exit 1, Restart=on-failure loops.
    Correct: set the mode before giving the socket away (the umask already
    makes it 0600) and serve; at worst a one-line start-up error."""
    run = tmp_path / "run"  # what RuntimeDirectory=sendooway makes: root, 0755
    run.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    sock_path = run / "auth.sock"
    conf = tmp_path / "sendooway.conf"
    text = (PACKAGING / "sendooway.conf").read_text()
    text = re.sub(r"^authSocket =.*$", f"authSocket = {sock_path}", text, flags=re.M)
    text = re.sub(r"^ssl(Cert|Key) =.*$", r"ssl\1 =", text, flags=re.M)
    conf.write_text(text)
    os.chmod(conf, 0o644)
    log = tmp_path / "auth.log"
    argv = _exec_start("sendooway-auth.service", conf) + ["-l", str(log)]
    proc = subprocess.Popen([*_as_the_unit("sendooway-auth.service"), *argv], env=world.env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        up = False
        while time.monotonic() < deadline and proc.poll() is None and not up:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock_path))
                    up = isinstance(BlockingChannel(s, timeout=10).request(
                        Hello(VERSION, "unit", "192.0.2.1")), Welcome)
            except OSError:
                time.sleep(0.05)
        exited = proc.poll()
    finally:
        dw.stop(proc)
    err = proc.stderr.read().decode(errors="replace")
    assert "Traceback" not in err, err
    assert up and exited is None, (exited, err, log.read_text() if log.exists() else "")
    st = os.stat(sock_path) if sock_path.exists() else None
    assert st is None or (stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == dw.NOBODY_UID)


# ------------------------------------------------------------ xinetd: the reason of a 421


@pytest.mark.parametrize("log_arg", ["root-owned-file", "&2"])
def test_xinetd_log_target_refused_at_start_is_reported_somewhere(world, deployment, log_arg):
    """DEFECT (rule: docs/deployment.md, troubleshooting: "`421 4.3.0 Service
    not available` and nothing else (inetd/xinetd) | the frontend could not
    start: the reason ... is in its log (syslog, or -l) as `cannot start: …`";
    DESIGN.md: clear errors): the shipped submission-nobody xinetd block with
    `-l /var/log/sendooway.log` added (section 4 of the guide; the file made
    by root, which the frontend started as nobody cannot open, as the guide
    itself says), or with the original's test-mode `-l '&2'` carried over,
    answers every client 421 and exits 2, and the reason is written nowhere:
    not to the -l file, not to stderr (xinetd made it the client's socket,
    rightly muted), and not to syslog either: main() calls
    startup.fail(None, ...) without any logger for "cannot open log" and for
    the refused '&2'. Correct: then say `cannot start: ...` on syslog (mail),
    the one log left."""
    import socket as socketmod

    from .test_deploy_front import _start_xinetd, _xinetd_block, _xinetd_config

    if os.path.exists("/dev/log"):
        pytest.skip(MACHINE_SKIP + "a syslog daemon listens on /dev/log, so the UDP fallback is not used")
    dep = deployment
    root_log = dep.root / "rootlogs" / "sendooway.log"  # /var/log: root's, 0755
    root_log.parent.mkdir(mode=0o755)
    root_log.touch(mode=0o600)
    port = dw.free_tcp_port()
    conf = _xinetd_config(dep, _xinetd_block("submission-nobody"), port)
    target = str(root_log) if log_arg == "root-owned-file" else "&2"
    conf.write_text(conf.read_text().replace(str(dep.front_log), target))
    # where SysLogHandler(("localhost", 514)) sends: the first address of
    # localhost, ::1 on a stock Debian /etc/hosts
    family, _t, _p, _c, addr = socketmod.getaddrinfo("localhost", 514, 0, socketmod.SOCK_DGRAM)[0]
    rx = socketmod.socket(family, socketmod.SOCK_DGRAM)
    try:
        rx.bind(addr)
    except OSError as exc:
        rx.close()
        pytest.skip(f"UDP port 514 not available here: {exc}")
    rx.settimeout(0.5)
    proc = _start_xinetd(dep, conf, port)
    seen: list[bytes] = []
    try:
        with socketmod.create_connection(("127.0.0.1", port), timeout=20) as c:
            reply = c.recv(4096)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                seen.append(rx.recv(65536))
            except socketmod.timeout:
                pass
    finally:
        rx.close()
        dw.stop(proc)
    assert reply.startswith(b"421 4.3.0"), reply  # the frontend did refuse to start
    assert root_log.read_text() == ""
    mine = [m for m in seen if b"sendooway[" in m and b"cannot start" in m]
    assert any(target.encode() in m for m in mine), seen


def test_xinetd_usage_error_gives_the_client_421_not_argparse_text(world, deployment):
    """DEFECT (rule: docs/decisions/deployment.md, "stderr under inetd": in
    stdio mode with a socket on fd 0 "a start-up failure now answers `421
    4.3.0 Service not available` on stdout, logs `cannot start: …`, and
    prints to stderr only when stderr is not the client's socket"; RFC 5321
    section 4.2 / 3.1: a server's first words are a reply code): the shipped
    submission-root xinetd block with one option the frontend does not know
    in server_args (here `--socket`, the spelling sendooway-auth(8) uses,
    where sendooway(1) says `--auth-socket`) sends the mail client argparse's
    usage text ("usage: sendooway [-h] [-V] ...  error: unrecognized
    arguments") as the greeting, through fd 2, which xinetd made the client's
    connection; no 421, nothing logged. main() parses the command line before
    it looks at fd 0/2 (_Startup). Correct: a usage error is a start-up
    failure like a config error: 421 4.3.0 to the client, the message to the
    log, never to the client."""
    import socket as socketmod

    from .test_deploy_front import _start_xinetd, _xinetd_block, _xinetd_config

    dep = deployment
    attrs = dict(_xinetd_block("submission-root"))
    attrs["server_args"] += f" --socket {dep.auth_socket}"
    port = dw.free_tcp_port()
    proc = _start_xinetd(dep, _xinetd_config(dep, attrs, port), port)
    reply = b""
    try:
        with socketmod.create_connection(("127.0.0.1", port), timeout=20) as c:
            while True:
                data = c.recv(4096)
                if not data:
                    break
                reply += data
    finally:
        dw.stop(proc)
    assert b"usage:" not in reply and b"error:" not in reply, reply
    assert reply.startswith(b"421 4.3.0"), reply
