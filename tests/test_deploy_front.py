"""Whole SMTP sessions through the shipped xinetd blocks and systemd units,
with the real xinetd and systemd-socket-activate, a fake user and a fake
upstream: AUTH, MAIL, delivery."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import deploy_world as dw
from .deploy_world import deployment, upstream  # noqa: F401 - fixtures
from .deploy_util import PACKAGING, REPO, command, man_text, rewrite_paths
from .test_deploy_auth import _fail2ban_regex

BODY = "Subject: deploy test\r\n\r\nsent through the shipped deployment\r\n"


def _frontend_missing() -> str | None:
    """Why the real frontend cannot serve a session yet (None: it can)."""
    try:
        r = subprocess.run([command("sendooway"), "-c", "/dev/null", "-l", "-"],
                           input=b"QUIT\r\n", capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sendooway -c /dev/null hangs on QUIT"
    if r.stdout.startswith(b"220") or r.stdout.startswith(b"421"):
        return None
    return ("sendooway frontend not built yet: "
            + (r.stderr.decode(errors="replace").strip().splitlines() or ["no greeting"])[-1])


@pytest.fixture(scope="module")
def frontend():
    why = _frontend_missing()
    if why:
        pytest.skip(why)


RELAY_MISSING = "Relay not available"  # the frontend's 451 before the relay lands


def _send(client: smtplib.SMTP) -> bool:
    """Send the test message; False when the relay (issue 6) is not built yet
    (MAIL answered 451 "Relay not available"): everything up to AUTH worked."""
    code, text = client.mail(dw.SENDER)
    if code == 451 and RELAY_MISSING.encode() in text:
        return False
    assert code == 250, (code, text)
    code, text = client.rcpt("bob@example.net")
    assert code == 250, (code, text)
    code, text = client.data(BODY)
    assert code == 250, (code, text)
    return True


def _delivered_or_skip(world, upstream, dep: dw.Deployment, relayed: bool) -> None:
    if not relayed:
        assert upstream.messages == []
        pytest.skip("relay (issue 6) not built yet: MAIL answered 451 Relay not available"
                    " (TLS, AUTH and the process checks before it passed)")
    _check_delivery(world, upstream, dep)


def _check_delivery(world, upstream, dep: dw.Deployment) -> None:
    assert len(upstream.messages) == 1, dep.front_log.read_text()
    m = upstream.messages[0]
    assert m.mail_from == dw.SENDER
    assert m.rcpt_tos == ["bob@example.net"]
    assert m.login == dw.UPSTREAM_USER
    assert b"sent through the shipped deployment" in m.data
    header = m.data.split(b"\r\n\r\n")[0]
    assert m.data.startswith(b"Received: from client.test ([127.0.0.1])"), header
    # localname from the (rewritten) shipped config; the user who logged in
    assert b"by proxy.test (sendooway) with ESMTPSA" in header, header
    assert b"(authenticated user alice)" in header, header
    for log in (dep.front_log, dep.auth_log):
        text = log.read_text()
        for secret in (world.users["alice"].password, dw.UPSTREAM_PASSWORD):
            assert secret not in text, f"{log.name} holds a password"


# ------------------------------------------------------------ xinetd


def _xinetd_block(block_id: str) -> dict[str, str]:
    text = (PACKAGING / "xinetd" / "sendooway").read_text()
    blocks = re.findall(r"^service (\S+)\n\{\n(.*?)^\}", text, re.M | re.S)
    for name, body in blocks:
        attrs = dict(re.findall(r"^\s*(\w+)\s*(\+?=\s*.*?)\s*$", body, re.M))
        if attrs.get("id", "").lstrip("= ").strip() == block_id:
            assert name == "submission"
            return attrs
    raise AssertionError(f"no xinetd block with id {block_id}")


def _inetd_block() -> dict[str, str]:
    """The shipped inetd.conf line, as xinetd's own itox translates it."""
    if not shutil.which("itox"):
        pytest.skip("itox (xinetd package) not installed")
    line = "".join(l for l in (PACKAGING / "inetd" / "sendooway.inetd").read_text().splitlines(True)
                   if l.strip() and not l.startswith("#"))
    assert line.count("\n") == 1, "the inetd file should hold exactly one service line"
    out = subprocess.run(["itox"], input=line, capture_output=True, text=True, timeout=30,
                         check=True).stdout
    m = re.search(r"^service (\S+)\n\{\n(.*?)^\}", out, re.M | re.S)
    assert m and m.group(1) == "submission", out
    return dict(re.findall(r"^\s*(\w+)\s*(\+?=\s*.*?)\s*$", m.group(2), re.M))


