"""Customers: add one, link it to Stripe. One place for the API (`POST /customers`) and the CLI
(`meterline customers`, `meterline stripe subscribe`, `meterline demo`)."""

from __future__ import annotations

from datetime import UTC, datetime

from plugin.ledger import store
from plugin.ledger.models import Customer
from plugin.outbox import store as outbox_store
from plugin.runtime import Meterline


class UnknownPlan(ValueError):
    """A plan meterline.yaml does not define; the message lists the ones it does."""


def add_customer(meterline: Meterline, customer_id: str, plan: str, stripe_customer_id: str | None = None) -> Customer:
    """Create a customer on a plan of meterline.yaml: UnknownPlan, or StoreError when it exists."""
    if plan not in meterline.config.plans:
        raise UnknownPlan(f"unknown plan {plan!r}; plans in meterline.yaml: {', '.join(sorted(meterline.config.plans))}")
    return store.add_customer(meterline.engine, customer_id, plan, stripe_customer_id)


def link_stripe(engine, customer_id: str, stripe_customer_id: str) -> int:
    """Record a customer's Stripe id and make its held meter events due; returns how many were held."""
    store.set_stripe_customer(engine, customer_id, stripe_customer_id)
    return outbox_store.release_held(engine, customer_id, datetime.now(UTC))


def new_stripe_customer(engine, setup, customer_id: str) -> str:
    """Create the customer at Stripe and link it; returns its Stripe id."""
    created = setup.client.v1.customers.create({"name": customer_id, "metadata": {"meterline_customer_id": customer_id}})
    link_stripe(engine, customer_id, created.id)
    return created.id
