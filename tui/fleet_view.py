"""The customers table's records: each customer's fleet row as the console's line, with what changed
since the previous refresh (the ↑/↓ markers), its faults, and the filters. Plain values, no I/O.

A refresh brings 10,000 customers every few seconds; on a slow machine every object made per
customer shows in bench/tui_refresh.py. So the client decodes the fleet straight into `FleetLine`s,
the markers are the only thing set afterwards (on the lines whose figures moved), and everything else
a line says is worked out when asked, for the few lines on screen."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from tui.client import FleetRow

WATCHED = ("hour_ucr", "today_ucr", "used_ucr")
"""The figures that get a ↑/↓ marker when they moved since the last refresh. Not the projection: it
moves with the clock for every customer, and a marker on every line says nothing."""
_UNMOVED: Mapping[str, int] = MappingProxyType({})
"""Shared by every line where nothing moved (most): no object per line."""


class FleetLine(FleetRow, kw_only=True, gc=False):
    """A customer's line: its fleet row, and what moved since the previous refresh."""

    moved: Mapping[str, int] = _UNMOVED
    """Watched field -> +1 (went up) or -1 (went down) since the previous refresh; absent: unchanged.
    The console's own (`mark_moves`), not a field of the API's row."""

    @property
    def over_quota(self) -> bool:
        return 0 < self.included_ucr < self.used_ucr

    @property
    def limit_hit(self) -> bool:
        return self.cap_ucr is not None and self.used_ucr >= self.cap_ucr

    @property
    def faulty(self) -> bool:
        """What "faults only" shows: a breaker not closed, past the included quota, or at its limit."""
        return self.breaker != "closed" or self.over_quota or self.limit_hit

    @property
    def flags(self) -> str:
        """L: at its hard limit or cap · Q: past its included quota · B: overage blocked · G: grandfathered on its
        flat plan (never billed overage, so never B either: three letters at most)."""
        return ("L" if self.limit_hit else "") + ("Q" if self.over_quota else "") + (
            "B" if self.block_overage else "G" if self.grandfathered_at is not None else "")


def mark_moves(previous: Iterable[FleetLine], lines: Iterable[FleetLine]) -> None:
    """Set each line's markers against the same customer's line of the previous refresh."""
    before = {line.customer_id: line for line in previous}.get
    for line in lines:
        old = before(line.customer_id)
        if old is not None and (line.used_ucr != old.used_ucr or line.hour_ucr != old.hour_ucr
                                or line.today_ucr != old.today_ucr):
            line.moved = {name: 1 if getattr(line, name) > getattr(old, name) else -1
                          for name in WATCHED if getattr(line, name) != getattr(old, name)}


def matching(lines: Iterable[FleetLine], text: str, *, faults_only: bool) -> list[FleetLine]:
    """The lines whose customer id or plan holds `text` (any case), and only faulty ones if asked."""
    wanted = text.strip().casefold()
    if not wanted:
        return [line for line in lines if line.faulty] if faults_only else list(lines)
    return [line for line in lines if (not faults_only or line.faulty)
            and (wanted in line.customer_id.casefold() or wanted in line.plan.casefold())]
