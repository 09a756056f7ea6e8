"""Repricing a month after a price fix and the margin review, against hand-built ledgers with answers
worked out by hand here (real SQLite, rows written through the ledger; the CLI as operators run it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
import yaml

from plugin import runtime
from plugin.ledger import accounts, plan_moves, rollups, store
from plugin.rules.margins import Totals, credit_rate_usd, review_lines
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.runtime import Meterline
from plugin.services.pricing import adjustment_id, record, reprice, review
from plugin.settings import MeterlineConfig, PlanConfig, Settings, TermsOverride
from tests.test_cli import Cli

M = 1_000_000
PLANS = {"pro": {"included_credits": "1000", "overage_usd_per_credit": "0.002"},
         "tiered": {"overage_tiers": [{"up_to_credits": "1000", "usd_per_credit": "0.004"},
                                      {"usd_per_credit": "0.001"}]},
         "flat": {"metered": False}}
BEFORE_FIX = {  # version 1: the tokens basis at 1,000 tokens a credit; model c on the cost basis at $1/$2
    "pricing": {"tokens_per_credit": "1000", "weights": {"input": "1", "cached_input": "0.1", "output": "4"},
                "models": {"c": {"basis": "cost", "markup": "0", "credits_per_usd": "1000"}, "nop": {"basis": "cost"}}},
    "prices": {"c": {"input": "1.00", "output": "2.00"}},
    "plans": PLANS,
}
AFTER_FIX = {  # version 2: 500 tokens a credit, output weighs 2; c's input price halved
    "pricing": {"tokens_per_credit": "500", "weights": {"input": "1", "cached_input": "0.1", "output": "2"},
                "models": {"c": {"basis": "cost", "markup": "0", "credits_per_usd": "1000"}, "nop": {"basis": "cost"}}},
    "prices": {"c": {"input": "0.50", "output": "2.00"}},
    "plans": PLANS,
}
APRIL = datetime(2026, 4, 10, 12, tzinfo=UTC)
NOW = datetime(2026, 5, 10, 9, tzinfo=UTC)


@pytest.fixture
def meterline(tmp_path) -> Iterator[Meterline]:
    meterline = Meterline(settings=Settings(database_url=f"sqlite:///{tmp_path / 'ledger.db'}", relay=False),
                          config=MeterlineConfig.model_validate(AFTER_FIX))
    yield meterline
    meterline.close()


def row(ledger_id: str, customer: str, model: str, *, prompt: int = 0, completion: int = 0, cached: int = 0,
        credits: int = 0, cost: int = 0, at: datetime = APRIL, version: int | None = 1,
        cache_hit: bool = False) -> LedgerRow:
    return LedgerRow(id=ledger_id, customer_id=customer, model=model, prompt_tokens=prompt,
                     completion_tokens=completion, cached_tokens=cached, credits_ucr=credits,
                     provider_cost_uusd=cost, created_at=at, price_version=version, cache_hit=cache_hit)


def write(meterline: Meterline, customers: dict[str, str], rows: list[LedgerRow]) -> None:
    for customer, plan in customers.items():
        if store.get_customer(meterline.engine, customer) is None:
            store.add_customer(meterline.engine, customer, plan)
    store.write_records(meterline.engine, [BillingRecord(entry, meter=False) for entry in rows])


@pytest.fixture
def priced(meterline) -> Meterline:
    """Versions 1 and 2 recorded; April's rows priced with version 1 (their credits as version 1 priced them)."""
    assert record(meterline.engine, MeterlineConfig.model_validate(BEFORE_FIX), "launch", APRIL)[0].version == 1
    assert record(meterline.engine, MeterlineConfig.model_validate(AFTER_FIX), "fix", NOW)[0].version == 2
    write(meterline, {"up": "pro", "down": "pro", "flat": "flat"}, [
        # up: (1000 + 500 x 4) / 1000 = 3 credits -> (1000 + 500 x 2) / 500 = 4 credits
        row("u1", "up", "t", prompt=1000, completion=500, credits=3 * M),
        # up: 50 fresh + 50 cached x 0.1 = 55 weighted tokens: 0.055 credits -> 0.11 credits
        row("u2", "up", "t", prompt=100, cached=50, credits=55_000),
        row("u3", "up", "t", prompt=1000, completion=500, credits=0, cache_hit=True),  # cache hit: its fee stays
        row("u4", "up", "t", prompt=1000, credits=M, version=2),  # already priced with version 2
        row("u5", "up", "t", prompt=1000, credits=M, version=None),  # priced before the changelog
        row("u6", "up", "t", prompt=1000, credits=M, at=datetime(2026, 3, 31, 23, 59, tzinfo=UTC)),  # March
        # down: $0.001 + $0.002 = $0.003 = 3 credits -> $0.0005 + $0.002 = 2.5 credits
        row("d1", "down", "c", prompt=1000, completion=1000, credits=3 * M),
        row("d2", "down", "nop", prompt=1000, credits=0),  # cost basis without a price: cannot be repriced
        # flat (a plan that is not metered): 3 -> 4 credits
        row("f1", "flat", "t", prompt=1000, completion=500, credits=3 * M),
    ])
    return meterline


