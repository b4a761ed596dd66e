#!/usr/bin/env python3
"""Coverage-guided fuzzing of the getmail rc parser
(`sendooway_auth.getmail.parse_getmailrc`): any text gives an account or
messages, never an exception; every message names the file; a password
planted in the input never shows in an error or warning.

    .venv/bin/python tools/fuzz/fuzz_getmail.py -max_total_time=600 \\
        -dict=tools/fuzz/getmail.dict tools/fuzz/corpus/getmail
"""

from __future__ import annotations

from _common import SECRET, atheris, run

with atheris.instrument_imports(include=["sendooway_auth", "sendooway_shared"]):
    from sendooway_auth.getmail import parse_getmailrc

NAME = "/home/u/.getmail/getmailrc"
PLANTS = (f"password = {SECRET}", f"password: {SECRET}", f"password={SECRET}")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    plant = fdp.ConsumeIntInRange(0, len(PLANTS))
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    if plant < len(PLANTS):
        cut = len(text) // 2
        text = text[:cut] + "\n" + PLANTS[plant] + "\n" + text[cut:]
    result = parse_getmailrc(text, NAME)
    for message in result.errors + result.warnings:
        assert message.startswith(NAME + ":"), message
        if plant < len(PLANTS) and text.count(SECRET) == 1:
            assert SECRET not in message, message
    for account in result.accounts:
        assert account.route.server and 0 < account.route.port < 65536, account


if __name__ == "__main__":
    run(test_one_input)