def _xinetd_config(dep: dw.Deployment, attrs: dict[str, str], port: int,
                   bind: str | None = "127.0.0.1") -> Path:
    """A shipped block, enabled, on a loopback port (bind None: every
    address, as shipped), paths rewritten."""
    lines = []
    for key, op_value in attrs.items():
        if key == "disable":
            op_value = "= no"
        if key == "flags" and bind and ":" not in bind:
            continue  # as the block's comment says for an IPv4 bind (else xinetd takes every address)
        op_value = rewrite_paths(op_value)
        op_value = op_value.replace("/etc/sendooway.conf", str(dep.config))
        op_value = op_value.replace("/run/sendooway/auth.sock", str(dep.auth_socket))
        if key == "server_args":
            op_value += f" -l {dep.front_log}"  # the test reads the frontend's log
        lines.append(f"\t{key} {op_value}")
    lines += ["\ttype = UNLISTED", f"\tport = {port}"] + ([f"\tbind = {bind}"] if bind else [])
    conf = dep.root / "xinetd.conf"
    conf.write_text("service sendooway-test\n{\n" + "\n".join(lines) + "\n}\n")
    return conf


def _start_xinetd(dep: dw.Deployment, conf: Path, port: int) -> subprocess.Popen:
    if not shutil.which("xinetd"):
        pytest.skip("xinetd not installed")
    proc = subprocess.Popen(
        ["xinetd", "-dontfork", "-f", str(conf), "-pidfile", str(dep.root / "xinetd.pid"),
         "-filelog", str(dep.root / "xinetd.log")],
        env=dep.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)

    def up():
        if proc.poll() is not None:
            log = (dep.root / "xinetd.log")
            raise AssertionError("xinetd exited: " + proc.stderr.read().decode()
                                 + (log.read_text() if log.exists() else ""))
        return dw.listening(port)

    dw.wait_for(up, what="xinetd to listen")
    return proc


def _session_with_process_check(world, port: int, check) -> bool:
    """A client session; `check()` runs while the server side is alive.
    True when the message was relayed."""
    ctx = world.ssl_context()
    with smtplib.SMTP("localhost", port, timeout=30) as client:
        client.ehlo("client.test")
        assert "starttls" in client.esmtp_features
        assert "auth" not in client.esmtp_features or True
        # mailerEncryption = required (the shipped config): no AUTH in clear
        code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAHg=")
        assert code == 538
        check()
        client.starttls(context=ctx)
        client.ehlo("client.test")
        client.login("alice", world.users["alice"].password)
        return _send(client)


def _serving_processes(xinetd_pid: int) -> list[dict]:
    procs = []
    for pid in dw.descendants(xinetd_pid):
        try:
            procs.append(dw.credentials(pid))
        except OSError:
            pass
    return procs


@pytest.mark.parametrize("source", ["xinetd", "inetd"])
def test_root_started_frontend_socketpair_authenticator(world, frontend, upstream, deployment,
                                                        source):
    """xinetd's submission-root block, and the inetd line (through itox)."""
    dep = deployment
    port = dw.free_tcp_port()
    attrs = _xinetd_block("submission-root") if source == "xinetd" else _inetd_block()
    assert attrs["user"] == "= root"
    conf = _xinetd_config(dep, attrs, port)
    assert not dep.auth_socket.exists()  # no daemon: the frontend forks its own
    proc = _start_xinetd(dep, conf, port)
    seen = {}
    try:
        def check():
            procs = _serving_processes(proc.pid)
            front = [p for p in procs if any(a.endswith("/sendooway") for a in p["cmdline"][:2])]
            auth = [p for p in procs if any(a.endswith("sendooway-auth") or a == "sendooway_auth"
                                            for a in p["cmdline"])]
            seen["front"], seen["auth"] = front, auth

        relayed = _session_with_process_check(world, port, check)
    finally:
        dw.stop(proc)
    front, auth = seen["front"], seen["auth"]
    assert len(front) == 1, seen
    # the frontend serving the client runs as nobody, no groups left
    assert front[0]["Uid"] == [dw.NOBODY_UID] * 4
    assert front[0]["Groups"] == []
    # its private authenticator (`sendooway-auth --fd N` on the socketpair,
    # with its file-reader helper) is the root part
    assert auth and all(p["Uid"][0] == 0 and "--fd" in p["cmdline"] for p in auth), seen
    _delivered_or_skip(world, upstream, dep, relayed)


