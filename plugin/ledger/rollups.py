"""The usage rollups (tables `usage_hours`, `usage_days`): written in the ledger's own transaction,
backfilled from the ledger for databases that predate them, and read by plugin/services/usage.py.

Who writes them: on SQLite, a trigger on the ledger (plugin/ledger/sql/rollups_sqlite.sql), in
the ledger row's own statement: no Python per row on the billing path, and SQLite's single writer
makes the upserts' order harmless. On Postgres, `add_on`, which upserts the keys of a whole batch
in sorted order: row-by-row triggers would lock rollup rows in ledger-row order, and two proxies
writing the same customers could deadlock. A bulk load (`meterline ledger import`) sums its rows in
SQL instead, once per rollup row (`add_from`, with SQLite's trigger off: `added_by_caller`).

A usage read then costs the same for a customer with ten rows as for one with ten million: it
sums at most a period's days (and hours), never the customer's raw rows, except for the partial
first and last hour or day of a window that does not start on a whole one (an anchored period).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib.resources import files

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Select,
    Table,
    case,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from plugin.ledger.models import LedgerEntry, Switch, UsageDay, UsageHour, utcnow
from plugin.ledger.prepared import Prepared
from plugin.rules.records import LedgerRow
from plugin.rules.rollups import (
    DAY,
    DIMENSIONS,
    HOUR,
    NOTHING,
    Tally,
    fold,
    split,
    start_of,
    unit_of,
)

_HOURS = UsageHour.__table__
_DAYS = UsageDay.__table__
_LEDGER = LedgerEntry.__table__
_SUMS = ("credits_ucr", "requests", "saved_ucr")

BACKFILLED = "rollups_backfilled"
"""The row in `switches` that says the rollups hold every ledger row (set by `backfill`)."""


def _adding(table, keys: tuple[str, ...]) -> Prepared:
    """INSERT, or add to the row that is there (Postgres): one statement per rollup row."""
    statement = pg_insert(table)
    statement = statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={name: table.c[name] + statement.excluded[name] for name in _SUMS},
    )
    return Prepared(statement, columns=(*keys, *_SUMS))


_ADD_HOURS = _adding(_HOURS, ("customer_id", "hour"))
_ADD_DAYS = _adding(_DAYS, ("customer_id", "day", "dimension", "name"))
_SQLITE_TRIGGER = (files("plugin.ledger") / "sql" / "rollups_sqlite.sql").read_text()
_SQLITE_TRIGGER_NAME = "meterline_ledger_rollups"
"""As rollups_sqlite.sql names it."""


def install(engine: Engine) -> None:
    """SQLite: create the ledger's rollup trigger where missing (every start-up, before the backfill)."""
    if engine.dialect.name == "sqlite":
        with engine.begin() as connection:
            connection.exec_driver_sql(_SQLITE_TRIGGER)


def add_on(connection: Connection, entries: Iterable[LedgerRow]) -> None:
    """Add new ledger rows to the rollups, in the caller's (the ledger's) transaction: Postgres. On
    SQLite the trigger has done it with each row's insert."""
    if connection.dialect.name == "sqlite":
        return
    hours, days = fold(entries)
    if not hours:
        return
    _ADD_HOURS.many(connection, [  # sorted: every transaction locks rollup rows in the same order
        {"customer_id": customer, "hour": hour, "credits_ucr": tally.credits_ucr, "requests": tally.requests,
         "saved_ucr": tally.saved_ucr} for (customer, hour), tally in sorted(hours.items())])
    _ADD_DAYS.many(connection, [
        {"customer_id": customer, "day": day, "dimension": dimension, "name": name,
         "credits_ucr": tally.credits_ucr, "requests": tally.requests, "saved_ucr": tally.saved_ucr}
        for (customer, day, dimension, name), tally in sorted(days.items())])


def add_from(connection: Connection, source: Table) -> None:
    """Add every row of `source` (a table with the ledger's columns: rows just loaded into the ledger) to
    the rollups, in the caller's transaction: summed by the database as the backfill sums the ledger, one
    upsert per rollup row."""
    dialect = connection.dialect.name
    insert_into = pg_insert if dialect == "postgresql" else sqlite_insert
    for table, keys, query in _sums_by_key(source, dialect):  # WHERE: SQLite's upsert after a SELECT wants one
        statement = insert_into(table).from_select([*keys, *_SUMS], query.where(true()))
        statement = statement.on_conflict_do_update(
            index_elements=list(keys), set_={name: table.c[name] + statement.excluded[name] for name in _SUMS})
        connection.execute(statement)