def test_reprice_shows_the_difference_per_customer_and_writes_nothing(priced):
    found = reprice(priced, 1, 2, "2026-04", apply=False, now=NOW)
    by = {line["customer_id"]: line for line in found["customers"]}
    assert (by["up"]["rows"], by["up"]["old_ucr"], by["up"]["new_ucr"], by["up"]["difference_ucr"]) == \
        (2, 3_055_000, 4_110_000, 1_055_000)
    assert by["up"]["billed_ucr"] == 3_055_000
    assert (by["down"]["rows"], by["down"]["skipped_rows"], by["down"]["skipped_models"]) == (1, 1, ["nop"])
    assert by["down"]["difference_ucr"] == -500_000 and by["flat"]["difference_ucr"] == M
    assert by["up"]["adjustment"] == {"id": adjustment_id("up", "2026-04", 1, 2), "credits_ucr": 1_055_000,
                                      "sent_to_sink": True, "written": False, "new": False}
    assert by["flat"]["adjustment"]["sent_to_sink"] is False and by["down"]["adjustment"]["sent_to_sink"] is False
    assert found["total_difference_ucr"] == 1_555_000 and found["credits_to_issue"] == []
    assert (found["start"], found["end"]) == ("2026-04-01T00:00:00+00:00", "2026-05-01T00:00:00+00:00")
    assert store.list_outbox_ids(priced.engine) == [] and len(list(store.ledger_rows(priced.engine))) == 9


def test_reprice_apply_writes_adjustment_rows_once(priced):
    engine = priced.engine
    found = reprice(priced, 1, 2, "2026-04", apply=True, now=NOW)
    ids = {customer: adjustment_id(customer, "2026-04", 1, 2) for customer in ("up", "down", "flat")}
    assert all(line["adjustment"]["new"] and line["adjustment"]["written"] for line in found["customers"])
    assert found["credits_to_issue"] == [{"customer_id": "down", "credits_ucr": 500_000}]
    written = {entry.id: entry for entry in store.ledger_rows(engine) if entry.action == "reprice"}
    assert {entry.id: entry.credits_ucr for entry in written.values()} == {
        ids["up"]: 1_055_000, ids["down"]: -500_000, ids["flat"]: M}
    adjustment = written[ids["up"]]
    assert (adjustment.model, adjustment.provider, adjustment.price_version, adjustment.prompt_tokens) == \
        ("(reprice)", "meterline", 2, 0)
    assert store.as_utc(adjustment.created_at) == NOW  # billed now: a closed month's invoice cannot change
    # only the positive adjustment of a metered customer becomes a meter event
    assert store.list_outbox_ids(engine) == [ids["up"]]
    # the usage rollups count the adjustments like any row
    hour = (NOW - timedelta(hours=1), NOW + timedelta(hours=1))
    assert [rollups.billed_between(engine, customer, *hour) for customer in ("up", "down", "flat")] == \
        [1_055_000, -500_000, M]
    # a second --apply finds every adjustment written and writes nothing
    again = reprice(priced, 1, 2, "2026-04", apply=True, now=NOW + timedelta(days=1))
    assert all(line["adjustment"]["written"] and not line["adjustment"]["new"] for line in again["customers"])
    assert again["credits_to_issue"] == found["credits_to_issue"]
    assert len(list(store.ledger_rows(engine))) == 9 + 3 and store.list_outbox_ids(engine) == [ids["up"]]
    # repricing back is a reprice of its own, and finds no rows priced with version 2 in April but u4
    back = reprice(priced, 2, 1, "2026-04", apply=False, now=NOW)
    assert [(line["customer_id"], line["rows"]) for line in back["customers"]] == [("up", 1)]


