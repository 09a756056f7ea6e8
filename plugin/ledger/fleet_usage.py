"""Every customer's recent usage at once, for the fleet (`GET /customers`): the last 24 clock hours,
today, the period so far and the typical hour, for thousands of customers in one request.

What is older than the last hour or two does not change (the ledger is append-only), so it is read
once and kept ("frozen"); each request then reads only the hourly rollup rows since then, a few per
active customer. The frozen part is rebuilt every few hours and at each new UTC day, and dropped
when the rollups are rebuilt (`forget`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine

from plugin.ledger import rollups
from plugin.ledger.store import billed_between
from plugin.rules.rollups import (
    DAY,
    HOUR,
    split,
    start_of,
    sum_window,
    typical_hour_ucr,
    unit_of,
)

FRESH_HOURS = 3
"""Rebuild the frozen part once the hours read fresh on every request would be more than this."""
PERIOD_DAYS = 32
"""Daily totals kept: enough for any monthly period so far, and the typical hour's trailing week."""


@dataclass
class _Frozen:
    until: int
    """Hours before this one are frozen; hours from it on are read fresh."""
    day: int
    """The UTC day the frozen part was built on (its daily totals end the day before)."""
    hours: dict[str, dict[int, int]]
    """customer -> hour -> µcr, for the 24 hours before `until`."""
    days: dict[str, dict[int, int]]
    """customer -> day -> µcr, for the PERIOD_DAYS days before `day`."""
    before: dict[tuple[str, datetime], int] = field(default_factory=dict)
    """(customer, window start) -> µcr from the start to `until`, computed on first use."""


class FleetUsage:
    """Recent usage of every customer; one per process, shared by the requests that read the fleet."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._frozen: _Frozen | None = None

    def snapshot(self, now: datetime) -> Snapshot:
        hour = unit_of(now, HOUR)
        with self._lock:
            frozen = self._frozen
            if frozen is None or hour - frozen.until >= FRESH_HOURS or unit_of(now, DAY) != frozen.day:
                frozen = self._frozen = self._freeze(hour - 1, unit_of(now, DAY))
        return Snapshot(self._engine, frozen, rollups.credits_by_hour(self._engine, frozen.until, hour + 1), now)

    def forget(self) -> None:
        """Read everything again on the next snapshot (after the rollups were rebuilt or history imported)."""
        with self._lock:
            self._frozen = None

    def _freeze(self, until: int, day: int) -> _Frozen:
        return _Frozen(until=until, day=day,
                       hours=rollups.credits_by_hour(self._engine, until - 24, until),
                       days=rollups.credits_by_day(self._engine, day - PERIOD_DAYS, day))


class Snapshot:
    """Every customer's usage as of one request: frozen totals plus the hours read fresh."""

    def __init__(self, engine: Engine, frozen: _Frozen, fresh: dict[str, dict[int, int]], now: datetime) -> None:
        self._engine, self._frozen, self._fresh, self.now = engine, frozen, fresh, now
        self.hour = unit_of(now, HOUR)

    def hourly(self, customer_id: str) -> list[int]:
        """µcr in each of the 24 clock hours up to now, oldest first (the last one is the current hour)."""
        fresh = self._fresh.get(customer_id, {})
        frozen = self._frozen.hours.get(customer_id, {})
        until = self._frozen.until
        return [(fresh if hour >= until else frozen).get(hour, 0) for hour in range(self.hour - 23, self.hour + 1)]

    def used_since(self, customer_id: str, start: datetime) -> int:
        """µcr billed to the customer from `start` up to now."""
        fresh = self._fresh.get(customer_id, {})
        boundary = start_of(self._frozen.until, HOUR)
        if start < boundary:
            return self._before(customer_id, start) + sum(fresh.values())
        window = split(start, start_of(self.hour + 1, HOUR), HOUR)
        used = sum(credits for hour, credits in fresh.items() if hour >= window.first)
        if window.head is not None:  # the period began inside an hour: its part of that hour, from the ledger
            used += billed_between(self._engine, customer_id, *window.head)
        return used

    def _before(self, customer_id: str, start: datetime) -> int:
        """µcr from `start` to the frozen boundary: frozen days and hours, the ledger for partial hours."""
        frozen = self._frozen
        key = (customer_id, start)
        if key not in frozen.before:
            used, missing = sum_window(start, start_of(frozen.until, HOUR), frozen.days.get(customer_id, {}),
                                       frozen.hours.get(customer_id, {}), frozen.until - 24)
            frozen.before[key] = used + sum(billed_between(self._engine, customer_id, *piece) for piece in missing)
        return frozen.before[key]

    def typical_hour(self, customer_id: str, created_at: datetime) -> int:
        """Mean µcr per hour over the trailing whole days (the breaker's kind of baseline)."""
        return typical_hour_ucr(self._frozen.days.get(customer_id, {}), self._frozen.day, created_at)