def _sums_by_key(source: Table, dialect: str) -> list[tuple[Table, tuple[str, ...], Select]]:
    """(rollup table, its key, the SELECT summing `source`'s rows into its rows): per customer and hour, and
    per customer, day, dimension and name."""
    hour = time_units(source.c.created_at, HOUR, dialect).label("hour")
    day = time_units(source.c.created_at, DAY, dialect).label("day")
    customer = source.c.customer_id
    sums = (func.sum(source.c.credits_ucr), func.count(), func.sum(source.c.saved_ucr))
    found = [(_HOURS, ("customer_id", "hour"), select(customer, hour, *sums).group_by(customer, hour))]
    for dimension in DIMENSIONS:
        name = source.c[dimension]
        found.append((_DAYS, ("customer_id", "day", "dimension", "name"),
                      select(customer, day, literal(dimension), name, *sums).group_by(customer, day, name)))
    return found


@contextmanager
def added_by_caller(connection: Connection) -> Iterator[None]:
    """Ledger rows inserted inside leave the rollups to the caller, who adds them (`add_from`) before
    leaving: a bulk load (`meterline ledger import`) then writes each rollup row once, not four statements
    per ledger row (SQLite's trigger: ~90 s for a million rows).

    SQLite: the trigger is dropped inside the caller's transaction and created again on the way out. DDL
    is transactional there: other connections never see the ledger without it, and a rollback restores
    it, so leaving by an exception (which must roll the transaction back) leaves it alone. The transaction
    is begun here, holding the write lock, when it has not begun yet: pysqlite would run the DROP outside
    any transaction, committed at once."""
    if connection.dialect.name != "sqlite":
        yield
        return
    if not connection.connection.dbapi_connection.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {_SQLITE_TRIGGER_NAME}")
    yield
    connection.exec_driver_sql(_SQLITE_TRIGGER)


def time_units(column, seconds: int, dialect: str):
    """SQL: whole units since the epoch of a timestamp column (SQLite stores text, Postgres timestamptz)."""
    if dialect == "sqlite":  # whole seconds only: strftime rounds a fraction (10:59:59.9999 -> 11:00)
        return func.cast(func.strftime("%s", func.substr(column, 1, 19)), BigInteger()) // seconds
    return func.cast(func.floor(func.extract("epoch", column) / seconds), BigInteger())


def backfill(engine: Engine) -> bool:
    """Rebuild the rollups from the ledger once, for a database that predates them; True if it ran.

    One transaction, holding the write lock (SQLite) or an advisory lock (Postgres), re-checked
    inside it: processes starting together backfill once. Until it commits, the ledger writes of
    other processes wait, so no row is counted twice or missed."""
    if _backfilled(engine):  # every start-up after the first: no lock taken
        return False
    with engine.begin() as connection:
        dialect = connection.dialect.name
        if dialect == "sqlite":  # pysqlite has begun nothing yet: take the write lock first
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('meterline_rollups_backfill'))"))
        if connection.execute(select(Switch.enabled).where(Switch.name == BACKFILLED)).scalar():
            return False
        connection.execute(delete(_HOURS))
        connection.execute(delete(_DAYS))
        for table, keys, query in _sums_by_key(_LEDGER, dialect):
            connection.execute(insert(table).from_select([*keys, *_SUMS], query))
        connection.execute(insert(Switch.__table__).values(name=BACKFILLED, enabled=True, updated_at=utcnow(),
                                                          updated_by="meterline"))
        return True


def _backfilled(engine: Engine) -> bool:
    with engine.connect() as connection:
        return bool(connection.execute(select(Switch.enabled).where(Switch.name == BACKFILLED)).scalar())


def forget_backfill(engine: Engine) -> None:
    """Make the next start-up rebuild the rollups (tests; and an operator after editing the ledger by hand)."""
    with engine.begin() as connection:
        connection.execute(delete(Switch.__table__).where(Switch.name == BACKFILLED))



