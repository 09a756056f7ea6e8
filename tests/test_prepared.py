"""plugin.ledger.prepared: the billing path's statements on the driver's cursor, on SQLite and Postgres.

What must hold: a value written through `Prepared` is stored exactly as SQLAlchemy stores it
(SQLite keeps datetimes as text in SQLAlchemy's format, and every reader parses that), errors are
SQLAlchemy's, and the statement shares the transaction of the connection it runs on.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    Table,
    bindparam,
    select,
    text,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, NoResultFound

from plugin.ledger.models import CounterRow, OutboxEvent, RateWindow
from plugin.ledger.prepared import Prepared
from plugin.ledger.store import make_engine

OUTBOX = OutboxEvent.__table__
AT = datetime(2026, 11, 24, 17, 5, 9, 123456, tzinfo=UTC)
COLUMNS = ("id", "customer_id", "value_ucr", "occurred_at", "status", "attempts", "next_attempt_at",
           "uncertain", "requeues")
INSERT = Prepared(OUTBOX.insert().inline(), columns=COLUMNS)


def row(event_id: str) -> dict:
    return {"id": event_id, "customer_id": "acme", "value_ucr": 5, "occurred_at": AT, "status": "pending",
            "attempts": 0, "next_attempt_at": AT, "uncertain": False, "requeues": 0}


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def stored(engine, event_id: str) -> tuple:
    """The row as the database holds it (text for SQLite's datetimes), not as SQLAlchemy reads it."""
    with engine.connect() as connection:
        cursor = connection.connection.cursor()
        marker = "?" if engine.dialect.name == "sqlite" else "%s"
        cursor.execute(f"SELECT occurred_at, next_attempt_at, uncertain, requeues FROM outbox WHERE id = {marker}",
                       (event_id,))
        return tuple(cursor.fetchone())


def test_a_row_is_stored_as_sqlalchemy_stores_it(engine):
    with engine.begin() as connection:
        INSERT.many(connection, [row("prepared")])
        connection.execute(OUTBOX.insert(), row("sqlalchemy"))
    assert stored(engine, "prepared") == stored(engine, "sqlalchemy")
    if engine.dialect.name == "sqlite":
        assert stored(engine, "prepared")[0] == "2026-11-24 17:05:09.123456"


def test_rows_first_one_and_scalar_answer_like_their_sqlalchemy_namesakes(engine):
    counters = CounterRow.__table__
    account = (counters.c.customer_id == bindparam("customer"), counters.c.period == bindparam("period"))
    used = Prepared(select(counters.c.used_ucr, counters.c.reserved_ucr).where(*account))
    with engine.begin() as connection:
        connection.execute(counters.insert(), {"customer_id": "acme", "period": "1", "used_ucr": 7, "reserved_ucr": 2})
        assert used.rows(connection, {"customer": "acme", "period": "1"}) == [(7, 2)]
        assert used.first(connection, {"customer": "acme", "period": "1"}) == (7, 2)
        assert used.scalar(connection, {"customer": "acme", "period": "1"}) == 7
        assert used.first(connection, {"customer": "acme", "period": "2"}) is None
        assert used.scalar(connection, {"customer": "acme", "period": "2"}) is None
        with pytest.raises(NoResultFound):
            used.one(connection, {"customer": "acme", "period": "2"})


def test_values_bound_in_the_statement_are_used(engine):
    rates = RateWindow.__table__
    count = Prepared(rates.insert().values(customer_id=bindparam("customer"), window=bindparam("at_window"),
                                           requests=1))
    with engine.begin() as connection:
        count.rows(connection, {"customer": "acme", "at_window": 42})
        assert connection.execute(select(rates.c.window, rates.c.requests)).all() == [(42, 1)]


def test_a_driver_error_is_sqlalchemys_and_the_transaction_rolls_back(engine):
    with pytest.raises(IntegrityError), engine.begin() as connection:
        INSERT.many(connection, [row("first")])
        INSERT.many(connection, [row("first")])  # the same primary key
    with engine.connect() as connection:
        assert connection.execute(select(OUTBOX.c.id)).all() == []


def test_statements_share_the_transaction_of_their_connection(engine):
    with engine.connect() as connection:
        with connection.begin() as transaction:
            INSERT.many(connection, [row("kept-back")])
            transaction.rollback()
        with connection.begin():
            INSERT.many(connection, [row("committed")])
    with engine.connect() as connection:
        assert connection.execute(select(OUTBOX.c.id)).scalars().all() == ["committed"]


def test_a_column_whose_default_python_computes_per_row_must_be_given(engine):
    """SQLAlchemy computes such a default per execution; prepared, it would silently stay unset."""
    table = Table("stamped", MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
                  Column("at", DateTime(timezone=True), default=lambda: AT))
    table.create(engine)
    with engine.begin() as connection:
        with pytest.raises(ValueError, match="must be given values: at"):
            Prepared(table.insert(), columns=("id",)).rows(connection, {"id": 1})
        Prepared(table.insert(), columns=("id", "at")).rows(connection, {"id": 2, "at": AT})
        assert connection.execute(select(table.c.id)).scalars().all() == [2]
    table.drop(engine)


def test_text_statements_run_too(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    begin_immediate = Prepared(text("BEGIN IMMEDIATE"))
    upsert = Prepared(sqlite_insert(RateWindow.__table__).values(
        customer_id=bindparam("customer"), window=bindparam("at_window"), requests=1))
    with engine.connect() as connection, connection.begin():
        begin_immediate.rows(connection)
        upsert.rows(connection, {"customer": "acme", "at_window": 1})
    with engine.connect() as connection:
        assert connection.execute(select(RateWindow.__table__.c.requests)).scalar_one() == 1
    engine.dispose()
