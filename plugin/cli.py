"""The `meterline` command. Exit 0 on success, 2 on bad input (one line on stderr), 1 on failure."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import re
import signal
import sys
import time
from datetime import UTC, datetime
from fractions import Fraction
from typing import TextIO

import stripe
from sqlalchemy.exc import SQLAlchemyError

from plugin import runtime
from plugin.api.controls import LimitsRefused, breaker_json, limits_json, move_breaker, validated_limits
from plugin.counters.base import CounterError
from plugin.ledger import accounts, store
from plugin.ledger.accounts import GLOBAL_OVERAGE_BLOCK
from plugin.ledger.models import LedgerEntry
from plugin.outbox import store as outbox_store
from plugin.outbox.retry import Status
from plugin.reports import UnknownCustomer, usage_report
from plugin.plans import credits_to_ucr
from plugin.settings import ConfigError, TermsOverride, valid_customer_id
from plugin.sinks.stripe import StripeConfig
from plugin.stripe_setup import StripeSetup

EXPORT_COLUMNS = (
    "id", "customer_id", "member", "action", "model", "provider", "prompt_tokens", "completion_tokens",
    "cached_tokens", "credits_ucr", "provider_cost_uusd", "cache_hit", "saved_ucr", "stream", "created_at",
)


class BadInput(Exception):
    """The user asked for something invalid; the message is shown as is, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        raise BadInput(f"{self.prog}: {message}")


def _customer_id(value: str) -> str:
    if not valid_customer_id(value):
        raise argparse.ArgumentTypeError(
            f"invalid customer id {value!r} (letters, digits and _.@:- only, at most 64 characters)"
        )
    return value


def _stripe_customer_id(value: str) -> str:
    if not re.fullmatch(r"cus_[A-Za-z0-9]{1,250}", value):
        raise argparse.ArgumentTypeError(f"invalid Stripe customer id {value!r} (expected cus_...)")
    return value


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------ commands


def cmd_customers_add(args, out: TextIO) -> None:
    meterline = runtime.current()
    if args.plan not in meterline.config.plans:
        raise BadInput(f"unknown plan {args.plan!r}; plans in meterline.yaml: {', '.join(sorted(meterline.config.plans))}")
    customer = store.add_customer(meterline.engine, args.customer_id, args.plan, args.stripe_customer)
    print(f"customer {customer.id} added on plan {customer.plan}", file=out)


