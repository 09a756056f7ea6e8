"""`meterline migrate grandfather ID [--json]` and `meterline migrate schedule ID --to-plan P [--flat-usd X]
[--json]`: moving one customer (plugin/services/plan_moves.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TextIO

from plugin import runtime
from plugin.cli.common import BadInput, customer_id_arg
from plugin.cli.invoices import usd_arg
from plugin.services import plan_moves
from plugin.services.usage import UnknownCustomer


def cmd_grandfather(args, out: TextIO) -> None:
    try:
        done = plan_moves.grandfather(runtime.current(), args.customer_id, datetime.now(UTC))
    except UnknownCustomer:
        raise BadInput(f"meterline migrate grandfather: unknown customer {args.customer_id!r}") from None
    except plan_moves.MoveRefused as refused:
        raise BadInput(f"meterline migrate grandfather: {refused}") from None
    if args.json:
        print(json.dumps(done), file=out)
        return
    since = done["grandfathered_at"][:10]
    print(f"{done['customer_id']} {'was already' if done['already'] else 'is now'} grandfathered on plan "
          f"{done['plan']} (since {since}): its calls are metered for visibility, never billed overage, "
          "never sent to Stripe", file=out)


def cmd_schedule(args, out: TextIO) -> None:
    try:
        done = plan_moves.schedule(runtime.current(), args.customer_id, args.to_plan, flat_usd=args.flat_usd)
    except UnknownCustomer:
        raise BadInput(f"meterline migrate schedule: unknown customer {args.customer_id!r}") from None
    except plan_moves.MoveRefused as refused:
        raise BadInput(f"meterline migrate schedule: {refused}") from None
    if args.json:
        print(json.dumps(done), file=out)
        return
    print(f"{done['customer_id']} moves from plan {done['from_plan']} to {done['to_plan']} at its renewal on "
          f"{done['effective_at'][:10]} (Stripe schedule {done['schedule_id']}); its first metered invoice is "
          f"capped at {done['safety_credit_pct']}% of the ${done['flat_usd']} a month it pays now", file=out)


def register_actions(actions) -> None:
    """Adds this module's actions to the `migrate` group (plugin/cli/migrate.py)."""
    grandfather = actions.add_parser("grandfather", help="keep a customer on its flat plan for good")
    grandfather.add_argument("customer_id", type=customer_id_arg)
    grandfather.add_argument("--json", action="store_true")
    grandfather.set_defaults(run=cmd_grandfather)
    schedule = actions.add_parser("schedule", help="move a customer to a metered plan at its next renewal")
    schedule.add_argument("customer_id", type=customer_id_arg)
    schedule.add_argument("--to-plan", required=True)
    schedule.add_argument("--flat-usd", type=usd_arg, default=None,
                          help="what it pays a month now (default: its plan's base fee)")
    schedule.add_argument("--json", action="store_true")
    schedule.set_defaults(run=cmd_schedule)