# ------------------------------------------------------------------------------ reads


@dataclass
class Breakdown:
    """A customer's usage over a window: in total, by day, and by model, action and member."""

    total: Tally = NOTHING
    daily: dict[int, Tally] = field(default_factory=dict)
    """Days since the epoch -> usage that day (within the window)."""
    by: dict[str, dict[str, Tally]] = field(default_factory=lambda: {dimension: {} for dimension in DIMENSIONS})

    def add(self, day: int, names: dict[str, str], tally: Tally) -> None:
        self.total += tally
        self.daily[day] = self.daily.get(day, NOTHING) + tally
        for dimension, name in names.items():
            found = self.by[dimension]
            found[name] = found.get(name, NOTHING) + tally


def _sums(table) -> tuple:
    """SUMs of credits, requests and saved µcr: a rollup's columns, or the ledger's rows (one request each)."""
    requests = func.count() if table is _LEDGER else func.sum(table.c.requests)
    return func.sum(table.c.credits_ucr), requests, func.sum(table.c.saved_ucr)


def _tally(row) -> Tally:
    return Tally(int(row[0] or 0), int(row[1] or 0), int(row[2] or 0))


def breakdown(engine: Engine, customer_id: str, start: datetime, end: datetime) -> Breakdown:
    """Usage in [start, end): whole UTC days from the daily rollup (summed by the database), partial
    first and last days from the ledger. Equal, row for row, to summing the ledger over the window."""
    window = split(start, end, DAY)
    found = Breakdown()
    with engine.connect() as connection:
        if window.stop > window.first:
            days = (_DAYS.c.customer_id == customer_id, _DAYS.c.day >= window.first, _DAYS.c.day < window.stop)
            for row in connection.execute(select(_DAYS.c.day, *_sums(_DAYS)).where(
                    *days, _DAYS.c.dimension == DIMENSIONS[0]).group_by(_DAYS.c.day)):
                tally = _tally(row[1:])
                found.total += tally
                found.daily[int(row[0])] = tally
            for row in connection.execute(select(_DAYS.c.dimension, _DAYS.c.name, *_sums(_DAYS)).where(*days)
                                          .group_by(_DAYS.c.dimension, _DAYS.c.name)):
                found.by[row[0]][row[1]] = _tally(row[2:])
        for edge_start, edge_end in window.edges:
            columns = [_LEDGER.c[dimension] for dimension in DIMENSIONS]
            query = select(*columns, *_sums(_LEDGER)).where(
                _LEDGER.c.customer_id == customer_id, _LEDGER.c.created_at >= edge_start,
                _LEDGER.c.created_at < edge_end).group_by(*columns)
            day = unit_of(edge_start, DAY)
            for row in connection.execute(query):
                found.add(day, dict(zip(DIMENSIONS, row[:3], strict=True)), _tally(row[3:]))
    return found


def billed_between(engine: Engine, customer_id: str, start: datetime, end: datetime | None = None) -> int:
    """µcr billed to a customer in [start, end) (end None: from `start` on): whole hours from the hourly
    rollup, a partial first or last hour from the ledger. The breaker's baseline (a week) and the Redis
    counters' seed (a period) then cost the same for a customer with a million rows as for one with ten."""
    if end is None:  # whole hours from the first one that starts at or after `start`; a partial one before it
        first = unit_of(start, HOUR) + (start_of(unit_of(start, HOUR), HOUR) < start)
        stop, edges = None, [(start, start_of(first, HOUR))] if start_of(first, HOUR) > start else []
    else:
        window = split(start, end, HOUR)
        first, stop, edges = window.first, window.stop, window.edges
    hours = select(func.coalesce(func.sum(_HOURS.c.credits_ucr), 0)).where(
        _HOURS.c.customer_id == customer_id, _HOURS.c.hour >= first)
    if stop is not None:
        hours = hours.where(_HOURS.c.hour < stop)
    with engine.connect() as connection:
        total = int(connection.execute(hours).scalar_one())
        for edge_start, edge_end in edges:
            total += int(connection.execute(select(func.coalesce(func.sum(_LEDGER.c.credits_ucr), 0)).where(
                _LEDGER.c.customer_id == customer_id, _LEDGER.c.created_at >= edge_start,
                _LEDGER.c.created_at < edge_end)).scalar_one())
    return total


