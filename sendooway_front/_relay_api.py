"""The seam between the client-facing SMTP session and the relay.

The session driver (stdio, -b, socket activation) owns one RelayBackend per
client session and calls it with the client's transaction; every reply the
client sees after MAIL comes from here. Before the relay lands, a backend may
answer 451 to MAIL ("relay not available").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sendooway_shared.types import Route

from ._reply import Reply


@dataclass(frozen=True)
class SessionInfo:
    """What the relay knows about the client session (logs, Received:)."""

    session_id: str
    client_address: str  # "ip" or "ip:port", "" when unknown (stdio without a socket)
    client_ehlo: str  # the name the client gave in EHLO/HELO
    user: str  # the authenticated user
    tls: bool  # the client channel is encrypted (STARTTLS, -s, or -S)
    esmtp: bool  # the client used EHLO (not HELO)


@dataclass(frozen=True)
class MailParams:
    """MAIL FROM parameters the session parsed and records for the relay."""

    size: int | None = None  # SIZE=
    body_8bitmime: bool = False  # BODY=8BITMIME
    smtputf8: bool = False


class RelayBackend(Protocol):
    async def mail(self, info: SessionInfo, route: Route, sender: str, params: MailParams) -> Reply:
        """Open (or reuse) the upstream for `route`, log in, send MAIL FROM.
        Returns the upstream's reply, or a local 4xx when it cannot be reached."""

    # Optional (the driver uses it when present):
    #   async def mail_group(info, route, sender, params, recipients, data) -> list[Reply]
    # MAIL with the RCPTs (and DATA, when `data`) the client pipelined behind
    # it, as one group upstream; returns the replies for MAIL and each RCPT
    # (DATA's is kept for data_start). See Relay.mail_group.

    async def rcpt(self, recipient: str) -> Reply:
        """RCPT TO: the upstream's reply verbatim."""

    async def rcpts(self, recipients: list[str]) -> list[Reply]:
        """Several RCPT TO the client pipelined: the upstream's replies in
        order, the commands sent upstream as one group when it offers
        PIPELINING."""

    async def data_start(self) -> Reply:
        """DATA: the upstream's 354 (or its refusal)."""

    async def data_chunk(self, chunk: bytes) -> None:
        """Raw message bytes as received (dot-stuffing kept, CRLF line ends),
        never including the final CRLF.CRLF; bounded size per call. The
        session core has checked them: no bare CR or LF, no NUL, no line
        over 1000 octets, a CRLF never split between two calls."""

    async def data_end(self, empty: bool = False) -> Reply:
        """Send the terminating CRLF.CRLF: the upstream's final reply.
        `empty`: the client sent no line at all ("." right after the 354),
        so only "." ends it; otherwise the last line's CRLF comes first."""

    async def data_abort(self, reason: str = "", complete: bool = False) -> None:
        """The message must not be delivered (client vanished, bare LF/CR):
        close the upstream connection without its final dot. `reason` for
        the log; `complete`: the whole message came (refused at its end),
        so its size counts the last line's CRLF too."""

    async def reset(self) -> None:
        """RSET / EHLO / new MAIL from the client: end the upstream transaction."""

    async def close(self) -> None:
        """The client session ends: QUIT upstream or hand the connection to the cache."""

    def abort(self) -> None:
        """The session is cut (cancelled): leave the upstream at once, no
        final dot, no RSET or QUIT (a silent upstream must not hold the stop)."""
