"""An outside admin follows docs/deployment.md, the man pages and packaging/
literally (a review). Each test pins a place where the words and the
product disagreed, checked against the real programs and the shipped files;
each failed on the state before its fix."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from . import deploy_world as dw
from .deploy_util import MAN, PACKAGING, REPO, command, man_text, system_env

GUIDE = REPO / "docs" / "deployment.md"


@pytest.fixture
def deployment(world):
    dep = dw.build(world, 2587)  # the upstream port is only looked up
    yield dep
    dep.cleanup()
    world.clear_home("alice")


def _guide_section(number: int) -> str:
    text = GUIDE.read_text()
    return text.split(f"\n## {number}. ", 1)[1].split("\n## ", 1)[0]


# ------------------------------------------------------------ troubleshooting


def test_troubleshooting_example_report_names_the_shipped_configs_lines(deployment):
    """Section 6 shows `sendooway-auth --check alice` on the shipped config:
    its mapping lines said `/etc/sendooway.conf:105:` and `:106:`, where the
    shipped file has its two smarthostMapping lines at 116 and 117 (the
    real report says so), so an admin comparing looked at the wrong lines.
    The example's mapping lines must be the real report's, path aside."""
    dep = deployment
    example = _guide_section(6).split("```\nsendooway-auth --check alice (config", 1)[1]
    example = example.split("```", 1)[0]
    doc_mappings = re.findall(r"^  /etc/sendooway\.conf:(\d+): (\w+):", example, re.M)
    assert len(doc_mappings) == 2, example
    r = subprocess.run([command("sendooway-auth"), "-c", str(dep.config), "--check", "alice",
                        "--sender", dw.SENDER], env=dep.env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    real = re.findall(rf"^  {re.escape(str(dep.config))}:(\d+): (\w+):", r.stdout, re.M)
    assert doc_mappings == real, (doc_mappings, r.stdout)


# ------------------------------------------------------------ fail2ban with -l


def _inetd_session(dep: dw.Deployment, args: list[str], lines: list[bytes]) -> bytes:
    """One session as inetd runs it: the accepted TCP connection on the
    frontend's stdin and stdout, the frontend started as root."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=30)
        conn, _ = listener.accept()
        with conn, client:
            proc = subprocess.Popen([command("sendooway"), *args], env=dep.env, stdin=conn,
                                    stdout=conn, stderr=subprocess.DEVNULL)
            conn.close()
            client.sendall(b"".join(line + b"\r\n" for line in lines))
            out = b""
            while chunk := client.recv(65536):
                out += chunk
            proc.wait(60)
    return out


def test_guide_points_the_jail_at_the_log_file_the_failures_go_to(deployment, tmp_path):
    """Section 4 tells how to log to files (`-l`, drop-ins) and then ships a
    jail reading /var/log/mail.log or the journal, where sendooway-auth
    writes nothing once it logs to a file: a careful admin following both
    got a jail that never bans. The guide now gives the jail's logpath
    for the file; the jail so changed loads in fail2ban and its filter
    finds the failure a root frontend under inetd (with `-l`) had its
    authenticator write into that file."""
    if not shutil.which("fail2ban-client") or not os.path.isdir("/etc/fail2ban"):
        pytest.skip("fail2ban not installed")
    dep = deployment
    section = _guide_section(4)
    m = re.search(r"`/etc/fail2ban/jail\.d/sendooway\.local`:\n\n```ini\n(.*?)```", section, re.S)
    assert m, "section 4 gives no jail for -l log files"
    local = m.group(1)
    assert "logpath = /var/log/sendooway-auth.log" in local and "backend = auto" in local

    # a failed login in the xinetd/inetd way, logged with -l (TLS not required here)
    config = dep.root / "plain.conf"
    config.write_text(dep.config.read_text().replace("mailerEncryption = required",
                                                     "mailerEncryption = allowed"))
    log = tmp_path / "sendooway-auth.log"
    out = _inetd_session(dep, ["-c", str(config), "-l", str(log)],
                         [b"EHLO client.test", b"AUTH PLAIN AGFsaWNlAHdyb25n", b"QUIT"])
    assert b"\r\n535 " in out, out
    assert "sendooway-auth[" in log.read_text() and "auth failed: user=alice" in log.read_text()

    # fail2ban's own configuration with the shipped jail, filter and the guide's .local
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf, ignore=shutil.ignore_patterns("jail.d", "*.local"))
    (conf / "jail.d").mkdir()
    shutil.copy(PACKAGING / "fail2ban" / "jail.d" / "sendooway.conf", conf / "jail.d")
    (conf / "jail.d" / "sendooway.local").write_text(
        local.replace("/var/log/sendooway-auth.log", str(log)))
    shutil.copy(PACKAGING / "fail2ban" / "filter.d" / "sendooway.conf", conf / "filter.d")
    r = subprocess.run(["fail2ban-client", "-c", str(conf), "-d"], capture_output=True,
                       text=True, timeout=60, env=system_env())
    assert r.returncode == 0, r.stderr
    assert "['add', 'sendooway', 'auto']" in r.stdout, r.stdout
    assert f"['set', 'sendooway', 'addlogpath', '{log}'" in r.stdout, r.stdout
    r = subprocess.run(["fail2ban-regex", "--out", "ip", str(log),
                        str(conf / "filter.d" / "sendooway.conf")],
                       capture_output=True, text=True, timeout=60, env=system_env())
    assert r.stdout.split() == ["127.0.0.1"], r.stdout + r.stderr


