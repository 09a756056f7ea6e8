"""Moving one customer off its flat plan: `meterline migrate grandfather` and `migrate schedule`, and the
first-invoice safety credit.

- The credit's maths by table.
- The commands in process on a real SQLite ledger: what they refuse (exit 2, one line), what
  grandfathering records and where it shows (`usage --json`, the fleet row), what it does to a plan.
- Through the real proxy: a grandfathered customer is never refused for overage nor billed overage,
  and its calls never reach the outbox (so never Stripe); an explicit hard limit still stops it.
- Through the Stripe emulator and its signed webhooks (snapshot and thin): `migrate schedule` makes the
  schedule, the plan changes at the renewal on the emulator's clock and not before, and the first
  metered invoice above 110% of the old flat price gets a credit on its draft and one alert, once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import openai
import pytest
import stripe
import yaml

from plugin import runtime
from plugin.cli import main
from plugin.ledger import accounts, store
from plugin.ledger.accounts import GLOBAL_OVERAGE_BLOCK
from plugin.rules.plan_moves import safety_cap_cents, safety_credit_cents
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.runtime import Meterline
from plugin.services import fleet, plan_moves
from plugin.services.invoices import StripeEvent, handle, read_event
from plugin.services.usage import usage_report
from plugin.settings import MeterlineConfig, Settings
from plugin.stripe.emulator.clock import month_period
from plugin.stripe.setup import StripeSetup
from tests.conftest import MeteredProxy, _metered_proxy
from tests.support.console_api import FixedApi
from tests.support.proxy import METERLINE_YAML
from tests.support.stripe_emulator import (
    DEFAULT_API_KEY,
    WebhookReceiver,
)
from tests.test_tui import settle
from tests.test_tui_snapshots import fixed_console
from tui.screens.customer import CustomerScreen

M = 1_000_000
DAY = 86_400
WEBHOOK_SECRET = "whsec_meterline_moves"
MOVES_YAML = {
    **METERLINE_YAML,
    "plans": {"legacy": {"base_fee_usd": "99", "metered": False},
              "pro": {"included_credits": 1000, "base_fee_usd": "20", "overage_usd_per_credit": "0.002"},
              "metered": {"included_credits": 10, "base_fee_usd": "20", "overage_usd_per_credit": "0.01"},
              "free": {"cap_credits": 100}},
}
CONFIG = MeterlineConfig.model_validate(MOVES_YAML)
FOUR_CREDITS = [{"role": "user", "content": "[[c=1000]] hello"}]  # 1,000 output tokens at weight 4


# ------------------------------------------------------------------------------ the credit's maths


@pytest.mark.parametrize("total, flat, pct, credit", [
    (13_800, "99", 110, 2_910),    # $138.00 against $108.90: the invoice ends at the cap
    (10_890, "99", 110, 0),        # at the cap: nothing
    (10_891, "99", 110, 1),        # a cent above: a cent
    (1_100, "9.99", 110, 2),       # 110% of $9.99 is 1098.9 ¢: capped at 1098 ¢, never above it
    (20_000, "99", "112.5", 8_863),  # an exact percentage: $111.375, capped at 11137 ¢
    (0, "99", 110, 0),
])
def test_the_safety_credit_brings_the_first_invoice_down_to_the_cap(total, flat, pct, credit):
    assert safety_credit_cents(total, Fraction(flat), Fraction(pct)) == credit
    cap = safety_cap_cents(Fraction(flat), Fraction(pct))
    assert total - credit == cap if total > cap else credit == 0


def test_the_policy_default_is_110_percent_and_exact():
    assert CONFIG.policies.safety_credit_pct == 110
    assert MeterlineConfig.model_validate({"policies": {"safety_credit_pct": "112.5"}}).policies.safety_credit_pct \
        == Fraction(225, 2)
    with pytest.raises(ValueError, match="quoted strings"):
        MeterlineConfig.model_validate({"policies": {"safety_credit_pct": 112.5}})


# ------------------------------------------------------------------------------ the commands, in process


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys) -> Iterator:
    """`meterline ...` in process against a throwaway SQLite ledger; answers (exit code, stdout, stderr)."""
    config = tmp_path / "meterline.yaml"
    config.write_text(yaml.safe_dump(MOVES_YAML))
    monkeypatch.setenv("METERLINE_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("METERLINE_CONFIG", str(config))
    monkeypatch.setenv("METERLINE_RELAY", "false")
    runtime.reset_for_tests()

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield run
    runtime.reset_for_tests()


def refused(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert (code, out) == (2, "") and err.count("\n") == 1, result
    return err.strip()


def test_grandfathering_is_recorded_once_and_shown_in_usage_and_the_fleet(cli):
    assert "unknown customer 'nobody'" in refused(cli("migrate", "grandfather", "nobody"))
    assert cli("customers", "add", "oldco", "--plan", "legacy")[0] == 0
    code, out, _ = cli("usage", "oldco", "--json")
    assert json.loads(out)["grandfathered_at"] is None

    code, out, _ = cli("migrate", "grandfather", "oldco", "--json")
    done = json.loads(out)
    assert code == 0 and (done["customer_id"], done["plan"], done["already"]) == ("oldco", "legacy", False)
    first = datetime.fromisoformat(done["grandfathered_at"])
    assert abs(first - datetime.now(UTC)) < timedelta(minutes=1)
    again = json.loads(cli("migrate", "grandfather", "oldco", "--json")[1])
    assert (again["already"], again["grandfathered_at"]) == (True, done["grandfathered_at"])  # the first date stays
    assert "was already grandfathered on plan legacy" in cli("migrate", "grandfather", "oldco")[1]

    report = json.loads(cli("usage", "oldco", "--json")[1])
    assert (report["plan"], report["grandfathered_at"]) == ("legacy", done["grandfathered_at"])  # its plan unchanged
    assert f"grandfathered since {first.date().isoformat()}" in cli("usage", "oldco")[1]
    [row] = fleet.fleet(runtime.current(), datetime.now(UTC), contains="oldco")["customers"]
    assert (row["plan"], row["grandfathered_at"]) == ("legacy", done["grandfathered_at"])


def test_a_grandfathered_metered_plan_bills_no_overage_and_blocks_none(cli):
    """On a plan that charges overage, grandfathering turns the charge and the blocks off; the cap and
    the customer's own hard limit stay."""
    assert cli("customers", "add", "metco", "--plan", "metered")[0] == 0
    meterline = runtime.current()
    accounts.put_limits(meterline.engine, "metco", {"block_overage": True}, by="test")
    accounts.set_switch(meterline.engine, GLOBAL_OVERAGE_BLOCK, True, by="test")
    store.write_records(meterline.engine, [billing_row("metco", 50 * M)])
    before = usage_report(meterline, "metco", datetime.now(UTC))
    assert (before["cap_ucr"], before["overage_ucr"]) == (10 * M, 40 * M)
    assert cli("migrate", "grandfather", "metco")[0] == 0
    after = usage_report(meterline, "metco", datetime.now(UTC))
    assert (after["cap_ucr"], after["overage_ucr"], after["projected_overage_usd"]) == (None, 0, "0.00")
    assert (after["plan"], after["included_ucr"]) == ("metered", 10 * M)
    [row] = fleet.fleet(meterline, datetime.now(UTC), contains="metco")["customers"]
    assert (row["block_overage"], row["cap_ucr"]) == (False, None)
    accounts.put_limits(meterline.engine, "metco", {"hard_limit_ucr": 60 * M}, by="test")
    meterline.directory.forget("metco")
    assert usage_report(meterline, "metco", datetime.now(UTC))["cap_ucr"] == 60 * M


