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


@dataclass(frozen=True)
class OverageBand:
    """One overage rate over a stretch of a period's usage, in µcr counted from zero (the included quota
    first): usage above `from_ucr` and up to `to_ucr` (inclusive, as Stripe's `up_to`) costs this rate."""

    from_ucr: int
    to_ucr: int | None
    """None: no bound (the last band)."""
    usd_per_credit: Fraction

    def units(self, used_ucr: int) -> int:
        """How much of `used_ucr` falls in this band."""
        top = used_ucr if self.to_ucr is None else min(used_ucr, self.to_ucr)
        return max(0, top - self.from_ucr)


def overage_bands(plan: PlanConfig) -> tuple[OverageBand, ...]:
    """The overage the plan charges as graduated bands of usage (see `price_bands`); none on a plan that
    charges no overage (no price, or a legacy plan that is never billed for it)."""
    return price_bands(plan) if plan.has_overage else ()


def price_bands(plan: PlanConfig) -> tuple[OverageBand, ...]:
    """The plan's overage price as configured, as graduated bands of usage: one band from the included quota
    up for a flat rate, one per tier for `overage_tiers`. The Stripe price (made for legacy plans too), the
    invoice maths and the currency-limit inverse all read these bands."""
    if plan.overage_usd_per_credit is None and plan.overage_tiers is None:
        return ()
    included = credits_to_ucr(plan.included_credits)
    if plan.overage_tiers is None:
        return (OverageBand(included, None, plan.overage_usd_per_credit),)
    bands, start = [], included
    for tier in plan.overage_tiers:
        end = None if tier.up_to_credits is None else included + credits_to_ucr(tier.up_to_credits)
        bands.append(OverageBand(start, end, tier.usd_per_credit))
        start = end
    return tuple(bands)


def overage_by_band(plan: PlanConfig, used_ucr: int) -> list[Fraction]:
    """What each band charges for a period's `used_ucr`, exactly, in band order: the parts Stripe bills (and
    rounds) as separate lines of a graduated price."""
    return [Fraction(band.units(used_ucr), UCR_PER_CREDIT) * band.usd_per_credit for band in overage_bands(plan)]


def current_band(plan: PlanConfig, used_ucr: int) -> int | None:
    """The index of the band the period's next credit is priced in; None while usage is below the included
    quota (or on a plan without overage)."""
    for index, band in enumerate(overage_bands(plan)):
        if used_ucr >= band.from_ucr and (band.to_ucr is None or used_ucr < band.to_ucr):
            return index
    return None


def overage_usd(plan: PlanConfig, used_ucr: int) -> Fraction:
    """What a period's usage costs past the plan's included quota at its overage price (graduated across
    its tiers), exactly (0 on a plan that charges no overage). Every report that prices usage
    (projections, impact, quota suggestions, expected invoices, previews) asks this one function."""
    return sum(overage_by_band(plan, used_ucr), Fraction(0))


def period_usd(plan: PlanConfig, used_ucr: int) -> Fraction:
    """A period's bill on `plan` for `used_ucr` of usage: the base fee plus the overage, exactly."""
    return Fraction(plan.base_fee_usd or 0) + overage_usd(plan, used_ucr)
