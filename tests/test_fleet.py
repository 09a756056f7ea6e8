"""The fleet view against the ledger, while time passes: every figure of every customer equals the
ledger summed over the same rows, across frozen rebuilds, new hours, new days and new periods."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from plugin.ledger import accounts, store
from plugin.rules.plans import anchored_month, calendar_month
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.rules.rollups import DAY, HOUR, start_of, unit_of
from plugin.runtime import Meterline
from plugin.services.fleet import customer_detail, fleet
from plugin.settings import MeterlineConfig, Settings

CONFIG = MeterlineConfig.model_validate({"plans": {"pro": {"included_credits": 1000}, "free": {"cap_credits": 100}}})
T0 = datetime(2026, 10, 27, 21, 17, tzinfo=UTC)
ANCHOR = datetime(2026, 9, 29, 6, 45, 30, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def meterline(database_url) -> Iterator[Meterline]:
    meterline = Meterline(settings=Settings(database_url=database_url, relay=False), config=CONFIG)
    meterline.clock = Clock(T0)
    yield meterline
    meterline.close()


def spent(engine, customer_id: str, start: datetime, end: datetime) -> int:
    return sum(row.credits_ucr for row in store.ledger_rows(engine, customer_id)
               if start <= store.as_utc(row.created_at) < end)


def expected_row(meterline: Meterline, customer_id: str, anchor: datetime | None, now: datetime) -> dict:
    engine = meterline.engine
    period = anchored_month(anchor, now) if anchor else calendar_month(now)
    hour = unit_of(now, HOUR)
    return {
        "used_ucr": spent(engine, customer_id, period.start, now + timedelta(seconds=1)),
        "today_ucr": spent(engine, customer_id, start_of(unit_of(now, DAY), DAY), now + timedelta(seconds=1)),
        "hourly_ucr": [spent(engine, customer_id, start_of(h, HOUR), start_of(h + 1, HOUR))
                       for h in range(hour - 23, hour + 1)],
    }


def edge_rows(period_start: datetime) -> list[LedgerRow]:
    """One row on the first microsecond of an anchored period, one on the last of the period before."""
    return [LedgerRow(id=f"edge-{period_start:%m%d}-{n}", customer_id="anchored", model="m", created_at=at,
                      credits_ucr=credits)
            for n, (at, credits) in enumerate([(period_start, 777), (period_start - timedelta(microseconds=1), 555)])]


def test_every_fleet_figure_equals_the_ledger_as_time_passes(meterline):
    engine = meterline.engine
    rng = random.Random(1)
    customers = {"acme": None, "anchored": ANCHOR, "quiet": None}
    for customer_id, anchor in customers.items():
        store.add_customer(engine, customer_id, "pro")
        if anchor is not None:
            accounts.set_terms(engine, customer_id, period_anchor=anchor)
    # history before the first look: a month of rows, some on the anchor's minute
    history = []
    for number in range(400):
        at = T0 - timedelta(seconds=rng.randrange(1, 35 * 86400))
        history.append(LedgerRow(id=f"h{number}", customer_id=rng.choice(["acme", "anchored"]), model="m",
                                 created_at=at, credits_ucr=rng.randrange(1, 10**6)))
    history += edge_rows(ANCHOR)
    store.record_batch(engine, [BillingRecord(row) for row in history])

    now = T0
    for step in range(40):  # ~ 3 days in uneven steps: across hours, the UTC midnight and the anchor
        answer = fleet(meterline, now)
        rows = {row["customer_id"]: row for row in answer["customers"]}
        assert set(rows) == set(customers)
        for customer_id, anchor in customers.items():
            expected = expected_row(meterline, customer_id, anchor, now)
            found = {name: rows[customer_id][name] for name in expected}
            assert found == expected, (step, now, customer_id)
            assert rows[customer_id]["hour_ucr"] == expected["hourly_ucr"][-1]
        # traffic in the next stretch, some of it late in an hour
        now += timedelta(minutes=rng.choice([7, 29, 61, 95, 180]))
        meterline.clock.now = now
        batch = [LedgerRow(id=f"s{step}-{n}", customer_id=rng.choice(["acme", "anchored"]), model="m",
                           created_at=now - timedelta(seconds=rng.randrange(0, 3600)),
                           credits_ucr=rng.randrange(1, 10**6)) for n in range(rng.randrange(0, 6))]
        next_period = ANCHOR.replace(month=10)
        if now > next_period and not any(row.id.startswith("edge-1029") for row in store.ledger_rows(engine)):
            batch += edge_rows(next_period)
        store.record_batch(engine, [BillingRecord(row) for row in batch])
    assert now > ANCHOR.replace(month=10) + timedelta(hours=12)


def test_fleet_rows_carry_limits_breaker_alerts_and_page_by_cursor(meterline):
    engine = meterline.engine
    for customer_id, plan in (("a-1", "pro"), ("a-2", "free"), ("b-1", "pro")):
        store.add_customer(engine, customer_id, plan)
    accounts.put_limits(engine, "a-1", {"hard_limit_ucr": 500 * 10**6, "block_overage": True}, by="test")
    store.add_alert(engine, "soft_limit", "80% used", customer_id="a-1")
    store.record_batch(engine, [BillingRecord(LedgerRow(id="x", customer_id="a-1", model="m",
                                                        created_at=T0 - timedelta(minutes=5), credits_ucr=250 * 10**6))])
    first = fleet(meterline, T0, limit=2)
    assert [row["customer_id"] for row in first["customers"]] == ["a-1", "a-2"]
    assert first["next_cursor"] == "a-2"
    rest = fleet(meterline, T0, after=first["next_cursor"], limit=2)
    assert [row["customer_id"] for row in rest["customers"]] == ["b-1"] and rest["next_cursor"] is None
    a1, a2 = first["customers"]
    assert (a1["used_ucr"], a1["included_ucr"], a1["included_pct"]) == (250 * 10**6, 1000 * 10**6, 25.0)
    assert (a1["hard_limit_ucr"], a1["cap_ucr"], a1["block_overage"]) == (500 * 10**6, 500 * 10**6, False)
    assert (a1["alerts_open"], a1["breaker"]) == (1, "closed")
    assert (a2["cap_ucr"], a2["included_pct"], a2["alerts_open"]) == (100 * 10**6, None, 0)
    assert [row["customer_id"] for row in fleet(meterline, T0, contains="-1")["customers"]] == ["a-1", "b-1"]
    assert fleet(meterline, T0, contains="%")["customers"] == []  # LIKE wildcards are literal
    detail = customer_detail(meterline, "a-1", T0)
    assert detail["members"] == [{"member": "-", "used_ucr": 250 * 10**6, "requests": 1}]
    assert [row["id"] for row in detail["recent"]] == ["x"]
    assert detail["breaker_history"] == []
