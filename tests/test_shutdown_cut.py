"""A session still in the middle of something when the shutdown grace ends
(and the 2 s after it) is cut; its client still hears why: 421 4.3.2, in
mid-AUTH and in mid-DATA too (they used to see the connection close with
no reply), and a message cut in mid-DATA never gets its final dot
upstream and has its message log line."""

from __future__ import annotations

import asyncio
import os
import signal

from .scripted_relay import LOGIN, ListeningFrontend, Upstream, careful


async def _read_until_closed(reader: asyncio.StreamReader, seconds: float) -> bytes:
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(4096), seconds):
            out += chunk
    except (ConnectionError, asyncio.TimeoutError):
        pass
    return out


def _cut(monkeypatch, opening: bytes, until: bytes):
    """Open a session, send `opening`, read until `until`, stop the server;
    what the client read after `until`, the upstream and the relay's log."""

    async def script(up, c):
        await careful(up, c)

    async def go():
        up = await Upstream(script).start()
        async with ListeningFrontend(monkeypatch, up, timeout=30, grace=0.3) as lf:
            reader, writer = await asyncio.open_connection("127.0.0.1", lf.port)
            writer.write(opening)
            await writer.drain()
            seen = b""
            while until not in seen:
                seen += await asyncio.wait_for(reader.read(4096), 5)
            os.kill(os.getpid(), signal.SIGTERM)  # serve_listening's handler: stop
            out = await _read_until_closed(reader, 10)
            writer.close()
            await asyncio.wait_for(lf.server, 15)
            return out, up, lf.handler.lines

    return asyncio.run(go())


def test_a_client_in_mid_auth_hears_421_when_it_is_cut(monkeypatch):
    out, _up, _log = _cut(monkeypatch, b"EHLO c.test\r\nAUTH LOGIN\r\n", b"334 ")
    assert out.startswith(b"421 4.3.2 "), out


def test_a_client_in_mid_data_hears_421_and_no_final_dot_goes_upstream(monkeypatch):
    opening = LOGIN + b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n" \
        + b"Subject: half\r\n\r\nthe first half\r\n"
    out, up, log = _cut(monkeypatch, opening, b"354 ")
    assert out.startswith(b"421 4.3.2 "), out
    assert up.messages == []  # the message never ended upstream
    [line] = [ln for ln in log if ": message user=alice" in ln]
    assert "no final dot sent" in line and "stopping" in line, line
