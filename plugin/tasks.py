"""Asyncio helpers for work that must not be cut short by a caller going away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def to_the_end(work: Awaitable[T], if_abandoned: Callable[[T], None]) -> T:
    """`work`'s result. If the caller is cancelled meanwhile (a client went away), `work` still runs to
    its end and its result goes to `if_abandoned` (to give back what it reserved, say); a failure then
    has nobody to tell and is dropped with it."""
    running = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        def finished(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                if_abandoned(done.result())

        running.add_done_callback(finished)
        raise
