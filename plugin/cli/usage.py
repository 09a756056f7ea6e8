"""`meterline usage ID [--json]`: a customer's period, from the same service as `GET /usage`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TextIO

from plugin import runtime
from plugin.cli.common import BadInput, customer_id_arg
from plugin.rules.policy import credits_grouped
from plugin.services.usage import UnknownCustomer, usage_report


def cmd_usage(args, out: TextIO) -> None:
    """The same report as `GET /usage`: JSON with --json, else a page a person reads."""
    try:
        report = usage_report(runtime.current(), args.customer_id, datetime.now(UTC))
    except UnknownCustomer:
        raise BadInput(f"unknown customer {args.customer_id!r}") from None
    if args.json:
        print(json.dumps(report), file=out)
        return
    print("\n".join(usage_lines(report)), file=out)


def usage_lines(report: dict) -> list[str]:
    """What `meterline usage ID` prints: used against included, the projection in dollars, top actions."""
    grandfathered = f", grandfathered since {report['grandfathered_at'][:10]}" if report["grandfathered_at"] else ""
    lines = [f"customer  {report['customer_id']} (plan {report['plan']}{grandfathered})",
             f"period    {report['period_start'][:10]} .. {report['period_end'][:10]} (UTC)"]
    used = f"used      {credits_grouped(report['used_ucr'])} credits in {report['requests']} requests"
    if report["included_pct"] is not None:
        used += f", {report['included_pct']}% of {credits_grouped(report['included_ucr'])} included"
    lines.append(used)
    if report["cap_ucr"] is not None:
        lines.append(f"cap       {credits_grouped(report['cap_ucr'])} credits "
                     f"({credits_grouped(report['remaining_ucr'])} left)")
    lines.append(f"projected {credits_grouped(report['projected_ucr'])} credits: on track for "
                 f"${report['projected_usd']} this period")
    if report["top_actions"]:
        lines.append("top actions")
        lines += [f"  {entry['action']:<30} {credits_grouped(entry['used_ucr']):>18}  {entry['share_pct']:5.1f}%"
                  for entry in report["top_actions"]]
    for title, key in (("by model", "by_model"), ("by member", "by_member")):
        if report[key]:
            lines.append(title)
            lines += [f"  {name:<30} {credits_grouped(ucr):>18}"
                      for name, ucr in sorted(report[key].items(), key=lambda item: (-item[1], item[0]))]
    return lines


def register(commands) -> None:
    usage = commands.add_parser("usage", help="a customer's usage this period")
    usage.add_argument("customer_id", type=customer_id_arg)
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(run=cmd_usage)