def billing_row(customer_id: str, credits_ucr: int) -> BillingRecord:
    return BillingRecord(LedgerRow(id=f"mtr_{customer_id}_1", customer_id=customer_id, model="test-model",
                                   credits_ucr=credits_ucr, created_at=datetime.now(UTC) - timedelta(seconds=5)))


def test_schedule_refuses_what_it_cannot_move(cli):
    assert "unknown customer 'nobody'" in refused(cli("migrate", "schedule", "nobody", "--to-plan", "pro"))
    assert cli("customers", "add", "flat-a", "--plan", "legacy")[0] == 0
    assert "unknown plan 'gold'" in refused(cli("migrate", "schedule", "flat-a", "--to-plan", "gold"))
    assert "already on plan legacy" in refused(cli("migrate", "schedule", "flat-a", "--to-plan", "legacy"))
    assert "no Stripe customer" in refused(cli("migrate", "schedule", "flat-a", "--to-plan", "pro"))
    assert cli("customers", "add", "free-a", "--plan", "free", "--stripe-customer", "cus_free")[0] == 0
    assert "has no flat price: give --flat-usd" in refused(cli("migrate", "schedule", "free-a", "--to-plan", "pro"))
    assert "expected dollars and cents" in refused(
        cli("migrate", "schedule", "free-a", "--to-plan", "pro", "--flat-usd", "lots"))
    assert cli("migrate", "grandfather", "flat-a")[0] == 0
    assert "grandfathered on its flat plan since" in refused(cli("migrate", "schedule", "flat-a", "--to-plan", "pro"))
    state = runtime.current()
    assert store.get_customer(state.engine, "flat-a").scheduled_plan is None


