"""The real stripe SDK (sync and async) against the emulator subprocess: objects, meter events, faults, webhooks."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
import stripe

from plugin.stripe.emulator.webhooks import WebhookSender
from tests.support.stripe_emulator import (
    WebhookReceiver,
    receiving,
)

pytestmark = pytest.mark.filterwarnings(
    # stripe-python's own async HTTPX client passes bytes as `data=`; not ours to fix
    "ignore:Use 'content=<...>' to upload raw bytes/text content.:DeprecationWarning"
)

WEBHOOK_SECRET = "whsec_meterline_test"
EVENT_NAME = "meterline_credits"


@pytest.fixture
def client(emulator) -> stripe.StripeClient:
    return emulator.client()


@pytest.fixture
def account(client):
    """Customer, product, meter, graduated metered price (by lookup key), seat price, subscription."""
    customer = client.v1.customers.create({"email": "ada@example.com", "name": "Ada", "metadata": {"plan": "pro"}})
    product = client.v1.products.create({"name": "meterline credits"})
    meter = client.v1.billing.meters.create({
        "display_name": "meterline credits", "event_name": EVENT_NAME, "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
        "value_settings": {"event_payload_key": "value"},
    })
    client.v1.prices.create({
        "product": product.id, "currency": "usd", "billing_scheme": "tiered", "tiers_mode": "graduated",
        "tiers": [{"up_to": 10_000_000, "unit_amount_decimal": "0"}, {"up_to": "inf", "unit_amount_decimal": "0.0001"}],
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        "lookup_key": "meterline_credits_graduated", "nickname": "credits",
    })
    seat = client.v1.prices.create({"product": product.id, "currency": "usd", "unit_amount": 1000,
                                    "recurring": {"interval": "month"}})
    [usage] = client.v1.prices.list({"lookup_keys": ["meterline_credits_graduated"], "expand": ["data.tiers"]}).data
    subscription = client.v1.subscriptions.create({
        "customer": customer.id, "items": [{"price": usage.id}, {"price": seat.id, "quantity": 2}],
    })
    return {"customer": customer, "meter": meter, "usage_price": usage, "subscription": subscription}


def send(client: stripe.StripeClient, customer: str, identifier: str, value: str = "1500000", **extra):
    return client.v1.billing.meter_events.create(
        {"event_name": EVENT_NAME, "payload": {"stripe_customer_id": customer, "value": value},
         "identifier": identifier, "timestamp": int(time.time()), **extra},
    )


def test_objects_have_stripe_shapes(client, account):
    price, subscription = account["usage_price"], account["subscription"]
    assert [tier.up_to for tier in price.tiers] == [10_000_000, None]
    assert price.tiers[1].unit_amount_decimal == Decimal("0.0001") and price.recurring.meter == account["meter"].id
    items = subscription["items"].data
    assert [item.id[:3] for item in items] == ["si_", "si_"] and items[1].quantity == 2
    assert items[0].current_period_start == items[1].current_period_start < items[0].current_period_end
    assert "current_period_start" not in subscription  # API 2026-10-28: on the items only
    assert client.v1.customers.retrieve(account["customer"].id).metadata["plan"] == "pro"
    assert client.v1.billing.meters.list({"status": "active"}).data[0].event_name == EVENT_NAME
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.customers.retrieve("cus_nobody")
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")


def test_v1_meter_event_is_recorded_and_a_duplicate_identifier_refused(emulator, client, account):
    customer = account["customer"].id
    event = send(client, customer, "mtr_18a2b3c4d5e6f7a8b9c0d1e2")
    assert (event.object, event.identifier, event.payload["value"]) == (
        "billing.meter_event", "mtr_18a2b3c4d5e6f7a8b9c0d1e2", "1500000")
    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        send(client, customer, "mtr_18a2b3c4d5e6f7a8b9c0d1e2")
    # exactly Stripe's answer: 400, no code, no param, this message, and "do not retry"
    assert (duplicate.value.http_status, duplicate.value.code, duplicate.value.param) == (400, None, None)
    assert duplicate.value.user_message == "An event already exists with identifier mtr_18a2b3c4d5e6f7a8b9c0d1e2."
    assert duplicate.value.json_body["error"] == {"type": "invalid_request_error",
                                                  "message": duplicate.value.user_message}
    assert duplicate.value.headers.get("stripe-should-retry") == "false"
    log = emulator.meter_event_log()
    assert [(e["identifier"], e["customer"], e["value"], e["source"]) for e in log["events"]] == [
        ("mtr_18a2b3c4d5e6f7a8b9c0d1e2", customer, "1500000", "v1")]
    assert log["duplicates"] == 1


def test_idempotency_key_replays_without_a_second_record(emulator, client, account):
    customer = account["customer"].id
    params = {"event_name": EVENT_NAME, "identifier": "mtr_idem", "timestamp": int(time.time()),
              "payload": {"stripe_customer_id": customer, "value": "7"}}
    first = client.v1.billing.meter_events.create(params, {"idempotency_key": "ik-1"})
    again = client.v1.billing.meter_events.create(params, {"idempotency_key": "ik-1"})
    assert again.to_dict() == first.to_dict()
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    assert emulator.meter_event_log()["count"] == 1
    with pytest.raises(stripe.IdempotencyError):
        client.v1.billing.meter_events.create({**params, "identifier": "mtr_other"}, {"idempotency_key": "ik-1"})


@pytest.mark.parametrize(("shift", "code"), [(-36 * 86_400, "timestamp_too_far_in_past"), (600, "timestamp_in_future")])
def test_timestamps_outside_the_window_are_refused(emulator, client, account, shift, code):
    with pytest.raises(stripe.InvalidRequestError) as refused:
        send(client, account["customer"].id, "mtr_time", timestamp=int(time.time()) + shift)
    assert (refused.value.code, refused.value.param) == (code, "timestamp")
    assert emulator.meter_event_log()["count"] == 0


def test_unknown_customer_and_unknown_event_name_are_refused(client, account):
    with pytest.raises(stripe.InvalidRequestError) as no_customer:
        send(client, "cus_nobody", "mtr_c")
    assert (no_customer.value.code, no_customer.value.param) == (
        "meter_event_customer_not_found", "payload[stripe_customer_id]")
    with pytest.raises(stripe.InvalidRequestError) as no_meter:
        client.v1.billing.meter_events.create({"event_name": "nope", "payload": {
            "stripe_customer_id": account["customer"].id, "value": "1"}})
    assert no_meter.value.code == "no_meter"


def test_api_keys_are_checked(emulator):
    with pytest.raises(stripe.AuthenticationError):
        emulator.client("pk_test_public").v1.customers.list()
    assert emulator.client("rk_test_restricted").v1.customers.list().data == []


def test_v2_stream_of_100_events_and_an_expired_session(emulator, client, account):
    customer = account["customer"].id
    session = client.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session" and session.expires_at.endswith("Z")
    stream = emulator.client(session.authentication_token)
    stamp = datetime.now(UTC).isoformat()
    stream.v2.billing.meter_event_stream.create({"events": [
        {"event_name": EVENT_NAME, "identifier": f"mtr_v2_{index}", "timestamp": stamp,
         "payload": {"stripe_customer_id": customer, "value": "1000"}} for index in range(100)]})
    events = emulator.meter_events()
    assert len(events) == 100 and {event["source"] for event in events} == {"v2"}
    with pytest.raises(stripe.InvalidRequestError):
        stream.v2.billing.meter_event_stream.create({"events": [
            {"event_name": EVENT_NAME, "payload": {"stripe_customer_id": customer, "value": "1"}}] * 101})
    emulator.advance_clock(15 * 60)
    with pytest.raises(stripe.TemporarySessionExpiredError) as expired:  # what the SDK makes of Stripe's v2 error
        stream.v2.billing.meter_event_stream.create({"events": [
            {"event_name": EVENT_NAME, "payload": {"stripe_customer_id": customer, "value": "1"}}]})
    assert (expired.value.http_status, expired.value.error.code) == (401, "billing_meter_event_session_expired")


def test_invalid_v2_event_is_accepted_then_reported_by_a_signed_webhook(emulator, client, account, receiver):
    session = client.v2.billing.meter_event_session.create()
    stream = emulator.client(session.authentication_token)
    stream.v2.billing.meter_event_stream.create({"events": [
        {"event_name": EVENT_NAME, "identifier": "mtr_good", "payload": {"stripe_customer_id": account["customer"].id,
                                                                          "value": "5"}},
        {"event_name": EVENT_NAME, "identifier": "mtr_orphan", "payload": {"stripe_customer_id": "cus_gone",
                                                                            "value": "5"}},
    ]})
    # Stripe sends meter error reports only as thin events, even to a snapshot endpoint
    [report] = receiver.notifications(client, "v1.billing.meter.error_report_triggered")
    assert report.related_object.id == account["meter"].id
    error_type = report.fetch_event().data.reason.error_types[0]
    assert error_type.code == "meter_event_customer_not_found"
    assert error_type.sample_errors[0].request.identifier == "mtr_orphan"
    log = emulator.meter_event_log()
    assert [event["identifier"] for event in log["events"]] == ["mtr_good"]
    assert [(r["identifier"], r["code"], r["source"]) for r in log["rejections"]] == [
        ("mtr_orphan", "meter_event_customer_not_found", "v2")]
    assert any(delivery["status"] == 200 for delivery in emulator.webhook_deliveries())


def test_summaries_and_invoice_preview_price_the_usage_exactly(emulator, client, account):
    customer, subscription = account["customer"].id, account["subscription"]
    send(client, customer, "mtr_big", "12000000")
    send(client, customer, "mtr_small", "345678")
    now = int(time.time())
    hour_start = now - now % 3600
    summaries = client.v1.billing.meters.event_summaries.list(account["meter"].id, {
        "customer": customer, "start_time": hour_start - 86_400, "end_time": hour_start + 3600})
    assert sum(summary.aggregated_value for summary in summaries.data) == 12_345_678
    preview = client.v1.invoices.create_preview({"customer": customer, "subscription": subscription.id})
    lines = {line.pricing.price_details.price: line for line in preview.lines.data}
    assert lines[account["usage_price"].id].amount == 235  # 2,345,678 units over the free 10M at 0.0001 ¢
    assert lines[account["usage_price"].id].quantity == 12_345_678
    assert preview.total == 235 + 2 * 1000


def test_finalized_period_sends_invoice_created(emulator, account, receiver):
    invoice = emulator.finalize_invoice(account["subscription"].id)
    [created] = receiver.events("invoice.created")
    assert created.data.object.id == invoice["id"] and created.data.object.status == "draft"


def test_injected_500_before_recording_records_nothing(emulator, client, account):
    emulator.fail_next(1, path_prefix="/v1/billing/meter_events")
    client.v1.customers.list()  # another path: not affected
    with pytest.raises(stripe.APIError) as failed:
        send(client, account["customer"].id, "mtr_f1")
    assert failed.value.http_status == 500
    assert emulator.meter_event_log()["count"] == 0
    send(client, account["customer"].id, "mtr_f1")
    assert emulator.meter_event_log()["count"] == 1


def test_ambiguous_500_after_recording_keeps_the_event(emulator, client, account):
    customer = account["customer"].id
    emulator.fail_next(1, after_record=True)
    with pytest.raises(stripe.APIError):
        client.v1.billing.meter_events.create(
            {"event_name": EVENT_NAME, "identifier": "mtr_amb", "payload": {"stripe_customer_id": customer,
                                                                             "value": "3"}},
            {"idempotency_key": "ik-amb"})
    assert [event["identifier"] for event in emulator.meter_events()] == ["mtr_amb"]
    with pytest.raises(stripe.InvalidRequestError) as resent:  # a fresh key: the identifier gives it away
        send(client, customer, "mtr_amb", "3")
    assert resent.value.user_message == "An event already exists with identifier mtr_amb."
    with pytest.raises(stripe.APIError) as replayed:  # the same key: the saved 500, as Stripe replays it
        client.v1.billing.meter_events.create(
            {"event_name": EVENT_NAME, "identifier": "mtr_amb", "payload": {"stripe_customer_id": customer,
                                                                             "value": "3"}},
            {"idempotency_key": "ik-amb"})
    assert replayed.value.http_status == 500 and replayed.value.headers.get("idempotent-replayed") == "true"
    assert emulator.meter_event_log()["count"] == 1


def test_injected_429_and_delay(emulator, client, account):
    emulator.fail_next(2, status=429)
    for _ in range(2):
        with pytest.raises(stripe.RateLimitError):
            client.v1.customers.list()
    emulator.delay(150)
    started = time.monotonic()
    client.v1.customers.list()
    assert time.monotonic() - started >= 0.15
    assert emulator.calls()["GET /v1/customers"] == 3


def test_concurrent_v1_calls_for_one_customer_get_429(emulator, account):
    first, second = account["customer"].id, emulator.client().v1.customers.create({"name": "Bob"}).id
    emulator.delay(300)
    client = emulator.client()

    async def send_async(customer: str, identifier: str):
        return await client.v1.billing.meter_events.create_async(
            {"event_name": EVENT_NAME, "identifier": identifier,
             "payload": {"stripe_customer_id": customer, "value": "1"}})

    async def both_phases():  # one event loop: the SDK's async HTTP client belongs to the loop it started on
        same = await asyncio.gather(send_async(first, "mtr_s1"), send_async(first, "mtr_s2"), return_exceptions=True)
        different = await asyncio.gather(send_async(first, "mtr_d1"), send_async(second, "mtr_d2"),
                                         return_exceptions=True)
        return same, different

    same, different = asyncio.run(both_phases())
    assert sorted(type(outcome).__name__ for outcome in same) == ["MeterEvent", "RateLimitError"]
    [refused] = [outcome for outcome in same if isinstance(outcome, Exception)]
    assert (refused.http_status, refused.json_body["error"]["code"]) == (429, "rate_limit")
    assert not any(isinstance(outcome, Exception) for outcome in different), different
    assert emulator.meter_event_log()["count"] == 3


def test_unknown_paths_answer_in_stripe_error_shape(emulator):
    response = httpx.post(f"{emulator.base_url}/v1/charges", headers={"Authorization": "Bearer sk_test_x"})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_webhook_sender_retries_until_delivered_and_logs_each_attempt():
    with receiving(WebhookReceiver(WEBHOOK_SECRET, failures=1)) as receiver:
        sender = WebhookSender(receiver.url, WEBHOOK_SECRET, retry_delays=(0.01, 0.01))
        sender.publish({"id": "evt_1", "object": "event", "type": "invoice.created", "data": {"object": {}}})
        deadline = time.monotonic() + 5
        while len(sender.deliveries()) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await sender.aclose()
    assert [(attempt["attempt"], attempt["status"]) for attempt in sender.deliveries()] == [(1, 500), (2, 200)]
    [first, second] = receiver.received
    assert first[0] == second[0]  # the same event, re-signed
    assert stripe.Webhook.construct_event(second[0], second[1], WEBHOOK_SECRET).id == "evt_1"


def summaries(client: stripe.StripeClient, account, start: int, end: int, **extra) -> list[int]:
    """The aggregated values of the customer's summaries in [start, end), every page of them."""
    pages = client.v1.billing.meters.event_summaries.list(account["meter"].id, {
        "customer": account["customer"].id, "start_time": start, "end_time": end, **extra})
    return [summary.aggregated_value for summary in pages.auto_paging_iter()]


