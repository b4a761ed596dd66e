"""Stream.interrupt() (the SIGTERM 421 path) racing the read deadline in one loop pass."""

from __future__ import annotations

import asyncio

from sendooway_front._stream import Stream


class _Writer:
    transport = None

    def get_extra_info(self, *_a):
        return None

    def is_closing(self) -> bool:
        return False


def test_interrupt_in_the_same_tick_as_the_read_deadline_is_a_timeout_not_a_cancel():
    """`Stream.interrupt()` (request_stop at the end of the SIGTERM grace)
    cancels the waiting task; if the stream's own read deadline falls due in
    the same event-loop tick, `_expire` still sees `_waiter` set and cancels
    the task a second time. `_wait` uncancels once only, so CancelledError
    (not TimeoutError) leaks out of the read: the session task dies as if
    cancelled and the client gets a silent close instead of its 421."""

    async def go() -> str:
        loop = asyncio.get_running_loop()
        st = Stream(asyncio.StreamReader(), _Writer(), 0.2)
        start = loop.time()
        loop.call_at(start + 0.2 - 0.0005, st.interrupt)  # due in the tick of the deadline
        try:
            await st.read(100)
        except TimeoutError:
            return "timeout"
        except asyncio.CancelledError:
            return "cancelled"
        return "data"

    assert asyncio.run(go()) == "timeout"
