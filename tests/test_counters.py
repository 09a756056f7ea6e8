"""One suite over every counter store: embedded (SQLite, PostgreSQL) and a real redis-server.

Each backend must do exactly what `plugin.rules.policy.grant` / `settle` say, atomically.
"""

from __future__ import annotations

import asyncio
import random
import threading
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
import redis
from sqlalchemy import text

from plugin.counters.base import Account, CounterError, Grant, Settled, Snapshot
from plugin.counters.redis import RedisCounterStore
from plugin.counters.sql import SqlCounterStore
from plugin.ledger.store import billed_between, make_engine, write_records
from plugin.rules.policy import Ask, Ceiling, Refusal, grant, settle
from plugin.rules.ratelimit import RateLimit
from plugin.rules.records import BillingRecord, LedgerRow
from tests.support.postgres import empty_all_tables
from tests.support.processes import free_port

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
ACME = Account("acme", datetime(2026, 11, 1, tzinfo=UTC))


@pytest.fixture
def ledger_engine(request, tmp_path):
    """The ledger the counters start from: the same database for the embedded store, SQLite beside Redis."""
    if "postgres" in request.node.name:
        engine = make_engine(request.getfixturevalue("postgres_url"))
        empty_all_tables(engine)
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def counters(request, ledger_engine):
    if request.param == "redis":
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        client.flushdb()
        return RedisCounterStore(client, partial(billed_between, ledger_engine))
    return SqlCounterStore(ledger_engine)


