"""The rollups' invariant, checked from the outside: they equal the ledger summed in Python."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import select

from plugin.ledger import store
from plugin.ledger.models import UsageDay, UsageHour
from plugin.rules.rollups import DAY, DIMENSIONS, HOUR, unit_of


def ledger_sums(engine) -> tuple[dict, dict]:
    """(hours, days) as the rollups should hold them, summed row by row from the ledger."""
    hours: Counter = Counter()
    days: Counter = Counter()
    for row in store.ledger_rows(engine):
        created = store.as_utc(row.created_at)
        hour = (row.customer_id, unit_of(created, HOUR))
        hours[hour + ("credits",)] += row.credits_ucr
        hours[hour + ("requests",)] += 1
        hours[hour + ("saved",)] += row.saved_ucr
        for dimension in DIMENSIONS:
            day = (row.customer_id, unit_of(created, DAY), dimension, getattr(row, dimension))
            days[day + ("credits",)] += row.credits_ucr
            days[day + ("requests",)] += 1
            days[day + ("saved",)] += row.saved_ucr
    return hours, days


def rollup_sums(engine) -> tuple[dict, dict]:
    hours: Counter = Counter()
    days: Counter = Counter()
    with engine.connect() as connection:
        for row in connection.execute(select(UsageHour.__table__)):
            key = (row.customer_id, row.hour)
            hours.update({key + ("credits",): row.credits_ucr, key + ("requests",): row.requests,
                          key + ("saved",): row.saved_ucr})
        for row in connection.execute(select(UsageDay.__table__)):
            key = (row.customer_id, row.day, row.dimension, row.name)
            days.update({key + ("credits",): row.credits_ucr, key + ("requests",): row.requests,
                         key + ("saved",): row.saved_ucr})
    return hours, days


def assert_rollups_match_ledger(engine) -> int:
    """Fails naming the first difference; returns how many ledger rows were compared."""
    expected_hours, expected_days = ledger_sums(engine)
    hours, days = rollup_sums(engine)
    drop_zero = lambda counts: {key: value for key, value in counts.items() if value}  # noqa: E731
    assert drop_zero(hours) == drop_zero(expected_hours)
    assert drop_zero(days) == drop_zero(expected_days)
    return sum(value for key, value in expected_hours.items() if key[-1] == "requests")
