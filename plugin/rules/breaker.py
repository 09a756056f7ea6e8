"""The per-customer spend-velocity circuit breaker, as a pure state machine.

A runaway agent (a loop that keeps calling the model) shows up as spend far above what the
customer normally spends in an hour. The breaker compares the last hour's spend with K times
the customer's typical hourly spend (from the trailing days of the ledger, never below an
absolute floor, so a new customer is not tripped by its first real use) and opens: requests are
refused with 402 `circuit_open` and the operator is alerted.

It stays open until an operator resets it, or, when a cool-down is configured, it lets a trickle
of requests through (half-open) and closes by itself once the last hour's spend is back under
the threshold. Every change of state is a `Transition` with who and why, for the audit log.

No clock, no storage: callers pass `now` and the spend figures, and persist what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from fractions import Fraction

from plugin.rules.pricing import round_half_up

SYSTEM = "meterline"
"""`by` of the transitions the breaker makes on its own."""


class BreakerStatus(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    multiplier: Fraction = Fraction(10)
    """K: trip when the last hour's spend exceeds K x the typical hourly spend."""
    floor_ucr_per_hour: int = 100_000_000
    """The typical hourly spend is never taken as less than this (100 credits an hour by default)."""
    window: timedelta = timedelta(hours=1)
    baseline_days: int = 7
    cool_down: timedelta | None = None
    """None: an open breaker waits for an operator. Else: after this long it lets a trickle through."""
    trickle_requests: int = 3
    """Half-open: requests let through per `trickle_period` while spend is still high."""
    trickle_period: timedelta = timedelta(minutes=1)


@dataclass(frozen=True)
class BreakerState:
    status: BreakerStatus = BreakerStatus.CLOSED
    since: datetime | None = None
    """When the current status began (None: closed since forever)."""
    reason: str = ""
    by: str = SYSTEM
    trickle_started: datetime | None = None
    trickle_used: int = 0


CLOSED = BreakerState()


@dataclass(frozen=True)
class Transition:
    """An audit record: the breaker went from `before` to `after` at `at`, because `by` said `why`."""

    before: BreakerStatus
    after: BreakerStatus
    at: datetime
    by: str
    why: str


@dataclass(frozen=True)
class BreakerDecision:
    """The breaker's answer for one request."""

    admit: bool
    state: BreakerState
    """The state to store (unchanged when `transition` is None)."""
    transition: Transition | None = None
    retry_after: float | None = None
    """Refused requests: seconds until the breaker may let requests through again, if it knows."""


def typical_hourly_ucr(trailing_spend_ucr: int, hours_observed: Fraction, config: BreakerConfig) -> int:
    """Mean hourly spend over the trailing days, never below the floor. `hours_observed` is how much
    of the trailing period the customer existed for (a customer of one day is averaged over a day)."""
    cap_hours = config.baseline_days * 24
    hours = min(max(hours_observed, Fraction(1)), Fraction(cap_hours))
    return max(config.floor_ucr_per_hour, round_half_up(Fraction(trailing_spend_ucr) / hours))


def window_spend_ucr(this_hour_ucr: int, previous_hour_ucr: int, seconds_into_hour: int) -> int:
    """Spend in the last 60 minutes from two clock-hour buckets: all of this hour, and the part of the
    previous hour still inside the window (assumed spread evenly), rounded down."""
    return this_hour_ucr + previous_hour_ucr * (3600 - seconds_into_hour) // 3600


def threshold_ucr(typical_ucr: int, config: BreakerConfig) -> int:
    """Spend in the window above which the breaker trips."""
    return round_half_up(typical_ucr * config.multiplier)


def _move(state: BreakerState, status: BreakerStatus, now: datetime, by: str, why: str,
          **fields) -> tuple[BreakerState, Transition]:
    after = BreakerState(status=status, since=now, reason=why, by=by, **fields)
    return after, Transition(state.status, status, now, by, why)


def on_request(state: BreakerState, *, window_spend_ucr: int, threshold: int, now: datetime,
               config: BreakerConfig) -> BreakerDecision:
    """Admit or refuse one request, given what the customer spent in the last `window`."""
    over = window_spend_ucr > threshold
    if state.status is BreakerStatus.CLOSED:
        if not over:
            return BreakerDecision(True, state)
        why = (f"spent {window_spend_ucr} µcr in the last {_hours(config.window)}, over the threshold of "
               f"{threshold} µcr ({config.multiplier} x typical hourly spend)")
        after, transition = _move(state, BreakerStatus.OPEN, now, SYSTEM, why)
        return BreakerDecision(False, after, transition, _retry_after(after, now, config))

    if state.status is BreakerStatus.OPEN:
        operator_hold = state.by != SYSTEM  # an operator's trip waits for an operator's reset
        if operator_hold or config.cool_down is None or state.since is None or now < state.since + config.cool_down:
            return BreakerDecision(False, state, retry_after=_retry_after(state, now, config))
        why = f"cool-down of {_hours(config.cool_down)} over: letting a trickle through"
        state, transition = _move(state, BreakerStatus.HALF_OPEN, now, SYSTEM, why)
        decision = on_request(state, window_spend_ucr=window_spend_ucr, threshold=threshold, now=now,
                              config=config)
        return replace(decision, transition=decision.transition or transition)

    # half-open: close once spend is back under the threshold; meanwhile a trickle per period
    if not over:
        why = f"spend back under the threshold ({window_spend_ucr} <= {threshold} µcr in the last window)"
        after, transition = _move(state, BreakerStatus.CLOSED, now, SYSTEM, why)
        return BreakerDecision(True, after, transition)
    started, used = state.trickle_started, state.trickle_used
    if started is None or now >= started + config.trickle_period:
        started, used = now, 0
    if used < config.trickle_requests:
        return BreakerDecision(True, replace(state, trickle_started=started, trickle_used=used + 1))
    wait = (started + config.trickle_period - now).total_seconds()
    return BreakerDecision(False, replace(state, trickle_started=started, trickle_used=used), retry_after=wait)


def trip(state: BreakerState, *, now: datetime, by: str, why: str) -> tuple[BreakerState, Transition]:
    """An operator opens the breaker (e.g. a customer reported a leaked key)."""
    return _move(state, BreakerStatus.OPEN, now, by, why)


def reset(state: BreakerState, *, now: datetime, by: str, why: str) -> tuple[BreakerState, Transition]:
    """An operator closes the breaker."""
    return _move(state, BreakerStatus.CLOSED, now, by, why)


def _retry_after(state: BreakerState, now: datetime, config: BreakerConfig) -> float | None:
    if config.cool_down is None or state.since is None or state.by != SYSTEM:
        return None
    return max(0.0, (state.since + config.cool_down - now).total_seconds())


def _hours(span: timedelta) -> str:
    minutes = int(span.total_seconds() // 60)
    return f"{minutes // 60} h" if minutes % 60 == 0 else f"{minutes} min"
