"""The ledger database: engine set-up and every query meterline runs against it.

SQLite (WAL) by default, Postgres when METERLINE_DATABASE_URL says so; same code for both.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    Table,
    bindparam,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateColumn
from sqlmodel import Session, SQLModel, create_engine

from plugin.ledger import revisions, rollups
from plugin.ledger.models import (
    Alert,
    ApiKey,
    Customer,
    LedgerEntry,
    OutboxEvent,
    utcnow,
)
from plugin.ledger.prepared import Prepared
from plugin.rules.ledger_import import COLUMNS as EXPORT_COLUMNS
from plugin.rules.records import BillingRecord, LedgerRow


class StoreError(Exception):
    """A request the store refuses (duplicate, unknown customer, ...); the message is for humans."""


def make_engine(url: str) -> Engine:
    """Create the engine and the tables (and the usage rollups, from the ledger, for a database that
    predates them). SQLite gets WAL, a busy timeout and NORMAL sync.

    WAL + synchronous=NORMAL survives a killed process (the WAL is in the OS cache); it trades
    only power-loss durability of the last transactions, which a proxy host rarely needs.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    SQLModel.metadata.create_all(engine)
    _add_missing_columns(engine)
    revisions.install(engine)
    rollups.install(engine)
    rollups.backfill(engine)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Give tables created by an earlier meterline the columns added since (additive changes only).

    create_all() makes missing tables but never alters existing ones; without this an upgrade
    would fail on the first query. New columns are nullable or carry a server default.
    """
    inspector = inspect(engine)
    for table in SQLModel.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing = [column for column in table.columns if column.name not in present]
        if not missing:
            continue
        with engine.begin() as connection:
            for column in missing:
                definition = CreateColumn(column).compile(dialect=engine.dialect)
                connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {definition}"))


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything meterline stores is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def hash_key(secret: str) -> str:
    """Keys are 256-bit random strings, so a plain SHA-256 is a safe, fast lookup hash."""
    return hashlib.sha256(secret.encode()).hexdigest()


KEY_PREFIX = "mk_"


# ---------------------------------------------------------------- customers and keys


def add_customer(engine: Engine, customer_id: str, plan: str, stripe_customer_id: str | None = None) -> Customer:
    with Session(engine) as session:
        if session.get(Customer, customer_id) is not None:
            raise StoreError(f"customer {customer_id!r} already exists")
        customer = Customer(id=customer_id, plan=plan, stripe_customer_id=stripe_customer_id)
        session.add(customer)
        try:
            session.commit()
        except IntegrityError:
            raise StoreError(f"customer {customer_id!r} already exists") from None
        session.refresh(customer)
        return customer


def get_customer(engine: Engine, customer_id: str) -> Customer | None:
    with Session(engine) as session:
        return session.get(Customer, customer_id)


def list_customers(engine: Engine) -> list[Customer]:
    with Session(engine) as session:
        return list(session.exec(select(Customer).order_by(Customer.id)).scalars())


def set_stripe_customer(engine: Engine, customer_id: str, stripe_customer_id: str) -> None:
    with Session(engine) as session:
        customer = session.get(Customer, customer_id)
        if customer is None:
            raise StoreError(f"unknown customer {customer_id!r}")
        customer.stripe_customer_id = stripe_customer_id
        session.add(customer)
        session.commit()


def create_key(engine: Engine, customer_id: str) -> tuple[str, str]:
    """Create a key for a customer; returns (key id, secret). The secret is never stored."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(6)
    with Session(engine) as session:
        if session.get(Customer, customer_id) is None:
            raise StoreError(f"unknown customer {customer_id!r}")
        session.add(ApiKey(id=key_id, customer_id=customer_id, key_hash=hash_key(secret)))
        session.commit()
    return key_id, secret


def revoke_key(engine: Engine, key_id: str) -> None:
    with Session(engine) as session:
        key = session.get(ApiKey, key_id)
        if key is None:
            raise StoreError(f"unknown key {key_id!r}")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            session.add(key)
            session.commit()


