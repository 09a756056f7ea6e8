"""What customers' limits mean, over plain values: ceilings, dollar limits, soft thresholds."""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

import pytest

from plugin.rules.limits import (
    Limits,
    crossed_thresholds,
    effective_ceiling,
    next_threshold,
    soft_limit_base_ucr,
    threshold_ucr,
    usd_limit_as_ucr,
)
from plugin.rules.policy import Ceiling, Refusal, refusal_message, usd_text
from plugin.settings import PlanConfig

M = 1_000_000
FREE = PlanConfig(cap_credits=Fraction(100))
PRO = PlanConfig(included_credits=Fraction(1000), overage_usd_per_credit=Fraction("0.002"))
FLAT = PlanConfig(included_credits=Fraction(1000))  # included credits, no overage price
LEGACY = PlanConfig(metered=False, overage_usd_per_credit=Fraction("0.002"))


def test_a_dollar_limit_is_the_included_quota_plus_what_the_money_buys():
    assert usd_limit_as_ucr(Fraction(25), PRO) == (1000 + 12_500) * M
    assert usd_limit_as_ucr(Fraction("0.0000001"), PRO) == 1000 * M + 50  # rounded down: never past the limit
    assert usd_limit_as_ucr(Fraction(25), FREE) is None
    assert usd_limit_as_ucr(Fraction(25), LEGACY) is None  # never metered: no usage charge to limit


@pytest.mark.parametrize(("plan", "limits", "global_block", "expected"), [
    (FREE, Limits(), False, Ceiling(100 * M, Refusal.FREE_CAP)),
    (FREE, Limits(block_overage=True), True, Ceiling(100 * M, Refusal.FREE_CAP)),  # nothing to block on free
    (PRO, Limits(), False, None),
    (PRO, Limits(), True, Ceiling(1000 * M, Refusal.OVERAGE_BLOCKED)),
    (PRO, Limits(block_overage=True), False, Ceiling(1000 * M, Refusal.OVERAGE_BLOCKED)),
    (PRO, Limits(hard_limit_ucr=5 * M, block_overage=True), False, Ceiling(5 * M, Refusal.HARD_LIMIT)),
    (PRO, Limits(hard_limit_usd=Fraction(2)), False, Ceiling(2000 * M, Refusal.HARD_LIMIT, Fraction(2))),
    (FLAT, Limits(), True, None),
    (FLAT, Limits(hard_limit_usd=Fraction(2)), False, None),  # a dollar limit a plan cannot reach binds nothing
])
def test_the_effective_ceiling(plan, limits, global_block, expected):
    assert effective_ceiling(plan, limits, global_overage_block=global_block) == expected


def test_soft_limits_measure_against_quota_then_ceiling_then_typical_spend():
    assert soft_limit_base_ucr(PRO, None, 77) == 1000 * M
    assert soft_limit_base_ucr(FREE, Ceiling(100 * M, Refusal.FREE_CAP), 77) == 100 * M
    assert soft_limit_base_ucr(PlanConfig(), None, 77) == 77
    assert soft_limit_base_ucr(PlanConfig(), None, 0) is None


def test_crossed_thresholds_fire_on_the_charge_that_reaches_them():
    assert threshold_ucr(1000, 80) == 800 and threshold_ucr(3, 50) == 2  # reached, not nearly: rounded up
    assert crossed_thresholds((50, 80, 100), 1000, before_ucr=400, after_ucr=800) == [50, 80]
    assert crossed_thresholds((50, 80, 100), 1000, before_ucr=800, after_ucr=999) == []
    assert crossed_thresholds((100, 50), 1000, before_ucr=0, after_ucr=5000) == [50, 100]
    assert next_threshold((50, 80), 1000, 600) == 80 and next_threshold((50, 80), 1000, 800) is None


def test_refusals_in_dollars_and_without_amounts():
    end = datetime(2026, 12, 1, tzinfo=UTC)
    assert usd_text(Fraction(25)) == "$25.00" and usd_text(Fraction("0.125")) == "$0.125"
    assert refusal_message(Refusal.HARD_LIMIT, Ceiling(2000 * M, Refusal.HARD_LIMIT, Fraction(25)), "pro", end) == (
        "You've hit your limit of $25.00. Raise it in settings to continue, or wait until 2026-12-01 00:00 UTC.")
    minimal = {reason: refusal_message(reason, Ceiling(5 * M, reason), "free", end, detail="minimal")
               for reason in (Refusal.FREE_CAP, Refusal.HARD_LIMIT, Refusal.OVERAGE_BLOCKED)}
    assert minimal == {
        Refusal.FREE_CAP: "You've used the credits of your free plan for this period. Upgrade your plan to continue, "
                          "or wait until 2026-12-01 00:00 UTC.",
        Refusal.HARD_LIMIT: "You've hit your spending limit. Raise it in settings to continue, or wait until "
                            "2026-12-01 00:00 UTC.",
        Refusal.OVERAGE_BLOCKED: "You've used the credits your plan includes and overage is blocked. Allow overage in "
                                 "settings to continue, or wait until 2026-12-01 00:00 UTC.",
    }
