"""Migration reports with known answers: the pure maths by table, then `meterline migrate
suggest-quota` over a hand-built ledger (real SQLite, rows written through the ledger)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest

from plugin.ledger import store
from plugin.rules.migration import nearest_rank, suggest_quota, window_days
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.runtime import Meterline
from plugin.services.migration import quota_suggestion
from plugin.settings import MeterlineConfig, Settings

M = 1_000_000
NOW = datetime(2026, 12, 3, 15, 0, tzinfo=UTC)
PLANS = {"plans": {"flat": {"included_credits": 0},
                   "pro": {"included_credits": 1000, "base_fee_usd": "20", "overage_usd_per_credit": "0.002"}}}
CONFIG = MeterlineConfig.model_validate(PLANS)


@pytest.mark.parametrize("days, expected", [
    (30, [(71, 101)]), (90, [(11, 41), (41, 71), (71, 101)]),
])
def test_windows_are_30_whole_days_the_newest_ending_today(days, expected):
    assert window_days(100, days) == expected


@pytest.mark.parametrize("days", [0, 45, -30])
def test_days_must_be_a_multiple_of_30(days):
    with pytest.raises(ValueError, match="multiple of 30"):
        window_days(100, days)


@pytest.mark.parametrize("values, percentile, expected", [
    ([15, 20, 35, 40, 50], 30, 20), ([15, 20, 35, 40, 50], 40, 20), ([15, 20, 35, 40, 50], 50, 35),
    ([15, 20, 35, 40, 50], 100, 50), ([3, 6, 7, 8, 8, 10, 13, 15, 16, 20], 25, 7),
    ([3, 6, 7, 8, 8, 10, 13, 15, 16, 20], 75, 15), ([7], 95, 7), ([], 95, 0),
])
def test_nearest_rank_percentile(values, percentile, expected):  # the textbook examples of the method
    assert nearest_rank([Fraction(v) for v in values], percentile) == expected


def test_the_suggestion_counts_who_is_strictly_above_and_what_they_would_pay():
    means = {f"c{i}": Fraction(credits * M) for i, credits in enumerate([100, 200, 300, 400, 1000])}
    found = suggest_quota(means, {"c4": Fraction(1, 100), "c3": None}, percentile=60, days=90)
    assert (found.quota_credits, found.customers, found.over_quota_customers) == (300, 5, 2)
    assert found.overage_usd == Fraction(7)  # c4: 700 credits over at $0.01; c3: no overage rate
    assert suggest_quota({"a": Fraction(1_500_001, 1)}, {}, 95, 30).quota_credits == 2  # whole credits, rounded up


@pytest.fixture
def meterline(tmp_path) -> Iterator[Meterline]:
    meterline = Meterline(settings=Settings(database_url=f"sqlite:///{tmp_path / 'ledger.db'}", relay=False),
                          config=CONFIG)
    yield meterline
    meterline.close()


def bill(meterline: Meterline, customer: str, plan: str, credits_by_days_ago: dict[int, int],
         now: datetime = NOW) -> None:
    if store.get_customer(meterline.engine, customer) is None:
        store.add_customer(meterline.engine, customer, plan)
    store.write_records(meterline.engine, [BillingRecord(LedgerRow(
        id=f"mtr_{customer}_{days_ago}", customer_id=customer, model="m", credits_ucr=credits * M,
        created_at=now - timedelta(days=days_ago)), meter=False) for days_ago, credits in credits_by_days_ago.items()])


def test_suggest_quota_over_a_hand_built_ledger(meterline):
    # means per 30-day window over 90 days: a 100, b 200, c 300, d 1,000 (pro, $0.002/credit over)
    bill(meterline, "a", "flat", {1: 300})
    bill(meterline, "b", "flat", {5: 300, 40: 300})
    bill(meterline, "c", "flat", {10: 300, 45: 300, 80: 300})
    bill(meterline, "d", "pro", {2: 1000, 31: 1000, 61: 1000, 95: 50_000})  # 95 days ago: outside
    bill(meterline, "e", "flat", {120: 900})  # no usage in the window: not counted
    found = quota_suggestion(meterline, NOW, percentile=75, days=90)
    assert found == {"percentile": 75, "days": 90, "quota_credits": 300, "customers": 4, "over_quota_customers": 1,
                     "overage_usd": "1.40"}  # d: 700 credits above at $0.002
    assert quota_suggestion(meterline, NOW, percentile=95, days=90, plan="flat")["quota_credits"] == 300
    assert quota_suggestion(meterline, NOW, percentile=50, days=30)["quota_credits"] == 300  # a, b, c, d: 300 each
    with pytest.raises(ValueError, match="unknown plan"):
        quota_suggestion(meterline, NOW, plan="gold")


def test_the_cli_prints_json_and_refuses_bad_input(meterline, tmp_path, monkeypatch, capsys):
    from plugin import runtime
    from plugin.cli import main as cli_main

    bill(meterline, "a", "flat", {1: 300}, now=datetime.now(UTC))  # the CLI looks back from the real now
    config = tmp_path / "meterline.yaml"
    config.write_text(json.dumps(PLANS))  # JSON is YAML
    monkeypatch.setenv("METERLINE_DATABASE_URL", meterline.settings.database_url)
    monkeypatch.setenv("METERLINE_CONFIG", str(config))
    runtime.reset_for_tests()
    try:
        assert cli_main(["migrate", "suggest-quota", "--days", "30", "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert (answer["customers"], answer["quota_credits"]) == (1, 300)
        assert cli_main(["migrate", "suggest-quota"]) == 0 and "100 credits" in capsys.readouterr().out  # 300 / 3
        assert cli_main(["migrate", "suggest-quota", "--days", "45"]) == 2
        assert "multiple of 30" in capsys.readouterr().err
        assert cli_main(["migrate", "suggest-quota", "--percentile", "0"]) == 2
    finally:
        runtime.reset_for_tests()
