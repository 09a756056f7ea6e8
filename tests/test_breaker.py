"""The circuit breaker as a pure state machine: plain values in, state and audit records out."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest

from plugin.rules.breaker import (
    CLOSED,
    SYSTEM,
    BreakerConfig,
    BreakerStatus,
    on_request,
    reset,
    threshold_ucr,
    trip,
    typical_hourly_ucr,
)

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
CREDIT = 1_000_000
CONFIG = BreakerConfig(multiplier=Fraction(10), floor_ucr_per_hour=10 * CREDIT)


@pytest.mark.parametrize(("spend", "hours", "typical"), [
    (0, Fraction(0), 10 * CREDIT),                     # a new customer: the floor
    (24 * 5 * CREDIT, Fraction(24), 10 * CREDIT),       # 5 credits an hour: still the floor
    (7 * 24 * 50 * CREDIT, Fraction(7 * 24), 50 * CREDIT),
    (2 * 24 * 50 * CREDIT, Fraction(2 * 24), 50 * CREDIT),   # two days old: averaged over two days
    (30 * 24 * 50 * CREDIT, Fraction(30 * 24), 30 * 24 * 50 * CREDIT // (7 * 24)),  # hours capped at 7 days
])
def test_typical_hourly_spend(spend, hours, typical):
    assert typical_hourly_ucr(spend, hours, CONFIG) == typical


def test_threshold_is_k_times_typical():
    assert threshold_ucr(50 * CREDIT, CONFIG) == 500 * CREDIT
    assert threshold_ucr(3, BreakerConfig(multiplier=Fraction(5, 2))) == 8  # 7.5 rounds half up


def test_closed_admits_until_the_window_spend_passes_the_threshold():
    decision = on_request(CLOSED, window_spend_ucr=100, threshold=100, now=T0, config=CONFIG)
    assert (decision.admit, decision.state, decision.transition) == (True, CLOSED, None)
    tripped = on_request(CLOSED, window_spend_ucr=101, threshold=100, now=T0, config=CONFIG)
    assert not tripped.admit and tripped.state.status is BreakerStatus.OPEN
    assert tripped.transition.before is BreakerStatus.CLOSED and tripped.transition.by == SYSTEM
    assert "101 µcr in the last 1 h" in tripped.transition.why and tripped.retry_after is None


def test_open_without_cool_down_waits_for_an_operator():
    state = on_request(CLOSED, window_spend_ucr=101, threshold=100, now=T0, config=CONFIG).state
    later = on_request(state, window_spend_ucr=0, threshold=100, now=T0 + timedelta(days=3), config=CONFIG)
    assert not later.admit and later.transition is None
    closed, transition = reset(state, now=T0 + timedelta(days=3), by="ops@acme", why="customer fixed its loop")
    assert closed.status is BreakerStatus.CLOSED
    assert (transition.before, transition.after, transition.by) == (BreakerStatus.OPEN, BreakerStatus.CLOSED,
                                                                      "ops@acme")
    assert on_request(closed, window_spend_ucr=0, threshold=100, now=T0, config=CONFIG).admit


def test_operator_trip_holds_even_after_a_cool_down():
    config = BreakerConfig(cool_down=timedelta(minutes=10))
    state, transition = trip(CLOSED, now=T0, by="ops@acme", why="leaked key reported")
    assert (transition.after, transition.why) == (BreakerStatus.OPEN, "leaked key reported")
    later = on_request(state, window_spend_ucr=0, threshold=100, now=T0 + timedelta(hours=5), config=config)
    assert not later.admit and later.retry_after is None


def test_half_open_trickles_then_closes_when_spend_falls_back():
    config = BreakerConfig(cool_down=timedelta(minutes=10), trickle_requests=2, trickle_period=timedelta(minutes=1))
    opened = on_request(CLOSED, window_spend_ucr=500, threshold=100, now=T0, config=config)
    assert opened.retry_after == 600
    early = on_request(opened.state, window_spend_ucr=500, threshold=100, now=T0 + timedelta(minutes=5),
                       config=config)
    assert not early.admit and early.retry_after == 300
    now = T0 + timedelta(minutes=10)
    first = on_request(opened.state, window_spend_ucr=500, threshold=100, now=now, config=config)
    assert first.admit and first.state.status is BreakerStatus.HALF_OPEN
    assert first.transition.after is BreakerStatus.HALF_OPEN
    second = on_request(first.state, window_spend_ucr=500, threshold=100, now=now, config=config)
    third = on_request(second.state, window_spend_ucr=500, threshold=100, now=now + timedelta(seconds=30),
                       config=config)
    assert second.admit and not third.admit and third.retry_after == 30
    next_minute = on_request(third.state, window_spend_ucr=500, threshold=100, now=now + timedelta(minutes=1),
                             config=config)
    assert next_minute.admit
    recovered = on_request(next_minute.state, window_spend_ucr=90, threshold=100, now=now + timedelta(minutes=2),
                           config=config)
    assert recovered.admit and recovered.state.status is BreakerStatus.CLOSED
    assert recovered.transition.after is BreakerStatus.CLOSED


def test_a_runaway_loop_is_stopped_within_the_window():
    """A customer who usually spends 50 credits an hour starts a loop spending 2 credits every
    5 seconds (1,440 an hour). The breaker must stop it before the hour is out, and the loop must
    not have spent more than the threshold plus one request."""
    typical = typical_hourly_ucr(7 * 24 * 50 * CREDIT, Fraction(7 * 24), CONFIG)
    threshold = threshold_ucr(typical, CONFIG)
    state, now, spent = CLOSED, T0, deque()
    admitted = transitions = 0
    for _ in range(10_000):  # bounded: the loop never stops by itself
        while spent and spent[0][0] <= now - CONFIG.window:
            spent.popleft()
        decision = on_request(state, window_spend_ucr=sum(ucr for _, ucr in spent), threshold=threshold, now=now,
                              config=CONFIG)
        state = decision.state
        transitions += decision.transition is not None
        if not decision.admit:
            break
        admitted += 1
        spent.append((now, 2 * CREDIT))
        now += timedelta(seconds=5)
    assert state.status is BreakerStatus.OPEN and transitions == 1
    assert now - T0 < CONFIG.window
    assert sum(ucr for _, ucr in spent) <= threshold + 2 * CREDIT
    assert admitted == threshold // (2 * CREDIT) + 1
