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
    plans = {"c4": CONFIG.plans["pro"].model_copy(update={"overage_usd_per_credit": Fraction(1, 100)}),
             "c3": CONFIG.plans["flat"]}
    found = suggest_quota(means, plans, percentile=60, days=90)
    assert (found.quota_credits, found.customers, found.over_quota_customers) == (300, 5, 2)
    assert found.overage_usd == Fraction(7)  # c4: 700 credits over the quota at $0.01; c3: no overage price
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


# ---------------------------------------------------------------- migrate impact / notice

PRO = CONFIG.plans["pro"]


@pytest.mark.parametrize("windows_credits, plan_update, projected", [
    ((0, 0, 300), {}, Fraction(20)),                      # under the included 1,000: the base fee alone
    ((3000, 3000, 3000), {}, Fraction(24)),               # 2,000 over at $0.002
    ((9000, 0, 0), {}, Fraction(24)),                     # the mean of the windows, not the last one
    ((1, 0, 0), {"base_fee_usd": None}, Fraction(0)),
    ((30000, 0, 0), {"cap_credits": Fraction(5000)}, Fraction(28)),  # never billed past the cap: 4,000 over
    ((0, 0, 1001), {}, Fraction(20)),                    # mean 333.67 credits: under the quota
])
def test_a_customers_projected_bill_on_the_metered_plan(windows_credits, plan_update, projected):
    from plugin.rules.migration import impact

    found = impact("c", tuple(c * M for c in windows_credits), Fraction(30), PRO.model_copy(update=plan_update))
    assert (found.projected_usd, found.difference_usd) == (projected, projected - 30)


def test_totals_say_what_the_move_does_to_revenue():
    from plugin.rules.migration import impact, impact_totals

    totals = impact_totals([impact("a", (0, 0, 0), Fraction(30), PRO), impact("b", (0, 0, 30000 * M), Fraction(30), PRO)])
    assert (totals.old_usd, totals.projected_usd, totals.paying_more, totals.paying_less) == (60, 58, 1, 1)
    assert totals.revenue_change_pct == Fraction(-10, 3)
    assert impact_totals([]).revenue_change_pct is None


def impact_ledger(meterline, now=NOW) -> None:
    bill(meterline, "a", "flat", {1: 300}, now=now)
    bill(meterline, "b", "flat", {0: 3000, 30: 3000, 60: 3000}, now=now)
    bill(meterline, "c", "flat", {89: 9000, 90: 70_000}, now=now)  # 90 days ago: outside the three windows
    store.add_customer(meterline.engine, "d", "flat")  # no usage: pays the base fee alone on pro
    bill(meterline, "e", "flat", {3: 50_000}, now=now)
    bill(meterline, "f", "pro", {29: 30_000}, now=now)
    from sqlmodel import Session

    from plugin.ledger.models import Customer
    with Session(meterline.engine) as session:  # e stays on its flat price for good
        customer = session.get(Customer, "e")
        customer.grandfathered_at = now
        session.add(customer)
        session.commit()


def test_impact_over_a_hand_built_ledger(meterline):
    from plugin.services.migration import impact_json, migration_impact

    impact_ledger(meterline)
    answer = impact_json(*migration_impact(meterline, NOW, to_plan="pro", flat_usd=Fraction(30)))
    assert answer["customers"] == [
        {"customer_id": "f", "windows_ucr": [0, 0, 30000 * M], "old_usd": "30.00", "projected_usd": "38.00",
         "difference_usd": "8.00"},
        {"customer_id": "b", "windows_ucr": [3000 * M] * 3, "old_usd": "30.00", "projected_usd": "24.00",
         "difference_usd": "-6.00"},
        {"customer_id": "c", "windows_ucr": [9000 * M, 0, 0], "old_usd": "30.00", "projected_usd": "24.00",
         "difference_usd": "-6.00"},
        {"customer_id": "a", "windows_ucr": [0, 0, 300 * M], "old_usd": "30.00", "projected_usd": "20.00",
         "difference_usd": "-10.00"},
        {"customer_id": "d", "windows_ucr": [0, 0, 0], "old_usd": "30.00", "projected_usd": "20.00",
         "difference_usd": "-10.00"},
    ]
    assert answer["totals"] == {"customers": 5, "old_usd": "150.00", "projected_usd": "126.00",
                                "difference_usd": "-24.00", "revenue_change_pct": -16.0, "paying_more": 1,
                                "paying_less": 4}
    only_pro = migration_impact(meterline, NOW, to_plan="pro", flat_usd=Fraction(30), plan="pro")[0]
    assert [each.customer_id for each in only_pro] == ["f"]
    with pytest.raises(ValueError, match="unknown plan 'gold'"):
        migration_impact(meterline, NOW, to_plan="gold", flat_usd=Fraction(30))