def test_a_first_metered_invoice_under_the_cap_is_looked_at_once_and_not_credited(tmp_path):
    meterline = Meterline(settings=Settings(database_url=f"sqlite:///{tmp_path / 'ledger.db'}", relay=False),
                          config=CONFIG)
    try:
        store.add_customer(meterline.engine, "movedco", "legacy", "cus_moved")
        moved_at = datetime(2027, 1, 1, tzinfo=UTC)
        plan_moves.moves.record_schedule(meterline.engine, "movedco", "pro", "sub_sched_x", "99")
        assert plan_moves.arrived(meterline, "movedco", "legacy", moved_at) is False  # not the scheduled plan
        assert plan_moves.arrived(meterline, "movedco", "pro", moved_at) is True
        older = invoice_created("evt_0", "in_older", int(moved_at.timestamp()) - 62 * DAY, 9_900)
        older.object.update(status="open", status_transitions={"finalized_at": int(moved_at.timestamp()) - DAY})
        handle(meterline, StripeEvent("evt_0", "invoice.finalized", older.object, {}))  # the spike guard's previous
        flat_period = invoice_created("evt_1", "in_flat", int(moved_at.timestamp()) - 31 * DAY, 9_900)
        assert "safety_credit_cents" not in handle(meterline, flat_period)  # the flat plan's last period
        first = invoice_created("evt_2", "in_first", int(moved_at.timestamp()), 10_890)  # at the cap exactly
        assert handle(meterline, first)["safety_credit_cents"] == 0
        later = invoice_created("evt_3", "in_later", int(moved_at.timestamp()) + 31 * DAY, 50_000)
        assert "safety_credit_cents" not in handle(meterline, later)  # only the first metered invoice is looked at
        assert store.get_customer(meterline.engine, "movedco").first_metered_invoice == "in_first"
        assert store.list_alerts(meterline.engine, "safety_credit") == []
    finally:
        meterline.close()


def invoice_created(event_id: str, invoice_id: str, period_start: int, total: int) -> StripeEvent:
    draft = {"id": invoice_id, "object": "invoice", "customer": "cus_moved", "status": "draft", "total": total,
             "currency": "usd", "period_start": period_start, "period_end": period_start + 31 * DAY,
             "status_transitions": {"finalized_at": None}}
    return StripeEvent(event_id, "invoice.created", draft, {"id": event_id, "data": {"object": draft}})


# ------------------------------------------------------------------------------ through the real proxy


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, upstream) -> Iterator[MeteredProxy]:
    workdir = tmp_path_factory.mktemp("moves-proxy")
    yield from _metered_proxy(workdir, upstream, f"sqlite:///{workdir / 'ledger.db'}", meterline_yaml=MOVES_YAML)


