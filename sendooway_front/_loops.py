"""Routes that lead back to this frontend: a user's route (direct:, a
fetchmailrc, a getmail rc) naming sendooway's own address and port, with his
own login. Each MAIL would log in to ourselves, whose MAIL logs in to
ourselves again, and so on: one MAIL took every session of `sendooway -b`
(loopback clients are not counted by maxSessionsPerAddress) until the
timeout. Two checks, both in this process (docs/decisions/relay.md
"A route back to this server"):

- on connecting upstream: the upstream is an address and port this process
  listens on or was reached at (`leads_back`);
- on a client's login: the client is one of this process's own upstream
  connections (`from_ourselves`: its source and destination are the two
  ends of one of them), whatever name or balancer (a PROXY header gives
  both) the route took to get here. A kernel port redirect changes the
  destination and is not seen."""

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


def from_ourselves(peername, destination) -> bool:
    """Is a client at `peername` that connected to `destination` one of this
    process's own upstream connections? Both ends must match a connection
    the kernel still holds: on loopback the kernel hands out a local port
    again at once after a reset, and shares one among connections to
    different destinations, so a local client (a webmail) can come from
    the very address of an upstream connection of ours to another server
    (a local MTA), or of one reset a moment ago; matched on the source
    alone, its login got 421 (a CI run)."""
    key = _key(peername)
    if key is None or destination is None:
        return False
    stream = _outgoing.get(key)
    return (stream is not None and _key(stream.peername) == _key(destination)
            and stream.connected())


def reset() -> None:
    """Forget everything (tests)."""
    _serving.clear()
    _outgoing.clear()
