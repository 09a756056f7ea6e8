"""Reconciliation maths (DESIGN "Contract: reconciliation"): which window is compared, which
summaries Stripe is asked for, and what the two sides' hourly totals say. Pure: plain values in,
plain values out, the clock passed in.

Both sides are cut at one instant: the window runs from the period's start (floored to a minute,
Stripe's granularity) to now minus the lag Stripe's summaries need to settle, floored to a minute.
Stripe answers hourly summaries only between whole hours, so the window is asked for in up to
three pieces: a partial first hour, the whole hours, a partial last hour (`summary_requests`).
Every total is in micro-credits (µcr), the meter's unit; an hour is its number of whole hours since
the Unix epoch (`unit_of(moment, HOUR)`), as the outbox query groups them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from plugin.rules.pricing import divide_half_up
from plugin.rules.rollups import HOUR, start_of, unit_of

MINUTE = 60


@dataclass(frozen=True)
class Window:
    """[start, end) in UTC, both on whole minutes."""

    start: datetime
    end: datetime


def window(period_start: datetime, period_end: datetime, now: datetime, lag_seconds: int) -> Window:
    """The part of the period [start, end) both sides can be compared on now."""
    start = _floor(period_start, MINUTE)
    end = max(start, _floor(min(period_end, now - timedelta(seconds=lag_seconds)), MINUTE))
    return Window(start, end)


@dataclass(frozen=True)
class SummaryRequest:
    """One `event_summaries.list` call: [start, end) on whole minutes; hourly when `hourly`."""

    start: datetime
    end: datetime
    hourly: bool


def summary_requests(compared: Window) -> list[SummaryRequest]:
    """The calls that cover `compared` with one summary per clock hour (partial hours at the edges
    asked for on their own: Stripe's hourly grouping takes whole-hour bounds only)."""
    start, end = compared.start, compared.end
    if start >= end:
        return []
    first_hour, last_hour = _ceil(start, HOUR), _floor(end, HOUR)
    if first_hour >= last_hour:  # inside one clock hour, or across one boundary without a whole hour
        pieces = [(start, min(end, first_hour)), (max(start, first_hour), end)] if start < first_hour < end else [
            (start, end)]
        return [SummaryRequest(a, b, False) for a, b in pieces if a < b]
    requests = []
    if start < first_hour:
        requests.append(SummaryRequest(start, first_hour, False))
    requests.append(SummaryRequest(first_hour, last_hour, True))
    if last_hour < end:
        requests.append(SummaryRequest(last_hour, end, False))
    return requests


def hour_of(moment: datetime) -> int:
    """The clock hour a moment (a ledger row, a summary's start) is counted in."""
    return unit_of(moment, HOUR)


class Status(StrEnum):
    OK = "ok"
    DIVERGED = "diverged"
    NOT_LINKED = "not_linked"


class Direction(StrEnum):
    """Which way a divergence goes: one alert per customer, period and direction."""

    STRIPE_SHORT = "stripe_short"
    """Stripe counted less than the ledger billed (and is not still on its way)."""
    STRIPE_OVER = "stripe_over"
    """Stripe counted more than the ledger billed."""


@dataclass(frozen=True)
class HourDifference:
    hour: int
    ledger_ucr: int
    """Billed in the hour, less what is still on its way to Stripe."""
    stripe_ucr: int

    @property
    def start(self) -> datetime:
        return start_of(self.hour, HOUR)


@dataclass(frozen=True)
class CustomerReconciliation:
    customer_id: str
    stripe_customer_id: str | None
    ledger_ucr: int
    in_flight_ucr: int
    stripe_ucr: int
    divergence_ucr: int
    divergence_pct: float
    status: Status
    hours: tuple[HourDifference, ...]
    """Only for a diverged customer: the hours whose totals differ, oldest first."""

    @property
    def direction(self) -> Direction | None:
        if self.status is not Status.DIVERGED:
            return None
        return Direction.STRIPE_SHORT if self.divergence_ucr > 0 else Direction.STRIPE_OVER


def verdict(customer_id: str, stripe_customer_id: str | None, ledger_ucr: int, in_flight_ucr: int, stripe_ucr: int,
            threshold_pct: float) -> CustomerReconciliation:
    """One customer's verdict from its totals (µcr), without the hours (`compare` adds them).

    divergence = ledger - in flight - Stripe; its share of the ledger (two decimals, half up) above
    `threshold_pct` is a divergence. A customer without a Stripe id is `not_linked`, whatever the sums.
    """
    divergence = ledger_ucr - in_flight_ucr - stripe_ucr
    share = divergence_pct(divergence, ledger_ucr)
    if stripe_customer_id is None:
        status = Status.NOT_LINKED
    else:
        status = Status.DIVERGED if share > threshold_pct else Status.OK
    return CustomerReconciliation(customer_id, stripe_customer_id, ledger_ucr, in_flight_ucr, stripe_ucr, divergence,
                                  share, status, ())


def compare(customer_id: str, stripe_customer_id: str | None, ledger: Mapping[int, int],
            in_flight: Mapping[int, int], stripe: Mapping[int, int],
            threshold_pct: float) -> CustomerReconciliation:
    """`verdict` from hourly totals (hour -> µcr) on each side, with the hours that differ when diverged."""
    found = verdict(customer_id, stripe_customer_id, sum(ledger.values()), sum(in_flight.values()),
                    sum(stripe.values()), threshold_pct)
    if found.status is not Status.DIVERGED:
        return found
    hours = tuple(
        HourDifference(hour, ledger.get(hour, 0) - in_flight.get(hour, 0), stripe.get(hour, 0))
        for hour in sorted(set(ledger) | set(in_flight) | set(stripe))
        if ledger.get(hour, 0) - in_flight.get(hour, 0) != stripe.get(hour, 0))
    return replace(found, hours=hours)


def divergence_pct(divergence_ucr: int, ledger_ucr: int) -> float:
    """|divergence| / max(ledger, 1) × 100, two decimals, rounded half up."""
    return divide_half_up(abs(divergence_ucr) * 10_000, max(ledger_ucr, 1)) / 100


class Settlement(StrEnum):
    LANDED = "landed"
    """Stripe's hour holds them: mark them delivered."""
    MISSING = "missing"
    """Stripe's hour lacks exactly them: send them again (same identifiers)."""
    UNDECIDED = "undecided"
    """The totals do not prove either: leave them for a later run (or an operator)."""


def settle_unknown(ledger_ucr: int, other_in_flight_ucr: int, unknown_ucr: int, stripe_ucr: int) -> Settlement:
    """What one hour's totals say of the events in it whose outcome is unknown (`unknown_ucr` of them).

    Only an hour with nothing else on its way is decided: a `pending` or `sending` event there may land
    at any moment and make either reading true."""
    if unknown_ucr <= 0 or other_in_flight_ucr:
        return Settlement.UNDECIDED
    if stripe_ucr == ledger_ucr:
        return Settlement.LANDED
    if stripe_ucr == ledger_ucr - unknown_ucr:
        return Settlement.MISSING
    return Settlement.UNDECIDED


def _floor(moment: datetime, seconds: int) -> datetime:
    stamp = int(moment.astimezone(UTC).timestamp())
    return datetime.fromtimestamp(stamp - stamp % seconds, UTC)


def _ceil(moment: datetime, seconds: int) -> datetime:
    floored = _floor(moment, seconds)
    return floored if floored == moment else floored + timedelta(seconds=seconds)
