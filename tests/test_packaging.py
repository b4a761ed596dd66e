"""The shipped deployment files, checked with the real tools that read them:
the project's config parser, systemd-analyze, groff, libpam (pam_wrapper),
fail2ban-client, pip."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import zipfile
import tarfile
from pathlib import Path

import pytest

from sendooway_shared.config import KEYWORD_NAMES, MailerEncryption, load_config, parse_config

from .deploy_util import (
    MAN,
    MAN_PAGES,
    PACKAGING,
    REPO,
    UNITS,
    help_option_groups,
    help_options,
    man_keywords,
    man_options,
    man_text,
    pam_service_dir,
    rewrite_paths,
    system_env,
)

# ------------------------------------------------------------ example config


def test_example_config_parses_with_secure_values():
    cfg = load_config(str(PACKAGING / "sendooway.conf"))
    assert cfg.mailerEncryption is MailerEncryption.REQUIRED
    assert cfg.frontendUser == "nobody"
    assert cfg.authSocket == "/run/sendooway/auth.sock"
    assert cfg.pamService == "sendooway"
    assert cfg.sslCert and cfg.sslKey
    assert cfg.userInclude == "%h/.sendoowayrc"
    assert [str(m) for m in cfg.smarthostMapping] == [
        "getmail:%h/.getmail/getmailrc",
        "fetchmail:%h/.fetchmailrc",
    ]


def test_example_config_names_every_keyword_with_a_comment():
    lines = (PACKAGING / "sendooway.conf").read_text().splitlines()
    setting = re.compile(r"#?(\w+) =( |$)")
    for keyword in KEYWORD_NAMES:
        where = [i for i, line in enumerate(lines)
                 if (m := setting.match(line)) and m.group(1) == keyword]
        assert where, f"{keyword} missing from the example config"
        # walk up over the keyword lines of its group to the comment
        i = where[0] - 1
        while i >= 0 and setting.match(lines[i]):
            i -= 1
        assert i >= 0 and lines[i].startswith("# "), f"{keyword} has no comment above it"
    # commented-out examples parse too once enabled
    enabled = "\n".join(re.sub(r"^#(\w+ = )", r"\1", line) for line in lines)
    cfg = parse_config(enabled, "enabled-example")
    assert cfg.validUser == ("%mailusers", "alice")
    assert any(m.direct is not None for m in cfg.smarthostMapping)


# ------------------------------------------------------------ systemd


def _units_for_verify(tmp_path: Path, mutate=None) -> list[str]:
    d = tmp_path / "units"
    d.mkdir()
    paths = []
    for name in UNITS:
        text = rewrite_paths((PACKAGING / "systemd" / name).read_text())
        if mutate:
            text = mutate(name, text)
        (d / name).write_text(text)
        paths.append(str(d / name))
    return paths


def _verify(paths, tmp_path: Path):
    """systemd-analyze verify; with man(1) present it also checks that every
    Documentation=man:... page exists (ours from a temp MANPATH)."""
    env = system_env()
    man = "--man=no"
    if shutil.which("man"):
        man = "--man=yes"
        tree = tmp_path / "man"
        for page in MAN_PAGES:
            section = tree / f"man{page.rsplit('.', 1)[1]}"
            section.mkdir(parents=True, exist_ok=True)
            shutil.copy(MAN / page, section)
        env["MANPATH"] = f"{tree}:/usr/share/man"
    return subprocess.run(["systemd-analyze", "verify", man, *paths],
                          capture_output=True, text=True, timeout=60, env=env)


KNOWN_NOTE = re.compile(r": Special user nobody configured, this is not safe!$")


def test_systemd_analyze_verify_passes(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    r = _verify(_units_for_verify(tmp_path), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # The only remark allowed is systemd's note about User=nobody (the
    # default frontendUser; docs/deployment.md explains).
    remarks = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert all(KNOWN_NOTE.search(line) for line in remarks), remarks


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")

    def break_auth(name, text):
        if name == "sendooway-auth.service":
            return text.replace("ExecStart=" + str(Path(sys.executable).parent),
                                "ExecStart=/nonexistent")
        return text

    r = _verify(_units_for_verify(tmp_path, break_auth), tmp_path)
    assert r.returncode != 0
    assert "/nonexistent" in r.stdout + r.stderr


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment]
    cp.read_string((PACKAGING / "systemd" / name).read_text())
    return cp


def test_systemd_units_have_the_promised_shape():
    auth = _unit("sendooway-auth.service")["Service"]
    assert auth["Type"] == "notify"
    assert auth["ProtectHome"] == "read-only"
    assert auth["ProtectSystem"] == "strict"
    assert auth["NoNewPrivileges"] == "yes"
    assert auth["PrivateTmp"] == "yes"
    # AF_NETLINK: libpam's audit records (CAP_AUDIT_WRITE), no network
    assert set(auth["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_NETLINK"}
    # CAP_DAC_OVERRIDE: pam_faillock's tallies (test below)
    assert set(auth["CapabilityBoundingSet"].split()) == {
        "CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_AUDIT_WRITE",
        "CAP_DAC_OVERRIDE"}
    cfg = load_config(str(PACKAGING / "sendooway.conf"))
    sock = _unit("sendooway-auth.socket")["Socket"]
    assert sock["ListenStream"] == cfg.authSocket
    assert sock["SocketUser"] == cfg.frontendUser and sock["SocketMode"] == "0600"
    for socket_name, port, extra in (("sendooway", "587", ""), ("sendooways", "465", " --ssl")):
        s = _unit(f"{socket_name}.socket")["Socket"]
        assert s["ListenStream"] == port and s["Accept"] == "yes"
        svc = _unit(f"{socket_name}@.service")["Service"]
        assert svc["ExecStart"] == f"/usr/local/bin/sendooway -c /etc/sendooway.conf{extra}"
        # started as root, dropping to frontendUser itself: never exec'd as
        # nobody, whose other processes could open its memory (a review)
        assert "User" not in svc and "SupplementaryGroups" not in svc
        assert set(svc["CapabilityBoundingSet"].split()) == {
            "CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE"}
        assert svc["NoNewPrivileges"] == "yes"
        assert svc["StandardInput"] == "socket"



def test_auth_unit_lets_pam_faillock_count():
    """Under a real systemd (tools/systemd-check), pam_faillock in
    common-auth never locked anyone: its tally file in /run/faillock belongs
    to the user (0600), and root without CAP_DAC_OVERRIDE got EACCES at each
    update, which pam_faillock ignores; and with no failed login since boot
    there was no /run/faillock for `ReadWritePaths=-` to open up."""
    auth = _unit("sendooway-auth.service")["Service"]
    assert "CAP_DAC_OVERRIDE" in auth["CapabilityBoundingSet"].split()
    assert "faillock" in auth["RuntimeDirectory"].split()
    assert auth["RuntimeDirectoryPreserve"] == "yes"  # tallies outlive a restart


def test_session_units_survive_a_restart_of_the_authenticator_socket():
    """Requires= on sendooway-auth.socket made systemd restart every running
    session unit with `systemctl restart sendooway-auth.socket` (found under
    a real systemd): a second frontend on the same connection greeted a
    client that was inside TLS, logged in, in clear text. Wants= starts the
    socket just the same and never propagates a stop or restart."""
    for name in ("sendooway@.service", "sendooways@.service"):
        unit = _unit(name)["Unit"]
        assert unit["Wants"] == "sendooway-auth.socket"
        assert unit["After"] == "sendooway-auth.socket"
        for key in ("Requires", "Requisite", "BindsTo", "PartOf"):
            assert key not in unit, f"{name}: {key}= propagates stops and restarts"


def test_deployment_makes_the_venv_with_the_system_python():
    """`python3 -m venv` takes the first python3 in root's PATH: with pyenv's
    under /root, the units' ProtectHome=yes hides the interpreter and every
    session fails with "Failed to execute /usr/local/bin/sendooway: No such
    file or directory" (status 203/EXEC; found under a real systemd)."""
    text = (REPO / "docs" / "deployment.md").read_text()
    venv_lines = [line for line in text.splitlines() if " -m venv " in line]
    assert venv_lines and all(line.startswith("/usr/bin/python3 -m venv ") for line in venv_lines), venv_lines



