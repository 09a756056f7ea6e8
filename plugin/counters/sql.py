"""The embedded counter store: two tables in the ledger's database, one transaction per operation.

Each operation first writes (the INSERT that makes sure the account row exists), so SQLite takes
its write lock before reading and Postgres locks the row (`FOR UPDATE`) before deciding: a
concurrent request waits instead of deciding from stale numbers. The decision itself is
`plugin.policy.grant` / `settle`, called as is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import Connection, Engine, delete, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from plugin.counters.base import Account, CounterError, Grant, Snapshot
from plugin.ledger.models import CounterRow, ReservationRow
from plugin.ledger.store import billed_since
from plugin.policy import Ask, Ceiling, Refusal, grant, settle

_COUNTERS = CounterRow.__table__
_RESERVATIONS = ReservationRow.__table__
_INSERT = {"postgresql": pg_insert, "sqlite": sqlite_insert}


def _limit(cap_ucr: int | None) -> Ceiling | None:
    # The refusal reason is the caller's business; the store only needs the number.
    return None if cap_ucr is None else Ceiling(cap_ucr, Refusal.HARD_LIMIT)


class SqlCounterStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = _INSERT[engine.dialect.name]

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One transaction; any database failure becomes the one CounterError callers handle."""
        try:
            with self.engine.begin() as connection:
                yield connection
        except SQLAlchemyError as error:
            raise CounterError(f"embedded counters: {error.__class__.__name__}") from error

    def _lock(self, connection: Connection, account: Account) -> tuple[int, int]:
        """Lock the account row and return (used, reserved), creating it on first use.

        The no-op UPDATE is the cheap write that takes SQLite's write lock and Postgres's row lock
        before anything is read. Only a new row pays for reading the ledger: it starts from what the
        ledger already billed this period (usage from before the counters existed)."""
        row = connection.execute(
            update(_COUNTERS).where(*self._account(account)).values(used_ucr=_COUNTERS.c.used_ucr)
            .returning(_COUNTERS.c.used_ucr, _COUNTERS.c.reserved_ucr)
        ).first()
        if row is None:
            seed = select(literal(account.customer_id), literal(account.period_key),
                          billed_since(account.customer_id, account.period).scalar_subquery(), literal(0))
            connection.execute(
                self._insert(_COUNTERS).from_select(["customer_id", "period", "used_ucr", "reserved_ucr"], seed)
                .on_conflict_do_nothing()
            )
            row = connection.execute(
                select(_COUNTERS.c.used_ucr, _COUNTERS.c.reserved_ucr).where(*self._account(account)).with_for_update()
            ).one()
        return int(row.used_ucr), int(row.reserved_ucr)

    @staticmethod
    def _account(account: Account):
        return _COUNTERS.c.customer_id == account.customer_id, _COUNTERS.c.period == account.period_key

    @staticmethod
    def _reservations(account: Account):
        return _RESERVATIONS.c.customer_id == account.customer_id, _RESERVATIONS.c.period == account.period_key

    def _expire(self, connection: Connection, account: Account, now: datetime) -> int:
        """Drop the account's expired reservations; returns how many µcr they held."""
        stale = (*self._reservations(account), _RESERVATIONS.c.expires_at <= now)
        held = connection.execute(select(func.coalesce(func.sum(_RESERVATIONS.c.ucr), 0)).where(*stale)).scalar_one()
        if held:
            connection.execute(delete(_RESERVATIONS).where(*stale))
        return int(held)

    def _set(self, connection: Connection, account: Account, used: int, reserved: int) -> None:
        connection.execute(update(_COUNTERS).where(*self._account(account)).values(used_ucr=used, reserved_ucr=reserved))

    def reserve(self, account: Account, reservation_id: str, ask: Ask, *, cap_ucr: int | None,
                expires_at: datetime, now: datetime) -> Grant:
        with self._transaction() as connection:
            used, reserved = self._lock(connection, account)
            reserved -= self._expire(connection, account, now)
            granted = grant(ask, used_ucr=used, reserved_ucr=reserved, limit=_limit(cap_ucr))
            if granted is not None:
                connection.execute(_RESERVATIONS.insert().values(
                    id=reservation_id, customer_id=account.customer_id, period=account.period_key, ucr=granted,
                    expires_at=expires_at))
                reserved += granted
            self._set(connection, account, used, reserved)
        return Grant(granted, None if cap_ucr is None else cap_ucr - used - (reserved - (granted or 0)))

    def _end(self, connection: Connection, account: Account, reservation_id: str) -> int:
        """Remove a reservation; returns what it held (0 if it was gone already)."""
        held = connection.execute(
            select(_RESERVATIONS.c.ucr).where(_RESERVATIONS.c.id == reservation_id, *self._reservations(account))
        ).scalar_one_or_none()
        if held is None:
            return 0
        connection.execute(delete(_RESERVATIONS).where(_RESERVATIONS.c.id == reservation_id))
        return int(held)

    def settle(self, account: Account, reservation_id: str, actual_ucr: int, *, cap_ucr: int | None) -> int:
        with self._transaction() as connection:
            used, reserved = self._lock(connection, account)
            held = self._end(connection, account, reservation_id)
            bill = settle(actual_ucr, reserved_for_this_ucr=held, used_ucr=used, reserved_ucr=reserved,
                          limit=_limit(cap_ucr)).bill_ucr
            self._set(connection, account, used + bill, reserved - held)
        return bill

    def release(self, account: Account, reservation_id: str) -> None:
        with self._transaction() as connection:
            used, reserved = self._lock(connection, account)
            self._set(connection, account, used, reserved - self._end(connection, account, reservation_id))

    def snapshot(self, account: Account, now: datetime) -> Snapshot:
        with self._transaction() as connection:
            used = connection.execute(select(_COUNTERS.c.used_ucr).where(*self._account(account))).scalar()
            live = connection.execute(
                select(func.coalesce(func.sum(_RESERVATIONS.c.ucr), 0))
                .where(*self._reservations(account), _RESERVATIONS.c.expires_at > now)
            ).scalar_one()
        return Snapshot(int(used or 0), int(live))

    def rebuild(self, account: Account, used_ucr: int) -> None:
        with self._transaction() as connection:
            _, reserved = self._lock(connection, account)
            self._set(connection, account, used_ucr, reserved)