def ask_until_refused(client: openai.OpenAI, limit: int) -> int:
    """4-credit requests until one is refused (raises it) or `limit` went through; how many went through."""
    for sent in range(limit):
        client.chat.completions.create(model="test-model", messages=FOUR_CREDITS)
    return limit


@pytest.mark.proxy
def test_a_grandfathered_customer_is_never_refused_nor_billed_for_overage_and_never_reaches_stripe(proxy):
    """Both on the metered plan (10 credits included, overage at $0.01), both blocking overage, the
    operator's global block on: the ordinary customer stops at its 10 credits, the grandfathered one
    goes on past them; its calls are in the ledger but not in the outbox."""
    ordinary = proxy.tenant("ordinary", plan="metered")
    store.add_customer(proxy.engine, "old-friend", "metered")
    plan_moves.moves.grandfather(proxy.engine, "old-friend", datetime.now(UTC))  # before its first request
    grandfathered = proxy.tenant("old-friend", plan="metered")
    for customer in ("ordinary", "old-friend"):
        accounts.put_limits(proxy.engine, customer, {"block_overage": True}, by="test")
    with proxy.api() as operator:
        assert operator.put("/overage-block", json={"enabled": True}).status_code == 200
        try:
            with pytest.raises(openai.APIStatusError) as stopped:
                ask_until_refused(ordinary.client, 12)
            assert stopped.value.response.headers["x-meterline-error"] == "overage_blocked"
            assert ask_until_refused(grandfathered.client, 6) == 6  # ~24 credits, past the 10 included
        finally:
            operator.put("/overage-block", json={"enabled": False})
        usage = operator.get("/customers/old-friend/usage").json()
    rows = proxy.ledger("old-friend")
    assert len(rows) == 6 and sum(row.credits_ucr for row in rows) > 20 * M  # metered for visibility
    assert (usage["grandfathered_at"] is not None, usage["overage_ucr"], usage["cap_ucr"]) == (True, 0, None)
    assert usage["projected_usd"] == "20.00"  # the flat base fee, nothing for overage
    assert store.list_outbox_ids(proxy.engine, "old-friend") == []  # never sent to the sink
    assert len(store.list_outbox_ids(proxy.engine, "ordinary")) == len(proxy.ledger("ordinary")) > 0


@pytest.mark.proxy
def test_an_explicit_hard_limit_still_stops_a_grandfathered_customer(proxy):
    store.add_customer(proxy.engine, "capped-friend", "legacy")
    plan_moves.moves.grandfather(proxy.engine, "capped-friend", datetime.now(UTC))
    tenant = proxy.tenant("capped-friend", plan="legacy")
    accounts.put_limits(proxy.engine, "capped-friend", {"hard_limit_ucr": 10 * M}, by="test")
    with pytest.raises(openai.APIStatusError) as stopped:
        ask_until_refused(tenant.client, 12)
    assert stopped.value.response.headers["x-meterline-error"] == "hard_limit_reached"
    assert sum(row.credits_ucr for row in proxy.ledger("capped-friend")) <= 10 * M


# ------------------------------------------------------------------------------ through the Stripe emulator


class Webhooks:
    """Feeds what the emulator's webhooks brought, in arrival order, through the webhook route's service:
    `read_event` (signature, thin events fetched through the SDK) and `handle`."""

    def __init__(self, receiver: WebhookReceiver, client: stripe.StripeClient, meterline: Meterline, thin: bool):
        self.receiver, self.client, self.meterline, self.thin = receiver, client, meterline, thin
        self.done = 0

    def wait_for(self, event_type: str, count: int) -> None:
        if self.thin:
            self.receiver.notifications(self.client, f"v1.{event_type}", count, timeout=10)
        else:
            self.receiver.events(event_type, count, timeout=10)

    def deliver(self) -> dict[str, list[dict]]:
        """Each new body once; the answers by event type."""
        bodies, self.done = self.receiver.received[self.done:], len(self.receiver.received)
        answers: dict[str, list[dict]] = {}
        for body, signature in bodies:
            event = read_event(body, signature, WEBHOOK_SECRET, self.client)
            answers.setdefault(event.type, []).append(handle(self.meterline, event, self.client))
        return answers

    def again(self, index: int) -> dict:
        body, signature = self.receiver.received[index]
        return handle(self.meterline, read_event(body, signature, WEBHOOK_SECRET, self.client), self.client)


