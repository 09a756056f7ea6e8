"""Stripe Billing Meters through the unmodified `stripe` SDK (`StripeClient`).

Two transports:
- v1 `POST /v1/billing/meter_events`, one event per call, validated synchronously. The ledger id
  is both the event `identifier` and the `Idempotency-Key`. Stripe allows one concurrent call per
  customer per meter, so the relay sends a customer's events one at a time (`serial_per_customer`).
- v2 meter event stream (`METERLINE_STRIPE_STREAM=1`): a session token, then batches of up to 100
  events per call, validated asynchronously (errors come back later as
  `billing.meter.error_report_triggered` webhooks). For high volume.

Either way Stripe dedupes identifiers for at least 24 hours (`dedupe_window`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
import httpx
import stripe

from plugin.sinks.base import (
    DELIVERED,
    MeterEvent,
    Outcome,
    OutcomeKind,
    one_line,
    retry_after_seconds,
)

PAST_WINDOW = timedelta(days=35)
FUTURE_WINDOW = timedelta(minutes=5)
STREAM_BATCH = 100
_SESSION_MARGIN = timedelta(seconds=60)
# Transport errors raised before a single byte of the request went out: resending is certainly safe.
# (aiohttp is the sink's own client; httpx is the SDK's default, for a StripeClient handed in.)
_NOT_SENT = (aiohttp.ClientConnectorError, httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def outside_window(occurred_at: datetime, now: datetime) -> str | None:
    """Why Stripe would refuse this timestamp (35 days past, 5 minutes future), or None."""
    if occurred_at < now - PAST_WINDOW:
        return f"timestamp {occurred_at.isoformat()} is more than 35 days old: outside Stripe's meter event window"
    if occurred_at > now + FUTURE_WINDOW:
        return f"timestamp {occurred_at.isoformat()} is more than 5 minutes in the future: outside Stripe's window"
    return None


def idempotency_key(event: MeterEvent) -> str:
    """The ledger id on the first send; a fresh key for every later one (the requeue count and the attempt).

    For 24 hours Stripe answers a repeated key with the answer it saved first, a 500 included: a retry
    with the same key after Stripe recorded the event and then failed would learn nothing, ever. A
    fresh key is safe because the identifier stays the same: Stripe counts it once, and answers a
    second send with "An event already exists with identifier …" (`already_counted`). A requeued send
    may also carry other parameters, which a reused key refuses."""
    if event.requeues == 0 and event.attempt <= 1:
        return event.identifier
    return f"{event.identifier}:r{event.requeues}a{event.attempt}"


DUPLICATE_MESSAGE = "An event already exists with identifier"


def already_counted(error: stripe.StripeError) -> bool:
    """Stripe's answer to a meter event whose identifier it already has: HTTP 400, an
    `invalid_request_error` with no `code`, the message "An event already exists with identifier …",
    and `Stripe-Should-Retry: false` (DESIGN "Stripe facts"). The message is the only thing that tells
    it from any other 400, so it is matched, with the status and the missing code as guards."""
    return (error.http_status == 400 and getattr(error, "code", None) is None
            and (error.user_message or "").startswith(DUPLICATE_MESSAGE))


def classify_error(error: stripe.StripeError, now: datetime | None = None) -> Outcome:
    """A Stripe SDK exception as a delivery outcome (pure: looks only at the exception, and at `now` for a
    Retry-After given as a date)."""
    status = error.http_status
    code = getattr(error, "code", None)
    reason = f"stripe {status or 'network'}: {code + ': ' if code else ''}{one_line(error.user_message or str(error))}"
    if isinstance(error, stripe.APIConnectionError):
        return Outcome(OutcomeKind.RETRY, reason, uncertain=not isinstance(error.__cause__, _NOT_SENT))
    if already_counted(error):
        return Outcome(OutcomeKind.DUPLICATE, reason)
    if status == 429 or isinstance(error, stripe.RateLimitError):
        return Outcome(OutcomeKind.RETRY, reason, retry_after=retry_after_seconds((error.headers or {}).get("Retry-After"), now))
    if status == 409 or status is None or status >= 500:
        # 409: a concurrent request with the same idempotency key is still running: it may land.
        return Outcome(OutcomeKind.RETRY, reason, uncertain=True)
    return Outcome(OutcomeKind.REJECTED, reason)


@dataclass(frozen=True)
class StripeConfig:
    api_key: str
    event_name: str = "meterline_credits"
    api_base: str | None = None
    meter_events_base: str | None = None
    stream: bool = False
    timeout_seconds: float = 10.0

    def client(self, http_client: stripe.HTTPClient | None = None, *, retries: int = 0) -> stripe.StripeClient:
        """A StripeClient pointed at the configured addresses. The SDK's own retries are off unless asked
        for: the relay owns retrying its sends (one policy, in plugin/outbox/retry.py); reads such as
        reconciliation's may let the SDK retry (it backs off and honours Stripe-Should-Retry)."""
        addresses = {}
        if self.api_base:
            addresses["api"] = self.api_base
        if self.meter_events_base or self.api_base:
            addresses["meter_events"] = self.meter_events_base or self.api_base
        return stripe.StripeClient(
            self.api_key, base_addresses=addresses, max_network_retries=retries, http_client=http_client,
        )


