"""A whole billing cycle in the emulator, through the unmodified stripe SDK and signed webhooks.

A subscription's period ends on the emulator's clock -> a draft invoice priced from the meter's usage
and ``invoice.created``; an hour later (the grace) the draft is finalized with its usage recounted and
its invoice items, and ``invoice.finalized`` follows. Thin mode sends v2 notifications instead, which
the SDK parses and resolves with ``GET /v2/core/events/{id}``.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import stripe
from stripe.events import (
    V1BillingMeterErrorReportTriggeredEventNotification,
    V1BillingMeterNoMeterFoundEventNotification,
    V1InvoiceCreatedEventNotification,
)

from tests.support.stripe_emulator import (
    StripeEmulator,
)

WEBHOOK_SECRET = "whsec_meterline_cycle"
EVENT_NAME = "meterline_credits"
BASE_FEE = 2000
"""The flat monthly fee, in cents."""
GRACE = 3600


@pytest.fixture
def client(emulator) -> stripe.StripeClient:
    return emulator.client()


@pytest.fixture
def account(client) -> dict[str, Any]:
    """A customer on a graduated metered price (10M credits free, then 0.0001 ¢ each) plus a flat base fee."""
    customer = client.v1.customers.create({"email": "ada@example.com", "name": "Ada"})
    product = client.v1.products.create({"name": "meterline credits"})
    meter = client.v1.billing.meters.create({
        "display_name": "meterline credits", "event_name": EVENT_NAME, "default_aggregation": {"formula": "sum"},
    })
    usage = client.v1.prices.create({
        "product": product.id, "currency": "usd", "billing_scheme": "tiered", "tiers_mode": "graduated",
        "tiers": [{"up_to": 10_000_000, "unit_amount_decimal": "0"}, {"up_to": "inf", "unit_amount_decimal": "0.0001"}],
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
    })
    base = client.v1.prices.create({"product": product.id, "currency": "usd", "unit_amount": BASE_FEE,
                                    "recurring": {"interval": "month"}})
    subscription = client.v1.subscriptions.create({
        "customer": customer.id, "items": [{"price": usage.id}, {"price": base.id, "quantity": 1}],
    })
    item = subscription["items"].data[0]
    return {"customer": customer.id, "meter": meter.id, "usage_price": usage.id, "base_price": base.id,
            "subscription": subscription.id, "period": (item.current_period_start, item.current_period_end)}


def record(client: stripe.StripeClient, customer: str, identifier: str, credits: int, timestamp: int) -> None:
    client.v1.billing.meter_events.create({
        "event_name": EVENT_NAME, "identifier": identifier, "timestamp": timestamp,
        "payload": {"stripe_customer_id": customer, "value": str(credits)},
    })


def drafts_at_period_end(emulator: StripeEmulator, client: stripe.StripeClient, account) -> stripe.Invoice:
    """Move the clock to the period's end and answer the one invoice the cycle made for it."""
    emulator.advance_clock_to(account["period"][1])
    [invoice] = client.v1.invoices.list({"subscription": account["subscription"]}).data
    return invoice


def test_a_whole_cycle_drafts_at_period_end_and_finalizes_after_the_grace(emulator, client, account, receiver):
    customer, (start, end) = account["customer"], account["period"]
    record(client, customer, "mtr_in_period", 12_000_000, int(time.time()))  # 2M over the free 10M: 200 ¢
    emulator.advance_clock_to(end - 1)
    assert client.v1.invoices.list({"customer": customer}).data == []  # the period has not ended yet

    draft = drafts_at_period_end(emulator, client, account)
    assert (draft.status, draft.billing_reason, draft.auto_advance) == ("draft", "subscription_cycle", True)
    assert (draft.period_start, draft.period_end, draft.created) == (start, end, end)
    assert draft.automatically_finalizes_at == end + GRACE
    assert draft.parent.subscription_details.subscription == account["subscription"]
    assert (draft.customer, draft.currency, draft.total, draft.subtotal, draft.amount_due) == (
        customer, "usd", BASE_FEE + 200, BASE_FEE + 200, BASE_FEE + 200)
    lines = {line.pricing.price_details.price: line for line in draft.lines.data}
    assert (lines[account["usage_price"]].quantity, lines[account["usage_price"]].amount) == (12_000_000, 200)
    assert lines[account["usage_price"]].period.start == start and lines[account["base_price"]].amount == BASE_FEE
    [created] = receiver.events("invoice.created")
    assert (created.data.object.id, created.data.object.total) == (draft.id, BASE_FEE + 200)
    renewed = client.v1.subscriptions.retrieve(account["subscription"])["items"].data
    assert {(item.current_period_start, item.current_period_end > end) for item in renewed} == {(end, True)}

    record(client, customer, "mtr_late", 1_000_000, end - 10)  # arrives after the period closed: still counts
    credit = client.v1.invoice_items.create({"customer": customer, "invoice": draft.id, "amount": -500,
                                             "currency": "usd", "description": "goodwill credit"})
    assert (credit.object, credit.invoice, credit.amount) == ("invoiceitem", draft.id, -500)
    draft = client.v1.invoices.retrieve(draft.id)
    assert (draft.status, draft.total) == ("draft", BASE_FEE + 200 - 500)  # quantities refresh only at finalization
    [credit_line] = [line for line in draft.lines.data if line.parent.type == "invoice_item_details"]
    assert (credit_line.amount, credit_line.parent.invoice_item_details.invoice_item) == (-500, credit.id)
    paged = client.v1.invoices.line_items.list(draft.id, {"limit": 2}).auto_paging_iter()
    assert sorted(line.amount for line in paged) == [-500, 200, BASE_FEE]

    emulator.advance_clock_to(end + GRACE - 1)
    assert client.v1.invoices.retrieve(draft.id).status == "draft"
    emulator.advance_clock_to(end + GRACE)
    final = client.v1.invoices.retrieve(draft.id)
    assert (final.status, final.total, final.amount_due) == ("open", BASE_FEE + 300 - 500, BASE_FEE + 300 - 500)
    assert final.status_transitions.finalized_at == end + GRACE and final.automatically_finalizes_at is None
    assert final.number is not None
    [finalized] = receiver.events("invoice.finalized")
    assert (finalized.data.object.id, finalized.data.object.total) == (draft.id, BASE_FEE + 300 - 500)
    assert [invoice.id for invoice in client.v1.invoices.list({"customer": customer, "status": "open"}).data] == [
        draft.id]
    twins = client.v2.core.events.list({"object_id": draft.id, "limit": 1}).auto_paging_iter()
    assert [event.type for event in twins] == ["v1.invoice.finalized", "v1.invoice.created"]  # v2 pages, newest first