def test_xinetd_nobody_block_with_daemon(world, frontend, upstream, deployment):
    dep = deployment
    port = dw.free_tcp_port()
    conf = _xinetd_config(dep, _xinetd_block("submission-nobody"), port)
    daemon = dw.start_auth_daemon(dep, ["--failure-delay", "0"])
    proc = None
    seen = {}
    try:
        proc = _start_xinetd(dep, conf, port)

        def check():
            seen["procs"] = _serving_processes(proc.pid)

        # a wrong password first: the client address must reach the
        # authenticator's log, where the shipped fail2ban filter finds it
        assert dw.wrong_password_session(port, world) == [535]
        relayed = _session_with_process_check(world, port, check)
    finally:
        if proc is not None:
            dw.stop(proc)
        dw.stop(daemon)
    procs = seen["procs"]
    assert procs, "xinetd started no server"
    for p in procs:  # nothing under xinetd runs as root
        assert p["Uid"] == [dw.NOBODY_UID] * 4, p
        assert p["Gid"][0] == dw.SSL_CERT_GID, p  # group = ssl-cert: reads the 0640 key
    assert os.stat(dep.key).st_mode & 0o777 == 0o640
    assert "auth ok: user=alice" in dep.auth_log.read_text()
    f2b = _fail2ban_regex(dep.auth_log, dep.root)
    assert f2b.stdout.split() == ["127.0.0.1"], f2b.stdout + f2b.stderr
    _delivered_or_skip(world, upstream, dep, relayed)


def test_xinetd_nobody_block_without_daemon_greets_421(world, frontend, upstream, deployment):
    """docs/deployment.md, troubleshooting: "421 in the greeting" means the
    frontend could not reach the authenticator; its log names the socket."""
    dep = deployment
    port = dw.free_tcp_port()
    proc = _start_xinetd(dep, _xinetd_config(dep, _xinetd_block("submission-nobody"), port), port)
    try:
        with smtplib.SMTP(timeout=30) as client:
            code, text = client.connect("127.0.0.1", port)
    except smtplib.SMTPConnectError as exc:
        code, text = exc.smtp_code, exc.smtp_error
    finally:
        dw.stop(proc)
    assert code == 421, text
    assert "421 in the greeting" in (REPO / "docs" / "deployment.md").read_text()
    assert str(dep.auth_socket) in dep.front_log.read_text()


# ------------------------------------------------------------ systemd Accept=yes


def _as_the_unit(svc: configparser.SectionProxy) -> list[str]:
    """setpriv as the shipped frontend unit runs it: root (no User=), only
    the capabilities of its bounding set, NoNewPrivileges."""
    assert "User" not in svc and "Group" not in svc and svc["NoNewPrivileges"] == "yes"
    caps = ",".join("+" + c.lower().removeprefix("cap_")
                    for c in svc["CapabilityBoundingSet"].split())
    return ["setpriv", "--inh-caps=-all", f"--bounding-set=-all,{caps}", "--no-new-privs", "--"]


def _unit_section(name: str, section: str) -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment]
    cp.read_string((PACKAGING / "systemd" / name).read_text())
    return cp[section]


@pytest.mark.parametrize("unit,passing", [("sendooway", "--inetd"), ("sendooway", "LISTEN_FDS"),
                                          ("sendooways", "--inetd")])
