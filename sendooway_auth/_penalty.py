"""Failure delay and backoff per user and per client address (sans-IO: the
caller passes the clock).

Each failed login is answered after `base * 2**n` seconds (capped), where n
is the number of recent failures already counted for that user *or* that
client address, whichever is larger. Counts fade after `window` seconds
without a failure and a success clears that user's and address's counts.
The other connections never wait: the delay is an await on the failing
connection only.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict


class Penalty:
    def __init__(self, base: float = 1.0, cap: float = 15.0, window: float = 900.0,
                 max_keys: int = 10000) -> None:
        self.base = base
        self.cap = cap
        self.window = window
        self.max_keys = max_keys
        self._counts: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def _get(self, key: str, now: float) -> int:
        entry = self._counts.get(key)
        if entry is None:
            return 0
        count, last = entry
        if now - last > self.window:
            del self._counts[key]
            return 0
        return count

    def _bump(self, key: str, now: float) -> None:
        count = self._get(key, now)
        self._counts[key] = (count + 1, now)
        self._counts.move_to_end(key)
        while len(self._counts) > self.max_keys:
            self._counts.popitem(last=False)

    def failure(self, user: str, client: str, now: float) -> float:
        """Count one failure; return how long to hold back its answer."""
        keys = [f"u:{user}"] + ([f"c:{client}"] if client else [])
        previous = max(self._get(k, now) for k in keys)
        for k in keys:
            self._bump(k, now)
        if self.base <= 0:
            return 0.0
        return min(self.cap, self.base * (2 ** min(previous, 30)))

    def success(self, user: str, client: str) -> None:
        self._counts.pop(f"u:{user}", None)
        if client:
            self._counts.pop(f"c:{client}", None)

    def count(self, user: str, client: str, now: float) -> int:
        return max(self._get(f"u:{user}", now), self._get(f"c:{client}", now) if client else 0)


def client_host(client: str) -> str:
    """The address part of "ip", "ip:port" or "[v6]:port", normalised (IPv4
    mapped into IPv6 shown as IPv4); "" when it is not an IP address (then
    it is not used as a backoff key)."""
    text = client.strip()
    candidates = [text]
    if text.startswith("[") and "]" in text:
        candidates.append(text[1:text.index("]")])
    if text.count(":") == 1:
        candidates.append(text.split(":", 1)[0])
    for c in candidates:
        try:
            address = ipaddress.ip_address(c)
        except ValueError:
            continue
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:192.0.2.7 is 192.0.2.7
        return str(mapped or address)
    return ""
