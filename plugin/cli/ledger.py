"""`meterline ledger export`: every billed call, as JSON lines or CSV."""

from __future__ import annotations

import csv
import json
from typing import TextIO

from plugin import runtime
from plugin.cli.common import customer_id_arg
from plugin.ledger import store
from plugin.ledger.store import EXPORT_COLUMNS, export_row


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
