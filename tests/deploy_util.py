"""Helpers for the deployment tests: the shipped files, rewritten only in
their paths and ports, and the real programs that use them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
MAN = REPO / "docs" / "man"
VENV_BIN = Path(sys.executable).parent  # the .venv the tests run in
INSTALL_BIN = "/usr/local/bin/"  # where the shipped files expect the commands

UNITS = (
    "sendooway-auth.socket",
    "sendooway-auth.service",
    "sendooway.socket",
    "sendooway@.service",
    "sendooways.socket",
    "sendooways@.service",
)
MAN_PAGES = ("sendooway.1", "sendooway.conf.5", "sendooway-auth.8")


def command(name: str) -> str:
    """The installed command `name` of the venv under test."""
    return str(VENV_BIN / name)


def rewrite_paths(text: str) -> str:
    """Point the shipped files at the venv's commands instead of /usr/local/bin."""
    return text.replace(INSTALL_BIN + "sendooway", str(VENV_BIN / "sendooway"))


# ------------------------------------------------------------ man pages


def man_text(page: str) -> str:
    return (MAN / page).read_text()


def man_section(page: str, name: str) -> str:
    """The roff source of section `.SH name` (up to the next .SH)."""
    text = man_text(page)
    m = re.search(rf"^\.SH {re.escape(name)}\n(.*?)(?=^\.SH |\Z)", text, re.M | re.S)
    assert m, f"{page} has no section {name}"
    return m.group(1)


def man_options(page: str) -> set[str]:
    """Options documented as .TP items in the OPTIONS section: {'-c', '--config', ...}."""
    section = man_section(page, "OPTIONS")
    found: set[str] = set()
    lines = section.splitlines()
    for i, line in enumerate(lines):
        if i and lines[i - 1].strip() in (".TP", ".TQ") and line.startswith((".B", ".I")):
            unescaped = line.replace("\\-", "-")
            found.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", unescaped))
    return found


def help_option_groups(program: str) -> list[set[str]]:
    """Options the real command lists in its -h output, one set of aliases
    per option: [{'-c', '--config'}, {'--socket'}, ...]."""
    out = subprocess.run([command(program), "-h"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    groups = []
    for line in out.stdout.splitlines():
        stripped = line.strip()
        if stripped.startswith("-"):
            # "-c CONFIG, --config CONFIG   help..." → the option names
            head = re.split(r"\s{2,}", stripped)[0]
            groups.append(set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", head)))
    return groups


def help_options(program: str) -> set[str]:
    return set().union(*help_option_groups(program))


def man_keywords() -> set[str]:
    """Keywords documented as items (`.BR keyword " = ...`) in sendooway.conf(5)."""
    section = man_section("sendooway.conf.5", "KEYWORDS")
    return set(re.findall(r"^\.BR (\w+) \" = ", section, re.M))


# ------------------------------------------------------------ PAM


def pam_service_dir(root: Path, world) -> Path:
    """A pam_wrapper service dir holding the shipped /etc/pam.d/sendooway.

    pam_wrapper only redirects the service file itself, so the shipped
    `@include common-auth` lines are made absolute (into this dir); there
    common-auth/common-account check the fake world's users with pam_matrix.
    """
    d = root / "pam.d"
    d.mkdir(parents=True, exist_ok=True)
    shipped = (PACKAGING / "pam.d" / "sendooway").read_text()
    text = re.sub(r"^@include (\S+)", lambda m: f"@include {d}/{m.group(1)}", shipped, flags=re.M)
    assert text != shipped, "the shipped PAM file has no @include lines"
    (d / "sendooway").write_text(text)
    world_service = Path(world.pam_dir, "sendooway").read_text().splitlines()
    auth = [line for line in world_service if line.startswith("auth ")]
    account = [line for line in world_service if line.startswith("account ")]
    (d / "common-auth").write_text("\n".join(auth) + "\n")
    (d / "common-account").write_text("\n".join(account) + "\n")
    os.chmod(root, 0o755)
    os.chmod(d, 0o755)
    return d


def system_env() -> dict[str, str]:
    """The environment without the fake world: for system tools that need
    neither fake users nor fake PAM (systemd-analyze, groff, fail2ban)."""
    env = dict(os.environ)
    for name in ("LD_PRELOAD", "LD_LIBRARY_PATH", "PAM_WRAPPER", "PAM_WRAPPER_SERVICE_DIR",
                 "NSS_WRAPPER_PASSWD", "NSS_WRAPPER_GROUP"):
        env.pop(name, None)
    return env
