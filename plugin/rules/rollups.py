"""Rollup maths for usage reads: what a batch of ledger rows adds to the hourly and daily rollups,
and how a time window splits into whole units (read from rollups) and partial edges (read from
the ledger itself). Pure: plain values in, plain values out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from plugin.rules.pricing import divide_half_up
from plugin.rules.records import LedgerRow

HOUR = 3600
DAY = 86400
DIMENSIONS = ("model", "action", "member")
"""The daily rollup's breakdowns: every ledger row counts once in each."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Tally:
    """Usage summed over some ledger rows."""

    credits_ucr: int = 0
    requests: int = 0
    saved_ucr: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.credits_ucr + other.credits_ucr, self.requests + other.requests,
                     self.saved_ucr + other.saved_ucr)


NOTHING = Tally()


def unit_of(moment: datetime, unit_seconds: int) -> int:
    """Whole units (hours, days) since the Unix epoch of the unit holding `moment` (UTC)."""
    return int((moment.astimezone(UTC) - _EPOCH).total_seconds()) // unit_seconds


def start_of(unit: int, unit_seconds: int) -> datetime:
    """The instant unit number `unit` starts."""
    return _EPOCH + timedelta(seconds=unit * unit_seconds)


def fold(entries: Iterable[LedgerRow]) -> tuple[dict[tuple[str, int], Tally], dict[tuple[str, int, str, str], Tally]]:
    """What `entries` add to the rollups: per (customer, hour), and per (customer, day, dimension, name).
    On the billing path (one call per ledger commit): plain lists while adding up, Tallies at the end."""
    hours: dict[tuple, list[int]] = {}
    days: dict[tuple, list[int]] = {}
    for entry in entries:
        seconds = int((entry.created_at.astimezone(UTC) - _EPOCH).total_seconds())
        credits, saved = entry.credits_ucr, entry.saved_ucr
        day = seconds // DAY
        for found, key in ((hours, (entry.customer_id, seconds // HOUR)),
                           (days, (entry.customer_id, day, "model", entry.model)),
                           (days, (entry.customer_id, day, "action", entry.action)),
                           (days, (entry.customer_id, day, "member", entry.member))):
            sums = found.get(key)
            if sums is None:
                found[key] = [credits, 1, saved]
            else:
                sums[0] += credits
                sums[1] += 1
                sums[2] += saved
    return ({key: Tally(*sums) for key, sums in hours.items()}, {key: Tally(*sums) for key, sums in days.items()})


@dataclass(frozen=True)
class Split:
    """A window [start, end) as whole units [first, stop) with at most a partial edge on each side.
    Edges are None when the window starts or ends on a unit boundary."""

    first: int
    stop: int
    head: tuple[datetime, datetime] | None
    tail: tuple[datetime, datetime] | None

    @property
    def edges(self) -> list[tuple[datetime, datetime]]:
        return [edge for edge in (self.head, self.tail) if edge is not None]


def split(start: datetime, end: datetime, unit_seconds: int) -> Split:
    """Split [start, end) into the whole units it covers and the partial edges around them."""
    if end <= start:
        first = unit_of(start, unit_seconds)
        return Split(first, first, None, None)
    first = unit_of(start, unit_seconds)
    if start_of(first, unit_seconds) < start:
        first += 1
    stop = unit_of(end, unit_seconds)
    if stop < first:  # the window lies inside one unit
        return Split(first, first, (start, end), None)
    head = (start, start_of(first, unit_seconds)) if start_of(first, unit_seconds) > start else None
    tail = (start_of(stop, unit_seconds), end) if start_of(stop, unit_seconds) < end else None
    return Split(first, stop, head, tail)


def sum_window(start: datetime, end: datetime, days: Mapping[int, int], hours: Mapping[int, int],
               hours_from: int) -> tuple[int, list[tuple[datetime, datetime]]]:
    """µcr in [start, end) from daily totals (whole days) and hourly totals (whole hours, known from hour
    `hours_from` on). Returns the sum and the pieces neither covers (partial hours, or hours older than
    `hours_from` in a partial day), which the caller reads from the ledger itself."""
    total, missing = 0, []
    by_day = split(start, end, DAY)
    total += sum(days.get(day, 0) for day in range(by_day.first, by_day.stop))
    for edge_start, edge_end in by_day.edges:
        by_hour = split(edge_start, edge_end, HOUR)
        known_from = min(max(by_hour.first, hours_from), by_hour.stop)
        if known_from > by_hour.first:
            missing.append((start_of(by_hour.first, HOUR), start_of(known_from, HOUR)))
        total += sum(hours.get(hour, 0) for hour in range(known_from, by_hour.stop))
        missing.extend(by_hour.edges)
    return total, missing


def typical_hour_ucr(days: Mapping[int, int], today: int, created_at: datetime, baseline_days: int = 7) -> int:
    """Mean µcr per hour over the whole UTC days before `today` (at most `baseline_days`, none before the
    customer existed); 0 without any such hour."""
    first = max(today - baseline_days, unit_of(created_at, DAY))
    if first >= today:
        return 0
    spent = sum(days.get(day, 0) for day in range(first, today))
    return divide_half_up(spent, (today - first) * 24)
