#!/usr/bin/env python3
"""Coverage-guided fuzzing of the SMTP session core's command-line parser
(line framing, limits, verbs, MAIL/RCPT paths and parameters, AUTH
exchanges, DATA framing): random bytes in random pieces go through the
sans-IO Session answered by the tests' scripted driver.

Checked on every input: nothing raises (a LocalProtocolError or any other
exception is a crash), every reply line is well formed (3 digits, space or
dash, printable ASCII, CRLF), the input buffer stays bounded, and an AUTH
password never shows in a reply.

    .venv/bin/python tools/fuzz/fuzz_session.py -max_total_time=600 \\
        -dict=tools/fuzz/smtp.dict tools/fuzz/corpus/session
"""

from __future__ import annotations

import re

from _common import SECRET, atheris, run

with atheris.instrument_imports(include=["sendooway_front", "sendooway_shared", "tests"]):
    from sendooway_shared.smtp_syntax import (
        ParamError, PathError, parse_params, parse_path, split_path_argument,
    )
    from sendooway_front._session import MAX_AUTH_LINE, SessionSettings, State
    from tests.front_harness import Harness

REPLY_LINE = re.compile(rb"(?!334\Z)[2-5]\d\d(?:[ -][\x20-\x7e]*)?\Z")  # RFC 5321/4954
MAX_PIECE = 1200


def path_argument(fdp) -> None:
    """The MAIL/RCPT argument parser alone: a result or its own errors only."""
    keyword = "FROM" if fdp.ConsumeBool() else "TO"
    utf8 = fdp.ConsumeBool()
    arg = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    try:
        path, params = split_path_argument(arg, keyword)
        address = parse_path(path, allow_null=keyword == "FROM", allow_postmaster=keyword == "TO",
                             utf8=utf8)
        parsed = parse_params(params)
    except (PathError, ParamError):
        return
    assert not any(ch in address for ch in "\r\n\0<> "), address
    assert all(key == key.upper() for key in parsed)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 7) == 0:
        path_argument(fdp)
        return
    flags = fdp.ConsumeIntInRange(0, 31)
    settings = SessionSettings(
        "mx.test", tls_available=bool(flags & 1), encrypted=bool(flags & 2),
        require_encryption=bool(flags & 4), advertise_8bitmime=bool(flags & 8),
        size_limit=None if flags & 16 else fdp.ConsumeIntInRange(0, 4096),
        max_auth_failures=fdp.ConsumeIntInRange(1, 4))
    # an upstream that refuses MAIL from no@x.y but (carelessly) accepts the
    # RCPTs pipelined behind it: the session must never count one
    h = Harness(settings=settings, refuse_mail={"no@x.y"}, reject_rcpt={"no@x.y"})
    while fdp.remaining_bytes() and not h.closed:
        piece = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, MAX_PIECE))
        h.feed(piece)
        # nothing beyond a bounded line (or one DATA read) is ever kept
        assert len(h.session._buf) <= max(MAX_AUTH_LINE, 64 * 1024) + MAX_PIECE
        # recipients only inside a transaction that has them
        assert h.session.recipients == 0 or h.session.state in (State.RCPT, State.DATA, State.CLOSED)
    h.eof()
    out = bytes(h.out)
    assert out.endswith(b"\r\n"), out[-80:]
    for line in out[:-2].split(b"\r\n"):
        assert REPLY_LINE.match(line), line[:120]
    assert SECRET.encode() not in out


if __name__ == "__main__":
    run(test_one_input)
