"""The admission policy over plain integers: ceilings, reserve, clamp, refuse, settle.

The property test drives the policy through any interleaving of reserve, settle and release
(what concurrent requests do to a customer's counters) and checks the promise: nothing is ever
billed past the ceiling, and reservations always fit under it.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from plugin.rules.policy import (
    Ask,
    Ceiling,
    Decision,
    Estimate,
    Refusal,
    ask,
    ceiling,
    decide,
    grant,
    settle,
)

M = 1_000_000


@pytest.mark.parametrize(("plan_cap", "hard", "included", "block", "expected"), [
    (None, None, 10 * M, False, None),
    (100 * M, None, 0, False, Ceiling(100 * M, Refusal.FREE_CAP)),
    (None, 50 * M, 10 * M, False, Ceiling(50 * M, Refusal.HARD_LIMIT)),
    (None, 50 * M, 10 * M, True, Ceiling(10 * M, Refusal.OVERAGE_BLOCKED)),
    (None, 5 * M, 10 * M, True, Ceiling(5 * M, Refusal.HARD_LIMIT)),
    (100 * M, 100 * M, 100 * M, True, Ceiling(100 * M, Refusal.FREE_CAP)),  # a tie names the plan cap
    (None, None, 0, True, Ceiling(0, Refusal.OVERAGE_BLOCKED)),
])
def test_the_ceiling_is_the_smallest_rule(plan_cap, hard, included, block, expected):
    assert ceiling(plan_cap_ucr=plan_cap, hard_limit_ucr=hard, included_ucr=included, block_overage=block) == expected


# A request of 1,000 prompt µcr (already priced) and 4 µcr per output token, asking for 500 tokens: 3,000 µcr worst case.
REQUEST = Estimate(prompt_ucr=Fraction(1000), ucr_per_output_token=Fraction(4), max_tokens=500)
CAP = Ceiling(10_000, Refusal.HARD_LIMIT)


def test_without_a_ceiling_everything_is_admitted_with_its_worst_case_reserved():
    assert decide(REQUEST, used_ucr=10**15, reserved_ucr=0, limit=None) == Decision(True, reserve_ucr=3000)


def test_full_reservation_when_it_fits():
    decision = decide(REQUEST, used_ucr=5000, reserved_ucr=2000, limit=CAP)
    assert decision == Decision(True, reserve_ucr=3000, remaining_ucr=0, ceiling_ucr=10_000)


def test_max_tokens_is_clamped_to_what_still_fits():
    decision = decide(REQUEST, used_ucr=6000, reserved_ucr=1000, limit=CAP)  # 3,000 left: 1,000 prompt + 500 tokens
    assert decision == Decision(True, reserve_ucr=3000, remaining_ucr=0, ceiling_ucr=10_000)
    clamped = decide(REQUEST, used_ucr=6000, reserved_ucr=1500, limit=CAP)  # 2,500 left: 375 tokens
    assert (clamped.admit, clamped.max_tokens, clamped.reserve_ucr, clamped.remaining_ucr) == (True, 375, 2500, 0)


def test_refused_when_what_fits_is_below_a_useful_minimum():
    refused = decide(REQUEST, used_ucr=8900, reserved_ucr=0, limit=CAP, min_output_tokens=30)  # 100 µcr: 25 tokens
    assert refused == Decision(False, Refusal.HARD_LIMIT, remaining_ucr=1100, ceiling_ucr=10_000)
    assert decide(REQUEST, used_ucr=8900, reserved_ucr=0, limit=CAP, min_output_tokens=25).max_tokens == 25
    over = decide(REQUEST, used_ucr=11_000, reserved_ucr=0, limit=CAP)
    assert (over.admit, over.reason, over.remaining_ucr) == (False, Refusal.HARD_LIMIT, 0)


@pytest.mark.parametrize(("used", "reserved", "granted"), [
    (0, 0, 3000), (7000, 0, 3000), (7000, 1, 2999), (9000, 0, 1000), (9000, 1, None), (10_001, 0, None),
])
def test_grant_is_the_full_ask_or_all_that_is_left_above_the_minimum(used, reserved, granted):
    assert grant(Ask(3000, 1000), used_ucr=used, reserved_ucr=reserved, limit=CAP) == granted
    assert grant(Ask(3000, 1000), used_ucr=used, reserved_ucr=reserved, limit=None) == 3000


@pytest.mark.parametrize(("used", "granted"), [
    (0, 3000 + 9000),      # plenty left (10,000 000): the whole spare
    (9_950_000, 3000 + 9000),  # 50,000 left: a quarter is 12,500, the whole grant still fits in it
    (9_964_000, 3000 + 6000),  # 36,000 left: a quarter is 9,000, so 6,000 of spare
    (9_980_000, 3000),     # 20,000 left: a quarter is 5,000, room for less than one more request
    (9_998_000, 2000),     # less than the full ask left: what is left, no spare
])
def test_a_spare_is_given_only_from_a_quarter_of_what_is_left(used, granted):
    limit = Ceiling(10_000_000, Refusal.HARD_LIMIT)
    assert grant(Ask(3000, 1000, spare_ucr=9000), used_ucr=used, reserved_ucr=0, limit=limit) == granted
    assert grant(Ask(3000, 1000, spare_ucr=9000), used_ucr=used, reserved_ucr=0, limit=None) == 12_000


@given(used=st.integers(0, 10**7), reserved=st.integers(0, 10**7), full=st.integers(1, 10**6),
       spare=st.integers(0, 10**7))
def test_a_spare_never_takes_more_than_a_quarter_of_what_is_left(used, reserved, full, spare):
    limit = Ceiling(10**7, Refusal.HARD_LIMIT)
    granted = grant(Ask(full, 1, spare_ucr=spare), used_ucr=used, reserved_ucr=reserved, limit=limit)
    without = grant(Ask(full, 1), used_ucr=used, reserved_ucr=reserved, limit=limit)
    if granted is None or granted <= full:
        assert granted == without  # no spare: exactly the per-request answer
    else:
        available = limit.ucr - used - reserved
        assert full * 2 <= granted <= min(full + spare, available // 4)


def test_ask_prices_the_full_request_and_the_useful_minimum():
    assert ask(REQUEST, min_output_tokens=16) == Ask(3000, 1064)
    assert ask(Estimate(Fraction(10), Fraction(1), max_tokens=5), min_output_tokens=16) == Ask(15, 15)


def test_fractional_rates_reserve_rounded_up():
    estimate = Estimate(prompt_ucr=Fraction(1, 3), ucr_per_output_token=Fraction(1, 3), max_tokens=2)
    assert estimate.cost(2) == 1 and estimate.cost(3) == 2
    decision = decide(estimate, used_ucr=0, reserved_ucr=0, limit=Ceiling(1, Refusal.FREE_CAP), min_output_tokens=1)
    assert (decision.admit, decision.reserve_ucr) == (True, 1)


def test_settle_bills_real_usage_and_never_past_the_ceiling():
    assert settle(2500, reserved_for_this_ucr=3000, used_ucr=5000, reserved_ucr=3000, limit=CAP).bill_ucr == 2500
    overshoot = settle(4000, reserved_for_this_ucr=3000, used_ucr=5000, reserved_ucr=4000, limit=CAP)
    assert (overshoot.bill_ucr, overshoot.forgone_ucr) == (4000, 0)  # 1,000 µcr free under the cap: still fits
    capped = settle(4000, reserved_for_this_ucr=3000, used_ucr=5000, reserved_ucr=5000, limit=CAP)
    assert (capped.bill_ucr, capped.forgone_ucr) == (3000, 1000)
    assert settle(4000, reserved_for_this_ucr=0, used_ucr=0, reserved_ucr=0, limit=None).bill_ucr == 4000


class Counters(RuleBasedStateMachine):
    """One customer's counters under concurrent requests: any order of reserve, settle, release."""

    def __init__(self) -> None:
        super().__init__()
        self.limit = Ceiling(50_000, Refusal.HARD_LIMIT)
        self.used = 0
        self.reserved = 0
        self.in_flight: list[int] = []
        self.billed = 0

    @rule(prompt=st.integers(0, 20_000), rate=st.fractions(0, 50, max_denominator=7), max_tokens=st.integers(1, 4000),
          minimum=st.integers(1, 64))
    def reserve(self, prompt, rate, max_tokens, minimum):
        estimate = Estimate(Fraction(prompt), rate, max_tokens)
        decision = decide(estimate, used_ucr=self.used, reserved_ucr=self.reserved, limit=self.limit,
                          min_output_tokens=minimum)
        if decision.admit:
            assert decision.reserve_ucr <= estimate.cost(max_tokens)
            assert decision.max_tokens is None or 0 < decision.max_tokens < max_tokens
            self.reserved += decision.reserve_ucr
            self.in_flight.append(decision.reserve_ucr)
        else:
            assert decision.reason is Refusal.HARD_LIMIT and decision.reserve_ucr == 0

    @precondition(lambda self: self.in_flight)
    @rule(index=st.integers(0, 10**6), overshoot=st.integers(-30_000, 30_000))
    def settle_one(self, index, overshoot):
        reservation = self.in_flight.pop(index % len(self.in_flight))
        actual = max(0, reservation + overshoot)  # usually under the reservation; sometimes over it
        settlement = settle(actual, reserved_for_this_ucr=reservation, used_ucr=self.used, reserved_ucr=self.reserved,
                            limit=self.limit)
        assert 0 <= settlement.bill_ucr <= actual and settlement.bill_ucr + settlement.forgone_ucr == actual
        if actual <= reservation:
            assert settlement.bill_ucr == actual  # an honest estimate is always billed in full
        self.reserved -= reservation
        self.used += settlement.bill_ucr

    @precondition(lambda self: self.in_flight)
    @rule(index=st.integers(0, 10**6))
    def release_one(self, index):
        self.reserved -= self.in_flight.pop(index % len(self.in_flight))

    @invariant()
    def never_past_the_ceiling(self):
        assert self.used <= self.limit.ucr
        assert self.used + self.reserved <= self.limit.ucr
        assert self.reserved == sum(self.in_flight) >= 0


