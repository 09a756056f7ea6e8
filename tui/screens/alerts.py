"""Alerts (key 2): newest first, from `GET /alerts`. `/` filters by kind or customer; `a`
acknowledges the alert under the cursor (`POST /alerts/{id}/ack`); `F` follows new alerts to the
top, otherwise the cursor stays where it is and the status line counts the new ones ("+N new")."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.widgets import Footer, Header, Input, Static

from tui import keys
from tui.client import Alert, ConsoleError
from tui.screens.live import FilteredScreen
from tui.widgets.record_table import Column, RecordTable
from tui.widgets.status_line import StatusLine

COLUMNS: tuple[Column[Alert], ...] = (
    Column("when", "When UTC", 11, lambda alert: f"{alert.created_at:%m-%d %H:%M}", lambda alert: alert.id, False),
    Column("customer", "Customer", 14, lambda alert: alert.customer_id or "—", lambda alert: alert.customer_id or "",
           False),
    Column("kind", "Kind", 20, lambda alert: alert.kind, lambda alert: alert.kind, False),
    Column("ack", "Ack", 3, lambda alert: "✓" if alert.acknowledged else "", lambda alert: alert.acknowledged, False),
    Column("message", "Message", 100, lambda alert: alert.message, lambda alert: alert.message, False),
)


def note(alert: Alert | None) -> str:
    """The alert under the cursor in full, under the table (the message column is cut at 80 columns)."""
    if alert is None:
        return ""
    seen = "acknowledged" if alert.acknowledged else "open"
    return (f"#{alert.id} {alert.kind} · {alert.customer_id or 'no customer'} · "
            f"{alert.created_at:%Y-%m-%d %H:%M:%S} UTC · {seen}\n{alert.message}")


def matching(alerts: list[Alert], text: str) -> list[Alert]:
    wanted = text.strip().casefold()
    return [alert for alert in alerts
            if not wanted or wanted in alert.kind.casefold() or wanted in (alert.customer_id or "").casefold()]


class AlertsScreen(FilteredScreen):
    AUTO_FOCUS = "#alerts"
    HELP_KEYS = keys.ALERT_KEYS
    BINDINGS = keys.bindings(keys.ALERT_KEYS)

    def __init__(self) -> None:
        super().__init__()
        self.alerts: list[Alert] = []
        self.following = False
        self.seen_up_to = 0
        """The newest alert id the operator has had in view (follow mode, or the first load)."""

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine()
        yield Input(placeholder="filter: kind or customer (enter: to the table, escape: clear)", id="filter")
        yield RecordTable(COLUMNS, key_of=lambda alert: str(alert.id), fault=lambda alert: not alert.acknowledged,
                          sort="when", descending=True, id="alerts")
        yield Static(classes="record-note")
        yield Footer()

    async def fetch(self) -> list[Alert]:
        return await self.app.client.alerts()

    def paint(self, alerts: list[Alert]) -> None:
        first = not self.alerts
        self.alerts = alerts
        newest = max((alert.id for alert in alerts), default=0)
        if first or self.following:
            self.seen_up_to = newest
        self._show()
        if self.following:
            self.table.cursor = 0
            self.table.action_move(0)
        self.noted()

    @on(RecordTable.Highlighted, "#alerts")
    def noted(self) -> None:
        self.query_one(".record-note", Static).update(note(self.table.cursor_record))

    def _show(self) -> None:
        shown = matching(self.alerts, self.filter_input.value)
        self.table.show(shown)
        new = sum(alert.id > self.seen_up_to for alert in self.alerts)
        open_count = sum(not alert.acknowledged for alert in self.alerts)
        follow = "following" if self.following else (f"+{new} new (F: follow)" if new else "F: follow")
        self.status.summary = f"{len(shown):,} of {len(self.alerts):,} alerts · {open_count:,} open · {follow}"
        self.status.redraw()

    def action_follow(self) -> None:
        self.following = not self.following
        if self.following:
            self.seen_up_to = max((alert.id for alert in self.alerts), default=0)
            self.table.cursor = 0
            self.table.action_move(0)
        self._show()

    @work(group="action", exit_on_error=False)
    async def action_acknowledge(self) -> None:
        alert = self.table.cursor_record
        if alert is None:
            self.app.notify("No alert under the cursor.", severity="warning")
            return
        try:
            await self.app.client.acknowledge(alert.id)
        except ConsoleError as error:
            self.app.notify(str(error), title="Refused", severity="error")
            return
        self.app.notify(f"Alert {alert.id} acknowledged.")
        self.poll_now()
