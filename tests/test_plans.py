"""Pure plan maths: billing periods and projections, with the clock passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction

import pytest

from plugin.plans import Period, calendar_month, credits_to_ucr, project_period_total


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        (datetime(2026, 11, 24, 1, 2, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
        (datetime(2026, 12, 31, 23, 59, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2028, 2, 29, tzinfo=UTC), datetime(2028, 2, 1, tzinfo=UTC), datetime(2028, 3, 1, tzinfo=UTC)),
        # 00:30 on Dec 1st in UTC+2 is still November in UTC
        (datetime(2026, 12, 1, 0, 30, tzinfo=timezone(timedelta(hours=2))),
         datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
    ],
)
def test_calendar_month_is_the_utc_month_containing_now(now, start, end):
    assert calendar_month(now) == Period(start, end)


def test_projection_is_straight_line_and_never_below_what_is_used():
    period = Period(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    assert project_period_total(1_000, period, datetime(2026, 11, 16, tzinfo=UTC)) == 2_000  # half way: doubled
    assert project_period_total(1_000, period, datetime(2026, 11, 1, tzinfo=UTC)) == 1_000  # nothing elapsed yet
    assert project_period_total(1_000, period, datetime(2026, 12, 5, tzinfo=UTC)) == 1_000  # period over
    assert project_period_total(0, period, datetime(2026, 11, 20, tzinfo=UTC)) == 0
    assert isinstance(project_period_total(7, period, datetime(2026, 11, 3, 5, tzinfo=UTC)), int)


def test_credits_to_ucr_is_exact():
    assert credits_to_ucr(Fraction(100)) == 100_000_000
    assert credits_to_ucr(Fraction(1, 3)) == 333_333
    assert credits_to_ucr(Fraction(5, 10_000_000)) == 1  # half a µcr rounds up
