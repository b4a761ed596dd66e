"""Performance review (issue 6, CPU per relayed session): the frontend and the
authenticator profiled under a loop of cache-on sessions (cProfile, py-spy,
perf, strace; figures in docs/decisions/relay.md, "CPU per session, looked
at function by function"). The changes remove work without changing what
either program does, so there is no defect to pin; what is pinned here is
that each fast path gives exactly what the slow path it skips gives:

- shared/log.py: field() and printable() return a plain, short value as it
  is, without escaping it character by character;
- both daemons' logging no longer looks up the caller's file and line per
  record (logging._srcfile), which the log formats never showed;
- _stream.Stream._flush_tls stops after a memory BIO read that came back
  shorter than asked (the BIO is empty then) instead of reading again to
  be told so by an exception.
"""

from __future__ import annotations

import logging
import os

from hypothesis import given, settings, strategies as st

from sendooway_shared import log as shared_log


# ------------------------------------------------------------ the slow paths, as they were


def _field_slow(value, limit: int = 96) -> str:
    if not value:
        return "-"
    out = []
    for c in value[:limit]:
        o = ord(c)
        if 33 <= o < 127 and c not in '="\\<>':
            out.append(c)
        elif o < 256:
            out.append(f"\\x{o:02x}")
        else:
            out.append(f"\\u{o:04x}")
    return "".join(out) + ("..." if len(value) > limit else "")


def _printable_slow(value: str, limit: int = 500) -> str:
    out = []
    for c in value[:limit]:
        if c.isprintable():
            out.append(c)
        elif ord(c) < 256:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(f"\\u{ord(c):04x}")
    return "".join(out) + ("..." if len(value) > limit else "")


# every character class the two functions treat apart: plain ASCII, the
# five field() escapes and space, controls, DEL, Latin-1, bidi overrides,
# other non-printables beyond Latin-1, astral characters
_CHARS = st.one_of(
    st.characters(min_codepoint=33, max_codepoint=126),
    st.sampled_from(list(' ="\\<>\t\r\n\x00\x1b\x7f\x85\xa0\xe9\u200e\u202e\u2028\ufeff\U0001f600')),
    st.characters(),
)
_TEXT = st.text(_CHARS, max_size=140)
_EDGES = ["", "a", "-", "alice@bench.example", "127.0.0.1:41394", "[::1]:25", "a b", "x=y",
          '"q"@x', "<a@b>", "back\\slash", "\x1b[2J", "\u202eevil", "é", "a" * 96, "a" * 97,
          "a" * 500, "a" * 501, "a" * 95 + "\x00", " " * 96]


@settings(max_examples=600, deadline=None)
@given(_TEXT, st.sampled_from([1, 5, 96, 320, 500]))
def test_field_fast_path_gives_what_the_slow_path_gives(value, limit):
    """field() returns a value made only of the characters it keeps, and no
    longer than `limit`, as it is; anything else goes the character-by-
    character way. Both give the same string for any text and limit."""
    assert shared_log.field(value, limit) == _field_slow(value, limit)


@settings(max_examples=600, deadline=None)
@given(_TEXT, st.sampled_from([1, 5, 96, 500]))
def test_printable_fast_path_gives_what_the_slow_path_gives(value, limit):
    """printable() returns a printable value no longer than `limit` as it
    is; both paths give the same string for any text and limit."""
    assert shared_log.printable(value, limit) == _printable_slow(value, limit)


def test_fast_paths_on_edge_values_and_str_subclasses():
    """The limits exactly and one past, every escape, empty values; and a str
    subclass (whose own __str__ or __format__ could show something else)
    goes the slow path, so what lands in the log is a plain str of its
    characters, as before."""
    for value in _EDGES:
        for limit in (1, 96, 500):
            assert shared_log.field(value, limit) == _field_slow(value, limit), (value, limit)
            assert shared_log.printable(value, limit) == _printable_slow(value, limit), (value, limit)
    assert shared_log.field(None) == "-"

    class Odd(str):
        def __str__(self):
            return "forged"

        def __format__(self, spec):
            return "forged"

    for got in (shared_log.field(Odd("alice")), shared_log.printable(Odd("alice"))):
        assert type(got) is str and got == "alice" and f"{got}" == "alice"


def test_log_lines_unchanged_without_the_callers_file_and_line(tmp_path):
    """setup_logging turns off the per-record stack walk for the caller's
    file, line and function (logging._srcfile = None): the line written is
    still date, program[pid] and the message, and log.exception still
    writes the traceback (it comes from the exception, not the stack walk)."""
    target = tmp_path / "x.log"
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging._srcfile, logging.logThreads,
             logging.logProcesses, logging.logMultiprocessing)
    try:
        log = shared_log.setup_logging(str(target), "perf-test")
        assert logging._srcfile is None
        log.info("%s client=%s: %s", "0123456789", "127.0.0.1:1", "connect")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        for h in root.handlers:
            h.flush()
        lines = target.read_text().splitlines()
        assert lines[0].endswith(f" perf-test[{os.getpid()}]: 0123456789 client=127.0.0.1:1: connect")
        assert lines[1].endswith(f" perf-test[{os.getpid()}]: failed")
        assert lines[2] == "Traceback (most recent call last):"
        assert lines[-1] == "ValueError: boom"
        assert any("test_review_perf.py" in line for line in lines[3:])
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        (logging._srcfile, logging.logThreads, logging.logProcesses,
         logging.logMultiprocessing) = saved[2:]
