"""Migration maths (DESIGN "Contract: migration and pricing operations"), pure: the 30-day windows a
look back is split into, and the quota a flat-rate fleet's usage suggests (nearest-rank percentile of
each customer's mean per window), with who would pay overage at it and how much."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from plugin.rules.pricing import UCR_PER_CREDIT

WINDOW_DAYS = 30


def window_days(today: int, days: int) -> list[tuple[int, int]]:
    """[first, stop) day numbers of the `days // 30` windows of 30 whole UTC days, the newest ending with
    `today` (its usage so far included), oldest first. ValueError unless `days` is a positive multiple of 30."""
    if days <= 0 or days % WINDOW_DAYS:
        raise ValueError(f"days: a positive multiple of {WINDOW_DAYS}, got {days}")
    stop = today + 1
    count = days // WINDOW_DAYS
    return [(stop - WINDOW_DAYS * (count - index), stop - WINDOW_DAYS * (count - index - 1)) for index in range(count)]


def nearest_rank(values: list[Fraction], percentile: float) -> Fraction:
    """The nearest-rank percentile: the smallest value with at least `percentile`% of the values at or below it."""
    if not values:
        return Fraction(0)
    ordered = sorted(values)
    rank = max(1, -(-int(round(percentile * 100)) * len(ordered) // 10_000))  # ceil(p/100 × N), exact
    return ordered[rank - 1]


@dataclass(frozen=True)
class QuotaSuggestion:
    percentile: float
    days: int
    quota_credits: int
    """The percentile of customers' mean monthly usage, in whole credits (rounded up)."""
    customers: int
    over_quota_customers: int
    """Customers whose mean is strictly above the quota."""
    overage_usd: Fraction
    """Per month: what those customers' means above the quota come to at their plan's rate."""


def suggest_quota(means_ucr: Mapping[str, Fraction], rates_usd_per_credit: Mapping[str, Fraction | None],
                  percentile: float, days: int) -> QuotaSuggestion:
    """From each customer's mean µcr per window (customers with usage only) and its overage rate."""
    quota_ucr = nearest_rank(list(means_ucr.values()), percentile)
    quota_credits = -(-quota_ucr.numerator // (quota_ucr.denominator * UCR_PER_CREDIT))
    over = {customer: mean for customer, mean in means_ucr.items() if mean > quota_credits * UCR_PER_CREDIT}
    overage = sum((Fraction(mean - quota_credits * UCR_PER_CREDIT, UCR_PER_CREDIT) * (rates_usd_per_credit.get(
        customer) or 0) for customer, mean in over.items()), Fraction(0))
    return QuotaSuggestion(percentile, days, quota_credits, len(means_ucr), len(over), overage)
