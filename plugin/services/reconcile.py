"""Reconciliation: the ledger against what Stripe counted (DESIGN "Contract: reconciliation"), for
`meterline reconcile`, `GET /reconciliation` and the proxy's timer.

Per customer and period: the events the ledger meant for Stripe (its outbox rows, one per metered
ledger row) by clock hour and status, against Stripe's meter event summaries: first the window's
total (one call), and hour by hour only where the totals diverge or `unknown` events wait.
Events still on their way are not divergence; dead letters are. Where an hour's totals prove what
became of `unknown` events (landed, or missing), they are settled: marked delivered, or sent again
under their own identifiers. A diverged customer raises one `reconciliation_divergence` alert per
period and direction. The maths is plugin/rules/reconcile.py; Stripe's side plugin/stripe/summaries.py.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import stripe

from plugin.ledger import accounts, reconciliations
from plugin.outbox import store as outbox_store
from plugin.rules import reconcile as rules
from plugin.rules.plans import Period
from plugin.rules.policy import credits_text
from plugin.rules.reconcile import CustomerReconciliation, Settlement
from plugin.runtime import Meterline, stripe_config
from plugin.services.usage import Which, period_of, profile_of
from plugin.settings import ConfigError
from plugin.stripe.summaries import SummaryReader, find_meter_id

log = logging.getLogger("meterline")

ALERT_KIND = "reconciliation_divergence"
READ_RETRIES = 3
"""The SDK retries a summary read Stripe refused for its rate limit (or a 5xx): one 429 must not lose a run
over thousands of calls."""


@dataclass
class Run:
    """What one reconciliation found, and what it cost at Stripe."""

    report: dict[str, Any]
    customers: list[CustomerReconciliation]
    stripe_calls: int
    landed: int
    resent: int

    @property
    def diverged(self) -> list[CustomerReconciliation]:
        return [found for found in self.customers if found.status is rules.Status.DIVERGED]


def reconcile(meterline: Meterline, now: datetime, *, which: Which = "current", customer_id: str | None = None,
              client: stripe.StripeClient | None = None) -> Run:
    """Compare, settle what the totals prove, raise the alerts, keep the run; UnknownCustomer for a
    customer meterline does not know, ConfigError without a Stripe key or meter."""
    engine = meterline.engine
    if customer_id is not None:
        profile_of(meterline, customer_id)
    client = client or stripe_config(meterline.settings, meterline.config).client(retries=READ_RETRIES)
    event_name = meterline.config.stripe.meter_event_name
    meter_id = find_meter_id(client, event_name)
    if meter_id is None:
        raise ConfigError(f"no active Stripe meter counts {event_name!r}: run `meterline stripe setup` first")
    reader = SummaryReader(client, meter_id)
    profiles = [accounts.profile_from(row) for row in accounts.profile_rows(engine, exact=customer_id)]
    stripe_ids = outbox_store.stripe_customer_ids(engine, [profile.customer_id for profile in profiles])
    by_period: dict[Period, list[str]] = defaultdict(list)
    for profile in profiles:
        by_period[period_of(meterline, profile, now, which)].append(profile.customer_id)
    policies = meterline.config.policies
    found: list[CustomerReconciliation] = []
    compared_from: dict[str, datetime] = {}
    """Each customer's window start: its alerts are one per customer, *its* period and direction."""
    landed: list[str] = []
    missing: list[str] = []
    windows: list[rules.Window] = []
    for period, customer_ids in sorted(by_period.items(), key=lambda item: item[0].start):
        compared = rules.window(period.start, period.end, now, meterline.settings.reconcile_lag_seconds)
        windows.append(compared)
        requests = rules.summary_requests(compared)
        totals = outbox_store.hourly_totals(engine, compared.start, compared.end, customer_id)
        unknown = _unknown_by_hour(outbox_store.unknown_in(engine, compared.start, compared.end, customer_id))
        for customer in customer_ids:
            compared_from[customer] = compared.start
            stripe_id = stripe_ids.get(customer)
            hours = totals.get(customer, {})
            if not hours and stripe_id is None:
                continue  # nothing metered and nothing to compare with
            ledger = {hour: sum(statuses.values()) for hour, statuses in hours.items()}
            in_flight = {hour: sum(statuses.get(status, 0) for status in outbox_store.IN_FLIGHT)
                         for hour, statuses in hours.items()}
            threshold = policies.reconcile_threshold_pct
            by_total = rules.verdict(customer, stripe_id, sum(ledger.values()), sum(in_flight.values()),
                                     reader.total(stripe_id, compared) if stripe_id else 0, threshold)
            if by_total.status is not rules.Status.DIVERGED and customer not in unknown:
                found.append(by_total)  # one call told all: no hours needed
                continue
            stripe_hours = reader.hourly(stripe_id, requests) if stripe_id else {}
            for hour, events in unknown.get(customer, {}).items():
                unknown_ucr = sum(value for _, value in events)
                verdict = rules.settle_unknown(ledger.get(hour, 0), in_flight.get(hour, 0) - unknown_ucr, unknown_ucr,
                                               stripe_hours.get(hour, 0))
                if verdict is Settlement.LANDED:
                    landed += [event_id for event_id, _ in events]
                    in_flight[hour] -= unknown_ucr  # delivered after all: no longer on its way
                elif verdict is Settlement.MISSING:
                    missing += [event_id for event_id, _ in events]  # sent again: still on its way
            found.append(rules.compare(customer, stripe_id, ledger, {h: v for h, v in in_flight.items() if v},
                                       stripe_hours, threshold))
    outbox_store.settle_landed(engine, landed, now)
    resent = outbox_store.requeue(engine, now=now, ids=missing, force=True) if missing else 0
    report = _report(found, windows, now, policies.reconcile_threshold_pct)
    reconciliations.save(engine, report, now, scope=customer_id or reconciliations.EVERYONE)
    for diverged in found:
        if diverged.direction is not None:
            _alert(meterline, diverged, compared_from[diverged.customer_id].isoformat())
    return Run(report, found, reader.calls, len(landed), resent)


