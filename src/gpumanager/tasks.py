"""Background tasks that must outlive their own bugs.

An error nobody foresaw in one background task is logged and ends that task, but the fleet's other
tasks and loops go on: one bad cloud answer must not stop every idle pause. A loop that fails is
started again a moment later. Cancellation always passes through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from loguru import logger


async def guarded(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run `fn(*args)`; log (never raise) any error it did not foresee."""
    try:
        await fn(*args)
    except Exception as exc:
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", repr(fn))
        logger.opt(exception=exc).error("background task {} failed unexpectedly", name)


async def forever(loop: Callable[[], Awaitable[None]], *, restart_seconds: float = 1.0) -> None:
    """Run a loop; if it ever fails, log it and start it again `restart_seconds` later."""
    while True:
        await guarded(loop)
        await anyio.sleep(restart_seconds)