def test_systemd_accept_units_serve_a_session(world, frontend, upstream, deployment, unit,
                                              passing):
    """systemd-socket-activate --accept runs the service's command line per
    connection as the unit does (setpriv: root with only the unit's
    CapabilityBoundingSet, NoNewPrivileges); the frontend drops to nobody
    itself. systemd gives an Accept=yes service the connection on
    stdin/stdout (StandardInput=socket: --inetd) and as fd 3 with
    LISTEN_FDS=1."""
    if not shutil.which("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate not installed")
    dep = deployment
    sock = _unit_section(f"{unit}.socket", "Socket")
    svc = _unit_section(f"{unit}@.service", "Service")
    assert sock["Accept"] == "yes" and svc["StandardInput"] == "socket"
    argv = shlex.split(rewrite_paths(svc["ExecStart"]).replace("/etc/sendooway.conf",
                                                                str(dep.config)))
    argv += ["-l", str(dep.front_log)]
    as_unit_user = _as_the_unit(svc)
    port = dw.free_tcp_port()
    setenv = [a for k in ("LD_PRELOAD", "LD_LIBRARY_PATH", "NSS_WRAPPER_PASSWD",
                          "NSS_WRAPPER_GROUP", "PATH")
              for a in ("-E", f"{k}={dep.env[k]}") if k in dep.env]
    daemon = dw.start_auth_daemon(dep, ["--failure-delay", "0"])
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--accept",
         *(["--inetd"] if passing == "--inetd" else []), *setenv, *as_unit_user, *argv],
        env=dep.env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        dw.wait_for(lambda: dw.listening(port), what="systemd-socket-activate")
        ctx = world.ssl_context()
        if "--ssl" in argv:
            client = smtplib.SMTP_SSL("localhost", port, context=ctx, timeout=30)
        else:
            client = smtplib.SMTP("localhost", port, timeout=30)
        with client:
            client.ehlo("client.test")
            if "--ssl" not in argv:
                client.starttls(context=ctx)
                client.ehlo("client.test")
            else:
                assert "starttls" not in client.esmtp_features
            served_by = [dw.credentials(p) for p in dw.descendants(proc.pid)]
            client.login("alice", world.users["alice"].password)
            relayed = _send(client)
    finally:
        dw.stop(proc)
        dw.stop(daemon)
    assert served_by and all(p["Uid"] == [dw.NOBODY_UID] * 4 for p in served_by), served_by
    _delivered_or_skip(world, upstream, dep, relayed)


def test_systemd_accept_no_keeps_the_upstream_login(world, frontend, upstream, deployment):
    """docs/deployment.md, scaling: with Accept=no one frontend process
    serves the listening socket, and smarthostCache (30 s in the shipped
    config) carries the upstream login from one client session to the next."""
    if not shutil.which("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate not installed")
    dep = deployment
    guide = (REPO / "docs" / "deployment.md").read_text()
    assert "`Accept=no` whose service runs `sendooway` without `-b`" in guide
    svc = _unit_section("sendooway@.service", "Service")
    argv = shlex.split(rewrite_paths(svc["ExecStart"]).replace("/etc/sendooway.conf",
                                                                str(dep.config)))
    argv += ["-l", str(dep.front_log)]
    as_nobody = _as_the_unit(svc)
    setenv = [a for k in ("LD_PRELOAD", "LD_LIBRARY_PATH", "NSS_WRAPPER_PASSWD",
                          "NSS_WRAPPER_GROUP", "PATH")
              for a in ("-E", f"{k}={dep.env[k]}") if k in dep.env]
    port = dw.free_tcp_port()
    daemon = dw.start_auth_daemon(dep, ["--failure-delay", "0"])
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", *setenv, *as_nobody, *argv],
        env=dep.env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    relayed = []
    try:
        dw.wait_for(lambda: dw.listening(port), what="systemd-socket-activate")
        ctx = world.ssl_context()
        for _ in range(2):
            with smtplib.SMTP("localhost", port, timeout=30) as client:
                client.ehlo("client.test")
                client.starttls(context=ctx)
                client.ehlo("client.test")
                client.login("alice", world.users["alice"].password)
                relayed.append(_send(client))
            # the same process (systemd-socket-activate exec'd it) serves both
            assert dw.credentials(proc.pid)["Uid"] == [dw.NOBODY_UID] * 4
    finally:
        dw.stop(proc)
        dw.stop(daemon)
    if not all(relayed):
        _delivered_or_skip(world, upstream, dep, False)
    assert len(upstream.messages) == 2
    assert upstream.logins == [dw.UPSTREAM_USER], upstream.logins  # one login, two messages