def test_hourly_summaries_add_up_what_was_sent_in_each_hour_across_pages(client, account):
    customer = account["customer"].id
    now = int(time.time())
    hour = now - now % 3600
    sent = [(hour - 7200 + 10, "5"), (hour - 7200 + 3599, "7"), (hour - 3600, "11"), (hour, "13"), (now, "17")]
    for index, (timestamp, value) in enumerate(sent):
        send(client, customer, f"mtr_hourly_{index}", value, timestamp=timestamp)
    hourly = summaries(client, account, hour - 3 * 3600, hour + 3600, value_grouping_window="hour", limit=2)
    assert hourly == [0, 12, 11, 30]  # oldest hour first, the SDK following `starting_after` across pages
    day = now - now % 86_400
    daily = summaries(client, account, day - 86_400, day + 86_400, value_grouping_window="day")
    assert sum(daily) == 53 and len(daily) == 2


@pytest.mark.parametrize(("window", "start_shift", "end_shift", "param", "unit"), [
    ("hour", 60, 3600, "start_time", "hour"),
    ("hour", 0, 3660, "end_time", "hour"),
    ("day", 3600, 86_400, "start_time", "day"),
    ("day", 0, 86_400 + 3600, "end_time", "day"),
])
def test_summary_bounds_off_the_grouping_window_are_refused_naming_the_param(client, account, window, start_shift,
                                                                             end_shift, param, unit):
    day = int(time.time()) // 86_400 * 86_400
    with pytest.raises(stripe.InvalidRequestError) as refused:
        summaries(client, account, day + start_shift, day + end_shift, value_grouping_window=window)
    assert (refused.value.http_status, refused.value.param) == (400, param)
    assert refused.value.user_message.startswith(f"{param} must be aligned with {unit} boundaries")
    assert refused.value.user_message.endswith(f"when value_grouping_window is {window}.")
    assert summaries(client, account, day + start_shift, day + end_shift) == [0]  # no grouping: minutes are enough


