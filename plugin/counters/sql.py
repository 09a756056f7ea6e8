"""The embedded counter store: tables in the ledger's database, one transaction per operation
(or, for a settlement, the ledger writer's transaction: `settle_on`).

Each operation starts with a write to the account row (an UPDATE), so SQLite takes its write lock
and Postgres locks the row before anything is read: a concurrent request waits instead of
deciding from stale numbers. The decisions are `plugin.rules.policy.grant` / `settle` and
`plugin.rules.ratelimit.admits`, called as is.

Every statement is built once, with bind parameters, below, and run as prepared
(`plugin.ledger.prepared`): SQLAlchemy's work per execution cost several times the statement's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    delete,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from plugin.counters.base import (
    Account,
    CounterError,
    Grant,
    Settled,
    Snapshot,
    hour_index,
)
from plugin.ledger.models import CounterRow, RateWindow, ReservationRow, SpendHour
from plugin.ledger.prepared import Prepared
from plugin.ledger.store import billed_since
from plugin.rules.policy import Ask, Ceiling, Refusal, grant, settle
from plugin.rules.ratelimit import RateLimit, admits, window_index

_COUNTERS = CounterRow.__table__
_RESERVATIONS = ReservationRow.__table__
_RATES = RateWindow.__table__
_HOURS = SpendHour.__table__
_INSERT = {"postgresql": pg_insert, "sqlite": sqlite_insert}

_ACCOUNT = (_COUNTERS.c.customer_id == bindparam("customer"), _COUNTERS.c.period == bindparam("account_period"))
_ITS_RESERVATIONS = (_RESERVATIONS.c.customer_id == bindparam("customer"),
                     _RESERVATIONS.c.period == bindparam("account_period"))
_LOCK = Prepared(update(_COUNTERS).where(*_ACCOUNT).values(used_ucr=_COUNTERS.c.used_ucr)
                 .returning(_COUNTERS.c.used_ucr, _COUNTERS.c.reserved_ucr))
"""The no-op write that takes the locks, returning (used, reserved); no row: a new account."""
_SET = Prepared(update(_COUNTERS).where(*_ACCOUNT)
                .values(used_ucr=bindparam("used"), reserved_ucr=bindparam("reserved")))
_ADD = Prepared(update(_COUNTERS).where(*_ACCOUNT)
                .values(used_ucr=_COUNTERS.c.used_ucr + bindparam("bill"),
                        reserved_ucr=_COUNTERS.c.reserved_ucr - bindparam("held"))
                .returning(_COUNTERS.c.used_ucr, _COUNTERS.c.reserved_ucr))
"""Settle without a ceiling in one statement: nothing to compare, so nothing to read first."""
_USED = Prepared(select(_COUNTERS.c.used_ucr).where(*_ACCOUNT))
_END = Prepared(delete(_RESERVATIONS).where(_RESERVATIONS.c.id == bindparam("reservation"), *_ITS_RESERVATIONS)
                .returning(_RESERVATIONS.c.ucr))
_HELD = Prepared(select(_RESERVATIONS.c.ucr).where(_RESERVATIONS.c.id == bindparam("reservation"), *_ITS_RESERVATIONS))
_TAKE = Prepared(update(_RESERVATIONS).where(_RESERVATIONS.c.id == bindparam("reservation"), *_ITS_RESERVATIONS)
                 .values(ucr=_RESERVATIONS.c.ucr - bindparam("take")))
_EXPIRE = Prepared(delete(_RESERVATIONS).where(*_ITS_RESERVATIONS, _RESERVATIONS.c.expires_at <= bindparam("now"))
                   .returning(_RESERVATIONS.c.ucr))
_RESERVE = Prepared(_RESERVATIONS.insert().inline(), columns=("id", "customer_id", "period", "ucr", "expires_at"))
_LIVE = Prepared(select(func.coalesce(func.sum(_RESERVATIONS.c.ucr), 0)).where(
    *_ITS_RESERVATIONS, _RESERVATIONS.c.expires_at > bindparam("now")))
_HOUR = Prepared(select(_HOURS.c.ucr).where(_HOURS.c.customer_id == bindparam("customer"),
                                             _HOURS.c.hour == bindparam("at_hour")))
_PRUNE_HOURS = Prepared(delete(_HOURS).where(_HOURS.c.customer_id == bindparam("customer"),
                                             _HOURS.c.hour < bindparam("at_hour") - 1))
_RATE_WINDOWS = Prepared(select(_RATES.c.window, _RATES.c.requests).where(
    _RATES.c.customer_id == bindparam("customer"),
    _RATES.c.window.between(bindparam("at_window") - 1, bindparam("at_window"))))
_PRUNE_RATES = Prepared(delete(_RATES).where(_RATES.c.customer_id == bindparam("customer"),
                                             _RATES.c.window < bindparam("at_window") - 1))


def _upserts(insert) -> tuple:
    """The two upserts (dialect-specific syntax, same meaning): add to this hour's spend, count a request."""
    spend = insert(_HOURS).values(customer_id=bindparam("customer"), hour=bindparam("at_hour"), ucr=bindparam("bill"))
    # Returns the previous hour's bucket too (`_HOUR`, one statement fewer per bill): the breaker weighs both.
    previous = _HOURS.alias("previous_hour")
    previous_ucr = select(previous.c.ucr).where(previous.c.customer_id == bindparam("customer"),
                                                previous.c.hour == bindparam("at_hour") - 1).scalar_subquery()
    spend = spend.on_conflict_do_update(index_elements=["customer_id", "hour"],
                                        set_={"ucr": _HOURS.c.ucr + spend.excluded.ucr}
                                        ).returning(_HOURS.c.ucr, previous_ucr.label("previous_ucr"))
    # An upsert, not a plain insert: around a period boundary two accounts of one customer may race here.
    count = insert(_RATES).values(customer_id=bindparam("customer"), window=bindparam("at_window"), requests=1)
    count = count.on_conflict_do_update(index_elements=["customer_id", "window"],
                                        set_={"requests": _RATES.c.requests + 1})
    return Prepared(spend), Prepared(count)


