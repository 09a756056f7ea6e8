"""`meterline migrate suggest-quota [--percentile 95] [--days 90] [--plan P] [--json]`: the included
quota a fleet's usage suggests before moving it to metered billing (plugin/services/migration.py)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import TextIO

from plugin import runtime
from plugin.cli.common import BadInput
from plugin.services.migration import quota_suggestion


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


def register(commands) -> None:
    migrate = commands.add_parser("migrate", help="moving flat-rate customers to metered billing")
    actions = migrate.add_subparsers(dest="action", required=True)
    quota = actions.add_parser("suggest-quota", help="the included quota the fleet's usage suggests")
    quota.add_argument("--percentile", type=percentile_arg, default=95.0)
    quota.add_argument("--days", type=int, default=90, help="a multiple of 30 (default 90)")
    quota.add_argument("--plan", default=None, help="only customers on this plan")
    quota.add_argument("--json", action="store_true")
    quota.set_defaults(run=cmd_suggest_quota)
