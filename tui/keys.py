"""The console's keys as data (DESIGN "Contract: operator console"): one table feeds the bindings,
the footer, `?` help and the command palette, so they can never disagree."""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True)
class Key:
    action: str
    """The app's or screen's action (`action_<name>`)."""
    key: str
    description: str
    changes_state: bool = False
    """Hidden with --readonly (the key then only says so)."""
    footer: bool = True


APP_KEYS = (
    Key("show('customers')", "1", "Customers", footer=False),
    Key("show('alerts')", "2", "Alerts", footer=False),
    Key("show('queue')", "3", "Queue", footer=False),
    Key("show('reconciliation')", "4", "Reconciliation", footer=False),
    Key("show('invoices')", "5", "Invoices", footer=False),
    Key("overage_block", "B", "Global overage block", changes_state=True),
    Key("toggle_pause", "p", "Pause refresh"),
    Key("refresh_now", "ctrl+r", "Refresh now"),
    Key("help", "question_mark", "Help"),
    Key("quit", "q", "Quit"),
)
"""Keys that work on every screen."""

CUSTOMER_KEYS = (
    Key("filter", "slash", "Filter"),
    Key("open", "enter", "Open", footer=False),
    Key("faults", "f", "Faults only"),
    Key("sort", "s", "Sort"),
    Key("trip", "t", "Trip breaker", changes_state=True),
    Key("reset", "R", "Reset breaker", changes_state=True),
    Key("limits", "l", "Edit limits", changes_state=True),
)
"""Keys of the customers screen and of a customer's detail (which has no filter, faults or sort)."""

ALERT_KEYS = (
    Key("filter", "slash", "Filter"),
    Key("follow", "F", "Follow"),
    Key("acknowledge", "a", "Acknowledge", changes_state=True),
)

QUEUE_KEYS = (
    Key("requeue", "r", "Re-queue", changes_state=True),
    Key("show_status", "s", "Status"),
)

RECONCILIATION_KEYS = (
    Key("filter", "slash", "Filter"),
    Key("run_reconciliation", "r", "Run now", changes_state=True),
)
"""`r` changes nothing at Stripe but settles `unknown` outbox events (some are sent again): a change."""

INVOICE_KEYS = (
    Key("filter", "slash", "Filter"),
    Key("approve_invoice", "a", "Approve", changes_state=True),
    Key("credit_invoice", "c", "Credit", changes_state=True),
)


def bindings(keys: tuple[Key, ...]) -> list[Binding]:
    """Textual bindings for `keys`. A state-changing key also gets a hidden second binding to
    `readonly_notice`: with --readonly, `allowed` disables the first, so the key says it is read-only."""
    found = []
    for key in keys:
        found.append(Binding(key.key, key.action, key.description, show=key.footer))
        if key.changes_state:
            found.append(Binding(key.key, "readonly_notice", show=False))
    return found


CHANGES_STATE = frozenset(key.action for keys in (APP_KEYS, CUSTOMER_KEYS, ALERT_KEYS, QUEUE_KEYS, RECONCILIATION_KEYS,
                                                  INVOICE_KEYS) for key in keys if key.changes_state)


def allowed(action: str, *, readonly: bool) -> bool:
    """Whether an action runs (and shows in the footer and the palette); what `check_action` answers."""
    if action == "readonly_notice":
        return readonly
    return not (readonly and action in CHANGES_STATE)


def visible(keys: tuple[Key, ...], *, readonly: bool) -> tuple[Key, ...]:
    """What help and the command palette list."""
    return tuple(key for key in keys if allowed(key.action, readonly=readonly))


def shown(key: str) -> str:
    """A key as people type it (`slash` is `/`)."""
    return {"slash": "/", "question_mark": "?"}.get(key, key)
