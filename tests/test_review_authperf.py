"""The authenticator's CPU per session (a profiling review). The one change
taken: a route_ok is sent as the frame its fit check already encoded
(sendable_frame) instead of being encoded a second time. A memo of parsed
user files in the reader worker (about 0.09 ms a session) was declined: it
kept the users' upstream passwords in the worker between lookups
(docs/decisions/auth.md, "Reader workers")."""

from __future__ import annotations

import pytest

# ------------------------------------------------------------ the route_ok frame


def _routes():
    from sendooway_shared.types import Route, Secret, TlsMode
    plain = Route("smtp.example.org", 587, TlsMode.STARTTLS, ca_file="/home/alice/ca.pem",
                  user="a", password=Secret("Rt-pw-31"), source="/home/alice/.fetchmailrc:3")
    big_ca = Route("smtp.example.org", 465, TlsMode.TLS, ca_file="/home/alice/ca.pem",
                   user="a", password=Secret("Rt-pw-31"), source="/home/alice/.sendoowayrc:3",
                   ca_pem="-----BEGIN CERTIFICATE-----\n" + "A" * 9000)
    return plain, big_ca


def test_the_route_ok_frame_sent_is_the_encoding_of_the_checked_reply():
    """sendable_frame hands out the frame its check made, instead of the
    route_ok being encoded again to be sent: the same bytes as encoding the
    reply sendable gives (also when the CA certificates had to be left out),
    and the same refusal of a route that cannot be sent at all."""
    from sendooway_auth._connection import sendable, sendable_frame
    from sendooway_shared.protocol import REPLIES, FrameDecoder, ProtocolError, encode
    from sendooway_shared.types import Route, TlsMode

    for r in _routes():
        reply, frame = sendable_frame(r)
        assert reply == sendable(r) and frame == encode(sendable(r))
        assert FrameDecoder(REPLIES).feed(frame) == [reply]
    assert sendable_frame(_routes()[1])[0].ca_pem == ""
    too_long = Route("smtp.example.org", 587, TlsMode.STARTTLS, source="x" * 5000)
    for fn in (sendable, sendable_frame):
        with pytest.raises(ProtocolError):
            fn(too_long)