def test_a_grandfathered_customers_adjustment_stays_in_the_ledger(priced):
    write(priced, {"kept": "pro"}, [row("k1", "kept", "t", prompt=1000, completion=500, credits=3 * M)])
    plan_moves.grandfather(priced.engine, "kept", NOW)
    found = reprice(priced, 1, 2, "2026-04", apply=True, now=NOW)
    [kept] = [line for line in found["customers"] if line["customer_id"] == "kept"]
    assert kept["difference_ucr"] == M and kept["adjustment"]["new"] and not kept["adjustment"]["sent_to_sink"]
    assert store.list_outbox_ids(priced.engine) == [adjustment_id("up", "2026-04", 1, 2)]


@pytest.fixture
def cli(priced, tmp_path, monkeypatch, capsys) -> Iterator[Cli]:
    config = tmp_path / "meterline.yaml"
    config.write_text(yaml.safe_dump(AFTER_FIX))
    monkeypatch.setenv("METERLINE_DATABASE_URL", priced.settings.database_url)
    monkeypatch.setenv("METERLINE_CONFIG", str(config))
    runtime.reset_for_tests()
    yield Cli(capsys)
    runtime.reset_for_tests()


def test_the_reprice_command_shows_applies_and_refuses_bad_input(cli):
    code, out = cli("pricing", "reprice", "--from", "1", "--to", "2", "--period", "2026-04")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "2026-04: rows priced with version 1, repriced at version 2 (credits)"
    assert lines[2].split() == ["down", "1", "3", "2.5", "-0.5", "to", "write", "(--apply)", "(1", "skipped:", "nop)"]
    assert lines[-1] == "total difference: 1.555 credits"
    code, out = cli("pricing", "reprice", "--from", "1", "--to", "2", "--period", "2026-04", "--apply")
    assert code == 0 and "issue down a credit of 0.5 credits" in out and "written, sent to the sink" in out
    code, out = cli("pricing", "reprice", "--from", "1", "--to", "2", "--period", "2026-04", "--apply", "--json")
    assert code == 0 and not any(line["adjustment"]["new"] for line in json.loads(out)["customers"])
    assert cli.fails("pricing", "reprice", "--from", "1", "--to", "7", "--period", "2026-04") == \
        "meterline pricing reprice: no pricing version 7 (meterline pricing change records them)"
    assert "YYYY-MM" in cli.fails("pricing", "reprice", "--from", "1", "--to", "2", "--period", "2026-13")
    assert "same version" in cli.fails("pricing", "reprice", "--from", "2", "--to", "2", "--period", "2026-04")
    assert "--from" in cli.fails("pricing", "reprice", "--from", "0", "--to", "2", "--period", "2026-04")


# ------------------------------------------------------------------------------ the margin review


@pytest.mark.parametrize("plan, rate", [
    ({"overage_usd_per_credit": "0.002"}, Fraction(2, 1000)),
    ({"overage_tiers": [{"up_to_credits": "10", "usd_per_credit": "0.004"}, {"usd_per_credit": "0.001"}]},
     Fraction(4, 1000)),
    ({}, Fraction(0)), ({"overage_usd_per_credit": "0.002", "metered": False}, Fraction(0)),
])
def test_a_credit_earns_the_plan_overage_rate_or_its_first_tier(plan, rate):
    assert credit_rate_usd(PlanConfig.model_validate(plan)) == rate


@pytest.mark.parametrize("now, before, threshold, expected", [
    (Totals(1_100_000, Fraction(2)), Totals(500_000, Fraction(2)), Fraction(10), (45.0, -30.0, True)),
    (Totals(1_100_000, Fraction(2)), Totals(500_000, Fraction(2)), Fraction(30), (45.0, -30.0, False)),
    (Totals(500_000, Fraction(2)), Totals(1_100_000, Fraction(2)), Fraction(10), (75.0, 30.0, True)),
    (Totals(3_000_000, Fraction(2)), None, Fraction(10), (-50.0, None, False)),  # no previous usage
    (Totals(100_000, Fraction(0)), Totals(1, Fraction(1)), Fraction(10), (None, None, False)),  # no revenue
    (Totals(1, Fraction(3)), Totals(0, Fraction(3)), Fraction(0), (100.0, 0.0, True)),  # beyond 0 points
])
def test_margin_and_drift_by_table(now, before, threshold, expected):
    [line] = review_lines({"m": now}, {} if before is None else {"m": before}, "model", threshold)
    assert (line["margin_pct"], line["drift_pct"], line["flagged"]) == expected


REVIEW_NOW = datetime(2026, 12, 3, 15, tzinfo=UTC)


