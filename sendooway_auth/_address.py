"""Sender address patterns: `local@domain` (exact), `*@domain`, `*`.

Addresses compare case-insensitively, local part included, as the original
C sendooway did (a file saying "Alice@example.org" keeps matching the
client's "alice@example.org"; both are the same user's own mappings). An
internationalized domain matches in either spelling (U-label or A-label).
The null sender (empty) matches only `*`.
"""

from __future__ import annotations

import enum
import re

import idna

from sendooway_shared.config import address_pattern_problem


class Specificity(enum.IntEnum):
    """Lower wins: an exact pattern beats `*@domain`, which beats `*`."""

    EXACT = 0
    DOMAIN = 1
    ANY = 2


def check_pattern(pattern: str) -> str:
    """The pattern itself, or ValueError naming what is wrong with it."""
    problem = address_pattern_problem(pattern)
    if problem is not None:
        raise ValueError(problem)
    return pattern


def specificity(pattern: str) -> Specificity:
    if pattern == "*":
        return Specificity.ANY
    if pattern.startswith("*@"):
        return Specificity.DOMAIN
    return Specificity.EXACT


# ASCII letters only, as the original's strcasecmp: str.lower() would also
# fold e.g. U+212A KELVIN SIGN to "k" and widen an exact pattern to a
# different (SMTPUTF8) sender.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


_QUOTED_PAIR = re.compile(r"\\(.)")


def _local(local: str) -> str:
    """A local part in the form it is compared in: a quoted one without its
    quotes and backslash escapes (`"alice"`, `"al\\ice"`, `"abc."`, `"jörg"`
    are the mailboxes alice, alice, abc. and jörg: RFC 5322 3.2.4, RFC 5321
    4.1.2, RFC 6531; and the frontend takes `abc.@` unquoted too), ASCII
    letters lower-cased. A pattern cannot hold a space, so a local part
    that truly needs its quotes (`"a b"`) can only match `*@domain` or `*`."""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return local.translate(_ASCII_LOWER)


def _split(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at:
        return _local(address), ""
    return _local(local), _domain(domain)


def _case_pair_lower(c: str) -> str:
    """`c` lower-cased when it is the capital of one lower-case letter that
    capitalizes back to it (Ü/ü, Σ/σ); else `c` itself. U+212A KELVIN SIGN
    (lower "k", whose capital is K) and U+0130 (two characters) stay."""
    low = c.lower()
    return low if len(low) == 1 and low != c and low.upper() == c else c


def _domain(domain: str) -> str:
    """A domain in the form it is compared in: an internationalized one as
    its A-label (bücher.example and xn--bcher-kva.example are one domain,
    RFC 5890: a user writes the first, a client without SMTPUTF8 sends the
    second), capitals lower-cased first as for ASCII (BÜCHER.example is
    bücher.example: a domain's case never matters, and IDNA 2008 refuses
    capitals, so a pattern `*@ÄRZTE.example` served no sender at all).
    IDNA 2008 without other mappings: a domain it does not accept (one
    with U+212A KELVIN SIGN, which the older IDNA 2003 would map onto "k")
    stays as written, so nothing but the same domain ever matches."""
    domain = domain.translate(_ASCII_LOWER)
    if not domain.isascii():
        domain = "".join(_case_pair_lower(c) for c in domain)
        try:
            # strict: no U+3002 and the like taken for a dot
            domain = idna.encode(domain, strict=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            pass
    return domain


def matches(pattern: str, sender: str) -> bool:
    """Does `sender` (without angle brackets) fall under `pattern`?"""
    kind = specificity(pattern)
    if kind is Specificity.ANY:
        return True
    if not sender:
        return False
    s_local, s_domain = _split(sender)
    p_local, p_domain = _split(pattern)
    if kind is Specificity.DOMAIN:
        return bool(s_domain) and s_domain == p_domain
    return s_local == p_local and s_domain == p_domain
