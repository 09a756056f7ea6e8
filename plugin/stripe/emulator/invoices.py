"""Invoices: a subscription's periods billed from its items and the usage its meters recorded, on Stripe's cycle.

The cycle (`Invoices.run_due`, run whenever the clock may have moved): when a subscription's period
ends it gets a draft invoice for that period (``billing_reason: subscription_cycle``, ``invoice.created``)
and the next period begins. `grace_seconds` after the draft was created (Stripe's usage-based grace
period, 1 h by default) a draft still on ``auto_advance`` is finalized: its metered lines are recounted
from the usage known by then, so late events of the closed period count, and it turns ``open`` with
``invoice.finalized``. A draft held with ``auto_advance=false`` waits until it is released or finalized
by hand. Invoice items (a credit is a negative one) are lines of the draft they were added to; pending
ones join the customer's next draft.

Each line is rounded to whole cents (half up) on its own, as Stripe does, so totals match its invoices.
Periods are calendar months (UTC) and licensed prices are billed with the usage, in arrears.
"""

from __future__ import annotations

import math
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from typing import Any

from plugin.stripe.emulator.catalog import Catalog, current_period
from plugin.stripe.emulator.clock import month_period
from plugin.stripe.emulator.errors import ApiError
from plugin.stripe.emulator.forms import InvalidParam, Params
from plugin.stripe.emulator.meter_events import MeterEvents
from plugin.stripe.emulator.money import (
    decimal_text,
    price_cents,
    truncated,
)
from plugin.stripe.emulator.store import LIST_PARAMS, Store, new_id, paginate

DEFAULT_GRACE_SECONDS = 3600
"""Stripe waits about an hour after ``invoice.created`` before finalizing a subscription's draft."""
MAX_PERIODS_PER_PASS = 120
"""A clock jump closes at most this many periods of one subscription in one pass (ten years of months)."""
INVOICE_STATUSES = ("draft", "open", "paid", "uncollectible", "void")


def not_editable(param: str | None = "invoice") -> ApiError:
    """Stripe's refusal to change what a finalized invoice bills (the message its API gives for invoice items)."""
    return ApiError(400, "Invalid invoice: This invoice is no longer editable", code="invoice_not_editable",
                    param=param)


