"""Circuit breakers moved by hand (trip, reset) and read, audited. One place for the API
(`/customers/{id}/breaker`) and the CLI (`meterline breaker`)."""

from __future__ import annotations

from typing import Any

from plugin.ledger import accounts
from plugin.ledger import store as ledger_store
from plugin.ledger.store import StoreError, as_utc
from plugin.rules import breaker
from plugin.runtime import Meterline


def breaker_json(customer_id: str, state: breaker.BreakerState, events) -> dict[str, Any]:
    return {
        "customer_id": customer_id, "status": state.status.value,
        "since": None if state.since is None else as_utc(state.since).isoformat(),
        "by": state.by, "reason": state.reason,
        "events": [{"at": as_utc(event.at).isoformat(), "before": event.before, "after": event.after,
                    "by": event.by, "why": event.why} for event in events],
    }


def move_breaker(meterline: Meterline, customer_id: str, action: str, by: str, why: str) -> dict[str, Any]:
    """Trip or reset a customer's breaker by hand, audited (shared by the API and the CLI)."""
    if ledger_store.get_customer(meterline.engine, customer_id) is None:
        raise StoreError(f"unknown customer {customer_id!r}")
    current = accounts.get_breaker(meterline.engine, customer_id)
    now = meterline.clock()
    why = why or f"{action} by {by}"
    move = breaker.trip if action == "trip" else breaker.reset
    state, transition = move(current, now=now, by=by, why=why)
    accounts.save_breaker(meterline.engine, customer_id, state, transition)
    meterline.directory.forget(customer_id)
    return breaker_json(customer_id, state, accounts.breaker_events(meterline.engine, customer_id, limit=20))


def breaker_status(meterline: Meterline, customer_id: str, *, events: int = 100) -> dict[str, Any]:
    """A customer's breaker and its last `events` transitions; StoreError for an unknown customer."""
    if ledger_store.get_customer(meterline.engine, customer_id) is None:
        raise StoreError(f"unknown customer {customer_id!r}")
    return breaker_json(customer_id, accounts.get_breaker(meterline.engine, customer_id),
                        accounts.breaker_events(meterline.engine, customer_id, limit=events))
