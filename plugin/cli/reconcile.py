"""`meterline reconcile [--period current|previous] [--customer ID] [--json]`: the ledger against
Stripe's meter summaries (plugin/services/reconcile.py). Exit 0 when no customer diverged
(`not_linked` is no failure), 1 otherwise."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TextIO

from plugin import runtime
from plugin.cli.common import BadInput, customer_id_arg
from plugin.rules.policy import credits_grouped
from plugin.services.reconcile import reconcile
from plugin.services.usage import UnknownCustomer


def cmd_reconcile(args, out: TextIO) -> None:
    try:
        run = reconcile(runtime.current(), datetime.now(UTC), which=args.period, customer_id=args.customer)
    except UnknownCustomer:
        raise BadInput(f"unknown customer {args.customer!r}") from None
    if args.json:
        print(json.dumps(run.report), file=out)
    else:
        print("\n".join(reconcile_lines(run.report, run.stripe_calls, run.landed, run.resent)), file=out)
    if run.diverged:
        raise SystemExit(1)


def reconcile_lines(report: dict, stripe_calls: int, landed: int, resent: int) -> list[str]:
    """A line per customer (credits, not µcr), the differing hours under a diverged one, then a summary."""
    lines = [f"{report['period_start'][:16]} .. {report['period_end'][:16]} UTC, threshold "
             f"{report['threshold_pct']}%",
             f"{'customer':<24} {'ledger':>14} {'in flight':>12} {'stripe':>14} {'divergence':>12} {'%':>7}  status"]
    for item in report["customers"]:
        lines.append(f"{item['customer_id']:<24} {credits_grouped(item['ledger_ucr']):>14} "
                     f"{credits_grouped(item['in_flight_ucr']):>12} {credits_grouped(item['stripe_ucr']):>14} "
                     f"{credits_grouped(item['divergence_ucr']):>12} {item['divergence_pct']:>7.2f}  {item['status']}")
        lines += [f"    hour {hour['start'][:13]}:00  ledger {credits_grouped(hour['ledger_ucr'])}  "
                  f"stripe {credits_grouped(hour['stripe_ucr'])}" for hour in item["hours"]]
    diverged = sum(item["status"] == "diverged" for item in report["customers"])
    lines.append(f"{len(report['customers'])} customer(s), {diverged} diverged; {stripe_calls} Stripe call(s); "
                 f"unknown events settled: {landed} landed, {resent} sent again")
    return lines


def register(commands) -> None:
    parser = commands.add_parser("reconcile", help="compare the ledger with what Stripe counted")
    parser.add_argument("--period", choices=("current", "previous"), default="current")
    parser.add_argument("--customer", type=customer_id_arg, default=None)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run=cmd_reconcile)
