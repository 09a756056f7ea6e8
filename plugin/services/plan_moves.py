"""Moving one customer off its flat plan (DESIGN "Contract: migration and pricing operations"): what
`meterline migrate grandfather|schedule` and the Stripe webhook route share.

- Grandfathering keeps a customer on its flat plan for good: `Meterline.plan_of` makes its plan
  unmetered, so its calls are in the ledger (visibility) but never sent to the sink, never billed
  overage and never refused by an overage block; its plan's cap and its own hard limit still hold.
- A schedule moves a customer to a metered plan at its next renewal, through a Stripe subscription
  schedule (two calls: from its subscription, then the current phase until the period ends followed by
  the new plan's prices, released at the end). meterline's plan changes when Stripe's
  `customer.subscription.updated` shows the new prices (plugin/services/invoices.follow_subscription),
  which is when the move is recorded as done (`migrated_at`).
- The first-invoice safety credit: the first draft of its metered billing (the first `invoice.created`
  whose period starts at or after the move) above `policies.safety_credit_pct` of its old flat price gets
  a negative invoice item for the difference on that draft and one `safety_credit` alert. Looked at once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import stripe

from plugin.ledger import plan_moves as moves
from plugin.rules.invoices import dollars
from plugin.rules.plan_moves import safety_cap_cents, safety_credit_cents
from plugin.runtime import Meterline, stripe_config
from plugin.services.usage import UnknownCustomer, profile_of
from plugin.settings import decimal_text
from plugin.stripe.setup import StripeSetup

SAFETY_ALERT = moves.SAFETY_ALERT
LIVE = ("active", "trialing", "past_due")


class MoveRefused(ValueError):
    """A move meterline will not make (the message says why and what to do); nothing was changed."""


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _known(meterline: Meterline, customer_id: str) -> moves.MoveState:
    found = moves.state(meterline.engine, customer_id)
    if found is None:
        raise UnknownCustomer(customer_id)
    return found


def grandfather(meterline: Meterline, customer_id: str, now: datetime) -> dict[str, Any]:
    """Keep the customer on its flat plan for good; a second call keeps the first date (`already`)."""
    before = _known(meterline, customer_id)
    if before.scheduled_plan is not None:
        raise MoveRefused(f"{customer_id} is scheduled to move to plan {before.scheduled_plan} at its next renewal "
                          f"(Stripe schedule {before.schedule_id}): release that schedule at Stripe first")
    moves.grandfather(meterline.engine, customer_id, now)
    meterline.directory.forget(customer_id)  # this process meters it as grandfathered at once
    after = _known(meterline, customer_id)
    return {"customer_id": customer_id, "plan": after.plan, "grandfathered_at": _iso(after.grandfathered_at),
            "already": before.grandfathered_at is not None}


def schedule(meterline: Meterline, customer_id: str, to_plan: str, *, flat_usd: Fraction | None = None,
             client: stripe.StripeClient | None = None) -> dict[str, Any]:
    """Move the customer to `to_plan` at its next renewal through a Stripe subscription schedule, and record
    the flat price it paid until then (its plan's base fee unless `flat_usd` says otherwise).
    MoveRefused when the move cannot be made; stripe errors as the SDK raises them."""
    state = _known(meterline, customer_id)
    if to_plan not in meterline.config.plans:
        raise MoveRefused(f"unknown plan {to_plan!r}")
    if state.grandfathered_at is not None:
        raise MoveRefused(f"{customer_id} is grandfathered on its flat plan since "
                          f"{state.grandfathered_at.date().isoformat()}: it is not moved")
    if to_plan == state.plan:
        raise MoveRefused(f"{customer_id} is already on plan {to_plan}")
    if state.scheduled_plan is not None:
        raise MoveRefused(f"{customer_id} is already scheduled to move to plan {state.scheduled_plan} "
                          f"(Stripe schedule {state.schedule_id})")
    if state.stripe_customer_id is None:
        raise MoveRefused(f"{customer_id} has no Stripe customer: a move at its renewal needs its subscription")
    flat = flat_usd if flat_usd is not None else meterline.plan_of(profile_of(meterline, customer_id)).base_fee_usd
    if not flat:
        raise MoveRefused(f"plan {state.plan} has no flat price: give --flat-usd, what {customer_id} pays a month "
                          "now (the first metered invoice's safety credit is measured against it)")
    client = client or stripe_config(meterline.settings, meterline.config).client()
    new_prices = StripeSetup(client, meterline.config).plan_prices(to_plan)  # ConfigError before any change
    subscription = _live_subscription(client, state.stripe_customer_id, customer_id)
    made = _schedule_of(client, subscription)
    current = next(phase for phase in made.phases if phase.start_date == made.current_phase.start_date)
    kept = [{"price": _id(item.price)} | ({} if item.quantity is None else {"quantity": item.quantity})
            for item in current["items"]]
    moved = [{"price": price.id} | ({"quantity": 1} if spec.kind == "base" else {}) for spec, price in new_prices]
    updated = client.v1.subscription_schedules.update(made.id, {
        "phases": [{"start_date": current.start_date, "end_date": current.end_date, "items": kept},
                   {"items": moved, "metadata": {"meterline_plan": to_plan}}],
        "end_behavior": "release", "metadata": {"meterline_customer": customer_id, "meterline_plan": to_plan}})
    moves.record_schedule(meterline.engine, customer_id, to_plan, updated.id, decimal_text(flat))
    return {"customer_id": customer_id, "from_plan": state.plan, "to_plan": to_plan, "schedule_id": updated.id,
            "subscription_id": subscription.id,
            "effective_at": datetime.fromtimestamp(current.end_date, UTC).isoformat(),
            "flat_usd": decimal_text(flat),
            "safety_credit_pct": decimal_text(meterline.config.policies.safety_credit_pct)}


def _id(field: Any) -> str:
    """A price field, expanded or not."""
    return field if isinstance(field, str) else field.id


def _live_subscription(client: stripe.StripeClient, stripe_customer_id: str, customer_id: str) -> stripe.Subscription:
    live = [subscription for subscription in client.v1.subscriptions.list(
        {"customer": stripe_customer_id, "limit": 100}).auto_paging_iter() if subscription.status in LIVE]
    if not live:
        raise MoveRefused(f"{customer_id} has no live subscription at Stripe ({stripe_customer_id}) to move")
    return live[0]


def _schedule_of(client: stripe.StripeClient, subscription: stripe.Subscription) -> stripe.SubscriptionSchedule:
    """The subscription's schedule: a new one from it, or the one a previous try made (a single phase, as
    `from_subscription` makes it); another schedule's phases are someone else's plan, never overwritten."""
    existing = getattr(subscription, "schedule", None)
    if not existing:
        return client.v1.subscription_schedules.create({"from_subscription": subscription.id})
    found = client.v1.subscription_schedules.retrieve(_id(existing))
    if len(found.phases) > 1:
        raise MoveRefused(f"subscription {subscription.id} already follows Stripe schedule {found.id} with "
                          f"{len(found.phases)} phases: release it at Stripe first")
    return found


def arrived(meterline: Meterline, customer_id: str, plan: str | None, started: datetime | None) -> bool:
    """Stripe's subscription now carries `plan`'s prices from `started`: if that is the scheduled move, it is
    done (`migrated_at`). Called by the webhook's `customer.subscription.updated`."""
    state = moves.state(meterline.engine, customer_id)
    if state is None or plan is None or started is None or state.scheduled_plan != plan:
        return False
    return moves.record_arrival(meterline.engine, customer_id, started)


