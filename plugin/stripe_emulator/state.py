"""The emulator's Stripe account: objects, meter events, idempotency and fault switches, all in memory.

Pure rules with no HTTP: every method takes decoded params (`forms.Params`) and returns the JSON-ready
object Stripe would answer with, or raises `ApiError` / `forms.InvalidParam` with Stripe's error
fields. Time comes from an injected clock (a callable returning epoch seconds), so the 24 h identifier
window, the 35-day / 5-minute timestamp window and session expiry are testable without sleeping.
Every public method holds one lock: the state may be shared by the event loop and test threads.
"""

from __future__ import annotations

import functools
import itertools
import math
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

from plugin.stripe_emulator.forms import InvalidParam, Params, parse_decimal

Clock = Callable[[], float]
"""Epoch seconds, like `time.time`."""
EventSink = Callable[[dict[str, Any]], None]
"""Receives every Stripe `event` the account emits (webhook delivery hooks in here)."""

API_VERSION = "2026-10-28.endive"
"""What stripe-python 16.1.0 pins; stamped on events."""
DAY = 86_400
IDENTIFIER_WINDOW_SECONDS = DAY
IDEMPOTENCY_WINDOW_SECONDS = DAY
TIMESTAMP_PAST_SECONDS = 35 * DAY
TIMESTAMP_FUTURE_SECONDS = 5 * 60
SESSION_SECONDS = 15 * 60
MAX_STREAM_EVENTS = 100
MAX_IDENTIFIER_LENGTH = 100
LIST_PAGE_MAX = 100


class ApiError(Exception):
    """An error answer in Stripe's shape; the SDK picks its exception class from `status` and `type`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    @classmethod
    def from_invalid_param(cls, error: InvalidParam) -> ApiError:
        return cls(400, error.message, code=error.code, param=error.param)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def rate_limited(message: str) -> ApiError:
    return ApiError(429, message, code="rate_limit")


def injected_error(status: int) -> ApiError:
    """The answer of a fault switch: Stripe's shape for that status (so 429 -> RateLimitError, 5xx -> APIError)."""
    if status == 429:
        return rate_limited("Request rate limit exceeded (injected by the emulator's fault switch).")
    if status >= 500:
        return ApiError(status, "An unexpected error occurred (injected by the emulator's fault switch).",
                        type="api_error")
    return ApiError(status, "Request refused (injected by the emulator's fault switch).")


def not_found(label: str, object_id: str, param: str = "id") -> ApiError:
    return ApiError(404, f"No such {label}: '{object_id}'", code="resource_missing", param=param)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def rfc3339(timestamp: float) -> str:
    """v2 APIs write times as RFC 3339 strings with milliseconds, in UTC."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> int | None:
    """Epoch seconds from an RFC 3339 string with a zone; None when it is not one."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return None if moment.tzinfo is None else math.floor(moment.timestamp())


