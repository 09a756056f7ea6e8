"""`settle_promptly` on a real redis-server: the event loop reads answers itself, without a worker thread,
and every way that can go wrong (a slow answer, a cancelled caller, every line busy, a dropped connection,
a flushed script cache, an unseeded account, an unreachable server) still settles exactly once, or fails
as a CounterError."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
import redis

from plugin.counters import redis as redis_counters
from plugin.counters.base import Account, CounterError, Settled, Snapshot
from plugin.counters.redis import RedisCounterStore
from plugin.ledger.store import billed_between, make_engine
from plugin.rules.policy import Ask
from tests.support.processes import free_port

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
ACME = Account("acme", datetime(2026, 11, 1, tzinfo=UTC))


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.script_flush()
    yield client
    client.close()


@pytest.fixture
def moment() -> list[float]:
    """The store's monotonic clock, moved by hand."""
    return [1000.0]


@pytest.fixture
def store(client, tmp_path, moment):
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    store = RedisCounterStore(client, partial(billed_between, engine), clock=lambda: moment[0])
    yield store
    store.close()
    engine.dispose()


@pytest.fixture
def hand_offs(monkeypatch) -> list[str]:
    """The names of the functions `_call_promptly` handed to a worker thread (`connect`: a line's connection)."""
    seen: list[str] = []
    real = asyncio.to_thread

    async def counted(function, *args, **kwargs):
        seen.append(function.__name__)
        return await real(function, *args, **kwargs)

    monkeypatch.setattr(redis_counters.asyncio, "to_thread", counted)
    return seen


def settle_promptly(store: RedisCounterStore, reservation: str, actual: int, cap: int | None = 10_000) -> Settled:
    return asyncio.run(store.settle_promptly(ACME, reservation, actual, cap_ucr=cap, now=NOW))