def test_summaries_lag_behind_recent_events_but_invoices_do_not(emulator, client, account):
    customer, now = account["customer"].id, int(time.time())
    hour = now - now % 3600
    emulator.set_summary_lag(300)
    assert httpx.get(f"{emulator.base_url}/_emulator/summary_lag").json() == {"seconds": 300}
    send(client, customer, "mtr_lagging", "9", timestamp=now)
    emulator.advance_clock(100)
    assert summaries(client, account, hour, hour + 3600) == [0]  # received 100 s ago: not summarized yet
    preview = client.v1.invoices.create_preview({"customer": customer, "subscription": account["subscription"].id})
    quantities = {line.pricing.price_details.price: line.quantity for line in preview.lines.data}
    assert quantities[account["usage_price"].id] == 9  # invoices count what was recorded, lag or not
    emulator.advance_clock(200)
    assert summaries(client, account, hour, hour + 3600) == [9]
    emulator.reset()
    assert httpx.get(f"{emulator.base_url}/_emulator/summary_lag").json() == {"seconds": 0}
    refused = httpx.post(f"{emulator.base_url}/_emulator/summary_lag", json={"seconds": -1})
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "seconds")


def test_a_forgotten_event_leaves_the_summaries_and_its_identifier_counts_once_when_resent(emulator, client, account):
    customer, now = account["customer"].id, int(time.time())
    hour = now - now % 3600
    send(client, customer, "mtr_lost", "5", timestamp=now)
    send(client, customer, "mtr_kept", "7", timestamp=now)
    forgotten = emulator.forget_meter_event("mtr_lost")
    assert (forgotten["identifier"], forgotten["forgotten"]) == ("mtr_lost", True)
    assert summaries(client, account, hour, hour + 3600) == [7]
    send(client, customer, "mtr_lost", "5", timestamp=now)  # free again: recorded, not refused as a duplicate
    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        send(client, customer, "mtr_lost", "5", timestamp=now)
    assert duplicate.value.user_message == "An event already exists with identifier mtr_lost."
    assert summaries(client, account, hour, hour + 3600) == [12]
    log = emulator.meter_event_log()
    assert [(event["identifier"], event["forgotten"]) for event in log["events"]] == [
        ("mtr_lost", True), ("mtr_kept", False), ("mtr_lost", False)]
    assert (log["count"], log["forgotten"], log["duplicates"]) == (3, 1, 1)
    with pytest.raises(httpx.HTTPStatusError) as unknown:
        emulator.forget_meter_event("mtr_never_sent")
    assert unknown.value.response.status_code == 404
    assert unknown.value.response.json()["error"]["param"] == "identifier"