def test_key_is_readable_only_through_the_ssl_cert_group(world, frontend, deployment):
    """docs/deployment.md, section 3: the key is root:ssl-cert 0640; the
    frontend started as nobody reads it only with that group, and without it
    logs an error naming the key and its config line (here one session on a
    pipe, as inetd would run it: served with STARTTLS refused; under systemd
    or with -b it does not start, see test_bad_tls_key_is_a_clear_startup_error)."""
    dep = deployment
    st = os.stat(dep.key)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, dw.SSL_CERT_GID, 0o640)
    svc = _unit_section("sendooway@.service", "Service")
    argv = shlex.split(rewrite_paths(svc["ExecStart"]).replace("/etc/sendooway.conf",
                                                                str(dep.config)))
    argv += ["-l", str(dep.front_log)]

    def run(groups: str):
        return subprocess.run(["setpriv", f"--reuid={dw.NOBODY_UID}", f"--regid={dw.NOBODY_UID}",
                               groups, "--", *argv], input=b"QUIT\r\n", env=dep.env,
                              capture_output=True, timeout=60)

    r = run("--clear-groups")
    logged = dep.front_log.read_text()
    assert f"{dep.key}: cannot read TLS key" in logged, logged
    assert "STARTTLS is refused in this session" in logged
    assert r.stdout.startswith(b"220 "), r.stdout + r.stderr
    dep.front_log.write_text("")
    r = run(f"--groups={dw.SSL_CERT_GID}")
    # past the key: the key loaded, no error about it
    assert r.returncode == 0 and r.stdout.startswith(b"220 "), r.stdout + r.stderr
    assert "cannot read TLS key" not in dep.front_log.read_text()
    assert "start-up error about the key" in (REPO / "docs" / "deployment.md").read_text()


# ------------------------------------------------------------ man page example


def test_man_page_test_mode_example_gives_a_session(frontend):
    """sendooway(1): `sendooway -c /dev/null -l '&2'` is a session with every default."""
    assert "sendooway \\-c /dev/null \\-l \\(aq&2\\(aq" in man_text("sendooway.1")
    r = subprocess.run([command("sendooway"), "-c", "/dev/null", "-l", "&2"],
                       input=b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nQUIT\r\n",
                       capture_output=True, timeout=60)
    lines = r.stdout.decode().split("\r\n")
    assert lines[0].startswith("220 "), lines
    ehlo = [l[4:] for l in lines if l.startswith("250")]
    assert "AUTH PLAIN LOGIN" in ehlo and "PIPELINING" in ehlo
    assert "STARTTLS" not in ehlo  # no certificate configured
    assert any(l.startswith("530 ") for l in lines)  # MAIL before AUTH
    assert lines[-2].startswith("221 ")
    assert r.returncode == 0 and b"sendooway[" in r.stderr  # the log went to stderr


# ------------------------------------------------------------ README demo


def test_readme_demo_command_runs():
    """README: `bash scripts/demo.sh` = setup + `python -m bench.demo`."""
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme
    demo_sh = (REPO / "scripts" / "demo.sh").read_text()
    m = re.search(r"exec \.venv/bin/python -m (\S+)", demo_sh)
    assert m, "scripts/demo.sh no longer runs a python module"
    module = m.group(1)
    if not (REPO / (module.replace(".", "/") + ".py")).exists():
        pytest.skip(f"the demo ({module}, issue 6) is not built yet")
    # setup.sh is what the machine already ran; run the demo part itself
    r = subprocess.run([sys.executable, "-m", module], cwd=REPO, capture_output=True,
                       text=True, timeout=90, env={k: v for k, v in os.environ.items()
                                                  if not k.startswith(("NSS_WRAPPER", "PAM_WRAPPER", "SENDOOWAY_TEST"))
                                                  and k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo: OK" in r.stdout and "<~  250 " in r.stdout, r.stdout[-3000:]
