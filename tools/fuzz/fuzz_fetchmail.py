#!/usr/bin/env python3
"""Coverage-guided fuzzing of the fetchmailrc parser
(`sendooway_auth.fetchmail.parse_fetchmailrc`): any text gives accounts
and messages, never an exception; every message names the file; a password
planted in the input never shows in an error or warning.

    .venv/bin/python tools/fuzz/fuzz_fetchmail.py -max_total_time=600 \\
        -dict=tools/fuzz/fetchmail.dict tools/fuzz/corpus/fetchmail
"""

from __future__ import annotations

from _common import SECRET, atheris, check_user_file_parser, run

with atheris.instrument_imports(include=["sendooway_auth", "sendooway_shared"]):
    from sendooway_auth.fetchmail import parse_fetchmailrc

NAME = "/home/u/.fetchmailrc"
PLANTS = (f'pass "{SECRET}"', f"password {SECRET}", f'#sendooway:pass "{SECRET}"',
          f"#sendooway:pass {SECRET}")


def test_one_input(data: bytes) -> None:
    check_user_file_parser(data, parse_fetchmailrc, NAME, PLANTS)


if __name__ == "__main__":
    run(test_one_input)
