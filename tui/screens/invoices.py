"""Invoices (key 5): what `GET /invoices` lists, each held against the ledger's figure for its period
(DESIGN "Contract: Stripe webhooks and invoices"). Drafts the spike guard held come first, flagged;
then the rest, newest first. `a` releases a held draft (`POST /invoices/{id}/approve`); `c` puts a
credit on a draft (`POST /invoices/{id}/credit`: a negative invoice item on that invoice only),
asked in a small form, then confirmed. What Stripe or the API refuses comes back as a notification."""

from __future__ import annotations

from datetime import datetime

from textual import on, work
from textual.app import ComposeResult
from textual.widgets import Footer, Header, Input, Static

from tui import format as fmt
from tui import keys
from tui.client import ConsoleError, InvoiceRow
from tui.screens.confirm import ConfirmDialog
from tui.screens.credit import CreditForm
from tui.screens.live import FilteredScreen
from tui.widgets.record_table import Column, RecordTable
from tui.widgets.status_line import StatusLine

FINALIZED = ("open", "paid")


def usd(cents: int | None, *, signed: bool = False) -> str:
    """"$1,234.56" ("+$3.00" / "-$3.00" with `signed`); whole dollars from $100,000 so it fits its column."""
    if cents is None:
        return fmt.NOTHING
    sign = "-" if cents < 0 else "+" if signed and cents > 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}${whole:,}" if whole >= 100_000 else f"{sign}${whole:,}.{part:02d}"


def customer(invoice: InvoiceRow) -> str:
    """meterline's customer id, else Stripe's (a customer meterline does not know)."""
    return invoice.customer_id or invoice.stripe_customer_id


def difference(invoice: InvoiceRow) -> int | None:
    """What Stripe bills above (+) or below (-) what the ledger says; None when the ledger cannot say."""
    return None if invoice.ledger_cents is None else invoice.total_cents - invoice.ledger_cents


def faulty(invoice: InvoiceRow) -> bool:
    """A held draft waits for the operator; a finalized invoice should total what the ledger says."""
    return invoice.held or (invoice.status in FINALIZED and difference(invoice) not in (None, 0))


def newest(invoice: InvoiceRow) -> tuple[bool, datetime]:
    """Held drafts first, then the newest (finalized, else the period's end) first: sorted descending."""
    return invoice.held, invoice.finalized_at or invoice.period_end


COLUMNS: tuple[Column[InvoiceRow], ...] = (
    Column("id", "Invoice", 12, lambda invoice: invoice.id, lambda invoice: invoice.id, False),
    Column("customer", "Customer", 12, customer, customer, False),
    Column("period", "Period", 11, lambda invoice: f"{invoice.period_start:%m-%d}→{invoice.period_end:%m-%d}",
           newest, False),
    Column("status", "Status", 6, lambda invoice: invoice.status, lambda invoice: invoice.status, False),
    Column("total", "Total", 9, lambda invoice: usd(invoice.total_cents), lambda invoice: invoice.total_cents),
    Column("ledger", "Ledger", 9, lambda invoice: usd(invoice.ledger_cents), lambda invoice: invoice.ledger_cents),
    Column("difference", "Diff", 9, lambda invoice: usd(difference(invoice), signed=True), difference),
    Column("held", "Held", 4, lambda invoice: "held" if invoice.held else "", lambda invoice: invoice.held, False),
)


def note(invoice: InvoiceRow | None) -> str:
    """The invoice under the cursor in full (three lines: app.tcss `#invoice-note`)."""
    if invoice is None:
        return ""
    who = invoice.customer_id or "a Stripe customer meterline does not know"
    state = invoice.status + (", HELD by the spike guard" if invoice.held else "")
    finalized = "" if invoice.finalized_at is None else f" · finalized {invoice.finalized_at:%Y-%m-%d %H:%M} UTC"
    gap = difference(invoice)
    against = "the ledger cannot price it" if gap is None else \
        f"ledger {usd(invoice.ledger_cents)} · difference {usd(gap, signed=True)}"
    return (f"{invoice.id} · {who} ({invoice.stripe_customer_id})\n"
            f"{state} · period {invoice.period_start:%Y-%m-%d} → {invoice.period_end:%Y-%m-%d}{finalized}\n"
            f"total {usd(invoice.total_cents)} {invoice.currency.upper()} · {against}")


