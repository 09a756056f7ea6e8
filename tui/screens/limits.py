"""Editing a customer's limits: soft thresholds, a hard limit in credits or in dollars, the overage
block. Checked here as the API would (a field that cannot be right never leaves the form); what the
API still refuses comes back as a notification. Only the fields that changed are sent."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label

from plugin.rules.policy import credits_text
from tui.client import Limits
from tui.format import UCR_PER_CREDIT


class LimitsForm(ModalScreen[dict[str, Any] | None]):
    """Answers the changes (LimitsBody fields; None clears one), or None when cancelled or unchanged."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self.limits = limits

    def compose(self) -> ComposeResult:
        limits = self.limits
        thresholds = ", ".join(str(pct) for pct in limits.soft_thresholds_pct or [])
        credits = "" if limits.hard_limit_ucr is None else credits_text(limits.hard_limit_ucr)
        with Vertical(classes="dialog"):
            yield Label(f"Limits of {limits.customer_id}", classes="question")
            default = "" if limits.soft_thresholds_pct else \
                f" {', '.join(map(str, limits.effective_soft_thresholds_pct))}"  # its own hide the default
            yield Label(f"Soft thresholds, % of included (empty: the default{default})")
            yield Input(thresholds, placeholder="e.g. 50, 80, 100", id="soft")
            yield Label("Hard limit: in credits or in dollars (both empty: none)")
            with Horizontal(classes="pair"):
                yield Input(credits, placeholder="credits", id="credits")
                yield Input(limits.hard_limit_usd or "", placeholder="dollars", id="usd")
            yield Checkbox("Block overage (refuse calls past the included credits)", limits.block_overage,
                           id="block")
            yield Label("", id="problem", classes="problem")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Save", id="save", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#soft", Input).focus()

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def save(self) -> None:
        try:
            changes = self.changes()
        except ValueError as problem:
            self.query_one("#problem", Label).update(str(problem))
            return
        self.dismiss(changes or None)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)

    def changes(self) -> dict[str, Any]:
        """What the form asks to change, checked; ValueError naming the field otherwise."""
        limits = self.limits
        changes: dict[str, Any] = {}
        soft = _thresholds(self.query_one("#soft", Input).value)
        if soft != (limits.soft_thresholds_pct or None):
            changes["soft_thresholds_pct"] = soft
        credits, usd = (self.query_one(f"#{name}", Input).value.strip() for name in ("credits", "usd"))
        if credits and usd:
            raise ValueError("Give the hard limit in credits or in dollars, not both.")
        hard_ucr = _hard_ucr(credits) if credits else None
        hard_usd = _dollars(usd) if usd else None
        before_usd = None if limits.hard_limit_usd is None else Decimal(limits.hard_limit_usd)
        if hard_ucr is not None:
            if hard_ucr != limits.hard_limit_ucr:
                changes["hard_limit_ucr"] = hard_ucr
        elif hard_usd is not None:
            if Decimal(hard_usd) != before_usd:
                changes["hard_limit_usd"] = hard_usd
        elif (limits.hard_limit_ucr, before_usd) != (None, None):
            changes |= {"hard_limit_ucr": None, "hard_limit_usd": None}
        block = self.query_one("#block", Checkbox).value
        if block != limits.block_overage:
            changes["block_overage"] = block
        return changes


def _thresholds(text: str) -> list[int] | None:
    parts = [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]
    if not parts:
        return None
    try:
        values = sorted({int(part) for part in parts})
    except ValueError:
        raise ValueError("Soft thresholds: whole percentages, e.g. 50, 80, 100.") from None
    if len(values) > 10 or any(not 1 <= value <= 1000 for value in values):
        raise ValueError("Soft thresholds: at most ten, each from 1 to 1000.")
    return values


def _hard_ucr(text: str) -> int:
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        raise ValueError("Hard limit in credits: a number, e.g. 5000.") from None
    ucr = value * UCR_PER_CREDIT
    if value <= 0 or ucr != ucr.to_integral_value():
        raise ValueError("Hard limit in credits: above 0, at most six decimals.")
    return int(ucr)


def _dollars(text: str) -> str:
    try:
        value = Decimal(text.lstrip("$").replace(",", ""))
    except InvalidOperation:
        raise ValueError("Hard limit in dollars: a number, e.g. 25 or 25.50.") from None
    if value <= 0 or value.as_tuple().exponent < -6:
        raise ValueError("Hard limit in dollars: above 0, at most six decimals.")
    return str(value)
