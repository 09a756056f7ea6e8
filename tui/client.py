"""The console's one way to a proxy: meterline's HTTP API (DESIGN "Contract: operator console").

Nothing here touches a database, so the console runs against a remote proxy exactly as against a
local one. Answers are typed (msgspec structs decoded from the bytes, ignoring fields they do not
know, so a newer proxy does not break an older console); every failure is one `ConsoleError`, whose
text never holds the key.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, Generic, TypeVar

import httpx
import msgspec

from tui.heap import collector_paused

PREFIX = "/meterline/v1"
DEFAULT_URL = "http://127.0.0.1:4000"
MAX_PAGES = 100
"""Fleet pages followed at most (10,000 customers each): a bound, not a setting."""


class ConsoleError(Exception):
    """What went wrong talking to the proxy, in words an operator can act on."""

    def __init__(self, message: str, *, status: int | None = None, unreachable: bool = False,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.unreachable = unreachable
        self.kind = kind
        """The OpenAI-shaped error's `type` (e.g. `no_reconciliation`), when the proxy gave one."""

    @property
    def unauthorized(self) -> bool:
        return self.status == 401


class _Answer(msgspec.Struct, frozen=True, kw_only=True):
    """An answer's fields the console reads; fields it does not know are ignored, so a newer proxy does
    not break an older console."""


class FleetRow(msgspec.Struct, kw_only=True, gc=False):
    """One customer of `GET /customers`. The fleet brings ten thousand every few seconds: slotted,
    untracked by the garbage collector (nothing in it can form a cycle), decoded straight from the bytes."""

    customer_id: str
    plan: str
    used_ucr: int
    included_ucr: int
    included_pct: float | None
    hour_ucr: int
    today_ucr: int
    typical_hour_ucr: int
    burn_ratio: float | None
    projected_ucr: int
    breaker: str
    hard_limit_ucr: int | None
    cap_ucr: int | None
    block_overage: bool
    alerts_open: int
    hourly_ucr: tuple[int, ...]
    grandfathered_at: str | None = None
    """Kept on its flat plan for good (`meterline migrate grandfather`): never billed overage. None: not."""


Row = TypeVar("Row", bound=FleetRow)


class Fleet(msgspec.Struct, Generic[Row], kw_only=True):
    generated_at: str
    customers: list[Row]
    next_cursor: str | None = None


class Member(_Answer):
    member: str
    used_ucr: int
    requests: int


class BreakerMove(_Answer):
    at: datetime
    before: str
    after: str
    by: str
    why: str


class CustomerDetail(FleetRow, kw_only=True):
    members: list[Member]
    recent: list[dict[str, Any]]
    breaker_history: list[BreakerMove]


class DailyUsage(_Answer):
    date: str
    used_ucr: int
    requests: int = 0


class TopAction(_Answer):
    action: str
    used_ucr: int
    share_pct: float | None = None


class UsageReport(_Answer):
    customer_id: str
    period_start: datetime
    period_end: datetime
    used_ucr: int
    included_ucr: int
    daily: list[DailyUsage]
    top_actions: list[TopAction] = msgspec.field(default_factory=list)


class Limits(_Answer):
    customer_id: str
    soft_thresholds_pct: list[int] | None
    effective_soft_thresholds_pct: list[int]
    hard_limit_ucr: int | None
    hard_limit_usd: str | None
    block_overage: bool
    cap_ucr: int | None


class Alert(_Answer):
    id: int
    kind: str
    customer_id: str | None
    subject_id: str | None
    message: str
    created_at: datetime
    acknowledged: bool = False


class _Alerts(_Answer):
    alerts: list[Alert]


class QueuedEvent(_Answer):
    id: str
    customer_id: str
    value_ucr: int
    status: str
    attempts: int
    occurred_at: datetime | None
    next_attempt_at: datetime | None
    uncertain: bool
    last_error: str | None


class Queue(_Answer):
    depth: dict[str, int]
    oldest_waiting_at: datetime | None
    oldest_age_seconds: float | None
    events: list[QueuedEvent]


class DifferingHour(_Answer):
    """An hour in which the ledger and Stripe's meter event summaries differ."""

    start: datetime
    ledger_ucr: int
    stripe_ucr: int


class ReconciledCustomer(_Answer):
    """One customer of a reconciliation: `divergence_ucr = ledger_ucr - in_flight_ucr - stripe_ucr`;
    `status` "ok" | "diverged" | "not_linked" (no Stripe id)."""

    customer_id: str
    stripe_customer_id: str | None
    ledger_ucr: int
    in_flight_ucr: int
    stripe_ucr: int
    divergence_ucr: int
    divergence_pct: float
    status: str
    hours: list[DifferingHour] = msgspec.field(default_factory=list)


