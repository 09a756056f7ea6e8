"""plugin.tasks: work a departing caller must not cut short, and work nobody awaits."""

from __future__ import annotations

import asyncio

import pytest

from plugin.tasks import in_background, to_the_end


async def test_the_result_of_work_whose_caller_stayed_is_the_callers():
    abandoned: list[int] = []
    assert await to_the_end(asyncio.sleep(0, result=7), abandoned.append) == 7
    assert abandoned == []


async def test_work_whose_caller_left_runs_to_its_end_and_its_result_is_handed_over():
    abandoned: list[int] = []
    release = asyncio.Event()

    async def work() -> int:
        await release.wait()
        return 7

    caller = asyncio.ensure_future(to_the_end(work(), abandoned.append))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert abandoned == []
    release.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert abandoned == [7]


async def test_work_that_fails_after_its_caller_left_hands_nothing_over():
    abandoned: list[int] = []
    release = asyncio.Event()

    async def work() -> int:
        await release.wait()
        raise RuntimeError("the store could not answer")

    caller = asyncio.ensure_future(to_the_end(work(), abandoned.append))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    release.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert abandoned == []


async def test_work_in_the_background_runs_to_its_end_and_a_failure_is_logged(caplog):
    done: list[str] = []

    async def fine() -> None:
        await asyncio.sleep(0)
        done.append("fine")

    async def failing() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("the store could not answer")

    in_background(fine(), "giving back a slice")
    in_background(failing(), "releasing a reservation")
    for _ in range(10):
        await asyncio.sleep(0)
    assert done == ["fine"]
    assert [record.getMessage() for record in caplog.records] == [
        "meterline: releasing a reservation failed in the background: RuntimeError"]
