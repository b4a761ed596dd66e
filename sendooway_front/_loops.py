"""Routes that lead back to this frontend: a user's route (direct:, a
fetchmailrc, a getmail rc) naming sendooway's own address and port, with his
own login. Each MAIL would log in to ourselves, whose MAIL logs in to
ourselves again, and so on: one MAIL took every session of `sendooway -b`
(loopback clients are not counted by maxSessionsPerAddress) until the
timeout. Two checks, both in this process (docs/decisions/relay.md
"A route back to this server"):

- on connecting upstream: the upstream is an address and port this process
  listens on or was reached at (`leads_back`);
- on accepting a client: the client is one of this process's own upstream
  connections (`from_ourselves`), whatever name, address or port forward
  the route took to get here."""

from __future__ import annotations

import ipaddress
import socket
import weakref

# (address, port) this process listens on or was reached at (serving)
_serving: set[tuple[str, int]] = set()
# the local ends of this process's upstream connections, while they are open
_outgoing: "weakref.WeakValueDictionary[tuple[str, int], object]" = weakref.WeakValueDictionary()


def _key(sockaddr) -> tuple[str, int] | None:
    """(address, port) of a socket address as compared here (an IPv4-mapped
    IPv6 address as IPv4, no scope), or None when it is no IP address."""
    try:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        port = int(sockaddr[1])
    except (TypeError, ValueError, IndexError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


def serving(sock: socket.socket) -> tuple[str, int] | None:
    """This process listens on, or was reached at, `sock`'s address; returns
    the key to give unserve() when that ends (an in-process server of the
    tests). A wildcard listener is kept as 0.0.0.0 (IPv4 only), :: with
    IPV6_V6ONLY (IPv6 only) or "*" (both: a dual-stack ::)."""
    try:
        key = _key(sock.getsockname())
        dual = (sock.family == socket.AF_INET6
                and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    except OSError:
        return None
    if key is None:
        return None
    ip, port = key
    if ipaddress.ip_address(ip).is_unspecified and dual:
        ip = "*"
    _serving.add((ip, port))
    return ip, port


def unserve(served) -> None:
    _serving.discard(served)


def leads_back(peername, sockname) -> bool:
    """Is an upstream connection from `sockname` to `peername` one to this
    process's own SMTP service?"""
    peer, local = _key(peername), _key(sockname)
    if peer is None:
        return False
    if peer in _serving:
        return True
    ip = ipaddress.ip_address(peer[0])
    wildcards = {"*", "0.0.0.0" if ip.version == 4 else "::"}
    # a wildcard listener: any address of this host (loopback, or the one
    # the kernel took as our own source address for it)
    return (any((w, peer[1]) in _serving for w in wildcards)
            and (ip.is_loopback or ip.is_unspecified
                 or (local is not None and local[0] == peer[0])))


def outgoing(sockname, stream) -> None:
    """`stream`, an upstream connection, leaves from `sockname`."""
    key = _key(sockname)
    if key is not None:
        _outgoing[key] = stream


def from_ourselves(peername) -> bool:
    """Is a client at `peername` one of this process's own upstream connections?"""
    key = _key(peername)
    if key is None:
        return False
    stream = _outgoing.get(key)
    return stream is not None and not stream.closing


def reset() -> None:
    """Forget everything (tests)."""
    _serving.clear()
    _outgoing.clear()