class Reconciliation(_Answer):
    """A whole-fleet run (DESIGN "Contract: reconciliation")."""

    period_start: datetime
    period_end: datetime
    checked_at: datetime
    threshold_pct: float
    customers: list[ReconciledCustomer]


class InvoiceRow(_Answer):
    """An invoice meterline recorded (finalized, or a draft its spike guard flagged), with `ledger_cents`:
    what the ledger says its period should total (None: no customer or plan to price it)."""

    id: str
    customer_id: str | None
    stripe_customer_id: str
    status: str
    total_cents: int
    currency: str
    period_start: datetime
    period_end: datetime
    finalized_at: datetime | None = None
    held: bool = False
    ledger_cents: int | None = None


class _Invoices(_Answer):
    invoices: list[InvoiceRow]


class ReleasedInvoice(_Answer):
    """A held draft `approve` released."""

    id: str
    status: str | None = None
    auto_advance: bool | None = None
    total_cents: int | None = None
    currency: str | None = None


class InvoiceItem(_Answer):
    """The negative invoice item a credit adds to a draft."""

    id: str
    amount: int
    currency: str
    invoice: str | None = None
    description: str | None = None


class _Switch(_Answer):
    enabled: bool


class _Requeued(_Answer):
    requeued: int


T = TypeVar("T")
_DECODERS: dict[Any, msgspec.json.Decoder] = {}


def _decoder(kind: Any) -> msgspec.json.Decoder:
    """One decoder per answer type, made once (a decoder compiles its type)."""
    if kind not in _DECODERS:
        _DECODERS[kind] = msgspec.json.Decoder(kind)
    return _DECODERS[kind]


