"""What the account sells and measures: customers, products, prices, subscriptions and billing meters.

Each create call reads its params the way Stripe validates them, so a caller's mistake surfaces here as
the same `InvalidParam` / `ApiError` the real API would answer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from plugin.stripe.emulator.clock import month_period
from plugin.stripe.emulator.errors import ApiError
from plugin.stripe.emulator.forms import InvalidParam, Params
from plugin.stripe.emulator.money import decimal_text, whole_or_none
from plugin.stripe.emulator.store import LIST_PARAMS, Store, new_id


class Catalog:
    """The objects, plus the two indexes Stripe keeps unique: price lookup keys and active meter event names."""

    def __init__(self, store: Store):
        self.store = store
        self._price_by_lookup_key: dict[str, str] = {}
        self._active_meter_by_event_name: dict[str, str] = {}
        self.at_renewal: Callable[[dict[str, Any], tuple[int, int]], None] = lambda subscription, period: None
        """Called as a subscription enters a new period, before it is announced (schedules.py: phases)."""

    # -------------------------------------------------------------------------- customers and products

    def create_customer(self, params: Params) -> dict[str, Any]:
        params.only("email", "name", "metadata", "description", "phone")
        customer = self.store.add("customer", {
            "id": new_id("cus"), "object": "customer", "created": self.store.now(), "livemode": False,
            "email": params.text("email", max_length=512), "name": params.text("name", max_length=256),
            "description": params.text("description"), "phone": params.text("phone", max_length=20),
            "metadata": params.strings("metadata"), "balance": 0, "currency": None, "delinquent": False,
        })
        self.store.emit("customer.created", customer)
        return customer

    def list_customers(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "email")
        email = params.text("email")
        return self.store.page("customer", params, lambda customer: email is None or customer["email"] == email)

    def create_product(self, params: Params) -> dict[str, Any]:
        params.only("id", "name", "metadata", "description", "active", "unit_label")
        product_id = params.text("id", max_length=255) or new_id("prod")
        if self.store.find("product", product_id) is not None:
            raise ApiError(400, f"Product already exists: '{product_id}'", code="resource_already_exists", param="id")
        now = self.store.now()
        return self.store.add("product", {
            "id": product_id, "object": "product", "created": now, "updated": now, "livemode": False,
            "name": params.text("name", required=True), "description": params.text("description"),
            "active": params.boolean("active") is not False, "metadata": params.strings("metadata"),
            "unit_label": params.text("unit_label", max_length=12), "default_price": None, "type": "service",
        })

    def list_products(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "active")
        active = params.boolean("active")
        return self.store.page("product", params, lambda product: active is None or product["active"] == active)

    # -------------------------------------------------------------------------- prices

    def create_price(self, params: Params) -> dict[str, Any]:
        params.only("product", "currency", "unit_amount", "unit_amount_decimal", "recurring", "billing_scheme",
                    "tiers_mode", "tiers", "lookup_key", "transfer_lookup_key", "nickname", "metadata", "active",
                    "tax_behavior")
        product_id = params.text("product", required=True)
        self.store.get("product", product_id, param="product")
        currency = params.text("currency", required=True).lower()
        if len(currency) != 3 or not currency.isalpha():
            raise InvalidParam(f"Invalid currency: {currency}", "currency")
        scheme = params.text("billing_scheme", choices=("per_unit", "tiered")) or "per_unit"
        unit_amount = _price_unit_amount(params, scheme)
        tiers_mode, tiers = _price_tiers(params, scheme)
        lookup_key = params.text("lookup_key", max_length=200)
        transfer_lookup_key = bool(params.boolean("transfer_lookup_key"))
        recurring = self._price_recurring(params.child("recurring"))
        price = {
            "id": new_id("price"), "object": "price", "created": self.store.now(), "livemode": False,
            "active": params.boolean("active") is not False, "product": product_id, "currency": currency,
            "billing_scheme": scheme, "tiers_mode": tiers_mode, "custom_unit_amount": None,
            **_amount_fields("unit_amount", unit_amount),
            "recurring": recurring, "type": "recurring" if recurring else "one_time",
            "lookup_key": lookup_key, "nickname": params.text("nickname"), "metadata": params.strings("metadata"),
            "tax_behavior": params.text("tax_behavior", choices=("exclusive", "inclusive", "unspecified"))
            or "unspecified",
            "transform_quantity": None,
        }
        if tiers is not None:
            price["tiers"] = tiers
        self._claim_lookup_key(lookup_key, transfer_lookup_key)  # last: a refused price must not move the key
        self.store.add("price", price)
        if lookup_key is not None:
            self._price_by_lookup_key[lookup_key] = price["id"]
        return price

    def _claim_lookup_key(self, lookup_key: str | None, transfer: bool) -> None:
        holder = self._price_by_lookup_key.get(lookup_key) if lookup_key is not None else None
        if holder is None:
            return
        if not transfer:
            raise InvalidParam(f"A price (`{holder}`) already uses that lookup key.", "lookup_key")
        self.store.get("price", holder)["lookup_key"] = None

    def _price_recurring(self, recurring: Params | None) -> dict[str, Any] | None:
        if recurring is None:
            return None
        recurring.only("interval", "interval_count", "usage_type", "meter", "trial_period_days")
        usage_type = recurring.text("usage_type", choices=("licensed", "metered")) or "licensed"
        meter_id = recurring.text("meter")
        if usage_type == "metered" and meter_id is None:
            raise InvalidParam("Missing required param: recurring[meter] (metered prices are backed by a meter).",
                               "recurring[meter]", "parameter_missing")
        if usage_type == "licensed" and meter_id is not None:
            raise InvalidParam("recurring[meter] requires recurring[usage_type]=metered.", "recurring[meter]")
        if meter_id is not None:
            self.store.get("meter", meter_id, param="recurring[meter]")
        return {
            "interval": recurring.text("interval", required=True, choices=("day", "week", "month", "year")),
            "interval_count": recurring.integer("interval_count", minimum=1) or 1,
            "usage_type": usage_type, "meter": meter_id,
            "trial_period_days": recurring.integer("trial_period_days", minimum=0),
        }

    def list_prices(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "active", "product", "lookup_keys", "currency", "type")
        active, product, currency = params.boolean("active"), params.text("product"), params.text("currency")
        price_type = params.text("type", choices=("one_time", "recurring"))
        lookup_keys = set(params.texts("lookup_keys"))

        def keep(price: dict[str, Any]) -> bool:
            return ((active is None or price["active"] == active) and product in (None, price["product"])
                    and currency in (None, price["currency"]) and price_type in (None, price["type"])
                    and (not lookup_keys or price["lookup_key"] in lookup_keys))

        return self.store.page("price", params, keep)

    # -------------------------------------------------------------------------- subscriptions

    def create_subscription(self, params: Params) -> dict[str, Any]:
        params.only("customer", "items", "metadata", "collection_method", "days_until_due", "description",
                    "payment_behavior")
        customer_id = params.text("customer", required=True)
        self.store.get("customer", customer_id, param="customer")
        subscription_id, now = new_id("sub"), self.store.now()
        period = month_period(now)
        items = [self.subscription_item(item, subscription_id, now, period)
                 for item in params.children("items", required=True)]
        prices = [item["price"] for item in items]
        _check_item_prices(prices, "items")
        subscription = self.store.add("subscription", {
            "id": subscription_id, "object": "subscription", "created": now, "livemode": False,
            "customer": customer_id, "status": "active", "currency": prices[0]["currency"],
            "collection_method": params.text("collection_method", choices=("charge_automatically", "send_invoice"))
            or "charge_automatically",
            "days_until_due": params.integer("days_until_due", minimum=0), "description": params.text("description"),
            "billing_cycle_anchor": now, "start_date": now, "cancel_at_period_end": False, "canceled_at": None,
            "schedule": None,
            "metadata": params.strings("metadata"),
            "items": {"object": "list", "data": items, "has_more": False, "total_count": len(items),
                      "url": f"/v1/subscription_items?subscription={subscription_id}"},
        })
        self.store.wake_at(period[1])
        return subscription

    def create_subscription_item(self, params: Params) -> dict[str, Any]:
        """`POST /v1/subscription_items`: add a price to an existing subscription."""
        subscription = self.store.get("subscription", params.text("subscription", required=True), param="subscription")
        item = self.subscription_item(params, subscription["id"], self.store.now(), current_period(subscription),
                                       also=("subscription",))
        _check_item_prices([existing["price"] for existing in subscription["items"]["data"]] + [item["price"]],
                           "price")
        subscription["items"]["data"].append(item)
        subscription["items"]["total_count"] = len(subscription["items"]["data"])
        return item

    def subscription_item(self, item: Params, subscription_id: str, now: int, period: tuple[int, int],
                           also: tuple[str, ...] = ()) -> dict[str, Any]:
        item.only("price", "quantity", "metadata", *also)
        price = self.store.get("price", item.text("price", required=True), param=item.name("price"))
        if price["recurring"] is None:
            raise InvalidParam(f"The price specified ({price['id']}) is not recurring.", item.name("price"))
        quantity = item.integer("quantity", minimum=0)
        metered = price["recurring"]["usage_type"] == "metered"
        if metered and quantity is not None:
            raise InvalidParam("Quantity should not be specified where usage_type is `metered`. Remove quantity "
                               f"from `{item.name('quantity')}` and try again.", item.name("quantity"))
        entry = {"id": new_id("si"), "object": "subscription_item", "created": now, "price": price,
                 "subscription": subscription_id, "metadata": item.strings("metadata"),
                 "current_period_start": period[0], "current_period_end": period[1]}
        if not metered:
            entry["quantity"] = 1 if quantity is None else quantity
        return entry

    def renew(self, subscription: dict[str, Any]) -> tuple[int, int]:
        """Move every item to the next calendar month; answers the period that just closed.

        Stripe announces a renewal with ``customer.subscription.updated`` (the items' periods changed).
        """
        closed = current_period(subscription)
        start, end = month_period(closed[1])
        for item in subscription["items"]["data"]:
            item.update(current_period_start=start, current_period_end=end)
        self.at_renewal(subscription, (start, end))
        self.store.wake_at(end)
        self.store.emit("customer.subscription.updated", subscription)
        return closed

    def list_subscriptions(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "customer", "price", "status")
        customer, price, status = params.text("customer"), params.text("price"), params.text("status") or "active"

        def keep(subscription: dict[str, Any]) -> bool:
            prices = {item["price"]["id"] for item in subscription["items"]["data"]}
            return (customer in (None, subscription["customer"]) and (price is None or price in prices)
                    and status in ("all", subscription["status"]))

        return self.store.page("subscription", params, keep)

    # -------------------------------------------------------------------------- meters

    def create_meter(self, params: Params) -> dict[str, Any]:
        params.only("display_name", "event_name", "default_aggregation", "customer_mapping", "value_settings",
                    "event_time_window")
        event_name = params.text("event_name", required=True, max_length=100)
        if event_name in self._active_meter_by_event_name:
            raise _active_meter_exists(event_name, param="event_name")
        aggregation = params.child("default_aggregation", required=True).only("formula")
        mapping, values = params.child("customer_mapping"), params.child("value_settings")
        customer_key, value_key = "stripe_customer_id", "value"
        if mapping is not None:
            mapping.only("event_payload_key", "type")
            mapping.text("type", required=True, choices=("by_id",))
            customer_key = mapping.text("event_payload_key", required=True, max_length=100)
        if values is not None:
            value_key = values.only("event_payload_key").text("event_payload_key", required=True, max_length=100)
        now = self.store.now()
        meter = self.store.add("meter", {
            "id": new_id("mtr"), "object": "billing.meter", "created": now, "updated": now, "livemode": False,
            "display_name": params.text("display_name", required=True, max_length=250), "event_name": event_name,
            "default_aggregation": {
                "formula": aggregation.text("formula", required=True, choices=("sum", "count", "last")),
            },
            "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
            "value_settings": {"event_payload_key": value_key},
            "event_time_window": params.text("event_time_window", choices=("day", "hour")),
            "status": "active", "status_transitions": {"deactivated_at": None},
        })
        self._active_meter_by_event_name[event_name] = meter["id"]
        return meter

    def set_meter_active(self, meter_id: str, active: bool, params: Params) -> dict[str, Any]:
        """Deactivate (events for its event_name are then refused) or reactivate a meter."""
        params.only()
        meter = self.store.get("meter", meter_id)
        holder = self._active_meter_by_event_name.get(meter["event_name"])
        if active and holder not in (None, meter_id):
            raise _active_meter_exists(meter["event_name"])
        if active:
            self._active_meter_by_event_name[meter["event_name"]] = meter_id
        elif holder == meter_id:
            del self._active_meter_by_event_name[meter["event_name"]]
        meter.update(status="active" if active else "inactive", updated=self.store.now(),
                     status_transitions={"deactivated_at": None if active else self.store.now()})
        return meter

    def list_meters(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "status")
        status = params.text("status", choices=("active", "inactive"))
        return self.store.page("meter", params, lambda meter: status in (None, meter["status"]))

    def active_meter(self, event_name: str) -> dict[str, Any] | None:
        """The meter that counts events named `event_name` now, if any."""
        meter_id = self._active_meter_by_event_name.get(event_name)
        return None if meter_id is None else self.store.get("meter", meter_id)

    def had_meter(self, event_name: str) -> bool:
        """Whether any meter, active or not, was ever made for `event_name`."""
        return any(meter["event_name"] == event_name for meter in self.store.newest_first("meter"))


# ------------------------------------------------------------------------------ reading params


def _active_meter_exists(event_name: str, param: str | None = None) -> ApiError:
    return ApiError(400, f"An active meter with event_name '{event_name}' already exists.",
                    code="resource_already_exists", param=param)


def _amount(params: Params, kind: str) -> Decimal | None:
    """`kind` in whole cents or `kind_decimal` as a decimal string; at most one of the two."""
    whole, exact = params.integer(kind, minimum=0), params.decimal(f"{kind}_decimal")
    if whole is not None and exact is not None:
        raise InvalidParam(f"You may only specify one of these parameters: {kind}, {kind}_decimal.",
                           params.name(kind), "parameters_exclusive")
    return Decimal(whole) if whole is not None else exact


def _amount_fields(kind: str, amount: Decimal | None) -> dict[str, Any]:
    """Both ways Stripe writes an amount: `kind` (whole cents, or None) and `kind_decimal`."""
    return {kind: whole_or_none(amount), f"{kind}_decimal": None if amount is None else decimal_text(amount)}


def _price_unit_amount(params: Params, scheme: str) -> Decimal | None:
    amount = _amount(params, "unit_amount")
    if scheme == "tiered" and amount is not None:
        raise InvalidParam("unit_amount cannot be set when billing_scheme=tiered; put amounts in tiers.",
                           "unit_amount")
    if scheme == "per_unit" and amount is None:
        raise InvalidParam("Missing required param: unit_amount.", "unit_amount", "parameter_missing")
    return amount


def _price_tiers(params: Params, scheme: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    if scheme != "tiered":
        if params.has("tiers") or params.has("tiers_mode"):
            raise InvalidParam("tiers and tiers_mode require billing_scheme=tiered.", "tiers")
        return None, None
    tiers_mode = params.text("tiers_mode", required=True, choices=("graduated", "volume"))
    tiers = [_tier(tier) for tier in params.children("tiers", required=True)]
    bounds = [tier["up_to"] for tier in tiers]
    if bounds[-1] is not None or None in bounds[:-1]:
        raise InvalidParam("The last tier, and only the last, must have up_to=inf.", "tiers")
    if any(later <= earlier for earlier, later in itertools.pairwise(bounds[:-1])):
        raise InvalidParam("Tiers must be sorted by ascending up_to.", "tiers")
    return tiers_mode, tiers


def _tier(tier: Params) -> dict[str, Any]:
    tier.only("up_to", "unit_amount", "unit_amount_decimal", "flat_amount", "flat_amount_decimal")
    up_to = None if tier.data.get("up_to") == "inf" else tier.integer("up_to", required=True, minimum=1)
    fields = {"up_to": up_to, **_amount_fields("unit_amount", _amount(tier, "unit_amount")),
              **_amount_fields("flat_amount", _amount(tier, "flat_amount"))}
    if fields["unit_amount_decimal"] is None and fields["flat_amount_decimal"] is None:
        raise InvalidParam("Each tier needs unit_amount(_decimal) or flat_amount(_decimal).", tier.name("unit_amount"),
                           "parameter_missing")
    return fields


def current_period(subscription: dict[str, Any]) -> tuple[int, int]:
    """[start, end) of the subscription's current period; it lives on each item (API 2026-10-28), all alike."""
    item = subscription["items"]["data"][0]
    return item["current_period_start"], item["current_period_end"]


def _check_item_prices(prices: list[dict[str, Any]], param: str) -> None:
    """Stripe's rules for the prices of one subscription: one currency, each price once."""
    if len({price["currency"] for price in prices}) > 1:
        raise InvalidParam("All prices on a subscription must have the same currency.", param)
    if len({price["id"] for price in prices}) < len(prices):
        raise InvalidParam("Cannot add multiple subscription items with the same price.", param)
