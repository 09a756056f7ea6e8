"""The `meterline` command. Exit 0 on success, 2 on bad input (one line on stderr), 1 on failure."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import UTC, datetime
from typing import TextIO

from sqlalchemy.exc import SQLAlchemyError

from plugin import runtime
from plugin.ledger import store
from plugin.ledger.models import LedgerEntry
from plugin.reports import UnknownCustomer, usage_report
from plugin.settings import ConfigError, valid_customer_id

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


# ------------------------------------------------------------------------------ commands


def cmd_customers_add(args, out: TextIO) -> None:
    meterline = runtime.current()
    if args.plan not in meterline.config.plans:
        raise BadInput(f"unknown plan {args.plan!r}; plans in meterline.yaml: {', '.join(sorted(meterline.config.plans))}")
    customer = store.add_customer(meterline.engine, args.customer_id, args.plan, args.stripe_customer)
    print(f"customer {customer.id} added on plan {customer.plan}", file=out)


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
    base = f"http://{args.host}:{args.port}"
    print(f"""
meterline demo: customer '{args.customer_id}' (plan {args.plan}), key saved in {args.key_file}

  curl {base}/v1/chat/completions \\
    -H "Authorization: Bearer {secret}" -H "Content-Type: application/json" \\
    -d '{{"model": "demo", "messages": [{{"role": "user", "content": "Hello"}}], "user": "alice"}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{base}/v1", api_key="{secret}"); \\
print(c.chat.completions.create(model="demo", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)'

  then: .venv/bin/meterline usage {args.customer_id}
""", file=out)


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from pathlib import Path

    parser = _Parser(prog="meterline", description="Usage-based billing inside the LiteLLM proxy.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    customers = commands.add_parser("customers", help="manage customers").add_subparsers(dest="action", required=True)
    add = customers.add_parser("add", help="add a customer")
    add.add_argument("customer_id", type=_customer_id)
    add.add_argument("--plan", required=True)
    add.add_argument("--stripe-customer", default=None)
    add.set_defaults(run=cmd_customers_add)
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

    ledger = commands.add_parser("ledger", help="the ledger").add_subparsers(dest="action", required=True)
    export = ledger.add_parser("export", help="export ledger rows")
    export.add_argument("--customer", type=_customer_id, default=None)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.set_defaults(run=cmd_ledger_export)

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
    except SQLAlchemyError as problem:  # the message may carry connection details: name the class only
        print(f"meterline: database error ({problem.__class__.__name__}); check METERLINE_DATABASE_URL "
              "and that the database is running", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
