"""`meterline ledger export`: every billed call, as JSON lines or CSV; `meterline ledger import`: such a
file back in as history (plugin/services/ledger_import.py)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import TextIO

from plugin import runtime
from plugin.cli.common import BadInput, customer_id_arg
from plugin.ledger import store
from plugin.ledger.store import EXPORT_COLUMNS, export_row
from plugin.rules.ledger_import import refusal_lines
from plugin.rules.policy import credits_grouped
from plugin.services.ledger_import import ImportRefused, ImportResult, import_ledger

LARGE_FILE_BYTES = 8 * 1024 * 1024
"""From this size on (~50,000 rows) an import run at a terminal shows a progress bar."""


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


class _ProgressBar:
    """A rich progress bar on stderr (stdout keeps the summary alone), started once the file turns out large."""

    def __init__(self) -> None:
        self._bar = None
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            if total < LARGE_FILE_BYTES:
                return
            from rich.console import Console  # only for a large import at a terminal
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("importing", total=total)
        self._bar.update(self._task, completed=done)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def import_summary(result: ImportResult, *, dry_run: bool) -> str:
    what = (f"{_plural(result.rows, 'row')} of {_plural(result.customers, 'customer')}, "
            f"{credits_grouped(result.credits_ucr)} credits")
    if result.rows:
        what += f", from {result.first.isoformat()} to {result.last.isoformat()}"
    if dry_run:
        return f"dry run: would import {what}; nothing written"
    return f"imported {what} as history (never sent to a sink)"


def cmd_ledger_import(args, out: TextIO) -> None:
    meterline = runtime.current()
    bar = _ProgressBar() if sys.stderr.isatty() else None
    try:
        result = import_ledger(meterline, Path(args.file), meterline.clock(), file_format=args.format,
                               dry_run=args.dry_run, progress=bar)
    except ImportRefused as problem:
        raise BadInput(f"meterline ledger import: {problem}") from None
    finally:
        if bar is not None:
            bar.stop()
    if result.bad_rows:  # one line per bad row: all but the last here, the last as the refusal main() prints
        *lines, last = refusal_lines(result.problems, result.bad_rows)
        for line in lines:
            print(line, file=sys.stderr)
        raise BadInput(last)
    print(import_summary(result, dry_run=args.dry_run), file=out)


def register(commands) -> None:
    ledger = commands.add_parser("ledger", help="the ledger").add_subparsers(dest="action", required=True)
    export = ledger.add_parser("export", help="export ledger rows")
    export.add_argument("--customer", type=customer_id_arg, default=None)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.set_defaults(run=cmd_ledger_export)
    load = ledger.add_parser("import", help="import ledger rows from before meterline, as history (all or nothing)")
    load.add_argument("file", help="a file as `meterline ledger export` writes it")
    load.add_argument("--format", choices=("csv", "jsonl"), default=None, help="default: from the file's extension")
    load.add_argument("--dry-run", action="store_true", help="check every row and say what would be imported")
    load.set_defaults(run=cmd_ledger_import)
