"""Small pieces of the serving modes: -b parsing, listening sockets."""

from __future__ import annotations

import socket

import pytest

from sendooway_front._server import BindError, listen_sockets, parse_bind

from .fakeworld import free_port_everywhere


@pytest.mark.parametrize("value, expected", [
    ("587", (None, 587)),
    ("127.0.0.1:2525", ("127.0.0.1", 2525)),
    ("[::1]:2525", ("::1", 2525)),
    ("localhost:25", ("localhost", 25)),
    ("submission", (None, 587)),           # service names, as the original's -b
    ("127.0.0.1:smtps", ("127.0.0.1", 465)),
])
def test_parse_bind(value, expected):
    assert parse_bind(value) == expected


@pytest.mark.parametrize("value", ["", "0", "65536", "x", "::1:25", "[::1]25", "host:", ":25x",
                                   "nosuchservice", "１２"])
def test_parse_bind_refuses(value):
    with pytest.raises(BindError):
        parse_bind(value)


def test_listen_on_all_addresses_takes_both_families():
    port = free_port_everywhere()  # (bound on both families)
    socks = listen_sockets(None, port)
    try:
        for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
            with socket.socket(family) as c:
                c.connect((host, port))
    finally:
        for s in socks:
            s.close()


def test_listen_on_a_name_and_busy_port():
    port = free_port_everywhere()  # (localhost may be both 127.0.0.1 and ::1)
    socks = listen_sockets("localhost", port)
    try:
        assert socks
        with pytest.raises(BindError, match="cannot listen on 127.0.0.1"):
            listen_sockets("127.0.0.1", port)
    finally:
        for s in socks:
            s.close()