def _iso_moment(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO date and time, e.g. 2026-11-15T00:00:00Z, got {value!r}") \
            from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _decimal(value: str) -> str:
    if not re.fullmatch(r"\d{1,12}(\.\d{1,12})?", value):
        raise argparse.ArgumentTypeError(f"expected a non-negative decimal number, e.g. 0.0015, got {value!r}")
    return value


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


def _link_stripe(engine, customer_id: str, stripe_customer_id: str) -> int:
    """Record a customer's Stripe id and make its held meter events due; returns how many were held."""
    store.set_stripe_customer(engine, customer_id, stripe_customer_id)
    return outbox_store.release_held(engine, customer_id, datetime.now(UTC))


def _new_stripe_customer(engine, setup: StripeSetup, customer_id: str) -> str:
    """Create the customer at Stripe and link it; returns its Stripe id."""
    created = setup.client.v1.customers.create({"name": customer_id, "metadata": {"meterline_customer_id": customer_id}})
    _link_stripe(engine, customer_id, created.id)
    return created.id


def cmd_customers_set_stripe(args, out: TextIO) -> None:
    released = _link_stripe(runtime.current().engine, args.customer_id, args.stripe_customer)
    print(f"customer {args.customer_id} is {args.stripe_customer} at Stripe; "
          f"{released} held meter event(s) queued for delivery", file=out)


def cmd_keys_create(args, out: TextIO) -> None:
    key_id, secret = store.create_key(runtime.current().engine, args.customer_id)
    print(secret, file=out)
    print(f"key {key_id} created for {args.customer_id}; the key is shown only once", file=sys.stderr)


def cmd_keys_list(args, out: TextIO) -> None:
    for key in store.list_keys(runtime.current().engine, args.customer_id):
        state = "revoked" if key.revoked_at else "active"
        print(f"{key.id}\t{state}\t{store.as_utc(key.created_at).isoformat()}", file=out)


def cmd_keys_revoke(args, out: TextIO) -> None:
    store.revoke_key(runtime.current().engine, args.key_id)
    print(f"key {args.key_id} revoked", file=out)


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


def cmd_limits_show(args, out: TextIO) -> None:
    meterline = runtime.current()
    profile = accounts.load_profile(meterline.engine, args.customer_id)
    if profile is None:
        raise BadInput(f"unknown customer {args.customer_id!r}")
    print(json.dumps(limits_json(meterline, profile)), file=out)


def cmd_limits_set(args, out: TextIO) -> None:
    """The operator sets a customer's limits; the same validation as PUT /customers/{id}/limits."""
    body = {}
    if args.soft is not None:
        body["soft_thresholds_pct"] = None if args.soft == "default" else [
            int(part) if part.strip().isdigit() else part for part in args.soft.split(",")]
    if args.hard_credits is not None:
        body["hard_limit_ucr"] = None if args.hard_credits == "none" else credits_to_ucr(_credits(args.hard_credits))
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
    meterline = runtime.current()
    try:
        limits = validated_limits(meterline, args.customer_id, body)
    except LimitsRefused as refused:
        raise BadInput(str(refused)) from None
    accounts.put_limits(meterline.engine, args.customer_id, limits, by="cli")
    print(json.dumps(limits_json(meterline, accounts.load_profile(meterline.engine, args.customer_id))), file=out)


def _credits(value: str) -> Fraction:
    if not re.fullmatch(r"\d{1,12}(\.\d{1,6})?", value):
        raise BadInput(f"expected credits as a decimal number, e.g. 500 or 2.5, got {value!r}")
    return Fraction(value)


def cmd_breaker(args, out: TextIO) -> None:
    meterline = runtime.current()
    if args.action == "status":
        if store.get_customer(meterline.engine, args.customer_id) is None:
            raise BadInput(f"unknown customer {args.customer_id!r}")
        answer = breaker_json(args.customer_id, accounts.get_breaker(meterline.engine, args.customer_id),
                              accounts.breaker_events(meterline.engine, args.customer_id, limit=20))
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


def export_row(entry: LedgerEntry) -> dict:
    row = {column: getattr(entry, column) for column in EXPORT_COLUMNS}
    row["created_at"] = store.as_utc(entry.created_at).isoformat()
    return row


def cmd_ledger_export(args, out: TextIO) -> None:
    engine = runtime.current().engine
    rows = (export_row(entry) for entry in store.ledger_rows(engine, args.customer))
    if args.format == "jsonl":
        for row in rows:
            out.write(json.dumps(row) + "\n")
        return
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)


def _sink(meterline: runtime.Meterline):
    sink = meterline.sink()
    if sink is None:
        raise BadInput("no sink configured: set STRIPE_API_KEY (and METERLINE_STRIPE_API_BASE for a local server) "
                       "or METERLINE_SINK=openmeter with METERLINE_OPENMETER_URL")
    return sink


def cmd_relay(args, out: TextIO) -> None:
    """Deliver outbox events: drain what is due and exit (--once), or keep running until SIGINT/SIGTERM."""
    meterline = runtime.current()
    relay = meterline.relay(_sink(meterline))

    async def once():
        try:
            return await relay.drain()
        finally:
            await relay.sink.aclose()

    async def forever():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        print(f"relay {relay.worker} delivering to {relay.sink.name}; Ctrl-C to stop", file=sys.stderr)
        try:
            await relay.run(stop)
        finally:
            await relay.sink.aclose()

    if args.once:
        report = asyncio.run(once())
        print(f"relay {relay.worker}: {report.summary()}", file=out)
    else:
        asyncio.run(forever())


def _event_json(event) -> dict:
    def when(value):
        return None if value is None else store.as_utc(value).isoformat()

    return {
        "id": event.id, "customer_id": event.customer_id, "value_ucr": event.value_ucr, "status": event.status,
        "attempts": event.attempts, "occurred_at": when(event.occurred_at),
        "next_attempt_at": when(event.next_attempt_at), "first_attempt_at": when(event.first_attempt_at),
        "uncertain": bool(event.uncertain), "last_error": event.last_error,
    }


def cmd_outbox_list(args, out: TextIO) -> None:
    engine = runtime.current().engine
    events = outbox_store.list_events(engine, status=args.status, customer_id=args.customer, limit=args.limit)
    if args.json:
        for event in events:
            print(json.dumps(_event_json(event)), file=out)
        return
    stats = outbox_store.stats(engine)
    depth = ", ".join(f"{count} {status}" for status, count in stats.depth.items() if count) or "empty"
    print(f"outbox: {depth}; oldest waiting {stats.oldest_age_seconds(datetime.now(UTC)):.0f} s", file=out)
    for event in events:
        print(f"{event.id}\t{event.customer_id}\t{event.value_ucr}\t{event.status}\t{event.attempts}\t"
              f"{event.last_error or '-'}", file=out)