def matching(invoices: list[InvoiceRow], text: str) -> list[InvoiceRow]:
    wanted = text.strip().casefold()
    return [invoice for invoice in invoices
            if wanted in invoice.id.casefold() or wanted in customer(invoice).casefold()]


class InvoicesScreen(FilteredScreen):
    AUTO_FOCUS = "#invoices"
    HELP_KEYS = keys.INVOICE_KEYS
    BINDINGS = keys.bindings(keys.INVOICE_KEYS)

    def __init__(self) -> None:
        super().__init__()
        self.invoices: list[InvoiceRow] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine()
        yield Input(placeholder="filter: invoice or customer id (enter: to the table, escape: clear)", id="filter")
        yield RecordTable(COLUMNS, key_of=lambda invoice: invoice.id, fault=faulty, sort="period", descending=True,
                          id="invoices")
        yield Static(classes="record-note", id="invoice-note")
        yield Footer()

    async def fetch(self) -> list[InvoiceRow]:
        return await self.app.client.invoices()

    def paint(self, invoices: list[InvoiceRow]) -> None:
        self.invoices = invoices
        self._show()

    def _show(self) -> None:
        shown = matching(self.invoices, self.filter_input.value)
        self.table.show(shown)
        self.noted()
        held = sum(invoice.held for invoice in self.invoices)
        differing = sum(invoice.status in FINALIZED and difference(invoice) not in (None, 0)
                        for invoice in self.invoices)
        count = f"{len(shown):,} of {len(self.invoices):,}" if len(shown) != len(self.invoices) else \
            f"{len(self.invoices):,}"
        self.status.summary = f"{count} invoices · {held:,} held · {differing:,} differ from the ledger"
        self.status.redraw()

    @on(RecordTable.Highlighted, "#invoices")
    def noted(self) -> None:
        self.query_one(".record-note", Static).update(note(self.table.cursor_record))

    @work(group="action", exit_on_error=False)
    async def action_approve_invoice(self) -> None:
        invoice = self.table.cursor_record
        if invoice is None or not invoice.held or invoice.status != "draft":
            self.app.notify("Only a draft the spike guard held can be approved.", severity="warning")
            return
        if not await self.app.push_screen_wait(ConfirmDialog(
                f"Release {invoice.id} ({customer(invoice)}, "
                f"{usd(invoice.total_cents)})? It finalizes on Stripe's schedule.", confirm="Release")):
            return
        try:
            await self.app.client.approve_invoice(invoice.id)
        except ConsoleError as error:
            self.app.notify(str(error), title="Refused", severity="error")
            return
        self.app.notify(f"Invoice {invoice.id} released: it finalizes on Stripe's schedule.")
        self.poll_now()

    @work(group="action", exit_on_error=False)
    async def action_credit_invoice(self) -> None:
        invoice = self.table.cursor_record
        if invoice is None:
            self.app.notify("No invoice under the cursor.", severity="warning")
            return
        answer = await self.app.push_screen_wait(CreditForm(
            invoice.id, f"{customer(invoice)}, {invoice.status}, total {usd(invoice.total_cents)}"))
        if answer is None:
            return
        amount, why = answer
        if not await self.app.push_screen_wait(ConfirmDialog(
                f"Credit ${amount} on {invoice.id} ({customer(invoice)})? "
                f"A negative invoice item on this draft only.\nReason: {why}", confirm="Credit")):
            return
        try:
            await self.app.client.credit_invoice(invoice.id, amount, why)
        except ConsoleError as error:
            self.app.notify(str(error), title="Refused", severity="error")
            return
        self.app.notify(f"Credit of ${amount} added to {invoice.id}.")
        self.poll_now()
