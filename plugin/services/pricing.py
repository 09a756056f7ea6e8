"""Pricing operations (DESIGN "Contract: migration and pricing operations"): the customer-facing pricing
changelog (`meterline pricing change`, `GET /pricing/changelog`), the version every ledger row is priced
with, repricing a period after a price fix, and the margin review. The maths is plugin/rules/pricing_log.py
and plugin/rules/margins.py; the CLI and the API only translate in and out.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

from sqlalchemy import Engine

from plugin.ledger import accounts, pricing_versions, rollups
from plugin.ledger.models import PricingVersion
from plugin.ledger.pricing_versions import ADJUSTMENT_ACTION, ADJUSTMENT_PROVIDER
from plugin.ledger.store import as_utc, record_batch
from plugin.rules import margins
from plugin.rules.pricing import PriceBook, Usage
from plugin.rules.pricing_log import (
    Change,
    CustomerPlan,
    affected_customers,
    config_of,
    diff,
    repriced_models,
    snapshot_json,
    snapshot_of,
)
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.rules.rollups import DAY, unit_of
from plugin.runtime import Meterline, build_price_book
from plugin.settings import MeterlineConfig

BASELINE_AT_START_UP = "baseline recorded at start-up: no pricing had been recorded yet"
CHANGED_AT_START_UP = "recorded at start-up: the running meterline.yaml differs from the last recorded pricing"
AFFECTED_DAYS = 30
"""A change to a model's price touches the customers that called it in this many last days."""
MAX_REASON = 500
_ATTEMPTS = 20  # records racing for the next version number; each retry re-reads the newest


# ------------------------------------------------------------------------------ the changelog


def entry_json(entry: PricingVersion) -> dict[str, Any]:
    """A changelog entry as customers read it (the snapshot stays inside)."""
    return {"version": entry.version, "at": as_utc(entry.at).isoformat(), "reason": entry.reason,
            "changes": json.loads(entry.changes), "customers_affected": entry.customers_affected}


def changelog(engine: Engine) -> dict[str, Any]:
    """Every recorded version, newest first."""
    return {"entries": [entry_json(entry) for entry in pricing_versions.every_version(engine)]}


def record(engine: Engine, config: MeterlineConfig, reason: str, now: datetime,
           baseline_reason: str | None = None) -> tuple[PricingVersion, bool]:
    """The newest version when it already is what `config` sells (False), else a new version recorded with
    what changed since it and whom that touches (True). The first version is the baseline, recorded with
    `baseline_reason` when given. Safe against other processes recording at the same moment."""
    snapshot = snapshot_of(config)
    for _ in range(_ATTEMPTS):
        newest = pricing_versions.newest(engine)
        old = None if newest is None else json.loads(newest.snapshot)
        changes = diff(old, snapshot)
        if newest is not None and not changes:
            return newest, False
        entry = PricingVersion(
            version=1 if newest is None else newest.version + 1, at=now,
            reason=reason if newest is not None else baseline_reason or reason, snapshot=snapshot_json(snapshot),
            changes=json.dumps([change.as_json() for change in changes]),
            customers_affected=0 if old is None else len(_affected(engine, old, snapshot, changes, now)))
        if pricing_versions.add(engine, entry):
            return entry, True
    raise RuntimeError(f"could not record a pricing version after {_ATTEMPTS} attempts (other processes kept "
                       "recording first)")


def record_change(engine: Engine, config: MeterlineConfig, reason: str, now: datetime) -> dict[str, Any] | None:
    """`meterline pricing change`: the new entry, or None when nothing changed since the newest.
    ValueError for an empty or overlong reason."""
    reason = " ".join(reason.split())
    if not reason:
        raise ValueError("--reason must say why (customers read it)")
    if len(reason) > MAX_REASON:
        raise ValueError(f"--reason is at most {MAX_REASON} characters")
    entry, new = record(engine, config, reason, now)
    return entry_json(entry) if new else None


def running_version(engine: Engine, config: MeterlineConfig, now: datetime) -> int:
    """The version a process prices with: the newest when it is the running configuration, else one
    recorded now (an edited meterline.yaml nobody recorded, or a revert to an older version's), so every
    ledger row names a real version and the changelog customers read never hides a change."""
    entry, _ = record(engine, config, CHANGED_AT_START_UP, now, baseline_reason=BASELINE_AT_START_UP)
    return entry.version