# ------------------------------------------------------------ unit hardening


def test_docs_name_every_address_family_the_auth_unit_allows():
    """deployment.md ("may open only UNIX sockets") and sendooway-auth(8)
    ("allows only UNIX sockets") described sendooway-auth.service, whose
    RestrictAddressFamilies= also allows AF_NETLINK (libpam's audit records,
    docs/decisions/deployment.md): an admin auditing the unit against the
    docs found a family the docs denied."""
    unit = (PACKAGING / "systemd" / "sendooway-auth.service").read_text()
    families = re.search(r"^RestrictAddressFamilies=(.*)$", unit, re.M).group(1).split()
    assert families == ["AF_UNIX", "AF_NETLINK"], families
    words = {"AF_UNIX": "UNIX", "AF_NETLINK": "netlink"}
    guide = " ".join(_guide_section(2).split())
    claim = re.search(r"\(`ProtectHome=read-only`\), may open only ([^,]*),", guide)
    assert claim, "section 2c no longer says which sockets the authenticator may open"
    page = " ".join(man_text("sendooway-auth.8").split("\n.SH SECURITY", 1)[1].split())
    page_claim = re.search(r"allows only ([^.]*)\.", page)
    assert page_claim, "sendooway-auth(8) SECURITY no longer says which sockets"
    for text in (claim.group(1), page_claim.group(1)):
        for family in families:
            assert words[family] in text, (family, text)


# ------------------------------------------------------------ README


def test_readme_layout_names_every_tool():
    """README.md's Layout named tools/fuzz/ and tools/fresh-debian/ but not
    tools/systemd-check/, the one deployment.md sends an admin to before
    changing the units."""
    layout = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("```", 2)[1]
    for tool in sorted(p.name for p in (REPO / "tools").iterdir() if p.is_dir()):
        assert f"tools/{tool}/" in layout, tool


# ------------------------------------------------------------ migrating: -b


def _listen_addresses(proc: subprocess.Popen, port: int) -> set[str]:
    def up():
        if proc.poll() is not None:
            raise AssertionError("sendooway -b exited: " + proc.stderr.read().decode())
        return dw.listening(port)

    dw.wait_for(up, timeout=30, what="sendooway -b to listen")
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    return {line.split()[3].rsplit(":", 1)[0] for line in out.stdout.splitlines()}


def test_migration_keeps_the_originals_b_port_and_says_how_it_differs(deployment):
    """The original's last version had `-b PORT` (its --help: "bind and
    listen on tcp port PORT", daemon.c: a socket on INADDR_ANY); section 5
    listed the kept command line without it and called `-b` new, so an
    admin with an init script running `sendooway -b submission` could not
    tell whether it keeps working, nor that it now listens on IPv6 too.
    The section now keeps `-b PORT` and names the difference and the
    original's IPv4-only socket, `-b 0.0.0.0:PORT`, which really is."""
    section = " ".join(_guide_section(5).split())
    kept = section.split("What stays the same:", 1)[1].split("What is different:", 1)[0]
    different = section.split("What is different:", 1)[1].split("New:", 1)[0]
    new = section.split("New:", 1)[1]
    assert "[-b PORT]" in kept, kept
    assert "for a standalone server" not in new, new
    assert "`-b PORT` listens on IPv6 as well as IPv4" in different, different
    assert "`-b 0.0.0.0:PORT` is the original's IPv4-only socket" in different, different

    dep = deployment
    for bind, expected in ((None, {"*"}), ("0.0.0.0", {"0.0.0.0"})):
        port = dw.free_tcp_port()
        spec = f"{bind}:{port}" if bind else str(port)
        proc = subprocess.Popen([command("sendooway"), "-c", str(dep.config), "-l",
                                 str(dep.front_log), "-b", spec],
                                env=dep.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            assert _listen_addresses(proc, port) == expected, spec
        finally:
            dw.stop(proc)


# ------------------------------------------------------------ -b: a stop of the whole group


def test_b_stopped_with_its_process_group_while_starting_stops_cleanly(deployment, tmp_path):
    """A root `sendooway -b` starts its private authenticator (a /bin/sh
    watcher and sendooway-auth) in its own process group. A stop of the
    whole group right after the port is up — systemd's KillMode=
    control-group for an admin's own `sendooway -b` unit, ^C in a
    terminal, the test helpers' killpg — killed the authenticator before
    it was ready: the watcher waited for the lifeline, the frontend 20 s
    for a READY that never came, then exited 1 with "sendooway-auth did not
    become ready" (or "exited with status -15 at start" when the watcher
    itself died first, leaving its private directory behind). The man page
    promises SIGTERM a clean stop, exit 0."""
    dep = deployment
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = dict(dep.env, TMPDIR=str(private_tmp))  # where the private directory goes
    for _ in range(4):
        port = dw.free_tcp_port()
        proc = subprocess.Popen([command("sendooway"), "-c", str(dep.config), "-l",
                                 str(dep.front_log), "-b", f"127.0.0.1:{port}"],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            dw.wait_for(lambda: dw.listening(port) or proc.poll() is not None, timeout=30,
                        what="sendooway -b to listen")
            os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait(12)
        except subprocess.TimeoutExpired:
            rc = "still running 12 s after the stop"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert rc == 0, (rc, dep.front_log.read_text()[-1500:])
        dw.wait_for(lambda: not any(private_tmp.iterdir()), timeout=10,
                    what="the private directory to go")
