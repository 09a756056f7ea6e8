"""The customers table's records, made off the UI thread: each fleet row with what changed since
the previous refresh (the ↑/↓ markers), its faults, and the filters. Plain functions of plain values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tui.client import FleetRow

WATCHED = ("hour_ucr", "today_ucr", "used_ucr", "projected_ucr")
"""The figures that get a ↑/↓ marker when they moved since the last refresh."""


@dataclass(frozen=True, slots=True)
class FleetLine:
    row: FleetRow
    moved: Mapping[str, int]
    """Watched field -> +1 (went up) or -1 (went down) since the previous refresh; absent: unchanged."""

    @property
    def customer_id(self) -> str:
        return self.row.customer_id

    @property
    def over_quota(self) -> bool:
        return 0 < self.row.included_ucr < self.row.used_ucr

    @property
    def limit_hit(self) -> bool:
        return self.row.cap_ucr is not None and self.row.used_ucr >= self.row.cap_ucr

    @property
    def faulty(self) -> bool:
        """What "faults only" shows: a breaker not closed, past the included quota, or at its limit."""
        return self.row.breaker != "closed" or self.over_quota or self.limit_hit

    @property
    def flags(self) -> str:
        """L: at its hard limit or cap · Q: past its included quota · B: overage blocked."""
        return "".join(flag for flag, on in (("L", self.limit_hit), ("Q", self.over_quota),
                                             ("B", self.row.block_overage)) if on)


def fleet_lines(previous: Mapping[str, FleetRow], rows: Iterable[FleetRow]) -> list[FleetLine]:
    """Each row with its markers against the same customer's previous row."""
    lines = []
    for row in rows:
        before = previous.get(row.customer_id)
        moved = {} if before is None else {
            name: 1 if getattr(row, name) > getattr(before, name) else -1
            for name in WATCHED if getattr(row, name) != getattr(before, name)}
        lines.append(FleetLine(row, moved))
    return lines


def matching(lines: Iterable[FleetLine], text: str, *, faults_only: bool) -> list[FleetLine]:
    """The lines whose customer id or plan holds `text` (any case), and only faulty ones if asked."""
    wanted = text.strip().casefold()
    return [line for line in lines
            if (not faults_only or line.faulty)
            and (not wanted or wanted in line.row.customer_id.casefold() or wanted in line.row.plan.casefold())]
