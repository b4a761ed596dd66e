"""Shared set-up of the fuzz targets: the repository on sys.path, atheris
with the project's modules instrumented, and a libFuzzer entry point."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import atheris  # noqa: E402  (the `test` extra installs it)

SECRET = "Fz-Secret-9q"  # a password the targets plant; no message may show it


def run(test_one_input) -> None:
    """libFuzzer's command line: corpus dirs, -max_total_time=N, -dict=FILE …"""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
