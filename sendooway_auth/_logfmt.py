"""Log values that cannot forge a log line: user names, senders and client
strings come from the network and may hold spaces, newlines or '='."""

from __future__ import annotations

from sendooway_shared.log import printable

_MAX = 96


def field(value: str | None) -> str:
    """One `key=value` value: printable ASCII without space, '=' or '"';
    everything else as \\xHH (\\uHHHH); '-' when empty; long ones cut with '...'."""
    if not value:
        return "-"
    out = []
    for c in value[:_MAX]:
        o = ord(c)
        if 33 <= o < 127 and c not in '="\\':
            out.append(c)
        elif o < 256:
            out.append(f"\\x{o:02x}")
        else:
            out.append(f"\\u{o:04x}")
    return "".join(out) + ("..." if len(value) > _MAX else "")


def text(value: str, limit: int = 500) -> str:
    """Free text for the end of a log line (a parse error naming a user's
    file): kept readable, but control characters escaped so it stays one line."""
    return printable(value, limit)