def list_keys(engine: Engine, customer_id: str) -> list[ApiKey]:
    with Session(engine) as session:
        query = select(ApiKey).where(ApiKey.customer_id == customer_id).order_by(ApiKey.created_at)
        return list(session.exec(query).scalars())


def customer_for_secret(engine: Engine, secret: str) -> str | None:
    """The customer a live (unrevoked) key belongs to, or None."""
    with Session(engine) as session:
        query = select(ApiKey.customer_id).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None))
        return session.exec(query).scalars().first()


# ---------------------------------------------------------------- the ledger


_LEDGER = LedgerEntry.__table__
_OUTBOX = OutboxEvent.__table__
_ALERTS = Alert.__table__
_LEDGER_COLUMNS = tuple(field.name for field in fields(LedgerRow))
# The billing path's statements, built once and run as prepared (plugin.ledger.prepared).
_INSERT_LEDGER = {
    dialect: Prepared(insert(_LEDGER).inline().on_conflict_do_nothing(index_elements=["id"]).returning(_LEDGER.c.id),
                      columns=_LEDGER_COLUMNS)
    for dialect, insert in (("postgresql", pg_insert), ("sqlite", sqlite_insert))
}
_IN_LEDGER = Prepared(select(_LEDGER.c.id).where(_LEDGER.c.id == bindparam("ledger_id")))
_INSERT_OUTBOX = Prepared(_OUTBOX.insert().inline(), columns=("id", "customer_id", "value_ucr", "occurred_at", "status",
                                                              "attempts", "next_attempt_at", "uncertain", "requeues"))
_INSERT_ALERT = Prepared(_ALERTS.insert().inline(),
                         columns=("kind", "customer_id", "subject_id", "message", "created_at"))

Settle = Callable[[Connection, BillingRecord], BillingRecord]
"""Runs inside the ledger's transaction just before its record is written, and returns the record to
write: the embedded counter store settles there, so counters and ledger change in one commit."""


def write_records(engine: Engine, records: Iterable[BillingRecord]) -> int:
    """Write ledger + outbox (+ alert) rows in ONE transaction; returns how many were new."""
    return len(record_batch(engine, records))


def record_batch(engine: Engine, records: Iterable[BillingRecord],
                 settlements: Mapping[str, Settle] | None = None) -> dict[str, BillingRecord]:
    """Write ledger + outbox (+ alert) rows in ONE transaction; returns the new records as written."""
    with engine.begin() as connection:
        return record_on(connection, records, settlements)


def record_on(connection: Connection, records: Iterable[BillingRecord],
              settlements: Mapping[str, Settle] | None = None) -> dict[str, BillingRecord]:
    """`record_batch` in the caller's transaction.

    A ledger id seen before is skipped with its outbox row (and its settlement is not run), so a
    repeated write never bills twice. Only positive amounts become meter events: Stripe takes
    positive whole numbers. A settlement that fails fails the whole transaction, like any other
    write in it: counters and ledger never disagree.
    """
    unique: dict[str, BillingRecord] = {}
    for record in records:
        unique.setdefault(record.entry.id, record)
    if not unique:
        return {}
    settlements = settlements or {}
    insert_ledger = _INSERT_LEDGER[connection.dialect.name]
    new: list[BillingRecord] = []
    for ledger_id, record in unique.items():
        settle = settlements.get(ledger_id)
        if settle is not None and _IN_LEDGER.first(connection, {"ledger_id": ledger_id}) is None:
            record = settle(connection, record)
        # RETURNING, not rowcount: psycopg reports -1 for INSERT .. ON CONFLICT DO NOTHING.
        if insert_ledger.first(connection, vars(record.entry)) is not None:
            new.append(record)
    rollups.add_on(connection, [record.entry for record in new])
    _INSERT_OUTBOX.many(connection, [
        {"id": record.entry.id, "customer_id": record.entry.customer_id, "value_ucr": record.entry.credits_ucr,
         "occurred_at": record.entry.created_at, "status": "pending", "attempts": 0,
         "next_attempt_at": record.entry.created_at, "uncertain": False, "requeues": 0}
        for record in new if record.entry.credits_ucr > 0 and record.meter
    ])
    _INSERT_ALERT.many(connection, [
        {"kind": "unbilled_tokens", "customer_id": record.entry.customer_id, "subject_id": record.entry.id,
         "message": record.alert, "created_at": record.entry.created_at}
        for record in new if record.alert
    ])
    return {record.entry.id: record for record in new}



