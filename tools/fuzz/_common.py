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


def check_user_file_parser(data: bytes, parse, name: str, plants: tuple[str, ...]) -> None:
    """One input for a user-file parser (fetchmailrc, getmailrc): maybe a
    planted password line in the middle of random text; the parser gives
    accounts or messages, never an exception; every message names the file
    and never shows the planted password; every account has a server and a
    port."""
    fdp = atheris.FuzzedDataProvider(data)
    plant = fdp.ConsumeIntInRange(0, len(plants))
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    if plant < len(plants):
        cut = len(text) // 2
        text = text[:cut] + "\n" + plants[plant] + "\n" + text[cut:]
    result = parse(text, name)
    for message in result.errors + result.warnings:
        assert message.startswith(name + ":"), message
        if plant < len(plants) and text.count(SECRET) == 1:
            assert SECRET not in message, message
    for account in result.accounts:
        assert account.route.server and 0 < account.route.port < 65536, account
