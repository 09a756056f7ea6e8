"""Reconciliation (key 4): the last whole-fleet run from `GET /reconciliation`, the ledger against
Stripe's meter event summaries per customer (DESIGN "Contract: reconciliation"). Diverged customers
come first, in the fault colour; the note under the table lists the cursor customer's differing
hours. `r` runs a reconciliation now (`POST /reconciliation`); `/` filters by customer id."""

from __future__ import annotations

from collections.abc import Callable

from textual import on, work
from textual.app import ComposeResult
from textual.widgets import Footer, Header, Input, Static

from tui import format as fmt
from tui import keys
from tui.client import ConsoleError, DifferingHour, ReconciledCustomer, Reconciliation
from tui.screens.live import FilteredScreen
from tui.widgets.record_table import Column, RecordTable
from tui.widgets.status_line import StatusLine

_URGENCY = {"diverged": 0, "not_linked": 1, "ok": 2}
STATUS = {"diverged": "DIVERGED", "not_linked": "not linked", "ok": "ok"}
NOTE_LINES = 2
"""The note's height (app.tcss `.record-note`)."""


def _stripe_side(cell: Callable[[ReconciledCustomer], str]) -> Callable[[ReconciledCustomer], str]:
    """A cell of Stripe's side: a dash for a customer that has no Stripe id (nothing was compared)."""
    return lambda customer: fmt.NOTHING if customer.status == "not_linked" else cell(customer)


def signed(ucr: int) -> str:
    """A divergence in credits: + when Stripe has less than the ledger, - when it has more."""
    return ("+" if ucr > 0 else "") + fmt.credits(ucr)


def urgency(customer: ReconciledCustomer) -> tuple[int, int, str]:
    """Diverged first (the largest first), then not linked, then the rest, by id."""
    return _URGENCY.get(customer.status, len(_URGENCY)), -abs(customer.divergence_ucr), customer.customer_id


COLUMNS: tuple[Column[ReconciledCustomer], ...] = (
    Column("customer", "Customer", 16, lambda c: c.customer_id, lambda c: c.customer_id, False),
    Column("status", "Status", 10, lambda c: STATUS.get(c.status, c.status), urgency, False),
    Column("ledger", "Ledger", 9, lambda c: fmt.credits(c.ledger_ucr), lambda c: c.ledger_ucr),
    Column("in_flight", "In flight", 9, lambda c: fmt.credits(c.in_flight_ucr), lambda c: c.in_flight_ucr),
    Column("stripe", "Stripe", 9, _stripe_side(lambda c: fmt.credits(c.stripe_ucr)), lambda c: c.stripe_ucr),
    Column("divergence", "Divergence", 10, _stripe_side(lambda c: signed(c.divergence_ucr)),
           lambda c: c.divergence_ucr),
    Column("divergence_pct", "Div %", 7, _stripe_side(lambda c: fmt.percent(c.divergence_pct)),
           lambda c: c.divergence_pct),
)


def hour_text(hour: DifferingHour) -> str:
    return f"{hour.start:%Y-%m-%d %H:%M} ledger {fmt.credits(hour.ledger_ucr)} · Stripe {fmt.credits(hour.stripe_ucr)}"


def _flow(parts: list[str], width: int, lines: int) -> list[str] | None:
    """`parts` joined by "; " into at most `lines` lines of `width`, none split; None when they do not fit."""
    flowed: list[str] = []
    for part in parts:
        if flowed and len(flowed[-1]) + 2 + len(part) <= width:
            flowed[-1] += "; " + part
        else:
            flowed.append(part)
            if len(flowed) > lines:
                return None
    return flowed


def fitted(parts: list[str], width: int, lines: int = NOTE_LINES) -> str:
    """As many `parts` as fit in `lines` lines of `width`, then "+N more" for the rest."""
    whole = _flow(parts, width, lines)
    if whole is not None:
        return "\n".join(whole)
    low, high = 0, len(parts) - 1  # the most parts that fit with "+N more" after them
    while low < high:
        middle = (low + high + 1) // 2
        if _flow(parts[:middle] + [f"+{len(parts) - middle} more"], width, lines) is None:
            high = middle - 1
        else:
            low = middle
    return "\n".join(_flow(parts[:low] + [f"+{len(parts) - low} more"], width, lines) or [])


