"""Reconciliation maths with plain values (plugin/rules/reconcile.py): the window, the summary calls
that cover it on Stripe's alignment rules, the verdict per customer, and settling `unknown` events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from plugin.rules.invoices import (
    dollars,
    is_spike,
    plan_of_lookup_key,
    rise_pct,
    top_names,
)
from plugin.rules.reconcile import (
    Direction,
    Settlement,
    Status,
    SummaryRequest,
    Window,
    compare,
    divergence_pct,
    hour_of,
    settle_unknown,
    summary_requests,
    window,
)
from plugin.rules.rollups import HOUR, start_of


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize("period_start, now, lag, expected", [
    ("2026-12-01 00:00", "2026-12-03 10:17:45", 120, ("2026-12-01 00:00", "2026-12-03 10:15")),
    ("2026-12-01 00:00:30", "2026-12-03 10:17:00", 0, ("2026-12-01 00:00", "2026-12-03 10:17")),
    ("2026-12-01 00:00", "2026-12-01 00:01", 120, ("2026-12-01 00:00", "2026-12-01 00:00")),  # nothing yet
    ("2026-12-01 00:00", "2027-01-05 08:00", 120, ("2026-12-01 00:00", "2027-01-01 00:00")),  # a period past
])
def test_the_window_is_cut_on_whole_minutes_and_waits_for_stripe(period_start, now, lag, expected):
    period_end = at("2027-01-01 00:00")
    assert window(at(period_start), period_end, at(now), lag) == Window(at(expected[0]), at(expected[1]))


@pytest.mark.parametrize("start, end, expected", [
    ("00:00", "05:00", [("00:00", "05:00", True)]),
    ("00:00", "05:15", [("00:00", "05:00", True), ("05:00", "05:15", False)]),
    ("00:30", "05:15", [("00:30", "01:00", False), ("01:00", "05:00", True), ("05:00", "05:15", False)]),
    ("00:10", "00:50", [("00:10", "00:50", False)]),
    ("00:10", "01:20", [("00:10", "01:00", False), ("01:00", "01:20", False)]),
    ("00:10", "00:10", []),
])
def test_summary_calls_cover_the_window_with_hourly_windows_on_whole_hours(start, end, expected):
    day = "2026-12-01 "
    requests = summary_requests(Window(at(day + start), at(day + end)))
    assert requests == [SummaryRequest(at(day + a), at(day + b), hourly) for a, b, hourly in expected]
    for request in requests:  # Stripe's rules: minutes always, whole hours when grouped by hour
        assert request.start.second == request.end.second == 0
        assert not request.hourly or request.start.minute == request.end.minute == 0
        assert request.hourly or hour_of(request.start) == hour_of(request.end - timedelta(seconds=1))


H = hour_of(at("2026-12-01 10:00"))


@pytest.mark.parametrize("ledger, in_flight, stripe, status, divergence, pct, hours", [
    ({H: 1000, H + 1: 500}, {}, {H: 1000, H + 1: 500}, Status.OK, 0, 0.0, []),
    ({H: 1000, H + 1: 500}, {H + 1: 500}, {H: 1000}, Status.OK, 0, 0.0, []),  # on its way: not divergence
    ({H: 1000, H + 1: 500}, {}, {H: 1000}, Status.DIVERGED, 500, 33.33, [(H + 1, 500, 0)]),
    ({H: 1000}, {}, {H: 1000, H + 2: 40}, Status.DIVERGED, -40, 4.0, [(H + 2, 0, 40)]),
    ({H: 100_000}, {}, {H: 99_500}, Status.OK, 500, 0.5, []),  # under the 1% threshold
    ({}, {}, {}, Status.OK, 0, 0.0, []),
])
def test_the_verdict_per_customer(ledger, in_flight, stripe, status, divergence, pct, hours):
    found = compare("acme", "cus_1", ledger, in_flight, stripe, threshold_pct=1.0)
    assert (found.status, found.divergence_ucr, found.divergence_pct) == (status, divergence, pct)
    assert [(hour.hour, hour.ledger_ucr, hour.stripe_ucr) for hour in found.hours] == hours
    assert found.ledger_ucr - found.in_flight_ucr - found.stripe_ucr == found.divergence_ucr
    if hours:
        assert found.hours[0].start == start_of(hours[0][0], HOUR)
        assert found.direction is (Direction.STRIPE_SHORT if divergence > 0 else Direction.STRIPE_OVER)


def test_a_customer_without_a_stripe_id_is_not_linked_whatever_the_sums():
    found = compare("acme", None, {H: 1000}, {}, {}, threshold_pct=1.0)
    assert found.status is Status.NOT_LINKED and found.hours == () and found.direction is None


@pytest.mark.parametrize("divergence, ledger, expected", [(1, 3, 33.33), (2, 3, 66.67), (-5, 0, 500.0), (0, 0, 0.0),
                                                           (1, 200_000, 0.0), (1, 20_000, 0.01)])
def test_divergence_share_is_two_decimals_half_up(divergence, ledger, expected):
    assert divergence_pct(divergence, ledger) == expected


@pytest.mark.parametrize("ledger, other, unknown, stripe, expected", [
    (1000, 0, 300, 1000, Settlement.LANDED),
    (1000, 0, 300, 700, Settlement.MISSING),
    (1000, 0, 300, 850, Settlement.UNDECIDED),  # neither reading fits: an operator looks
    (1000, 200, 300, 1000, Settlement.UNDECIDED),  # something else is still on its way in that hour
    (1000, 0, 0, 1000, Settlement.UNDECIDED),
])
def test_unknown_events_are_settled_only_where_the_hour_proves_it(ledger, other, unknown, stripe, expected):
    assert settle_unknown(ledger, other, unknown, stripe) is expected


# ---------------------------------------------------------------------- the invoice spike guard


@pytest.mark.parametrize("previous, draft, pct, spike", [
    (2000, 5000, 50, True), (2000, 3000, 50, False), (2000, 3001, 50, True), (2000, 2000, 0, False),
    (2000, 2001, 0, True), (0, 1, 50, True), (0, 0, 50, False), (1999, 2999, 50, True),
])
def test_a_spike_is_more_than_the_share_above_the_previous_total(previous, draft, pct, spike):
    assert is_spike(previous, draft, pct) is spike


def test_amounts_and_names_as_the_alert_writes_them():
    assert (dollars(2000), dollars(5), dollars(-150), dollars(123456789)) == ("$20.00", "$0.05", "-$1.50",
                                                                             "$1,234,567.89")
    assert (rise_pct(2000, 5000), rise_pct(0, 5000)) == ("+150%", "new")
    assert top_names({"a": 5, "b": 9, "c": 5, "d": 1}) == ["b", "a", "c"]
    assert [plan_of_lookup_key(key, "meterline") for key in (
        "meterline_pro_usage", "meterline_team_plus_base", "other_pro_usage", None, "meterline__base")] == [
        "pro", "team_plus", None, None, None]
