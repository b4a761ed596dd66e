#!/usr/bin/env python3
"""Coverage-guided fuzzing of the getmail rc parser
(`sendooway_auth.getmail.parse_getmailrc`): any text gives an account or
messages, never an exception; every message names the file; a password
planted in the input never shows in an error or warning.

    .venv/bin/python tools/fuzz/fuzz_getmail.py -max_total_time=600 \\
        -dict=tools/fuzz/getmail.dict tools/fuzz/corpus/getmail
"""

from __future__ import annotations

from _common import SECRET, atheris, check_user_file_parser, run

with atheris.instrument_imports(include=["sendooway_auth", "sendooway_shared"]):
    from sendooway_auth.getmail import parse_getmailrc

NAME = "/home/u/.getmail/getmailrc"
PLANTS = (f"password = {SECRET}", f"password: {SECRET}", f"password={SECRET}")


def test_one_input(data: bytes) -> None:
    check_user_file_parser(data, parse_getmailrc, NAME, PLANTS)


if __name__ == "__main__":
    run(test_one_input)