def _unknown_by_hour(events: list[tuple[str, str, datetime, int]]) -> dict[str, dict[int, list[tuple[str, int]]]]:
    grouped: dict[str, dict[int, list[tuple[str, int]]]] = defaultdict(lambda: defaultdict(list))
    for event_id, customer, occurred_at, value in events:
        grouped[customer][rules.hour_of(occurred_at)].append((event_id, value))
    return grouped


def _report(found: list[CustomerReconciliation], windows: list[rules.Window], now: datetime,
            threshold_pct: float) -> dict[str, Any]:
    """The run as JSON (DESIGN "Contract: reconciliation"). With customers on several billing periods the
    bounds are the earliest start and the latest end compared."""
    return {
        "period_start": min((w.start for w in windows), default=now).isoformat(),
        "period_end": max((w.end for w in windows), default=now).isoformat(),
        "checked_at": now.isoformat(),
        "threshold_pct": threshold_pct,
        "customers": [{
            "customer_id": item.customer_id, "stripe_customer_id": item.stripe_customer_id,
            "ledger_ucr": item.ledger_ucr, "in_flight_ucr": item.in_flight_ucr, "stripe_ucr": item.stripe_ucr,
            "divergence_ucr": item.divergence_ucr, "divergence_pct": item.divergence_pct, "status": item.status.value,
            "hours": [{"start": hour.start.isoformat(), "ledger_ucr": hour.ledger_ucr, "stripe_ucr": hour.stripe_ucr}
                      for hour in item.hours],
        } for item in sorted(found, key=lambda item: item.customer_id)],
    }


def _alert(meterline: Meterline, diverged: CustomerReconciliation, period_start: str) -> None:
    """One alert per customer, period and direction, however many runs see it."""
    short = diverged.direction is rules.Direction.STRIPE_SHORT
    hours = ", ".join(f"{hour.start:%Y-%m-%d %H:00}" for hour in diverged.hours[:5])
    more = f" and {len(diverged.hours) - 5} more" if len(diverged.hours) > 5 else ""
    message = (f"{diverged.customer_id}: Stripe has {credits_text(abs(diverged.divergence_ucr))} credits "
               f"{'fewer' if short else 'more'} than the ledger this period ({diverged.divergence_pct}% of "
               f"{credits_text(diverged.ledger_ucr)}); hours that differ: {hours}{more}")
    subject = f"{diverged.customer_id}:{period_start}:{diverged.direction}"
    reconciliations.alert_once(meterline.engine, ALERT_KIND, subject[:100], message, diverged.customer_id)


class Reconciler:
    """The proxy's timer: a whole-fleet run every METERLINE_RECONCILE_SECONDS on a thread of its own
    (the runs read the database and call Stripe: never on the event loop)."""

    def __init__(self, meterline: Meterline, every_seconds: float, clock: Callable[[], datetime]) -> None:
        self._meterline = meterline
        self._every = every_seconds
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meterline-reconcile", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                run = reconcile(self._meterline, self._clock())
            except (stripe.StripeError, ConfigError) as problem:  # Stripe away or not set up: the next run tries
                log.warning("meterline: reconciliation skipped: %s", str(problem).splitlines()[0][:200])
                continue
            except Exception as problem:  # a database hiccup must not end the timer for the proxy's lifetime
                log.error("meterline: reconciliation failed: %s", problem.__class__.__name__)
                continue
            if run.diverged:
                log.warning("meterline: reconciliation: %d customer(s) diverged from Stripe", len(run.diverged))
