"""`meterline usage ID [--json]`: a customer's period, from the same service as `GET /usage`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TextIO

from plugin import runtime
from plugin.cli.common import BadInput, customer_id_arg
from plugin.services.usage import UnknownCustomer, usage_report


def cmd_usage(args, out: TextIO) -> None:
    try:
        report = usage_report(runtime.current(), args.customer_id, datetime.now(UTC))
    except UnknownCustomer:
        raise BadInput(f"unknown customer {args.customer_id!r}") from None
    if args.json:
        print(json.dumps(report), file=out)
        return
    credits = lambda ucr: f"{ucr / 1_000_000:,.6f}"  # display only; the JSON carries exact integers
    print(f"customer {report['customer_id']} (plan {report['plan']})", file=out)
    print(f"period   {report['period_start']} .. {report['period_end']}", file=out)
    print(f"used     {credits(report['used_ucr'])} credits in {report['requests']} requests", file=out)
    if report["cap_ucr"] is not None:
        print(f"cap      {credits(report['cap_ucr'])} credits ({credits(report['remaining_ucr'])} left)", file=out)
    print(f"projected {credits(report['projected_ucr'])} credits this period", file=out)
    for title, key in (("by model", "by_model"), ("by action", "by_action"), ("by member", "by_member")):
        if report[key]:
            print(title, file=out)
            for name, ucr in sorted(report[key].items(), key=lambda item: -item[1]):
                print(f"  {name:<30} {credits(ucr)}", file=out)


def register(commands) -> None:
    usage = commands.add_parser("usage", help="a customer's usage this period")
    usage.add_argument("customer_id", type=customer_id_arg)
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(run=cmd_usage)
