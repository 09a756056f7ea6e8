"""Pure plan maths: billing periods, included quota and projections. No clock reads: pass `now`."""

from __future__ import annotations

from calendar import monthrange
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction

from plugin.rules.pricing import UCR_PER_CREDIT, divide_half_up, round_half_up
from plugin.settings import PlanConfig


@dataclass(frozen=True)
class Period:
    """A half-open billing period [start, end) in UTC."""

    start: datetime
    end: datetime

    @property
    def seconds(self) -> int:
        return int((self.end - self.start).total_seconds())


def calendar_month(now: datetime) -> Period:
    """The calendar month (UTC) containing `now`: the default billing period."""
    now = now.astimezone(UTC)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    end = datetime(now.year + 1, 1, 1, tzinfo=UTC) if now.month == 12 else datetime(now.year, now.month + 1, 1, tzinfo=UTC)
    return Period(start, end)


def anchored_month(anchor: datetime, now: datetime) -> Period:
    """The monthly period containing `now` for a customer whose periods start at `anchor` (its
    subscription's start, say): same day of the month and time of day, the day clamped to short
    months (an anchor on the 31st starts February's period on the 28th or 29th)."""
    anchor, now = anchor.astimezone(UTC), now.astimezone(UTC)

    def start_in(year: int, month: int) -> datetime:
        day = min(anchor.day, monthrange(year, month)[1])
        return anchor.replace(year=year, month=month, day=day)

    def shift(year: int, month: int, months: int) -> tuple[int, int]:
        index = year * 12 + (month - 1) + months
        return index // 12, index % 12 + 1

    year, month = now.year, now.month
    if start_in(year, month) > now:
        year, month = shift(year, month, -1)
    return Period(start_in(year, month), start_in(*shift(year, month, 1)))


def credits_to_ucr(credits: Fraction) -> int:
    return round_half_up(credits * UCR_PER_CREDIT)


def project_period_total(used_ucr: int, period: Period, now: datetime) -> int:
    """Straight-line projection of the period total from spend so far (at least what is used)."""
    return project_from_elapsed(used_ucr, period.seconds, int((now.astimezone(UTC) - period.start).total_seconds()))


def project_from_elapsed(used_ucr: int, period_seconds: int, elapsed_seconds: int) -> int:
    """`project_period_total` with the period's length and the whole seconds elapsed in it given: the
    fleet projects thousands of customers of one period at one instant."""
    if elapsed_seconds <= 0 or elapsed_seconds >= period_seconds:
        return used_ucr
    return max(used_ucr, divide_half_up(used_ucr * period_seconds, elapsed_seconds))


def overage_usd(plan: PlanConfig, used_ucr: int) -> Fraction:
    """What a period's usage costs past the plan's included quota at its overage price, exactly (0 on a
    plan that charges no overage). Every report that prices usage (projections, impact, quota
    suggestions, expected invoices) asks this one function."""
    if not plan.has_overage:
        return Fraction(0)
    over_ucr = max(0, used_ucr - credits_to_ucr(plan.included_credits))
    return Fraction(over_ucr, UCR_PER_CREDIT) * plan.overage_usd_per_credit


def period_usd(plan: PlanConfig, used_ucr: int) -> Fraction:
    """A period's bill on `plan` for `used_ucr` of usage: the base fee plus the overage, exactly."""
    return Fraction(plan.base_fee_usd or 0) + overage_usd(plan, used_ucr)
