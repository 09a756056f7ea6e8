"""Customers (key 1, the default): the fleet from `GET /customers`, one line per customer, kept fresh.

The records are made in a thread (parse, markers) and the table draws only what is on screen, so a
refresh of 10,000 customers costs the UI thread a sort and a redraw (bench/tui_refresh.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

from textual import on
from textual.app import ComposeResult
from textual.widgets import Footer, Header, Input

from tui import format as fmt
from tui import keys
from tui.fleet_view import FleetLine, mark_moves, matching
from tui.heap import collector_paused
from tui.screens.live import FilteredScreen
from tui.widgets.record_table import Column, RecordTable, ordered
from tui.widgets.status_line import StatusLine


def _field(name: str) -> Callable[[FleetLine], object]:
    return attrgetter(name)


def _credits(name: str) -> Callable[[FleetLine], str]:
    return lambda line: fmt.credits(getattr(line, name))


def _moved(name: str) -> Callable[[FleetLine], int]:
    """↑ or ↓ when the figure moved since the last refresh."""
    return lambda line: line.moved.get(name, 0)


COLUMNS: tuple[Column[FleetLine], ...] = (
    # Widths: the columns up to "Al" fit an 80-column terminal; the sparkline and the plan scroll in.
    Column("customer", "Customer", 13, _field("customer_id"), _field("customer_id"), False),
    Column("hour", "Hour", 8, _credits("hour_ucr"), _field("hour_ucr"), mark=_moved("hour_ucr")),
    Column("today", "Today", 8, _credits("today_ucr"), _field("today_ucr"), mark=_moved("today_ucr")),
    Column("period", "Period", 8, _credits("used_ucr"), _field("used_ucr"), mark=_moved("used_ucr")),
    Column("included", "Incl", 5, lambda line: fmt.percent(line.included_pct), _field("included_pct")),
    Column("projected", "Projected", 9, _credits("projected_ucr"), _field("projected_ucr")),
    Column("burn", "Burn", 5, lambda line: fmt.ratio(line.burn_ratio), _field("burn_ratio")),
    Column("breaker", "Breaker", 9, lambda line: fmt.breaker(line.breaker), _field("breaker"), False),
    Column("flags", "Flg", 3, lambda line: line.flags, lambda line: line.flags, False),
    Column("alerts", "Al", 2, lambda line: str(line.alerts_open or ""), _field("alerts_open")),
    Column("last24h", "Last 24 h", 24, lambda line: fmt.sparkline(line.hourly_ucr),
           lambda line: sum(line.hourly_ucr), False),
    Column("plan", "Plan", 12, _field("plan"), _field("plan"), False),
)


@dataclass(frozen=True)
class View:
    """What the table shows of the fleet: filter, faults only, sort."""

    text: str
    faults_only: bool
    sort_column: str | None
    descending: bool


@dataclass(frozen=True)
class Refresh:
    """A refresh made in the poll worker, so the UI thread only hands it to the table."""

    lines: list[FleetLine]
    shown: list[FleetLine]
    """`lines` as `view` shows them."""
    positions: dict[str, int]
    """Customer id -> its line in `shown` (the cursor finds its customer without a search)."""
    faults: int
    view: View


def _refresh(before: list[FleetLine], lines: list[FleetLine], view: View, retired: list) -> Refresh:
    """In the poll worker's thread: the new lines' markers, filtered and sorted. `retired` holds what the
    refresh before last replaced; it is let go here, so freeing 10,000 lines costs this thread, not the UI's."""
    retired.clear()
    with collector_paused():
        mark_moves(before, lines)
    shown = ordered(matching(lines, view.text, faults_only=view.faults_only), COLUMNS, view.sort_column,
                    view.descending)
    return Refresh(lines, shown, {line.customer_id: index for index, line in enumerate(shown)},
                   sum(line.faulty for line in lines), view)


class CustomersScreen(FilteredScreen):
    AUTO_FOCUS = "#fleet"
    HELP_KEYS = keys.CUSTOMER_KEYS
    BINDINGS = keys.bindings(keys.CUSTOMER_KEYS)

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[FleetLine] = []
        self._retired: list[object] = []
        self.faults = 0
        self.faults_only = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine()
        yield Input(placeholder="filter: customer id or plan (enter: to the table, escape: clear)", id="filter")
        yield RecordTable(COLUMNS, key_of=lambda line: line.customer_id, fault=lambda line: line.faulty,
                          sort="hour", descending=True, id="fleet")
        yield Footer()

    async def fetch(self) -> Refresh:
        """The fleet, with its markers, filtered and sorted as the table is now: all off the UI thread."""
        fleet = await self.app.client.fleet(FleetLine)
        retired, self._retired = self._retired, []
        return await asyncio.to_thread(_refresh, self.lines, fleet.customers, self._view(), retired)

    def paint(self, refresh: Refresh) -> None:
        self._retired += [self.lines, refresh]  # freed by the next poll worker, not on the UI thread
        self.lines = self.app.fleet_lines = refresh.lines
        self.faults = refresh.faults
        if refresh.view != self._view():  # the filter or the sort changed while the fleet was on its way
            self._show()
            return
        self.table.show(refresh.shown, in_order=True, positions=refresh.positions)
        self._summarize()

    def _view(self) -> View:
        table = self.table
        return View(self.filter_input.value, self.faults_only, table.sort_column, table.descending)

    def _show(self) -> None:
        """Filter again on the UI thread: the operator changed the filter or "faults only"."""
        self.table.show(matching(self.lines, self.filter_input.value, faults_only=self.faults_only))
        self._summarize()

    def _summarize(self) -> None:
        scope = " · faults only" if self.faults_only else ""
        self.status.summary = (f"{len(self.table.records):,} of {len(self.lines):,} customers · "
                               f"{self.faults:,} with faults{scope}")
        self.status.redraw()

    # ------------------------------------------------------------------ keys

    def action_faults(self) -> None:
        self.faults_only = not self.faults_only
        self._show()

    def action_sort(self) -> None:
        names = [column.key for column in COLUMNS]
        current = names.index(self.table.sort_column) if self.table.sort_column in names else -1
        self.table.sort_by(names[(current + 1) % len(names)])

    def action_open(self) -> None:
        self.table.action_select()

    @on(RecordTable.Selected, "#fleet")
    def open_customer(self, event: RecordTable.Selected) -> None:
        from tui.screens.customer import CustomerScreen

        self.app.push_screen(CustomerScreen(event.record.customer_id))

    def _chosen(self) -> str | None:
        line = self.table.cursor_record
        if line is None:
            self.app.notify("No customer under the cursor.", severity="warning")
        return None if line is None else line.customer_id

    def action_trip(self) -> None:
        if (customer_id := self._chosen()) is not None:
            self.app.trip(customer_id)

    def action_reset(self) -> None:
        if (customer_id := self._chosen()) is not None:
            self.app.reset(customer_id)

    def action_limits(self) -> None:
        if (customer_id := self._chosen()) is not None:
            self.app.edit_limits(customer_id)
