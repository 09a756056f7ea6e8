"""The emulator's Stripe account: one object the app calls, composed of the modules that hold the rules.

Pure rules with no HTTP: every method takes decoded params (`forms.Params`) and returns the JSON-ready
object Stripe would answer with, or raises `ApiError` / `forms.InvalidParam` with Stripe's error
fields. Time comes from an injected clock (a callable returning epoch seconds), so the 24 h identifier
window, the 35-day / 5-minute timestamp window and session expiry are testable without sleeping.

Where the rules live: `catalog` (customers, products, prices, subscriptions, meters), `meter_events`
(v1/v2 ingestion, sessions, summaries), `invoices`, `idempotency`, `faults`; all of them keep their
objects in one `store.Store`. This class only adds the lock: every public method holds it, because the
state may be shared by the event loop and test threads.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from plugin.stripe.emulator.catalog import Catalog
from plugin.stripe.emulator.clock import Clock
from plugin.stripe.emulator.faults import Faults
from plugin.stripe.emulator.forms import Params
from plugin.stripe.emulator.idempotency import IdempotencyStore, StoredResponse
from plugin.stripe.emulator.invoices import Invoices
from plugin.stripe.emulator.meter_events import MeterEvents, Slot
from plugin.stripe.emulator.store import LIST_PARAMS, EventSink, Store


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

    def __init__(self, clock: Clock = time.time, *, strict_concurrency: bool = True, on_event: EventSink | None = None):
        self.clock = clock
        self.strict_concurrency = strict_concurrency
        """Answer 429 when a v1 meter event arrives while another one of the same customer and meter runs."""
        self.on_event = on_event
        self._lock = threading.RLock()
        self._clear()

    def _clear(self) -> None:
        self.store = Store(self.clock, self.on_event)
        self.catalog = Catalog(self.store)
        self.meter_events = MeterEvents(self.store, self.catalog)
        self.invoices = Invoices(self.store, self.meter_events)
        self.idempotency = IdempotencyStore()
        self.faults = Faults()
        self.calls: Counter[str] = Counter()

    @_synchronized
    def reset(self) -> None:
        """Forget everything (objects, events, keys, faults, counters, summary lag); clock and webhook sink stay."""
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

    @_synchronized
    def claim_meter_event_slot(self, raw: Mapping[str, Any]) -> Slot | None:
        """The v1 customer+meter slot to release after the call; None in lenient mode (see `strict_concurrency`)."""
        return self.meter_events.claim_meter_event_slot(raw) if self.strict_concurrency else None

    @_synchronized
    def retrieve(self, kind: str, object_id: str, params: Params) -> dict[str, Any]:
        params.only()
        found = self.store.get(kind, object_id)
        return self.catalog.with_current_period(found) if kind == "subscription" else found

    @_synchronized
    def list_events(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "type")
        event_type = params.text("type")
        return self.store.page("event", params, lambda event: event_type in (None, event["type"]))

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
