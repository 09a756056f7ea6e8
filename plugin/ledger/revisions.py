"""Revision counters kept by the database itself: triggers on a group of tables bump a row of
`revisions` in the same transaction as any change to them, whoever makes it (this process, another
proxy, an operator's SQL). A reader that keeps the rows in memory (the fleet keeps every customer's
terms, limits and breaker) reads one counter per request and the rows only when it moved.

Read the counter before the rows: a change committed in between is then seen in the rows and again
as a moved counter on the next read, never missed.
"""

from __future__ import annotations

from sqlalchemy import Engine, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from plugin.ledger.models import Revision

CUSTOMERS = "customers"
"""Bumped by any change to customers, customer_limits or breakers (what the fleet shows of a customer)."""

_WATCHED = {CUSTOMERS: ("customers", "customer_limits", "breakers")}
_INSERT = {"postgresql": pg_insert, "sqlite": sqlite_insert}


def _bump(name: str) -> str:
    return f"UPDATE revisions SET revision = revision + 1 WHERE name = '{name}'"


def _sqlite_triggers(name: str, table: str) -> list[str]:
    return [f"CREATE TRIGGER IF NOT EXISTS meterline_{table}_{event.lower()} AFTER {event} ON {table} "
            f"BEGIN {_bump(name)}; END" for event in ("INSERT", "UPDATE", "DELETE")]


def _postgres_function(name: str) -> str:
    return (f"CREATE OR REPLACE FUNCTION meterline_bump_{name}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN {_bump(name)}; RETURN NULL; END $$")


def install(engine: Engine) -> None:
    """Create the counters' rows and triggers where missing (every start-up; cheap once they exist)."""
    with engine.begin() as connection:
        dialect = connection.dialect.name
        for name in _WATCHED:
            connection.execute(_INSERT[dialect](Revision.__table__).values(name=name, revision=0)
                               .on_conflict_do_nothing())
        if dialect == "sqlite":
            for name, tables in _WATCHED.items():
                for table in tables:
                    for statement in _sqlite_triggers(name, table):
                        connection.exec_driver_sql(statement)
            return
        wanted = {f"meterline_{table}_changed" for tables in _WATCHED.values() for table in tables}
        present = set(connection.scalars(text("SELECT tgname FROM pg_trigger WHERE tgname = ANY(:names)"),
                                         {"names": sorted(wanted)}))
        if present == wanted:
            return
        # processes starting together: one creates, the others find them made
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('meterline_revisions'))"))
        present = set(connection.scalars(text("SELECT tgname FROM pg_trigger WHERE tgname = ANY(:names)"),
                                         {"names": sorted(wanted)}))
        for name, tables in _WATCHED.items():
            connection.exec_driver_sql(_postgres_function(name))
            for table in tables:
                if f"meterline_{table}_changed" not in present:
                    connection.exec_driver_sql(
                        f"CREATE TRIGGER meterline_{table}_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
                        f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION meterline_bump_{name}()")


def current(engine: Engine, name: str) -> int | None:
    """The counter's value now; None when its row is gone (emptied by hand): then nothing can be kept."""
    with engine.connect() as connection:
        return connection.execute(select(Revision.revision).where(Revision.name == name)).scalar()
