"""Stripe's webhooks and meterline's invoices (DESIGN "Contract: Stripe webhooks and invoices"): what
the webhook route, `GET /invoices`, `meterline invoices ...` and the console share.

- Reading an event, snapshot (`stripe.Webhook`-signed `event`) or thin (`v2.core.event`, which only
  names its object: the SDK fetches it), into one `StripeEvent`; each event id is acted on once.
- `invoice.created`: a migrated customer's first-invoice safety credit (plugin/services/plan_moves.py),
  then the spike guard on what is billed (an alert, and with `hold` the draft stops finalizing).
- `invoice.finalized`: recorded, for the guard's next comparison and for the invoices list.
- `customer.subscription.updated`: the customer's billing period and plan follow Stripe's (and a scheduled
  move to a metered plan is recorded as done).
- Meter error reports: v2-stream events Stripe rejected after accepting them become dead letters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import stripe

from plugin.ledger import accounts, invoices, reconciliations, rollups
from plugin.outbox import store as outbox_store
from plugin.rules.invoices import (
    dollars,
    expected_cents,
    is_spike,
    plan_of_lookup_key,
    rise_pct,
    top_names,
)
from plugin.runtime import Meterline, stripe_config
from plugin.services import plan_moves
from plugin.settings import ConfigError
from plugin.stripe.webhooks import (
    METER_ERROR_REPORT_TYPES,
    is_meter_error_report,
    meter_error_report,
)

SPIKE_ALERT = "invoice_spike"
TOLERANCE_SECONDS = 300


class InvoiceRefused(ValueError):
    """An invoice action Stripe would refuse or that makes no sense (not a draft, a bad amount)."""


@dataclass(frozen=True)
class StripeEvent:
    """One webhook event, whichever way Stripe sent it: its id, its type as v1 names it, its object."""

    id: str
    type: str
    object: dict[str, Any]
    raw: dict[str, Any]
    """The event as a dict (the meter error report reader takes the whole event)."""


def read_event(payload: bytes, signature: str | None, secret: str, client: stripe.StripeClient | None
               ) -> StripeEvent:
    """Verify the signature (SignatureVerificationError: nothing is processed), then read the event; a
    thin one is fetched through the SDK (`fetch_event`, `fetch_related_object`), which needs a client
    (ConfigError without STRIPE_API_KEY). ValueError: not a JSON event."""
    text = payload.decode("utf-8", "replace")
    stripe.WebhookSignature.verify_header(text, signature or "", secret, TOLERANCE_SECONDS)
    body = json.loads(text)
    if not isinstance(body, dict):
        raise ValueError("a webhook body is a JSON object")
    if body.get("object") != "v2.core.event":
        data = (body.get("data") or {}).get("object") or {}
        return StripeEvent(str(body.get("id") or ""), str(body.get("type") or ""), data, body)
    if client is None:
        raise ConfigError("a thin Stripe event names its object only: reading it needs STRIPE_API_KEY")
    notification = client.parse_event_notification_without_verification(text)
    kind = notification.type.removeprefix("v1.")
    if notification.type in METER_ERROR_REPORT_TYPES:
        event = notification.fetch_event().to_dict()
        return StripeEvent(notification.id, kind, event.get("data") or {}, event)
    related = notification.fetch_related_object() if getattr(notification, "related_object", None) else None
    found = {} if related is None else related.to_dict()
    return StripeEvent(notification.id, kind, found, {"id": notification.id, "type": kind, "data": {"object": found}})


def handle(meterline: Meterline, event: StripeEvent, client: stripe.StripeClient | None = None) -> dict[str, Any]:
    """Act on an event once (a redelivery changes nothing); what was done, for the route's answer."""
    engine = meterline.engine
    if not invoices.claim_event(engine, event.id, event.type, meterline.clock()):
        return {"received": True, "handled": False, "duplicate": True}
    try:
        done = _dispatch(meterline, event, client)
    except BaseException:
        invoices.release_event(engine, event.id)  # Stripe delivers it again: act then
        raise
    return {"received": True, "handled": done is not None, **(done or {})}


