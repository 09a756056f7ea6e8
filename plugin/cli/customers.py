"""`meterline customers add|set|list|set-stripe`."""

from __future__ import annotations

import json
from typing import TextIO

from plugin import runtime
from plugin.cli.common import (
    BadInput,
    customer_id_arg,
    decimal_arg,
    iso_moment,
    positive_int,
    stripe_customer_id_arg,
)
from plugin.ledger import accounts, store
from plugin.services.customers import UnknownPlan, add_customer, link_stripe
from plugin.settings import TermsOverride


def cmd_customers_add(args, out: TextIO) -> None:
    try:
        customer = add_customer(runtime.current(), args.customer_id, args.plan, args.stripe_customer)
    except UnknownPlan as unknown:
        raise BadInput(str(unknown)) from None
    print(f"customer {customer.id} added on plan {customer.plan}", file=out)


def cmd_customers_set(args, out: TextIO) -> None:
    """Change a customer's plan, period anchor or own terms (enterprise deals)."""
    meterline = runtime.current()
    if args.plan is not None and args.plan not in meterline.config.plans:
        raise BadInput(f"unknown plan {args.plan!r}; plans in meterline.yaml: {', '.join(sorted(meterline.config.plans))}")
    given = {"included_credits": args.included_credits, "cap_credits": args.cap_credits,
             "base_fee_usd": args.base_fee_usd, "overage_usd_per_credit": args.overage_usd_per_credit,
             "requests_per_minute": args.requests_per_minute}
    given = {name: value for name, value in given.items() if value is not None}
    try:
        terms = TermsOverride.model_validate(given) if given else None
    except ValueError as invalid:
        raise BadInput(f"invalid terms: {str(invalid).splitlines()[0]}") from None
    customer = accounts.set_terms(meterline.engine, args.customer_id, plan=args.plan, terms=terms,
                                  clear_terms=args.clear_terms, period_anchor=args.anchor)
    anchor = "calendar months" if customer.period_anchor is None else \
        f"monthly from {store.as_utc(customer.period_anchor).isoformat()}"
    print(f"customer {customer.id}: plan {customer.plan}, periods {anchor}, own terms {customer.terms or 'none'}",
          file=out)


def cmd_customers_list(args, out: TextIO) -> None:
    customers = store.list_customers(runtime.current().engine)
    if args.json:
        for customer in customers:
            print(json.dumps({
                "id": customer.id, "plan": customer.plan, "stripe_customer_id": customer.stripe_customer_id,
                "created_at": store.as_utc(customer.created_at).isoformat(),
            }), file=out)
        return
    for customer in customers:
        print(f"{customer.id}\t{customer.plan}\t{customer.stripe_customer_id or '-'}", file=out)


def cmd_customers_set_stripe(args, out: TextIO) -> None:
    released = link_stripe(runtime.current().engine, args.customer_id, args.stripe_customer)
    print(f"customer {args.customer_id} is {args.stripe_customer} at Stripe; "
          f"{released} held meter event(s) queued for delivery", file=out)


def register(commands) -> None:
    customers = commands.add_parser("customers", help="manage customers").add_subparsers(dest="action", required=True)
    add = customers.add_parser("add", help="add a customer")
    add.add_argument("customer_id", type=customer_id_arg)
    add.add_argument("--plan", required=True)
    add.add_argument("--stripe-customer", type=stripe_customer_id_arg, default=None)
    add.set_defaults(run=cmd_customers_add)
    set_stripe = customers.add_parser("set-stripe", help="record a customer's Stripe customer id")
    set_stripe.add_argument("customer_id", type=customer_id_arg)
    set_stripe.add_argument("stripe_customer", type=stripe_customer_id_arg)
    set_stripe.set_defaults(run=cmd_customers_set_stripe)
    change = customers.add_parser("set", help="change a customer's plan, period anchor or own terms")
    change.add_argument("customer_id", type=customer_id_arg)
    change.add_argument("--plan", default=None)
    change.add_argument("--anchor", type=iso_moment, default=None,
                        help="billing periods start monthly from here (its subscription's start)")
    change.add_argument("--included-credits", type=decimal_arg, default=None)
    change.add_argument("--cap-credits", type=decimal_arg, default=None)
    change.add_argument("--base-fee-usd", type=decimal_arg, default=None)
    change.add_argument("--overage-usd-per-credit", type=decimal_arg, default=None)
    change.add_argument("--requests-per-minute", type=positive_int, default=None)
    change.add_argument("--clear-terms", action="store_true", help="drop the customer's own terms first")
    change.set_defaults(run=cmd_customers_set)
    listing = customers.add_parser("list", help="list customers")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_customers_list)
