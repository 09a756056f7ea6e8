"""`meterline invoices list [--customer ID] [--json]` · `invoices approve in_…` · `invoices credit in_…
--usd X [--why TEXT]`: the invoices meterline saw finalized, and the operator's two moves on a draft
the spike guard flagged (plugin/services/invoices.py; the API's `/invoices` routes do the same)."""

from __future__ import annotations

import argparse
import json
import re
from fractions import Fraction
from typing import TextIO

from plugin import runtime
from plugin.cli.common import BadInput, customer_id_arg
from plugin.rules.invoices import dollars
from plugin.services import invoices as invoice_service


def invoice_id_arg(value: str) -> str:
    if not re.fullmatch(r"in_[A-Za-z0-9_]{1,250}", value):
        raise argparse.ArgumentTypeError(f"invalid invoice id {value!r} (expected in_...)")
    return value


def usd_arg(value: str) -> Fraction:
    if not re.fullmatch(r"\d{1,9}(\.\d{1,2})?", value):
        raise argparse.ArgumentTypeError(f"expected dollars and cents, e.g. 12.50, got {value!r}")
    return Fraction(value)


def cmd_list(args, out: TextIO) -> None:
    found = invoice_service.invoice_rows(runtime.current(), args.customer)
    if args.json:
        print(json.dumps({"invoices": found}), file=out)
        return
    if not found:
        print("no finalized invoice recorded yet (they arrive with Stripe's invoice.finalized webhook)", file=out)
    for invoice in found:
        print(f"{invoice['id']:<32} {invoice['customer_id'] or invoice['stripe_customer_id']:<24} "
              f"{invoice['period_start'][:10]} .. {invoice['period_end'][:10]}  {invoice['status']:<6} "
              f"{dollars(invoice['total_cents']):>12} {invoice['currency']}  ledger "
              f"{'—' if invoice['ledger_cents'] is None else dollars(invoice['ledger_cents'])}"
              f"{'  HELD' if invoice['held'] else ''}", file=out)


def cmd_approve(args, out: TextIO) -> None:
    try:
        invoice_service.approve(runtime.current(), args.invoice_id)
    except invoice_service.InvoiceRefused as refused:
        raise BadInput(f"meterline invoices approve: {refused}") from None
    print(f"{args.invoice_id} released: it finalizes on Stripe's schedule", file=out)


def cmd_credit(args, out: TextIO) -> None:
    try:
        item = invoice_service.credit(runtime.current(), args.invoice_id, args.usd, args.why)
    except invoice_service.InvoiceRefused as refused:
        raise BadInput(f"meterline invoices credit: {refused}") from None
    print(f"{dollars(-int(item['amount']))} credited on {args.invoice_id} ({item['id']})", file=out)


def register(commands) -> None:
    invoices = commands.add_parser("invoices", help="invoices at Stripe: list, approve a held draft, credit a draft")
    actions = invoices.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the invoices meterline saw finalized")
    listing.add_argument("--customer", type=customer_id_arg, default=None)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_list)
    approve = actions.add_parser("approve", help="release a draft the spike guard held")
    approve.add_argument("invoice_id", type=invoice_id_arg)
    approve.set_defaults(run=cmd_approve)
    credit = actions.add_parser("credit", help="a credit on that draft invoice only")
    credit.add_argument("invoice_id", type=invoice_id_arg)
    credit.add_argument("--usd", type=usd_arg, required=True)
    credit.add_argument("--why", default=None)
    credit.set_defaults(run=cmd_credit)