def hourly(engine: Engine, customer_id: str, first_hour: int, stop_hour: int) -> dict[int, Tally]:
    """A customer's usage per clock hour in [first_hour, stop_hour) (hours since the epoch); absent = none."""
    query = select(_HOURS.c.hour, _HOURS.c.credits_ucr, _HOURS.c.requests, _HOURS.c.saved_ucr).where(
        _HOURS.c.customer_id == customer_id, _HOURS.c.hour >= first_hour, _HOURS.c.hour < stop_hour)
    with engine.connect() as connection:
        return {int(row[0]): _tally(row[1:]) for row in connection.execute(query)}


def credits_by_hour(engine: Engine, first_hour: int, stop_hour: int | None = None) -> dict[str, dict[int, int]]:
    """Every customer's µcr per clock hour from `first_hour` (to `stop_hour`): customer -> hour -> µcr."""
    query = select(_HOURS.c.customer_id, _HOURS.c.hour, _HOURS.c.credits_ucr).where(_HOURS.c.hour >= first_hour)
    if stop_hour is not None:
        query = query.where(_HOURS.c.hour < stop_hour)
    found: dict[str, dict[int, int]] = {}
    with engine.connect() as connection:
        for customer, hour, credits in connection.execute(query):
            found.setdefault(customer, {})[hour] = credits
    return found


def credits_by_day(engine: Engine, first_day: int, stop_day: int) -> dict[str, dict[int, int]]:
    """Every customer's µcr per UTC day in [first_day, stop_day): customer -> day -> µcr."""
    query = (select(_DAYS.c.customer_id, _DAYS.c.day, func.sum(_DAYS.c.credits_ucr))
             .where(_DAYS.c.dimension == DIMENSIONS[0], _DAYS.c.day >= first_day, _DAYS.c.day < stop_day)
             .group_by(_DAYS.c.customer_id, _DAYS.c.day))
    found: dict[str, dict[int, int]] = {}
    with engine.connect() as connection:
        for customer, day, credits in connection.execute(query):
            found.setdefault(customer, {})[day] = int(credits)
    return found


def models_by_customer(engine: Engine, first_day: int, stop_day: int) -> dict[str, set[str]]:
    """The models each customer called in [first_day, stop_day) (UTC days since the epoch), from the daily
    rollup: whose bills a price change of a model reaches."""
    query = (select(_DAYS.c.customer_id, _DAYS.c.name).distinct()
             .where(_DAYS.c.dimension == "model", _DAYS.c.day >= first_day, _DAYS.c.day < stop_day))
    found: dict[str, set[str]] = {}
    with engine.connect() as connection:
        for customer, model in connection.execute(query):
            found.setdefault(customer, set()).add(model)
    return found


def credits_and_cost(engine: Engine, start: datetime, middle: datetime,
                     end: datetime) -> list[tuple[str, str, bool, int, int]]:
    """(customer, model, in [middle, end) rather than [start, middle), µcr, provider µUSD) summed by the
    database from the ledger's rows (the rollups keep no provider cost): the margin review's two windows
    in one scan. Grouped by model first so SQLite scans the table in order instead of walking the
    (customer, created_at) index and fetching every row at random (2.5x slower). bench/pricing_review.py:
    a million rows in 4-4.5 s on SQLite on a busy 2-core machine, most of it SQLite's GROUP BY sort."""
    later = case((_LEDGER.c.created_at >= middle, 1), else_=0).label("later")
    query = (select(_LEDGER.c.model, _LEDGER.c.customer_id, later, func.sum(_LEDGER.c.credits_ucr),
                    func.sum(_LEDGER.c.provider_cost_uusd))
             .where(_LEDGER.c.created_at >= start, _LEDGER.c.created_at < end)
             .group_by(_LEDGER.c.model, _LEDGER.c.customer_id, later))
    with engine.connect() as connection:
        return [(customer, model, bool(flag), int(credits or 0), int(cost or 0))
                for model, customer, flag, credits, cost in connection.execute(query)]
