"""Tripping a breaker by hand, first step: the reason for the audit log (the API's `reason`). The
app then asks for confirmation (tui/screens/confirm.py, Cancel focused first)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label


class TripDialog(ModalScreen[str | None]):
    """Answers the reason, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, customer_id: str) -> None:
        super().__init__()
        self.customer_id = customer_id

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Why trip {self.customer_id}'s circuit breaker? (kept in the audit log)", classes="question")
            yield Input(placeholder="e.g. runaway agent, ticket 4411", max_length=500, id="reason")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Next", id="next", variant="warning")

    def on_mount(self) -> None:
        self.query_one("#reason", Input).focus()

    @on(Button.Pressed, "#next")
    @on(Input.Submitted, "#reason")
    def next(self) -> None:
        self.dismiss(self.query_one("#reason", Input).value.strip() or "tripped from the console")

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