def test_reserve_grants_the_full_ask_then_what_is_left_then_refuses(counters):
    assert counters.reserve(ACME, "r1", Ask(6000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW).granted_ucr == 6000
    second = counters.reserve(ACME, "r2", Ask(6000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    assert (second.granted_ucr, second.available_ucr) == (4000, 4000)
    third = counters.reserve(ACME, "r3", Ask(6000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    assert (third.granted_ucr, third.available_ucr) == (None, 0)
    assert counters.snapshot(ACME, NOW) == Snapshot(0, 10_000)


def test_without_a_ceiling_everything_is_granted(counters):
    grant_ = counters.reserve(ACME, "r1", Ask(10**12, 1), cap_ucr=None, expires_at=LATER, now=NOW)
    assert (grant_.granted_ucr, grant_.available_ucr) == (10**12, None)


def test_settle_bills_real_usage_and_frees_the_reservation(counters):
    counters.reserve(ACME, "r1", Ask(6000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    assert counters.settle(ACME, "r1", 2500, cap_ucr=10_000, now=NOW).billed_ucr == 2500
    assert counters.snapshot(ACME, NOW) == Snapshot(2500, 0)
    assert counters.settle(ACME, "r1", 2500, cap_ucr=10_000, now=NOW).billed_ucr == 2500  # settled twice: the reservation is gone
    assert counters.snapshot(ACME, NOW) == Snapshot(5000, 0)


def test_the_prompt_calls_are_reserve_and_settle_for_a_caller_on_an_event_loop(counters):
    rate = RateLimit(requests=2, window_ms=60_000)

    async def reserve(reservation: str) -> Grant:
        return await counters.reserve_promptly(ACME, reservation, Ask(6000, 1000), cap_ucr=10_000, expires_at=LATER,
                                               now=NOW, rate=rate)

    async def run() -> tuple[list[Grant], list[Settled]]:
        grants = [await reserve("r1"), await reserve("r2"), await reserve("r3")]
        return grants, [await counters.settle_promptly(ACME, "r1", 2500, cap_ucr=10_000, now=NOW),
                        await counters.settle_promptly(ACME, "r2", 9000, cap_ucr=10_000, now=NOW)]

    grants, settled = asyncio.run(run())
    assert grants == [Grant(6000, 10_000), Grant(4000, 4000, rate_current=1), Grant(None, None, True, 2)]
    assert settled == [Settled(2500, 2500, 4000, 2500, 0), Settled(7500, 10_000, 0, 10_000, 0)]
    counters.close()


def test_settle_never_bills_past_the_ceiling(counters):
    counters.reserve(ACME, "r1", Ask(6000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    counters.reserve(ACME, "r2", Ask(4000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    assert counters.settle(ACME, "r1", 7000, cap_ucr=10_000, now=NOW).billed_ucr == 6000  # 4,000 are r2's
    assert counters.settle(ACME, "r2", 9000, cap_ucr=10_000, now=NOW).billed_ucr == 4000
    assert counters.snapshot(ACME, NOW) == Snapshot(10_000, 0)


def test_release_frees_without_billing(counters):
    counters.reserve(ACME, "r1", Ask(6000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    counters.release(ACME, "r1")
    counters.release(ACME, "r1")  # twice is harmless
    assert counters.snapshot(ACME, NOW) == Snapshot(0, 0)


def test_expired_reservations_stop_counting_and_are_dropped(counters):
    counters.reserve(ACME, "stale", Ask(9000, 1000), cap_ucr=10_000, expires_at=NOW + timedelta(seconds=30), now=NOW)
    assert counters.snapshot(ACME, NOW + timedelta(seconds=31)) == Snapshot(0, 0)
    fresh = counters.reserve(ACME, "fresh", Ask(9000, 1000), cap_ucr=10_000, expires_at=LATER,
                             now=NOW + timedelta(seconds=31))
    assert fresh.granted_ucr == 9000
    assert counters.settle(ACME, "stale", 500, cap_ucr=10_000, now=NOW).billed_ucr == 500  # a late answer still bills what fits
    assert counters.snapshot(ACME, NOW + timedelta(seconds=31)) == Snapshot(500, 9000)


def test_accounts_are_separate(counters):
    other_customer = Account("globex", ACME.period)
    next_period = Account("acme", datetime(2026, 12, 1, tzinfo=UTC))
    counters.reserve(ACME, "r1", Ask(10_000, 1), cap_ucr=10_000, expires_at=LATER, now=NOW)
    for n, account in enumerate((other_customer, next_period)):
        assert counters.reserve(account, f"r{n + 2}", Ask(10_000, 1), cap_ucr=10_000, expires_at=LATER,
                                now=NOW).granted_ucr


def test_rebuild_sets_used_from_the_ledger_and_keeps_reservations(counters):
    counters.reserve(ACME, "r1", Ask(3000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    counters.rebuild(ACME, 6000)
    assert counters.snapshot(ACME, NOW) == Snapshot(6000, 3000)
    assert counters.reserve(ACME, "r2", Ask(3000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW).granted_ucr == 1000


def bill_in_ledger(engine, credits_ucr: int, at: datetime, ledger_id: str) -> None:
    write_records(engine, [BillingRecord(LedgerRow(id=ledger_id, customer_id="acme", model="m", credits_ucr=credits_ucr,
                                                   created_at=at))])


def test_counters_start_from_what_the_ledger_billed_this_period(counters, ledger_engine):
    """Usage from before the counters (an upgrade, a plan change, a flushed Redis) still counts."""
    bill_in_ledger(ledger_engine, 9000, ACME.period + timedelta(days=2), "before")
    bill_in_ledger(ledger_engine, 5000, ACME.period - timedelta(seconds=1), "last-period")
    assert counters.reserve(ACME, "r1", Ask(3000, 500), cap_ucr=10_000, expires_at=LATER, now=NOW).granted_ucr == 1000
    assert counters.snapshot(ACME, NOW) == Snapshot(9000, 1000)


@pytest.mark.parametrize("promptly", [False, True], ids=["settle", "settle_promptly"])
async def test_a_bill_already_in_the_ledger_is_counted_once_when_the_account_starts_from_it(
        counters, ledger_engine, promptly):
    """Counters of a customer without a ceiling follow the ledger: its row is committed before the
    settlement, so an account started from the ledger at that moment must not add it again."""

    async def settle(call_id: str, bill: int) -> Settled:
        if promptly:
            return await counters.settle_promptly(ACME, call_id, bill, cap_ucr=None, now=NOW, already_in_ledger=True)
        return counters.settle(ACME, call_id, bill, cap_ucr=None, now=NOW, already_in_ledger=True)

    bill_in_ledger(ledger_engine, 9000, NOW, "earlier")
    bill_in_ledger(ledger_engine, 700, NOW, "this-call")
    first = await settle("this-call", 700)
    assert (first.billed_ucr, first.used_ucr) == (700, 9700)
    bill_in_ledger(ledger_engine, 300, NOW, "next-call")
    second = await settle("next-call", 300)
    assert (second.billed_ucr, second.used_ucr) == (300, 10_000)
    assert counters.snapshot(ACME, NOW) == Snapshot(10_000, 0)


def test_a_flushed_redis_starts_again_from_the_ledger(redis_url, tmp_path):
    """Only Redis can lose its counters (the embedded store lives in the ledger's own database)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    counters = RedisCounterStore(client, partial(billed_between, engine))
    counters.reserve(ACME, "r1", Ask(4000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    bill_in_ledger(engine, counters.settle(ACME, "r1", 4000, cap_ucr=10_000, now=NOW).billed_ucr, NOW, "r1")
    client.flushdb()
    assert counters.reserve(ACME, "r2", Ask(9000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW).granted_ucr == 6000
    bill_in_ledger(engine, counters.settle(ACME, "r2", 6000, cap_ucr=10_000, now=NOW).billed_ucr, NOW, "r2")
    client.flushdb()  # a settlement after a flush starts from the ledger too: the cap is already used up
    assert counters.settle(ACME, "late", 500, cap_ucr=10_000, now=NOW).billed_ucr == 0
    assert counters.snapshot(ACME, NOW) == Snapshot(10_000, 0)
    assert counters.hour_spend("acme", NOW) == (10_000, 0)  # the breaker's hour buckets come back too
    engine.dispose()


def test_a_reservation_that_runs_out_makes_redis_start_again_from_the_ledger(redis_url, tmp_path):
    """A bill the reservation covered is written to the ledger before Redis hears of it: a proxy killed
    in between leaves its reservation to run out, and the counters then start from the ledger."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    counters = RedisCounterStore(client, partial(billed_between, engine))
    counters.reserve(ACME, "dead-slice", Ask(3000, 1000, spare_ucr=6000), cap_ucr=100_000,
                     expires_at=NOW + timedelta(seconds=30), now=NOW)
    counters.reserve(ACME, "live", Ask(1000, 1000), cap_ucr=100_000, expires_at=LATER, now=NOW)
    bill_in_ledger(engine, 2500, NOW, "written-never-settled")
    assert counters.snapshot(ACME, NOW) == Snapshot(0, 10_000)
    later = NOW + timedelta(seconds=31)
    granted = counters.reserve(ACME, "next", Ask(9000, 1000), cap_ucr=100_000, expires_at=LATER, now=later)
    assert (granted.granted_ucr, granted.available_ucr) == (9000, 100_000 - 2500 - 1000)
    assert counters.snapshot(ACME, later) == Snapshot(2500, 10_000)
    engine.dispose()


def test_every_backend_computes_what_the_policy_says(counters):
    """A long random sequence of reserve (with and without a spare) / settle (whole, or a portion of a
    shared slice) / release, compared step by step with the pure policy."""
    rng = random.Random(4)
    limit = Ceiling(100_000, Refusal.HARD_LIMIT)
    used = reserved = 0
    held: dict[str, int] = {}
    for step in range(200):
        if held and rng.random() < 0.45:
            reservation = rng.choice(sorted(held))
            amount = held[reservation]
            choice = rng.random()
            if choice < 0.3:  # one request of a shared slice settles: a portion, the rest stays held
                actual = rng.randint(0, amount + 2000)
                portion = rng.randint(0, amount + 2000)
                taken = min(portion, amount)
                expected = settle(actual, reserved_for_this_ucr=taken, used_ucr=used, reserved_ucr=reserved,
                                  limit=limit)
                got = counters.settle(ACME, reservation, actual, cap_ucr=limit.ucr, now=NOW, portion_ucr=portion)
                assert (got.billed_ucr, got.reserved_ucr) == (expected.bill_ucr, reserved - taken), step
                used += expected.bill_ucr
                reserved -= taken
                held[reservation] -= taken
                continue
            del held[reservation]
            if choice < 0.85:
                actual = max(0, amount + rng.randint(-5000, 3000))
                expected = settle(actual, reserved_for_this_ucr=amount, used_ucr=used, reserved_ucr=reserved,
                                  limit=limit).bill_ucr
                assert counters.settle(ACME, reservation, actual, cap_ucr=limit.ucr, now=NOW).billed_ucr == expected
                used += expected
            else:
                counters.release(ACME, reservation)
            reserved -= amount
        else:
            full = rng.randint(1, 30_000)
            ask = Ask(full, rng.randint(1, full), spare_ucr=rng.choice([0, rng.randint(0, 40_000)]))
            expected = grant(ask, used_ucr=used, reserved_ucr=reserved, limit=limit)
            got = counters.reserve(ACME, f"r{step}", ask, cap_ucr=limit.ucr, expires_at=LATER, now=NOW)
            assert got.granted_ucr == expected, step
            if expected is not None:
                held[f"r{step}"] = expected
                reserved += expected
        assert counters.snapshot(ACME, NOW) == Snapshot(used, reserved)


def test_a_shared_slice_settles_portions_and_is_released_whole(counters):
    lease = counters.reserve(ACME, "slice", Ask(1000, 100, spare_ucr=9000), cap_ucr=1_000_000, expires_at=LATER,
                             now=NOW)
    assert lease.granted_ucr == 10_000
    first = counters.settle(ACME, "slice", 700, cap_ucr=1_000_000, now=NOW, portion_ucr=700)
    assert (first.billed_ucr, first.used_ucr, first.reserved_ucr) == (700, 700, 9300)
    over = counters.settle(ACME, "slice", 1200, cap_ucr=1_000_000, now=NOW, portion_ucr=1200)
    assert (over.billed_ucr, over.reserved_ucr) == (1200, 8100)
    assert counters.snapshot(ACME, NOW) == Snapshot(1900, 8100)
    counters.release(ACME, "slice")
    assert counters.snapshot(ACME, NOW) == Snapshot(1900, 0)
    late = counters.settle(ACME, "slice", 300, cap_ucr=1_000_000, now=NOW, portion_ucr=300)
    assert (late.billed_ucr, late.reserved_ucr) == (300, 0)  # released already: billed from what is free


def test_concurrent_reservations_never_overspend(counters):
    """40 threads race for a ceiling that fits exactly 10 of them."""
    granted: list[int] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        result = counters.reserve(ACME, f"c{n}", Ask(1000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
        if result.granted_ucr is not None:
            with lock:
                granted.append(result.granted_ucr)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert granted == [1000] * 10
    assert counters.snapshot(ACME, NOW) == Snapshot(0, 10_000)


def test_an_unreachable_redis_is_a_counter_error_then_fails_fast_for_a_moment():
    moment = [100.0]
    store = RedisCounterStore(redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"), lambda *_: 0,
                              pause_after_failure=1.0, clock=lambda: moment[0])
    with pytest.raises(CounterError, match="redis counters: ConnectionError"):
        store.reserve(ACME, "r1", Ask(1, 1), cap_ucr=None, expires_at=LATER, now=NOW)
    # The next calls within the pause do not wait for a connection again.
    with pytest.raises(CounterError, match="ConnectionError a moment ago, not retried yet"):
        store.settle(ACME, "r1", 5, cap_ucr=None, now=NOW)
    with pytest.raises(CounterError, match="ConnectionError a moment ago, not retried yet"):
        store.hour_spend("acme", NOW)
    moment[0] += 1.5  # the pause is over: it tries (and fails) again
    with pytest.raises(CounterError, match="redis counters: ConnectionError"):
        store.reserve(ACME, "r2", Ask(1, 1), cap_ucr=None, expires_at=LATER, now=NOW)


def test_a_failing_database_is_a_counter_error(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'gone.db'}")
    store = SqlCounterStore(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE reservations"))
    with pytest.raises(CounterError, match="embedded counters"):
        store.reserve(ACME, "r1", Ask(1, 1), cap_ucr=None, expires_at=LATER, now=NOW)
    engine.dispose()


def test_settle_reports_usage_and_the_hour_buckets(counters):
    counters.reserve(ACME, "r1", Ask(6000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    counters.reserve(ACME, "r2", Ask(1000, 1000), cap_ucr=10_000, expires_at=LATER, now=NOW)
    earlier = NOW - timedelta(minutes=30)  # the previous clock hour
    assert counters.settle(ACME, "old", 700, cap_ucr=None, now=earlier) == Settled(700, 700, 7000, 700, 0)
    assert counters.settle(ACME, "r1", 2500, cap_ucr=10_000, now=NOW) == Settled(2500, 3200, 1000, 2500, 700)
    assert counters.hour_spend("acme", NOW) == (2500, 700)
    assert counters.hour_spend("acme", NOW + timedelta(hours=1)) == (0, 2500)
    counters.release(ACME, "r2")
    assert counters.hour_spend("acme", NOW) == (2500, 700)  # a release bills nothing


def test_a_customer_without_a_ceiling_is_counted_without_reserving(counters):
    """Customers with no ceiling never reserve, but their usage still counts (soft limits, breaker)."""
    assert counters.settle(ACME, "never-reserved", 4000, cap_ucr=None, now=NOW) == Settled(4000, 4000, 0, 4000, 0)
    nothing = counters.reserve(ACME, "r1", None, cap_ucr=None, expires_at=LATER, now=NOW)
    assert (nothing.granted_ucr, nothing.rate_limited) == (None, False)
    assert counters.snapshot(ACME, NOW) == Snapshot(4000, 0)


def test_the_rate_limit_counts_only_what_it_admits(counters):
    rate = RateLimit(requests=3, window_ms=60_000)
    answers = [counters.reserve(ACME, f"r{n}", None, cap_ucr=None, expires_at=LATER, now=NOW, rate=rate)
               for n in range(5)]
    assert [answer.rate_limited for answer in answers] == [False, False, False, True, True]
    assert [(answer.rate_current, answer.rate_previous) for answer in answers] == [(0, 0), (1, 0), (2, 0), (3, 0),
                                                                                (3, 0)]
    # a refused request reserves nothing even when it asked
    refused = counters.reserve(ACME, "big", Ask(5000, 5000), cap_ucr=10_000, expires_at=LATER, now=NOW, rate=rate)
    assert refused.rate_limited and refused.granted_ucr is None
    assert counters.snapshot(ACME, NOW) == Snapshot(0, 0)
    # 45 s into the next window the 3 requests weigh 0.75 (3 * 15 / 60): two more fit
    later = datetime.fromtimestamp((int(NOW.timestamp()) // 60 + 1) * 60 + 45, UTC)
    again = [counters.reserve(ACME, f"n{n}", Ask(100, 100), cap_ucr=10_000, expires_at=later + timedelta(minutes=5),
                              now=later, rate=rate) for n in range(3)]
    assert [(answer.rate_limited, answer.granted_ucr) for answer in again] == [(False, 100), (False, 100), (True, None)]
    assert [(answer.rate_current, answer.rate_previous) for answer in again] == [(0, 3), (1, 3), (2, 3)]


def test_the_rate_limit_holds_under_concurrency(counters):
    rate = RateLimit(requests=7, window_ms=60_000)
    admitted: list[bool] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        result = counters.reserve(ACME, f"c{n}", None, cap_ucr=None, expires_at=LATER, now=NOW, rate=rate)
        with lock:
            admitted.append(not result.rate_limited)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(admitted) == [False] * 23 + [True] * 7
