"""What a customer allowed, and what follows from it (pure).

A customer's limits are soft thresholds (warnings), an optional hard limit (in credits or in
currency) and an overage block; the operator adds a global overage block. Together with the plan
they give the ceiling requests are held to (`plugin.rules.policy.ceiling`) and the base soft thresholds
are measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import floor

from plugin.rules.plans import credits_to_ucr, overage_bands
from plugin.rules.policy import Ceiling, ceiling
from plugin.rules.pricing import UCR_PER_CREDIT
from plugin.settings import PlanConfig


@dataclass(frozen=True)
class Limits:
    """A customer's limits as stored (DESIGN "Limits body"); the defaults are "none set"."""

    soft_thresholds_pct: tuple[int, ...] | None = None
    """None: the configured default (policies.soft_thresholds_pct)."""
    hard_limit_ucr: int | None = None
    hard_limit_usd: Fraction | None = None
    """A hard limit in currency: it caps the period's usage charges (overage), not the base fee."""
    block_overage: bool = False
    notify_email: str | None = None
    notify_webhook_url: str | None = None

    def thresholds(self, default: tuple[int, ...]) -> tuple[int, ...]:
        """The soft thresholds in force: the customer's own, else the configured default."""
        return default if self.soft_thresholds_pct is None else self.soft_thresholds_pct


NO_LIMITS = Limits()


def usd_limit_as_ucr(limit_usd: Fraction, plan: PlanConfig) -> int | None:
    """The usage at which the overage charge reaches `limit_usd` (the inverse of `overage_usd`): the
    included quota plus what the money buys at each tier's rate in turn, rounded down (the charge never
    passes the limit). None when the charge can never reach it: the plan charges nothing for usage, or
    its last tier is free."""
    left = limit_usd
    for band in overage_bands(plan):
        if band.usd_per_credit == 0:
            if band.to_ucr is None:
                return None
            continue
        affordable = floor(left / band.usd_per_credit * UCR_PER_CREDIT)
        if band.to_ucr is None or band.from_ucr + affordable < band.to_ucr:
            return band.from_ucr + affordable
        left -= Fraction(band.to_ucr - band.from_ucr, UCR_PER_CREDIT) * band.usd_per_credit
    return None


def effective_ceiling(plan: PlanConfig, limits: Limits, *, global_overage_block: bool) -> Ceiling | None:
    """The ceiling for a customer on `plan` with `limits` (DESIGN `cap_ucr`), or None when unlimited.

    An overage block (the customer's or the operator's) only means something on a plan that charges
    for overage: it never turns a free plan's allowance or a legacy plan's flat fee into zero.
    """
    hard_ucr, hard_usd = limits.hard_limit_ucr, None
    if limits.hard_limit_usd is not None:
        hard_ucr, hard_usd = usd_limit_as_ucr(limits.hard_limit_usd, plan), limits.hard_limit_usd
        if hard_ucr is None:
            hard_usd = None
    return ceiling(
        plan_cap_ucr=None if plan.cap_credits is None else credits_to_ucr(plan.cap_credits),
        hard_limit_ucr=hard_ucr, hard_limit_usd=hard_usd,
        included_ucr=credits_to_ucr(plan.included_credits),
        block_overage=plan.has_overage and (limits.block_overage or global_overage_block),
    )


def soft_limit_base_ucr(plan: PlanConfig, limit: Ceiling | None, typical_period_ucr: int) -> int | None:
    """What soft thresholds are percentages of: the included quota; else the ceiling (hard limit or
    plan cap); else the customer's typical spend per period. None when there is nothing to measure
    against (a new customer with no quota and no limit)."""
    included = credits_to_ucr(plan.included_credits)
    if included > 0:
        return included
    if limit is not None and limit.ucr > 0:
        return limit.ucr
    return typical_period_ucr or None


def threshold_ucr(base_ucr: int, pct: int) -> int:
    """The usage at which a `pct` threshold is reached (rounded up: it is reached, not nearly)."""
    return -(-base_ucr * pct // 100)


def crossed_thresholds(thresholds_pct: tuple[int, ...], base_ucr: int, *, before_ucr: int,
                       after_ucr: int) -> list[int]:
    """The thresholds a charge moved usage across (before < threshold <= after), lowest first."""
    return sorted(pct for pct in set(thresholds_pct)
                  if before_ucr < threshold_ucr(base_ucr, pct) <= after_ucr)


def next_threshold(thresholds_pct: tuple[int, ...], base_ucr: int | None, used_ucr: int) -> int | None:
    """The lowest threshold not yet reached (for previews), or None."""
    if not base_ucr:
        return None
    ahead = [pct for pct in thresholds_pct if threshold_ucr(base_ucr, pct) > used_ucr]
    return min(ahead, default=None)