def review_ledger(meterline: Meterline, now: datetime) -> None:
    """Current window (the last 90 days) and the 90 days before, by hand:
    model a: now p1 1,000 cr at $0.002 = $2.00 for $1.00 + f1 100 cr (flat: $0) for $0.10 -> 45% (before: 75%)
    model b: now p2 500 cr at tier 1 $0.004 = $2.00 for $1.00 + p3 1,000 cr at its own $0.001 for $0.50 -> 50%
             (before: p2 $2.00 for $0.96 -> 52%)."""
    write(meterline, {"p1": "pro", "p2": "tiered", "p3": "pro", "f1": "flat"}, [
        row("a-now", "p1", "a", credits=1000 * M, cost=1_000_000, at=now - timedelta(days=10)),
        row("f-now", "f1", "a", credits=100 * M, cost=100_000, at=now - timedelta(days=80)),
        row("b-now", "p2", "b", credits=500 * M, cost=1_000_000, at=now - timedelta(days=1)),
        row("b3-now", "p3", "b", credits=1000 * M, cost=500_000, at=now - timedelta(minutes=1)),
        row("a-before", "p1", "a", credits=1000 * M, cost=500_000, at=now - timedelta(days=100)),
        row("b-before", "p2", "b", credits=500 * M, cost=960_000, at=now - timedelta(days=179)),
        row("a-old", "p1", "a", credits=M, cost=999_000_000, at=now - timedelta(days=200)),  # outside both
    ])
    accounts.set_terms(meterline.engine, "p3", terms=TermsOverride(overage_usd_per_credit=Fraction(1, 1000)))


def test_review_over_a_hand_built_ledger(meterline):
    review_ledger(meterline, REVIEW_NOW)
    found = review(meterline, REVIEW_NOW, days=90, drift_pct=Fraction(10))
    assert found["models"] == [
        {"model": "b", "provider_cost_usd": "1.50", "revenue_usd": "3.00", "margin_pct": 50.0, "drift_pct": -2.0,
         "flagged": False},
        {"model": "a", "provider_cost_usd": "1.10", "revenue_usd": "2.00", "margin_pct": 45.0, "drift_pct": -30.0,
         "flagged": True},
    ]
    assert found["plans"] == [
        {"plan": "pro", "provider_cost_usd": "1.50", "revenue_usd": "3.00", "margin_pct": 50.0, "drift_pct": -25.0,
         "flagged": True},
        {"plan": "tiered", "provider_cost_usd": "1.00", "revenue_usd": "2.00", "margin_pct": 50.0, "drift_pct": -2.0,
         "flagged": False},
        {"plan": "flat", "provider_cost_usd": "0.10", "revenue_usd": "0.00", "margin_pct": None, "drift_pct": None,
         "flagged": False},
    ]
    assert (found["days"], found["start"]) == (90, (REVIEW_NOW - timedelta(days=90)).isoformat())
    wider = review(meterline, REVIEW_NOW, days=90, drift_pct=Fraction(25))  # -25 is not beyond 25 points
    assert [line["flagged"] for line in wider["plans"]] == [False, False, False]
    assert [line["flagged"] for line in wider["models"]] == [False, True]


def test_the_review_command_marks_flagged_lines_and_refuses_bad_input(meterline, tmp_path, monkeypatch, capsys):
    review_ledger(meterline, datetime.now(UTC))
    config = tmp_path / "meterline.yaml"
    config.write_text(yaml.safe_dump({"plans": PLANS}))
    monkeypatch.setenv("METERLINE_DATABASE_URL", meterline.settings.database_url)
    monkeypatch.setenv("METERLINE_CONFIG", str(config))
    runtime.reset_for_tests()
    cli = Cli(capsys)
    try:
        code, out = cli("pricing", "review")
        assert code == 0
        flagged = [line.split()[1] for line in out.splitlines() if line.startswith("!")]
        assert flagged == ["a", "pro"]
        assert any(line.split() == ["flat", "0.10", "0.00", "-", "-"] for line in out.splitlines())
        code, out = cli("pricing", "review", "--json", "--days", "90", "--drift-pct", "30.5")
        assert code == 0 and not any(line["flagged"] for line in json.loads(out)["models"])
        assert "--drift-pct" in cli.fails("pricing", "review", "--drift-pct", "lots")
        assert "--days" in cli.fails("pricing", "review", "--days", "0")
        assert "--days is 1 to 3660" in cli.fails("pricing", "review", "--days", "4000")
    finally:
        runtime.reset_for_tests()
