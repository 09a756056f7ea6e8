"""Subscription schedules: a subscription's planned changes, as phases that take effect at its renewals.

What meterline uses (`meterline migrate schedule`): ``POST /v1/subscription_schedules {from_subscription}``
puts a live subscription under a schedule whose one phase is the subscription as it is until its current
period ends (`end_behavior` ``release``, as Stripe makes it); ``POST /v1/subscription_schedules/{id}
{phases, end_behavior}`` replaces the phases (past phases may be left out; the current phase's start
cannot move; each phase starts where the one before ends); retrieve and list.

At a renewal (`Catalog.renew` calls `at_renewal` before it announces the new period) the phase holding the
new period's start is entered: the subscription's items become that phase's prices (an item whose price
stays keeps its id and so its invoice line), and the renewal's ``customer.subscription.updated`` carries
them. When the last phase ends the schedule is done: with ``release`` it turns ``released``, the
subscription leaves it (`schedule` null, `released_subscription` set) and goes on with the last phase's items.

The emulator's periods are calendar months (UTC) and phases change only at renewals, so every phase
boundary must be a month boundary; a phase given neither `end_date` nor `duration` lasts one period
(Stripe's default of one iteration). No prorations, trials or discounts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from plugin.stripe.emulator.catalog import Catalog, current_period
from plugin.stripe.emulator.clock import month_period
from plugin.stripe.emulator.errors import ApiError
from plugin.stripe.emulator.forms import InvalidParam, Params
from plugin.stripe.emulator.store import LIST_PARAMS, Store, new_id

END_BEHAVIORS = ("release",)
"""What the emulator does when a schedule ends (Stripe also knows `cancel`; meterline never asks for it)."""
UPDATABLE = ("not_started", "active")


class Schedules:
    """Subscription schedules over the catalog's subscriptions."""

    def __init__(self, store: Store, catalog: Catalog):
        self.store = store
        self.catalog = catalog

    # -------------------------------------------------------------------------- the API

    def create_schedule(self, params: Params) -> dict[str, Any]:
        """``POST /v1/subscription_schedules`` with `from_subscription` (the only way the emulator makes one):
        one phase, the subscription's items, from its current period's start to its end."""
        params.only("from_subscription", "metadata")
        subscription_id = params.text("from_subscription", required=True)
        subscription = self.store.find("subscription", subscription_id)
        if subscription is None:
            raise ApiError(400, f"No such subscription: '{subscription_id}'", code="resource_missing",
                           param="from_subscription")
        if subscription.get("schedule"):
            raise InvalidParam(f"The subscription {subscription_id} is already managed by the subscription schedule "
                               f"{subscription['schedule']}.", "from_subscription")
        if subscription["status"] not in ("active", "trialing", "past_due"):
            raise InvalidParam(f"The subscription {subscription_id} is {subscription['status']}: only a live "
                               "subscription can be put under a schedule.", "from_subscription")
        start, end = current_period(subscription)
        items = [{"price": item["price"]["id"], "quantity": item.get("quantity")}
                 for item in subscription["items"]["data"]]
        now = self.store.now()
        schedule = self.store.add("subscription_schedule", {
            "id": new_id("sub_sched"), "object": "subscription_schedule", "application": None,
            "billing_mode": {"type": "classic", "flexible": None, "updated_at": None},
            "canceled_at": None, "completed_at": None, "created": now, "current_phase": None,
            "customer": subscription["customer"], "customer_account": None,
            "default_settings": _default_settings(subscription), "end_behavior": "release", "livemode": False,
            "metadata": params.strings("metadata"), "pause_schedules": [],
            "phases": [_phase(start, end, items, subscription["currency"])], "released_at": None,
            "released_subscription": None, "status": "active", "subscription": subscription_id, "test_clock": None,
        })
        _set_current(schedule, start, end)
        subscription["schedule"] = schedule["id"]
        self.store.emit("subscription_schedule.created", schedule)
        return schedule

    def update_schedule(self, schedule_id: str, params: Params) -> dict[str, Any]:
        """``POST /v1/subscription_schedules/{id}``: new phases (the current one first) and end behavior."""
        params.only("phases", "end_behavior", "metadata", "proration_behavior")
        schedule = self.store.get("subscription_schedule", schedule_id)
        if schedule["status"] not in UPDATABLE:
            raise ApiError(400, f"You cannot update a subscription schedule that is currently in the "
                           f"`{schedule['status']}` status. It must be in one of: {', '.join(UPDATABLE)}.")
        params.text("proration_behavior", choices=("always_invoice", "create_prorations", "none"))
        end_behavior = params.text("end_behavior", choices=END_BEHAVIORS)
        phases = params.children("phases")
        if params.has("phases") and not phases:
            raise InvalidParam("A subscription schedule needs at least one phase.", "phases")
        if phases:
            schedule["phases"] = self._phases(schedule, phases)
        if end_behavior is not None:
            schedule["end_behavior"] = end_behavior
        if params.has("metadata"):
            schedule["metadata"] = {**schedule["metadata"], **params.strings("metadata")}
        self.store.emit("subscription_schedule.updated", schedule)
        return schedule

    def list_schedules(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "customer")
        customer = params.text("customer")
        return self.store.page("subscription_schedule", params,
                               lambda schedule: customer in (None, schedule["customer"]))

    # -------------------------------------------------------------------------- the renewal hook

    def at_renewal(self, subscription: dict[str, Any], period: tuple[int, int]) -> None:
        """The subscription starts `period`: enter the schedule's phase that holds its start, or end the
        schedule when its last phase is over. Called by `Catalog.renew` before it announces the period."""
        schedule_id = subscription.get("schedule")
        schedule = None if schedule_id is None else self.store.find("subscription_schedule", schedule_id)
        if schedule is None or schedule["status"] != "active":
            return
        start = period[0]
        phase = next((phase for phase in schedule["phases"] if phase["start_date"] <= start < phase["end_date"]), None)
        if phase is None:
            self._release(schedule, subscription)
            return
        if schedule["current_phase"]["start_date"] != phase["start_date"]:
            self._enter(subscription, phase, period)
            _set_current(schedule, phase["start_date"], phase["end_date"])
            self.store.emit("subscription_schedule.updated", schedule)

    def _enter(self, subscription: dict[str, Any], phase: dict[str, Any], period: tuple[int, int]) -> None:
        """The subscription's items become the phase's: a price it already has keeps its item."""
        present = {item["price"]["id"]: item for item in subscription["items"]["data"]}
        items = []
        for wanted in phase["items"]:
            kept = present.get(wanted["price"])
            if kept is None:
                kept = self.catalog.subscription_item(Params(_item_params(wanted)), subscription["id"],
                                                      self.store.now(), period)
            elif "quantity" in kept and wanted["quantity"] is not None:
                kept["quantity"] = wanted["quantity"]
            items.append(kept)
        # a new list: the renewal's draft for the period that just closed still holds the old one
        subscription["items"]["data"] = items
        subscription["items"]["total_count"] = len(items)

    def _release(self, schedule: dict[str, Any], subscription: dict[str, Any]) -> None:
        """`release`: the schedule lets go of the subscription, which keeps its (last phase's) items."""
        schedule.update(status="released", released_at=schedule["phases"][-1]["end_date"],
                        released_subscription=subscription["id"], subscription=None, current_phase=None)
        subscription["schedule"] = None
        self.store.emit("subscription_schedule.released", schedule)

    # -------------------------------------------------------------------------- reading phases

    def _phases(self, schedule: dict[str, Any], given: list[Params]) -> list[dict[str, Any]]:
        """The phases as given, checked: the first is the current phase (same start), each starts where the
        one before ends, every boundary is a renewal (a month boundary), the current one ends in the future."""
        current = schedule["current_phase"]
        previous_end = current["start_date"] if current is not None else None
        subscription = self.store.get("subscription", schedule["subscription"])
        phases = []
        for index, phase in enumerate(given):
            phase.only("items", "start_date", "end_date", "duration", "metadata", "proration_behavior")
            start = phase.integer("start_date", minimum=0)
            if start is None:
                start = previous_end
            if start is None:
                raise InvalidParam("Missing required param: phases[0][start_date].", phase.name("start_date"),
                                   "parameter_missing")
            if index == 0 and current is not None and start != current["start_date"]:
                raise InvalidParam("You can not modify the start date of the current phase.", phase.name("start_date"))
            if index > 0 and start != previous_end:
                raise InvalidParam(f"{phase.name('start_date')} must equal the end_date of the phase before it "
                                   f"({previous_end}).", phase.name("start_date"))
            end = self._end_date(phase, start)
            if index == 0 and end <= self.store.now():
                raise InvalidParam("The current phase must end in the future.", phase.name("end_date"))
            items = [self._item(item, subscription) for item in phase.children("items", required=True)]
            phases.append(_phase(start, end, items, subscription["currency"], phase.strings("metadata")))
            previous_end = end
        return phases

    def _end_date(self, phase: Params, start: int) -> int:
        end = phase.integer("end_date", minimum=0)
        duration = phase.child("duration")
        if end is not None and duration is not None:
            raise InvalidParam("You may only specify one of these parameters: end_date, duration.",
                               phase.name("end_date"), "parameters_exclusive")
        if end is None:
            duration = duration.only("interval", "interval_count") if duration is not None else None
            if duration is not None:
                duration.text("interval", required=True, choices=("month",))
            months = 1 if duration is None else duration.integer("interval_count", minimum=1) or 1
            end = start
            for _ in range(months):
                end = month_period(end)[1]
        if end <= start:
            raise InvalidParam(f"{phase.name('end_date')} must be after the phase's start_date.",
                               phase.name("end_date"))
        if month_period(end)[0] != end:
            moment = datetime.fromtimestamp(end, UTC).isoformat()
            raise InvalidParam(f"{phase.name('end_date')} ({moment}) is not a renewal: the emulator's periods are "
                               "calendar months (UTC), and phases change at renewals only.", phase.name("end_date"))
        return end

    def _item(self, item: Params, subscription: dict[str, Any]) -> dict[str, Any]:
        """A phase's item, checked as a subscription item would be (a recurring price; no quantity if metered)."""
        made = self.catalog.subscription_item(item, subscription["id"], self.store.now(), current_period(subscription))
        return {"price": made["price"]["id"], "quantity": made.get("quantity")}


