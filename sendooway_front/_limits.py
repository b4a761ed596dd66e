"""Sessions at once per client address in one listening process
(`maxSessionsPerAddress`), so that one address cannot take every session
of the server (its cap, `_server.session_limit`) from everyone else."""

from __future__ import annotations

import ipaddress
import logging

from sendooway_shared.log import Tally
from sendooway_shared.types import client_key

from ._proxyproto import unmapped

log = logging.getLogger("sendooway")


class AddressLimit:
    """At most `limit` sessions at once from one IPv4 address or IPv6 /64
    (an IPv4 client behind NAT64 by its IPv4 address: client_key);
    loopback clients (a webmail on the host) and anything that is not an IP
    address are not counted. Refusals go to the log as a Tally."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}
        self.refused = Tally(log, "maxSessionsPerAddress (%d) reached, the latest by %s:"
                             " refused with 421; %d refused since the last such line")

    @staticmethod
    def key(client_ip: str) -> str | None:
        """What the limit counts `client_ip` as, or None when not counted."""
        try:
            ip = unmapped(ipaddress.ip_address(client_ip.split("%", 1)[0]))
        except ValueError:
            return None
        if ip.is_loopback:
            return None
        return client_key(str(ip))  # as the authenticator's backoff counts it

    def enter(self, client_ip: str) -> tuple[bool, str | None]:
        """(admitted, the key to leave() with when the session ends)."""
        key = self.key(client_ip) if self.limit else None
        if key is None:
            return True, None
        held = self.open.get(key, 0)
        if held >= self.limit:
            self.refused.note(self.limit, key)
            return False, None
        self.open[key] = held + 1
        return True, key

    def leave(self, key: str | None) -> None:
        if key is None:
            return
        left = self.open[key] - 1
        if left:
            self.open[key] = left
        else:
            del self.open[key]
