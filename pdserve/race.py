"""Running a piece of work until something else happens first (a client leaves, a drain
expires): the one pattern the router's and the drain's request handling share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def run_until(work: Awaitable[T], stop: Awaitable[object]) -> asyncio.Future[T]:
    """Run `work` until it ends or `stop` does; returns work's task, done or still running
    (the caller decides what to do with it). Cancelled itself, it cancels `work` too."""
    task, stopper = asyncio.ensure_future(work), asyncio.ensure_future(stop)
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the server itself is stopping: stop the work too
        task.cancel()
        raise
    finally:
        stopper.cancel()
    return task
