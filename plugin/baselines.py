"""Customers' typical spend, from the trailing days of the ledger: the breaker's baseline and the
base of soft limits for customers with no quota and no limit.

One SUM over the ledger per customer, remembered for `ttl` seconds: a baseline moves slowly, and
only requests near a breaker's threshold (or crossing a soft threshold) ever ask for it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction

from sqlalchemy import Engine

from plugin.ledger.accounts import Profile
from plugin.ledger.rollups import billed_between
from plugin.rules.breaker import BreakerConfig, typical_hourly_ucr
from plugin.rules.plans import Period
from plugin.rules.pricing import round_half_up


@dataclass(frozen=True)
class Trailing:
    spend_ucr: int
    hours: Fraction
    """How much of the trailing days the customer existed for (at least one hour)."""


class Baselines:
    def __init__(self, engine: Engine, config: BreakerConfig, ttl: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine, self._config, self._ttl, self._clock = engine, config, ttl, clock
        self._known: dict[str, tuple[Trailing, float]] = {}
        self._lock = threading.Lock()

    def trailing(self, customer: Profile, now: datetime) -> Trailing:
        """Spend over the trailing `baseline_days`, up to the start of the current hour (the hour being
        judged is not its own baseline)."""
        with self._lock:
            entry = self._known.get(customer.customer_id)
        if entry is not None and self._clock() < entry[1]:
            return entry[0]
        end = now.replace(minute=0, second=0, microsecond=0)
        start = max(end - timedelta(days=self._config.baseline_days), customer.created_at)
        hours = max(Fraction(1), Fraction(int((end - start).total_seconds()), 3600))
        found = Trailing(billed_between(self._engine, customer.customer_id, start, end), hours)
        with self._lock:
            self._known[customer.customer_id] = (found, self._clock() + self._ttl)
        return found

    async def typical_hourly(self, customer: Profile, now: datetime) -> int:
        """The breaker's baseline: mean hourly spend, never below the configured floor."""
        trailing = await asyncio.to_thread(self.trailing, customer, now)
        return typical_hourly_ucr(trailing.spend_ucr, trailing.hours, self._config)

    async def typical_period(self, customer: Profile, period: Period, now: datetime) -> int:
        """What the customer typically spends in a period this long (no floor: 0 for a new customer)."""
        trailing = await asyncio.to_thread(self.trailing, customer, now)
        return round_half_up(Fraction(trailing.spend_ucr) / trailing.hours * Fraction(period.seconds, 3600))
