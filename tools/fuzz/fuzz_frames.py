#!/usr/bin/env python3
"""Coverage-guided fuzzing of the frontend ⇄ authenticator frame decoder
(`sendooway_shared.protocol.FrameDecoder`), on both sides' menus, as a
compromised frontend (requests) or authenticator (replies) could send them:
random bytes in random pieces give messages or ProtocolError, nothing else;
a dead decoder stays dead; an incomplete frame never holds more than one
frame's bytes; every decoded message encodes back to a frame that decodes
to the same message.

    .venv/bin/python tools/fuzz/fuzz_frames.py -max_total_time=600 \\
        -dict=tools/fuzz/frames.dict tools/fuzz/corpus/frames
"""

from __future__ import annotations

from _common import atheris, run

with atheris.instrument_imports(include=["sendooway_shared", "msgpack"]):
    from sendooway_shared.protocol import (
        MAX_FRAME, REPLIES, REQUESTS, FrameDecoder, ProtocolError, encode,
    )


def test_one_input(data: bytes) -> None:
    if not data:
        return
    allowed = REQUESTS if data[0] & 1 else REPLIES
    step = (data[0] >> 1) + 1  # the stream arrives in pieces of 1..128 bytes
    body = data[1:]
    decoder = FrameDecoder(allowed)
    for i in range(0, len(body), step):
        try:
            messages = decoder.feed(body[i:i + step])
        except ProtocolError:
            try:
                decoder.feed(b"\0")
            except ProtocolError:
                return
            raise AssertionError("a decoder that broke the protocol went on")
        assert decoder.pending < 4 + MAX_FRAME
        for msg in messages:
            assert allowed.get(msg.TYPE) is type(msg), msg
            again = FrameDecoder(allowed).feed(encode(msg))
            assert again == [msg], (msg, again)

if __name__ == "__main__":
    run(test_one_input)
