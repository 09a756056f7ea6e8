"""Migration maths (DESIGN "Contract: migration and pricing operations"), pure: the 30-day windows a
look back is split into, the quota a flat-rate fleet's usage suggests (nearest-rank percentile of
each customer's mean per window) with who would pay overage at it and how much, and what moving a
customer from a flat price to a metered plan does to its bill."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from fractions import Fraction
from string import Template

from plugin.rules.plans import credits_to_ucr, overage_usd, period_usd
from plugin.rules.pricing import UCR_PER_CREDIT, round_half_up
from plugin.rules.usage import dollars
from plugin.settings import PlanConfig

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


def suggest_quota(means_ucr: Mapping[str, Fraction], plans: Mapping[str, PlanConfig],
                  percentile: float, days: int) -> QuotaSuggestion:
    """From each customer's mean µcr per window (customers with usage only) and the plan terms it is billed
    on: its usage above the suggested quota is priced as that plan prices usage above its included credits."""
    quota_ucr = nearest_rank(list(means_ucr.values()), percentile)
    quota_credits = -(-quota_ucr.numerator // (quota_ucr.denominator * UCR_PER_CREDIT))
    over = {customer: mean for customer, mean in means_ucr.items() if mean > quota_credits * UCR_PER_CREDIT}
    overage = sum((overage_usd(with_included(plans[customer], quota_credits), round_half_up(mean))
                   for customer, mean in over.items() if customer in plans), Fraction(0))
    return QuotaSuggestion(percentile, days, quota_credits, len(means_ucr), len(over), overage)


def with_included(plan: PlanConfig, credits: int) -> PlanConfig:
    """The plan with `credits` included instead of its own quota."""
    return plan.model_copy(update={"included_credits": Fraction(credits)})


@dataclass(frozen=True)
class Impact:
    """What moving one customer from its flat price to a metered plan does to its monthly bill."""

    customer_id: str
    windows_ucr: tuple[int, ...]
    """Its usage in each 30-day window, oldest first."""
    old_usd: Fraction
    projected_usd: Fraction
    """The metered plan's bill for its mean usage per window (never past the plan's cap: nothing is billed beyond)."""

    @property
    def difference_usd(self) -> Fraction:
        return self.projected_usd - self.old_usd


def impact(customer_id: str, windows_ucr: tuple[int, ...], flat_usd: Fraction, plan: PlanConfig) -> Impact:
    mean_ucr = round_half_up(Fraction(sum(windows_ucr), len(windows_ucr)))
    if plan.cap_credits is not None:
        mean_ucr = min(mean_ucr, credits_to_ucr(plan.cap_credits))
    return Impact(customer_id, windows_ucr, flat_usd, period_usd(plan, mean_ucr))


@dataclass(frozen=True)
class ImpactTotals:
    """The whole move at a glance: the revenue before and after, and who pays more."""

    customers: int
    old_usd: Fraction
    projected_usd: Fraction
    paying_more: int
    paying_less: int

    @property
    def difference_usd(self) -> Fraction:
        return self.projected_usd - self.old_usd

    @property
    def revenue_change_pct(self) -> Fraction | None:
        """The change in monthly revenue, in percent of today's; None when today's is zero."""
        return None if not self.old_usd else self.difference_usd / self.old_usd * 100


def impact_totals(impacts: list[Impact]) -> ImpactTotals:
    return ImpactTotals(
        customers=len(impacts), old_usd=sum((each.old_usd for each in impacts), Fraction(0)),
        projected_usd=sum((each.projected_usd for each in impacts), Fraction(0)),
        paying_more=sum(1 for each in impacts if each.difference_usd > 0),
        paying_less=sum(1 for each in impacts if each.difference_usd < 0))


NOTICE_DAYS = 60
"""A price change is announced this many days ahead (`meterline migrate notice`)."""
LEGACY_LINK_PLACEHOLDER = "[link to stay on the legacy plan]"
NOTICE_FIELDS = ("customer_id", "plan", "to_plan", "effective_date", "old_usd", "projected_usd", "difference_usd",
                 "window_1_credits", "window_2_credits", "window_3_credits", "mean_credits", "stay_on_legacy_link")


def notice_values(each: Impact, *, plan: str, to_plan: str, effective: date, legacy_link: str | None) -> dict[str, str]:
    """What a notice template may name (NOTICE_FIELDS), as text: dollars with cents, credits to the credit."""
    def credits(ucr: Fraction | int) -> str:
        return f"{round_half_up(Fraction(ucr, UCR_PER_CREDIT)):,}"

    values = {"customer_id": each.customer_id, "plan": plan, "to_plan": to_plan, "effective_date": effective.isoformat(),
              "old_usd": _usd(each.old_usd), "projected_usd": _usd(each.projected_usd),
              "difference_usd": _usd(each.difference_usd, signed=True), "mean_credits": credits(Fraction(sum(each.windows_ucr),
                                                                                             len(each.windows_ucr))),
              "stay_on_legacy_link": legacy_link or LEGACY_LINK_PLACEHOLDER}
    values |= {f"window_{index}_credits": credits(ucr) for index, ucr in enumerate(each.windows_ucr, start=1)}
    return values


def _usd(amount: Fraction, *, signed: bool = False) -> str:
    """"$12.50"; signed: "+$3.00" / "-$3.00" (a template writes `$old_usd`, not `$$$old_usd`)."""
    sign = "-" if amount < 0 else "+" if signed and amount > 0 else ""
    return f"{sign}${dollars(abs(amount))}"


def check_template(template: str) -> None:
    """ValueError naming the first placeholder that is not a notice field (or a malformed `$`)."""
    unknown = [name for name in Template(template).get_identifiers() if name not in NOTICE_FIELDS]
    if unknown:
        raise ValueError(f"the template names ${unknown[0]}, which is not one of: "
                         + ", ".join(f"${name}" for name in NOTICE_FIELDS))
    if not Template(template).is_valid():
        raise ValueError("the template has a `$` that is not a placeholder: write `$$` for a dollar sign")


def render_notice(template: str, values: Mapping[str, str]) -> str:
    check_template(template)
    return Template(template).substitute(values)