@pytest.fixture
def cli(meterline, tmp_path, monkeypatch):
    from plugin import runtime
    from plugin.cli import main as cli_main

    config = tmp_path / "meterline.yaml"
    config.write_text(json.dumps(PLANS))  # JSON is YAML
    monkeypatch.setenv("METERLINE_DATABASE_URL", meterline.settings.database_url)
    monkeypatch.setenv("METERLINE_CONFIG", str(config))
    runtime.reset_for_tests()
    yield cli_main
    runtime.reset_for_tests()


def test_impact_cli_as_json_csv_and_a_table(meterline, cli, capsys):
    impact_ledger(meterline, now=datetime.now(UTC))  # the CLI looks back from the real now
    assert cli(["migrate", "impact", "--to-plan", "pro", "--flat-usd", "30", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [row["customer_id"] for row in answer["customers"]] == ["f", "b", "c", "a", "d"]
    assert cli(["migrate", "impact", "--to-plan", "pro", "--flat-usd", "30", "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "customer_id,window_1_ucr,window_2_ucr,window_3_ucr,old_usd,projected_usd,difference_usd"
    assert lines[1] == f"f,0,0,{30000 * M},30.00,38.00,8.00" and len(lines) == 6
    assert cli(["migrate", "impact", "--to-plan", "pro", "--flat-usd", "30"]) == 0
    table = capsys.readouterr().out
    assert "monthly revenue $150.00 -> $126.00 (-16.0%); 1 pay more, 4 pay less" in table
    assert "0 / 0 / 30,000" in table
    for bad in (["--to-plan", "gold", "--flat-usd", "30"], ["--to-plan", "pro", "--flat-usd", "-3"],
                ["--to-plan", "pro", "--flat-usd", "30", "--json", "--csv"], ["--flat-usd", "30"]):
        assert cli(["migrate", "impact", *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_notices_are_drafted_per_customer_from_a_template(meterline, cli, tmp_path, capsys):
    impact_ledger(meterline, now=datetime.now(UTC))
    template = tmp_path / "notice.txt"
    template.write_text("Dear $customer_id: from $effective_date your plan moves from $plan to $to_plan.\n"
                        "Your last three months: $window_1_credits / $window_2_credits / $window_3_credits credits.\n"
                        "Today you pay $old_usd; on $to_plan you would pay $projected_usd ($difference_usd).\n"
                        "Stay as you are: $stay_on_legacy_link. Costs $$5 more? No.\n")
    out = tmp_path / "notices"
    args = ["migrate", "notice", "--to-plan", "pro", "--flat-usd", "30", "--template", str(template)]
    assert cli([*args, "--out", str(out)]) == 0
    assert "5 notice(s) drafted" in capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt", "f.txt"]
    effective = (datetime.now(UTC) + timedelta(days=60)).date().isoformat()
    assert (out / "f.txt").read_text() == (
        f"Dear f: from {effective} your plan moves from pro to pro.\n"
        "Your last three months: 0 / 0 / 30,000 credits.\n"
        "Today you pay $30.00; on pro you would pay $38.00 (+$8.00).\n"
        "Stay as you are: [link to stay on the legacy plan]. Costs $5 more? No.\n")
    assert "(-$10.00)" in (out / "d.txt").read_text()
    assert cli([*args, "--out", str(out), "--legacy-link", "https://example.com/stay"]) == 0
    assert "https://example.com/stay" in (out / "a.txt").read_text()

    template.write_text("Hello $customer_id, you owe $amount\n")
    fresh = tmp_path / "nothing"
    assert cli([*args, "--out", str(fresh)]) == 2
    assert "$amount, which is not one of" in capsys.readouterr().err and not fresh.exists()
    template.write_text("Price: $5\n")
    assert cli([*args, "--out", str(fresh)]) == 2
    assert "write `$$` for a dollar sign" in capsys.readouterr().err and not fresh.exists()
    assert cli([*args[:-1], str(tmp_path / "missing.txt"), "--out", str(fresh)]) == 2


def test_the_shipped_notice_template_names_only_known_fields():
    from pathlib import Path

    from plugin.rules.migration import NOTICE_FIELDS, check_template

    template = (Path(__file__).parent.parent / "examples" / "migration_notice.txt").read_text()
    check_template(template)
    assert all(f"${name}" in template for name in NOTICE_FIELDS)  # it shows everything a notice can say
