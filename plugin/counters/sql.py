"""The embedded counter store: tables in the ledger's database, one transaction per operation.

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

from plugin.counters.base import Account, CounterError, Grant, Settled, Snapshot, hour_index
from plugin.ledger.models import CounterRow, RateWindow, ReservationRow, SpendHour
from plugin.ledger.store import billed_since
from plugin.policy import Ask, Ceiling, Refusal, grant, settle
from plugin.ratelimit import RateLimit, admits, window_index

_COUNTERS = CounterRow.__table__
_RESERVATIONS = ReservationRow.__table__
_RATES = RateWindow.__table__
_HOURS = SpendHour.__table__
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

    def _count_request(self, connection: Connection, customer_id: str, rate: RateLimit,
                       now: datetime) -> tuple[bool, int, int]:
        """Count one request against the sliding window if it fits: (allowed, current, previous),
        the counts from before it. Windows older than the previous one are dropped as a new one starts."""
        window = window_index(int(now.timestamp() * 1000), rate)
        counts = dict(connection.execute(
            select(_RATES.c.window, _RATES.c.requests)
            .where(_RATES.c.customer_id == customer_id, _RATES.c.window.in_((window, window - 1)))
        ).all())
        current, previous = int(counts.get(window, 0)), int(counts.get(window - 1, 0))
        if not admits(rate, int(now.timestamp() * 1000), current, previous):
            return False, current, previous
        if window not in counts:
            connection.execute(delete(_RATES).where(_RATES.c.customer_id == customer_id,
                                                    _RATES.c.window < window - 1))
        # An upsert, not a plain insert: around a period boundary two accounts of one customer may race here.
        connection.execute(self._insert(_RATES).values(customer_id=customer_id, window=window, requests=1)
                           .on_conflict_do_update(index_elements=["customer_id", "window"],
                                                  set_={"requests": _RATES.c.requests + 1}))
        return True, current, previous

    def reserve(self, account: Account, reservation_id: str, ask: Ask | None, *, cap_ucr: int | None,
                expires_at: datetime, now: datetime, rate: RateLimit | None = None) -> Grant:
        with self._transaction() as connection:
            used, reserved = self._lock(connection, account)
            current = previous = 0
            if rate is not None:
                allowed, current, previous = self._count_request(connection, account.customer_id, rate, now)
                if not allowed:
                    return Grant(None, None, rate_limited=True, rate_current=current, rate_previous=previous)
            if ask is None:
                return Grant(None, None, rate_current=current, rate_previous=previous)
            reserved -= self._expire(connection, account, now)
            granted = grant(ask, used_ucr=used, reserved_ucr=reserved, limit=_limit(cap_ucr))
            if granted is not None:
                connection.execute(_RESERVATIONS.insert().values(
                    id=reservation_id, customer_id=account.customer_id, period=account.period_key, ucr=granted,
                    expires_at=expires_at))
                reserved += granted
            self._set(connection, account, used, reserved)
        available = None if cap_ucr is None else cap_ucr - used - (reserved - (granted or 0))
        return Grant(granted, available, rate_current=current, rate_previous=previous)

    def _end(self, connection: Connection, account: Account, reservation_id: str) -> int:
        """Remove a reservation; returns what it held (0 if it was gone already)."""
        held = connection.execute(
            select(_RESERVATIONS.c.ucr).where(_RESERVATIONS.c.id == reservation_id, *self._reservations(account))
        ).scalar_one_or_none()
        if held is None:
            return 0
        connection.execute(delete(_RESERVATIONS).where(_RESERVATIONS.c.id == reservation_id))
        return int(held)

    def _add_spend(self, connection: Connection, customer_id: str, bill: int, now: datetime) -> tuple[int, int]:
        """Add `bill` to this hour's bucket: (this hour's µcr, the previous hour's). Older buckets are
        dropped as a new hour starts."""
        hour = hour_index(now)
        buckets = dict(connection.execute(
            select(_HOURS.c.hour, _HOURS.c.ucr)
            .where(_HOURS.c.customer_id == customer_id, _HOURS.c.hour.in_((hour, hour - 1)))
        ).all())
        current, previous = int(buckets.get(hour, 0)) + bill, int(buckets.get(hour - 1, 0))
        if not bill:
            return current, previous
        if hour not in buckets:
            connection.execute(delete(_HOURS).where(_HOURS.c.customer_id == customer_id, _HOURS.c.hour < hour - 1))
        connection.execute(self._insert(_HOURS).values(customer_id=customer_id, hour=hour, ucr=bill)
                           .on_conflict_do_update(index_elements=["customer_id", "hour"],
                                                  set_={"ucr": _HOURS.c.ucr + bill}))
        return current, previous

    def settle(self, account: Account, reservation_id: str, actual_ucr: int, *, cap_ucr: int | None,
               now: datetime) -> Settled:
        with self._transaction() as connection:
            used, reserved = self._lock(connection, account)
            held = self._end(connection, account, reservation_id)
            bill = settle(actual_ucr, reserved_for_this_ucr=held, used_ucr=used, reserved_ucr=reserved,
                          limit=_limit(cap_ucr)).bill_ucr
            self._set(connection, account, used + bill, reserved - held)
            hour, previous_hour = self._add_spend(connection, account.customer_id, bill, now)
        return Settled(bill, used + bill, reserved - held, hour, previous_hour)

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

    def hour_spend(self, customer_id: str, now: datetime) -> tuple[int, int]:
        hour = hour_index(now)
        with self._transaction() as connection:
            buckets = dict(connection.execute(
                select(_HOURS.c.hour, _HOURS.c.ucr)
                .where(_HOURS.c.customer_id == customer_id, _HOURS.c.hour.in_((hour, hour - 1)))
            ).all())
        return int(buckets.get(hour, 0)), int(buckets.get(hour - 1, 0))

    def rebuild(self, account: Account, used_ucr: int) -> None:
        with self._transaction() as connection:
            _, reserved = self._lock(connection, account)
            self._set(connection, account, used_ucr, reserved)