def _item_params(item: dict[str, Any]) -> dict[str, Any]:
    return {"price": item["price"]} | ({} if item["quantity"] is None else {"quantity": item["quantity"]})


def _phase(start: int, end: int, items: list[dict[str, Any]], currency: str,
           metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """A phase as Stripe shows it (`SubscriptionSchedule.Phase`)."""
    return {
        "add_invoice_items": [], "application_fee_percent": None, "automatic_tax": None,
        "billing_cycle_anchor": None, "billing_thresholds": None, "collection_method": None, "currency": currency,
        "default_payment_method": None, "default_tax_rates": [], "description": None, "discounts": [],
        "end_date": end, "invoice_settings": None,
        "items": [{"billing_thresholds": None, "discounts": [], "metadata": {}, "plan": item["price"],
                   "price": item["price"], "quantity": item["quantity"], "tax_rates": []} for item in items],
        "metadata": metadata or {}, "on_behalf_of": None, "proration_behavior": "create_prorations",
        "start_date": start, "transfer_data": None, "trial_end": None,
    }


def _set_current(schedule: dict[str, Any], start: int, end: int) -> None:
    schedule["current_phase"] = {"start_date": start, "end_date": end}


def _default_settings(subscription: dict[str, Any]) -> dict[str, Any]:
    return {
        "application_fee_percent": None,
        "automatic_tax": {"enabled": False, "disabled_reason": None, "liability": None},
        "billing_cycle_anchor": "automatic", "billing_thresholds": None,
        "collection_method": subscription["collection_method"], "default_payment_method": None,
        "description": None,
        "invoice_settings": {"account_tax_ids": None, "days_until_due": subscription["days_until_due"],
                             "issuer": {"type": "self", "account": None}},
        "on_behalf_of": None, "transfer_data": None,
    }
