"""Graduated overage tiers and the per-plan output-token ceiling.

Pure maths by table (the tier edges exactly, rounding as Stripe rounds a graduated price, the inverse
that turns a dollar limit into usage), the configuration's refusals, and the whole path at Stripe:
`meterline stripe setup` creates the graduated price on the local emulator, the relay reports usage
across a tier boundary, and the finalized invoice's total is what the ledger's maths expects.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
import yaml

from plugin import runtime
from plugin.api.page_html import render_page
from plugin.ledger import accounts, store
from plugin.rules.invoices import expected_cents
from plugin.rules.limits import usd_limit_as_ucr
from plugin.rules.plans import current_band, overage_by_band, overage_usd, period_usd
from plugin.rules.policy import plan_max_tokens
from plugin.rules.pricing import round_half_up
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.rules.usage import overage_rates, projected_overage_usd, projected_usd
from plugin.services.usage import usage_report
from plugin.settings import (
    ConfigError,
    MeterlineConfig,
    OverageTier,
    PlanConfig,
    TermsOverride,
    load_config,
)
from plugin.stripe.emulator.money import price_cents
from plugin.stripe.setup import Tier, catalog
from tests.support.browser import Dom
from tests.support.stripe_emulator import (
    DEFAULT_API_KEY,
    StripeEmulator,
    run_stripe_emulator,
)
from tests.test_page_html import report
from tests.test_stripe_setup import Cli

M = 1_000_000  # µcr per credit
SCALE_YAML = {"included_credits": "1000000", "base_fee_usd": "99", "overage_tiers": [
    {"up_to_credits": "10000000", "usd_per_credit": "0.002"}, {"usd_per_credit": "0.0015"}]}
SCALE = PlanConfig.model_validate(SCALE_YAML)
INCLUDED = 1_000_000 * M
EDGE = INCLUDED + 10_000_000 * M  # the last µcr of the first tier (Stripe's up_to is inclusive)


# ------------------------------------------------------------------------------ the maths of one period


@pytest.mark.parametrize(("used_ucr", "usd"), [
    (0, Fraction(0)),
    (INCLUDED - 1, Fraction(0)),
    (INCLUDED, Fraction(0)),  # exactly the quota: nothing over
    (INCLUDED + 1, Fraction("0.002") / M),  # one µcr over, at the first tier's rate
    (INCLUDED + 5_000_000 * M, Fraction(10_000)),
    (EDGE - 1, Fraction(20_000) - Fraction("0.002") / M),
    (EDGE, Fraction(20_000)),  # exactly the first tier's bound: all of it at 0.002, none at 0.0015
    (EDGE + 1, Fraction(20_000) + Fraction("0.0015") / M),
    (EDGE + 1 * M, Fraction("20000.0015")),
    (EDGE + 10_000_000 * M, Fraction(35_000)),
])
def test_graduated_overage_prices_each_credit_at_the_tier_it_falls_in(used_ucr, usd):
    assert overage_usd(SCALE, used_ucr) == usd
    assert period_usd(SCALE, used_ucr) == 99 + usd
    assert sum(overage_by_band(SCALE, used_ucr)) == usd


def test_a_flat_rate_is_one_unbounded_tier():
    flat = PlanConfig(included_credits=Fraction(1000), overage_usd_per_credit=Fraction("0.002"))
    one_tier = PlanConfig(included_credits=Fraction(1000),
                          overage_tiers=(OverageTier(usd_per_credit=Fraction("0.002")),))
    for used in (0, 1000 * M, 1000 * M + 1, 1600 * M, 10**15 + 7):
        assert overage_usd(flat, used) == overage_usd(one_tier, used) == Fraction(max(0, used - 1000 * M), M) / 500
        assert expected_cents(flat, used) == expected_cents(one_tier, used)
        assert usd_limit_as_ucr(Fraction(25), flat) == usd_limit_as_ucr(Fraction(25), one_tier) == 13_500 * M


def test_tiers_without_included_credits_start_at_the_first_credit():
    plan = PlanConfig(overage_tiers=(OverageTier(up_to_credits=Fraction(10), usd_per_credit=Fraction(1)),
                                     OverageTier(usd_per_credit=Fraction("0.5"))))
    assert [overage_usd(plan, used) for used in (0, 1, 10 * M, 10 * M + 2 * M)] == [0, Fraction(1, M), 10, 11]
    assert [current_band(plan, used) for used in (0, 10 * M - 1, 10 * M, 11 * M)] == [0, 0, 1, 1]


def test_a_legacy_plan_with_tiers_charges_no_overage():
    legacy = SCALE.model_copy(update={"metered": False})
    assert not legacy.has_overage
    assert overage_usd(legacy, EDGE * 2) == 0 and expected_cents(legacy, EDGE * 2) == 9900
    assert usd_limit_as_ucr(Fraction(10), legacy) is None and overage_rates(legacy, EDGE) == []


def test_projections_stop_at_the_ceiling_across_tiers():
    assert projected_overage_usd(SCALE, EDGE + 10_000_000 * M, None) == "35000.00"
    assert projected_overage_usd(SCALE, EDGE + 10_000_000 * M, EDGE) == "20000.00"
    assert projected_usd(SCALE, EDGE + 1 * M, None) == "20099.0015"


def test_the_usage_report_lists_the_tiers_and_marks_the_current_one():
    assert overage_rates(SCALE, INCLUDED - 1) == [
        {"from_ucr": INCLUDED, "up_to_ucr": EDGE, "usd_per_credit": "0.002", "current": False},
        {"from_ucr": EDGE, "up_to_ucr": None, "usd_per_credit": "0.0015", "current": False}]
    assert [rate["current"] for rate in overage_rates(SCALE, INCLUDED)] == [True, False]
    assert [rate["current"] for rate in overage_rates(SCALE, EDGE - 1)] == [True, False]
    assert [rate["current"] for rate in overage_rates(SCALE, EDGE)] == [False, True]


# ------------------------------------------------------------------------------ invoices, rounded as Stripe does


THREE_TIERS_YAML = {"included_credits": "1000", "base_fee_usd": "99", "overage_tiers": [
    {"up_to_credits": "10000", "usd_per_credit": "0.002"}, {"up_to_credits": "20002", "usd_per_credit": "0.0015"},
    {"usd_per_credit": "0.001"}]}


def three_tiers() -> PlanConfig:
    """The first tier's bill is whole cents, the second's full tier is not (10,002 × 0.15 ¢ = 1,500.3 ¢)."""
    return PlanConfig.model_validate(THREE_TIERS_YAML)


@pytest.mark.parametrize(("past_included_credits", "cents"), [
    ("0", 9900),
    ("0.002", 9900),  # 0.0004 ¢
    ("2.5", 9900 + 1),  # 0.5 ¢: half up
    ("2.4", 9900),  # 0.48 ¢
    ("16000", 9900 + 2000 + 900),
    ("20002", 9900 + 2000 + 1500),  # the second tier whole: 1,500.3 ¢ -> 1,500
    ("20004.4", 9900 + 2000 + 1500 + 0),  # + 0.44 ¢ in the third tier: each tier rounded alone (not 3,501)
    ("20007", 9900 + 2000 + 1500 + 1),  # + 0.5 ¢: 1,500.3 -> 1,500 and 0.5 -> 1
])
def test_expected_invoice_rounds_each_tier_on_its_own(past_included_credits, cents):
    plan = three_tiers()
    used = 1000 * M + int(Decimal(past_included_credits) * M)
    assert expected_cents(plan, used) == cents
    assert expected_cents(plan, used) == 9900 + sum(round_half_up(part * 100) for part in overage_by_band(plan, used))


def emulator_price(plan: PlanConfig) -> dict:
    """The usage price `meterline stripe setup` asks for, as the emulator stores it."""
    [usage] = [spec for spec in catalog(MeterlineConfig(plans={"p": plan})) if spec.kind == "usage"]
    return {"billing_scheme": "tiered", "tiers_mode": "graduated", "tiers": [
        {"up_to": tier.up_to, "unit_amount_decimal": str(tier.unit_amount_decimal), "flat_amount_decimal": None}
        for tier in usage.tiers]}


@pytest.mark.parametrize("plan", [three_tiers(), SCALE], ids=["three-tiers", "scale"])
def test_the_emulators_graduated_line_totals_what_the_ledger_expects(plan):
    price = emulator_price(plan)
    included = round_half_up(plan.included_credits * M)
    edges = [included] + [included + round_half_up(tier.up_to_credits * M)
                          for tier in plan.overage_tiers if tier.up_to_credits is not None]
    usages = sorted({max(0, edge + delta) for edge in edges for delta in (-1, 0, 1, 2_500_000, 4_400_000, 7 * M)})
    for used in usages:
        assert 9900 + price_cents(price, Fraction(used)) == expected_cents(plan, used), used


def test_the_stripe_price_is_included_credits_free_then_each_tier_in_cents_per_micro_credit():
    [usage, base] = catalog(MeterlineConfig(plans={"scale": SCALE}))
    assert usage.tiers == (Tier(INCLUDED, Decimal(0)), Tier(EDGE, Decimal("0.0000002")),
                           Tier(None, Decimal("0.00000015")))
    assert usage.create_params("prod", "mtr")["tiers"] == [
        {"up_to": INCLUDED, "unit_amount_decimal": "0"}, {"up_to": EDGE, "unit_amount_decimal": "0.0000002"},
        {"up_to": "inf", "unit_amount_decimal": "0.00000015"}]
    assert base.unit_amount == 9900
    nothing_included = SCALE.model_copy(update={"included_credits": Fraction(0)})
    [usage, _] = catalog(MeterlineConfig(plans={"scale": nothing_included}))
    assert [tier.up_to for tier in usage.tiers] == [10_000_000 * M, None]


def test_a_tier_rate_stripe_cannot_hold_exactly_is_refused_naming_the_tier():
    plan = SCALE.model_copy(update={"overage_tiers": (
        OverageTier(up_to_credits=Fraction(10), usd_per_credit=Fraction("0.002")),
        OverageTier(usd_per_credit=Fraction("0.00000000000001")))})
    with pytest.raises(ConfigError, match=r"plans\.scale\.overage_tiers\.1\.usd_per_credit: .* decimal places"):
        catalog(MeterlineConfig(plans={"scale": plan}))


# ------------------------------------------------------------------------------ a dollar limit, across tiers


@pytest.mark.parametrize(("limit_usd", "used_ucr"), [
    ("0", INCLUDED),
    ("0.000000001", INCLUDED),  # less than one µcr buys: rounded down to nothing
    ("0.000001", INCLUDED + 500),
    ("10", INCLUDED + 5_000 * M),
    ("19999.999999999", EDGE - 1),
    ("20000", EDGE),  # exactly the first tier's cost: its last µcr
    ("20000.0000000015", EDGE + 1),
    ("20000.0015", EDGE + 1 * M),
    ("35000", EDGE + 10_000_000 * M),
])
def test_a_dollar_limit_is_the_usage_at_which_graduated_overage_reaches_it(limit_usd, used_ucr):
    limit = Fraction(Decimal(limit_usd))
    assert usd_limit_as_ucr(limit, SCALE) == used_ucr
    assert overage_usd(SCALE, used_ucr) <= limit < overage_usd(SCALE, used_ucr + 1)  # the most it can use


def test_a_dollar_limit_is_exactly_inverse_over_many_amounts():
    plan = three_tiers()
    for cents in range(0, 6000, 37):
        limit = Fraction(cents, 100)
        used = usd_limit_as_ucr(limit, plan)
        assert overage_usd(plan, used) <= limit < overage_usd(plan, used + 1), cents


def test_free_tiers_pass_through_and_a_free_last_tier_makes_a_dollar_limit_unreachable():
    free_first = PlanConfig(overage_tiers=(OverageTier(up_to_credits=Fraction(100), usd_per_credit=Fraction(0)),
                                           OverageTier(usd_per_credit=Fraction("0.01"))))
    assert usd_limit_as_ucr(Fraction(1), free_first) == 200 * M
    free_last = PlanConfig(overage_tiers=(OverageTier(up_to_credits=Fraction(100), usd_per_credit=Fraction("0.01")),
                                          OverageTier(usd_per_credit=Fraction(0))))
    assert usd_limit_as_ucr(Fraction("0.5"), free_last) == 50 * M
    assert usd_limit_as_ucr(Fraction(1), free_last) is None  # the whole paid tier costs $1: past it all is free


# ------------------------------------------------------------------------------ configuration


def refusal(tmp_path, plan: dict) -> str:
    path = tmp_path / "meterline.yaml"
    path.write_text(yaml.safe_dump({"plans": {"scale": plan}}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_the_example_loads_from_yaml(tmp_path):
    path = tmp_path / "meterline.yaml"
    path.write_text(yaml.safe_dump({"plans": {"scale": SCALE_YAML | {"max_output_tokens": 4096}}}))
    scale = load_config(path).plans["scale"]
    assert scale.has_overage and scale.overage_usd_per_credit is None and scale.max_output_tokens == 4096
    assert scale.overage_tiers == (OverageTier(up_to_credits=Fraction(10_000_000), usd_per_credit=Fraction(1, 500)),
                                   OverageTier(usd_per_credit=Fraction(3, 2000)))


@pytest.mark.parametrize(("tiers", "where", "says"), [
    ([{"up_to_credits": "10", "usd_per_credit": "0.002"}], "plans.scale.overage_tiers",
     "the last tier must have no up_to_credits"),
    ([{"usd_per_credit": "0.002"}, {"usd_per_credit": "0.001"}], "plans.scale.overage_tiers",
     "tier 1 needs up_to_credits: only the last tier is unbounded"),
    ([{"up_to_credits": "10", "usd_per_credit": "0.002"}, {"up_to_credits": "10", "usd_per_credit": "0.001"},
      {"usd_per_credit": "0.001"}], "plans.scale.overage_tiers",
     "tier 2: up_to_credits must be above the previous tier's (10); bounds are cumulative"),
    ([{"up_to_credits": "10", "usd_per_credit": 0.002}, {"usd_per_credit": "0.001"}],
     "plans.scale.overage_tiers.0.usd_per_credit", "write money and ratios as quoted strings"),
    ([{"up_to_credits": "0.0000001", "usd_per_credit": "0.002"}, {"usd_per_credit": "0.001"}],
     "plans.scale.overage_tiers.0.up_to_credits", "at most 6 decimal places"),
    ([{"up_to_credits": "0", "usd_per_credit": "0.002"}, {"usd_per_credit": "0.001"}],
     "plans.scale.overage_tiers.0.up_to_credits", "must be greater than zero"),
    ([{"up_to_credits": "10", "usd_per_credit": "-1"}, {"usd_per_credit": "0.001"}],
     "plans.scale.overage_tiers.0.usd_per_credit", "must not be negative"),
    ([{"usd_per_credit": "0.001", "per": "credit"}], "plans.scale.overage_tiers.0.per", "Extra inputs"),
    ([], "plans.scale.overage_tiers", "at least 1 item"),
])
def test_bad_tiers_are_refused_saying_where_and_why(tmp_path, tiers, where, says):
    message = refusal(tmp_path, {"included_credits": "1000", "overage_tiers": tiers})
    assert f": {where}: " in message and says in message


def test_a_plan_sets_one_overage_price_not_both(tmp_path):
    message = refusal(tmp_path, {"overage_usd_per_credit": "0.002", "overage_tiers": [{"usd_per_credit": "0.001"}]})
    assert message.endswith("plans.scale: Value error, set overage_usd_per_credit or overage_tiers, not both")


@pytest.mark.parametrize("value", [0, -5, "many", 1.5])
def test_max_output_tokens_is_a_whole_number_of_at_least_one(tmp_path, value):
    assert ": plans.scale.max_output_tokens: " in refusal(tmp_path, {"max_output_tokens": value})


def test_a_customers_flat_rate_replaces_its_plans_tiers():
    agreed = TermsOverride(overage_usd_per_credit=Fraction("0.001")).apply(SCALE)
    assert agreed.overage_tiers is None and overage_usd(agreed, EDGE) == 10_000
    assert TermsOverride(included_credits=Fraction(0)).apply(SCALE).overage_tiers == SCALE.overage_tiers


# ------------------------------------------------------------------------------ the output-token ceiling


@pytest.mark.parametrize(("asked", "ceiling", "runs_with"), [
    (None, None, None),  # nothing asked, no ceiling: the reservation default applies
    (500, None, 500),
    (None, 1000, 1000),  # a request without a limit gets the plan's
    (500, 1000, 500),
    (1000, 1000, 1000),
    (1001, 1000, 1000),
])
def test_a_plans_output_ceiling_lowers_or_supplies_max_tokens(asked, ceiling, runs_with):
    assert plan_max_tokens(asked, ceiling) == runs_with


# ------------------------------------------------------------------------------ the whole path at Stripe


@pytest.fixture(scope="module")
def emulator() -> Iterator[StripeEmulator]:
    with run_stripe_emulator(invoice_grace_seconds=60) as server:
        yield server


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, emulator) -> Iterator[Cli]:
    emulator.reset()
    monkeypatch.setenv("METERLINE_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("METERLINE_CONFIG", str(tmp_path / "meterline.yaml"))
    monkeypatch.setenv("STRIPE_API_KEY", DEFAULT_API_KEY)
    monkeypatch.setenv("METERLINE_STRIPE_API_BASE", emulator.base_url)
    monkeypatch.chdir(tmp_path)
    runner = Cli(tmp_path / "meterline.yaml", capsys)
    runner.write_plans({"tiered": THREE_TIERS_YAML})
    yield runner
    runtime.reset_for_tests()


def next_month(moment: datetime) -> datetime:
    first = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


def test_stripe_bills_graduated_tiers_as_the_ledger_and_the_usage_report_say(cli, emulator):
    """Two customers on a three-tier plan. One crosses from the first tier into the second (whole cents:
    the invoice, the expected total and the usage report's figure agree to the cent); the other ends a
    fraction of a cent into the third, where Stripe's per-tier rounding is what the expected total follows."""
    assert cli("stripe", "setup")[0] == 0
    client = emulator.client()
    [price] = client.v1.prices.list({"lookup_keys": ["meterline_tiered_usage"], "expand": ["data.tiers"]}).data
    assert (price.billing_scheme, price.tiers_mode) == ("tiered", "graduated")
    assert [(tier.up_to, Decimal(tier.unit_amount_decimal)) for tier in price.tiers] == [
        (1000 * M, Decimal(0)), (11_000 * M, Decimal("0.0000002")), (21_002 * M, Decimal("0.00000015")),
        (None, Decimal("0.0000001"))]

    meterline = runtime.current()
    usage = {"crosses": [6_000 * M, 5_000 * M, 6_000 * M],  # 1,000 included + 10,000 in tier 1 + 6,000 in tier 2
             "fraction": [21_002 * M, 4_400_000]}  # everything up to tier 3, then 4.4 credits in it (0.44 ¢)
    now = datetime.fromtimestamp(emulator.now(), UTC)
    for customer, amounts in usage.items():
        assert cli("customers", "add", customer, "--plan", "tiered")[0] == 0
        assert cli("stripe", "subscribe", customer)[0] == 0
        store.write_records(meterline.engine, [BillingRecord(LedgerRow(
            id=f"mtr_{customer}_{index}", customer_id=customer, model="gpt-x", action="-", credits_ucr=ucr,
            created_at=now - timedelta(seconds=30 - index))) for index, ucr in enumerate(amounts)])
    code, out, err = cli("relay", "--once")
    assert code == 0, err
    assert sorted(event["identifier"] for event in emulator.meter_events()) == [
        "mtr_crosses_0", "mtr_crosses_1", "mtr_crosses_2", "mtr_fraction_0", "mtr_fraction_1"]

    emulator.advance_clock_to(int(next_month(now).timestamp()) + 1)  # the period ends: drafts
    emulator.advance_clock(61)  # past the grace: finalized, metered lines recounted
    plan = meterline.plan_of(accounts.load_profile(meterline.engine, "crosses"))
    totals = {}
    for customer in usage:
        stripe_id = store.get_customer(meterline.engine, customer).stripe_customer_id
        [invoice] = client.v1.invoices.list({"customer": stripe_id}).data
        assert invoice.status in ("open", "paid")
        totals[customer] = invoice.total
    report = usage_report(meterline, "crosses", next_month(now), "previous")
    assert report["used_ucr"] == sum(usage["crosses"]) and report["projected_ucr"] == report["used_ucr"]
    assert totals["crosses"] == expected_cents(plan, sum(usage["crosses"])) == 9900 + 2000 + 900
    assert Decimal(report["projected_usd"]) * 100 == totals["crosses"]
    assert [rate["current"] for rate in report["overage_rates"]] == [False, True, False]

    fraction = usage_report(meterline, "fraction", next_month(now), "previous")
    assert totals["fraction"] == expected_cents(plan, sum(usage["fraction"])) == 9900 + 2000 + 1500
    assert fraction["projected_usd"] == "134.0074"  # exact: $99 + $20 + $15.003 + $0.0044; Stripe rounds per tier


# ------------------------------------------------------------------------------ the usage page


def test_the_usage_page_shows_the_tiers_and_where_the_period_is():
    tiered = report(included_ucr=INCLUDED, used_ucr=EDGE + 5 * M, overage_rates=overage_rates(SCALE, EDGE + 5 * M))
    page = Dom(render_page(tiered, form_action="/x"))
    assert page.table("overage-rates") == [["First 10,000,000", "$0.002"], ["Beyond 10,000,000 (current)", "$0.0015"]]
    flat = PlanConfig(included_credits=Fraction(1000), overage_usd_per_credit=Fraction("0.002"))
    page = Dom(render_page(report(overage_rates=overage_rates(flat, 0)), form_action="/x"))
    assert page.text("overage-rates") == "Past the included credits: $0.002 per credit."
    assert "overage-rates" not in Dom(render_page(report(overage_rates=[]), form_action="/x")).by_id
