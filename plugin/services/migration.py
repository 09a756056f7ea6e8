"""Moving flat-rate customers to metered billing: what the `meterline migrate ...` commands report
(DESIGN "Contract: migration and pricing operations"). The maths is plugin/rules/migration.py."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from fractions import Fraction
from typing import Any

from plugin.ledger import accounts, rollups
from plugin.rules.migration import suggest_quota, window_days
from plugin.rules.rollups import DAY, unit_of
from plugin.rules.usage import dollars
from plugin.runtime import Meterline


def quota_suggestion(meterline: Meterline, now: datetime, *, percentile: float = 95.0, days: int = 90,
                     plan: str | None = None) -> dict[str, Any]:
    """The quota the last `days` suggest: each customer with usage (of `plan` when given), its mean per
    30-day window, their nearest-rank `percentile`; who is above it and the overage that would bring per month.
    ValueError for a bad `days` or an unknown plan."""
    if plan is not None and plan not in meterline.config.plans:
        raise ValueError(f"unknown plan {plan!r}")
    windows = window_days(unit_of(now, DAY), days)
    used = rollups.credits_by_day(meterline.engine, windows[0][0], windows[-1][1])
    profiles = {row[0]: accounts.profile_from(row) for row in accounts.profile_rows(meterline.engine)}
    means: dict[str, Fraction] = {}
    rates: dict[str, Fraction | None] = defaultdict(lambda: None)
    for customer, by_day in used.items():
        profile = profiles.get(customer)
        if profile is None or (plan is not None and profile.plan != plan) or not sum(by_day.values()):
            continue
        means[customer] = Fraction(sum(by_day.values()), len(windows))
        terms = meterline.plan_of(profile)
        rates[customer] = terms.overage_usd_per_credit if terms.has_overage else None
    found = suggest_quota(means, rates, percentile, days)
    return {"percentile": found.percentile, "days": found.days, "quota_credits": found.quota_credits,
            "customers": found.customers, "over_quota_customers": found.over_quota_customers,
            "overage_usd": dollars(found.overage_usd)}
