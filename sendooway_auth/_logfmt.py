"""Log values that cannot forge a log line: user names, senders and client
strings come from the network and may hold spaces, newlines or '='."""

from __future__ import annotations

from sendooway_shared.log import field as _field, printable

_MAX = 96


def field(value: str | None) -> str:
    """One `key=value` value (see shared.log.field), cut at 96 characters."""
    return _field(value, _MAX)


def text(value: str, limit: int = 500) -> str:
    """Free text for the end of a log line (a parse error naming a user's
    file): kept readable, but control characters escaped so it stays one line."""
    return printable(value, limit)
