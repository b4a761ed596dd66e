"""Types shared by the frontend and the authenticator."""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass, field


class Secret:
    """A password that never shows itself in a repr, a str or a log line.

    Only the code that really sends it (PAM, upstream AUTH) calls reveal().
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret holds a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __repr__(self) -> str:
        return "Secret('********')"

    def __str__(self) -> str:
        return "********"

    def __reduce__(self):  # never pickled by accident into a log or a cache file
        raise TypeError("a Secret is not picklable")


class TlsMode(str, enum.Enum):
    """How the frontend talks to an upstream."""

    PLAIN = "plain"
    STARTTLS = "starttls"
    TLS = "tls"  # implicit TLS (port 465, "ssl" in the original's words)


DEFAULT_PORTS = {TlsMode.PLAIN: 25, TlsMode.STARTTLS: 587, TlsMode.TLS: 465}


def port_number(value: str) -> int:
    """A port given as 1..65535 or as a service name (`submission`, `smtps`),
    as the original accepted; ValueError otherwise."""
    if value.isascii() and value.isdigit():
        port = int(value)
        if 1 <= port <= 65535:
            return port
        raise ValueError("port must be a number from 1 to 65535 or a service name")
    if (not value or len(value) > 64 or not value.isascii()
            or not all(c.isalnum() or c in "-_." for c in value)):
        raise ValueError("port must be a number from 1 to 65535 or a service name")
    try:
        return socket.getservbyname(value, "tcp")
    except OSError:
        raise ValueError(f"unknown service name {value!r} for the port") from None


@dataclass(frozen=True)
class Route:
    """Where and how one (user, sender) pair is relayed.

    `source` is "file:line" of the mapping that produced it, for logs.
    `auth` False means the upstream is used without SMTP AUTH.
    """

    server: str
    port: int
    tls: TlsMode
    cert_check: bool = True
    ca_file: str = ""  # "" = the system trust store
    user: str = ""
    password: Secret = field(default_factory=lambda: Secret(""))
    auth: bool = True
    source: str = ""
    ca_pem: str = ""  # the certificates of a user's own sslCA, read as the user (else "")

    @property
    def where(self) -> str:
        """server:port; an IPv6 server in brackets (`[::1]:25`), since
        `::1:25` is itself an address (RFC 3986 3.2.2)."""
        host = self.server
        if ":" in host and not host.startswith("["):
            try:
                if ipaddress.ip_address(host.split("%", 1)[0]).version == 6:
                    host = f"[{host}]"
            except ValueError:
                pass  # not an address: shown as it is
        return f"{host}:{self.port}"

    def describe(self) -> str:
        """One line for logs and --check: never includes the password."""
        who = f" as {self.user}" if self.auth else " without AUTH"
        check = "" if self.cert_check else " noCertCheck"
        return f"{self.where} {self.tls.value}{check}{who} ({self.source})"


# RFC 6052's well-known prefix and RFC 8215's local-use one: the translator
# (NAT64, SIIT-DC) in front of an IPv6-only server gives each IPv4 client an
# address of its own in there, so these count one by one, as IPv4 does.
_WELL_KNOWN_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def client_key(host: str) -> str:
    """What one client address counts as, for the authenticator's backoff
    and the frontend's maxSessionsPerAddress: an IPv4 address as it is, an
    IPv6 address as its /64 (one site's subnet: a client given a /64 has
    2**64 addresses to take turns with, and would otherwise start afresh
    with each) — but an
    IPv4 client translated into 64:ff9b::/96 as the IPv4 address it carries
    (the whole IPv4 Internet is one /64 there), and one in 64:ff9b:1::/48
    by its full address."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    if address in _WELL_KNOWN_NAT64:
        return str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address in _LOCAL_NAT64:
        return str(address)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))
