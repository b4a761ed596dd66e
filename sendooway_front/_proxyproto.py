"""The PROXY protocol header (v1 text, v2 binary) a TCP load balancer sends
before anything else, naming the client it relays (HAProxy's
doc/proxy-protocol.txt). Sans-IO: bytes in; "need more", a ProxyHeader or a
ProxyHeaderError out.

Only peers listed in `proxyProtocol` are read this way (`is_trusted`); the
header is never guessed from what a client sends, so a client cannot forge
its address.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Union

V1_PREFIX = b"PROXY "
V1_MAX = 107                # octets of a v1 line, CRLF included (the spec's worst case)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16               # signature, version/command, family/protocol, length
V2_MAX = 2048               # octets of a v2 header we accept, TLVs included

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
# family/protocol byte → (name, octets of the address block it needs)
_V2_FAMILIES = {
    0x00: ("UNSPEC", 0),
    0x11: ("TCP4", 12), 0x12: ("UDP4", 12),
    0x21: ("TCP6", 36), 0x22: ("UDP6", 36),
    0x31: ("UNIX-STREAM", 216), 0x32: ("UNIX-DGRAM", 216),
}
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_ADDRESS_CHARS = {4: re.compile(rb"[0-9.]{7,15}"), 6: re.compile(rb"[0-9A-Fa-f:.]{2,45}")}

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ProxyHeaderError(ValueError):
    """What the peer sent is not a valid PROXY protocol header (str(): why)."""


class NoProxyHeader(ProxyHeaderError):
    """The peer closed without sending a byte (a balancer's plain TCP check)."""


@dataclass(frozen=True)
class ProxyHeader:
    """A complete header. `source`/`destination` are (address, port), or
    None when the connection's own addresses stand (v1 UNKNOWN, v2 LOCAL,
    v2 families other than TCP over IPv4/IPv6)."""

    version: int
    kind: str                   # TCP4, TCP6, UNKNOWN (v1); LOCAL, TCP4, TCP6, UNSPEC, ... (v2)
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int                 # octets the header took

    def describe(self) -> str:
        return f"v{self.version} {self.kind}"


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None while more bytes are needed.

    Raises ProxyHeaderError as soon as `data` cannot be the start of a valid
    header, so garbage is refused without waiting for more of it."""
    if not data:
        return None
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    if data[:1] == V1_PREFIX[:1]:
        return _parse_v1(data)
    raise ProxyHeaderError("not a PROXY protocol header")


class ProxyHeaderReader:
    """Collects reads until a header is complete; keeps what came after it."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: ProxyHeader | None = None
        self.trailing_data = b""   # octets after the header: they belong to SMTP (or TLS)

    def receive_data(self, data: bytes) -> ProxyHeader | None:
        """Feed one read; b"" is the end of the connection. Returns the header
        once complete, None while more is needed; raises ProxyHeaderError."""
        if self.header is not None:
            raise RuntimeError("the PROXY header is already complete")
        if not data:
            if self._buf:
                raise ProxyHeaderError(f"connection closed after {len(self._buf)} octets"
                                       " of a PROXY header (truncated)")
            raise NoProxyHeader("connection closed before a PROXY header")
        self._buf += data
        header = parse(bytes(self._buf))
        if header is not None:
            self.header = header
            self.trailing_data = bytes(self._buf[header.length:])
            self._buf.clear()
        return header


def is_trusted(address: str, networks: Iterable[Network]) -> bool:
    """Whether a peer address (text; IPv4-mapped IPv6 counts as IPv4) is in
    one of `networks`. A peer that is not an IP address is never trusted."""
    try:
        ip = unmapped(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return False
    return any(ip in net for net in networks)


def unmapped(ip):
    """IPv4-mapped IPv6 (`::ffff:10.0.0.5`, from a dual-stack socket) as IPv4."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# ------------------------------------------------------------ version 1


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[:len(V1_PREFIX)]
    if head != V1_PREFIX[:len(head)]:
        raise ProxyHeaderError("not a PROXY protocol header")
    end = _first_line_end(data[:V1_MAX])
    if end < 0:
        if len(data) >= V1_MAX - 1:  # no room left for CRLF within 107 octets
            raise ProxyHeaderError(f"v1 header without CRLF in its first {V1_MAX} octets")
        return None
    if data[end] == 0x0A:
        raise ProxyHeaderError("v1 header ends in a bare LF")
    if end + 2 > V1_MAX:
        raise ProxyHeaderError(f"v1 header without CRLF in its first {V1_MAX} octets")
    if end + 1 == len(data):
        return None  # the LF may follow
    if data[end + 1] != 0x0A:
        raise ProxyHeaderError("v1 header has a CR without LF")
    fields = data[:end].split(b" ")
    length = end + 2
    kind = fields[1]
    if kind == b"UNKNOWN":  # the rest of the line is to be ignored
        return ProxyHeader(1, "UNKNOWN", None, None, length)
    if kind not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"v1 protocol must be TCP4, TCP6 or UNKNOWN, got {_show(kind)}")
    if len(fields) != 6:
        raise ProxyHeaderError("v1 header must be 'PROXY TCP4|TCP6 SOURCE DESTINATION"
                               " SOURCE-PORT DESTINATION-PORT' with single spaces")
    version = 4 if kind == b"TCP4" else 6
    src, dst = (_v1_address(f, version) for f in fields[2:4])
    sport, dport = (_v1_port(f) for f in fields[4:6])
    return ProxyHeader(1, kind.decode(), (src, sport), (dst, dport), length)


def _first_line_end(data: bytes) -> int:
    cr, lf = data.find(b"\r"), data.find(b"\n")
    if cr < 0 or lf < 0:
        return max(cr, lf)
    return min(cr, lf)


def _v1_address(field: bytes, version: int) -> str:
    if not _V1_ADDRESS_CHARS[version].fullmatch(field):
        raise ProxyHeaderError(f"v1 address {_show(field)} is not an IPv{version} address")
    try:
        ip = ipaddress.ip_address(field.decode("ascii"))
    except ValueError:  # leading zeros, too many groups...
        raise ProxyHeaderError(f"v1 address {_show(field)} is not an IPv{version} address") from None
    if ip.version != version:
        raise ProxyHeaderError(f"v1 address {_show(field)} is not an IPv{version} address")
    return str(unmapped(ip))


def _v1_port(field: bytes) -> int:
    if not _PORT.fullmatch(field) or int(field) > 65535:
        raise ProxyHeaderError(f"v1 port {_show(field)} is not a number from 0 to 65535")
    return int(field)


def _show(field: bytes) -> str:
    """A peer's bytes, shortened and quoted for an error message."""
    return repr(field[:48].decode("ascii", "replace"))


# ------------------------------------------------------------ version 2


def _parse_v2(data: bytes) -> ProxyHeader | None:
    head = data[:len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[:len(head)]:
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(data) > 12:
        if data[12] >> 4 != 2:
            raise ProxyHeaderError(f"v2 signature with version {data[12] >> 4}, not 2")
        command = data[12] & 0x0F
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyHeaderError(f"v2 command {command:#x} is neither LOCAL nor PROXY")
        if len(data) > 13 and command == _V2_PROXY and data[13] not in _V2_FAMILIES:
            raise ProxyHeaderError(f"v2 family/protocol {data[13]:#04x} is not defined")
    if len(data) < V2_FIXED:
        return None
    length = V2_FIXED + int.from_bytes(data[14:16], "big")
    if length > V2_MAX:
        raise ProxyHeaderError(f"v2 header of {length} octets, more than {V2_MAX}")
    if len(data) < length:
        return None
    if data[12] & 0x0F == _V2_LOCAL:  # the balancer's own connection (a health check)
        return ProxyHeader(2, "LOCAL", None, None, length)
    kind, need = _V2_FAMILIES[data[13]]
    block = data[V2_FIXED:length]  # addresses, then TLVs (skipped: we use none)
    if len(block) < need:
        raise ProxyHeaderError(f"v2 {kind} address block of {len(block)} octets, needs {need}")
    if kind == "TCP4":
        return ProxyHeader(2, kind, _v2_endpoint(block[0:4], block[8:10]),
                           _v2_endpoint(block[4:8], block[10:12]), length)
    if kind == "TCP6":
        return ProxyHeader(2, kind, _v2_endpoint(block[0:16], block[32:34]),
                           _v2_endpoint(block[16:32], block[34:36]), length)
    # UNSPEC, UDP, UNIX: the spec's fallback is the connection's own addresses
    return ProxyHeader(2, kind, None, None, length)


def _v2_endpoint(address: bytes, port: bytes) -> tuple[str, int]:
    return str(unmapped(ipaddress.ip_address(address))), int.from_bytes(port, "big")
