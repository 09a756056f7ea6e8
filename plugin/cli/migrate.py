"""`meterline migrate ...`: the reports of a move from flat prices to metered billing (plugin/services/
migration.py): `suggest-quota` (the included quota the fleet's usage suggests), `impact` (each customer's
bill before and after), `notice` (a draft announcement per customer); and, from plugin/cli/plan_moves.py,
the moves themselves."""

from __future__ import annotations

import argparse
import csv
import json
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import TextIO

from plugin import runtime
from plugin.cli import plan_moves
from plugin.cli.common import BadInput, decimal_arg
from plugin.rules.pricing import UCR_PER_CREDIT, divide_half_up
from plugin.services.migration import (
    draft_notices,
    impact_json,
    migration_impact,
    quota_suggestion,
)


def percentile_arg(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentile, e.g. 95, got {value!r}") from None
    if not 0 < number <= 100:
        raise argparse.ArgumentTypeError(f"a percentile is above 0 and at most 100, got {value!r}")
    return number


def cmd_suggest_quota(args, out: TextIO) -> None:
    try:
        found = quota_suggestion(runtime.current(), datetime.now(UTC), percentile=args.percentile, days=args.days,
                                 plan=args.plan)
    except ValueError as problem:
        raise BadInput(f"meterline migrate suggest-quota: {problem}") from None
    if args.json:
        print(json.dumps(found), file=out)
        return
    scope = f" on plan {args.plan}" if args.plan else ""
    print(f"{found['customers']:,} customer(s){scope} with usage in the last {found['days']} days (30-day windows)\n"
          f"p{found['percentile']:g} of their mean monthly usage: {found['quota_credits']:,} credits\n"
          f"{found['over_quota_customers']:,} customer(s) above it; their overage at their plan's rate: "
          f"${found['overage_usd']} per month", file=out)


def cmd_impact(args, out: TextIO) -> None:
    try:
        impacts, totals = migration_impact(runtime.current(), datetime.now(UTC), to_plan=args.to_plan,
                                           flat_usd=Fraction(args.flat_usd), plan=args.plan)
    except ValueError as problem:
        raise BadInput(f"meterline migrate impact: {problem}") from None
    answer = impact_json(impacts, totals)
    if args.json:
        print(json.dumps(answer), file=out)
        return
    if args.csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["customer_id", "window_1_ucr", "window_2_ucr", "window_3_ucr", "old_usd", "projected_usd",
                         "difference_usd"])
        for row in answer["customers"]:
            writer.writerow([row["customer_id"], *row["windows_ucr"], row["old_usd"], row["projected_usd"],
                             row["difference_usd"]])
        return
    summary = answer["totals"]
    change = "n/a" if summary["revenue_change_pct"] is None else f"{summary['revenue_change_pct']:+.1f}%"
    print(f"{summary['customers']:,} customer(s) from ${args.flat_usd} a month to plan {args.to_plan} "
          f"(last three 30-day windows, grandfathered customers left out)\n"
          f"monthly revenue ${summary['old_usd']} -> ${summary['projected_usd']} ({change}); "
          f"{summary['paying_more']:,} pay more, {summary['paying_less']:,} pay less", file=out)
    if answer["customers"]:
        print(f"{'customer':<24} {'credits per window (oldest first)':>36} {'old':>10} {'projected':>12} "
              f"{'difference':>12}", file=out)
    for row in answer["customers"]:
        windows = " / ".join(f"{divide_half_up(ucr, UCR_PER_CREDIT):,}" for ucr in row["windows_ucr"])
        print(f"{row['customer_id']:<24} {windows:>36} {row['old_usd']:>10} {row['projected_usd']:>12} "
              f"{row['difference_usd']:>12}", file=out)


def cmd_notice(args, out: TextIO) -> None:
    try:
        template = Path(args.template).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as problem:
        raise BadInput(f"meterline migrate notice: cannot read the template {args.template}: "
                       f"{getattr(problem, 'strerror', None) or problem}") from None
    try:
        written = draft_notices(runtime.current(), datetime.now(UTC), template=template, out=Path(args.out),
                                to_plan=args.to_plan, flat_usd=Fraction(args.flat_usd), plan=args.plan,
                                legacy_link=args.legacy_link)
    except ValueError as problem:
        raise BadInput(f"meterline migrate notice: {problem}") from None
    except OSError as problem:
        raise BadInput(f"meterline migrate notice: cannot write to {args.out}: {problem.strerror}") from None
    print(f"{len(written):,} notice(s) drafted in {args.out}", file=out)


def _move_arguments(parser) -> None:
    parser.add_argument("--to-plan", required=True, help="the metered plan they move to")
    parser.add_argument("--flat-usd", required=True, type=decimal_arg, help="the flat monthly price they pay today")
    parser.add_argument("--plan", default=None, help="only customers on this plan today")


def register(commands) -> None:
    migrate = commands.add_parser("migrate", help="moving flat-rate customers to metered billing")
    actions = migrate.add_subparsers(dest="action", required=True)
    quota = actions.add_parser("suggest-quota", help="the included quota the fleet's usage suggests")
    quota.add_argument("--percentile", type=percentile_arg, default=95.0)
    quota.add_argument("--days", type=int, default=90, help="a multiple of 30 (default 90)")
    quota.add_argument("--plan", default=None, help="only customers on this plan")
    quota.add_argument("--json", action="store_true")
    quota.set_defaults(run=cmd_suggest_quota)
    impact = actions.add_parser("impact", help="each customer's monthly bill today and on a metered plan")
    _move_arguments(impact)
    shape = impact.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true")
    shape.add_argument("--csv", action="store_true")
    impact.set_defaults(run=cmd_impact)
    notice = actions.add_parser("notice", help="draft the 60-day notice of the move, one file per customer")
    _move_arguments(notice)
    notice.add_argument("--template", required=True, help="a text file with $placeholders (see the README)")
    notice.add_argument("--out", required=True, help="the directory the drafts are written to")
    notice.add_argument("--legacy-link", default=None, help="the stay-on-legacy link (default: a placeholder)")
    notice.set_defaults(run=cmd_notice)
    plan_moves.register_actions(actions)