STAGED = Table("meterline_import", MetaData(), *(Column(column.name, column.type) for column in _LEDGER.columns),
                prefixes=["TEMPORARY"])
"""Imported rows on their way into the ledger (`meterline ledger import`): a temporary table, the
connection's own, with the ledger's columns and no index; `staging` makes it, rollups.add_from sums it."""
_INSERT_STAGED = Prepared(STAGED.insert().inline(), columns=_LEDGER_COLUMNS)


@contextmanager
def staging(connection: Connection) -> Iterator[None]:
    """An empty STAGED for rows to check against the ledger and then load at once. Filling it takes no
    lock on the ledger, so SQLite's write lock is held for the load alone. Dropped on the way out, with
    whatever the caller left uncommitted rolled back (the connection goes back to the pool)."""
    drop = f"DROP TABLE IF EXISTS {'temp' if connection.dialect.name == 'sqlite' else 'pg_temp'}.{STAGED.name}"
    connection.exec_driver_sql(drop)
    STAGED.create(connection)
    try:
        yield
    finally:
        connection.rollback()
        connection.exec_driver_sql(drop)
        connection.commit()


def stage(connection: Connection, rows: list[LedgerRow]) -> None:
    """Rows into STAGED (inside `staging`), on the driver's cursor: a million of them per import."""
    _INSERT_STAGED.many(connection, [vars(row) for row in rows])


def staged_in_ledger(connection: Connection) -> list[str]:
    """Ids of staged rows the ledger already holds."""
    return list(connection.execute(select(STAGED.c.id).join(_LEDGER, _LEDGER.c.id == STAGED.c.id)).scalars())


def load_staged(connection: Connection) -> None:
    """The staged rows into the ledger, in the caller's transaction: ledger rows alone. Imported history is
    never sent to a sink (no outbox row) and raises no alert. The caller has checked their ids are new (one
    written meanwhile fails the transaction, never skipped) and adds them to the rollups (rollups.add_from,
    inside rollups.added_by_caller).

    SQLite: with a page cache of 256 MiB while it loads. Ledger ids are random (LiteLLM's call ids), so a
    load touches pages all over the primary key, which the default 2 MiB cache keeps reading again: a
    million rows took 15 s with it, 5.5 s with the larger one (bench/ledger_import.py's machine)."""
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        cache = connection.exec_driver_sql("PRAGMA cache_size").scalar_one()
        connection.exec_driver_sql("PRAGMA cache_size = -262144")
    try:
        connection.execute(_LEDGER.insert().from_select(list(_LEDGER_COLUMNS),
                                                        select(*(STAGED.c[name] for name in _LEDGER_COLUMNS))))
    finally:
        if sqlite:
            connection.exec_driver_sql(f"PRAGMA cache_size = {int(cache)}")


def export_row(entry: LedgerEntry) -> dict:
    """A ledger row as `meterline ledger export` writes it (DESIGN "Contract: CLI")."""
    row = {column: getattr(entry, column) for column in EXPORT_COLUMNS}
    row["created_at"] = as_utc(entry.created_at).isoformat()
    return row


def recent_rows(engine: Engine, customer_id: str, limit: int) -> list[LedgerEntry]:
    """A customer's newest ledger rows, newest first."""
    with Session(engine) as session:
        query = (select(LedgerEntry).where(LedgerEntry.customer_id == customer_id)
                 .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc()).limit(limit))
        return list(session.exec(query).scalars())