def _dispatch(meterline: Meterline, event: StripeEvent, client: stripe.StripeClient | None) -> dict[str, Any] | None:
    if is_meter_error_report(event.type):
        report = meter_error_report(event.raw | {"type": event.type})
        marked = outbox_store.record_sink_rejections(
            meterline.engine, [(sample.identifier, sample.reason()) for sample in report.samples],
            alert_kind="meter_error_report", alert_subject=report.event_id or event.id,
            alert_message=report.alert_message())
        return {"dead_letters": marked}
    if event.type == "invoice.created":  # a migrated customer's safety credit first: the guard sees what is billed
        credited = plan_moves.safety_credit(meterline, event.object, client)
        draft = event.object
        if credited.get("safety_credit_cents"):
            draft = draft | {"total": int(draft["total"]) - credited["safety_credit_cents"]}
        return credited | spike_guard(meterline, draft, client)
    if event.type == "invoice.finalized":
        record_finalized(meterline, event.object)
        return {"recorded": event.object.get("id")}
    if event.type == "customer.subscription.updated":
        return follow_subscription(meterline, event.object)
    return None


def _client(meterline: Meterline, client: stripe.StripeClient | None) -> stripe.StripeClient:
    return client or stripe_config(meterline.settings, meterline.config).client()


def spike_guard(meterline: Meterline, draft: dict[str, Any], client: stripe.StripeClient | None) -> dict[str, Any]:
    """A draft far above the previous finalized invoice: one `invoice_spike` alert (and a hold)."""
    if draft.get("status") != "draft":
        return {"spike": False, "why": "not a draft"}
    engine = meterline.engine
    stripe_customer, invoice_id, total = str(draft["customer"]), str(draft["id"]), int(draft["total"])
    previous = invoices.previous_finalized(engine, stripe_customer, invoice_id)
    if previous is None:
        client = _client(meterline, client)  # built once: the hold below may call Stripe too
        previous_total = _previous_at_stripe(client, stripe_customer, invoice_id)
    else:
        previous_total = previous["total_cents"]
    policies = meterline.config.policies
    if previous_total is None or not is_spike(previous_total, total, policies.invoice_spike_pct):
        return {"spike": False}
    customer_id = invoices.customer_of(engine, stripe_customer)
    message = (f"{customer_id or stripe_customer}: draft invoice {invoice_id} is {dollars(total)}, the previous "
               f"{dollars(previous_total)} ({dollars(previous_total)} → {dollars(total)}, "
               f"{rise_pct(previous_total, total)}){_culprits(meterline, customer_id, draft)}.")
    held = policies.invoice_spike_action == "hold"
    if held:
        _client(meterline, client).v1.invoices.update(invoice_id, {"auto_advance": False})
        message += f" Held as a draft: `meterline invoices approve {invoice_id}` releases it."
    invoices.record(engine, _row(meterline, draft) | {"held": held})  # the console lists flagged drafts
    reconciliations.alert_once(engine, SPIKE_ALERT, invoice_id, message, customer_id)
    return {"spike": True, "held": held}


def _previous_at_stripe(client: stripe.StripeClient, stripe_customer: str, draft_id: str) -> int | None:
    """The newest finalized invoice Stripe lists for the customer (when meterline recorded none)."""
    for invoice in client.v1.invoices.list({"customer": stripe_customer, "limit": 20}).data:
        if invoice.id != draft_id and invoice.status in invoices.FINALIZED:
            return int(invoice.total)
    return None


def _culprits(meterline: Meterline, customer_id: str | None, draft: dict[str, Any]) -> str:
    """The invoice period's top actions and models from the ledger: where to look first."""
    if customer_id is None or not draft.get("period_start") or not draft.get("period_end"):
        return ""
    used = rollups.breakdown(meterline.engine, customer_id, _moment(draft["period_start"]),
                             _moment(draft["period_end"]))
    actions = top_names({name: tally.credits_ucr for name, tally in used.by["action"].items()})
    models = top_names({name: tally.credits_ucr for name, tally in used.by["model"].items()})
    return f"; top actions {', '.join(actions) or '—'}; top models {', '.join(models) or '—'}"


def record_finalized(meterline: Meterline, invoice: dict[str, Any]) -> None:
    invoices.record(meterline.engine, _row(meterline, invoice) | {"held": False})


