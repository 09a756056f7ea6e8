"""The emulator's Stripe account: one object the app calls, composed of the modules that hold the rules.

Pure rules with no HTTP: every method takes decoded params (`forms.Params`) and returns the JSON-ready
object Stripe would answer with, or raises `ApiError` / `forms.InvalidParam` with Stripe's error
fields. Time comes from an injected clock (a callable returning epoch seconds), so the 24 h identifier
window, the 35-day / 5-minute timestamp window, session expiry and the billing cycle (`run_due_billing`)
are testable without sleeping.

Where the rules live: `catalog` (customers, products, prices, subscriptions, meters), `meter_events`
(v1/v2 ingestion, sessions, summaries), `invoices` (the cycle, invoice items), `schedules` (subscription
schedules' phases), `idempotency`, `faults`;
all of them keep their objects in one `store.Store`. This class only adds the lock: every public method
holds it, because the state may be shared by the event loop and test threads.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from plugin.stripe.emulator.catalog import Catalog
from plugin.stripe.emulator.clock import Clock
from plugin.stripe.emulator.faults import Faults
from plugin.stripe.emulator.forms import InvalidParam, Params
from plugin.stripe.emulator.idempotency import IdempotencyStore, StoredResponse
from plugin.stripe.emulator.invoices import DEFAULT_GRACE_SECONDS, Invoices
from plugin.stripe.emulator.meter_events import MeterEvents, Slot
from plugin.stripe.emulator.schedules import Schedules
from plugin.stripe.emulator.store import (
    LIST_PARAMS,
    WEBHOOK_MODES,
    EventSink,
    Store,
    WebhookMode,
)

V2_PAGE_DEFAULT = 20
V2_PAGE_MAX = 100


def _synchronized(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


def _forward(part: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` of the part named `part`, under the lock (looked up per call: `reset` replaces the parts)."""

    @functools.wraps(method)
    def locked(self: EmulatorState, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(getattr(self, part), *args, **kwargs)
    return locked


class EmulatorState:
    """One Stripe test-mode account."""

    def __init__(self, clock: Clock = time.time, *, strict_concurrency: bool = True, on_event: EventSink | None = None,
                 webhook_mode: WebhookMode = "snapshot", invoice_grace_seconds: int = DEFAULT_GRACE_SECONDS):
        self.clock = clock
        self.strict_concurrency = strict_concurrency
        """Answer 429 when a v1 meter event arrives while another one of the same customer and meter runs."""
        self.on_event = on_event
        self.default_webhook_mode = _checked_mode(webhook_mode)
        """What the webhook endpoint receives after a `reset`: v1 snapshot events or thin notifications."""
        self.default_invoice_grace_seconds = invoice_grace_seconds
        """A cycle draft's wait before it finalizes itself, after a `reset`."""
        self._lock = threading.RLock()
        self._clear()

    def _clear(self) -> None:
        self.store = Store(self.clock, self.on_event, self.default_webhook_mode)
        self.catalog = Catalog(self.store)
        self.meter_events = MeterEvents(self.store, self.catalog)
        self.invoices = Invoices(self.store, self.catalog, self.meter_events, self.default_invoice_grace_seconds)
        self.schedules = Schedules(self.store, self.catalog)
        self.catalog.at_renewal = self.schedules.at_renewal
        self.idempotency = IdempotencyStore()
        self.faults = Faults()
        self.calls: Counter[str] = Counter()

    @_synchronized
    def reset(self) -> None:
        """Forget everything (objects, events, keys, faults, counters, summary lag; webhook mode and invoice
        grace back to their start-up values); clock and webhook sink stay."""
        self._clear()

    def now(self) -> int:
        return int(self.clock())

    # -------------------------------------------------------------------------- Stripe objects

    create_customer = _forward("catalog", Catalog.create_customer)
    list_customers = _forward("catalog", Catalog.list_customers)
    create_product = _forward("catalog", Catalog.create_product)
    list_products = _forward("catalog", Catalog.list_products)
    create_price = _forward("catalog", Catalog.create_price)
    list_prices = _forward("catalog", Catalog.list_prices)
    create_subscription = _forward("catalog", Catalog.create_subscription)
    create_subscription_item = _forward("catalog", Catalog.create_subscription_item)
    list_subscriptions = _forward("catalog", Catalog.list_subscriptions)
    create_subscription_schedule = _forward("schedules", Schedules.create_schedule)
    update_subscription_schedule = _forward("schedules", Schedules.update_schedule)
    list_subscription_schedules = _forward("schedules", Schedules.list_schedules)
    create_meter = _forward("catalog", Catalog.create_meter)
    set_meter_active = _forward("catalog", Catalog.set_meter_active)
    list_meters = _forward("catalog", Catalog.list_meters)

    release_meter_event_slot = _forward("meter_events", MeterEvents.release_meter_event_slot)
    create_meter_event = _forward("meter_events", MeterEvents.create_meter_event)
    create_meter_event_session = _forward("meter_events", MeterEvents.create_meter_event_session)
    check_session_token = _forward("meter_events", MeterEvents.check_session_token)
    accept_meter_event_stream = _forward("meter_events", MeterEvents.accept_meter_event_stream)
    meter_event_summaries = _forward("meter_events", MeterEvents.meter_event_summaries)
    meter_event_log = _forward("meter_events", MeterEvents.meter_event_log)
    set_summary_lag = _forward("meter_events", MeterEvents.set_summary_lag)
    forget_meter_event = _forward("meter_events", MeterEvents.forget_meter_event)

    @_synchronized
    def summary_lag(self) -> int:
        """Seconds a received event stays out of summaries; back to 0 on `reset` (it lives in `meter_events`)."""
        return self.meter_events.summary_lag_seconds

    preview_invoice = _forward("invoices", Invoices.preview_invoice)
    finalize_period = _forward("invoices", Invoices.finalize_period)
    list_invoices = _forward("invoices", Invoices.list_invoices)
    list_invoice_lines = _forward("invoices", Invoices.list_invoice_lines)
    update_invoice = _forward("invoices", Invoices.update_invoice)
    finalize_invoice = _forward("invoices", Invoices.finalize_invoice)
    create_invoice_item = _forward("invoices", Invoices.create_invoice_item)
    list_invoice_items = _forward("invoices", Invoices.list_invoice_items)
    run_due_billing = _forward("invoices", Invoices.run_due)
    """Close ended periods and finalize drafts whose grace is over; the app runs it on every call and clock move."""

    @_synchronized
    def set_invoice_grace(self, seconds: int) -> int:
        """Seconds a new cycle draft waits before it finalizes itself (Stripe: 1 h, up to 72 h)."""
        if seconds < 0:
            raise InvalidParam("seconds must be 0 or more.", "seconds")
        self.invoices.grace_seconds = seconds
        return seconds

    @_synchronized
    def invoice_grace(self) -> int:
        return self.invoices.grace_seconds

    @_synchronized
    def set_webhook_mode(self, mode: str) -> str:
        """``snapshot`` (v1 events, the object inline) or ``thin`` (v2 notifications, as event destinations send)."""
        self.store.webhook_mode = _checked_mode(mode, param="mode")
        return mode

    @_synchronized
    def webhook_mode(self) -> str:
        return self.store.webhook_mode

    @_synchronized
    def claim_meter_event_slot(self, raw: Mapping[str, Any]) -> Slot | None:
        """The v1 customer+meter slot to release after the call; None in lenient mode (see `strict_concurrency`)."""
        return self.meter_events.claim_meter_event_slot(raw) if self.strict_concurrency else None

    @_synchronized
    def retrieve(self, kind: str, object_id: str, params: Params) -> dict[str, Any]:
        params.only()
        return self.store.get(kind, object_id)

    @_synchronized
    def list_events(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "type")
        event_type = params.text("type")
        return self.store.page("event", params, lambda event: event_type in (None, event["type"]))

    @_synchronized
    def list_thin_events(self, params: Params) -> dict[str, Any]:
        """``GET /v2/core/events``: newest first, by `object_id` (the related object) and `types`; v2 pages
        name the next page by URL (`page` is the last id shown), which the SDK's v2 list follows."""
        params.only("limit", "page", "object_id", "types")
        object_id, types = params.text("object_id"), params.texts("types")
        limit = params.integer("limit", minimum=1) or V2_PAGE_DEFAULT
        if limit > V2_PAGE_MAX:
            raise InvalidParam(f"limit must be at most {V2_PAGE_MAX}.", "limit")

        def keep(event: dict[str, Any]) -> bool:
            related = event.get("related_object") or {}
            return object_id in (None, related.get("id")) and (not types or event["type"] in types)

        events = self.store.newest_first("thin_event", keep)
        cursor = params.text("page")
        if cursor is not None:
            position = next((index for index, event in enumerate(events) if event["id"] == cursor), None)
            if position is None:
                raise InvalidParam(f"Invalid page: {cursor}", "page")
            events = events[position + 1:]
        shown = events[:limit]
        next_page_url = None
        if len(events) > limit:
            query = [("limit", limit), ("page", shown[-1]["id"])]
            query += [("object_id", object_id)] if object_id else []
            query += [(f"types[{index}]", name) for index, name in enumerate(types)]
            next_page_url = f"/v2/core/events?{urlencode(query)}"
        return {"data": shown, "next_page_url": next_page_url, "previous_page_url": None}

    # -------------------------------------------------------------------------- the request pipeline's switches

    take_fault = _forward("faults", Faults.take)
    add_fault = _forward("faults", Faults.add)
    set_delay = _forward("faults", Faults.set_delay)
    fault_settings = _forward("faults", Faults.settings)
    idempotency_finish = _forward("idempotency", IdempotencyStore.finish)
    idempotency_abandon = _forward("idempotency", IdempotencyStore.abandon)

    @_synchronized
    def idempotency_begin(self, key: str, fingerprint: str) -> StoredResponse | None:
        return self.idempotency.begin(key, fingerprint, self.clock())

    @_synchronized
    def count_call(self, method: str, path: str) -> None:
        self.calls[f"{method} {path}"] += 1

    @_synchronized
    def call_counts(self) -> dict[str, int]:
        return dict(self.calls)


def _checked_mode(mode: str, param: str = "webhook_mode") -> WebhookMode:
    if mode not in WEBHOOK_MODES:
        raise InvalidParam(f"Invalid {param}: must be one of {', '.join(WEBHOOK_MODES)}", param)
    return mode  # type: ignore[return-value]  # checked against WEBHOOK_MODES just above
