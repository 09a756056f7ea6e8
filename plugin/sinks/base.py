"""The sink protocol: what the relay hands a billing system, and what it gets back.

A sink turns meter events into calls to one billing system and reports, per event, what
happened in words the relay's retry policy understands. It never decides *when* to retry:
that is `plugin.outbox.retry`, a pure function of these outcomes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Protocol

REASON_LIMIT = 300
WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class MeterEvent:
    """One outbox row on its way out. `identifier` is the ledger id: deterministic, so a resend is a no-op."""

    identifier: str
    customer_id: str
    value_ucr: int
    """Micro-credits, a positive whole number (0-credit rows never become events)."""
    occurred_at: datetime
    """When the call was billed (UTC): the event's timestamp at the sink."""
    stripe_customer_id: str | None = None
    """The customer's id at Stripe, when it has one (other sinks use `customer_id`)."""
    requeues: int = 0
    """How often an operator re-queued the event; sinks with idempotency keys derive a fresh one per requeue."""
    attempt: int = 1
    """Which send this is (1: the first since the last requeue); sinks with idempotency keys derive a fresh
    one per attempt, because a key replays its first answer, a 500 included."""


class OutcomeKind(StrEnum):
    DELIVERED = "delivered"
    """The sink recorded the event now."""
    DUPLICATE = "duplicate"
    """The sink already had this identifier: it was delivered before (e.g. before a crash)."""
    RETRY = "retry"
    """Not recorded this time, may succeed later: rate limit, 5xx, network, timeout."""
    REJECTED = "rejected"
    """Can never land as it is (bad request, timestamp outside the sink's window): dead letter."""
    NO_CUSTOMER = "no_customer"
    """The customer has no id at the sink yet: hold the event, do not drop it."""


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    reason: str = ""
    """One line for operators; never contains secrets."""
    uncertain: bool = False
    """RETRY only: the sink may have recorded the event anyway (timeout, 5xx, connection cut after sending)."""
    retry_after: float | None = None
    """RETRY only: seconds the sink asked us to wait (e.g. a 429's Retry-After), if it said."""


DELIVERED = Outcome(OutcomeKind.DELIVERED)
DUPLICATE = Outcome(OutcomeKind.DUPLICATE, "the sink already had this identifier")


class Sink(Protocol):
    """A billing system the relay delivers to. Implementations: StripeSink, OpenMeterSink."""

    name: str
    """Short name for logs, metrics and METERLINE_SINK."""
    max_batch: int
    """Most events one `send` call may carry."""
    serial_per_customer: bool
    """True when the sink forbids two concurrent calls for one customer (Stripe v1 meter events)."""
    dedupe_window: timedelta | None
    """How long the sink remembers identifiers; None = forever. Past it an uncertain resend could double-bill."""

    async def send(self, events: Sequence[MeterEvent]) -> Sequence[Outcome]:
        """Deliver `events` (at most `max_batch`); one outcome per event, in the same order. Never raises for
        a delivery failure: failures are outcomes."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


# ---------------------------------------------------------------- helpers for sinks (pure)


def one_line(text: str, limit: int = REASON_LIMIT) -> str:
    """Collapse whitespace and cut to `limit` characters: reasons land in one log line and one DB column."""
    flat = WHITESPACE.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def retry_after_seconds(value: str | None, now: datetime | None) -> float | None:
    """Retry-After as seconds: delta-seconds, or an HTTP date when `now` is known; None if absent or garbled."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        if now is None:
            return None
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - now).total_seconds()
    if seconds != seconds or seconds == float("inf"):  # NaN or infinity: garbled
        return None
    return max(seconds, 0.0)
