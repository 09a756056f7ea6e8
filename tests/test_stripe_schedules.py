"""Subscription schedules in the emulator, through the unmodified stripe SDK and signed webhooks: the two
calls `meterline migrate schedule` makes (from_subscription, then the phases), the move at the renewal on
the emulator's clock and not before, the closed period billed with the prices it had, the release when
the last phase ends, snapshot and thin events, and Stripe's refusals."""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from plugin.stripe.emulator.clock import month_period

WEBHOOK_SECRET = "whsec_meterline_schedules"
FLAT = 9900
BASE = 2000
DAY = 86_400


@pytest.fixture
def client(emulator) -> stripe.StripeClient:
    return emulator.client()


@pytest.fixture
def account(client) -> dict[str, Any]:
    """A customer on a flat $99 price, and the metered plan's two prices (a $20 base and usage at 0.0001 ¢/unit)."""
    customer = client.v1.customers.create({"name": "Flat Co"})
    product = client.v1.products.create({"name": "meterline credits"})
    meter = client.v1.billing.meters.create({"display_name": "credits", "event_name": "meterline_credits",
                                             "default_aggregation": {"formula": "sum"}})
    flat = client.v1.prices.create({"product": product.id, "currency": "usd", "unit_amount": FLAT,
                                    "recurring": {"interval": "month"}, "lookup_key": "meterline_legacy_base"})
    base = client.v1.prices.create({"product": product.id, "currency": "usd", "unit_amount": BASE,
                                    "recurring": {"interval": "month"}, "lookup_key": "meterline_pro_base"})
    usage = client.v1.prices.create({
        "product": product.id, "currency": "usd", "billing_scheme": "tiered", "tiers_mode": "graduated",
        "tiers": [{"up_to": "inf", "unit_amount_decimal": "0.0001"}], "lookup_key": "meterline_pro_usage",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id}})
    subscription = client.v1.subscriptions.create({"customer": customer.id, "items": [{"price": flat.id,
                                                                                         "quantity": 1}]})
    item = subscription["items"].data[0]
    return {"customer": customer.id, "flat": flat.id, "base": base.id, "usage": usage.id,
            "subscription": subscription.id, "period": (item.current_period_start, item.current_period_end)}


def scheduled(client: stripe.StripeClient, account: dict[str, Any]) -> stripe.SubscriptionSchedule:
    """What `meterline migrate schedule` does: from the subscription, then its phase and the new plan's prices."""
    made = client.v1.subscription_schedules.create({"from_subscription": account["subscription"]})
    current = made.phases[0]
    return client.v1.subscription_schedules.update(made.id, {
        "phases": [{"start_date": current.start_date, "end_date": current.end_date,
                    "items": [{"price": item.price, "quantity": item.quantity} for item in current["items"]]},
                   {"items": [{"price": account["base"], "quantity": 1}, {"price": account["usage"]}]}],
        "end_behavior": "release"})


def prices(client: stripe.StripeClient, subscription: str) -> set[str]:
    return {item.price.id for item in client.v1.subscriptions.retrieve(subscription)["items"].data}


def test_from_subscription_makes_one_phase_until_the_period_ends(client, account):
    start, end = account["period"]
    made = client.v1.subscription_schedules.create({"from_subscription": account["subscription"]})
    assert isinstance(made, stripe.SubscriptionSchedule)
    assert (made.status, made.end_behavior, made.subscription, made.customer) == (
        "active", "release", account["subscription"], account["customer"])
    assert (made.current_phase.start_date, made.current_phase.end_date) == (start, end)
    [phase] = made.phases
    assert [(item.price, item.quantity) for item in phase["items"]] == [(account["flat"], 1)]
    assert client.v1.subscriptions.retrieve(account["subscription"]).schedule == made.id
    assert client.v1.subscription_schedules.retrieve(made.id).phases[0].end_date == end
    assert [s.id for s in client.v1.subscription_schedules.list({"customer": account["customer"]}).data] == [made.id]
    with pytest.raises(stripe.InvalidRequestError, match="already managed"):
        client.v1.subscription_schedules.create({"from_subscription": account["subscription"]})