_UPSERTS = {dialect: _upserts(insert) for dialect, insert in _INSERT.items()}


def _limit(cap_ucr: int | None) -> Ceiling | None:
    # The refusal reason is the caller's business; the store only needs the number.
    return None if cap_ucr is None else Ceiling(cap_ucr, Refusal.HARD_LIMIT)


def _keys(account: Account) -> dict[str, str]:
    return {"customer": account.customer_id, "account_period": account.period_key}


class SqlCounterStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = _INSERT[engine.dialect.name]
        self._add_spend_statement, self._count_statement = _UPSERTS[engine.dialect.name]

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One transaction; any database failure becomes the one CounterError callers handle."""
        try:
            with self.engine.begin() as connection:
                yield connection
        except SQLAlchemyError as error:
            raise CounterError(f"embedded counters: {error.__class__.__name__}") from error

    def _seed(self, connection: Connection, account: Account) -> None:
        """Create a new account row, starting from what the ledger already billed it this period
        (usage from before the counters existed). Rare: built per call."""
        seed = select(literal(account.customer_id), literal(account.period_key),
                      billed_since(account.customer_id, account.period).scalar_subquery(), literal(0))
        connection.execute(
            self._insert(_COUNTERS).from_select(["customer_id", "period", "used_ucr", "reserved_ucr"], seed)
            .on_conflict_do_nothing()
        )

    def _lock(self, connection: Connection, account: Account) -> tuple[int, int]:
        """Lock the account row and return (used, reserved), creating it on first use."""
        used, reserved, _ = self._lock_or_seed(connection, account)
        return used, reserved

    def _lock_or_seed(self, connection: Connection, account: Account) -> tuple[int, int, bool]:
        """`_lock`, and whether the account had to be started from the ledger just now."""
        row = _LOCK.first(connection, _keys(account))
        if row is not None:
            return int(row[0]), int(row[1]), False
        self._seed(connection, account)
        used, reserved = _LOCK.one(connection, _keys(account))
        return int(used), int(reserved), True

    def _set(self, connection: Connection, account: Account, used: int, reserved: int) -> None:
        _SET.rows(connection, {**_keys(account), "used": used, "reserved": reserved})

    def _expire(self, connection: Connection, account: Account, now: datetime) -> int:
        """Drop the account's expired reservations; returns how many µcr they held."""
        return sum(int(held) for held, in _EXPIRE.rows(connection, {**_keys(account), "now": now}))

    def _count_request(self, connection: Connection, customer_id: str, rate: RateLimit,
                       now: datetime) -> tuple[bool, int, int]:
        """Count one request against the sliding window if it fits: (allowed, current, previous),
        the counts from before it. Windows older than the previous one are dropped as a new one starts."""
        now_ms = int(now.timestamp() * 1000)
        window = window_index(now_ms, rate)
        keys = {"customer": customer_id, "at_window": window}
        counts = dict(_RATE_WINDOWS.rows(connection, keys))
        current, previous = int(counts.get(window, 0)), int(counts.get(window - 1, 0))
        if not admits(rate, now_ms, current, previous):
            return False, current, previous
        if window not in counts:
            _PRUNE_RATES.rows(connection, keys)
        self._count_statement.rows(connection, keys)
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
                _RESERVE.rows(connection, {"id": reservation_id, "customer_id": account.customer_id,
                                           "period": account.period_key, "ucr": granted, "expires_at": expires_at})
                reserved += granted
            self._set(connection, account, used, reserved)
        available = None if cap_ucr is None else cap_ucr - used - (reserved - (granted or 0))
        return Grant(granted, available, rate_current=current, rate_previous=previous)

    def _end(self, connection: Connection, account: Account, reservation_id: str) -> int:
        """Remove a reservation; returns what it held (0 if it was gone already)."""
        held = _END.scalar(connection, {**_keys(account), "reservation": reservation_id})
        return 0 if held is None else int(held)

    def _take(self, connection: Connection, account: Account, reservation_id: str | None,
              portion_ucr: int | None) -> int:
        """What a settlement takes from its reservation: all of it (ended), or at most `portion_ucr`
        of a shared slice, the rest kept; nothing without one. Called with the account row locked."""
        if reservation_id is None:
            return 0
        if portion_ucr is None:
            return self._end(connection, account, reservation_id)
        held = _HELD.scalar(connection, {**_keys(account), "reservation": reservation_id})
        taken = min(portion_ucr, int(held or 0))
        if taken:
            _TAKE.rows(connection, {**_keys(account), "reservation": reservation_id, "take": taken})
        return taken

    def _add_spend(self, connection: Connection, customer_id: str, bill: int, now: datetime) -> tuple[int, int]:
        """Add `bill` to this hour's bucket: (this hour's µcr, the previous hour's). Older buckets are
        dropped when an hour's first bill starts its bucket."""
        hour = hour_index(now)
        keys = {"customer": customer_id, "at_hour": hour}
        if bill:
            current, previous = self._add_spend_statement.one(connection, {**keys, "bill": bill})
            if current == bill:
                _PRUNE_HOURS.rows(connection, keys)
            return int(current), int(previous or 0)
        return self._hours(connection, customer_id, hour)

    def _hours(self, connection: Connection, customer_id: str, hour: int) -> tuple[int, int]:
        """(the hour's µcr, the previous hour's), as they stand."""
        current = _HOUR.scalar(connection, {"customer": customer_id, "at_hour": hour})
        previous = _HOUR.scalar(connection, {"customer": customer_id, "at_hour": hour - 1})
        return int(current or 0), int(previous or 0)

    def settle(self, account: Account, reservation_id: str, actual_ucr: int, *, cap_ucr: int | None,
               now: datetime, portion_ucr: int | None = None, already_in_ledger: bool = False) -> Settled:
        with self._transaction() as connection:
            seeded = already_in_ledger and self._lock_or_seed(connection, account)[2]
            settled = self.settle_on(connection, account, reservation_id, actual_ucr, cap_ucr=cap_ucr, now=now,
                                     portion_ucr=portion_ucr)
            if seeded:  # started from a ledger that has the bill: used counts it once (hour buckets start empty)
                used, _ = _ADD.one(connection, {**_keys(account), "bill": -settled.billed_ucr, "held": 0})
                settled = replace(settled, used_ucr=int(used))
            return settled

    async def reserve_promptly(self, account: Account, reservation_id: str, ask: Ask | None, *, cap_ucr: int | None,
                               expires_at: datetime, now: datetime, rate: RateLimit | None = None) -> Grant:
        """`reserve` on a worker thread: a database transaction never runs on the event loop."""
        return await asyncio.to_thread(self.reserve, account, reservation_id, ask, cap_ucr=cap_ucr,
                                       expires_at=expires_at, now=now, rate=rate)

    async def settle_promptly(self, account: Account, reservation_id: str, actual_ucr: int, *, cap_ucr: int | None,
                              now: datetime, portion_ucr: int | None = None,
                              already_in_ledger: bool = False) -> Settled:
        """`settle` on a worker thread: a database transaction never runs on the event loop."""
        return await asyncio.to_thread(self.settle, account, reservation_id, actual_ucr, cap_ucr=cap_ucr, now=now,
                                       portion_ucr=portion_ucr, already_in_ledger=already_in_ledger)

    def close(self) -> None:
        """Nothing of its own to release: the engine is the ledger's."""

    def settle_on(self, connection: Connection, account: Account, reservation_id: str | None, actual_ucr: int, *,
                  cap_ucr: int | None, now: datetime, portion_ucr: int | None = None) -> Settled:
        """`settle` inside the caller's transaction: the ledger writer's, so the counters and the
        ledger row commit together (or not at all). `reservation_id` None: the request reserved
        nothing (a reservation in this database is made or not, never left behind by a lost answer
        as one in Redis can be), so there is none to look for."""
        # Locks in one order everywhere (the account row, then reservations), so Postgres never deadlocks.
        if cap_ucr is None:  # nothing to compare with: no need to read before adding
            row = _ADD.first(connection, {**_keys(account), "bill": actual_ucr, "held": 0})
            if row is None:
                self._seed(connection, account)
                row = _ADD.one(connection, {**_keys(account), "bill": actual_ucr, "held": 0})
            bill, used, reserved = actual_ucr, int(row[0]), int(row[1])
            held = self._take(connection, account, reservation_id, portion_ucr)
            if held:
                reserved -= held
                _ADD.rows(connection, {**_keys(account), "bill": 0, "held": held})
        else:
            used, reserved = self._lock(connection, account)
            held = self._take(connection, account, reservation_id, portion_ucr)
            bill = settle(actual_ucr, reserved_for_this_ucr=held, used_ucr=used, reserved_ucr=reserved,
                          limit=_limit(cap_ucr)).bill_ucr
            used, reserved = used + bill, reserved - held
            self._set(connection, account, used, reserved)
        hour, previous_hour = self._add_spend(connection, account.customer_id, bill, now)
        return Settled(bill, used, reserved, hour, previous_hour)

    def release(self, account: Account, reservation_id: str) -> None:
        with self._transaction() as connection:
            used, reserved = self._lock(connection, account)
            self._set(connection, account, used, reserved - self._end(connection, account, reservation_id))

    def snapshot(self, account: Account, now: datetime) -> Snapshot:
        with self._transaction() as connection:
            used = _USED.scalar(connection, _keys(account))
            live = _LIVE.one(connection, {**_keys(account), "now": now})[0]
        return Snapshot(int(used or 0), int(live))

    def hour_spend(self, customer_id: str, now: datetime) -> tuple[int, int]:
        with self._transaction() as connection:
            return self._hours(connection, customer_id, hour_index(now))

    def rebuild(self, account: Account, used_ucr: int) -> None:
        with self._transaction() as connection:
            _, reserved = self._lock(connection, account)
            self._set(connection, account, used_ucr, reserved)
