"""Customers (key 1, the default): the fleet from `GET /customers`, one line per customer, kept fresh.

The records are made in a thread (parse, markers) and the table draws only what is on screen, so a
refresh of 10,000 customers costs the UI thread a sort and a redraw (bench/tui_refresh.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.widgets import Footer, Header, Input

from tui import format as fmt
from tui import keys
from tui.client import Fleet
from tui.fleet_view import FleetLine, fleet_lines, matching
from tui.screens.live import LiveScreen
from tui.widgets.record_table import Column, RecordTable
from tui.widgets.status_line import StatusLine


def _marked(name: str, label: Callable[[int], str] = fmt.credits) -> Callable[[FleetLine], Text]:
    """A figure with ↑ (green) or ↓ (red) when it moved since the last refresh."""
    def cell(line: FleetLine) -> Text:
        moved = line.moved.get(name)
        text = Text(label(getattr(line.row, name)))
        if moved:
            text.append("↑" if moved > 0 else "↓", style="green" if moved > 0 else "red")
        else:
            text.append(" ")
        return text
    return cell


COLUMNS: tuple[Column[FleetLine], ...] = (
    Column("customer", "Customer", 14, lambda line: line.customer_id, lambda line: line.customer_id, False),
    Column("hour", "Hour", 8, _marked("hour_ucr"), lambda line: line.row.hour_ucr),
    Column("today", "Today", 8, _marked("today_ucr"), lambda line: line.row.today_ucr),
    Column("period", "Period", 9, _marked("used_ucr"), lambda line: line.row.used_ucr),
    Column("included", "Incl", 6, lambda line: fmt.percent(line.row.included_pct), lambda line: line.row.included_pct),
    Column("projected", "Projected", 9, _marked("projected_ucr"), lambda line: line.row.projected_ucr),
    Column("burn", "Burn", 5, lambda line: fmt.ratio(line.row.burn_ratio), lambda line: line.row.burn_ratio),
    Column("breaker", "Breaker", 9, lambda line: line.row.breaker, lambda line: line.row.breaker, False),
    Column("flags", "Flg", 3, lambda line: line.flags, lambda line: line.flags, False),
    Column("alerts", "Al", 2, lambda line: str(line.row.alerts_open or ""), lambda line: line.row.alerts_open),
    Column("last24h", "Last 24 h", 24, lambda line: fmt.sparkline(line.row.hourly_ucr),
           lambda line: sum(line.row.hourly_ucr), False),
    Column("plan", "Plan", 12, lambda line: line.row.plan, lambda line: line.row.plan, False),
)


class CustomersScreen(LiveScreen):
    AUTO_FOCUS = "#fleet"
    HELP_KEYS = keys.CUSTOMER_KEYS
    BINDINGS = keys.bindings(keys.CUSTOMER_KEYS) + [("escape", "clear_filter", "")]

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[FleetLine] = []
        self.faults_only = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine()
        yield Input(placeholder="filter: customer id or plan (enter: to the table, escape: clear)", id="filter")
        yield RecordTable(COLUMNS, key_of=lambda line: line.customer_id, fault=lambda line: line.faulty,
                          sort="hour", descending=True, id="fleet")
        yield Footer()

    @property
    def table(self) -> RecordTable[FleetLine]:
        return self.query_one("#fleet", RecordTable)

    @property
    def filter_input(self) -> Input:
        return self.query_one("#filter", Input)

    async def fetch(self) -> list[FleetLine]:
        fleet: Fleet = await self.app.client.fleet()
        previous = {line.customer_id: line.row for line in self.lines}
        return await asyncio.to_thread(fleet_lines, previous, fleet.customers)

    def paint(self, lines: list[FleetLine]) -> None:
        self.lines = self.app.fleet_lines = lines
        self._show()

    def _show(self) -> None:
        shown = matching(self.lines, self.filter_input.value, faults_only=self.faults_only)
        self.table.show(shown)
        faults = sum(line.faulty for line in self.lines)
        scope = " · faults only" if self.faults_only else ""
        self.status.summary = f"{len(shown):,} of {len(self.lines):,} customers · {faults:,} with faults{scope}"
        self.status.redraw()

    # ------------------------------------------------------------------ keys

    def action_filter(self) -> None:
        self.filter_input.display = True
        self.filter_input.focus()

    def action_clear_filter(self) -> None:
        self.filter_input.value = ""
        self.filter_input.display = False
        self.table.focus()

    @on(Input.Changed, "#filter")
    def filtered(self) -> None:
        self._show()

    @on(Input.Submitted, "#filter")
    def to_table(self) -> None:
        self.table.focus()

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
