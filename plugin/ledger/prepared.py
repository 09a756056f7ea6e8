"""Statements of the billing path, compiled once per database and run on the driver's cursor.

SQLAlchemy builds every statement meterline runs, and runs most of them. On the billing path,
where a bill runs five or six short statements inside one transaction, its per-execution work
(cache lookup, parameter and result processing, result objects) cost 70-120 µs a statement on
the benchmark machine, against 7-20 µs for the driver's own `execute` (bench/RESULTS.md, fifth
session). `Prepared` keeps what SQLAlchemy is for: the statement, its dialect's SQL (SQLite and
Postgres alike) and its column types' bind processing (SQLite's datetime format, booleans), all
done once at first use; each run then formats the parameters and calls the cursor. Errors still
arrive as SQLAlchemy's (`DBAPIError` and its subclasses), and a connection the database dropped
is invalidated, as SQLAlchemy itself would do.

Run them inside a transaction begun by SQLAlchemy (`engine.begin()`, `connection.begin()`): they
use the same driver connection, so they commit or roll back with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, NoReturn

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, NoResultFound
from sqlalchemy.sql import ClauseElement

Row = tuple[Any, ...]


@dataclass(frozen=True)
class _Compiled:
    """A statement's SQL for one dialect, and how to turn named values into its parameters."""

    sql: str
    names: tuple[str, ...]
    """Parameter names in the SQL's order (each occurrence for positional styles, once for named)."""
    positional: bool
    defaults: Mapping[str, Any]
    """Values bound in the statement itself (`.values(requests=1)`)."""
    processors: Mapping[str, Callable[[Any], Any]]
    pick: Callable[[Mapping[str, Any]], tuple] | None = None
    """The values in `names`' order in one C call, for statements that bind nothing themselves (most): the
    per-value Python of `bound` below was a third of a small statement's cost."""
    process_at: tuple[tuple[int, Callable[[Any], Any]], ...] = ()
    """(position in `names`, bind processor) for the values that need converting (SQLite datetimes)."""

    def parameters(self, values: Mapping[str, Any]) -> tuple | dict:
        if self.pick is not None:
            picked = self.pick(values)
            if self.process_at:
                picked = list(picked)
                for position, process in self.process_at:
                    picked[position] = process(picked[position])
            return tuple(picked) if self.positional else dict(zip(self.names, picked, strict=True))

        def bound(name: str) -> Any:
            value = values[name] if name in values else self.defaults[name]
            process = self.processors.get(name)
            return value if process is None else process(value)

        if self.positional:
            return tuple(bound(name) for name in self.names)
        return {name: bound(name) for name in self.names}


def _compile(statement: ClauseElement, dialect: Dialect, columns: tuple[str, ...] | None) -> _Compiled:
    compiled = statement.compile(dialect=dialect, column_keys=list(columns) if columns is not None else None)
    computed = [column.name for column in (*compiled.insert_prefetch, *compiled.update_prefetch)]
    if computed:  # SQLAlchemy would compute these per execution; here they would silently stay unset
        raise ValueError(f"columns with Python-computed defaults must be given values: {', '.join(computed)}")
    binds = compiled.binds
    positional = compiled.positiontup is not None
    names = tuple(compiled.positiontup) if positional else tuple(binds)
    processors = {}
    for name, bind in binds.items():
        process = dialect.type_descriptor(bind.type).bind_processor(dialect)
        if process is not None:
            processors[name] = process
    defaults = {name: bind.effective_value for name, bind in binds.items() if not bind.required}
    pick = None
    if not defaults and names:
        getter = itemgetter(*names)
        pick = getter if len(names) > 1 else (lambda values: (getter(values),))
    process_at = tuple((position, processors[name]) for position, name in enumerate(names) if name in processors)
    return _Compiled(compiled.string, names, positional, defaults, processors, pick, process_at)


class Prepared:
    """One statement, with bind parameters, built once at import; compiled per dialect on first use.

    `columns`: for an INSERT or UPDATE without `.values()`, the columns it sets (each value is
    passed under the column's name), as `connection.execute(statement, {...})` would infer them."""

    def __init__(self, statement: ClauseElement, columns: tuple[str, ...] | None = None) -> None:
        self.statement = statement
        self.columns = columns
        self._compiled: dict[str, _Compiled] = {}

    def _for(self, dialect: Dialect) -> _Compiled:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = _compile(self.statement, dialect, self.columns)
        return compiled

    def rows(self, connection: Connection, values: Mapping[str, Any] | None = None) -> list[Row]:
        """Run the statement; the rows it returns (none for a statement without RETURNING)."""
        return self._run(connection, values or {}, many=False)

    def many(self, connection: Connection, rows: list[Mapping[str, Any]]) -> None:
        """Run a statement without RETURNING once per row (the driver's `executemany`)."""
        if rows:
            self._run(connection, rows, many=True)

    def _run(self, connection: Connection, values: Mapping[str, Any] | list[Mapping[str, Any]], *,
             many: bool) -> list[Row]:
        compiled = self._for(connection.dialect)
        parameters = [compiled.parameters(row) for row in values] if many else compiled.parameters(values)
        cursor = connection.connection.cursor()
        try:
            if many:
                cursor.executemany(compiled.sql, parameters)
                return []
            cursor.execute(compiled.sql, parameters)
            return cursor.fetchall() if cursor.description is not None else []
        except connection.dialect.loaded_dbapi.Error as error:
            _reraise(connection, compiled.sql, parameters, error, cursor)
        finally:
            cursor.close()

    def first(self, connection: Connection, values: Mapping[str, Any] | None = None) -> Row | None:
        rows = self.rows(connection, values)
        return rows[0] if rows else None

    def one(self, connection: Connection, values: Mapping[str, Any] | None = None) -> Row:
        """The single row the statement must return (SQLAlchemy's `NoResultFound` without one)."""
        row = self.first(connection, values)
        if row is None:
            raise NoResultFound("No row was found when one was required")
        return row

    def scalar(self, connection: Connection, values: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row, or None without a row."""
        row = self.first(connection, values)
        return None if row is None else row[0]


def _reraise(connection: Connection, sql: str, parameters: tuple | dict | list, error: Exception, cursor) -> NoReturn:
    """The driver's error as SQLAlchemy raises it; a dropped connection is not returned to the pool."""
    dialect = connection.dialect
    invalidated = dialect.is_disconnect(error, connection.connection.dbapi_connection, cursor)
    if invalidated:
        connection.invalidate(error)
    raise DBAPIError.instance(sql, parameters, error, dialect.loaded_dbapi.Error,
                              connection_invalidated=invalidated, dialect=dialect) from error