@pytest.mark.parametrize("mode", ["snapshot", "thin"])
def test_a_scheduled_move_happens_at_the_renewal_and_its_first_invoice_is_capped(
        mode, running, receiver, cli, monkeypatch):
    emulator = running
    emulator.reset()
    receiver.received.clear()
    emulator.set_webhook_mode(mode)
    client = emulator.client()
    monkeypatch.setenv("STRIPE_API_KEY", DEFAULT_API_KEY)
    monkeypatch.setenv("METERLINE_STRIPE_API_BASE", emulator.base_url)
    runtime.reset_for_tests()
    setup = StripeSetup(client, CONFIG)
    setup.run()
    stripe_id = client.v1.customers.create({"name": "Flat Co"}).id
    subscription_id, _ = setup.subscribe("legacy", stripe_id)
    start, end = period(client, subscription_id)
    assert cli("customers", "add", "flatco", "--plan", "legacy", "--stripe-customer", stripe_id)[0] == 0
    meterline = runtime.current()
    hooks = Webhooks(receiver, client, meterline, thin=mode == "thin")

    code, out, err = cli("migrate", "schedule", "flatco", "--to-plan", "pro", "--json")
    assert code == 0, err
    scheduled = json.loads(out)
    assert scheduled == {"customer_id": "flatco", "from_plan": "legacy", "to_plan": "pro",
                         "schedule_id": scheduled["schedule_id"], "subscription_id": subscription_id,
                         "effective_at": datetime.fromtimestamp(end, UTC).isoformat(), "flat_usd": "99",
                         "safety_credit_pct": "110"}
    schedule = client.v1.subscription_schedules.retrieve(scheduled["schedule_id"])
    assert [phase.end_date for phase in schedule.phases] == [end, month_period(end)[1]]
    assert "already scheduled to move to plan pro" in refused(cli("migrate", "schedule", "flatco", "--to-plan", "pro"))
    assert "scheduled to move to plan pro" in refused(cli("migrate", "grandfather", "flatco"))

    emulator.advance_clock_to(end - 1)  # not before the renewal
    hooks.deliver()
    assert (customer(meterline).plan, customer(meterline).scheduled_plan) == ("legacy", "pro")

    emulator.advance_clock_to(end)  # the renewal: the new phase's prices, and the flat period's draft
    hooks.wait_for("customer.subscription.updated", 1)
    hooks.wait_for("invoice.created", 1)
    answers = hooks.deliver()
    moved = customer(meterline)
    assert (moved.plan, moved.scheduled_plan, store.as_utc(moved.migrated_at)) == (
        "pro", None, datetime.fromtimestamp(end, UTC))
    assert answers["customer.subscription.updated"][-1]["migrated"] is True
    assert "safety_credit_cents" not in answers["invoice.created"][0]  # the flat plan's last period: $99
    [flat_invoice] = client.v1.invoices.list({"customer": stripe_id}).data
    assert (flat_invoice.period_start, flat_invoice.total) == (start, 9_900)

    # the first metered month: 60,000 credits, 59,000 past the 1,000 included at $0.002: $20 + $118 = $138
    emulator.advance_clock_to(end + DAY)
    client.v1.billing.meter_events.create({
        "event_name": CONFIG.stripe.meter_event_name, "identifier": f"{mode}-used-1", "timestamp": end + 60,
        "payload": {"stripe_customer_id": stripe_id, "value": str(60_000 * M)}})
    next_end = month_period(end)[1]
    emulator.advance_clock_to(next_end)
    hooks.wait_for("invoice.created", 2)
    answers = hooks.deliver()
    [credited] = [answer for answer in answers["invoice.created"] if answer.get("safety_credit_cents")]
    assert credited["safety_credit_cents"] == 13_800 - 10_890 and credited["spike"] is False
    [draft] = [invoice for invoice in client.v1.invoices.list({"customer": stripe_id}).data
               if invoice.period_start == end]
    assert (draft.status, draft.total) == ("draft", 10_890)  # 110% of $99
    assert sorted(line.amount for line in draft.lines.data) == [-2_910, 2_000, 11_800]
    [alert] = store.list_alerts(meterline.engine, "safety_credit")
    assert (alert.customer_id, alert.subject_id) == ("flatco", draft.id)
    assert "$138.00" in alert.message and "credited $29.10" in alert.message and "$108.90" in alert.message
    assert customer(meterline).first_metered_invoice == draft.id

    # the same event again (Stripe redelivers), and another event for the same draft: nothing more
    assert hooks.again(created_event_of(receiver, draft.id))["duplicate"] is True
    assert "safety_credit_cents" not in handle(meterline, StripeEvent(
        "evt_other", "invoice.created", draft.to_dict() | {"total": 13_800}, {}), client)
    assert len(client.v1.invoice_items.list({"invoice": draft.id}).data) == 1
    assert len(store.list_alerts(meterline.engine, "safety_credit")) == 1

    # the schedule ended with its last phase and let the subscription go, on the new plan's prices
    released = client.v1.subscription_schedules.retrieve(scheduled["schedule_id"])
    assert (released.status, released.released_subscription) == ("released", subscription_id)
    assert period(client, subscription_id)[0] == next_end
    emulator.advance_clock_to(next_end + DAY)
    client.v1.billing.meter_events.create({
        "event_name": CONFIG.stripe.meter_event_name, "identifier": f"{mode}-used-2", "timestamp": next_end + 60,
        "payload": {"stripe_customer_id": stripe_id, "value": str(60_000 * M)}})
    emulator.advance_clock_to(month_period(next_end)[1])  # the second metered invoice: never capped
    hooks.wait_for("invoice.created", 3)
    answers = hooks.deliver()
    assert all("safety_credit_cents" not in answer for answer in answers["invoice.created"])
    assert customer(meterline).plan == "pro"