def _row(meterline: Meterline, invoice: dict[str, Any]) -> dict[str, Any]:
    """An invoice as the `invoices` table keeps it."""
    stripe_customer = str(invoice["customer"])
    finalized = (invoice.get("status_transitions") or {}).get("finalized_at")
    return {
        "id": str(invoice["id"]), "customer_id": invoices.customer_of(meterline.engine, stripe_customer),
        "stripe_customer_id": stripe_customer, "status": str(invoice.get("status") or "draft"),
        "total_cents": int(invoice["total"]), "currency": str(invoice.get("currency") or "usd"),
        "period_start": _moment(invoice["period_start"]), "period_end": _moment(invoice["period_end"]),
        "finalized_at": _moment(finalized) if finalized else None,
    }


def invoice_rows(meterline: Meterline, customer_id: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """`GET /invoices` and `meterline invoices list`: each recorded invoice with `ledger_cents`, what the
    ledger says its period should total (base fee + overage at the customer's plan), to hold it against."""
    rows = invoices.listed(meterline.engine, customer_id, limit)
    for row in rows:
        row["ledger_cents"] = None
        if row["customer_id"] is not None:
            profile = accounts.load_profile(meterline.engine, row["customer_id"])
            if profile is not None:
                used = rollups.billed_between(meterline.engine, row["customer_id"],
                                              datetime.fromisoformat(row["period_start"]),
                                              datetime.fromisoformat(row["period_end"]))
                row["ledger_cents"] = expected_cents(meterline.plan_of(profile), used)
    return rows


def follow_subscription(meterline: Meterline, subscription: dict[str, Any]) -> dict[str, Any]:
    """The customer's billing period (from its items' current period) and plan (from its prices' lookup keys)."""
    customer_id = invoices.customer_of(meterline.engine, str(subscription.get("customer")))
    items = (subscription.get("items") or {}).get("data") or []
    if customer_id is None or not items:
        return {"followed": False}
    prefix = meterline.config.stripe.lookup_key_prefix
    plans = {plan_of_lookup_key((item.get("price") or {}).get("lookup_key"), prefix) for item in items} - {None}
    plan = next(iter(plans)) if len(plans) == 1 and next(iter(plans)) in meterline.config.plans else None
    start = items[0].get("current_period_start")
    accounts.set_terms(meterline.engine, customer_id, plan=plan, period_anchor=_moment(start) if start else None)
    meterline.directory.forget(customer_id)  # this process sees the new period and plan at once
    moved = plan_moves.arrived(meterline, customer_id, plan, _moment(start) if start else None)
    return {"followed": True, "plan": plan} | ({"migrated": True} if moved else {})


def approve(meterline: Meterline, invoice_id: str, client: stripe.StripeClient | None = None) -> dict[str, Any]:
    """Release a held draft: it finalizes on Stripe's schedule again."""
    client = _client(meterline, client)
    _draft(client, invoice_id)
    released = client.v1.invoices.update(invoice_id, {"auto_advance": True})
    invoices.set_held(meterline.engine, invoice_id, False)
    return {"id": released.id, "status": released.status, "auto_advance": released.auto_advance,
            "total_cents": released.total, "currency": released.currency}


def credit(meterline: Meterline, invoice_id: str, usd: Fraction, why: str | None,
           client: stripe.StripeClient | None = None) -> dict[str, Any]:
    """A credit on this draft invoice only: a negative invoice item attached to it."""
    cents = usd * 100
    if cents <= 0 or cents.denominator != 1:
        raise InvoiceRefused(f"a credit is a positive amount in whole cents, got ${float(usd):g}")
    client = _client(meterline, client)
    invoice = _draft(client, invoice_id)
    item = client.v1.invoice_items.create({
        "customer": invoice.customer, "invoice": invoice_id, "amount": -int(cents), "currency": invoice.currency,
        "description": why or "credit from the operator (meterline)"})
    return {"id": item.id, "invoice": invoice_id, "amount": item.amount, "currency": item.currency,
            "description": item.description}


def _draft(client: stripe.StripeClient, invoice_id: str) -> stripe.Invoice:
    try:
        invoice = client.v1.invoices.retrieve(invoice_id)
    except stripe.InvalidRequestError as missing:
        raise InvoiceRefused(f"no invoice {invoice_id} at Stripe ({missing.user_message})") from None
    if invoice.status != "draft":
        raise InvoiceRefused(f"invoice {invoice_id} is {invoice.status}, not a draft: nothing changed")
    return invoice


def _moment(epoch: int | float | str) -> datetime:
    return datetime.fromtimestamp(int(epoch), UTC)
