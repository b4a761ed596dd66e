"""An outside admin follows docs/deployment.md, the man pages and packaging/
literally (a review). Each test pins a place where the words and the
product disagreed, checked against the real programs and the shipped files;
each failed on the state before its fix."""

from __future__ import annotations

import os
import re
import shutil
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
