"""Customer usage reports, shared by the CLI and (later) the HTTP API."""

from __future__ import annotations

from datetime import datetime

from plugin.ledger import store
from plugin.plans import credits_to_ucr, project_period_total
from plugin.runtime import Meterline


class UnknownCustomer(LookupError):
    pass


def usage_report(meterline: Meterline, customer_id: str, now: datetime) -> dict:
    """The customer's current period as one JSON-ready object (DESIGN.md `usage ID --json`).

    Reservations, hard limits and the circuit breaker arrive with the plans-and-limits work; until
    then nothing is ever reserved, no hard limit exists and no breaker can open, and the report
    says exactly that (0, null, "closed") rather than leaving the contract's fields out.
    """
    customer = store.get_customer(meterline.engine, customer_id)
    if customer is None:
        raise UnknownCustomer(customer_id)
    plan = meterline.config.plans.get(customer.plan)
    period = meterline.period(customer_id, now)
    totals = store.usage_totals(meterline.engine, customer_id, period.start, period.end)
    cap_ucr = credits_to_ucr(plan.cap_credits) if plan and plan.cap_credits is not None else None
    return {
        "customer_id": customer.id,
        "plan": customer.plan,
        "period_start": period.start.isoformat(),
        "period_end": period.end.isoformat(),
        "used_ucr": totals.used_ucr,
        "reserved_ucr": 0,
        "included_ucr": credits_to_ucr(plan.included_credits) if plan else 0,
        "hard_limit_ucr": None,
        "cap_ucr": cap_ucr,
        "remaining_ucr": None if cap_ucr is None else max(cap_ucr - totals.used_ucr, 0),
        "projected_ucr": project_period_total(totals.used_ucr, period, now),
        "requests": totals.requests,
        "saved_ucr": totals.saved_ucr,
        "by_model": totals.by_model,
        "by_action": totals.by_action,
        "by_member": totals.by_member,
        "breaker": "closed",
    }
