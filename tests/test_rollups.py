"""The usage rollups on SQLite and PostgreSQL: always equal to the ledger, after random traffic,
after a backfill, and read back over any window exactly as the ledger sums."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

from plugin.ledger import rollups, store
from plugin.ledger.models import UsageDay, UsageHour
from plugin.ledger.store import make_engine
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.rules.rollups import DAY, unit_of
from tests.support.rollups import assert_rollups_match_ledger

START = datetime(2026, 10, 30, 22, 0, tzinfo=UTC)
CUSTOMERS = ("acme", "globex", "initech")


def random_rows(rng: random.Random, count: int, prefix: str) -> list[LedgerRow]:
    """Rows over four days, many on the edges of hours and days (where rounding would show)."""
    rows = []
    for number in range(count):
        moment = START + timedelta(seconds=rng.randrange(0, 4 * 86400))
        edge = rng.random()
        if edge < 0.2:
            moment = moment.replace(minute=59, second=59, microsecond=999_999)
        elif edge < 0.4:
            moment = moment.replace(minute=0, second=0, microsecond=0)
        else:
            moment = moment.replace(microsecond=rng.randrange(1_000_000))
        cache_hit = rng.random() < 0.1
        rows.append(LedgerRow(
            id=f"{prefix}-{number}", customer_id=rng.choice(CUSTOMERS), model=rng.choice(("gpt-4o", "claude")),
            member=rng.choice(("-", "alice", "bob", "<script>")), action=rng.choice(("-", "chat", "summarize")),
            credits_ucr=0 if cache_hit else rng.randrange(1, 5_000_000), cache_hit=cache_hit,
            saved_ucr=rng.randrange(1, 1000) if cache_hit else 0, created_at=moment))
    return rows


def write_in_batches(engine, rng: random.Random, rows: list[LedgerRow]) -> None:
    """As the ledger writer does: batches of any size, some rows written twice (a repeated write)."""
    position = 0
    while position < len(rows):
        size = rng.randrange(1, 40)
        batch = rows[position:position + size]
        position += size
        repeated = rng.sample(rows[:position], k=min(3, position)) if rng.random() < 0.3 else []
        store.record_batch(engine, [BillingRecord(row) for row in batch + repeated])


def test_rollups_equal_the_ledger_after_random_traffic(database_url):
    engine = make_engine(database_url)
    rng = random.Random(7)
    write_in_batches(engine, rng, random_rows(rng, 600, "r"))
    assert assert_rollups_match_ledger(engine) == 600
    engine.dispose()


def test_a_database_that_predates_the_rollups_is_backfilled_once_at_start(database_url):
    engine = make_engine(database_url)
    rng = random.Random(11)
    write_in_batches(engine, rng, random_rows(rng, 300, "b"))
    with engine.begin() as connection:  # as an older meterline left it: a ledger, no rollups
        connection.execute(UsageHour.__table__.delete())
        connection.execute(UsageDay.__table__.delete())
    rollups.forget_backfill(engine)
    engine.dispose()

    engine = make_engine(database_url)  # start-up
    assert assert_rollups_match_ledger(engine) == 300
    assert rollups.backfill(engine) is False  # once: the next start-up finds it done
    write_in_batches(engine, rng, random_rows(rng, 100, "after"))
    assert assert_rollups_match_ledger(engine) == 400
    engine.dispose()


def test_a_failed_ledger_transaction_leaves_no_rollup(database_url):
    engine = make_engine(database_url)
    row = random_rows(random.Random(3), 1, "x")[0]
    try:
        with engine.begin() as connection:
            store.record_on(connection, [BillingRecord(row)])
            raise RuntimeError("the transaction fails after the rows")
    except RuntimeError:
        pass
    assert list(store.ledger_rows(engine)) == []
    assert assert_rollups_match_ledger(engine) == 0
    engine.dispose()


def ledger_breakdown(engine, customer_id: str, start: datetime, end: datetime):
    total, daily, by = Counter(), Counter(), {"model": Counter(), "action": Counter(), "member": Counter()}
    for row in store.ledger_rows(engine, customer_id):
        created = store.as_utc(row.created_at)
        if start <= created < end:
            total["credits"] += row.credits_ucr
            total["requests"] += 1
            total["saved"] += row.saved_ucr
            daily[unit_of(created, DAY)] += row.credits_ucr
            for dimension, found in by.items():
                found[getattr(row, dimension)] += row.credits_ucr
    return total, daily, by


def test_a_breakdown_over_any_window_equals_the_ledger(database_url):
    """Whole days from the rollup, partial first and last days (anchored periods) from the ledger."""
    engine = make_engine(database_url)
    rng = random.Random(5)
    write_in_batches(engine, rng, random_rows(rng, 500, "w"))
    windows = [(START, START + timedelta(days=5)), (START + timedelta(hours=3), START + timedelta(hours=4)),
               (START + timedelta(days=1), START + timedelta(days=2))]
    for _ in range(25):
        start = START + timedelta(seconds=rng.randrange(0, 4 * 86400), microseconds=rng.randrange(1_000_000))
        windows.append((start, start + timedelta(seconds=rng.randrange(1, 3 * 86400))))
    for start, end in windows:
        for customer_id in CUSTOMERS:
            found = rollups.breakdown(engine, customer_id, start, end)
            total, daily, by = ledger_breakdown(engine, customer_id, start, end)
            assert (found.total.credits_ucr, found.total.requests, found.total.saved_ucr) == \
                (total["credits"], total["requests"], total["saved"]), (start, end)
            assert {day: tally.credits_ucr for day, tally in found.daily.items() if tally.requests} == \
                {day: used for day, used in daily.items()} | {
                    day: 0 for day, tally in found.daily.items() if tally.requests and day not in daily}
            for dimension, expected in by.items():
                assert {name: tally.credits_ucr for name, tally in found.by[dimension].items()} == dict(expected)
            # what the breaker's baseline and the Redis counters' seed read: hours from the rollup
            assert rollups.billed_between(engine, customer_id, start, end) == total["credits"], (start, end)
            assert rollups.billed_between(engine, customer_id, start) == \
                ledger_breakdown(engine, customer_id, start, START + timedelta(days=400))[0]["credits"], start
    engine.dispose()
