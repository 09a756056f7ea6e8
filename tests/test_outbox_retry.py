"""The retry policy as a table: outcome + history -> next state. No clock, no randomness."""

from datetime import UTC, datetime, timedelta

import pytest

from plugin.outbox.retry import RetryPolicy, Status, decide, may_resend
from plugin.sinks.base import DELIVERED, DUPLICATE, Outcome, OutcomeKind

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
DAY = timedelta(hours=24)
POLICY = RetryPolicy(base_seconds=1, factor=2, cap_seconds=300, hold_seconds=600, dedupe_margin=timedelta(hours=1))


def step(outcome, *, attempts=1, first=NOW, uncertain=False, jitter=0.0, window=DAY):
    return decide(outcome, attempts=attempts, first_attempt_at=first, uncertain=uncertain, now=NOW, jitter=jitter,
                  dedupe_window=window, policy=POLICY)


@pytest.mark.parametrize(("attempts", "jitter", "seconds"), [
    (1, 0.0, 0.5), (1, 0.999, 0.9995), (2, 0.0, 1.0), (3, 0.5, 3.0), (9, 0.0, 128.0),
    (10, 0.0, 150.0), (50, 0.999, 299.85),  # capped at 300: half fixed, half jittered
])
def test_backoff_is_exponential_jittered_and_capped(attempts, jitter, seconds):
    assert POLICY.backoff(attempts, jitter) == pytest.approx(seconds)


def test_backoff_never_zero_and_never_past_cap():
    for attempts in range(1, 60):
        for jitter in (0.0, 0.5, 0.999999):
            assert 0 < POLICY.backoff(attempts, jitter) <= POLICY.cap_seconds


@pytest.mark.parametrize(("outcome", "status"), [
    (DELIVERED, Status.DELIVERED),
    (DUPLICATE, Status.DELIVERED),
    (Outcome(OutcomeKind.REJECTED, "bad timestamp"), Status.DEAD),
    (Outcome(OutcomeKind.NO_CUSTOMER, "no stripe id"), Status.HELD),
    (Outcome(OutcomeKind.RETRY, "500", uncertain=True), Status.PENDING),
    (Outcome(OutcomeKind.RETRY, "429"), Status.PENDING),
])
def test_each_outcome_leads_to_its_status(outcome, status):
    result = step(outcome)
    assert result.status is status
    assert result.reason == outcome.reason


def test_retry_is_scheduled_after_backoff_or_retry_after_whichever_is_later():
    assert step(Outcome(OutcomeKind.RETRY, "x"), attempts=3).next_attempt_at == NOW + timedelta(seconds=2)
    asked = Outcome(OutcomeKind.RETRY, "429", retry_after=30)
    assert step(asked, attempts=3).next_attempt_at == NOW + timedelta(seconds=30)


def test_held_events_are_looked_at_again_after_hold_seconds():
    assert step(Outcome(OutcomeKind.NO_CUSTOMER)).next_attempt_at == NOW + timedelta(seconds=600)


def test_uncertainty_only_ever_grows():
    assert step(Outcome(OutcomeKind.RETRY, "500", uncertain=True)).uncertain is True
    assert step(Outcome(OutcomeKind.RETRY, "429"), uncertain=True).uncertain is True
    assert step(Outcome(OutcomeKind.RETRY, "429"), uncertain=False).uncertain is False


def test_uncertain_event_becomes_unknown_before_the_dedupe_window_closes():
    first = NOW - timedelta(hours=22, minutes=59, seconds=59)  # the retry would land past 23 h
    result = step(Outcome(OutcomeKind.RETRY, "timeout", uncertain=True), attempts=20, first=first)
    assert result.status is Status.UNKNOWN
    assert "reconciliation" in result.reason and result.next_attempt_at is None


def test_certain_failures_keep_retrying_past_the_window():
    """A connection refused never reached the sink: resending after a long outage cannot double-bill."""
    first = NOW - timedelta(days=3)
    assert step(Outcome(OutcomeKind.RETRY, "refused"), attempts=500, first=first).status is Status.PENDING


def test_sinks_that_never_forget_identifiers_never_produce_unknown():
    first = NOW - timedelta(days=30)
    result = step(Outcome(OutcomeKind.RETRY, "500", uncertain=True), first=first, window=None)
    assert result.status is Status.PENDING


@pytest.mark.parametrize(("uncertain", "age", "window", "allowed"), [
    (False, timedelta(days=10), DAY, True),
    (True, timedelta(hours=22, minutes=59), DAY, True),
    (True, timedelta(hours=23), DAY, False),
    (True, timedelta(days=10), None, True),
])
def test_may_resend(uncertain, age, window, allowed):
    assert may_resend(uncertain, NOW - age, NOW, window, POLICY) is allowed
