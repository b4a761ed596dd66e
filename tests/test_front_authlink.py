"""The frontend's authenticator link against a scripted authenticator on a
real UNIX socket: hello goes out at once, its Welcome is read before the
first answer, and anything but a proper Welcome fails the link."""

from __future__ import annotations

import asyncio
import os

import pytest

from sendooway_front._authlink import AuthLinkError, SocketConnector
from sendooway_shared.protocol import (
    REQUESTS, VERSION, AuthOk, AuthRequest, Error, FrameDecoder, Hello, Welcome, encode,
)
from sendooway_shared.types import Secret


async def scripted(tmp_path, answers, greet_delay=0.0):
    """Serve one connection: answer each request with the next of `answers`
    (a Message, or None to close). Returns (server, path, requests seen)."""
    seen = []

    async def handle(reader, writer):
        decoder = FrameDecoder(REQUESTS)
        queue = list(answers)
        while queue:
            data = await reader.read(65536)
            if not data:
                break
            for msg in decoder.feed(data):
                seen.append(msg)
                if isinstance(msg, Hello) and greet_delay:
                    await asyncio.sleep(greet_delay)
                answer = queue.pop(0)
                if answer is None:
                    writer.close()
                    return
                writer.write(encode(answer))
        writer.close()

    path = os.path.join(tmp_path, "auth.sock")
    server = await asyncio.start_unix_server(handle, path)
    return server, path, seen


def test_hello_is_sent_at_once_and_its_welcome_read_before_the_auth_answer(tmp_path):
    async def main():
        server, path, seen = await scripted(tmp_path, [Welcome(VERSION), AuthOk("alice")],
                                            greet_delay=0.3)
        async with server:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            link = await SocketConnector(path, 5).open("S1", "192.0.2.7")
            opened = loop.time() - t0
            user = await link.auth("alice", Secret("pw"))
            link.close()
        return opened, user, seen

    opened, user, seen = asyncio.run(main())
    assert opened < 0.25  # did not wait for the (slow) Welcome
    assert user == "alice"
    assert isinstance(seen[0], Hello) and seen[0].session == "S1" and seen[0].client == "192.0.2.7"
    assert isinstance(seen[1], AuthRequest) and seen[1].user == "alice"


@pytest.mark.parametrize("first", [Error("peer refused"), Welcome(VERSION + 1), AuthOk("alice"), None])
def test_anything_but_a_welcome_fails_the_first_request(tmp_path, first):
    async def main():
        server, path, _seen = await scripted(tmp_path, [first, AuthOk("alice")])
        async with server:
            link = await SocketConnector(path, 5).open("S2", "192.0.2.8")
            with pytest.raises(AuthLinkError):
                await link.auth("alice", Secret("pw"))
            with pytest.raises(AuthLinkError):  # the link stays failed
                await link.route("alice@example.org")
            link.close()

    asyncio.run(main())


def test_connect_failure_is_still_reported_by_open(tmp_path):
    async def main():
        with pytest.raises(AuthLinkError, match="cannot connect"):
            await SocketConnector(os.path.join(tmp_path, "none.sock"), 2).open("S3", "::1")

    asyncio.run(main())


def test_an_error_answer_is_logged_with_its_reason_not_as_unexpected(tmp_path):
    """A login the authenticator turns away before closing (busy: the user
    is in backoff past the wait) used to be logged by the frontend as
    "unexpected 'error' from the authenticator", which read as a bug (a
    soak test); the reason it gave is what the log needs."""
    async def main():
        reason = "temporary failure: authentication is unavailable"
        server, path, _seen = await scripted(tmp_path, [Welcome(VERSION), Error(reason)])
        async with server:
            link = await SocketConnector(path, 5).open("S3", "192.0.2.9")
            with pytest.raises(AuthLinkError) as caught:
                await link.auth("bob", Secret("pw"))
            link.close()
        return str(caught.value)

    text = asyncio.run(main())
    assert text == "the authenticator answered: temporary failure: authentication is unavailable"
