"""Tests written from a mutation-testing review of the frontend's SMTP
session core (sendooway_front/_session.py: the command table, line limits,
AUTH, STARTTLS, error and junk points) and of its authenticator link
(sendooway_front/_authlink.py). Each pins down behaviour that a small change
to that code left unnoticed by the rest of the suite, and names what it
guards. The DATA handling was reviewed before (test_review_mutants.py)."""

from __future__ import annotations

import pytest

from sendooway_front._session import SessionSettings

from .front_harness import LOGIN_ALICE, Harness, codes

MAIL = b"MAIL FROM:<alice@example.org>\r\n"
RCPT = b"RCPT TO:<bob@example.net>\r\n"
_RCPTS_1000 = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(1000))


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_mail_that_succeeds_starts_the_rcpt_count_again_pipelined_or_not(bytewise):
    """RCPTs behind a refused MAIL count towards the 1000 (a loop of them is
    cut off), but a MAIL that succeeds starts a new count, which includes
    the RCPTs pipelined behind that MAIL and nothing before it: the replies
    are the same whether the client pipelines or not. (The RCPTs taken with
    the MAIL were counted before its answer, still in the old count: two
    RCPTs after 1000 behind a refused MAIL owed two points when pipelined.)"""
    h = Harness(settings=SessionSettings("mx.test", max_errors=2), refuse_mail={"x@example.org"})
    h.feed(LOGIN_ALICE + b"MAIL FROM:<x@example.org>\r\n" + _RCPTS_1000)
    out = h.feed(MAIL + RCPT * 2 + b"NOOP\r\n", bytewise=bytewise)
    assert codes(out) == [250, 250, 250, 250] and not h.closed
