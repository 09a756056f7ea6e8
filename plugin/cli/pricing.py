"""`meterline pricing change|reprice|review`: the customer-facing pricing changelog, repricing a period
after a price fix, and the margin review (plugin/services/pricing.py)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import TextIO

from plugin import runtime
from plugin.cli.common import BadInput, positive_int
from plugin.rules.policy import credits_text
from plugin.services import pricing


def drift_arg(value: str) -> Fraction:
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected percentage points, e.g. 10, got {value!r}") from None
    if not number.is_finite() or number < 0 or number > 100_000:
        raise argparse.ArgumentTypeError(f"expected percentage points from 0 to 100000, got {value!r}")
    return Fraction(number)


def cmd_change(args, out: TextIO) -> None:
    meterline = runtime.current()
    try:
        entry = pricing.record_change(meterline.engine, meterline.config, args.reason, datetime.now(UTC))
    except ValueError as problem:
        raise BadInput(f"meterline pricing change: {problem}") from None
    if args.json:
        print(json.dumps({"changed": entry is not None, "entry": entry}), file=out)
    elif entry is None:
        print("nothing changed since the last recorded pricing: no entry written", file=out)
    elif entry["version"] == 1:
        print(f"version 1 recorded: the baseline every later change is compared with ({entry['reason']})", file=out)
    else:
        print(f"version {entry['version']} recorded: {len(entry['changes'])} change(s), "
              f"{entry['customers_affected']:,} customer(s) affected", file=out)
        for change in entry["changes"]:
            print(f"  {change['field']}: {_shown(change['old'])} -> {_shown(change['new'])}", file=out)


def _shown(value: str | None) -> str:
    return "(none)" if value is None else value


def cmd_changelog(args, out: TextIO) -> None:
    log = pricing.changelog(runtime.current().engine)
    if args.json:
        print(json.dumps(log), file=out)
        return
    if not log["entries"]:
        print("no pricing recorded yet (meterline pricing change --reason ... records the baseline)", file=out)
    for entry in log["entries"]:
        print(f"version {entry['version']} · {entry['at']} · {entry['customers_affected']:,} customer(s) affected"
              f"\n  {entry['reason']}", file=out)
        for change in entry["changes"]:
            print(f"  {change['field']}: {_shown(change['old'])} -> {_shown(change['new'])}", file=out)


def cmd_reprice(args, out: TextIO) -> None:
    try:
        found = pricing.reprice(runtime.current(), args.from_version, args.to_version, args.period, apply=args.apply,
                                now=datetime.now(UTC))
    except ValueError as problem:
        raise BadInput(f"meterline pricing reprice: {problem}") from None
    if args.json:
        print(json.dumps(found), file=out)
        return
    print(f"{found['period']}: rows priced with version {found['from']}, repriced at version {found['to']} "
          "(credits)", file=out)
    print(f"{'customer':<24} {'rows':>8} {'old':>14} {'new':>14} {'difference':>14}  adjustment", file=out)
    for line in found["customers"]:
        adjustment = line["adjustment"]
        if adjustment is None:
            state = "-"
        elif not adjustment["written"]:
            state = "to write (--apply)"
        else:
            state = ("written" if adjustment["new"] else "already written") + \
                    (", sent to the sink" if adjustment["sent_to_sink"] else ", ledger only")
        skipped = f" ({line['skipped_rows']} skipped: {', '.join(line['skipped_models'])})" if line["skipped_rows"] \
            else ""
        print(f"{line['customer_id']:<24} {line['rows']:>8,} {credits_text(line['old_ucr']):>14} "
              f"{credits_text(line['new_ucr']):>14} {credits_text(line['difference_ucr']):>14}  {state}{skipped}",
              file=out)
    print(f"total difference: {credits_text(found['total_difference_ucr'])} credits", file=out)
    for credit in found["credits_to_issue"]:
        print(f"issue {credit['customer_id']} a credit of {credits_text(credit['credits_ucr'])} credits: "
              "negative amounts are never sent to the sink (Stripe meter events are positive)", file=out)


def cmd_review(args, out: TextIO) -> None:
    try:
        found = pricing.review(runtime.current(), datetime.now(UTC), days=args.days, drift_pct=args.drift_pct)
    except ValueError as problem:
        raise BadInput(f"meterline pricing review: {problem}") from None
    if args.json:
        print(json.dumps(found), file=out)
        return
    print(f"last {found['days']} days against the {found['days']} before; ! = margin moved more than "
          f"{found['drift_pct']:g} points", file=out)
    for key, title in (("model", "model"), ("plan", "plan")):
        lines = found[key + "s"]
        print(f"\n  {title:<28} {'provider cost $':>16} {'revenue $':>16} {'margin %':>9} {'drift':>8}", file=out)
        for line in lines:
            print(f"{'!' if line['flagged'] else ' '} {line[key]:<28} {line['provider_cost_usd']:>16} "
                  f"{line['revenue_usd']:>16} {_pct(line['margin_pct']):>9} {_pct(line['drift_pct'], sign=True):>8}",
                  file=out)
        if not lines:
            print(f"  no usage in the last {found['days']} days", file=out)


def _pct(value: float | None, sign: bool = False) -> str:
    return "-" if value is None else f"{value:+.1f}" if sign else f"{value:.1f}"


def register(commands) -> None:
    group = commands.add_parser("pricing", help="the pricing changelog, repricing and the margin review")
    actions = group.add_subparsers(dest="action", required=True)
    change = actions.add_parser("change", help="record what changed in plans and pricing since the last record")
    change.add_argument("--reason", required=True, help="why, in words customers read on the changelog")
    change.add_argument("--json", action="store_true")
    change.set_defaults(run=cmd_change)
    log = actions.add_parser("changelog", help="every recorded version, newest first")
    log.add_argument("--json", action="store_true")
    log.set_defaults(run=cmd_changelog)
    again = actions.add_parser("reprice", help="what pricing a month's rows at another version changes")
    again.add_argument("--from", dest="from_version", type=positive_int, required=True, help="the version they "
                       "were priced with")
    again.add_argument("--to", dest="to_version", type=positive_int, required=True, help="the version to price at")
    again.add_argument("--period", required=True, help="a UTC month, YYYY-MM")
    again.add_argument("--apply", action="store_true", help="write the differences as adjustment rows")
    again.add_argument("--json", action="store_true")
    again.set_defaults(run=cmd_reprice)
    review = actions.add_parser("review", help="margins per model and plan, and how far they drifted")
    review.add_argument("--days", type=positive_int, default=90)
    review.add_argument("--drift-pct", type=drift_arg, default=Fraction(10))
    review.add_argument("--json", action="store_true")
    review.set_defaults(run=cmd_review)