def note(customer: ReconciledCustomer | None, width: int) -> str:
    """The customer under the cursor: its differing hours (as many as fit), or why there are none."""
    if customer is None:
        return ""
    who = customer.customer_id
    if customer.status == "not_linked":
        return (f"{who} has no Stripe customer: nothing to compare.\n"
                f"{fmt.credits(customer.in_flight_ucr)} credits wait in the queue (held) until it is linked.")
    if customer.status != "diverged":
        return (f"{who} ({customer.stripe_customer_id}) is ok: ledger {fmt.credits(customer.ledger_ucr)} = "
                f"Stripe {fmt.credits(customer.stripe_ucr)} + in flight {fmt.credits(customer.in_flight_ucr)}"
                + (f", off by {signed(customer.divergence_ucr)}" if customer.divergence_ucr else ""))
    if not customer.hours:
        return (f"{who} diverged by {signed(customer.divergence_ucr)} credits "
                f"({fmt.percent(customer.divergence_pct)}); no single hour differs.")
    return fitted([hour_text(hour) for hour in customer.hours], width)


def matching(customers: list[ReconciledCustomer], text: str) -> list[ReconciledCustomer]:
    wanted = text.strip().casefold()
    return [customer for customer in customers if wanted in customer.customer_id.casefold()]


class ReconciliationScreen(FilteredScreen):
    AUTO_FOCUS = "#reconciliation"
    HELP_KEYS = keys.RECONCILIATION_KEYS
    BINDINGS = keys.bindings(keys.RECONCILIATION_KEYS)

    def __init__(self) -> None:
        super().__init__()
        self.last_run: Reconciliation | None = None
        self.loaded = False
        self.running = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine()
        yield Input(placeholder="filter: customer id (enter: to the table, escape: clear)", id="filter")
        yield RecordTable(COLUMNS, key_of=lambda customer: customer.customer_id, sort="status",
                          fault=lambda customer: customer.status == "diverged", id="reconciliation")
        yield Static(classes="record-note")
        yield Footer()

    async def fetch(self) -> Reconciliation | None:
        return await self.app.client.reconciliation()

    def paint(self, run: Reconciliation | None) -> None:
        self.last_run, self.loaded = run, True
        self._show()

    def _show(self) -> None:
        run = self.last_run
        self.table.show([] if run is None else matching(run.customers, self.filter_input.value))
        self.noted()
        self.status.summary = self._summary()
        self.status.redraw()

    def _summary(self) -> str:
        run = self.last_run
        if self.running:
            return "reconciling with Stripe…"
        if run is None:
            if not self.loaded:
                return ""
            return "no reconciliation yet" + ("" if self.app.readonly else " (r runs one)")
        diverged = sum(customer.status == "diverged" for customer in run.customers)
        checked = f"{run.checked_at:%H:%M}" if run.checked_at.date() == run.period_end.date() else \
            f"{run.checked_at:%m-%d %H:%M}"
        shown = "" if len(self.table.records) == len(run.customers) else f" · {len(self.table.records):,} shown"
        return (f"checked {checked} UTC · period {run.period_start:%m-%d}→{run.period_end:%m-%d %H:%M} · "
                f"{diverged:,} of {len(run.customers):,} diverged{shown}")

    @on(RecordTable.Highlighted, "#reconciliation")
    def noted(self) -> None:
        text = note(self.table.cursor_record, self._note.size.width or 78)
        if self.loaded and self.last_run is None:
            text = "No reconciliation has run yet" + ("." if self.app.readonly else ": r runs one now.") + \
                "\nThe proxy also runs one every METERLINE_RECONCILE_SECONDS."
        self._note.update(text)

    @property
    def _note(self) -> Static:
        return self.query_one(".record-note", Static)

    def on_resize(self) -> None:
        self.noted()

    @work(group="action", exit_on_error=False)
    async def action_run_reconciliation(self) -> None:
        if self.running:
            self.app.notify("A reconciliation is running already.", severity="warning")
            return
        self.running = True
        self.status.summary = self._summary()
        self.status.redraw()
        try:
            run = await self.app.client.run_reconciliation()
        except ConsoleError as error:
            self.app.notify(str(error), title="Refused", severity="error")
            return
        finally:
            self.running = False
            self.status.summary = self._summary()
            self.status.redraw()
        diverged = sum(customer.status == "diverged" for customer in run.customers)
        self.app.notify(f"Reconciled: {len(run.customers):,} customer(s), {diverged:,} diverged")
        self.paint(run)
