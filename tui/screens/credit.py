"""Crediting a draft invoice (key `c` on the Invoices screen): dollars and a reason, checked here as
the API would take them (a positive amount in whole cents); the screen then asks for confirmation."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

MAX_CREDIT_DIGITS = 9
"""Whole dollars the API takes at most (`^\\d{1,9}(\\.\\d{1,2})?$`)."""


def credit_usd(text: str) -> str:
    """Dollars as the API takes them ("12.50"); ValueError saying what is wrong otherwise."""
    try:
        value = Decimal(text.strip().lstrip("$").replace(",", ""))
    except InvalidOperation:
        raise ValueError("Dollars: a number, e.g. 12.50.") from None
    if not value.is_finite():
        raise ValueError("Dollars: a number, e.g. 12.50.")
    if value <= 0:
        raise ValueError("Dollars: more than 0.")
    if value >= 10 ** MAX_CREDIT_DIGITS:
        raise ValueError("Dollars: less than $1,000,000,000.")
    if value != value.quantize(Decimal("0.01")):
        raise ValueError("Dollars: at most two decimals (whole cents).")
    return f"{value.quantize(Decimal('0.01'))}"


class CreditForm(ModalScreen[tuple[str, str] | None]):
    """Asks the credit: dollars and a reason (the invoice item's description). Answers ("12.50",
    reason), or None when cancelled. The app then asks for confirmation."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, invoice_id: str, about: str) -> None:
        super().__init__()
        self.invoice_id = invoice_id
        self.about = about
        """The invoice in a few words (customer, status, total), for the question."""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Credit on {self.invoice_id} ({self.about})", classes="question")
            yield Label("Dollars off this invoice, and why (kept on the invoice item)")
            with Horizontal(classes="pair"):
                yield Input(placeholder="dollars, e.g. 12.50", id="usd")
                yield Input(placeholder="reason, e.g. ticket 4411", max_length=500, id="why")
            yield Label("", id="problem", classes="problem")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Next", id="next", variant="warning")

    def on_mount(self) -> None:
        self.query_one("#usd", Input).focus()

    @on(Input.Submitted, "#usd")
    def to_reason(self) -> None:
        """`enter` in the dollars field moves on to the reason while it is empty."""
        if self.query_one("#why", Input).value.strip():
            self.next()
            return
        try:
            credit_usd(self.query_one("#usd", Input).value)
        except ValueError as problem:
            self.query_one("#problem", Label).update(str(problem))
            return
        self.query_one("#problem", Label).update("")
        self.query_one("#why", Input).focus()

    @on(Button.Pressed, "#next")
    @on(Input.Submitted, "#why")
    def next(self) -> None:
        try:
            amount = credit_usd(self.query_one("#usd", Input).value)
        except ValueError as problem:
            self.query_one("#problem", Label).update(str(problem))
            self.query_one("#usd", Input).focus()
            return
        why = self.query_one("#why", Input).value.strip()
        if not why:
            self.query_one("#problem", Label).update("Reason: required (it is kept on the invoice item).")
            self.query_one("#why", Input).focus()
            return
        self.dismiss((amount, why))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
