"""A relay backend for when there is no relay: MAIL gets a temporary 451.

Used until the live relay is wired in (see _driver.make_relay) and as the
backend of tests that only exercise the client side.
"""

from __future__ import annotations

from sendooway_shared.types import Route

from . import _catalogue as R
from ._relay_api import MailParams, SessionInfo
from ._reply import Reply


class NoRelay:
    """RelayBackend that accepts no mail transaction."""

    async def mail(self, info: SessionInfo, route: Route, sender: str, params: MailParams) -> Reply:
        return R.RELAY_NOT_AVAILABLE

    async def rcpt(self, recipient: str) -> Reply:
        return R.NEED_MAIL  # never reached: the session needs an accepted MAIL first

    async def rcpts(self, recipients: list[str]) -> list[Reply]:
        return [await self.rcpt(r) for r in recipients]

    async def data_start(self) -> Reply:
        return R.NEED_MAIL_DATA

    async def data_chunk(self, chunk: bytes) -> None:
        return None

    async def data_end(self, empty: bool = False) -> Reply:
        return R.RELAY_FAILED

    async def data_abort(self, reason: str = "", complete: bool = False) -> None:
        return None

    async def reset(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def abort(self) -> None:
        return None