def month_period(timestamp: float) -> tuple[int, int]:
    """The calendar month (UTC) containing `timestamp`, as [start, end) epoch seconds."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return int(start.timestamp()), int(end.timestamp())


def decimal_text(number: Decimal) -> str:
    """Plain notation, never an exponent (Stripe writes ``"0.0001"``, not ``"1E-4"``)."""
    return format(number, "f")


def json_number(number: Decimal) -> int | float:
    """An aggregated value for JSON: exact when whole (micro-credit sums exceed a float's 2**53 soon)."""
    return int(number) if number == number.to_integral_value() else float(number)


# ------------------------------------------------------------------------------ money


@dataclass(frozen=True)
class Tier:
    up_to: int | None
    """Last unit of the tier (inclusive); None is ``inf``."""
    unit_amount: Fraction
    """Cents per unit."""
    flat_amount: Fraction
    """Cents for the tier as a whole."""


def graduated_amount(tiers: Sequence[Tier], quantity: Fraction) -> Fraction:
    """Each tier prices the units that fall into it, plus its flat fee once entered.

    The first tier is always entered (its flat fee is charged even for zero usage), as Stripe does.
    """
    total, lower = Fraction(0), 0
    for index, tier in enumerate(tiers):
        upper = quantity if tier.up_to is None else min(quantity, Fraction(tier.up_to))
        units = max(upper - lower, Fraction(0))
        if units > 0 or index == 0:
            total += units * tier.unit_amount + tier.flat_amount
        if tier.up_to is None or quantity <= tier.up_to:
            break
        lower = tier.up_to
    return total


def volume_amount(tiers: Sequence[Tier], quantity: Fraction) -> Fraction:
    """All units at the price of the tier the total quantity lands in."""
    tier = next(tier for tier in tiers if tier.up_to is None or quantity <= tier.up_to)
    return quantity * tier.unit_amount + tier.flat_amount


def round_half_up(amount: Fraction) -> int:
    """Whole cents, halves away from zero (amounts here are never negative)."""
    return math.floor(amount + Fraction(1, 2))


def _fraction(decimal_string: str | None) -> Fraction:
    return Fraction(Decimal(decimal_string)) if decimal_string is not None else Fraction(0)


def price_tiers(price: Mapping[str, Any]) -> list[Tier]:
    return [
        Tier(tier["up_to"], _fraction(tier["unit_amount_decimal"]), _fraction(tier["flat_amount_decimal"]))
        for tier in price.get("tiers") or []
    ]


def price_amount(price: Mapping[str, Any], quantity: Fraction) -> Fraction:
    """What `quantity` units of `price` cost, in (fractional) cents."""
    if price["billing_scheme"] == "tiered":
        tiers = price_tiers(price)
        tiered = graduated_amount if price["tiers_mode"] == "graduated" else volume_amount
        return tiered(tiers, quantity)
    return quantity * _fraction(price["unit_amount_decimal"])


# ------------------------------------------------------------------------------ lists


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


LIST_PARAMS = ("limit", "starting_after", "ending_before")


# ------------------------------------------------------------------------------ idempotency


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: str
    """The JSON text as first sent: a replay repeats it even if the object changed since."""


@dataclass
class _Remembered:
    fingerprint: str
    created: float
    response: StoredResponse | None = None
    """None while the first request with this key is still running."""


class IdempotencyStore:
    """Stripe's Idempotency-Key rule: same key and same params replay the first answer, for 24 h."""

    def __init__(self, window_seconds: float = IDEMPOTENCY_WINDOW_SECONDS):
        self.window_seconds = window_seconds
        self._entries: dict[str, _Remembered] = {}
        self._by_age: deque[tuple[float, str]] = deque()

    def begin(self, key: str, fingerprint: str, now: float) -> StoredResponse | None:
        """The response to replay, or None when this request must run (and is now marked in progress)."""
        self._forget_older_than(now - self.window_seconds)
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Remembered(fingerprint, now)
            self._by_age.append((now, key))
            return None
        if entry.fingerprint != fingerprint:
            raise ApiError(
                400,
                "Keys for idempotent requests can only be used with the same parameters they were first used with. "
                f"Try using a key other than '{key}' if you meant to execute a different request.",
                type="idempotency_error",
            )
        if entry.response is None:
            raise ApiError(
                409,
                "There is currently another in-progress request using this Idempotent Key (that probably means you "
                f"submitted twice, and the other request is still going through): {key}. Please try again later.",
                code="idempotency_key_in_use",
            )
        return entry.response

    def finish(self, key: str, response: StoredResponse) -> None:
        entry = self._entries.get(key)
        if entry is not None:  # None: a reset forgot the key while its request ran; nothing to replay then
            entry.response = response

    def abandon(self, key: str) -> None:
        """The request never ran to an answer (crashed): the key may be used afresh."""
        self._entries.pop(key, None)

    def _forget_older_than(self, cutoff: float) -> None:
        while self._by_age and self._by_age[0][0] <= cutoff:
            created, key = self._by_age.popleft()
            entry = self._entries.get(key)
            if entry is not None and entry.created == created:
                del self._entries[key]


# ------------------------------------------------------------------------------ fault switches


@dataclass
class FaultRule:
    remaining: int
    status: int
    path_prefix: str | None
    after_record: bool
    """False: fail before the request does anything. True: do the work, then answer the error anyway
    (an "ambiguous" failure: the caller cannot know the event was recorded)."""


@dataclass
class Faults:
    """Switches a test flips through the control API: fail the next N calls, add latency."""

    rules: list[FaultRule] = field(default_factory=list)
    delay_ms: int = 0

    def add(self, count: int, status: int = 500, path_prefix: str | None = None, after_record: bool = False) -> None:
        if count < 0 or not 400 <= status <= 599:
            raise ValueError("count must be >= 0 and status a 4xx/5xx code")
        self.rules.append(FaultRule(count, status, path_prefix, after_record))

    def take(self, path: str, *, after_record: bool) -> int | None:
        """The status to fail this call with (consuming one use of the first matching rule), or None."""
        for rule in self.rules:
            if rule.after_record == after_record and rule.remaining > 0 and path.startswith(rule.path_prefix or ""):
                rule.remaining -= 1
                return rule.status
        return None


class AdjustableClock:
    """Wall time plus an offset the control API can move forward, to test time windows from outside."""

    def __init__(self, base: Clock = time.time):
        self._base = base
        self.offset = 0.0

    def __call__(self) -> float:
        return self._base() + self.offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.offset += seconds


# ------------------------------------------------------------------------------ meter events


@dataclass(frozen=True)
class MeterEventInput:
    """One meter event as sent on v1 or v2, after its shape was checked."""

    event_name: str
    payload: dict[str, str]
    identifier: str | None
    timestamp: int | None


class EventRejected(Exception):
    """A meter event Stripe would not record: `code` is the code of Stripe's meter error reports."""

    def __init__(self, code: str, message: str, param: str | None = None, meter_id: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param, self.meter_id = code, message, param, meter_id


def _synchronized(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
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
        self._objects: dict[str, dict[str, dict[str, Any]]] = {
            kind: {} for kind in ("customer", "product", "price", "subscription", "meter", "invoice", "event")
        }
        self._price_by_lookup_key: dict[str, str] = {}
        self._active_meter_by_event_name: dict[str, str] = {}
        self._sessions: dict[str, float] = {}
        self._identifiers: dict[str, float] = {}
        self._identifiers_by_age: deque[tuple[float, str]] = deque()
        self._usage: dict[tuple[str, str], list[tuple[int, Decimal]]] = {}
        self._busy_meter_slots: set[tuple[str, str]] = set()
        self.meter_events: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []
        self.duplicates = 0
        self.idempotency = IdempotencyStore()
        self.faults = Faults()
        self.calls: Counter[str] = Counter()

    @_synchronized
    def reset(self) -> None:
        """Forget everything (objects, events, keys, faults, counters); clock and webhook sink stay."""
        self._clear()

    def now(self) -> int:
        return int(self.clock())

    # -------------------------------------------------------------------------- plumbing

    def _get(self, kind: str, object_id: str, label: str, param: str = "id") -> dict[str, Any]:
        found = self._objects[kind].get(object_id)
        if found is None:
            raise not_found(label, object_id, param)
        return found

    def _newest_first(self, kind: str, keep: Callable[[dict[str, Any]], bool] = lambda _: True) -> list[dict[str, Any]]:
        return [item for item in reversed(self._objects[kind].values()) if keep(item)]

    def _emit(self, event_type: str, data_object: dict[str, Any]) -> dict[str, Any]:
        event = {
            "id": new_id("evt"), "object": "event", "api_version": API_VERSION, "created": self.now(),
            "data": {"object": data_object}, "livemode": False, "pending_webhooks": 1 if self.on_event else 0,
            "request": {"id": None, "idempotency_key": None}, "type": event_type,
        }
        self._objects["event"][event["id"]] = event
        if self.on_event is not None:
            self.on_event(event)
        return event

    @_synchronized
    def count_call(self, method: str, path: str) -> None:
        self.calls[f"{method} {path}"] += 1

    @_synchronized
    def take_fault(self, path: str, *, after_record: bool) -> int | None:
        return self.faults.take(path, after_record=after_record)

    @_synchronized
    def add_fault(self, count: int, status: int = 500, path_prefix: str | None = None,
                  after_record: bool = False) -> None:
        self.faults.add(count, status, path_prefix, after_record)

    @_synchronized
    def set_delay(self, milliseconds: int) -> None:
        if milliseconds < 0:
            raise ValueError("the delay cannot be negative")
        self.faults.delay_ms = milliseconds

    @_synchronized
    def fault_settings(self) -> dict[str, Any]:
        return {"delay_ms": self.faults.delay_ms, "rules": [vars(rule).copy() for rule in self.faults.rules]}

    @_synchronized
    def call_counts(self) -> dict[str, int]:
        return dict(self.calls)

    @_synchronized
    def idempotency_begin(self, key: str, fingerprint: str) -> StoredResponse | None:
        return self.idempotency.begin(key, fingerprint, self.clock())

    @_synchronized
    def idempotency_finish(self, key: str, response: StoredResponse) -> None:
        self.idempotency.finish(key, response)

    @_synchronized
    def idempotency_abandon(self, key: str) -> None:
        self.idempotency.abandon(key)

    # -------------------------------------------------------------------------- customers and products

    @_synchronized
    def create_customer(self, params: Params) -> dict[str, Any]:
        params.only("email", "name", "metadata", "description", "phone")
        customer = {
            "id": new_id("cus"), "object": "customer", "created": self.now(), "livemode": False,
            "email": params.text("email", max_length=512), "name": params.text("name", max_length=256),
            "description": params.text("description"), "phone": params.text("phone", max_length=20),
            "metadata": params.strings("metadata"), "balance": 0, "currency": None, "delinquent": False,
        }
        self._objects["customer"][customer["id"]] = customer
        self._emit("customer.created", customer)
        return customer

    @_synchronized
    def retrieve(self, kind: str, object_id: str, params: Params) -> dict[str, Any]:
        params.only()
        labels = {"customer": "customer", "product": "product", "price": "price", "subscription": "subscription",
                  "meter": "billing meter", "invoice": "invoice", "event": "event"}
        found = self._get(kind, object_id, labels[kind])
        return self._with_current_period(found) if kind == "subscription" else found

    @_synchronized
    def list_customers(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "email")
        email = params.text("email")
        items = self._newest_first("customer", lambda customer: email is None or customer["email"] == email)
        return paginate(items, "/v1/customers", params)

    @_synchronized
    def create_product(self, params: Params) -> dict[str, Any]:
        params.only("id", "name", "metadata", "description", "active", "unit_label")
        product_id = params.text("id", max_length=255) or new_id("prod")
        if product_id in self._objects["product"]:
            raise ApiError(400, f"Product already exists: '{product_id}'", code="resource_already_exists", param="id")
        now = self.now()
        product = {
            "id": product_id, "object": "product", "created": now, "updated": now, "livemode": False,
            "name": params.text("name", required=True), "description": params.text("description"),
            "active": params.boolean("active") is not False, "metadata": params.strings("metadata"),
            "unit_label": params.text("unit_label", max_length=12), "default_price": None, "type": "service",
        }
        self._objects["product"][product_id] = product
        return product

    @_synchronized
    def list_products(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "active")
        active = params.boolean("active")
        items = self._newest_first("product", lambda product: active is None or product["active"] == active)
        return paginate(items, "/v1/products", params)

    # -------------------------------------------------------------------------- prices

    @_synchronized
    def create_price(self, params: Params) -> dict[str, Any]:
        params.only("product", "currency", "unit_amount", "unit_amount_decimal", "recurring", "billing_scheme",
                    "tiers_mode", "tiers", "lookup_key", "transfer_lookup_key", "nickname", "metadata", "active",
                    "tax_behavior")
        product_id = params.text("product", required=True)
        self._get("product", product_id, "product", param="product")
        currency = params.text("currency", required=True).lower()
        if len(currency) != 3 or not currency.isalpha():
            raise InvalidParam(f"Invalid currency: {currency}", "currency")
        scheme = params.text("billing_scheme", choices=("per_unit", "tiered")) or "per_unit"
        unit_amount = self._price_unit_amount(params, scheme)
        tiers_mode, tiers = self._price_tiers(params, scheme)
        lookup_key = params.text("lookup_key", max_length=200)
        transfer_lookup_key = bool(params.boolean("transfer_lookup_key"))
        recurring = self._price_recurring(params.child("recurring"))
        price = {
            "id": new_id("price"), "object": "price", "created": self.now(), "livemode": False,
            "active": params.boolean("active") is not False, "product": product_id, "currency": currency,
            "billing_scheme": scheme, "tiers_mode": tiers_mode, "custom_unit_amount": None,
            "unit_amount": _whole_or_none(unit_amount),
            "unit_amount_decimal": None if unit_amount is None else decimal_text(unit_amount),
            "recurring": recurring, "type": "recurring" if recurring else "one_time",
            "lookup_key": lookup_key, "nickname": params.text("nickname"), "metadata": params.strings("metadata"),
            "tax_behavior": params.text("tax_behavior", choices=("exclusive", "inclusive", "unspecified"))
            or "unspecified",
            "transform_quantity": None,
        }
        if tiers is not None:
            price["tiers"] = tiers
        self._claim_lookup_key(lookup_key, transfer_lookup_key)  # last: a refused price must not move the key
        self._objects["price"][price["id"]] = price
        if lookup_key is not None:
            self._price_by_lookup_key[lookup_key] = price["id"]
        return price

    @staticmethod
    def _price_unit_amount(params: Params, scheme: str) -> Decimal | None:
        whole = params.integer("unit_amount", minimum=0)
        exact = params.decimal("unit_amount_decimal")
        if whole is not None and exact is not None:
            raise InvalidParam("You may only specify one of these parameters: unit_amount, unit_amount_decimal.",
                               "unit_amount", "parameters_exclusive")
        amount = Decimal(whole) if whole is not None else exact
        if scheme == "tiered" and amount is not None:
            raise InvalidParam("unit_amount cannot be set when billing_scheme=tiered; put amounts in tiers.",
                               "unit_amount")
        if scheme == "per_unit" and amount is None:
            raise InvalidParam("Missing required param: unit_amount.", "unit_amount", "parameter_missing")
        return amount

    @staticmethod
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

    def _claim_lookup_key(self, lookup_key: str | None, transfer: bool) -> None:
        holder = self._price_by_lookup_key.get(lookup_key) if lookup_key is not None else None
        if holder is None:
            return
        if not transfer:
            raise InvalidParam(f"A price (`{holder}`) already uses that lookup key.", "lookup_key")
        self._objects["price"][holder]["lookup_key"] = None

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
            self._get("meter", meter_id, "billing meter", param="recurring[meter]")
        return {
            "interval": recurring.text("interval", required=True, choices=("day", "week", "month", "year")),
            "interval_count": recurring.integer("interval_count", minimum=1) or 1,
            "usage_type": usage_type, "meter": meter_id,
            "trial_period_days": recurring.integer("trial_period_days", minimum=0),
        }

    @_synchronized
    def list_prices(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "active", "product", "lookup_keys", "currency", "type")
        active, product, currency = params.boolean("active"), params.text("product"), params.text("currency")
        price_type = params.text("type", choices=("one_time", "recurring"))
        lookup_keys = set(params.texts("lookup_keys"))

        def keep(price: dict[str, Any]) -> bool:
            return ((active is None or price["active"] == active) and product in (None, price["product"])
                    and currency in (None, price["currency"]) and price_type in (None, price["type"])
                    and (not lookup_keys or price["lookup_key"] in lookup_keys))

        return paginate(self._newest_first("price", keep), "/v1/prices", params)

    # -------------------------------------------------------------------------- subscriptions

    @_synchronized
    def create_subscription(self, params: Params) -> dict[str, Any]:
        params.only("customer", "items", "metadata", "collection_method", "days_until_due", "description",
                    "payment_behavior")
        customer_id = params.text("customer", required=True)
        self._get("customer", customer_id, "customer", param="customer")
        subscription_id, now = new_id("sub"), self.now()
        items = [self._subscription_item(item, subscription_id, now)
                 for item in params.children("items", required=True)]
        prices = [item["price"] for item in items]
        if len({price["currency"] for price in prices}) > 1:
            raise InvalidParam("All prices on a subscription must have the same currency.", "items")
        if len({price["id"] for price in prices}) < len(prices):
            raise InvalidParam("Cannot add multiple subscription items with the same price.", "items")
        subscription = {
            "id": subscription_id, "object": "subscription", "created": now, "livemode": False,
            "customer": customer_id, "status": "active", "currency": prices[0]["currency"],
            "collection_method": params.text("collection_method", choices=("charge_automatically", "send_invoice"))
            or "charge_automatically",
            "days_until_due": params.integer("days_until_due", minimum=0), "description": params.text("description"),
            "billing_cycle_anchor": now, "start_date": now, "cancel_at_period_end": False, "canceled_at": None,
            "metadata": params.strings("metadata"),
            "items": {"object": "list", "data": items, "has_more": False, "total_count": len(items),
                      "url": f"/v1/subscription_items?subscription={subscription_id}"},
        }
        self._objects["subscription"][subscription_id] = subscription
        return self._with_current_period(subscription)

    def _subscription_item(self, item: Params, subscription_id: str, now: int) -> dict[str, Any]:
        item.only("price", "quantity", "metadata")
        price = self._get("price", item.text("price", required=True), "price", param=item.name("price"))
        if price["recurring"] is None:
            raise InvalidParam(f"The price specified ({price['id']}) is not recurring.", item.name("price"))
        quantity = item.integer("quantity", minimum=0)
        metered = price["recurring"]["usage_type"] == "metered"
        if metered and quantity is not None:
            raise InvalidParam("Quantity should not be specified where usage_type is `metered`. Remove quantity "
                               f"from `{item.name('quantity')}` and try again.", item.name("quantity"))
        entry = {"id": new_id("si"), "object": "subscription_item", "created": now, "price": price,
                 "subscription": subscription_id, "metadata": item.strings("metadata")}
        if not metered:
            entry["quantity"] = 1 if quantity is None else quantity
        return entry

    def _with_current_period(self, subscription: dict[str, Any]) -> dict[str, Any]:
        """Current period fields, on the subscription and (as Stripe now puts them) on each item."""
        start, end = month_period(self.clock())
        period = {"current_period_start": start, "current_period_end": end}
        items = [{**item, **period} for item in subscription["items"]["data"]]
        return {**subscription, **period, "items": {**subscription["items"], "data": items}}

    @_synchronized
    def list_subscriptions(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "customer", "price", "status")
        customer, price, status = params.text("customer"), params.text("price"), params.text("status") or "active"

        def keep(subscription: dict[str, Any]) -> bool:
            prices = {item["price"]["id"] for item in subscription["items"]["data"]}
            return (customer in (None, subscription["customer"]) and (price is None or price in prices)
                    and status in ("all", subscription["status"]))

        items = [self._with_current_period(sub) for sub in self._newest_first("subscription", keep)]
        return paginate(items, "/v1/subscriptions", params)

    # -------------------------------------------------------------------------- meters

    @_synchronized
    def create_meter(self, params: Params) -> dict[str, Any]:
        params.only("display_name", "event_name", "default_aggregation", "customer_mapping", "value_settings",
                    "event_time_window")
        event_name = params.text("event_name", required=True, max_length=100)
        if event_name in self._active_meter_by_event_name:
            raise ApiError(400, f"An active meter with event_name '{event_name}' already exists.",
                           code="resource_already_exists", param="event_name")
        aggregation = params.child("default_aggregation", required=True).only("formula")
        mapping, values = params.child("customer_mapping"), params.child("value_settings")
        customer_key, value_key = "stripe_customer_id", "value"
        if mapping is not None:
            mapping.only("event_payload_key", "type")
            mapping.text("type", required=True, choices=("by_id",))
            customer_key = mapping.text("event_payload_key", required=True, max_length=100)
        if values is not None:
            value_key = values.only("event_payload_key").text("event_payload_key", required=True, max_length=100)
        now = self.now()
        meter = {
            "id": new_id("mtr"), "object": "billing.meter", "created": now, "updated": now, "livemode": False,
            "display_name": params.text("display_name", required=True, max_length=250), "event_name": event_name,
            "default_aggregation": {
                "formula": aggregation.text("formula", required=True, choices=("sum", "count", "last")),
            },
            "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
            "value_settings": {"event_payload_key": value_key},
            "event_time_window": params.text("event_time_window", choices=("day", "hour")),
            "status": "active", "status_transitions": {"deactivated_at": None},
        }
        self._objects["meter"][meter["id"]] = meter
        self._active_meter_by_event_name[event_name] = meter["id"]
        return meter

    @_synchronized
    def set_meter_active(self, meter_id: str, active: bool, params: Params) -> dict[str, Any]:
        """Deactivate (events for its event_name are then refused) or reactivate a meter."""
        params.only()
        meter = self._get("meter", meter_id, "billing meter")
        holder = self._active_meter_by_event_name.get(meter["event_name"])
        if active and holder not in (None, meter_id):
            raise ApiError(400, f"An active meter with event_name '{meter['event_name']}' already exists.",
                           code="resource_already_exists")
        if active:
            self._active_meter_by_event_name[meter["event_name"]] = meter_id
        elif holder == meter_id:
            del self._active_meter_by_event_name[meter["event_name"]]
        meter.update(status="active" if active else "inactive", updated=self.now(),
                     status_transitions={"deactivated_at": None if active else self.now()})
        return meter

    @_synchronized
    def list_meters(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "status")
        status = params.text("status", choices=("active", "inactive"))
        items = self._newest_first("meter", lambda meter: status in (None, meter["status"]))
        return paginate(items, "/v1/billing/meters", params)

    @_synchronized
    def meter_event_summaries(self, meter_id: str, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "customer", "start_time", "end_time", "value_grouping_window")
        meter = self._get("meter", meter_id, "billing meter")
        customer = params.text("customer", required=True)
        start, end = params.integer("start_time", required=True), params.integer("end_time", required=True)
        for name, value in (("start_time", start), ("end_time", end)):
            if value % 60:
                raise InvalidParam(f"{name} must be aligned with minute boundaries.", name)
        if start >= end:
            raise InvalidParam("start_time must be before end_time.", "start_time")
        window = {"hour": 3600, "day": DAY, None: None}[params.text("value_grouping_window", choices=("day", "hour"))]
        usage = self._usage.get((meter_id, customer), [])
        summaries = [
            {"id": f"mtrsum_{meter_id[4:]}_{window_start}", "object": "billing.meter_event_summary",
             "livemode": False, "meter": meter_id, "start_time": window_start, "end_time": window_end,
             "aggregated_value": json_number(aggregate(meter["default_aggregation"]["formula"],
                                                      usage, window_start, window_end))}
            for window_start, window_end in grouping_windows(start, end, window)
        ]
        return paginate(summaries, f"/v1/billing/meters/{meter_id}/event_summaries", params)

    # -------------------------------------------------------------------------- meter events

    @_synchronized
    def claim_meter_event_slot(self, raw: Mapping[str, Any]) -> tuple[str, str] | None:
        """Stripe's "one concurrent call per customer per meter" on v1: 429 while another one runs.

        Returns the slot to release when the call is done, or None when there is nothing to hold
        (lenient mode, or a request too malformed to name a customer and meter: it fails later).
        """
        if not self.strict_concurrency:
            return None
        event_name, payload = raw.get("event_name"), raw.get("payload")
        meter_id = self._active_meter_by_event_name.get(event_name) if isinstance(event_name, str) else None
        if meter_id is None or not isinstance(payload, Mapping):
            return None
        customer = payload.get(self._objects["meter"][meter_id]["customer_mapping"]["event_payload_key"])
        if not isinstance(customer, str):
            return None
        slot = (meter_id, customer)
        if slot in self._busy_meter_slots:
            raise rate_limited(
                f"Another meter event for customer '{customer}' on meter '{meter_id}' is still being processed: "
                "send one request at a time per customer and meter."
            )
        self._busy_meter_slots.add(slot)
        return slot

    @_synchronized
    def release_meter_event_slot(self, slot: tuple[str, str] | None) -> None:
        if slot is not None:
            self._busy_meter_slots.discard(slot)

    @_synchronized
    def create_meter_event(self, params: Params) -> dict[str, Any]:
        """v1: validated synchronously; a rejected or duplicate event is a 400 the caller sees now."""
        params.only("event_name", "payload", "identifier", "timestamp")
        event = MeterEventInput(
            event_name=params.text("event_name", required=True, max_length=100),
            payload=params.strings("payload", required=True),
            identifier=params.text("identifier", max_length=MAX_IDENTIFIER_LENGTH),
            timestamp=params.integer("timestamp"),
        )
        now = self.now()
        try:
            meter, customer, value = self._check_event(event, now)
        except EventRejected as rejected:
            self._reject(event, rejected, "v1", now)
            raise ApiError(400, rejected.message, code=rejected.code, param=rejected.param) from None
        identifier = event.identifier or new_id("evtid")
        if self._seen_identifier(identifier, now):
            self.duplicates += 1
            raise ApiError(
                400, f"A meter event with identifier '{identifier}' already exists: identifiers must be unique "
                "within a rolling 24-hour window.", code="resource_already_exists", param="identifier",
            )
        timestamp = event.timestamp if event.timestamp is not None else now
        self._record(event, identifier, timestamp, meter, customer, value, "v1", now)
        return {"object": "billing.meter_event", "created": now, "livemode": False, "event_name": event.event_name,
                "identifier": identifier, "payload": event.payload, "timestamp": timestamp}

    @_synchronized
    def create_meter_event_session(self, params: Params) -> dict[str, Any]:
        params.only()
        now = self.clock()
        self._sessions = {token: expiry for token, expiry in self._sessions.items() if expiry > now}
        token = f"mes_tok_{secrets.token_urlsafe(32)}"
        self._sessions[token] = now + SESSION_SECONDS
        return {"id": new_id("mes"), "object": "v2.billing.meter_event_session", "authentication_token": token,
                "created": rfc3339(now), "expires_at": rfc3339(now + SESSION_SECONDS), "livemode": False}

    @_synchronized
    def check_session_token(self, token: str) -> None:
        expiry = self._sessions.get(token)
        if expiry is None or expiry <= self.clock():
            raise ApiError(401, "The meter event session has expired or is not valid; create a new meter event "
                           "session.", code="billing_meter_event_session_expired")

    @_synchronized
    def accept_meter_event_stream(self, params: Params) -> None:
        """v2: the batch's shape is checked now; each event's content later, as Stripe does.

        A shape error refuses the whole batch (400). Otherwise every valid event is recorded (a known
        identifier is silently skipped) and the invalid ones are reported in one
        ``billing.meter.error_report_triggered`` event per meter; the caller's answer does not tell.
        """
        params.only("events")
        batch = params.children("events", required=True)
        if not 1 <= len(batch) <= MAX_STREAM_EVENTS:
            raise InvalidParam(f"events must contain between 1 and {MAX_STREAM_EVENTS} items; got {len(batch)}.",
                               "events")
        events = [_stream_event(item) for item in batch]
        now = self.now()
        rejected: list[tuple[MeterEventInput, EventRejected]] = []
        for event in events:
            try:
                meter, customer, value = self._check_event(event, now)
            except EventRejected as error:
                self._reject(event, error, "v2", now)
                rejected.append((event, error))
                continue
            identifier = event.identifier or new_id("evtid")
            if self._seen_identifier(identifier, now):
                self.duplicates += 1
                continue
            timestamp = event.timestamp if event.timestamp is not None else now
            self._record(event, identifier, timestamp, meter, customer, value, "v2", now)
        for report in error_reports(rejected, now):
            self._emit("billing.meter.error_report_triggered", report)

    def _check_event(self, event: MeterEventInput, now: int) -> tuple[dict[str, Any], str, Decimal]:
        """The meter, customer and value of a valid event; `EventRejected` with Stripe's code otherwise."""
        meter_id = self._active_meter_by_event_name.get(event.event_name)
        if meter_id is None:
            archived = any(meter["event_name"] == event.event_name for meter in self._objects["meter"].values())
            raise EventRejected("archived_meter" if archived else "no_meter",
                                f"No active meter was found for event_name '{event.event_name}'.", "event_name")
        meter = self._objects["meter"][meter_id]
        customer_key = meter["customer_mapping"]["event_payload_key"]
        customer = event.payload.get(customer_key)
        if not customer:
            raise EventRejected("meter_event_no_customer_defined",
                                f"The payload has no '{customer_key}': the meter maps customers by that key.",
                                f"payload[{customer_key}]", meter_id)
        if customer not in self._objects["customer"]:
            raise EventRejected("meter_event_customer_not_found", f"No such customer: '{customer}'",
                                f"payload[{customer_key}]", meter_id)
        value_key = meter["value_settings"]["event_payload_key"]
        value = self._event_value(event.payload.get(value_key), meter, f"payload[{value_key}]")
        if event.timestamp is not None and event.timestamp < now - TIMESTAMP_PAST_SECONDS:
            raise EventRejected("timestamp_too_far_in_past",
                                f"Timestamp {event.timestamp} is more than 35 days in the past.", "timestamp", meter_id)
        if event.timestamp is not None and event.timestamp > now + TIMESTAMP_FUTURE_SECONDS:
            raise EventRejected("timestamp_in_future",
                                f"Timestamp {event.timestamp} is more than 5 minutes in the future.", "timestamp",
                                meter_id)
        return meter, customer, value

    @staticmethod
    def _event_value(raw: str | None, meter: dict[str, Any], param: str) -> Decimal:
        if meter["default_aggregation"]["formula"] == "count" and raw is None:
            return Decimal(1)
        if raw is None:
            raise EventRejected("meter_event_value_not_found", f"The payload has no value at {param}.", param,
                                meter["id"])
        value = parse_decimal(raw)
        if value is None:
            raise EventRejected("meter_event_invalid_value", f"Invalid value: {raw!r} is not a number.", param,
                                meter["id"])
        return value

    def _seen_identifier(self, identifier: str, now: int) -> bool:
        cutoff = now - IDENTIFIER_WINDOW_SECONDS
        while self._identifiers_by_age and self._identifiers_by_age[0][0] <= cutoff:
            seen_at, old = self._identifiers_by_age.popleft()
            if self._identifiers.get(old) == seen_at:
                del self._identifiers[old]
        return identifier in self._identifiers

    def _record(self, event: MeterEventInput, identifier: str, timestamp: int, meter: dict[str, Any],
                customer: str, value: Decimal, source: str, now: int) -> None:
        self._identifiers[identifier] = now
        self._identifiers_by_age.append((now, identifier))
        self._usage.setdefault((meter["id"], customer), []).append((timestamp, value))
        self.meter_events.append({
            "identifier": identifier, "event_name": event.event_name, "meter": meter["id"], "customer": customer,
            "value": event.payload.get(meter["value_settings"]["event_payload_key"]), "timestamp": timestamp,
            "source": source, "received_at": now,
        })

    def _reject(self, event: MeterEventInput, error: EventRejected, source: str, now: int) -> None:
        self.rejections.append({
            "identifier": event.identifier, "event_name": event.event_name, "code": error.code,
            "message": error.message, "source": source, "received_at": now,
        })

    @_synchronized
    def meter_event_log(self, offset: int = 0) -> dict[str, Any]:
        """What the control API shows: recorded events (from `offset`), rejections and duplicate attempts."""
        return {"count": len(self.meter_events), "events": self.meter_events[offset:],
                "rejected": len(self.rejections), "duplicates": self.duplicates, "rejections": list(self.rejections)}

    # -------------------------------------------------------------------------- invoices

    @_synchronized
    def preview_invoice(self, params: Params) -> dict[str, Any]:
        """The invoice the current period would produce now (nothing is stored)."""
        params.only("customer", "subscription")
        customer, subscription_id = params.text("customer"), params.text("subscription")
        if subscription_id is not None:
            subscription = self._get("subscription", subscription_id, "subscription", param="subscription")
            if customer not in (None, subscription["customer"]):
                raise InvalidParam(f"Subscription {subscription_id} does not belong to customer {customer}.",
                                   "subscription")
        elif customer is not None:
            self._get("customer", customer, "customer", param="customer")
            owned = self._newest_first("subscription", lambda sub: sub["customer"] == customer)
            if not owned:
                raise ApiError(400, f"No upcoming invoices for customer: {customer}", code="invoice_upcoming_none")
            subscription = owned[0]
        else:
            raise InvalidParam("Missing required param: customer.", "customer", "parameter_missing")
        return self._invoice(subscription, month_period(self.clock()), f"upcoming_{new_id('in')}", "upcoming")

    @_synchronized
    def finalize_period(self, subscription_id: str, at: float | None = None) -> dict[str, Any]:
        """Close the period containing `at` (default now) into a stored draft invoice; emits ``invoice.created``."""
        subscription = self._get("subscription", subscription_id, "subscription", param="subscription")
        invoice = self._invoice(subscription, month_period(self.clock() if at is None else at), new_id("in"),
                                "subscription_cycle")
        self._objects["invoice"][invoice["id"]] = invoice
        self._emit("invoice.created", invoice)
        return invoice

    def _invoice(self, subscription: dict[str, Any], period: tuple[int, int], invoice_id: str,
                 billing_reason: str) -> dict[str, Any]:
        lines = [self._invoice_line(item, subscription, period, invoice_id)
                 for item in subscription["items"]["data"]]
        total = sum(line["amount"] for line in lines)
        return {
            "id": invoice_id, "object": "invoice", "created": self.now(), "livemode": False,
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
        """One line per subscription item, rounded to whole cents (half up) at the line."""
        price = self._objects["price"].get(item["price"]["id"], item["price"])
        meter_id = price["recurring"]["meter"]
        if meter_id is None:
            quantity = Decimal(item["quantity"])
        else:
            usage = self._usage.get((meter_id, subscription["customer"]), [])
            quantity = aggregate(self._objects["meter"][meter_id]["default_aggregation"]["formula"], usage, *period)
        amount = round_half_up(price_amount(price, Fraction(quantity)))
        product = self._objects["product"].get(price["product"], {"name": price["product"]})
        return {
            "id": new_id("il"), "object": "line_item", "invoice": invoice_id, "livemode": False,
            "amount": amount, "subtotal": amount, "currency": price["currency"], "metadata": {},
            "description": f"{decimal_text(quantity)} × {product['name']}",
            "quantity": _whole_or_none(quantity), "quantity_decimal": decimal_text(quantity),
            "period": {"start": period[0], "end": period[1]},
            "pricing": {"type": "price_details", "price_details": {"price": price["id"], "product": price["product"]},
                        "unit_amount_decimal": price["unit_amount_decimal"]},
            "parent": {"type": "subscription_item_details", "subscription_item_details": {
                "subscription": subscription["id"], "subscription_item": item["id"], "proration": False,
                "invoice_item": None,
            }},
        }

    @_synchronized
    def list_invoices(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "customer", "subscription", "status")
        customer, subscription, status = params.text("customer"), params.text("subscription"), params.text("status")

        def keep(invoice: dict[str, Any]) -> bool:
            owner = invoice["parent"]["subscription_details"]["subscription"]
            return (customer in (None, invoice["customer"]) and subscription in (None, owner)
                    and status in (None, invoice["status"]))

        return paginate(self._newest_first("invoice", keep), "/v1/invoices", params)

    @_synchronized
    def list_events(self, params: Params) -> dict[str, Any]:
        params.only(*LIST_PARAMS, "type")
        event_type = params.text("type")
        items = self._newest_first("event", lambda event: event_type in (None, event["type"]))
        return paginate(items, "/v1/events", params)


# ------------------------------------------------------------------------------ helpers


def _whole_or_none(number: Decimal | None) -> int | None:
    return int(number) if number is not None and number == number.to_integral_value() else None


def _tier(tier: Params) -> dict[str, Any]:
    tier.only("up_to", "unit_amount", "unit_amount_decimal", "flat_amount", "flat_amount_decimal")
    up_to_text = tier.data.get("up_to")
    if up_to_text == "inf":
        up_to = None
    else:
        up_to = tier.integer("up_to", required=True, minimum=1)
    amounts: dict[str, Any] = {"up_to": up_to}
    for kind in ("unit_amount", "flat_amount"):
        whole, exact = tier.integer(kind, minimum=0), tier.decimal(f"{kind}_decimal")
        if whole is not None and exact is not None:
            raise InvalidParam(f"You may only specify one of these parameters: {kind}, {kind}_decimal.",
                               tier.name(kind), "parameters_exclusive")
        amount = Decimal(whole) if whole is not None else exact
        amounts[kind] = _whole_or_none(amount)
        amounts[f"{kind}_decimal"] = None if amount is None else decimal_text(amount)
    if amounts["unit_amount_decimal"] is None and amounts["flat_amount_decimal"] is None:
        raise InvalidParam("Each tier needs unit_amount(_decimal) or flat_amount(_decimal).", tier.name("unit_amount"),
                           "parameter_missing")
    return amounts


def _stream_event(item: Params) -> MeterEventInput:
    """A v2 stream event's shape (wrong shapes refuse the whole batch, synchronously)."""
    item.only("event_name", "identifier", "payload", "timestamp")
    timestamp_text = item.text("timestamp")
    timestamp = None if timestamp_text is None else parse_rfc3339(timestamp_text)
    if timestamp_text is not None and timestamp is None:
        raise InvalidParam(f"Invalid timestamp: {timestamp_text!r} is not an RFC 3339 date-time.",
                           item.name("timestamp"))
    return MeterEventInput(
        event_name=item.text("event_name", required=True, max_length=100),
        payload=item.strings("payload", required=True),
        identifier=item.text("identifier", max_length=MAX_IDENTIFIER_LENGTH),
        timestamp=timestamp,
    )


def aggregate(formula: str, usage: Iterable[tuple[int, Decimal]], start: int, end: int) -> Decimal:
    """A meter's aggregation of the events with start <= timestamp < end."""
    inside = [(timestamp, value) for timestamp, value in usage if start <= timestamp < end]
    if formula == "count":
        return Decimal(len(inside))
    if formula == "last":
        return max(inside, key=lambda event: event[0])[1] if inside else Decimal(0)
    return sum((value for _, value in inside), Decimal(0))


def grouping_windows(start: int, end: int, size: int | None) -> list[tuple[int, int]]:
    """[start, end) cut at UTC multiples of `size` seconds (one window when size is None)."""
    if size is None:
        return [(start, end)]
    windows, cursor = [], start
    while cursor < end:
        boundary = min((cursor // size + 1) * size, end)
        windows.append((cursor, boundary))
        cursor = boundary
    return windows


def error_reports(rejected: Sequence[tuple[MeterEventInput, EventRejected]], now: int) -> list[dict[str, Any]]:
    """The data objects of ``billing.meter.error_report_triggered``: one per meter, errors grouped by code."""
    by_meter: dict[str | None, dict[str, list[tuple[MeterEventInput, EventRejected]]]] = {}
    for event, error in rejected:
        by_meter.setdefault(error.meter_id, {}).setdefault(error.code, []).append((event, error))
    reports = []
    for meter_id, by_code in by_meter.items():
        error_count = sum(len(errors) for errors in by_code.values())
        reports.append({
            "object": "billing.meter.error_report", "meter": meter_id, "livemode": False,
            "developer_message_summary": f"{error_count} meter event(s) could not be processed.",
            "validation_start": now, "validation_end": now,
            "reason": {
                "error_count": error_count,
                "error_types": [
                    {"code": code, "error_count": len(errors),
                     "sample_errors": [{"error_message": error.message,
                                        "request": {"identifier": event.identifier}} for event, error in errors]}
                    for code, errors in by_code.items()
                ],
            },
        })
    return reports
