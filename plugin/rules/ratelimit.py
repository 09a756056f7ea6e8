"""The sliding-window request rate limit (pure).

Two fixed windows, the current and the previous, with the previous one weighted by how much of it
still lies inside the sliding window (the algorithm upstash/ratelimit and Cloudflare use): memory
is two counters per customer, and the estimate is exact when requests are spread evenly.

All arithmetic is on integers scaled by the window length, so the Lua script and the SQL store
compute exactly what `admits` computes here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    requests: int
    """Requests allowed per sliding window."""
    window_ms: int = 60_000


@dataclass(frozen=True)
class RateDecision:
    """The rate limiter's answer for one request (upstash-style: everything a caller or header needs)."""

    allowed: bool
    limit: int
    remaining: int
    """Requests still allowed in the sliding window after this one."""
    retry_after_ms: int
    """Refused: how long until a request would be allowed (0 when allowed)."""


def window_index(now_ms: int, limit: RateLimit) -> int:
    return now_ms // limit.window_ms


def _weighted(limit: RateLimit, now_ms: int, current: int, previous: int) -> int:
    """Requests in the sliding window, times the window length."""
    elapsed = now_ms % limit.window_ms
    return previous * (limit.window_ms - elapsed) + current * limit.window_ms


def admits(limit: RateLimit, now_ms: int, current: int, previous: int) -> bool:
    """Whether one more request fits (`current` and `previous`: requests counted before it)."""
    return _weighted(limit, now_ms, current, previous) + limit.window_ms <= limit.requests * limit.window_ms


def decide(limit: RateLimit, now_ms: int, current: int, previous: int) -> RateDecision:
    """The decision for one request, given the counts before it (a counter store counts it when allowed)."""
    window = limit.window_ms
    if admits(limit, now_ms, current, previous):
        left = (limit.requests * window - _weighted(limit, now_ms, current, previous)) // window - 1
        return RateDecision(True, limit.requests, max(0, left), 0)
    return RateDecision(False, limit.requests, 0, _wait_ms(limit, now_ms, current, previous))


def _wait_ms(limit: RateLimit, now_ms: int, current: int, previous: int) -> int:
    """The earliest wait after which a request fits, assuming no other request comes meanwhile."""
    window, allowed = limit.window_ms, limit.requests
    elapsed = now_ms % window
    room = (allowed - 1 - current) * window  # what the previous window's weighted share must drop to
    if room >= 0 and previous > 0:
        # previous * (window - elapsed - wait) <= room
        return max(1, window - elapsed - room // previous)
    # Only the next window can help: there the current window becomes the previous one.
    if current == 0:
        return window - elapsed
    into_next = max(0, window - ((allowed - 1) * window) // current)
    return window - elapsed + into_next
