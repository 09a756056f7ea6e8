"""What meterline does with Stripe's invoice and subscription events, in process on a real SQLite
ledger (the end-to-end cycle is tests/test_invoices.py): acted on once, the spike guard's choice, the
customer's period and plan following its subscription."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from plugin.ledger import invoices, store
from plugin.runtime import Meterline
from plugin.services.invoices import StripeEvent, handle
from plugin.settings import MeterlineConfig, Settings
from tests.support.delivery import PRICED_YAML

CONFIG = MeterlineConfig.model_validate(PRICED_YAML | {"plans": {**PRICED_YAML["plans"], "team": {
    "included_credits": 10_000, "base_fee_usd": "200", "overage_usd_per_credit": "0.0015"}}})
DEC = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
JAN = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp())


@pytest.fixture
def meterline(tmp_path) -> Iterator[Meterline]:
    meterline = Meterline(settings=Settings(database_url=f"sqlite:///{tmp_path / 'ledger.db'}", relay=False),
                          config=CONFIG)
    store.add_customer(meterline.engine, "acme", "pro", "cus_acme")
    yield meterline
    meterline.close()


def event(event_id: str, kind: str, body: dict) -> StripeEvent:
    return StripeEvent(event_id, kind, body, {"id": event_id, "type": kind, "data": {"object": body}})


def invoice(invoice_id: str, status: str, total: int, finalized_at: int | None = None) -> dict:
    return {"id": invoice_id, "object": "invoice", "customer": "cus_acme", "status": status, "total": total,
            "currency": "usd", "period_start": DEC, "period_end": JAN,
            "status_transitions": {"finalized_at": finalized_at}}


def test_a_subscription_update_moves_the_period_and_the_plan(meterline):
    subscription = {"id": "sub_1", "object": "subscription", "customer": "cus_acme", "items": {"data": [
        {"current_period_start": JAN, "current_period_end": JAN + 31 * 86400,
         "price": {"lookup_key": "meterline_team_base"}},
        {"current_period_start": JAN, "price": {"lookup_key": "meterline_team_usage"}}]}}
    assert handle(meterline, event("evt_1", "customer.subscription.updated", subscription))["plan"] == "team"
    customer = store.get_customer(meterline.engine, "acme")
    assert (customer.plan, store.as_utc(customer.period_anchor)) == ("team", datetime(2027, 1, 1, tzinfo=UTC))
    unknown_plan = subscription | {"items": {"data": [{"current_period_start": JAN,
                                                        "price": {"lookup_key": "someone_else_gold_base"}}]}}
    handle(meterline, event("evt_2", "customer.subscription.updated", unknown_plan))
    assert store.get_customer(meterline.engine, "acme").plan == "team"  # a price meterline did not make: kept


def test_each_event_is_acted_on_once_and_a_finalized_invoice_is_kept(meterline):
    finalized = event("evt_f", "invoice.finalized", invoice("in_1", "open", 2120, finalized_at=JAN + 3600))
    assert handle(meterline, finalized) == {"received": True, "handled": True, "recorded": "in_1"}
    assert handle(meterline, finalized) == {"received": True, "handled": False, "duplicate": True}
    [row] = invoices.listed(meterline.engine, "acme")
    assert (row["id"], row["total_cents"], row["status"], row["held"]) == ("in_1", 2120, "open", False)


@pytest.mark.parametrize("draft_total, spike", [(3180, False), (3181, True)])
def test_the_guard_alerts_above_half_again_the_previous_total(meterline, draft_total, spike):
    handle(meterline, event("evt_f", "invoice.finalized", invoice("in_1", "open", 2120, finalized_at=JAN)))
    answer = handle(meterline, event("evt_c", "invoice.created", invoice("in_2", "draft", draft_total)))
    assert answer["spike"] is spike and (not spike or answer["held"] is False)  # policy: alert (the default)
    alerts = store.list_alerts(meterline.engine, "invoice_spike")
    assert [alert.subject_id for alert in alerts] == (["in_2"] if spike else [])
    if spike:
        assert "$21.20 → $31.81" in alerts[0].message and alerts[0].customer_id == "acme"


def test_a_meter_report_for_events_naming_no_meter_is_read_like_the_others(meterline):
    report = {"reason": {"error_count": 1, "error_types": [{"code": "no_meter", "sample_errors": [
        {"error_message": "No active meter was found", "request": {"identifier": "mtr_x"}}]}]}}
    answer = handle(meterline, event("evt_n", "billing.meter.no_meter_found", report))
    assert answer == {"received": True, "handled": True, "dead_letters": 0}  # no such event in the outbox
    [alert] = store.list_alerts(meterline.engine, "meter_error_report")
    assert "1 invalid meter event(s)" in alert.message and "no_meter" in alert.message