def cmd_outbox_retry(args, out: TextIO) -> None:
    if bool(args.ids) == args.all_dead:
        raise BadInput("meterline outbox retry: give event ids or --all-dead (not both)")
    count = outbox_store.requeue(runtime.current().engine, now=datetime.now(UTC), ids=args.ids,
                                 all_dead=args.all_dead, force=args.force)
    if args.ids and count < len(args.ids):
        print(f"{len(args.ids) - count} event(s) were not dead or held (unknown ones need --force: resending "
              "them may bill twice)", file=sys.stderr)
    print(f"{count} event(s) queued for delivery", file=out)


def _stripe_setup(meterline: runtime.Meterline, out: TextIO) -> StripeSetup:
    settings = meterline.settings
    if not settings.stripe_api_key:
        raise BadInput("STRIPE_API_KEY is not set (METERLINE_STRIPE_API_BASE points it at a local server)")
    config = StripeConfig(api_key=settings.stripe_api_key, api_base=settings.stripe_api_base,
                          meter_events_base=settings.stripe_meter_events_base)
    return StripeSetup(config.client(), meterline.config, report=lambda change: print(change.line(), file=out))


def cmd_stripe_setup(args, out: TextIO) -> None:
    changes = _stripe_setup(runtime.current(), out).run()
    made = [change for change in changes if change.action != "exists"]
    print(f"{len(made)} object(s) created or replaced" if made else "nothing changed: Stripe already matches "
          "meterline.yaml", file=out)


def cmd_stripe_subscribe(args, out: TextIO) -> None:
    meterline = runtime.current()
    customer = store.get_customer(meterline.engine, args.customer_id)
    if customer is None:
        raise BadInput(f"unknown customer {args.customer_id!r}")
    setup = _stripe_setup(meterline, out)
    plan_prices = setup.plan_prices(customer.plan)  # refuse before creating anything at Stripe
    stripe_id = customer.stripe_customer_id
    if stripe_id is None:
        stripe_id = _new_stripe_customer(meterline.engine, setup, customer.id)
        print(f"customer {customer.id} created at Stripe as {stripe_id}", file=out)
    subscription, action = setup.subscribe(customer.plan, stripe_id, plan_prices)
    done = {"created": "created", "attached": "now carries the plan's prices", "exists": "already in place"}[action]
    print(f"subscription {subscription} {done} for {customer.id} on plan {customer.plan}", file=out)


def cmd_stripe_emulator(args, out: TextIO) -> None:
    from plugin.stripe_emulator.server import main as serve

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.webhook_url:
        argv += ["--webhook-url", args.webhook_url]
    if serve(argv) != 0:
        raise BadInput("meterline stripe-emulator: could not start (is the port free?)")


def cmd_tui(args, out: TextIO) -> None:
    from tui.app import make_app

    make_app().run()


def cmd_demo(args, out: TextIO) -> None:
    """Create the demo customer and key if missing and print ready-to-paste snippets."""
    meterline = runtime.current()
    engine = meterline.engine
    if store.get_customer(engine, args.customer_id) is None:
        store.add_customer(engine, args.customer_id, args.plan)
    if args.key_file.exists():
        secret = args.key_file.read_text().strip()
    else:
        _, secret = store.create_key(engine, args.customer_id)
        args.key_file.write_text(secret + "\n")
        args.key_file.chmod(0o600)
    stripe_note = _demo_stripe(meterline, args.customer_id, out) if meterline.settings.stripe_api_key else ""
    base = f"http://{args.host}:{args.port}"
    print(f"""
meterline demo: customer '{args.customer_id}' (plan {args.plan}), key saved in {args.key_file}

  curl {base}/v1/chat/completions \\
    -H "Authorization: Bearer {secret}" -H "Content-Type: application/json" \\
    -d '{{"model": "demo", "messages": [{{"role": "user", "content": "Hello"}}], "user": "alice"}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{base}/v1", api_key="{secret}"); \\
print(c.chat.completions.create(model="demo", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)'

  then: .venv/bin/meterline usage {args.customer_id}

  set a spending limit (the customer's own key) and preview a request:
  curl -X PUT {base}/meterline/v1/limits -H "Authorization: Bearer {secret}" \\
    -H "Content-Type: application/json" -d '{{"hard_limit_ucr": 5000000, "soft_thresholds_pct": [50, 80]}}'
  curl {base}/meterline/v1/preview -H "Authorization: Bearer {secret}" -H "Content-Type: application/json" \\
    -d '{{"model": "demo", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 100}}'
{stripe_note}""", file=out)


