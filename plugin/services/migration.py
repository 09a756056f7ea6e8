"""Moving flat-rate customers to metered billing: what the `meterline migrate ...` commands report
(DESIGN "Contract: migration and pricing operations"). The maths is plugin/rules/migration.py."""

from __future__ import annotations

from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import quote

from plugin.ledger import accounts, rollups, store
from plugin.rules.migration import (
    NOTICE_DAYS,
    Impact,
    ImpactTotals,
    impact,
    impact_totals,
    notice_values,
    render_notice,
    suggest_quota,
    window_days,
)
from plugin.rules.rollups import DAY, unit_of
from plugin.rules.usage import dollars
from plugin.runtime import Meterline
from plugin.settings import PlanConfig


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
    terms: dict[str, PlanConfig] = {}
    for customer, by_day in used.items():
        profile = profiles.get(customer)
        if profile is None or (plan is not None and profile.plan != plan) or not sum(by_day.values()):
            continue
        means[customer] = Fraction(sum(by_day.values()), len(windows))
        terms[customer] = meterline.plan_of(profile)
    found = suggest_quota(means, terms, percentile, days)
    return {"percentile": found.percentile, "days": found.days, "quota_credits": found.quota_credits,
            "customers": found.customers, "over_quota_customers": found.over_quota_customers,
            "overage_usd": dollars(found.overage_usd)}


def migration_impact(meterline: Meterline, now: datetime, *, to_plan: str, flat_usd: Fraction,
                     plan: str | None = None) -> tuple[list[Impact], ImpactTotals]:
    """Every customer (on `plan` when given) but the grandfathered, moved from `flat_usd` a month to
    `to_plan`: its last three 30-day windows and its bill on the plan for their mean. Customers without
    usage are in it too: on a metered plan they pay the base fee alone, which is where revenue is lost.
    Largest rise first. ValueError for an unknown plan."""
    for name in filter(None, (to_plan, plan)):
        if name not in meterline.config.plans:
            raise ValueError(f"unknown plan {name!r}; plans in meterline.yaml: {', '.join(sorted(meterline.config.plans))}")
    windows = window_days(unit_of(now, DAY), 3 * 30)
    used = rollups.credits_by_day(meterline.engine, windows[0][0], windows[-1][1])
    target = meterline.config.plans[to_plan]
    impacts = []
    for customer in store.list_customers(meterline.engine):
        if customer.grandfathered_at is not None or (plan is not None and customer.plan != plan):
            continue
        by_day = used.get(customer.id, {})
        per_window = tuple(sum(credits for day, credits in by_day.items() if first <= day < stop)
                           for first, stop in windows)
        impacts.append(impact(customer.id, per_window, flat_usd, target))
    impacts.sort(key=lambda each: (-each.difference_usd, each.customer_id))
    return impacts, impact_totals(impacts)


def impact_json(impacts: list[Impact], totals: ImpactTotals) -> dict[str, Any]:
    """DESIGN's `{"customers": [...]}`, with the totals beside it."""
    change = totals.revenue_change_pct
    return {"customers": [{"customer_id": each.customer_id, "windows_ucr": list(each.windows_ucr),
                           "old_usd": dollars(each.old_usd), "projected_usd": dollars(each.projected_usd),
                           "difference_usd": dollars(each.difference_usd)} for each in impacts],
            "totals": {"customers": totals.customers, "old_usd": dollars(totals.old_usd),
                       "projected_usd": dollars(totals.projected_usd), "difference_usd": dollars(totals.difference_usd),
                       "revenue_change_pct": None if change is None else float(round(change, 1)),
                       "paying_more": totals.paying_more, "paying_less": totals.paying_less}}


def draft_notices(meterline: Meterline, now: datetime, *, template: str, out: Path, to_plan: str, flat_usd: Fraction,
                  plan: str | None = None, legacy_link: str | None = None) -> list[Path]:
    """One notice per customer `migration_impact` covers, from `template` (`$name` placeholders, see
    plugin.rules.migration.NOTICE_FIELDS), written to `out` as `<customer id>.txt` (the id percent-encoded,
    so any id is one safe file name). The template is checked before anything is written: ValueError."""
    impacts, _ = migration_impact(meterline, now, to_plan=to_plan, flat_usd=flat_usd, plan=plan)
    effective = (now + timedelta(days=NOTICE_DAYS)).date()
    plans = {customer.id: customer.plan for customer in store.list_customers(meterline.engine)}
    drafts = {each.customer_id: render_notice(template, notice_values(
        each, plan=plans[each.customer_id], to_plan=to_plan, effective=effective, legacy_link=legacy_link))
        for each in impacts}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for customer_id, text in drafts.items():
        path = out / f"{quote(customer_id, safe='')}.txt"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
