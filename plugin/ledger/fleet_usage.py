"""Every customer's recent usage at once, for the fleet (`GET /customers`): the last 24 clock hours,
today, the period so far and the typical hour, for thousands of customers in one request.

What is older than the last hour or two does not change (the ledger is append-only), so it is read
once and kept ("frozen"); each request then reads only the hourly rollup rows since then, a few per
active customer. The frozen part is rebuilt every few hours and at each new UTC day, in the
background: requests meanwhile go on with the old one and read more hours fresh, so no request
waits the seconds a rebuild takes at scale (only the first one of the process does). It is dropped
when the rollups are rebuilt (`forget`).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
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

log = logging.getLogger("meterline.fleet")

FRESH_HOURS = 3
"""Rebuild the frozen part once the hours read fresh on every request would be more than this."""
PERIOD_DAYS = 32
"""Daily totals kept: enough for any monthly period so far, and the typical hour's trailing week."""

_generations = itertools.count(1)


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
    generation: int = field(default_factory=lambda: next(_generations))
    """Tells one frozen part from the next (callers keep figures computed from one)."""


def in_thread(job: Callable[[], None]) -> None:
    """How a rebuild runs by default: in its own daemon thread."""
    threading.Thread(target=job, name="meterline-fleet-usage", daemon=True).start()


class FleetUsage:
    """Recent usage of every customer; one per process, shared by the requests that read the fleet.

    `run` starts a rebuild (a thread by default; tests pass one that runs it on the spot)."""

    def __init__(self, engine: Engine, run: Callable[[Callable[[], None]], None] = in_thread) -> None:
        self._engine = engine
        self._run = run
        self._building = threading.Lock()
        """Held while a frozen part is built: one build at a time, and first callers wait for it."""
        self._frozen: _Frozen | None = None
        self._epoch = 0
        """Bumped by `forget`: a rebuild that began before it must not install what it read."""

    def snapshot(self, now: datetime) -> Snapshot:
        hour, day = unit_of(now, HOUR), unit_of(now, DAY)
        frozen = self._frozen
        if frozen is None:
            with self._building:  # the process's first look (or the first after `forget`): wait for it
                if self._frozen is None:
                    self._frozen = self._freeze(hour - 1, day)
            frozen = self._frozen
        elif (hour - frozen.until >= FRESH_HOURS or day != frozen.day) and self._building.acquire(blocking=False):
            self._run(self._rebuilder(hour - 1, day, self._epoch))
            frozen = self._frozen or frozen
        return Snapshot(self._engine, frozen, rollups.credits_by_hour(self._engine, frozen.until, hour + 1), now)

    def forget(self) -> None:
        """Read everything again on the next snapshot (after the rollups were rebuilt or history imported)."""
        self._epoch += 1
        self._frozen = None

    def _rebuilder(self, until: int, day: int, epoch: int) -> Callable[[], None]:
        def rebuild() -> None:  # runs holding self._building, which `snapshot` took for it
            try:
                frozen = self._freeze(until, day)
                if epoch == self._epoch:
                    self._frozen = frozen
            except Exception:  # the old frozen part stays in use; the next request tries again
                log.exception("rebuilding the fleet's frozen usage failed")
            finally:
                self._building.release()
        return rebuild

    def _freeze(self, until: int, day: int) -> _Frozen:
        return _Frozen(until=until, day=day,
                       hours=rollups.credits_by_hour(self._engine, until - 24, until),
                       days=rollups.credits_by_day(self._engine, day - PERIOD_DAYS, day))


class Snapshot:
    """Every customer's usage as of one request: frozen totals plus the hours read fresh."""

    def __init__(self, engine: Engine, frozen: _Frozen, fresh: dict[str, dict[int, int]], now: datetime) -> None:
        self._engine, self._frozen, self._fresh, self.now = engine, frozen, fresh, now
        self.hour = unit_of(now, HOUR)

    def version(self, customer_id: str) -> tuple:
        """Equal for two snapshots exactly when every figure of the customer's they give is equal."""
        return self._frozen.generation, self.hour, self._fresh.get(customer_id)

    def hourly(self, customer_id: str) -> list[int]:
        """µcr in each of the 24 clock hours up to now, oldest first (the last one is the current hour)."""
        first, until = self.hour - 23, self._frozen.until
        values = [0] * 24
        for hour, credits in self._frozen.hours.get(customer_id, {}).items():
            if first <= hour < until:
                values[hour - first] = credits
        for hour, credits in self._fresh.get(customer_id, {}).items():
            if until <= hour <= self.hour and hour >= first:
                values[hour - first] = credits
        return values

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