def created_event_of(receiver: WebhookReceiver, invoice_id: str) -> int:
    """Where the `invoice.created` webhook of that invoice is among what arrived (snapshot or thin)."""
    for index, (body, _) in enumerate(receiver.received):
        event = json.loads(body)
        inline = (event.get("data") or {}).get("object") or {}
        named = (event.get("related_object") or {}).get("id") or inline.get("id")
        if event["type"] in ("invoice.created", "v1.invoice.created") and named == invoice_id:
            return index
    raise AssertionError(f"no invoice.created webhook for {invoice_id}")


def customer(meterline: Meterline):
    return store.get_customer(meterline.engine, "flatco")


def period(client: stripe.StripeClient, subscription_id: str) -> tuple[int, int]:
    item = client.v1.subscriptions.retrieve(subscription_id)["items"].data[0]
    return item.current_period_start, item.current_period_end


# ------------------------------------------------------------------------------ in the console


async def test_the_console_marks_a_grandfathered_customer_in_the_fleet_and_on_its_screen():
    """The fleet's flags say G (the fixed answers' juno-games is grandfathered, the others not); the
    customer's screen says since when, next to its plan."""
    api = FixedApi()
    app = fixed_console(api, "textual-dark")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        flags = {line.customer_id: line.flags for line in pilot.app.screen.lines}
        assert flags["juno-games"] == "G" and "G" not in flags["acme-corp"] + flags["helix-legal"]
        pilot.app.push_screen(CustomerScreen("juno-games"))
        await settle(pilot)
        figures = str(pilot.app.screen.query_one("#figures").render())
        assert "plan pro (grandfathered since 2026-11-15)" in figures
        pilot.app.pop_screen()
        pilot.app.push_screen(CustomerScreen("acme-corp"))
        await settle(pilot)
        assert "grandfathered" not in str(pilot.app.screen.query_one("#figures").render())