def test_the_move_happens_at_the_renewal_and_not_before(emulator, client, account, receiver):
    start, end = account["period"]
    schedule = scheduled(client, account)
    assert [(phase.start_date, phase.end_date) for phase in schedule.phases] == [
        (start, end), (end, month_period(end)[1])]
    assert [item.price for item in schedule.phases[1]["items"]] == [account["base"], account["usage"]]

    emulator.advance_clock_to(end - 1)
    assert prices(client, account["subscription"]) == {account["flat"]}  # not before
    assert client.v1.subscription_schedules.retrieve(schedule.id).current_phase.start_date == start

    emulator.advance_clock_to(end)  # the renewal: the second phase starts
    assert prices(client, account["subscription"]) == {account["base"], account["usage"]}
    now = client.v1.subscription_schedules.retrieve(schedule.id)
    assert (now.status, now.current_phase.start_date) == ("active", end)
    [closed] = client.v1.invoices.list({"subscription": account["subscription"]}).data
    assert (closed.period_start, closed.period_end, closed.total) == (start, end, FLAT)  # billed as it was
    updates = receiver.events("customer.subscription.updated")
    assert [{item.price.id for item in update.data.object["items"].data} for update in updates] == [
        {account["base"], account["usage"]}]  # one announcement, with the new prices

    emulator.advance_clock_to(end + DAY)
    emulator.client().v1.billing.meter_events.create({
        "event_name": "meterline_credits", "identifier": "used-1", "timestamp": end + 60,
        "payload": {"stripe_customer_id": account["customer"], "value": "3000000"}})
    second_end = month_period(end)[1]
    emulator.advance_clock_to(second_end)  # the last phase ends: released, the new prices stay
    released = client.v1.subscription_schedules.retrieve(schedule.id)
    assert (released.status, released.subscription, released.released_subscription, released.released_at) == (
        "released", None, account["subscription"], second_end)
    assert released.current_phase is None
    subscription = client.v1.subscriptions.retrieve(account["subscription"])
    assert subscription.schedule is None and prices(client, account["subscription"]) == {account["base"],
                                                                                          account["usage"]}
    first_metered = client.v1.invoices.list({"subscription": account["subscription"]}).data[0]
    assert (first_metered.period_start, first_metered.total) == (end, BASE + 300)
    assert [event.type for event in receiver.events("subscription_schedule.released")] == [
        "subscription_schedule.released"]


def test_thin_events_name_the_subscription_which_the_sdk_fetches_as_it_now_is(emulator, client, account, receiver):
    emulator.set_webhook_mode("thin")
    scheduled(client, account)
    emulator.advance_clock_to(account["period"][1])
    [notification] = receiver.notifications(client, "v1.customer.subscription.updated")
    fetched = notification.fetch_related_object()
    assert isinstance(fetched, stripe.Subscription)
    assert {item.price.id for item in fetched["items"].data} == {account["base"], account["usage"]}


@pytest.mark.parametrize("phases, message", [
    ([{"start_date": 1, "items": [{"price": "P"}]}], "start date of the current phase"),
    ([{"items": [{"price": "F", "quantity": 1}], "end_date": "MID"}], "not a renewal"),
    ([{"items": [{"price": "F", "quantity": 1}]}, {"start_date": 5, "items": [{"price": "B", "quantity": 1}]}],
     "must equal the end_date"),
    ([{"items": [{"price": "F", "quantity": 1}]}, {"items": [{"price": "U", "quantity": 2}]}],
     "Quantity should not be specified"),
    ([{"items": [{"price": "F", "quantity": 1}]}, {"items": [{"price": "price_nothing"}]}], "No such price"),
])
def test_stripe_refuses_phases_it_cannot_keep(client, account, phases, message):
    names = {"P": account["flat"], "F": account["flat"], "B": account["base"], "U": account["usage"]}
    made = client.v1.subscription_schedules.create({"from_subscription": account["subscription"]})
    for phase in phases:
        for item in phase["items"]:
            item["price"] = names.get(item["price"], item["price"])
        if phase.get("end_date") == "MID":
            phase["end_date"] = account["period"][1] + 3 * DAY
    with pytest.raises(stripe.InvalidRequestError, match=message):
        client.v1.subscription_schedules.update(made.id, {"phases": phases})
    assert len(client.v1.subscription_schedules.retrieve(made.id).phases) == 1  # nothing changed


def test_a_released_schedule_takes_no_more_changes(emulator, client, account):
    made = client.v1.subscription_schedules.create({"from_subscription": account["subscription"]})
    emulator.advance_clock_to(account["period"][1])  # its one phase ends: released, the subscription unchanged
    assert client.v1.subscription_schedules.retrieve(made.id).status == "released"
    assert prices(client, account["subscription"]) == {account["flat"]}
    with pytest.raises(stripe.InvalidRequestError, match="released"):
        client.v1.subscription_schedules.update(made.id, {"end_behavior": "release"})
