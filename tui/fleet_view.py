"""The customers table's records, made off the UI thread: each fleet row with what changed since
the previous refresh (the ↑/↓ markers), its faults, and the filters. Plain functions of plain values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tui.client import FleetRow

WATCHED = ("hour_ucr", "today_ucr", "used_ucr", "projected_ucr")
"""The figures that get a ↑/↓ marker when they moved since the last refresh."""
_UNMOVED: Mapping[str, int] = MappingProxyType({})
"""Shared by every line where nothing moved (most): no object per line."""


@dataclass(frozen=True, slots=True)
class FleetLine:
    """A customer's line, with everything the table asks of it worked out once, in the poll worker."""

    row: FleetRow
    moved: Mapping[str, int]
    """Watched field -> +1 (went up) or -1 (went down) since the previous refresh; absent: unchanged."""
    customer_id: str
    over_quota: bool
    limit_hit: bool
    faulty: bool
    """What "faults only" shows: a breaker not closed, past the included quota, or at its limit."""
    flags: str
    """L: at its hard limit or cap · Q: past its included quota · B: overage blocked."""
    search: str
    """Its id and plan, case-folded, for the filter."""

    @classmethod
    def of(cls, row: FleetRow, moved: Mapping[str, int]) -> FleetLine:
        over_quota = 0 < row["included_ucr"] < row["used_ucr"]
        limit_hit = row["cap_ucr"] is not None and row["used_ucr"] >= row["cap_ucr"]
        flags = "".join(flag for flag, on in (("L", limit_hit), ("Q", over_quota), ("B", row["block_overage"])) if on)
        return cls(row, moved, row["customer_id"], over_quota, limit_hit,
                   row["breaker"] != "closed" or over_quota or limit_hit, flags,
                   f"{row['customer_id']}\n{row['plan']}".casefold())


def fleet_lines(previous: Mapping[str, FleetRow], rows: Iterable[FleetRow]) -> list[FleetLine]:
    """Each row with its markers against the same customer's previous row."""
    lines = []
    for row in rows:
        before = previous.get(row["customer_id"])
        moved = _UNMOVED if before is None else {
            name: 1 if row[name] > before[name] else -1 for name in WATCHED if row[name] != before[name]} or _UNMOVED
        lines.append(FleetLine.of(row, moved))
    return lines


def matching(lines: Iterable[FleetLine], text: str, *, faults_only: bool) -> list[FleetLine]:
    """The lines whose customer id or plan holds `text` (any case), and only faulty ones if asked."""
    wanted = text.strip().casefold()
    return [line for line in lines if (not faults_only or line.faulty) and (not wanted or wanted in line.search)]
