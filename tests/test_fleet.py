"""The fleet view against the ledger, while time passes: every figure of every customer equals the
ledger summed over the same rows, across frozen rebuilds, new hours, new days and new periods."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from plugin.ledger import accounts, store
from plugin.ledger.accounts import GLOBAL_OVERAGE_BLOCK
from plugin.ledger.fleet_usage import FleetUsage, in_thread
from plugin.rules.plans import anchored_month, calendar_month
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.rules.rollups import DAY, HOUR, start_of, unit_of
from plugin.runtime import Meterline
from plugin.services.breaker import move_breaker
from plugin.services.fleet import _known_rows, customer_detail, fleet
from plugin.settings import MeterlineConfig, Settings

CONFIG = MeterlineConfig.model_validate({"plans": {"pro": {"included_credits": 1000}, "free": {"cap_credits": 100},
                                                   "metered": {"included_credits": 10,
                                                               "overage_usd_per_credit": "0.01"}}})
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


def on_the_spot(job) -> None:
    job()


@pytest.mark.parametrize("rebuild", [  # the background rebuild repeats the drill: `make drills`
    pytest.param(on_the_spot, id="rebuilt-on-the-spot"),
    pytest.param(in_thread, id="rebuilt-in-background", marks=pytest.mark.drill)])
def test_every_fleet_figure_equals_the_ledger_as_time_passes(meterline, rebuild):
    """In the background, a request may still see the frozen part it replaces: every figure checked
    here must be right with either."""
    meterline.__dict__["fleet_usage"] = FleetUsage(meterline.engine, run=rebuild)
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
    assert fleet(meterline, T0, contains="%")["customers"] == []  # no wildcards
    assert [row["customer_id"] for row in fleet(meterline, T0, contains="B-")["customers"]] == ["b-1"]
    detail = customer_detail(meterline, "a-1", T0)
    assert detail["members"] == [{"member": "-", "used_ucr": 250 * 10**6, "requests": 1}]
    assert [row["id"] for row in detail["recent"]] == ["x"]
    assert detail["breaker_history"] == []


def test_a_kept_row_is_made_again_when_anything_it_shows_changes(meterline):
    engine = meterline.engine
    for customer_id in ("acme", "other"):
        store.add_customer(engine, customer_id, "metered")

    def acme(now: datetime = T0) -> dict:
        return {row["customer_id"]: row for row in fleet(meterline, now)["customers"]}["acme"]

    first = acme()
    assert acme() == first and first["used_ucr"] == 0
    store.record_batch(engine, [BillingRecord(LedgerRow(id="u1", customer_id="acme", model="m",
                                                        created_at=T0 - timedelta(minutes=5), credits_ucr=4 * 10**6))])
    assert (acme()["used_ucr"], acme()["hour_ucr"], acme()["hourly_ucr"][-1]) == (4 * 10**6,) * 3
    accounts.put_limits(engine, "acme", {"hard_limit_ucr": 7 * 10**6}, by="test")
    assert (acme()["hard_limit_ucr"], acme()["cap_ucr"]) == (7 * 10**6, 7 * 10**6)
    move_breaker(meterline, "acme", "trip", "ops", "runaway")
    assert acme()["breaker"] == "open"
    store.add_alert(engine, "soft_limit", "80% used", customer_id="acme")
    assert acme()["alerts_open"] == 1
    assert acme()["block_overage"] is False
    accounts.set_switch(engine, GLOBAL_OVERAGE_BLOCK, True, by="test")
    meterline.directory.forget_switch(GLOBAL_OVERAGE_BLOCK)
    assert acme()["block_overage"] is True
    kept_other = _known_rows(meterline)["other"]
    assert kept_other.row["block_overage"] is True
    accounts.set_terms(engine, "acme", plan="free")
    assert (acme()["plan"], acme()["cap_ucr"], acme()["block_overage"]) == ("free", 7 * 10**6, False)
    # the clock alone: the projection follows it, on the kept row
    kept = _known_rows(meterline)["acme"]
    now, later = acme(T0), acme(T0 + timedelta(minutes=10))
    assert _known_rows(meterline)["acme"] is kept
    assert later["projected_ucr"] < now["projected_ucr"] and {**later, "projected_ucr": 0} == {**now, "projected_ucr": 0}
    assert _known_rows(meterline)["other"] is kept_other  # nothing of the other customer's changed: kept


def test_the_frozen_part_is_rebuilt_aside_and_a_forgotten_one_is_never_installed(meterline):
    engine = meterline.engine
    store.add_customer(engine, "acme", "pro")
    store.record_batch(engine, [BillingRecord(LedgerRow(id="old", customer_id="acme", model="m",
                                                        created_at=T0 - timedelta(hours=5), credits_ucr=10**6))])
    started = []
    usage = FleetUsage(engine, run=started.append)
    first = usage.snapshot(T0)  # the first look builds at once
    later = T0 + timedelta(hours=4)
    second = usage.snapshot(later)  # due: a rebuild starts aside, this request goes on with the old part
    assert len(started) == 1 and second.version("acme")[0] == first.version("acme")[0]
    assert second.used_since("acme", T0 - timedelta(days=1)) == 10**6
    assert usage.snapshot(later) and len(started) == 1  # one rebuild at a time
    started.pop()()
    assert usage.snapshot(later).version("acme")[0] != first.version("acme")[0]
    usage.snapshot(later + timedelta(hours=4))
    rebuild = started.pop()
    usage.forget()  # e.g. the rollups were rebuilt meanwhile: what the rebuild read may be stale
    rebuild()
    assert usage._frozen is None
    assert usage.snapshot(later).used_since("acme", T0 - timedelta(days=1)) == 10**6


def test_kept_customers_are_read_again_only_when_the_database_says_they_changed(meterline, database_url,
                                                                               monkeypatch):
    engine = meterline.engine
    store.add_customer(engine, "acme", "pro")
    assert fleet(meterline, T0)["customers"][0]["plan"] == "pro"
    reads = []
    real = accounts.profile_rows
    monkeypatch.setattr(accounts, "profile_rows", lambda *args, **kwargs: reads.append(1) or real(*args, **kwargs))
    fleet(meterline, T0)
    assert reads == []  # nothing changed: the kept rows
    elsewhere = store.make_engine(database_url)  # another proxy's, or an operator's SQL: triggers see it
    try:
        for statement, seen in (
                ("UPDATE customers SET plan = 'free' WHERE id = 'acme'", ("free", None, "closed")),
                (("INSERT INTO customer_limits (customer_id, hard_limit_ucr, block_overage, updated_at, updated_by) "
                  "VALUES ('acme', 5000000, false, '2026-10-27 00:00:00', 'sql')"), ("free", 5 * 10**6, "closed")),
                (("INSERT INTO breakers (customer_id, status, reason, by, trickle_used) "
                  "VALUES ('acme', 'open', 'sql', 'ops', 0)"), ("free", 5 * 10**6, "open")),
                ("DELETE FROM customer_limits WHERE customer_id = 'acme'", ("free", None, "open"))):
            with elsewhere.begin() as connection:
                connection.execute(text(statement))
            row = fleet(meterline, T0)["customers"][0]
            assert (row["plan"], row["hard_limit_ucr"], row["breaker"]) == seen, statement
        assert len(reads) == 4
    finally:
        elsewhere.dispose()
