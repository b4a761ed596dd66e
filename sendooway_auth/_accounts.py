"""What the user-file parsers produce: accounts (address patterns + a route)
and the problems found, each naming file:line."""

from __future__ import annotations

from dataclasses import dataclass, field

from sendooway_shared.config import server_problem
from sendooway_shared.types import Route

from ._address import Specificity, matches, specificity


@dataclass(frozen=True)
class Account:
    """One upstream identity usable for the senders in `addresses`.

    `tier` 0 = from the user's own mappings (userInclude), 1 = global."""

    addresses: tuple[str, ...]
    route: Route
    tier: int = 1

    @property
    def source(self) -> str:
        return self.route.source


@dataclass
class ParseResult:
    """Accounts read from one file, plus errors (each skipped one account)
    and warnings. Messages never contain a password."""

    accounts: list[Account] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def holds_password(self) -> bool:
        return any(a.route.password for a in self.accounts)


def lines(text: str) -> list[str]:
    """Lines as fetchmail and getmail see them: split at LF only (a CR before
    it dropped). str.splitlines() would also split at U+2028, U+0085, VT, FF…
    which may well sit inside a quoted password."""
    out = text.split("\n")
    if out and out[-1] == "":
        out.pop()
    return [line[:-1] if line.endswith("\r") else line for line in out]


def choose(accounts: list[Account] | tuple[Account, ...], sender: str) -> Account | None:
    """The account serving `sender`. The user's own mappings are always
    preferred to global ones (as in the original); within each, the most
    specific pattern wins (exact, then *@domain, then *), and among equally
    specific ones the first in order."""
    best: tuple[int, Specificity, int] | None = None
    chosen = None
    for index, account in enumerate(accounts):
        for pattern in account.addresses:
            if not matches(pattern, sender):
                continue
            rank = (account.tier, specificity(pattern), index)
            if best is None or rank < best:
                best, chosen = rank, account
    return chosen


def field_problem(server: str, user: str) -> str | None:
    """Why a server or upstream user name read from a file cannot be used
    (None: it can): a host name has no blank or control character, a user
    name no control character (a quoted "\\n" would put a line into logs)."""
    if any(c.isspace() or not c.isprintable() for c in server):
        return "the server name holds white space or control characters"
    if (problem := server_problem(server)) is not None:
        return f"server {server[:80]!r}: {problem}"
    if not user.isprintable():
        return "the upstream user name holds control characters"
    return None
