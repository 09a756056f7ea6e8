"""Pure plan maths: billing periods, included quota and projections. No clock reads: pass `now`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction

from plugin.pricing import UCR_PER_CREDIT, round_half_up


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


def credits_to_ucr(credits: Fraction) -> int:
    return round_half_up(credits * UCR_PER_CREDIT)


def project_period_total(used_ucr: int, period: Period, now: datetime) -> int:
    """Straight-line projection of the period total from spend so far (at least what is used)."""
    elapsed = int((now.astimezone(UTC) - period.start).total_seconds())
    if elapsed <= 0:
        return used_ucr
    if elapsed >= period.seconds:
        return used_ucr
    return max(used_ucr, round_half_up(Fraction(used_ucr * period.seconds, elapsed)))
