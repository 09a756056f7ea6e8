"""The account's objects by kind, Stripe's list pages over them, and the events they emit.

One place holds every object, so the catalog, meter events and invoices read each other's objects
without reaching into one another's fields.

Events come in Stripe's two shapes: v1 *snapshot* events (``object: "event"``, the object inline under
``data``) and v2 *thin* events (``object: "v2.core.event"``, a `related_object` reference, served by
``GET /v2/core/events/{id}``). Every v1 event gets a thin twin (type ``v1.<type>``); `webhook_mode`
decides which of the two the webhook endpoint receives, as an event destination's payload style does.
"""

from __future__ import annotations

import copy
import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any, Literal

from plugin.stripe.emulator.clock import Clock, rfc3339
from plugin.stripe.emulator.errors import not_found
from plugin.stripe.emulator.forms import InvalidParam, Params

EventSink = Callable[[dict[str, Any]], None]
"""Receives every event the webhook endpoint is sent: a v1 `event`, or a thin notification in thin mode."""
Keep = Callable[[dict[str, Any]], bool]
WebhookMode = Literal["snapshot", "thin"]
WEBHOOK_MODES: tuple[WebhookMode, ...] = ("snapshot", "thin")

API_VERSION = "2026-10-28.endive"
"""What stripe-python 16.1.0 pins; stamped on events."""
LIST_PAGE_MAX = 100
LIST_PARAMS = ("limit", "starting_after", "ending_before")

LABELS = {"customer": "customer", "product": "product", "price": "price", "subscription": "subscription",
          "meter": "billing meter", "invoice": "invoice", "invoiceitem": "invoiceitem", "event": "event",
          "thin_event": "event", "subscription_schedule": "subscription schedule"}
"""Each kind of object, and how Stripe names it in "No such ..." errors."""
LIST_URLS = {"customer": "/v1/customers", "product": "/v1/products", "price": "/v1/prices",
             "subscription": "/v1/subscriptions", "meter": "/v1/billing/meters", "invoice": "/v1/invoices",
             "invoiceitem": "/v1/invoiceitems", "event": "/v1/events", "thin_event": "/v2/core/events",
             "subscription_schedule": "/v1/subscription_schedules"}
KIND_BY_OBJECT = {"billing.meter": "meter"}
"""Kinds whose Stripe `object` name differs from the kind (the others are spelled alike)."""


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

    def __init__(self, clock: Clock, on_event: EventSink | None = None, webhook_mode: WebhookMode = "snapshot"):
        self.clock = clock
        self.on_event = on_event
        self.webhook_mode: WebhookMode = webhook_mode
        self._objects: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in LABELS}
        self.due_at = math.inf
        """The earliest time something may fall due (a period ending, a draft to finalize); `wake_at` lowers it."""

    def wake_at(self, moment: float) -> None:
        """Something falls due at `moment`: the billing pass must look again once the clock reaches it."""
        self.due_at = min(self.due_at, moment)

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

    def oldest_first(self, kind: str, keep: Keep = lambda _: True) -> list[dict[str, Any]]:
        return [item for item in self._objects[kind].values() if keep(item)]

    def page(self, kind: str, params: Params, keep: Keep = lambda _: True,
             view: Callable[[dict[str, Any]], dict[str, Any]] = lambda item: item) -> dict[str, Any]:
        """One page of the kind's list endpoint, newest first, each kept object shown through `view`."""
        return paginate([view(item) for item in self.newest_first(kind, keep)], LIST_URLS[kind], params)

    def emit(self, event_type: str, data_object: dict[str, Any]) -> dict[str, Any]:
        """Store a v1 snapshot `event` and its thin twin; the sink (webhooks) gets the one `webhook_mode` names.

        The object is copied: a later change to it (a draft finalized) must not rewrite what was sent.
        """
        event = self.add("event", {
            "id": new_id("evt"), "object": "event", "api_version": API_VERSION, "created": self.now(),
            "data": {"object": copy.deepcopy(data_object)}, "livemode": False,
            "pending_webhooks": 1 if self.on_event else 0,
            "request": {"id": None, "idempotency_key": None}, "type": event_type,
        })
        thin = self._record_thin(f"v1.{event_type}", self.related_object(data_object), snapshot_event=event["id"])
        self._deliver(thin if self.webhook_mode == "thin" else event)
        return event

    def emit_thin(self, thin_type: str, related: dict[str, Any] | None, data: dict[str, Any] | None, *,
                  always: bool = False) -> dict[str, Any]:
        """A thin-only event (Stripe has no snapshot for it): delivered in thin mode, or in any mode with
        `always` (meter error reports: an endpoint gets them thin whatever else it gets)."""
        thin = self._record_thin(thin_type, related, data=data)
        if always or self.webhook_mode == "thin":
            self._deliver(thin)
        return thin

    def related_object(self, data_object: dict[str, Any]) -> dict[str, Any] | None:
        """What a thin event points at: the object's id, type and the URL that retrieves it."""
        object_name, object_id = data_object.get("object"), data_object.get("id")
        kind = KIND_BY_OBJECT.get(object_name, object_name)
        if kind not in LIST_URLS or not object_id:
            return None
        return {"id": object_id, "type": object_name, "url": f"{LIST_URLS[kind]}/{object_id}"}

    def _record_thin(self, thin_type: str, related: dict[str, Any] | None, *, data: dict[str, Any] | None = None,
                     snapshot_event: str | None = None) -> dict[str, Any]:
        """Store the v2 event ``GET /v2/core/events/{id}`` answers; returns the notification a destination gets.

        The notification carries no ``data``: the receiver fetches the event (or the related object).
        """
        notification: dict[str, Any] = {"id": new_id("evt"), "object": "v2.core.event", "type": thin_type,
                                        "livemode": False, "created": rfc3339(self.clock())}
        if related is not None:
            notification["related_object"] = related
        full = {**notification, "context": None, "reason": None, "snapshot_event": snapshot_event}
        if data is not None:
            full["data"] = copy.deepcopy(data)
        self.add("thin_event", full)
        return notification

    def _deliver(self, payload: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(payload)