def _affected(engine: Engine, old: dict, new: dict, changes: list[Change], now: datetime) -> set[str]:
    """Who `changes` touch (plugin.rules.pricing_log.affected_customers): customers on a changed plan, and
    those that called a repriced model in the last AFFECTED_DAYS days."""
    profiles = [accounts.profile_from(row) for row in accounts.profile_rows(engine)]
    plans = {profile.customer_id: CustomerPlan(profile.plan, frozenset(profile.terms.given() if profile.terms
                                                                      else ()))
             for profile in profiles}
    today = unit_of(now, DAY)
    used = rollups.models_by_customer(engine, today - AFFECTED_DAYS + 1, today + 1)
    repriced: set[str] = set()
    if any(change.path[0] in ("pricing", "prices") for change in changes):
        models = set().union(*used.values())
        try:
            repriced = repriced_models(models, build_price_book(config_of(old)), build_price_book(config_of(new)))
        except ValueError:  # an old snapshot today's meterline cannot read: assume every model changed
            repriced = models
    return affected_customers(changes, plans, used, repriced)


# ------------------------------------------------------------------------------ reprice


def month_bounds(period: str) -> tuple[datetime, datetime]:
    """[start, end) of a UTC month written YYYY-MM; ValueError otherwise."""
    if not re.fullmatch(r"\d{4}-\d{2}", period) or not 1 <= int(period[5:]) <= 12 or int(period[:4]) < 1970:
        raise ValueError(f"--period is a month written YYYY-MM, e.g. 2026-03, got {period!r}")
    year, month = int(period[:4]), int(period[5:])
    start = datetime(year, month, 1, tzinfo=UTC)
    return start, datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


def adjustment_id(customer_id: str, period: str, from_version: int, to_version: int) -> str:
    """The one adjustment row a reprice writes per customer, period and pair of versions: a second --apply
    finds it and writes nothing. Hashed so it fits the ledger id whatever the customer id's length."""
    digest = hashlib.sha256(f"{customer_id}\n{period}\n{from_version}\n{to_version}".encode()).hexdigest()[:24]
    return f"{ADJUSTMENT_ACTION}_{period}_v{from_version}_v{to_version}_{digest}"


def _book_of(engine: Engine, version: int) -> PriceBook:
    entry = pricing_versions.get(engine, version)
    if entry is None:
        raise ValueError(f"no pricing version {version} (meterline pricing change records them)")
    return build_price_book(config_of(json.loads(entry.snapshot)), version=version)


def _priceable(book: PriceBook, model: str) -> bool:
    """Whether `book` alone knows what a call of `model` costs: a cost-basis model needs a price in
    meterline.yaml (LiteLLM's price table is not part of a version)."""
    return book.rule_for(model).basis == "tokens" or book.price_for(model) is not None


@dataclass
class _Repriced:
    rows: int = 0
    skipped_rows: int = 0
    billed_ucr: int = 0
    old_ucr: int = 0
    new_ucr: int = 0
    skipped_models: set[str] = field(default_factory=set)