class Invoices:
    """Previews (computed, not stored), drafts and finalized invoices (stored), and invoice items."""

    def __init__(self, store: Store, catalog: Catalog, meter_events: MeterEvents,
                 grace_seconds: int = DEFAULT_GRACE_SECONDS):
        self.store = store
        self.catalog = catalog
        self.meter_events = meter_events
        self.grace_seconds = grace_seconds
        """Seconds between a cycle draft's creation and its automatic finalization (Stripe: 1 h, up to 72 h)."""
        self._finalizes_at: dict[str, int] = {}
        """Each draft's scheduled finalization, kept while it is held so a release resumes the schedule."""
        self._numbers: Counter[str] = Counter()

    # -------------------------------------------------------------------------- reading

    def preview_invoice(self, params: Params) -> dict[str, Any]:
        """The invoice the current period would produce now (nothing is stored)."""
        params.only("customer", "subscription")
        customer, subscription_id = params.text("customer"), params.text("subscription")
        if subscription_id is not None:
            subscription = self.store.get("subscription", subscription_id, param="subscription")
            if customer not in (None, subscription["customer"]):
                raise InvalidParam(f"Subscription {subscription_id} does not belong to customer {customer}.",
                                   "subscription")
        elif customer is not None:
            self.store.get("customer", customer, param="customer")
            owned = self.store.newest_first("subscription", lambda sub: sub["customer"] == customer)
            if not owned:
                raise ApiError(400, f"No upcoming invoices for customer: {customer}", code="invoice_upcoming_none")
            subscription = owned[0]
        else:
            raise InvalidParam("Missing required param: customer.", "customer", "parameter_missing")
        invoice = self._invoice(subscription, current_period(subscription), f"upcoming_{new_id('in')}",
                                "upcoming", self.store.now())
        pending = [self._item_line(item, invoice["id"]) for item in self._pending_items(invoice)]
        self._set_lines(invoice, invoice["lines"]["data"] + pending)
        return invoice

    def list_invoices(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "customer", "subscription", "status")
        customer, subscription = params.text("customer"), params.text("subscription")
        status = params.text("status", choices=INVOICE_STATUSES)

        def keep(invoice: dict[str, Any]) -> bool:
            owner = invoice["parent"]["subscription_details"]["subscription"]
            return (customer in (None, invoice["customer"]) and subscription in (None, owner)
                    and status in (None, invoice["status"]))

        return self.store.page("invoice", params, keep)

    def list_invoice_lines(self, invoice_id: str, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS)
        invoice = self.store.get("invoice", invoice_id)
        return paginate(invoice["lines"]["data"], f"/v1/invoices/{invoice_id}/lines", params)

    # -------------------------------------------------------------------------- the cycle

    def run_due(self) -> None:
        """Close every period that ended and finalize every draft whose grace is over, as of the clock now.

        Cheap when nothing is due: `Store.due_at` says when the next thing can fall due.
        """
        now = self.store.now()
        if now < self.store.due_at:
            return
        self.store.due_at = math.inf
        for subscription in self.store.oldest_first("subscription"):
            self._close_ended_periods(subscription, now)
        for invoice in self.store.oldest_first("invoice", lambda invoice: invoice["status"] == "draft"):
            scheduled = self._finalizes_at.get(invoice["id"])
            if not invoice["auto_advance"] or scheduled is None:
                continue  # held: `update_invoice` wakes the pass again when it is released
            if scheduled <= now:
                self._finalize(invoice)
            else:
                self.store.wake_at(scheduled)

    def _close_ended_periods(self, subscription: dict[str, Any], now: int) -> None:
        for _ in range(MAX_PERIODS_PER_PASS):
            end = current_period(subscription)[1]
            if end > now:
                self.store.wake_at(end)
                return
            # the closed period is billed with the items it had: a schedule's next phase may replace them at renewal
            billed = {**subscription, "items": {**subscription["items"], "data": list(subscription["items"]["data"])}}
            closed = self.catalog.renew(subscription)
            self._open_draft(billed, closed, created=closed[1], billing_reason="subscription_cycle")
        self.store.wake_at(now)  # more periods left than one pass closes: the next pass goes on

    def finalize_period(self, subscription_id: str, at: float | None = None) -> dict[str, Any]:
        """A draft for the period containing `at` (default now), created now, outside the cycle: the
        subscription's own period does not move. Emits ``invoice.created``; it finalizes after the grace."""
        subscription = self.store.get("subscription", subscription_id, param="subscription")
        period = month_period(self.store.clock() if at is None else at)
        return self._open_draft(subscription, period, created=self.store.now(), billing_reason="subscription_cycle")

    def _open_draft(self, subscription: dict[str, Any], period: tuple[int, int], *, created: int,
                    billing_reason: str) -> dict[str, Any]:
        """Store a draft for `period` with the customer's pending invoice items on it; emits ``invoice.created``."""
        invoice = self._invoice(subscription, period, new_id("in"), billing_reason, created)
        pending = self._pending_items(invoice)
        for item in pending:
            item["invoice"] = invoice["id"]
        self._set_lines(invoice, invoice["lines"]["data"] + [self._item_line(item, invoice["id"]) for item in pending])
        finalizes_at = created + self.grace_seconds
        self._finalizes_at[invoice["id"]] = finalizes_at
        invoice.update(auto_advance=True, automatically_finalizes_at=finalizes_at)
        self.store.add("invoice", invoice)
        self.store.wake_at(finalizes_at)
        self.store.emit("invoice.created", invoice)
        return invoice

    def _finalize(self, invoice: dict[str, Any]) -> None:
        """Draft -> open: metered quantities recounted now, totals fixed, ``invoice.finalized`` (and
        ``invoice.paid`` when nothing is due, as Stripe marks a zero invoice paid)."""
        now = self.store.now()
        subscription = self.store.find("subscription", invoice["parent"]["subscription_details"]["subscription"])
        if subscription is not None:
            self._set_lines(invoice, self._recounted_lines(invoice, subscription))
        self._finalizes_at.pop(invoice["id"], None)
        self._numbers[invoice["customer"]] += 1
        invoice.update(status="open", automatically_finalizes_at=None, effective_at=now, ending_balance=0,
                       number=f"{invoice['customer'][4:12].upper()}-{self._numbers[invoice['customer']]:04d}")
        invoice["status_transitions"]["finalized_at"] = now
        self.store.emit("invoice.finalized", invoice)
        if invoice["amount_due"] == 0:
            invoice["status"] = "paid"
            invoice["status_transitions"]["paid_at"] = now
            self.store.emit("invoice.paid", invoice)

    def _recounted_lines(self, invoice: dict[str, Any], subscription: dict[str, Any]) -> list[dict[str, Any]]:
        """The invoice's lines with each subscription item's line priced again (same line ids)."""
        period = (invoice["period_start"], invoice["period_end"])
        items = {item["id"]: item for item in subscription["items"]["data"]}
        lines = []
        for line in invoice["lines"]["data"]:
            details = line["parent"]["subscription_item_details"]
            item = items.get(details["subscription_item"]) if details is not None else None
            if item is not None:
                line = {**self._invoice_line(item, subscription, period, invoice["id"]), "id": line["id"]}
            lines.append(line)
        return lines

    # -------------------------------------------------------------------------- changing invoices

    def update_invoice(self, invoice_id: str, params: Params) -> dict[str, Any]:
        """``POST /v1/invoices/{id}``: `auto_advance` holds or releases a draft; description and metadata.

        What an invoice bills is fixed once it is finalized: `automatically_finalizes_at` only moves on a
        draft, and a paid or void invoice takes nothing but metadata.
        """
        params.only("auto_advance", "description", "metadata", "automatically_finalizes_at")
        invoice = self.store.get("invoice", invoice_id)
        status = invoice["status"]
        if status != "draft" and params.has("automatically_finalizes_at"):
            raise not_editable("automatically_finalizes_at")
        if status in ("paid", "void"):
            for param in ("auto_advance", "description"):
                if params.has(param):
                    raise not_editable(param)
        auto_advance, finalizes_at = params.boolean("auto_advance"), params.integer("automatically_finalizes_at")
        if finalizes_at is not None and finalizes_at < self.store.now():
            raise InvalidParam("automatically_finalizes_at must be in the future.", "automatically_finalizes_at")
        if params.has("description"):
            invoice["description"] = params.text("description")
        invoice["metadata"] = _merged_metadata(invoice["metadata"], params)
        if auto_advance is not None:
            invoice["auto_advance"] = auto_advance
        if status == "draft":
            self._reschedule(invoice, finalizes_at)
        self.store.emit("invoice.updated", invoice)
        return invoice

    def _reschedule(self, draft: dict[str, Any], finalizes_at: int | None) -> None:
        """Show the draft's finalization time while it is scheduled (Stripe: null while held) and wake the
        cycle for it; a draft released after its time passed is finalized by the next pass."""
        if finalizes_at is not None:
            self._finalizes_at[draft["id"]] = finalizes_at
        scheduled = self._finalizes_at.get(draft["id"])
        draft["automatically_finalizes_at"] = scheduled if draft["auto_advance"] else None
        if draft["auto_advance"] and scheduled is not None:
            self.store.wake_at(scheduled)

    def finalize_invoice(self, invoice_id: str, params: Params) -> dict[str, Any]:
        """``POST /v1/invoices/{id}/finalize``: finalize a draft now, held or not."""
        params.only("auto_advance")
        invoice = self.store.get("invoice", invoice_id)
        if invoice["status"] != "draft":
            raise ApiError(400, "This invoice is already finalized, you can't re-finalize a non-draft invoice.",
                           code="invoice_not_editable")
        auto_advance = params.boolean("auto_advance")
        if auto_advance is not None:
            invoice["auto_advance"] = auto_advance
        self._finalize(invoice)
        return invoice

    # -------------------------------------------------------------------------- invoice items

    def create_invoice_item(self, params: Params) -> dict[str, Any]:
        """``POST /v1/invoiceitems``: an amount (negative: a credit) on a draft of the customer, or pending
        for the customer's next invoice when no `invoice` is named."""
        params.only("customer", "invoice", "amount", "currency", "description", "metadata", "discountable")
        customer_id = params.text("customer", required=True)
        customer = self._referenced("customer", customer_id, "customer")
        amount = params.integer("amount", required=True)
        invoice_id = params.text("invoice")
        invoice = None if invoice_id is None else self._referenced("invoice", invoice_id, "invoice")
        if invoice is not None and invoice["customer"] != customer_id:
            raise InvalidParam(f"Invalid invoice: {invoice_id} is an invoice of another customer, not of "
                               f"{customer_id}.", "invoice")
        if invoice is not None and invoice["status"] != "draft":
            raise not_editable()
        currency = _currency(params.text("currency") or (invoice or customer)["currency"])
        if invoice is not None and currency != invoice["currency"]:
            raise InvalidParam(f"The invoice item's currency ({currency}) must be the invoice's "
                               f"({invoice['currency']}).", "currency")
        now = self.store.now()
        discountable = params.boolean("discountable")
        item = self.store.add("invoiceitem", {
            "id": new_id("ii"), "object": "invoiceitem", "livemode": False, "amount": amount, "net_amount": amount,
            "currency": currency, "customer": customer_id, "date": now, "description": params.text("description"),
            "discountable": amount >= 0 if discountable is None else discountable, "discounts": [],
            "invoice": invoice_id, "metadata": params.strings("metadata"), "parent": None,
            "period": {"start": now, "end": now}, "pricing": None, "proration": False, "proration_details": None,
            "quantity": 1, "quantity_decimal": "1", "tax_rates": [], "test_clock": None,
        })
        if invoice is not None:
            self._set_lines(invoice, invoice["lines"]["data"] + [self._item_line(item, invoice["id"])])
        self.store.emit("invoiceitem.created", item)
        return item

    def list_invoice_items(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "customer", "invoice", "pending")
        customer, invoice, pending = params.text("customer"), params.text("invoice"), params.boolean("pending")

        def keep(item: dict[str, Any]) -> bool:
            return (customer in (None, item["customer"]) and invoice in (None, item["invoice"])
                    and pending in (None, item["invoice"] is None))

        return self.store.page("invoiceitem", params, keep)

    def _referenced(self, kind: str, object_id: str, param: str) -> dict[str, Any]:
        """An object a body param names: Stripe answers 400 (not 404) when it does not exist."""
        found = self.store.find(kind, object_id)
        if found is None:
            raise ApiError(400, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)
        return found

    def _pending_items(self, invoice: dict[str, Any]) -> list[dict[str, Any]]:
        """The customer's invoice items on no invoice yet, in the invoice's currency, oldest first."""
        return self.store.oldest_first("invoiceitem", lambda item: (
            item["invoice"] is None and item["customer"] == invoice["customer"]
            and item["currency"] == invoice["currency"]))

    # -------------------------------------------------------------------------- shapes

    def _invoice(self, subscription: dict[str, Any], period: tuple[int, int], invoice_id: str,
                 billing_reason: str, created: int) -> dict[str, Any]:
        lines = [self._invoice_line(item, subscription, period, invoice_id)
                 for item in subscription["items"]["data"]]
        invoice = {
            "id": invoice_id, "object": "invoice", "created": created, "livemode": False,
            "customer": subscription["customer"], "currency": subscription["currency"], "status": "draft",
            "billing_reason": billing_reason, "collection_method": subscription["collection_method"],
            "auto_advance": False, "automatically_finalizes_at": None,
            "period_start": period[0], "period_end": period[1], "description": None, "metadata": {},
            "number": None, "effective_at": None, "due_date": None, "starting_balance": 0, "ending_balance": None,
            "attempt_count": 0, "attempted": False, "amount_paid": 0, "amount_overpaid": 0, "amount_shipping": 0,
            "status_transitions": {"finalized_at": None, "marked_uncollectible_at": None, "paid_at": None,
                                   "voided_at": None},
            "discounts": [], "total_discount_amounts": [], "total_taxes": [], "default_tax_rates": [],
            "parent": {"type": "subscription_details", "quote_details": None,
                       "subscription_details": {"subscription": subscription["id"], "metadata": {}}},
            "lines": {"object": "list", "data": [], "has_more": False, "total_count": 0,
                      "url": f"/v1/invoices/{invoice_id}/lines"},
        }
        self._set_lines(invoice, lines)
        return invoice

    def _set_lines(self, invoice: dict[str, Any], lines: list[dict[str, Any]]) -> None:
        """Lines and the totals that follow from them (no tax, no discount, no customer balance)."""
        total = sum(line["amount"] for line in lines)
        amount_due = max(total, 0)
        invoice["lines"].update(data=lines, total_count=len(lines))
        invoice.update(subtotal=total, subtotal_excluding_tax=total, total=total, total_excluding_tax=total,
                       amount_due=amount_due, amount_remaining=amount_due - invoice["amount_paid"])

    def _invoice_line(self, item: dict[str, Any], subscription: dict[str, Any], period: tuple[int, int],
                      invoice_id: str) -> dict[str, Any]:
        """One line per subscription item: metered items bill the period's usage, licensed ones their quantity."""
        price = self.store.find("price", item["price"]["id"]) or item["price"]
        meter_id = price["recurring"]["meter"]
        if meter_id is None:
            quantity = Decimal(item["quantity"])
        else:
            meter = self.store.get("meter", meter_id)
            quantity = self.meter_events.aggregated(meter, subscription["customer"], *period)
        amount = price_cents(price, Fraction(quantity))
        product = self.store.find("product", price["product"]) or {"name": price["product"]}
        return {
            "id": new_id("il"), "object": "line_item", "invoice": invoice_id, "livemode": False,
            "amount": amount, "subtotal": amount, "currency": price["currency"], "metadata": {},
            "description": f"{decimal_text(quantity)} × {product['name']}", "discountable": True, "discounts": [],
            "quantity": truncated(quantity), "quantity_decimal": decimal_text(quantity),
            "period": {"start": period[0], "end": period[1]},
            "pricing": {"type": "price_details", "price_details": {"price": price["id"], "product": price["product"]},
                        "unit_amount_decimal": price["unit_amount_decimal"]},
            "parent": {"type": "subscription_item_details", "invoice_item_details": None,
                       "subscription_item_details": {
                           "subscription": subscription["id"], "subscription_item": item["id"], "proration": False,
                           "proration_details": {"credited_items": None}, "invoice_item": None,
                       }},
        }

    def _item_line(self, item: dict[str, Any], invoice_id: str) -> dict[str, Any]:
        """An invoice item as a line of its invoice (`parent.type` ``invoice_item_details``)."""
        return {
            "id": new_id("il"), "object": "line_item", "invoice": invoice_id, "livemode": False,
            "amount": item["amount"], "subtotal": item["amount"], "currency": item["currency"],
            "metadata": dict(item["metadata"]), "description": item["description"],
            "discountable": item["discountable"], "discounts": [], "quantity": 1, "quantity_decimal": "1",
            "period": dict(item["period"]), "pricing": None,
            "parent": {"type": "invoice_item_details", "subscription_item_details": None,
                       "invoice_item_details": {"invoice_item": item["id"], "proration": False,
                                                "proration_details": {"credited_items": None},
                                                "subscription": None}},
        }


def _merged_metadata(current: dict[str, str], params: Params) -> dict[str, str]:
    """Stripe's metadata update: keys are merged, an empty value removes its key, ``metadata=""`` clears all."""
    if params.data.get("metadata") == "":
        return {}
    merged = {**current, **params.strings("metadata")}
    return {key: value for key, value in merged.items() if value != ""}


def _currency(currency: str | None) -> str:
    if currency is None:
        raise InvalidParam("Missing required param: currency.", "currency", "parameter_missing")
    if len(currency) != 3 or not currency.isalpha():
        raise InvalidParam(f"Invalid currency: {currency}", "currency")
    return currency.lower()