class ConsoleClient:
    """meterline's operator routes, with the master key; one per console."""

    def __init__(self, url: str, key: str, *, timeout: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}", "Accept-Encoding": _encoding(self.url)}
        self._http = httpx.AsyncClient(base_url=self.url + PREFIX, headers=headers, timeout=timeout,
                                       transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def fleet(self, row: type[Row] = FleetRow) -> Fleet[Row]:
        """Every customer, following the pages, each decoded as `row` (a FleetRow or a subclass: the
        console's own lines); decoded off the event loop (megabytes for a big fleet)."""
        customers: list[Row] = []
        cursor = None
        for _ in range(MAX_PAGES):
            body = await self._body("/customers", {} if cursor is None else {"cursor": cursor})
            page = await asyncio.to_thread(_decode, Fleet[row], body, "GET /customers")
            customers += page.customers
            cursor = page.next_cursor
            if cursor is None:
                break
        return Fleet(generated_at=page.generated_at, customers=customers)

    async def customer(self, customer_id: str) -> CustomerDetail:
        return await self._get(CustomerDetail, f"/customers/{_segment(customer_id)}")

    async def usage(self, customer_id: str) -> UsageReport:
        return await self._get(UsageReport, f"/customers/{_segment(customer_id)}/usage")

    async def move_breaker(self, customer_id: str, action: str, reason: str, by: str) -> None:
        """`action` "trip" or "reset"; audited with `reason` and `by`."""
        await self._send("POST", f"/customers/{_segment(customer_id)}/breaker",
                         {"action": action, "reason": reason, "by": by})

    async def limits(self, customer_id: str) -> Limits:
        return await self._get(Limits, "/limits", headers={"X-Meterline-Customer": customer_id})

    async def set_limits(self, customer_id: str, changes: dict[str, Any]) -> Limits:
        """Only the fields in `changes` (None clears one); the API's refusal arrives as a ConsoleError."""
        return await self._send("PUT", f"/customers/{_segment(customer_id)}/limits", changes, Limits)

    async def overage_block(self) -> bool:
        return (await self._get(_Switch, "/overage-block")).enabled

    async def set_overage_block(self, enabled: bool) -> None:
        await self._send("PUT", "/overage-block", {"enabled": enabled})

    async def alerts(self, *, kind: str | None = None, customer_id: str | None = None,
                     limit: int = 500) -> list[Alert]:
        params = {"limit": limit, "kind": kind, "customer_id": customer_id}
        params = {name: value for name, value in params.items() if value is not None}
        return (await self._get(_Alerts, "/alerts", params=params)).alerts

    async def acknowledge(self, alert_id: int) -> None:
        await self._send("POST", f"/alerts/{alert_id}/ack", {})

    async def queue(self, status: str | None = None) -> Queue:
        return await self._get(Queue, "/outbox", params={"limit": 500} | ({"status": status} if status else {}))

    async def requeue(self, ids: list[str], *, force: bool = False) -> int:
        return (await self._send("POST", "/outbox/retry", {"ids": ids, "force": force}, _Requeued)).requeued

    async def reconciliation(self) -> Reconciliation | None:
        """The last whole-fleet run; None before the first one."""
        try:
            return await self._get(Reconciliation, "/reconciliation")
        except ConsoleError as error:
            if error.status == 404 and error.kind == "no_reconciliation":
                return None
            raise

    async def run_reconciliation(self) -> Reconciliation:
        """Reconcile the whole fleet with Stripe now (it settles `unknown` outbox events on the way)."""
        return await self._send("POST", "/reconciliation", {}, Reconciliation)

    async def invoices(self, customer_id: str | None = None, *, limit: int = 500) -> list[InvoiceRow]:
        params = {"limit": limit} | ({"customer_id": customer_id} if customer_id is not None else {})
        return (await self._get(_Invoices, "/invoices", params=params)).invoices

    async def approve_invoice(self, invoice_id: str) -> ReleasedInvoice:
        """Release a draft the spike guard held: it finalizes on Stripe's schedule again."""
        return await self._send("POST", f"/invoices/{_segment(invoice_id)}/approve", {}, ReleasedInvoice)

    async def credit_invoice(self, invoice_id: str, usd: str, why: str) -> InvoiceItem:
        """A credit of `usd` ("12.50") on that draft only; the API refuses one on anything but a draft."""
        return await self._send("POST", f"/invoices/{_segment(invoice_id)}/credit", {"usd": usd, "why": why},
                                InvoiceItem)

    # ------------------------------------------------------------------ plumbing

    async def _body(self, path: str, params: dict[str, str]) -> bytes:
        return (await self._request("GET", path, params=params)).content

    async def _get(self, kind: type[T], path: str, **kwargs: Any) -> T:
        response = await self._request("GET", path, **kwargs)
        return _decode(kind, response.content, f"GET {path}")

    async def _send(self, method: str, path: str, body: dict[str, Any], kind: type[T] | None = None) -> T | None:
        response = await self._request(method, path, json=body)
        return None if kind is None else _decode(kind, response.content, f"{method} {path}")

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ConsoleError(f"{self.url} did not answer in time", unreachable=True) from None
        except httpx.TransportError as error:
            raise ConsoleError(f"cannot reach {self.url} ({error.__class__.__name__})", unreachable=True) from None
        if response.status_code == 401:
            raise ConsoleError("the proxy refused the master key: check LITELLM_MASTER_KEY", status=401)
        if response.status_code >= 400:
            message, kind = _refusal(response)
            raise ConsoleError(message, status=response.status_code, kind=kind)
        return response


def _decode(kind: type[T], body: bytes, what: str) -> T:
    """An answer's bytes as `kind`, or a ConsoleError saying what did not fit."""
    try:
        with collector_paused():  # a fleet is ~20,000 new objects that all stay alive
            return _decoder(kind).decode(body)
    except msgspec.ValidationError as error:
        raise ConsoleError(f"unexpected answer from the proxy's {what} ({error}); is it an older meterline?") from None
    except msgspec.DecodeError:
        raise ConsoleError(f"{what}: the answer is not JSON") from None


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _encoding(url: str) -> str:
    """gzip for a remote proxy (the fleet is megabytes of JSON that shrinks ~6x); none on this host,
    where compressing and decompressing 4 MB costs the console more (~40 ms) than it saves."""
    return "identity" if httpx.URL(url).host in LOOPBACK else "gzip"


def _segment(value: str) -> str:
    """A customer id as one path segment (ids may hold characters such as `:` and `@`)."""
    return httpx.URL(path=value).raw_path.decode().replace("/", "%2F")


def _refusal(response: httpx.Response) -> tuple[str, str | None]:
    """The OpenAI-shaped error's message (else the status line) and its type."""
    try:
        error = response.json().get("error", {})
        message, kind = (error.get("message"), error.get("type")) if isinstance(error, dict) else (None, None)
    except (ValueError, AttributeError):
        message, kind = None, None
    return message or f"HTTP {response.status_code} from the proxy", kind if isinstance(kind, str) else None
