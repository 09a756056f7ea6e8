"""`meterline stripe setup|subscribe` and `meterline stripe-emulator`."""

from __future__ import annotations

from typing import TextIO

from plugin import runtime
from plugin.cli.common import BadInput, customer_id_arg, positive_int
from plugin.ledger import store
from plugin.services.customers import new_stripe_customer
from plugin.stripe.setup import StripeSetup


def stripe_setup(meterline: runtime.Meterline, out: TextIO) -> StripeSetup:
    config = runtime.stripe_config(meterline.settings, meterline.config)  # ConfigError: exit 2, one line
    return StripeSetup(config.client(), meterline.config, report=lambda change: print(change.line(), file=out))


def cmd_stripe_setup(args, out: TextIO) -> None:
    changes = stripe_setup(runtime.current(), out).run()
    made = [change for change in changes if change.action != "exists"]
    print(f"{len(made)} object(s) created or replaced" if made else "nothing changed: Stripe already matches "
          "meterline.yaml", file=out)


def cmd_stripe_subscribe(args, out: TextIO) -> None:
    meterline = runtime.current()
    customer = store.get_customer(meterline.engine, args.customer_id)
    if customer is None:
        raise BadInput(f"unknown customer {args.customer_id!r}")
    setup = stripe_setup(meterline, out)
    plan_prices = setup.plan_prices(customer.plan)  # refuse before creating anything at Stripe
    stripe_id = customer.stripe_customer_id
    if stripe_id is None:
        stripe_id = new_stripe_customer(meterline.engine, setup, customer.id)
        print(f"customer {customer.id} created at Stripe as {stripe_id}", file=out)
    subscription, action = setup.subscribe(customer.plan, stripe_id, plan_prices)
    done = {"created": "created", "attached": "now carries the plan's prices", "exists": "already in place"}[action]
    print(f"subscription {subscription} {done} for {customer.id} on plan {customer.plan}", file=out)


def cmd_stripe_emulator(args, out: TextIO) -> None:
    from plugin.stripe.emulator.server import main as serve

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.webhook_url:
        argv += ["--webhook-url", args.webhook_url]
    if serve(argv) != 0:
        raise BadInput("meterline stripe-emulator: could not start (is the port free?)")


def register(commands) -> None:
    stripe_commands = commands.add_parser("stripe", help="the Stripe catalog").add_subparsers(
        dest="action", required=True)
    setup = stripe_commands.add_parser("setup", help="create (or find) the meter, product and prices")
    setup.set_defaults(run=cmd_stripe_setup)
    subscribe = stripe_commands.add_parser("subscribe", help="subscribe a customer to its plan's prices")
    subscribe.add_argument("customer_id", type=customer_id_arg)
    subscribe.set_defaults(run=cmd_stripe_subscribe)

    emulator = commands.add_parser("stripe-emulator", help="a local Stripe-compatible server (demo and tests)")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=positive_int, default=12111)
    emulator.add_argument("--webhook-url", default=None, help="deliver signed webhooks here "
                          "(secret: STRIPE_WEBHOOK_SECRET)")
    emulator.set_defaults(run=cmd_stripe_emulator)