def safety_credit(meterline: Meterline, draft: dict[str, Any], client: stripe.StripeClient | None) -> dict[str, Any]:
    """On `invoice.created`: the first metered invoice of a migrated customer, above the cap, gets a credit
    for the difference on that draft, and one alert; looked at once, credit or not. Retry-safe: the
    invoice item is created before anything is recorded, under an idempotency key named after the invoice,
    so a redelivery after a failure replays it (Stripe keeps keys 24 h). The answer says what was done
    (`safety_credit_cents`, 0 when the invoice was not above the cap); {} when it was not looked at."""
    if draft.get("status") != "draft":
        return {}
    engine = meterline.engine
    state = moves.state_of_stripe(engine, str(draft["customer"]))
    if state is None or state.migrated_at is None or state.flat_usd is None:
        return {}
    invoice_id = str(draft["id"])
    started = datetime.fromtimestamp(int(draft["period_start"]), UTC)
    if started < state.migrated_at or state.first_metered_invoice is not None:
        return {}  # still the flat plan's period, or its first metered invoice was looked at already
    cap_pct = meterline.config.policies.safety_credit_pct
    total = int(draft["total"])
    cents = safety_credit_cents(total, state.flat_usd, cap_pct)
    if cents:
        client = client or stripe_config(meterline.settings, meterline.config).client()
        client.v1.invoice_items.create({
            "customer": draft["customer"], "invoice": invoice_id, "amount": -cents,
            "currency": str(draft.get("currency") or "usd"),
            "description": f"First metered invoice capped at {decimal_text(cap_pct)}% of the former flat price "
                           f"(${decimal_text(state.flat_usd)} a month)"},
            {"idempotency_key": f"meterline-safety-credit-{invoice_id}"})
    alert = None if not cents else (
        f"{state.customer_id}: its first metered invoice {invoice_id} was drafted at {dollars(total)}, above "
        f"{decimal_text(cap_pct)}% of its former flat price ${decimal_text(state.flat_usd)} "
        f"({dollars(safety_cap_cents(state.flat_usd, cap_pct))}): credited {dollars(cents)} on the draft, which "
        f"now totals {dollars(total - cents)}.")
    if not moves.record_first_invoice(engine, state.customer_id, invoice_id, alert):
        return {}  # another delivery looked at it a moment ago (the same invoice item: same idempotency key)
    return {"safety_credit_cents": cents}