def test_a_held_draft_waits_until_released(emulator, client, account, receiver):
    draft = drafts_at_period_end(emulator, client, account)
    held = client.v1.invoices.update(draft.id, {"auto_advance": False, "metadata": {"held_by": "spike guard"}})
    assert (held.auto_advance, held.automatically_finalizes_at, held.metadata["held_by"]) == (
        False, None, "spike guard")
    emulator.advance_clock(3 * GRACE)
    assert client.v1.invoices.retrieve(draft.id).status == "draft"

    released = client.v1.invoices.update(draft.id, {"auto_advance": True})
    assert released.automatically_finalizes_at == draft.automatically_finalizes_at  # already due
    emulator.advance_clock(1)
    assert client.v1.invoices.retrieve(draft.id).status == "open"
    [finalized] = receiver.events("invoice.finalized")
    assert finalized.data.object.metadata["held_by"] == "spike guard"


def test_invoice_items_go_only_on_a_draft_of_their_customer(emulator, client, account):
    customer = account["customer"]
    draft = drafts_at_period_end(emulator, client, account)
    other = client.v1.customers.create({"name": "Bob"}).id
    with pytest.raises(stripe.InvalidRequestError) as not_theirs:
        client.v1.invoice_items.create({"customer": other, "invoice": draft.id, "amount": -100, "currency": "usd"})
    assert (not_theirs.value.http_status, not_theirs.value.param) == (400, "invoice")
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.invoice_items.create({"customer": customer, "invoice": "in_nothing", "amount": -100,
                                        "currency": "usd"})
    assert (unknown.value.http_status, unknown.value.param, unknown.value.code) == (400, "invoice",
                                                                                    "resource_missing")

    final = client.v1.invoices.finalize_invoice(draft.id)
    assert (final.status, final.total) == ("open", BASE_FEE)
    with pytest.raises(stripe.InvalidRequestError) as finalized:
        client.v1.invoice_items.create({"customer": customer, "invoice": draft.id, "amount": -100, "currency": "usd"})
    assert (finalized.value.http_status, finalized.value.param, finalized.value.code) == (
        400, "invoice", "invoice_not_editable")
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.finalize_invoice(draft.id)
    with pytest.raises(stripe.InvalidRequestError) as moved:
        client.v1.invoices.update(draft.id, {"automatically_finalizes_at": int(emulator.now()) + 60})
    assert moved.value.param == "automatically_finalizes_at"
    assert client.v1.invoices.update(draft.id, {"description": "March"}).description == "March"  # not money
    assert client.v1.invoice_items.list({"customer": customer}).data == []
    assert client.v1.invoices.retrieve(draft.id).total == BASE_FEE


def test_a_pending_invoice_item_joins_the_next_cycle_draft(emulator, client, account):
    customer = account["customer"]
    pending = client.v1.invoice_items.create({"customer": customer, "amount": -250, "currency": "usd",
                                              "description": "migration credit"})
    assert pending.invoice is None
    assert [item.id for item in client.v1.invoice_items.list({"customer": customer, "pending": True}).data] == [
        pending.id]
    draft = drafts_at_period_end(emulator, client, account)
    assert draft.total == BASE_FEE - 250
    assert client.v1.invoice_items.retrieve(pending.id).invoice == draft.id
    assert client.v1.invoice_items.list({"customer": customer, "pending": True}).data == []


