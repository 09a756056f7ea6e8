"""How the console writes numbers: credits (not µcr), percentages, ages and 24-hour sparklines."""

from __future__ import annotations

from collections.abc import Sequence

UCR_PER_CREDIT = 1_000_000
BARS = "▁▂▃▄▅▆▇█"
NOTHING = "—"


def credits(ucr: int | None) -> str:
    """µcr as credits: two decimals under 100, one under 10,000, whole above; k/M past a million."""
    if ucr is None:
        return NOTHING
    value = ucr / UCR_PER_CREDIT
    size = abs(value)
    if size >= 10_000_000:
        return f"{value / 1_000_000:,.1f}M"
    if size >= 1_000_000:
        return f"{value / 1_000:,.0f}k"
    if size >= 10_000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:,.1f}"
    return f"{value:,.2f}"


def percent(value: float | None) -> str:
    return NOTHING if value is None else f"{value:.0f}%" if value >= 100 else f"{value:.1f}%"


def ratio(value: float | None) -> str:
    return NOTHING if value is None else f"{value:.1f}×"


def age(seconds: float) -> str:
    """`12 s`, `4 min`, `3 h`: how long ago, for a status line."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


BREAKER = {"closed": "closed", "open": "OPEN", "half_open": "half-open"}


def breaker(state: str) -> str:
    """A breaker's state as the tables show it: an open one stands out."""
    return BREAKER.get(state, state)


def sparkline(values: Sequence[int]) -> str:
    """One character per value, scaled to the largest; a space for nothing at all."""
    top = max(values, default=0)
    if top <= 0:
        return " " * len(values)
    return "".join(" " if value <= 0 else BARS[-(-value * len(BARS) // top) - 1] for value in values)
