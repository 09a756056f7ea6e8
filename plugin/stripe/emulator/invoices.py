"""Invoices: a subscription's calendar month priced from its items and the usage its meters recorded.

Each line is rounded to whole cents (half up) on its own, as Stripe does, so totals match its invoices.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

from plugin.stripe.emulator.clock import month_period
from plugin.stripe.emulator.errors import ApiError
from plugin.stripe.emulator.forms import InvalidParam, Params
from plugin.stripe.emulator.meter_events import MeterEvents
from plugin.stripe.emulator.money import (
    decimal_text,
    price_amount,
    round_half_up,
    truncated,
)
from plugin.stripe.emulator.store import LIST_PARAMS, Store, new_id


class Invoices:
    """Previews (computed, not stored) and finalized drafts (stored, with an ``invoice.created`` event)."""

    def __init__(self, store: Store, meter_events: MeterEvents):
        self.store = store
        self.meter_events = meter_events

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
        return self._invoice(subscription, month_period(self.store.clock()), f"upcoming_{new_id('in')}", "upcoming")

    def finalize_period(self, subscription_id: str, at: float | None = None) -> dict[str, Any]:
        """Close the period containing `at` (default now) into a stored draft invoice; emits ``invoice.created``."""
        subscription = self.store.get("subscription", subscription_id, param="subscription")
        invoice = self._invoice(subscription, month_period(self.store.clock() if at is None else at), new_id("in"),
                                "subscription_cycle")
        self.store.add("invoice", invoice)
        self.store.emit("invoice.created", invoice)
        return invoice

    def list_invoices(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "customer", "subscription", "status")
        customer, subscription, status = params.text("customer"), params.text("subscription"), params.text("status")

        def keep(invoice: dict[str, Any]) -> bool:
            owner = invoice["parent"]["subscription_details"]["subscription"]
            return (customer in (None, invoice["customer"]) and subscription in (None, owner)
                    and status in (None, invoice["status"]))

        return self.store.page("invoice", params, keep)

    def _invoice(self, subscription: dict[str, Any], period: tuple[int, int], invoice_id: str,
                 billing_reason: str) -> dict[str, Any]:
        lines = [self._invoice_line(item, subscription, period, invoice_id)
                 for item in subscription["items"]["data"]]
        total = sum(line["amount"] for line in lines)
        return {
            "id": invoice_id, "object": "invoice", "created": self.store.now(), "livemode": False,
            "customer": subscription["customer"], "currency": subscription["currency"], "status": "draft",
            "billing_reason": billing_reason, "collection_method": subscription["collection_method"],
            "period_start": period[0], "period_end": period[1],
            "parent": {"type": "subscription_details",
                       "subscription_details": {"subscription": subscription["id"], "metadata": {}}},
            "lines": {"object": "list", "data": lines, "has_more": False, "total_count": len(lines),
                      "url": f"/v1/invoices/{invoice_id}/lines"},
            "subtotal": total, "total": total, "total_excluding_tax": total, "amount_due": total,
            "amount_paid": 0, "amount_remaining": total,
        }

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
        amount = round_half_up(price_amount(price, Fraction(quantity)))
        product = self.store.find("product", price["product"]) or {"name": price["product"]}
        return {
            "id": new_id("il"), "object": "line_item", "invoice": invoice_id, "livemode": False,
            "amount": amount, "subtotal": amount, "currency": price["currency"], "metadata": {},
            "description": f"{decimal_text(quantity)} × {product['name']}",
            "quantity": truncated(quantity), "quantity_decimal": decimal_text(quantity),
            "period": {"start": period[0], "end": period[1]},
            "pricing": {"type": "price_details", "price_details": {"price": price["id"], "product": price["product"]},
                        "unit_amount_decimal": price["unit_amount_decimal"]},
            "parent": {"type": "subscription_item_details", "subscription_item_details": {
                "subscription": subscription["id"], "subscription_item": item["id"], "proration": False,
                "invoice_item": None,
            }},
        }
