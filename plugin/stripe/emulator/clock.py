"""Time in the emulator: an injected clock (so windows are testable without sleeping) and Stripe's time shapes."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Generic, TypeVar

Clock = Callable[[], float]
"""Epoch seconds, like `time.time`."""
DAY = 86_400

V = TypeVar("V")


class AdjustableClock:
    """Wall time plus an offset the control API can move forward, to test time windows from outside."""

    def __init__(self, base: Clock = time.time):
        self._base = base
        self.offset = 0.0

    def __call__(self) -> float:
        return self._base() + self.offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.offset += seconds


class Expiring(Generic[V]):
    """A dict whose entries lapse `seconds` after they were put: Stripe's rolling 24 h windows.

    Entries are queued by age, so dropping the lapsed ones costs only what is dropped.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._entries: dict[str, tuple[float, V]] = {}
        self._by_age: deque[tuple[float, str]] = deque()

    def expire(self, now: float) -> None:
        """Drop every entry put at or before ``now - seconds``."""
        while self._by_age and self._by_age[0][0] <= now - self.seconds:
            put_at, key = self._by_age.popleft()
            entry = self._entries.get(key)
            if entry is not None and entry[0] == put_at:  # else the key was put again since, or removed
                del self._entries[key]

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def put(self, key: str, value: V, now: float) -> None:
        self._entries[key] = (now, value)
        self._by_age.append((now, key))

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)


def rfc3339(timestamp: float) -> str:
    """v2 APIs write times as RFC 3339 strings with milliseconds, in UTC."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> int | None:
    """Epoch seconds from an RFC 3339 string with a zone; None when it is not one."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return None if moment.tzinfo is None else math.floor(moment.timestamp())


def month_period(timestamp: float) -> tuple[int, int]:
    """The calendar month (UTC) containing `timestamp`, as [start, end) epoch seconds."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return int(start.timestamp()), int(end.timestamp())