def reprice(meterline: Meterline, from_version: int, to_version: int, period: str, *, apply: bool,
            now: datetime) -> dict[str, Any]:
    """What pricing the rows of `period` priced with `from_version` at `to_version` changes, per customer
    (both recomputed from the rows' stored tokens, so what the ledger does not keep cancels out); with
    `apply`, the signed differences written as adjustment rows (never an edit of a row). ValueError for
    an unknown version or a bad period."""
    if from_version == to_version:
        raise ValueError("--from and --to name the same version: nothing to reprice")
    start, end = month_bounds(period)
    engine = meterline.engine
    old_book, new_book = _book_of(engine, from_version), _book_of(engine, to_version)
    found: dict[str, _Repriced] = defaultdict(_Repriced)
    for row in pricing_versions.rows_priced_with(engine, from_version, start, end):
        tally = found[row.customer_id]
        try:
            usage = Usage(prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
                          cached_tokens=row.cached_tokens, reasoning_tokens=row.reasoning_tokens)
        except ValueError:  # tokens that do not add up (an imported row): no price can be trusted
            usage = None
        if usage is None or not (_priceable(old_book, row.model) and _priceable(new_book, row.model)):
            tally.skipped_rows += 1
            tally.skipped_models.add(row.model)
            continue
        tally.rows += 1
        tally.billed_ucr += row.credits_ucr
        tally.old_ucr += old_book.charge(usage, row.model).credits_ucr
        tally.new_ucr += new_book.charge(usage, row.model).credits_ucr
    ids = {customer: adjustment_id(customer, period, from_version, to_version) for customer in found}
    written = pricing_versions.credits_of(engine, ids.values())
    sent = _sent_to_sink(meterline)
    records = []
    customers = []
    for customer, tally in sorted(found.items()):
        difference = tally.new_ucr - tally.old_ucr
        adjustment = None
        if difference or ids[customer] in written:
            credits = written.get(ids[customer], difference)
            metered = credits > 0 and sent(customer)
            adjustment = {"id": ids[customer], "credits_ucr": credits, "sent_to_sink": metered,
                          "written": ids[customer] in written, "new": False}
            if apply and ids[customer] not in written:
                records.append(BillingRecord(LedgerRow(
                    id=ids[customer], customer_id=customer, model=f"({ADJUSTMENT_ACTION})", action=ADJUSTMENT_ACTION,
                    provider=ADJUSTMENT_PROVIDER, credits_ucr=difference, created_at=now, price_version=to_version),
                    meter=metered))
                adjustment["written"] = True
        customers.append({"customer_id": customer, "rows": tally.rows, "skipped_rows": tally.skipped_rows,
                          "skipped_models": sorted(tally.skipped_models), "billed_ucr": tally.billed_ucr,
                          "old_ucr": tally.old_ucr, "new_ucr": tally.new_ucr, "difference_ucr": difference,
                          "adjustment": adjustment})
    # one transaction: ledger rows, rollups, outbox events for the positive ones; an id another run wrote
    # a moment ago is skipped, and only what this run wrote is "new"
    new = record_batch(engine, records) if records else {}
    for line in customers:
        if line["adjustment"] is not None:
            line["adjustment"]["new"] = line["adjustment"]["id"] in new
    credits_to_issue = [{"customer_id": line["customer_id"], "credits_ucr": -adjustment["credits_ucr"]}
                        for line in customers if (adjustment := line["adjustment"]) and adjustment["written"]
                        and adjustment["credits_ucr"] < 0]
    return {"from": from_version, "to": to_version, "period": period, "start": start.isoformat(),
            "end": end.isoformat(), "applied": apply, "customers": customers,
            "total_difference_ucr": sum(line["difference_ucr"] for line in customers),
            "credits_to_issue": credits_to_issue}


def _sent_to_sink(meterline: Meterline):
    """customer -> whether its positive amounts go to the sink: not when its plan (with its terms) is not
    metered, as for a grandfathered customer; those stay in the ledger only, like their calls."""
    metered = {profile.customer_id: meterline.plan_of(profile).metered
               for profile in map(accounts.profile_from, accounts.profile_rows(meterline.engine))}
    return lambda customer: metered.get(customer, True)


# ------------------------------------------------------------------------------ margin review


def review(meterline: Meterline, now: datetime, *, days: int = 90,
           drift_pct: Fraction = Fraction(10)) -> dict[str, Any]:
    """Provider cost, revenue (credits at each customer's own rate) and margin per model and per plan over
    the last `days`, with the drift of each margin since the `days` before. ValueError for a bad window."""
    if not 1 <= days <= 3660:
        raise ValueError(f"--days is 1 to 3660, got {days}")
    if drift_pct < 0:
        raise ValueError("--drift-pct must not be negative")
    start, before = now - timedelta(days=days), now - timedelta(days=2 * days)
    profiles = [accounts.profile_from(row) for row in accounts.profile_rows(meterline.engine)]
    plan_of = {profile.customer_id: profile.plan for profile in profiles}
    rate_of = {profile.customer_id: margins.credit_rate_usd(meterline.plan_of(profile)) for profile in profiles}

    rows = rollups.credits_and_cost(meterline.engine, before, start, now)

    def window(later: bool):
        return margins.tally((margins.Usage(customer, model, credits, cost)
                              for customer, model, in_later, credits, cost in rows if in_later == later),
                             plan_of, rate_of)

    models_now, plans_now = window(True)
    models_before, plans_before = window(False)
    return {"days": days, "drift_pct": float(drift_pct), "start": start.isoformat(), "end": now.isoformat(),
            "models": margins.review_lines(models_now, models_before, "model", drift_pct),
            "plans": margins.review_lines(plans_now, plans_before, "plan", drift_pct)}
