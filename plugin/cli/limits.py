"""`meterline limits show|set`, `meterline breaker`, `meterline overage-block`: protection by hand."""

from __future__ import annotations

import json
import os
from typing import TextIO

from plugin import runtime
from plugin.cli.common import BadInput, credits_arg, customer_id_arg
from plugin.ledger import accounts
from plugin.ledger.accounts import GLOBAL_OVERAGE_BLOCK
from plugin.rules.plans import credits_to_ucr
from plugin.services.breaker import breaker_status, move_breaker
from plugin.services.limits import LimitsRefused, set_limits, show_limits


def cmd_limits_show(args, out: TextIO) -> None:
    try:
        print(json.dumps(show_limits(runtime.current(), args.customer_id)), file=out)
    except LimitsRefused:
        raise BadInput(f"unknown customer {args.customer_id!r}") from None


def cmd_limits_set(args, out: TextIO) -> None:
    """The operator sets a customer's limits; the same validation as PUT /customers/{id}/limits."""
    body = {}
    if args.soft is not None:
        body["soft_thresholds_pct"] = None if args.soft == "default" else [
            int(part) if part.strip().isdigit() else part for part in args.soft.split(",")]
    if args.hard_credits is not None:
        body["hard_limit_ucr"] = None if args.hard_credits == "none" else credits_to_ucr(credits_arg(args.hard_credits))
    if args.hard_usd is not None:
        body["hard_limit_usd"] = None if args.hard_usd == "none" else args.hard_usd
    if args.block_overage is not None:
        body["block_overage"] = args.block_overage == "on"
    for name in ("notify_email", "notify_webhook_url"):
        if getattr(args, name) is not None:
            body[name] = None if getattr(args, name) == "none" else getattr(args, name)
    if not body:
        raise BadInput("nothing to change: give --soft, --hard-credits, --hard-usd, --block-overage, --notify-email "
                       "or --notify-webhook-url")
    try:
        limits = set_limits(runtime.current(), args.customer_id, body, by="cli")
    except LimitsRefused as refused:
        raise BadInput(str(refused)) from None
    print(json.dumps(limits), file=out)


def cmd_breaker(args, out: TextIO) -> None:
    meterline = runtime.current()
    if args.action == "status":
        answer = breaker_status(meterline, args.customer_id, events=20)
    else:
        answer = move_breaker(meterline, args.customer_id, args.action, f"cli:{args.by}", args.why)
    print(json.dumps(answer), file=out)


def cmd_overage_block(args, out: TextIO) -> None:
    engine = runtime.current().engine
    if args.state != "status":
        accounts.set_switch(engine, GLOBAL_OVERAGE_BLOCK, args.state == "on", by="cli")
    enabled = accounts.get_switch(engine, GLOBAL_OVERAGE_BLOCK)
    print(f"global overage block is {'on: no customer is billed past its included quota' if enabled else 'off'}",
          file=out)


def register(commands) -> None:
    limits = commands.add_parser("limits", help="a customer's limits").add_subparsers(dest="action", required=True)
    show = limits.add_parser("show", help="print a customer's limits as JSON")
    show.add_argument("customer_id", type=customer_id_arg)
    show.set_defaults(run=cmd_limits_show)
    set_limits_command = limits.add_parser("set", help="change a customer's limits (`none` clears one)")
    set_limits_command.add_argument("customer_id", type=customer_id_arg)
    set_limits_command.add_argument("--soft", default=None,
                                    help="soft thresholds in percent, e.g. 50,80,100 (or `default`)")
    set_limits_command.add_argument("--hard-credits", default=None, help="hard limit in credits (or `none`)")
    set_limits_command.add_argument("--hard-usd", default=None, help="hard limit in dollars of usage charges, e.g. 25.50")
    set_limits_command.add_argument("--block-overage", choices=("on", "off"), default=None)
    set_limits_command.add_argument("--notify-email", default=None)
    set_limits_command.add_argument("--notify-webhook-url", default=None)
    set_limits_command.set_defaults(run=cmd_limits_set)

    breaker_command = commands.add_parser("breaker", help="a customer's circuit breaker")
    breaker_command.add_argument("action", choices=("status", "trip", "reset"))
    breaker_command.add_argument("customer_id", type=customer_id_arg)
    breaker_command.add_argument("--why", default="", help="recorded in the audit log")
    breaker_command.add_argument("--by", default=os.environ.get("USER") or "operator",
                                 help="who is acting, for the audit log")
    breaker_command.set_defaults(run=cmd_breaker)

    overage = commands.add_parser("overage-block", help="the global overage kill switch")
    overage.add_argument("state", choices=("on", "off", "status"))
    overage.set_defaults(run=cmd_overage_block)