def test_a_quick_answer_is_read_on_the_event_loop(store, hand_offs):
    store.reserve(ACME, "r1", Ask(3000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    store.reserve(ACME, "r2", Ask(3000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    assert settle_promptly(store, "r1", 1200) == Settled(1200, 1200, 3000, 1200, 0)
    assert hand_offs == ["_connect_then_call"]  # the first call connects its line, off the loop
    assert settle_promptly(store, "r2", 800) == Settled(800, 2000, 0, 2000, 0)
    assert hand_offs == ["_connect_then_call"]  # the second one: no worker thread at all


def test_a_reservation_is_read_on_the_event_loop_too(store, hand_offs):
    settle_promptly(store, "warm-up", 0)
    granted = asyncio.run(store.reserve_promptly(ACME, "r1", Ask(3000, 1000), cap_ucr=10_000, expires_at=LATER,
                                                 now=NOW))
    assert (granted.granted_ucr, granted.available_ucr) == (3000, 10_000)
    assert hand_offs == ["_connect_then_call", "_call"]  # the reservation's script is loaded on its first call
    assert store.snapshot(ACME, NOW) == Snapshot(0, 3000)


async def _ticks_while(work: Awaitable[Settled]) -> tuple[Settled, int]:
    """`work`'s answer, and how often the loop ran another task every 5 ms while it waited."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        return await work, ticks
    finally:
        ticker.cancel()


def test_a_slow_answer_is_awaited_on_the_loop_then_calls_do_not_wait_for_a_while(store, client, hand_offs, moment):
    store.reserve(ACME, "r1", Ask(3000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    settle_promptly(store, "warm-up", 0)
    client.execute_command("CLIENT", "PAUSE", 150, "ALL")  # Redis answers nobody for 150 ms
    settled, ticks = asyncio.run(_ticks_while(store.settle_promptly(ACME, "r1", 1200, cap_ucr=10_000, now=NOW)))
    assert settled == Settled(1200, 1200, 0, 1200, 0)
    assert ticks >= 10  # the loop served others while the answer was on its way
    assert store._patient_until == moment[0] + redis_counters.PATIENT_SECONDS
    assert settle_promptly(store, "r2", 100).used_ucr == 1300
    moment[0] += redis_counters.PATIENT_SECONDS
    assert settle_promptly(store, "r3", 10).used_ucr == 1310
    assert hand_offs == ["_connect_then_call"]  # the warm-up
    assert store.snapshot(ACME, NOW) == Snapshot(1310, 0)


def test_a_caller_cancelled_while_waiting_settles_once_and_frees_the_line(store, client, hand_offs):
    store.reserve(ACME, "r1", Ask(3000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    settle_promptly(store, "warm-up", 0)

    async def cancelled_then_again() -> Settled:
        client.execute_command("CLIENT", "PAUSE", 150, "ALL")
        waiting = asyncio.create_task(store.settle_promptly(ACME, "r1", 1200, cap_ucr=10_000, now=NOW))
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # Its answer is read off its line, which is free again once it has come.
        await asyncio.sleep(0.3)
        return await store.settle_promptly(ACME, "r2", 100, cap_ucr=10_000, now=NOW)

    assert asyncio.run(cancelled_then_again()) == Settled(100, 1300, 0, 1300, 0)
    assert hand_offs == ["_connect_then_call"]  # one line served all three calls
    assert store.snapshot(ACME, NOW) == Snapshot(1300, 0)


def test_calls_beyond_the_loops_lines_go_to_a_worker_thread(store, client, hand_offs, monkeypatch):
    monkeypatch.setattr(redis_counters, "MAX_LINES", 2)
    for reservation in ("r1", "r2", "r3"):
        store.reserve(ACME, reservation, Ask(2000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)

    async def at_once(reservations: tuple[str, ...], actual: int) -> list[Settled]:
        return await asyncio.gather(*(store.settle_promptly(ACME, reservation, actual, cap_ucr=10_000, now=NOW)
                                      for reservation in reservations))

    asyncio.run(at_once(("warm-up-1", "warm-up-2"), 0))  # both lines connected
    hand_offs.clear()
    client.execute_command("CLIENT", "PAUSE", 100, "ALL")
    assert sorted(settled.used_ucr for settled in asyncio.run(at_once(("r1", "r2", "r3"), 1000))) == [1000, 2000, 3000]
    assert hand_offs == ["_call"]  # two calls on the loop's lines, the third without one
    assert store.snapshot(ACME, NOW) == Snapshot(3000, 0)


def test_a_connection_redis_dropped_is_reconnected_not_failed(store, client, hand_offs):
    settle_promptly(store, "warm-up", 0)
    client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert settle_promptly(store, "r1", 500, cap=None) == Settled(500, 500, 0, 500, 0)
    assert hand_offs == ["_connect_then_call", "_connect_then_call"]
    assert settle_promptly(store, "r2", 500, cap=None).used_ucr == 1000
    assert len(hand_offs) == 2  # back on the loop


def test_a_flushed_script_cache_loads_the_script_and_runs_it_once(store, client, hand_offs):
    settle_promptly(store, "warm-up", 0)
    client.script_flush()
    assert settle_promptly(store, "r1", 700, cap=None) == Settled(700, 700, 0, 700, 0)
    assert hand_offs[-1] == "_call"
    assert settle_promptly(store, "r2", 300, cap=None).used_ucr == 1000


def test_an_unseeded_account_starts_from_the_ledger_on_a_worker_thread(store, client, hand_offs):
    settle_promptly(store, "warm-up", 0)
    client.flushdb()  # the account's counters are gone: the ledger (empty) is where they start
    assert settle_promptly(store, "r1", 900, cap=None) == Settled(900, 900, 0, 900, 0)
    assert hand_offs[-1] == "_call"


def test_an_unreachable_redis_is_a_counter_error():
    store = RedisCounterStore(redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"), lambda *_: 0)
    with pytest.raises(CounterError, match="redis counters: ConnectionError"):
        settle_promptly(store, "r1", 5)
    with pytest.raises(CounterError, match="a moment ago, not retried yet"):
        settle_promptly(store, "r1", 5)
    store.close()
