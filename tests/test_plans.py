"""Pure plan maths: billing periods and projections, with the clock passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction

import pytest

from plugin.rules.plans import (
    Period,
    anchored_month,
    calendar_month,
    credits_to_ucr,
    project_period_total,
)


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


@pytest.mark.parametrize(("anchor", "now", "start", "end"), [
    # anchored on the 15th at 09:30
    (datetime(2026, 1, 15, 9, 30, tzinfo=UTC), datetime(2026, 11, 24, tzinfo=UTC),
     datetime(2026, 11, 15, 9, 30, tzinfo=UTC), datetime(2026, 12, 15, 9, 30, tzinfo=UTC)),
    (datetime(2026, 1, 15, 9, 30, tzinfo=UTC), datetime(2026, 11, 15, 9, 29, tzinfo=UTC),
     datetime(2026, 10, 15, 9, 30, tzinfo=UTC), datetime(2026, 11, 15, 9, 30, tzinfo=UTC)),
    (datetime(2026, 1, 15, 9, 30, tzinfo=UTC), datetime(2026, 11, 15, 9, 30, tzinfo=UTC),
     datetime(2026, 11, 15, 9, 30, tzinfo=UTC), datetime(2026, 12, 15, 9, 30, tzinfo=UTC)),
    # the 31st clamps to short months, and comes back in long ones
    (datetime(2026, 1, 31, tzinfo=UTC), datetime(2027, 2, 10, tzinfo=UTC),
     datetime(2027, 1, 31, tzinfo=UTC), datetime(2027, 2, 28, tzinfo=UTC)),
    (datetime(2026, 1, 31, tzinfo=UTC), datetime(2028, 3, 1, tzinfo=UTC),
     datetime(2028, 2, 29, tzinfo=UTC), datetime(2028, 3, 31, tzinfo=UTC)),
    # across the year boundary
    (datetime(2026, 3, 20, tzinfo=UTC), datetime(2027, 1, 5, tzinfo=UTC),
     datetime(2026, 12, 20, tzinfo=UTC), datetime(2027, 1, 20, tzinfo=UTC)),
    # an anchor on the 1st at midnight is the calendar month
    (datetime(2025, 6, 1, tzinfo=UTC), datetime(2026, 11, 24, 13, 0, tzinfo=UTC),
     datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
])
def test_anchored_month(anchor, now, start, end):
    assert anchored_month(anchor, now) == Period(start, end)


def test_anchored_months_tile_time_without_gaps_or_overlaps():
    anchor = datetime(2026, 1, 31, 23, 59, tzinfo=UTC)
    period = anchored_month(anchor, datetime(2026, 2, 1, tzinfo=UTC))
    for _ in range(30):
        following = anchored_month(anchor, period.end)
        assert following.start == period.end and following.end > following.start
        period = following
