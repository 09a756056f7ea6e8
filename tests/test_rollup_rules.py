"""The pure maths of usage reads: folding rows into rollups, splitting windows, report figures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugin.rules.pricing import divide_half_up, round_half_up
from plugin.rules.records import LedgerRow
from plugin.rules.rollups import (
    DAY,
    HOUR,
    Tally,
    fold,
    split,
    start_of,
    sum_window,
    typical_hour_ucr,
    unit_of,
)
from plugin.rules.usage import pct, projected_overage_usd, projected_usd, top_actions
from plugin.settings import PlanConfig

T = datetime(2026, 11, 5, 9, 30, tzinfo=UTC)


def row(number: int, at: datetime, credits: int, **labels) -> LedgerRow:
    return LedgerRow(id=f"r{number}", customer_id=labels.pop("customer", "acme"), model=labels.pop("model", "m"),
                     created_at=at, credits_ucr=credits, **labels)


def test_fold_counts_a_row_once_per_hour_and_once_per_dimension():
    hours, days = fold([row(1, T, 10, action="chat"), row(2, T + timedelta(minutes=29, seconds=59), 5),
                        row(3, T + timedelta(minutes=30), 7, member="bob", saved_ucr=3)])
    hour = unit_of(T, HOUR)
    assert hours == {("acme", hour): Tally(15, 2, 0), ("acme", hour + 1): Tally(7, 1, 3)}
    day = unit_of(T, DAY)
    assert days[("acme", day, "model", "m")] == Tally(22, 3, 3)
    assert days[("acme", day, "action", "chat")] == Tally(10, 1, 0)
    assert days[("acme", day, "action", "-")] == Tally(12, 2, 3)
    assert days[("acme", day, "member", "bob")] == Tally(7, 1, 3)
    assert sum(t.requests for (_, _, dim, _), t in days.items() if dim == "member") == 3


def test_units_are_floored_to_the_microsecond():
    last = datetime(2026, 11, 5, 9, 59, 59, 999_999, tzinfo=UTC)
    assert unit_of(last, HOUR) == unit_of(T, HOUR)
    assert unit_of(last + timedelta(microseconds=1), HOUR) == unit_of(T, HOUR) + 1
    assert start_of(unit_of(T, DAY), DAY) == datetime(2026, 11, 5, tzinfo=UTC)


@pytest.mark.parametrize("start, end, whole, head, tail", [
    ("2026-11-01T00:00", "2026-11-04T00:00", 3, None, None),
    ("2026-11-01T09:30", "2026-11-04T00:00", 2, ("2026-11-01T09:30", "2026-11-02T00:00"), None),
    ("2026-11-01T00:00", "2026-11-03T12:00", 2, None, ("2026-11-03T00:00", "2026-11-03T12:00")),
    ("2026-11-01T09:30", "2026-11-01T10:00", 0, ("2026-11-01T09:30", "2026-11-01T10:00"), None),
    ("2026-11-01T09:30", "2026-11-02T09:30", 0, ("2026-11-01T09:30", "2026-11-02T00:00"),
     ("2026-11-02T00:00", "2026-11-02T09:30")),
])
def test_split_into_whole_days_and_partial_edges(start, end, whole, head, tail):
    moment = lambda text: datetime.fromisoformat(text).replace(tzinfo=UTC)  # noqa: E731
    found = split(moment(start), moment(end), DAY)
    assert found.stop - found.first == whole
    assert found.head == (None if head is None else tuple(map(moment, head)))
    assert found.tail == (None if tail is None else tuple(map(moment, tail)))


def test_split_of_an_empty_window_has_nothing():
    found = split(T, T, DAY)
    assert (found.stop - found.first, found.edges) == (0, [])


def test_sum_window_takes_days_then_hours_and_names_what_neither_covers():
    day = unit_of(T, DAY)
    hour = unit_of(T, HOUR)  # 09:00 today
    days = {day - 3: 10**9, day - 2: 100, day - 1: 1000, day: 10**9}
    hours = {hour - 4: 10**9, hour - 3: 6, hour - 2: 7, hour - 1: 8, hour: 9}
    start = T - timedelta(days=2)  # 09:30 the day before yesterday
    used, missing = sum_window(start, start_of(hour, HOUR), days, hours, hours_from=hour - 3)
    # yesterday is the one whole day; today's hours from 06:00 are known; nothing from outside the window
    assert used == 1000 + 6 + 7 + 8
    at = lambda days_back, hh, mm=0: datetime(2026, 11, 5 - days_back, hh, mm, tzinfo=UTC)  # noqa: E731
    assert missing == [(at(2, 10), at(1, 0)), (at(2, 9, 30), at(2, 10)), (at(0, 0), at(0, 6))]


def test_typical_hour_is_the_trailing_days_mean_and_starts_with_the_customer():
    today = 20_000
    days = {today - 8: 10**9, today - 7: 168, today - 1: 168 * 2}
    old = start_of(today - 30, DAY)
    assert typical_hour_ucr(days, today, old) == 3  # (168 + 336) / 168 hours; day -8 is outside
    assert typical_hour_ucr(days, today, start_of(today - 1, DAY)) == 14  # one day of history: 336 / 24
    assert typical_hour_ucr(days, today, start_of(today, DAY) + timedelta(hours=3)) == 0  # no whole day yet


def test_pct_has_one_decimal_rounded_half_up_and_none_without_a_whole():
    assert pct(1, 3) == 33.3
    assert pct(2, 3) == 66.7
    assert pct(1, 8) == 12.5
    assert pct(1, 16) == 6.3
    assert pct(5, 0) is None
    assert pct(3, 2) == 150.0


def test_projected_dollars_are_base_fee_plus_projected_overage_never_past_the_ceiling():
    pro = PlanConfig(included_credits=Fraction(1000), base_fee_usd=Fraction(20),
                     overage_usd_per_credit=Fraction(1, 100))
    assert projected_usd(pro, 500 * 10**6, None) == "20.00"
    assert projected_usd(pro, 1500 * 10**6, None) == "25.00"
    assert projected_usd(pro, 1500 * 10**6, 1200 * 10**6) == "22.00"
    assert projected_usd(pro, 1000 * 10**6 + 1, None) == "20.00000001"
    assert projected_overage_usd(pro, 1500 * 10**6, None) == "5.00"
    assert projected_overage_usd(pro, 1500 * 10**6, 1200 * 10**6) == "2.00"
    assert projected_overage_usd(pro, 500 * 10**6, None) == "0.00"
    free = PlanConfig(cap_credits=Fraction(100))
    assert projected_usd(free, 90 * 10**6, 100 * 10**6) == "0.00"
    assert projected_overage_usd(free, 200 * 10**6, 100 * 10**6) == "0.00"


def test_top_actions_are_largest_first_at_most_ten_the_rest_as_other():
    by_action = {f"a{i:02d}": 10 + i for i in range(12)} | {"-": 5}
    top = top_actions(by_action)
    assert [entry["action"] for entry in top] == [f"a{i:02d}" for i in range(11, 1, -1)] + ["(other)"]
    assert top[-1]["used_ucr"] == 10 + 11 + 5
    assert sum(entry["used_ucr"] for entry in top) == sum(by_action.values())
    assert top[0]["share_pct"] == pct(21, sum(by_action.values()))
    assert top_actions({}) == []
    assert top_actions({"x": 0}) == [{"action": "x", "used_ucr": 0, "share_pct": 0.0}]


@given(st.integers(min_value=0, max_value=10**24), st.integers(min_value=1, max_value=10**15))
def test_integer_half_up_division_is_the_money_paths_rounding(numerator, denominator):
    assert divide_half_up(numerator, denominator) == round_half_up(Fraction(numerator, denominator))
