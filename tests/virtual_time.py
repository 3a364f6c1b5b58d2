"""An asyncio event loop on a virtual clock, for unit tests of the core's timing without waiting.

Whenever every task is blocked and the next thing due is a timer, the clock jumps to it: a wake
that times out after 600 s fails at once, and `anyio.current_time()` reads exactly 600 s later.
Real I/O still works (it is polled between jumps), but the tests that use this loop have none:
the core runs against in-memory providers and `httpx.MockTransport`.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class _JumpingSelector:
    """Wraps the loop's selector: a wait for I/O that would time out instead advances the clock."""

    def __init__(self, selector: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._selector, self._loop = selector, loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._selector.select(0)
        if events:
            return events
        if timeout is None:  # nothing scheduled: only I/O (a worker thread's result) can come
            return self._selector.select(0.01)
        self._loop.advance(timeout)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._selector = _JumpingSelector(self._selector, self)  # type: ignore[has-type]

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)
