"""Asyncio helpers for work that must not be cut short by a caller going away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("meterline")

_running: set[asyncio.Future] = set()
"""Work started by `in_background`: asyncio keeps only weak references to tasks."""


def in_background(work: Awaitable[object], what: str) -> None:
    """Run `work` to its end although nobody awaits it (its answer has gone out, or its caller went
    away); a failure is logged as `what`."""
    task = asyncio.ensure_future(work)
    _running.add(task)
    task.add_done_callback(partial(_finished, what))


def _finished(what: str, task: asyncio.Future) -> None:
    _running.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("meterline: %s failed in the background: %s", what, task.exception().__class__.__name__)


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
