"""Routes that lead back to this frontend: a user's route (direct:, a
fetchmailrc, a getmail rc) naming sendooway's own address and port, with his
own login. Each MAIL would log in to ourselves, whose MAIL logs in to
ourselves again, and so on: one MAIL took every session of `sendooway -b`
(loopback clients are not counted by maxSessionsPerAddress) until the
timeout. Two checks, both in this process (docs/decisions/relay.md
"A route back to this server"):

- on connecting upstream: the upstream is an address and port this process
  listens on or was reached at (`leads_back`);
- on a client's AUTH: the client is one of this process's own upstream
  connections (`from_ourselves`: both ends, or the PROXY header's source
  and destination, or the destination before a kernel port redirect), whatever
  name, balancer or port redirect the route took to get here."""

from __future__ import annotations

import ipaddress
import socket
import weakref

# (address, port) this process listens on or was reached at (serving)
_serving: set[tuple[str, int]] = set()
# (local end, peer) of this process's upstream connections, while they are open
_outgoing: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()
_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h (and IP6T_SO_ORIGINAL_DST)


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


def outgoing(sockname, peername, stream) -> None:
    """`stream`, an upstream connection, leaves from `sockname` to `peername`."""
    local, peer = _key(sockname), _key(peername)
    if local is not None and peer is not None:
        _outgoing[local, peer] = stream


def original_destination(sock) -> tuple[str, int] | None:
    """The address a connection accepted on `sock` was sent to before a
    kernel port redirect (netfilter's SO_ORIGINAL_DST), or None (none, or
    no conntrack)."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
    except (OSError, AttributeError, ValueError):
        pass
    return None


def from_ourselves(peername, destinations) -> bool:
    """Is a client at `peername` that reached us at one of `destinations`
    (our address as it sees it, or the PROXY header's destination) one of
    this process's own upstream connections? Both ends must match: Linux
    gives one ephemeral port to connections to different destinations at
    once, so a local client may share the local end of one of ours."""
    key = _key(peername)
    if key is None:
        return False
    for destination in destinations:
        dest = _key(destination) if destination else None
        stream = _outgoing.get((key, dest)) if dest is not None else None
        if stream is not None and not stream.closing:
            return True
    return False


def reset() -> None:
    """Forget everything (tests)."""
    _serving.clear()
    _outgoing.clear()