TestCounters = Counters.TestCase
TestCounters.settings = settings(max_examples=120, stateful_step_count=50, deadline=None)


@given(prompt=st.integers(0, 10**6), rate=st.fractions(0, 100, max_denominator=13), max_tokens=st.integers(1, 10**5),
       available=st.integers(0, 10**7))
def test_a_clamped_request_never_costs_more_than_its_reservation_nor_what_was_left(prompt, rate, max_tokens,
                                                                                   available):
    estimate = Estimate(Fraction(prompt), rate, max_tokens)
    decision = decide(estimate, used_ucr=0, reserved_ucr=0, limit=Ceiling(available, Refusal.FREE_CAP),
                      min_output_tokens=1)
    if decision.admit:
        tokens = decision.max_tokens or max_tokens
        assert estimate.cost(tokens) <= decision.reserve_ucr <= available
        if decision.max_tokens is not None:  # clamped: it got what was left, and one more token would not fit
            assert decision.reserve_ucr == available and estimate.cost(tokens + 1) > available


def test_refusal_messages_word_for_word():
    from datetime import UTC, datetime

    from plugin.rules.policy import credits_text, refusal_message

    end = datetime(2026, 12, 1, tzinfo=UTC)
    assert credits_text(100 * M) == "100" and credits_text(2_500_000) == "2.5" and credits_text(1) == "0.000001"
    assert refusal_message(Refusal.FREE_CAP, Ceiling(100 * M, Refusal.FREE_CAP), "free", end) == (
        "You've used the 100 credits of your free plan for this period. Upgrade your plan to continue, "
        "or wait until 2026-12-01 00:00 UTC.")
    assert refusal_message(Refusal.HARD_LIMIT, Ceiling(5 * M, Refusal.HARD_LIMIT), "pro", end) == (
        "You've hit your limit of 5 credits. Raise it in settings to continue, or wait until 2026-12-01 00:00 UTC.")
    assert refusal_message(Refusal.OVERAGE_BLOCKED, Ceiling(10_000 * M, Refusal.OVERAGE_BLOCKED), "pro", end) == (
        "You've used the 10000 credits your plan includes and overage is blocked. Allow overage in settings to "
        "continue, or wait until 2026-12-01 00:00 UTC.")
