"""`meterline stripe setup | subscribe` and the demo's Stripe wiring, against the local Stripe emulator."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import yaml

from plugin import runtime
from plugin.cli import main
from plugin.ledger import store
from tests.support.stripe_emulator import (
    DEFAULT_API_KEY,
    StripeEmulator,
    run_stripe_emulator,
)

PLANS = {
    "pro": {"included_credits": 10000, "base_fee_usd": "20", "overage_usd_per_credit": "0.002"},
    "free": {"cap_credits": 100},
}
CREATES = ("POST /v1/billing/meters", "POST /v1/products", "POST /v1/prices", "POST /v1/subscriptions",
           "POST /v1/customers")


@pytest.fixture(scope="module")
def emulator() -> Iterator[StripeEmulator]:
    with run_stripe_emulator() as server:
        yield server


class Cli:
    def __init__(self, config_path, capsys) -> None:
        self.config_path = config_path
        self.capsys = capsys

    def write_plans(self, plans: dict) -> None:
        self.config_path.write_text(yaml.safe_dump({"plans": plans}))
        runtime.reset_for_tests()

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        out = io.StringIO()
        self.capsys.readouterr()
        code = main(list(argv), out=out)
        return code, out.getvalue(), self.capsys.readouterr().err


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, emulator) -> Iterator[Cli]:
    emulator.reset()
    monkeypatch.setenv("METERLINE_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("METERLINE_CONFIG", str(tmp_path / "meterline.yaml"))
    monkeypatch.setenv("STRIPE_API_KEY", DEFAULT_API_KEY)
    monkeypatch.setenv("METERLINE_STRIPE_API_BASE", emulator.base_url)
    monkeypatch.chdir(tmp_path)
    runner = Cli(tmp_path / "meterline.yaml", capsys)
    runner.write_plans(PLANS)
    yield runner
    runtime.reset_for_tests()


def creates(emulator: StripeEmulator) -> dict[str, int]:
    calls = emulator.calls()
    return {name: calls.get(name, 0) for name in CREATES}


def test_setup_creates_the_catalog_once_and_a_second_run_changes_nothing(cli, emulator):
    code, out, _ = cli("stripe", "setup")
    assert code == 0
    assert [line.split()[:3] for line in out.splitlines()[:4]] == [
        ["meter", "meterline_credits", "created"], ["product", "meterline_credits", "created"],
        ["price", "meterline_pro_usage", "created"], ["price", "meterline_pro_base", "created"],
    ]
    assert out.splitlines()[-1] == "4 object(s) created or replaced"
    before = creates(emulator)
    code, out, _ = cli("stripe", "setup")
    assert code == 0 and out.splitlines()[-1] == "nothing changed: Stripe already matches meterline.yaml"
    assert creates(emulator) == before

    client = emulator.client()
    [meter] = client.v1.billing.meters.list().data
    assert (meter.event_name, meter.default_aggregation.formula) == ("meterline_credits", "sum")
    [usage] = client.v1.prices.list({"lookup_keys": ["meterline_pro_usage"], "expand": ["data.tiers"]}).data
    assert (usage.recurring.usage_type, usage.recurring.meter, usage.tiers_mode) == ("metered", meter.id, "graduated")
    assert [(tier.up_to, Decimal(tier.unit_amount_decimal)) for tier in usage.tiers] == [
        (10_000_000_000, Decimal(0)), (None, Decimal("0.0000002"))]
    [base] = client.v1.prices.list({"lookup_keys": ["meterline_pro_base"]}).data
    assert (base.unit_amount, base.recurring.interval, base.currency) == (2000, "month", "usd")


def test_a_changed_rate_replaces_the_price_and_moves_its_lookup_key(cli, emulator):
    assert cli("stripe", "setup")[0] == 0
    client = emulator.client()
    [old] = client.v1.prices.list({"lookup_keys": ["meterline_pro_usage"]}).data
    cli.write_plans({"pro": PLANS["pro"] | {"overage_usd_per_credit": "0.003"}})
    code, out, _ = cli("stripe", "setup")
    assert code == 0 and "meterline_pro_usage" in out and "replaced" in out
    assert out.splitlines()[-1] == "1 object(s) created or replaced"
    [new] = client.v1.prices.list({"lookup_keys": ["meterline_pro_usage"], "expand": ["data.tiers"]}).data
    assert new.id != old.id and Decimal(new.tiers[1].unit_amount_decimal) == Decimal("0.0000003")
    assert cli("stripe", "setup")[1].splitlines()[-1].startswith("nothing changed")


def test_subscribe_creates_the_customer_and_subscription_once_and_the_invoice_prices_exactly(cli, emulator):
    assert cli("stripe", "setup")[0] == 0
    assert cli("customers", "add", "acme", "--plan", "pro")[0] == 0
    code, out, _ = cli("stripe", "subscribe", "acme")
    assert code == 0 and "created at Stripe as cus_" in out and "created for acme" in out
    code, out, _ = cli("stripe", "subscribe", "acme")
    assert code == 0 and "already in place" in out and "created at Stripe" not in out
    stripe_id = store.get_customer(runtime.current().engine, "acme").stripe_customer_id
    client = emulator.client()
    [subscription] = client.v1.subscriptions.list({"customer": stripe_id}).data
    # 10,500 credits: the 10,000 included are free, the 500 over cost $0.002 each = 100 cents; + $20 base
    now = int(datetime.now(UTC).timestamp())
    for n, credits in enumerate((10_000, 500)):
        client.v1.billing.meter_events.create({
            "event_name": "meterline_credits", "identifier": f"inv-{n}", "timestamp": now,
            "payload": {"stripe_customer_id": stripe_id, "value": str(credits * 1_000_000)},
        })
    invoice = client.v1.invoices.create_preview({"customer": stripe_id, "subscription": subscription.id})
    assert invoice.total == 2000 + 100


def test_subscribe_refuses_plans_without_prices_and_unknown_customers(cli):
    assert cli("stripe", "setup")[0] == 0
    assert cli("customers", "add", "freebie", "--plan", "free")[0] == 0
    code, out, err = cli("stripe", "subscribe", "freebie")
    assert (code, out) == (2, "") and "plan 'free' has no Stripe prices" in err and err.count("\n") == 1
    code, _, err = cli("stripe", "subscribe", "nobody")
    assert code == 2 and "unknown customer 'nobody'" in err


def test_subscribe_before_setup_says_to_run_setup(cli):
    assert cli("customers", "add", "early", "--plan", "pro")[0] == 0
    code, _, err = cli("stripe", "subscribe", "early")
    assert code == 2 and "run `meterline stripe setup` first" in err


def test_setup_needs_a_key_and_reports_stripe_refusals_in_one_line(cli, monkeypatch):
    monkeypatch.delenv("STRIPE_API_KEY")
    runtime.reset_for_tests()
    code, _, err = cli("stripe", "setup")
    assert code == 2 and "STRIPE_API_KEY is not set" in err
    monkeypatch.setenv("STRIPE_API_KEY", "pk_test_publishable_is_not_a_secret_key")
    runtime.reset_for_tests()
    code, _, err = cli("stripe", "setup")
    assert code == 1 and err.startswith("meterline: Stripe refused:") and err.count("\n") == 1
    assert "pk_test_publishable_is_not_a_secret_key" not in err


def test_demo_sets_up_stripe_and_survives_an_emulator_restart(cli, emulator, tmp_path):
    code, out, _ = cli("demo", "--key-file", str(tmp_path / "key"))
    assert code == 0 and "meter events go to Stripe" in out
    first = store.get_customer(runtime.current().engine, "demo-customer").stripe_customer_id
    assert emulator.client().v1.subscriptions.list({"customer": first}).data
    emulator.reset()  # the emulator forgets everything between runs of `make run`
    assert cli("demo", "--key-file", str(tmp_path / "key"))[0] == 0
    second = store.get_customer(runtime.current().engine, "demo-customer").stripe_customer_id
    assert second != first and emulator.client().v1.subscriptions.list({"customer": second}).data


def test_subscribe_attaches_the_plan_prices_to_a_subscription_the_customer_already_has(cli, emulator):
    assert cli("stripe", "setup")[0] == 0
    client = emulator.client()
    other_product = client.v1.products.create({"name": "support plan"})
    support = client.v1.prices.create({"product": other_product.id, "currency": "usd", "unit_amount": 5000,
                                       "recurring": {"interval": "month"}})
    stripe_id = client.v1.customers.create({"name": "existing"}).id
    existing = client.v1.subscriptions.create({"customer": stripe_id, "items": [{"price": support.id}]})
    assert cli("customers", "add", "existing", "--plan", "pro", "--stripe-customer", stripe_id)[0] == 0
    code, out, _ = cli("stripe", "subscribe", "existing")
    assert code == 0 and f"subscription {existing.id} now carries the plan's prices" in out
    [subscription] = client.v1.subscriptions.list({"customer": stripe_id}).data
    lookup_keys = {item.price.lookup_key for item in subscription["items"].data}
    assert lookup_keys == {None, "meterline_pro_usage", "meterline_pro_base"}
    assert "already in place" in cli("stripe", "subscribe", "existing")[1]