def _demo_stripe(meterline: runtime.Meterline, customer_id: str, out: TextIO) -> str:
    """Set up the (local) Stripe for the demo: catalog, the demo customer, its subscription.

    The emulator keeps nothing between runs, so a Stripe customer id remembered from an earlier run
    may no longer exist there: the demo (only the demo) then creates a new one.
    """
    setup = _stripe_setup(meterline, io.StringIO())
    for attempt in range(50):  # the emulator may still be starting: wait up to ~10 s
        try:
            setup.run()
            break
        except stripe.APIConnectionError:
            if attempt == 49:
                raise
            time.sleep(0.2)
    customer = store.get_customer(meterline.engine, customer_id)
    stripe_id = customer.stripe_customer_id
    if stripe_id is not None:
        try:
            setup.client.v1.customers.retrieve(stripe_id)
        except stripe.InvalidRequestError:
            stripe_id = None
    if stripe_id is None:
        stripe_id = _new_stripe_customer(meterline.engine, setup, customer_id)
    setup.subscribe(customer.plan, stripe_id)
    base = meterline.settings.stripe_api_base or "https://api.stripe.com"
    return f"""
  meter events go to Stripe at {base} as {stripe_id}:
        .venv/bin/meterline outbox list          # what is waiting
        curl {base}/_emulator/meter_events       # what the local Stripe emulator received
"""


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from pathlib import Path

    parser = _Parser(prog="meterline", description="Usage-based billing inside the LiteLLM proxy.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    customers = commands.add_parser("customers", help="manage customers").add_subparsers(dest="action", required=True)
    add = customers.add_parser("add", help="add a customer")
    add.add_argument("customer_id", type=_customer_id)
    add.add_argument("--plan", required=True)
    add.add_argument("--stripe-customer", type=_stripe_customer_id, default=None)
    add.set_defaults(run=cmd_customers_add)
    set_stripe = customers.add_parser("set-stripe", help="record a customer's Stripe customer id")
    set_stripe.add_argument("customer_id", type=_customer_id)
    set_stripe.add_argument("stripe_customer", type=_stripe_customer_id)
    set_stripe.set_defaults(run=cmd_customers_set_stripe)
    change = customers.add_parser("set", help="change a customer's plan, period anchor or own terms")
    change.add_argument("customer_id", type=_customer_id)
    change.add_argument("--plan", default=None)
    change.add_argument("--anchor", type=_iso_moment, default=None,
                        help="billing periods start monthly from here (its subscription's start)")
    change.add_argument("--included-credits", type=_decimal, default=None)
    change.add_argument("--cap-credits", type=_decimal, default=None)
    change.add_argument("--base-fee-usd", type=_decimal, default=None)
    change.add_argument("--overage-usd-per-credit", type=_decimal, default=None)
    change.add_argument("--requests-per-minute", type=_positive_int, default=None)
    change.add_argument("--clear-terms", action="store_true", help="drop the customer's own terms first")
    change.set_defaults(run=cmd_customers_set)
    listing = customers.add_parser("list", help="list customers")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_customers_list)

    keys = commands.add_parser("keys", help="manage customer API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create a key (printed once)")
    create.add_argument("customer_id", type=_customer_id)
    create.set_defaults(run=cmd_keys_create)
    key_list = keys.add_parser("list", help="list a customer's keys")
    key_list.add_argument("customer_id", type=_customer_id)
    key_list.set_defaults(run=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=cmd_keys_revoke)

    usage = commands.add_parser("usage", help="a customer's usage this period")
    usage.add_argument("customer_id", type=_customer_id)
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(run=cmd_usage)

    limits = commands.add_parser("limits", help="a customer's limits").add_subparsers(dest="action", required=True)
    show = limits.add_parser("show", help="print a customer's limits as JSON")
    show.add_argument("customer_id", type=_customer_id)
    show.set_defaults(run=cmd_limits_show)
    set_limits = limits.add_parser("set", help="change a customer's limits (`none` clears one)")
    set_limits.add_argument("customer_id", type=_customer_id)
    set_limits.add_argument("--soft", default=None, help="soft thresholds in percent, e.g. 50,80,100 (or `default`)")
    set_limits.add_argument("--hard-credits", default=None, help="hard limit in credits (or `none`)")
    set_limits.add_argument("--hard-usd", default=None, help='hard limit in dollars of usage charges, e.g. 25.50')
    set_limits.add_argument("--block-overage", choices=("on", "off"), default=None)
    set_limits.add_argument("--notify-email", default=None)
    set_limits.add_argument("--notify-webhook-url", default=None)
    set_limits.set_defaults(run=cmd_limits_set)

    breaker_command = commands.add_parser("breaker", help="a customer's circuit breaker")
    breaker_command.add_argument("action", choices=("status", "trip", "reset"))
    breaker_command.add_argument("customer_id", type=_customer_id)
    breaker_command.add_argument("--why", default="", help="recorded in the audit log")
    breaker_command.add_argument("--by", default=os.environ.get("USER") or "operator",
                                 help="who is acting, for the audit log")
    breaker_command.set_defaults(run=cmd_breaker)

    overage = commands.add_parser("overage-block", help="the global overage kill switch")
    overage.add_argument("state", choices=("on", "off", "status"))
    overage.set_defaults(run=cmd_overage_block)

    ledger = commands.add_parser("ledger", help="the ledger").add_subparsers(dest="action", required=True)
    export = ledger.add_parser("export", help="export ledger rows")
    export.add_argument("--customer", type=_customer_id, default=None)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.set_defaults(run=cmd_ledger_export)

    relay = commands.add_parser("relay", help="deliver meter events to the sink (Stripe, OpenMeter)")
    relay.add_argument("--once", action="store_true", help="drain what is due now, then exit")
    relay.set_defaults(run=cmd_relay)

    outbox = commands.add_parser("outbox", help="meter events waiting for delivery").add_subparsers(
        dest="action", required=True)
    outbox_list = outbox.add_parser("list", help="undelivered events (or one status)")
    outbox_list.add_argument("--status", choices=[status.value for status in Status], default=None)
    outbox_list.add_argument("--customer", type=_customer_id, default=None)
    outbox_list.add_argument("--limit", type=_positive_int, default=100)
    outbox_list.add_argument("--json", action="store_true")
    outbox_list.set_defaults(run=cmd_outbox_list)
    retry = outbox.add_parser("retry", help="re-queue dead (or held) events")
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all-dead", action="store_true")
    retry.add_argument("--force", action="store_true", help="also re-queue `unknown` events (may bill twice)")
    retry.set_defaults(run=cmd_outbox_retry)

    stripe_commands = commands.add_parser("stripe", help="the Stripe catalog").add_subparsers(
        dest="action", required=True)
    setup = stripe_commands.add_parser("setup", help="create (or find) the meter, product and prices")
    setup.set_defaults(run=cmd_stripe_setup)
    subscribe = stripe_commands.add_parser("subscribe", help="subscribe a customer to its plan's prices")
    subscribe.add_argument("customer_id", type=_customer_id)
    subscribe.set_defaults(run=cmd_stripe_subscribe)

    emulator = commands.add_parser("stripe-emulator", help="a local Stripe-compatible server (demo and tests)")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=_positive_int, default=12111)
    emulator.add_argument("--webhook-url", default=None, help="deliver signed webhooks here "
                          "(secret: STRIPE_WEBHOOK_SECRET)")
    emulator.set_defaults(run=cmd_stripe_emulator)

    tui = commands.add_parser("tui", help="the operator console")
    tui.set_defaults(run=cmd_tui)

    demo = commands.add_parser("demo", help="create the demo customer and key, print snippets")
    demo.add_argument("--customer-id", type=_customer_id, default="demo-customer")
    demo.add_argument("--plan", default="pro")
    demo.add_argument("--key-file", type=Path, default=Path(".meterline-demo-key"))
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=4000)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
        args.run(args, out)
    except (BadInput, ConfigError, store.StoreError) as problem:
        print(str(problem).splitlines()[0], file=sys.stderr)
        return 2
    except CounterError as problem:  # the message names the backend and the error class, no addresses
        print(f"meterline: spending counters unreachable ({problem}); check METERLINE_REDIS_URL", file=sys.stderr)
        return 1
    except stripe.StripeError as problem:  # Stripe masks keys in its messages; keep one line
        print(f"meterline: Stripe refused: {' '.join(str(problem.user_message or problem).split())[:300]}",
              file=sys.stderr)
        return 1
    except SQLAlchemyError as problem:  # the message may carry connection details: name the class only
        print(f"meterline: database error ({problem.__class__.__name__}); check METERLINE_DATABASE_URL "
              "and that the database is running", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
