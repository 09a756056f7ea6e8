"""The account's objects by kind, Stripe's list pages over them, and the events they emit.

One place holds every object, so the catalog, meter events and invoices read each other's objects
without reaching into one another's fields.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

from plugin.stripe.emulator.clock import Clock
from plugin.stripe.emulator.errors import not_found
from plugin.stripe.emulator.forms import InvalidParam, Params

EventSink = Callable[[dict[str, Any]], None]
"""Receives every Stripe `event` the account emits (webhook delivery hooks in here)."""
Keep = Callable[[dict[str, Any]], bool]

API_VERSION = "2026-10-28.endive"
"""What stripe-python 16.1.0 pins; stamped on events."""
LIST_PAGE_MAX = 100
LIST_PARAMS = ("limit", "starting_after", "ending_before")

LABELS = {"customer": "customer", "product": "product", "price": "price", "subscription": "subscription",
          "meter": "billing meter", "invoice": "invoice", "event": "event"}
"""Each kind of object, and how Stripe names it in "No such ..." errors."""
LIST_URLS = {"customer": "/v1/customers", "product": "/v1/products", "price": "/v1/prices",
             "subscription": "/v1/subscriptions", "meter": "/v1/billing/meters", "invoice": "/v1/invoices",
             "event": "/v1/events"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def paginate(items: Sequence[dict[str, Any]], url: str, params: Params) -> dict[str, Any]:
    """A Stripe list object over `items` (already in Stripe's order): limit, starting_after, ending_before."""
    limit = params.integer("limit", minimum=1) or 10
    if limit > LIST_PAGE_MAX:
        raise InvalidParam(f"This value must be less than or equal to {LIST_PAGE_MAX}.", "limit")
    starting_after, ending_before = params.text("starting_after"), params.text("ending_before")
    cursor = starting_after or ending_before
    if cursor is None:
        window = list(items)
    else:
        position = next((index for index, item in enumerate(items) if item["id"] == cursor), None)
        if position is None:
            raise InvalidParam(f"No such object: '{cursor}'", "starting_after" if starting_after else "ending_before")
        window = list(items[position + 1:]) if starting_after else list(items[:position])
    page = window[-limit:] if ending_before and not starting_after else window[:limit]
    return {"object": "list", "data": page, "has_more": len(window) > limit, "url": url}


class Store:
    """Objects in creation order (dicts keep it), under the clock every `created` comes from."""

    def __init__(self, clock: Clock, on_event: EventSink | None = None):
        self.clock = clock
        self.on_event = on_event
        self._objects: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in LABELS}

    def now(self) -> int:
        return int(self.clock())

    def add(self, kind: str, item: dict[str, Any]) -> dict[str, Any]:
        self._objects[kind][item["id"]] = item
        return item

    def find(self, kind: str, object_id: str) -> dict[str, Any] | None:
        return self._objects[kind].get(object_id)

    def get(self, kind: str, object_id: str, param: str = "id") -> dict[str, Any]:
        """The object, or Stripe's 404 naming `param` as the one that pointed at nothing."""
        found = self.find(kind, object_id)
        if found is None:
            raise not_found(LABELS[kind], object_id, param)
        return found

    def newest_first(self, kind: str, keep: Keep = lambda _: True) -> list[dict[str, Any]]:
        return [item for item in reversed(self._objects[kind].values()) if keep(item)]

    def page(self, kind: str, params: Params, keep: Keep = lambda _: True,
             view: Callable[[dict[str, Any]], dict[str, Any]] = lambda item: item) -> dict[str, Any]:
        """One page of the kind's list endpoint, newest first, each kept object shown through `view`."""
        return paginate([view(item) for item in self.newest_first(kind, keep)], LIST_URLS[kind], params)

    def emit(self, event_type: str, data_object: dict[str, Any]) -> dict[str, Any]:
        """Store a Stripe `event` and hand it to the sink (webhooks)."""
        event = self.add("event", {
            "id": new_id("evt"), "object": "event", "api_version": API_VERSION, "created": self.now(),
            "data": {"object": data_object}, "livemode": False, "pending_webhooks": 1 if self.on_event else 0,
            "request": {"id": None, "idempotency_key": None}, "type": event_type,
        })
        if self.on_event is not None:
            self.on_event(event)
        return event
