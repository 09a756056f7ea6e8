"""`meterline ledger export`: every billed call, as JSON lines or CSV."""

from __future__ import annotations

import csv
import json
from typing import TextIO

from plugin import runtime
from plugin.cli.common import customer_id_arg
from plugin.ledger import store
from plugin.ledger.models import LedgerEntry

EXPORT_COLUMNS = (
    "id", "customer_id", "member", "action", "model", "provider", "prompt_tokens", "completion_tokens",
    "cached_tokens", "credits_ucr", "provider_cost_uusd", "cache_hit", "saved_ucr", "stream", "created_at",
)


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


def register(commands) -> None:
    ledger = commands.add_parser("ledger", help="the ledger").add_subparsers(dest="action", required=True)
    export = ledger.add_parser("export", help="export ledger rows")
    export.add_argument("--customer", type=customer_id_arg, default=None)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.set_defaults(run=cmd_ledger_export)