class StripeSink:
    """Meter events to Stripe; see the module docstring for the two transports."""

    name = "stripe"
    dedupe_window = timedelta(hours=24)

    def __init__(self, config: StripeConfig, *, client: stripe.StripeClient | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.config = config
        # aiohttp rather than the SDK's default httpx: httpx's connection pool cost ~2 ms of CPU per call
        # at 16 concurrent calls (bench/relay.py), aiohttp's a fraction of that.
        timeout = aiohttp.ClientTimeout(total=config.timeout_seconds)
        self._http = None if client else stripe.AIOHTTPClient(timeout=timeout)
        self.client = client or config.client(self._http)
        self.clock = clock
        self.max_batch = STREAM_BATCH if config.stream else 1
        self.serial_per_customer = not config.stream
        self._session_token: str | None = None
        self._session_expires_at = datetime.min.replace(tzinfo=UTC)
        self._session_lock = asyncio.Lock()  # concurrent batches share one session instead of each making one

    async def send(self, events: Sequence[MeterEvent]) -> list[Outcome]:
        now = self.clock()
        outcomes: list[Outcome | None] = [self._refusal(event, now) for event in events]
        ready = [index for index, outcome in enumerate(outcomes) if outcome is None]
        if self.config.stream:
            sent = await self._send_stream([events[index] for index in ready]) if ready else []
        else:
            sent = [await self._send_v1(events[index]) for index in ready]
        for index, outcome in zip(ready, sent, strict=True):
            outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]  (every slot is filled above)

    def _refusal(self, event: MeterEvent, now: datetime) -> Outcome | None:
        """What is decided without calling Stripe: no Stripe customer yet, or a timestamp Stripe would refuse."""
        if not event.stripe_customer_id:
            return Outcome(OutcomeKind.NO_CUSTOMER,
                           f"customer {event.customer_id!r} has no Stripe customer id "
                           f"(meterline customers set-stripe {event.customer_id} cus_...)")
        reason = outside_window(event.occurred_at, now)
        return Outcome(OutcomeKind.REJECTED, reason) if reason else None

    def _payload(self, event: MeterEvent) -> dict[str, str]:
        return {"stripe_customer_id": event.stripe_customer_id or "", "value": str(event.value_ucr)}

    async def _send_v1(self, event: MeterEvent) -> Outcome:
        params = {
            "event_name": self.config.event_name, "identifier": event.identifier,
            "timestamp": int(event.occurred_at.timestamp()), "payload": self._payload(event),
        }
        try:
            await self.client.v1.billing.meter_events.create_async(params, {"idempotency_key": idempotency_key(event)})
        except stripe.StripeError as error:
            return classify_error(error, self.clock())
        return DELIVERED

    async def _session(self, *, refused: str | None = None) -> str:
        """A live session token; a new one when none is held, it is about to expire, or `refused` was refused."""
        async with self._session_lock:
            stale = self._session_token is None or self._session_token == refused
            if stale or self.clock() >= self._session_expires_at - _SESSION_MARGIN:
                session = await self.client.v2.billing.meter_event_session.create_async()
                self._session_token = session.authentication_token
                self._session_expires_at = _as_datetime(session.expires_at)
            return self._session_token

    async def _send_stream(self, events: Sequence[MeterEvent]) -> list[Outcome]:
        body = {"events": [
            {"event_name": self.config.event_name, "identifier": event.identifier,
             "timestamp": event.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
             "payload": self._payload(event)}
            for event in events
        ]}
        try:
            token = await self._session()
            try:
                await self.client.v2.billing.meter_event_stream.create_async(body, {"api_key": token})
            except (stripe.TemporarySessionExpiredError, stripe.AuthenticationError):
                # the session expired early (or its token was refused): once more with a new one
                token = await self._session(refused=token)
                await self.client.v2.billing.meter_event_stream.create_async(body, {"api_key": token})
        except stripe.StripeError as error:
            return [classify_error(error, self.clock())] * len(events)
        return [DELIVERED] * len(events)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close_async()


def _as_datetime(value: object) -> datetime:
    """v2 timestamps arrive as RFC 3339 strings (or datetimes, depending on the SDK's parsing)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))

