"""The usage rollups (tables `usage_hours`, `usage_days`): written in the ledger's own transaction,
backfilled from the ledger for databases that predate them, and read by plugin/services/usage.py.

Who writes them: on SQLite, a trigger on the ledger (plugin/ledger/sql/rollups_sqlite.sql), in
the ledger row's own statement: no Python per row on the billing path, and SQLite's single writer
makes the upserts' order harmless. On Postgres, `add_on`, which upserts the keys of a whole batch
in sorted order: row-by-row triggers would lock rollup rows in ledger-row order, and two proxies
writing the same customers could deadlock.

A usage read then costs the same for a customer with ten rows as for one with ten million: it
sums at most a period's days (and hours), never the customer's raw rows, except for the partial
first and last hour or day of a window that does not start on a whole one (an anchored period).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from importlib.resources import files

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    delete,
    func,
    insert,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

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
        hour = time_units(_LEDGER.c.created_at, HOUR, dialect).label("hour")
        connection.execute(insert(_HOURS).from_select(
            ["customer_id", "hour", *_SUMS],
            select(_LEDGER.c.customer_id, hour, func.sum(_LEDGER.c.credits_ucr), func.count(),
                   func.sum(_LEDGER.c.saved_ucr)).group_by(_LEDGER.c.customer_id, hour)))
        day = time_units(_LEDGER.c.created_at, DAY, dialect).label("day")
        for dimension in DIMENSIONS:
            name = _LEDGER.c[dimension]
            connection.execute(insert(_DAYS).from_select(
                ["customer_id", "day", "dimension", "name", *_SUMS],
                select(_LEDGER.c.customer_id, day, literal(dimension), name, func.sum(_LEDGER.c.credits_ucr),
                       func.count(), func.sum(_LEDGER.c.saved_ucr)).group_by(_LEDGER.c.customer_id, day, name)))
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