def test_a_clock_jump_over_three_periods_bills_each_once_and_pages(emulator, client, account, receiver):
    start, end = account["period"]
    later = datetime.fromtimestamp(end, UTC)
    third_end = int(datetime(later.year + (later.month + 1) // 12, (later.month + 1) % 12 + 1, 1,
                             tzinfo=UTC).timestamp())
    emulator.advance_clock_to(third_end + GRACE)
    pages = client.v1.invoices.list({"subscription": account["subscription"], "limit": 2})
    assert len(pages.data) == 2 and pages.has_more
    invoices = list(pages.auto_paging_iter())
    periods = sorted((invoice.period_start, invoice.period_end) for invoice in invoices)
    assert periods[0] == (start, end) and periods[-1][1] == third_end and len(periods) == 3
    assert all(previous[1] == following[0] for previous, following in zip(periods, periods[1:], strict=False))
    assert {invoice.status for invoice in invoices} == {"open"}  # the last one's grace is over too
    assert len(receiver.events("invoice.created", count=3)) == len(receiver.events("invoice.finalized", count=3))
    assert client.v1.invoices.list({"subscription": account["subscription"], "status": "draft"}).data == []


def test_thin_mode_sends_notifications_the_sdk_parses_and_fetches(emulator, client, account, receiver):
    emulator.set_webhook_mode("thin")
    draft = drafts_at_period_end(emulator, client, account)
    [notification] = receiver.notifications(client, "v1.invoice.created")
    assert isinstance(notification, V1InvoiceCreatedEventNotification)
    assert (notification.related_object.id, notification.related_object.url) == (draft.id, f"/v1/invoices/{draft.id}")
    event = notification.fetch_event()
    assert (event.object, event.id, event.type) == ("v2.core.event", notification.id, "v1.invoice.created")
    assert event.related_object.id == draft.id and event.created.endswith("Z")
    assert client.v1.events.retrieve(event.snapshot_event).data.object.id == draft.id
    assert notification.fetch_related_object().status == "draft"
    snapshots = [json.loads(body)["type"] for body, _ in receiver.bodies("event")]
    assert snapshots == ["customer.created"]  # sent by the fixture, before the switch; nothing since
    with pytest.raises(ValueError, match="thin event notification"):  # the signature holds; the shape is thin
        stripe.Webhook.construct_event(*receiver.bodies("v2.core.event")[0], WEBHOOK_SECRET)


def test_thin_mode_reports_meter_errors_as_stripe_does(emulator, client, account, receiver):
    emulator.set_webhook_mode("thin")
    stream = emulator.client(client.v2.billing.meter_event_session.create().authentication_token)
    stream.v2.billing.meter_event_stream.create({"events": [
        {"event_name": EVENT_NAME, "identifier": "mtr_orphan", "payload": {"stripe_customer_id": "cus_gone",
                                                                            "value": "5"}},
        {"event_name": "no_such_meter", "identifier": "mtr_nameless",
         "payload": {"stripe_customer_id": account["customer"], "value": "5"}},
    ]})
    [report] = receiver.notifications(client, "v1.billing.meter.error_report_triggered")
    assert isinstance(report, V1BillingMeterErrorReportTriggeredEventNotification)
    assert report.related_object.id == account["meter"]
    [error_type] = report.fetch_event().data.reason.error_types
    assert (error_type.code, error_type.sample_errors[0].request.identifier) == (
        "meter_event_customer_not_found", "mtr_orphan")
    [nameless] = receiver.notifications(client, "v1.billing.meter.no_meter_found")
    assert isinstance(nameless, V1BillingMeterNoMeterFoundEventNotification)
    assert nameless.fetch_event().data.reason.error_types[0].code == "no_meter"
    assert client.v1.events.list({"type": "billing.meter.error_report_triggered"}).data == []  # thin only


def test_control_knobs_refuse_what_they_cannot_do_and_reset_restores_them(emulator):
    for refused, param in ((lambda: emulator.set_invoice_grace(-1), "seconds"),
                           (lambda: emulator.set_webhook_mode("fat"), "mode"),
                           (lambda: emulator.advance_clock_to(int(emulator.now()) - 60), "advance_to")):
        with pytest.raises(httpx.HTTPStatusError) as answer:
            refused()
        assert (answer.value.response.status_code, answer.value.response.json()["error"]["param"]) == (400, param)
    emulator.set_invoice_grace(60)
    emulator.set_webhook_mode("thin")
    emulator.reset()
    assert httpx.get(f"{emulator.base_url}/_emulator/invoice_grace").json() == {"seconds": GRACE}
    assert httpx.get(f"{emulator.base_url}/_emulator/webhook_mode").json() == {"mode": "snapshot"}
