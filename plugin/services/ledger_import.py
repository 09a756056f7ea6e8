"""Importing usage history into the ledger (`meterline ledger import`, DESIGN "Contract: migration and
pricing operations"): a file in the export's format, all of it or nothing.

One pass over the file, streamed in batches: each row is checked (plugin/rules/ledger_import.py) and its
id against the rows before it; good rows go to a temporary table of this connection's, which takes no
lock on the ledger. Then, in ONE transaction: the staged ids checked against the ledger, the rows loaded
into it and summed into the usage rollups, both by the database (plugin/ledger/store.py `load_staged`,
plugin/ledger/rollups.py `add_from`). On SQLite that transaction holds the write lock, which the proxy's
own writes wait for (up to their 30 s busy timeout): ~17 s per million rows on the benchmark machine
(bench/RESULTS.md), against ~50 s for the whole import. Bad rows stop nothing but the load: the whole
file is checked, so that every bad row is reported.

Imported rows are history: no outbox row (never sent to a sink), no alert, `history` set. Their dates lie
before each customer's current billing period, so the live counters, which are seeded from the ledger for
the current period, never count them against a limit.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Connection

from plugin.ledger import accounts, rollups, store
from plugin.rules.ledger_import import COLUMNS, MAX_REPORTED, format_of, parse_row
from plugin.rules.records import LedgerRow
from plugin.runtime import Meterline

BATCH = 10_000
"""Rows read, checked and staged at a time."""

Progress = Callable[[int, int], None]
"""Called after each batch with (bytes read, the file's size)."""


class ImportRefused(ValueError):
    """The file as a whole cannot be imported (unreadable, unknown format, a wrong header); one line for people."""


@dataclass(frozen=True)
class ImportResult:
    """What an import did, or on a dry run would do; with `bad_rows`, nothing was written."""

    rows: int
    """Good rows: imported, or importable."""
    customers: int
    credits_ucr: int
    first: datetime | None
    last: datetime | None
    bad_rows: int
    problems: list[str]
    """`line N: reason` for the first MAX_REPORTED bad rows, in file order."""
    imported: bool


@dataclass
class _Check:
    """The rows seen so far: the ids (with their line), the bad rows' problems, the good rows' totals."""

    period_starts: Mapping[str, datetime]
    seen: dict[str, int] = field(default_factory=dict)
    problems: list[tuple[int, str]] = field(default_factory=list)
    """The first MAX_REPORTED, in line order."""
    bad_rows: int = 0
    rows: int = 0
    customers: set[str] = field(default_factory=set)
    credits_ucr: int = 0
    first: datetime | None = None
    last: datetime | None = None

    def batch(self, records: list[tuple[int, Mapping[str, Any] | str]]) -> list[LedgerRow]:
        """The good rows of a batch of (line, values or what is wrong with the line); the bad ones noted."""
        good = []
        for line, values in records:
            if isinstance(values, str):
                self._bad(line, values)
                continue
            row = parse_row(values, self.period_starts)
            problems = [] if isinstance(row, LedgerRow) else [row]
            ledger_id = values.get("id")
            if type(ledger_id) is str and ledger_id:
                first_line = self.seen.setdefault(ledger_id, line)
                if first_line != line:
                    problems.append(f"id {ledger_id!r} is also on line {first_line}")
            if problems:
                self._bad(line, "; ".join(problems))
                continue
            good.append(row)
            self.rows += 1
            self.customers.add(row.customer_id)
            self.credits_ucr += row.credits_ucr
            if self.first is None or row.created_at < self.first:
                self.first = row.created_at
            if self.last is None or row.created_at > self.last:
                self.last = row.created_at
        return good

    def _bad(self, line: int, problem: str) -> None:
        self.bad_rows += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append((line, problem))

    def in_ledger(self, ids: list[str]) -> None:
        """Staged rows whose ids the ledger holds are bad rows too (found after the file was read)."""
        self.bad_rows += len(ids)
        found = sorted((self.seen[ledger_id], f"id {ledger_id!r} is already in the ledger") for ledger_id in ids)
        self.problems = sorted(self.problems + found[:MAX_REPORTED])[:MAX_REPORTED]

    def result(self, *, imported: bool) -> ImportResult:
        return ImportResult(rows=self.rows, customers=len(self.customers), credits_ucr=self.credits_ucr,
                            first=self.first, last=self.last, bad_rows=self.bad_rows,
                            problems=[f"line {line}: {problem}" for line, problem in self.problems],
                            imported=imported)


def import_ledger(meterline: Meterline, path: Path, now: datetime, *, file_format: str | None = None,
                  dry_run: bool = False, progress: Progress | None = None) -> ImportResult:
    """Import `path` (csv or jsonl; from its extension unless `file_format` says) as history, all or nothing;
    on a dry run check everything and write nothing. ImportRefused when the file as a whole is unusable."""
    file_format = file_format or format_of(path.name)
    if file_format not in ("csv", "jsonl"):
        raise ImportRefused(f"cannot tell the format of {path.name} from its extension (.csv or .jsonl): "
                            f"use --format csv|jsonl")
    engine = meterline.engine
    period_starts = {profile.customer_id: meterline.period(profile, now).start
                     for profile in map(accounts.profile_from, accounts.profile_rows(engine))}
    check = _Check(period_starts)
    try:
        raw = path.open("rb")
    except OSError as error:
        raise ImportRefused(f"cannot read {path}: {error.strerror or error}") from None
    with raw, engine.connect() as connection, store.staging(connection):
        size = os.fstat(raw.fileno()).st_size

        def read_so_far() -> None:
            if progress is not None:
                progress(raw.tell(), size)

        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        records = _csv_records(text) if file_format == "csv" else _jsonl_records(text)
        try:
            for batch in _batches(records, read_so_far):
                store.stage(connection, check.batch(batch))
        except UnicodeDecodeError:
            raise ImportRefused(f"{path.name} is not UTF-8 text") from None
        if dry_run or check.bad_rows:
            check.in_ledger(store.staged_in_ledger(connection))
            return check.result(imported=False)
        return check.result(imported=_load(connection, check))


def _load(connection: Connection, check: _Check) -> bool:
    """The staged rows into the ledger and the rollups, in one transaction, unless an id is in the ledger
    already (checked inside it: on SQLite, under the write lock, so none can land in between)."""
    connection.commit()  # the staged rows, on their own: the load is a transaction of its own
    with rollups.added_by_caller(connection):
        check.in_ledger(store.staged_in_ledger(connection))
        if check.bad_rows:
            return False  # rolled back by store.staging on the way out
        store.load_staged(connection)
        rollups.add_from(connection, store.STAGED)
    connection.commit()
    return True


def _batches(records: Iterator, after_each: Callable[[], Any]) -> Iterator[list]:
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == BATCH:
            yield batch
            after_each()
            batch = []
    if batch:
        yield batch
    after_each()


def _csv_records(text: TextIO) -> Iterator[tuple[int, Mapping[str, str] | str]]:
    """(line, values or what is wrong) per CSV record; the header is line 1, a record starts on the line after
    the previous one ended (values may hold line breaks). Blank lines are skipped."""
    reader = csv.reader(text, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise ImportRefused("the file is empty: expected a header line with the columns of "
                                "`meterline ledger export`")
        wrong = {"missing": [column for column in COLUMNS if column not in header],
                 "unknown": [repr(name) for name in header if name not in COLUMNS],
                 "named twice": sorted({name for name in header if header.count(name) > 1})}
        if any(wrong.values()):
            said = "; ".join(f"{what} {', '.join(names)}" for what, names in wrong.items() if names)
            raise ImportRefused(f"line 1: the header must name the columns of `meterline ledger export` "
                                f"({', '.join(COLUMNS)}): {said}")
        ended = reader.line_num
        for values in reader:
            line, ended = ended + 1, reader.line_num
            if not values:
                continue
            if len(values) != len(header):
                yield line, f"{len(values)} values, the header has {len(header)}"
            else:
                yield line, dict(zip(header, values, strict=True))
    except csv.Error as error:
        raise ImportRefused(f"line {reader.line_num}: not valid CSV ({error})") from None


def _jsonl_records(text: TextIO) -> Iterator[tuple[int, Mapping[str, Any] | str]]:
    """(line, values or what is wrong) per line holding a JSON object; blank lines are skipped."""
    for line, content in enumerate(text, start=1):
        if not content.strip():
            continue
        try:
            values = json.loads(content)
        except ValueError as error:
            yield line, f"not valid JSON ({error.msg if isinstance(error, json.JSONDecodeError) else error})"
            continue
        yield line, values if isinstance(values, dict) else "not a JSON object"