def ledger_rows(engine: Engine, customer_id: str | None = None, batch: int = 1000) -> Iterator[LedgerEntry]:
    """All ledger rows in creation order, streamed in batches (exports can be large)."""
    with Session(engine) as session:
        query = select(LedgerEntry).order_by(LedgerEntry.created_at, LedgerEntry.id)
        if customer_id is not None:
            query = query.where(LedgerEntry.customer_id == customer_id)
        yield from session.exec(query.execution_options(yield_per=batch)).scalars()


def list_outbox_ids(engine: Engine, customer_id: str | None = None) -> list[str]:
    """Ids of the meter events waiting in (or delivered from) the outbox, oldest first."""
    with Session(engine) as session:
        query = select(OutboxEvent.id).order_by(OutboxEvent.occurred_at, OutboxEvent.id)
        if customer_id is not None:
            query = query.where(OutboxEvent.customer_id == customer_id)
        return list(session.exec(query).scalars())


def add_alert(engine: Engine, kind: str, message: str, *, customer_id: str | None = None,
              subject_id: str | None = None) -> None:
    with engine.begin() as connection:
        insert_alert(connection, kind, message, customer_id=customer_id, subject_id=subject_id)


def insert_alert(connection: Connection, kind: str, message: str, *, customer_id: str | None = None,
                 subject_id: str | None = None) -> None:
    """An alert, inside the caller's transaction (so it lands with what it reports, or not at all)."""
    connection.execute(_ALERTS.insert(), {"kind": kind, "customer_id": customer_id, "subject_id": subject_id,
                                          "message": message, "created_at": utcnow()})


def open_alert_counts(engine: Engine) -> dict[str, int]:
    """customer -> how many of its alerts no operator has acknowledged."""
    query = (select(_ALERTS.c.customer_id, func.count()).where(_ALERTS.c.acknowledged_at.is_(None),
                                                                 _ALERTS.c.customer_id.is_not(None))
             .group_by(_ALERTS.c.customer_id))
    with engine.connect() as connection:
        return {customer: int(count) for customer, count in connection.execute(query)}


def acknowledge_alert(engine: Engine, alert_id: int, at: datetime) -> datetime | None:
    """Mark an alert seen by an operator (the first time counts); when it was, or None for no such alert."""
    with engine.begin() as connection:
        connection.execute(update(_ALERTS).where(_ALERTS.c.id == alert_id, _ALERTS.c.acknowledged_at.is_(None))
                           .values(acknowledged_at=at))
        found = connection.execute(select(_ALERTS.c.acknowledged_at).where(_ALERTS.c.id == alert_id)).first()
    return None if found is None else as_utc(found[0])


def has_alert(connection: Connection, kind: str, subject_id: str) -> bool:
    query = select(_ALERTS.c.id).where(_ALERTS.c.kind == kind, _ALERTS.c.subject_id == subject_id)
    return connection.execute(query).first() is not None


def list_alerts(engine: Engine, kind: str | None = None, *, customer_id: str | None = None,
                limit: int | None = None, newest_first: bool = False) -> list[Alert]:
    with Session(engine) as session:
        query = select(Alert).order_by(Alert.id.desc() if newest_first else Alert.id)
        if kind is not None:
            query = query.where(Alert.kind == kind)
        if customer_id is not None:
            query = query.where(Alert.customer_id == customer_id)
        if limit is not None:
            query = query.limit(limit)
        return list(session.exec(query).scalars())


def billed_since(customer_id: str, start: datetime, end: datetime | None = None):
    """SELECT of the µcr billed to a customer from `start` on (to `end`): what its counters start from."""
    query = select(func.coalesce(func.sum(_LEDGER.c.credits_ucr), 0)).where(
        _LEDGER.c.customer_id == customer_id, _LEDGER.c.created_at >= start)
    return query if end is None else query.where(_LEDGER.c.created_at < end)


def billed_between(engine: Engine, customer_id: str, start: datetime, end: datetime | None = None) -> int:
    """µcr billed to a customer in [start, end) (end None: up to now), summed from the ledger's rows (for
    short windows; plugin/ledger/rollups.py's `billed_between` reads long ones from the hourly rollup)."""
    with engine.connect() as connection:
        return int(connection.execute(billed_since(customer_id, start, end)).scalar_one())