def test_deployment_says_how_the_units_log_to_a_file():
    """`-l /var/log/...` under the shipped units (ProtectSystem=strict) made
    every session 421 with "cannot open log ...: Read-only file system"
    (found under a real systemd); section 4 now gives the drop-in, which
    tools/systemd-check runs as written."""
    text = (REPO / "docs" / "deployment.md").read_text()
    section = text.split("## 4. Logging", 1)[1].split("\n## 5.", 1)[0]
    for log in ("/var/log/sendooway-auth.log", "/var/log/sendooway.log"):
        assert f"ReadWritePaths={log}" in section
        assert f"install -m 0600 /dev/null {log}" in section
    assert "Read-only file system" in section


# ------------------------------------------------------------ man pages


@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_renders_without_warnings(page):
    r = subprocess.run(["groff", "-man", "-ww", "-z", str(MAN / page)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_name_section_is_indexable(page):
    """whatis/apropos (man-db's lexgrog) read the NAME line, as lintian checks."""
    if not shutil.which("lexgrog"):
        pytest.skip("man-db (lexgrog) not installed")
    r = subprocess.run(["lexgrog", str(MAN / page)], capture_output=True, text=True,
                       timeout=30, env=system_env())
    name = page.rsplit(".", 1)[0]
    assert r.returncode == 0 and f': "{name} - ' in r.stdout, r.stdout + r.stderr


def test_groff_check_does_flag_a_broken_page(tmp_path):
    broken = tmp_path / "broken.1"
    broken.write_text(man_text("sendooway.1").replace(".SH OPTIONS", ".SH OPTIONS\n.XZ undefined"))
    r = subprocess.run(["groff", "-man", "-ww", "-z", str(broken)],
                       capture_output=True, text=True, timeout=30)
    assert "XZ" in r.stderr


@pytest.mark.parametrize("program,page", [("sendooway", "sendooway.1"),
                                          ("sendooway-auth", "sendooway-auth.8")])
def test_man_page_options_match_the_real_help(program, page):
    in_help = help_options(program)
    in_man = man_options(page)
    assert in_help - in_man == set(), f"options missing from {page}"
    assert in_man - in_help == set(), f"options in {page} that {program} does not have"
    # and the SYNOPSIS shows each option under one of its names
    synopsis = man_text(page).split(".SH DESCRIPTION")[0].replace("\\-", "-")
    shown = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", synopsis))
    for group in help_option_groups(program):
        assert group & shown, f"{sorted(group)} missing from the SYNOPSIS of {page}"


def test_conf_man_page_documents_exactly_the_keywords():
    documented = man_keywords()
    assert set(KEYWORD_NAMES) - documented == set(), "keywords missing from sendooway.conf(5)"
    assert documented - set(KEYWORD_NAMES) == set(), "keywords in sendooway.conf(5) the parser lacks"


def test_conf_man_page_examples_parse(tmp_path):
    text = man_text("sendooway.conf.5")
    blocks = re.findall(r"^\.EX\n(.*?)^\.EE", text, re.M | re.S)
    conf_blocks = [b.replace("\\-", "-") for b in blocks
                   if re.search(r"^\w+ = ", b, re.M) and "[sender]" not in b
                   and not b.lstrip().startswith("poll")]
    assert len(conf_blocks) >= 2
    from sendooway_shared.config import parse_user_config
    for b in conf_blocks:
        if b.lstrip().startswith("# ~/.sendoowayrc"):
            parse_user_config(b, "sendoowayrc-example")
        else:
            parse_config(b, "example")


# ------------------------------------------------------------ PAM


def test_shipped_pam_file_works_with_real_libpam(world, tmp_path):
    """libpam (through pam_wrapper) reads the shipped file and its includes."""
    service_dir = pam_service_dir(tmp_path, world)
    env = world.env()
    env["PAM_WRAPPER_SERVICE_DIR"] = str(service_dir)
    alice = world.users["alice"]
    code = (
        "import pam, sys\n"
        "p = pam.pam()\n"
        "ok = p.authenticate(sys.argv[1], sys.argv[2], service='sendooway')\n"
        "bad = p.authenticate(sys.argv[1], 'wrong-password', service='sendooway')\n"
        "print(ok, bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, "alice", alice.password],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.stdout.split() == ["True", "False"], r.stderr
    # and without the includes nothing passes: the includes are what is used
    (service_dir / "common-auth").write_text("")
    r = subprocess.run([sys.executable, "-c", code, "alice", alice.password],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.stdout.split() == ["False", "False"], r.stderr


# ------------------------------------------------------------ fail2ban jail


def test_fail2ban_jail_and_filter_load(tmp_path):
    if not shutil.which("fail2ban-client") or not os.path.isdir("/etc/fail2ban"):
        pytest.skip("fail2ban not installed")
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf, ignore=shutil.ignore_patterns("jail.d", "*.local"))
    (conf / "jail.d").mkdir()
    log = tmp_path / "mail.log"
    log.write_text("")
    jail = (PACKAGING / "fail2ban" / "jail.d" / "sendooway.conf").read_text()
    jail = jail.replace("%(syslog_mail)s", str(log)).replace("%(syslog_backend)s", "polling")
    (conf / "jail.d" / "sendooway.conf").write_text(jail)
    shutil.copy(PACKAGING / "fail2ban" / "filter.d" / "sendooway.conf", conf / "filter.d")
    r = subprocess.run(["fail2ban-client", "-c", str(conf), "-d"],
                       capture_output=True, text=True, timeout=60, env=system_env())
    assert r.returncode == 0, r.stderr
    dump = r.stdout
    assert "['add', 'sendooway', 'polling']" in dump
    assert f"['set', 'sendooway', 'addlogpath', '{log}'" in dump
    assert "['set', 'sendooway', 'maxretry', 5]" in dump
    assert "sendooway-auth" in dump  # the filter's failregex, _daemon expanded
    # the other jails of the stock config stay off
    assert "['add', 'sshd'" not in dump


# ------------------------------------------------------------ pip / sdist / wheel


def _copy_source(dest: Path) -> Path:
    src = dest / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith((".venv", "sendooway.egg-info")) or not (REPO / f).is_file():
            continue
        target = src / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, target)
    return src


def test_sdist_and_wheel_install_commands_and_ship_man_pages(tmp_path):
    probe = subprocess.run(["/usr/bin/python3", "-c", "import setuptools, wheel"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs the Debian packages python3-setuptools and python3-wheel")
    src = _copy_source(tmp_path)
    venv = tmp_path / "venv"
    # A fresh venv from the system interpreter; its own setuptools/wheel are
    # the system's, so nothing is downloaded.
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    py = str(venv / "bin" / "python")
    dist = tmp_path / "dist"
    r = subprocess.run([py, "-c",
                        "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))",
                        str(dist)], cwd=src, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    sdist = dist / r.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for must in ("docs/man/sendooway.1", "docs/man/sendooway.conf.5", "docs/man/sendooway-auth.8",
                 "docs/deployment.md", "packaging/sendooway.conf", "packaging/xinetd/sendooway",
                 "packaging/systemd/sendooway@.service", "packaging/pam.d/sendooway",
                 "packaging/fail2ban/filter.d/sendooway.conf", "pyproject.toml"):
        assert must in names, f"{must} missing from the sdist"

    # wheel built from the sdist, as a packager does
    r = subprocess.run([py, "-m", "pip", "wheel", "--no-deps", "--no-index",
                        "--no-build-isolation", "-w", str(dist), str(sdist)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheel = next(dist.glob("sendooway-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        wnames = set(z.namelist())
    data = "sendooway-2.0.0.data/data/"
    for must in ("share/man/man1/sendooway.1", "share/man/man5/sendooway.conf.5",
                 "share/man/man8/sendooway-auth.8", "share/doc/sendooway/deployment.md",
                 "share/doc/sendooway/examples/sendooway.conf",
                 "share/doc/sendooway/examples/systemd/sendooway-auth.service",
                 "share/doc/sendooway/examples/xinetd/sendooway",
                 "share/doc/sendooway/examples/fail2ban/jail.d/sendooway.conf"):
        assert data + must in wnames, f"{must} missing from the wheel"
    assert any(n.endswith("entry_points.txt") for n in wnames)

    r = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (venv / "share/man/man8/sendooway-auth.8").read_bytes() == \
        (MAN / "sendooway-auth.8").read_bytes()
    # The commands are on PATH; their dependencies come from the test venv.
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = subprocess.run([sys.executable, "-c", "import msgpack, os; print(os.path.dirname(os.path.dirname(msgpack.__file__)))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "zz-test-deps.pth").write_text(deps + "\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    for program in ("sendooway", "sendooway-auth"):
        assert shutil.which(program, path=env["PATH"]) == str(venv / "bin" / program)
        r = subprocess.run([program, "-V"], env=env, capture_output=True, text=True, timeout=60,
                           cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.strip() == f"{program} 2.0.0", r.stderr
        # the installed code is the wheel's, not the source tree's
        r = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import sendooway_front, sendooway_auth, sendooway_shared; "
                            "print(sendooway_front.__file__)"],
                           env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert r.stdout.startswith(str(venv)), r.stdout + r.stderr


def test_conf_man_page_user_file_examples_parse_with_the_authenticator():
    """The fetchmailrc and getmail rc examples of sendooway.conf(5), read by
    the authenticator's own parsers."""
    from sendooway_auth.fetchmail import parse_fetchmailrc
    from sendooway_auth.getmail import parse_getmailrc

    text = man_text("sendooway.conf.5")
    blocks = [b.replace("\\-", "-") for b in
              re.findall(r"^\.EX\n(.*?)^\.EE", text, re.M | re.S)]
    fetchmail = next(b for b in blocks if b.lstrip().startswith("poll"))
    getmail = next(b for b in blocks if "[sender]" in b)
    r = parse_fetchmailrc(fetchmail, "fetchmailrc-example")
    assert r.errors == [] and len(r.accounts) == 1
    a = r.accounts[0]
    assert a.addresses == ("alice@example.org",)
    assert (a.route.server, a.route.port, a.route.tls.value) == ("smtp.example.org", 587, "starttls")
    assert a.route.user == "alice" and a.route.password.reveal() == "s3cret"  # fetchmail's own
    r = parse_getmailrc(getmail, "getmailrc-example")
    assert r.errors == [] and len(r.accounts) == 1
    a = r.accounts[0]
    assert set(a.addresses) == {"alice@example.net", "a.smith@example.net"}
    assert (a.route.server, a.route.port, a.route.tls.value) == ("smtp.example.net", 465, "tls")
    assert a.route.user == "alice"  # the retriever's
