"""Group commit: one writer thread turns many concurrent ledger writes into few transactions.

The request path awaits its own row's commit (so a response the client received is in the
ledger). Rows queue up, the writer thread commits whatever has gathered in one transaction, and
each waiting request is woken with the outcome of the transaction that carried its row.

On SQLite, a row that finds the writer idle is committed at once on the caller's thread instead
(`_Inline`): handing it to the writer thread costs more than the commit itself, because the
thread must win the GIL back from the event loop, which is busy with the proxy's own work
after every response (bench/RESULTS.md: ~1 ms at the median). The inline commit takes the
write lock with `BEGIN IMMEDIATE` and no busy timeout, so it never waits: if another
connection holds the lock the row goes to the writer thread as before. Postgres is always
written by the writer thread (a network round trip must not block the event loop).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from plugin.ledger.prepared import Prepared
from plugin.ledger.store import Settle, record_batch, record_on
from plugin.rules.records import BillingRecord

log = logging.getLogger("meterline.ledger")

_STOP = object()
_BEGIN_IMMEDIATE = Prepared(text("BEGIN IMMEDIATE"))


@dataclass
class _Pending:
    record: BillingRecord
    settle: Settle | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class LedgerWriter:
    """Owns the single writer thread. `await writer.write(record)` returns once it is committed.

    A write may carry a settlement (`plugin.ledger.store.Settle`) that runs in the batch's
    transaction: the embedded counter store settles there, at no extra commit."""

    def __init__(self, engine: Engine, max_batch: int = 256) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._committing = False
        """The writer thread is committing a batch: a new row joins the next one instead of competing."""
        self._inline = _Inline(engine) if engine.dialect.name == "sqlite" else None
        self._thread = threading.Thread(target=self._run, name="meterline-ledger-writer", daemon=True)
        self._thread.start()

    async def write(self, record: BillingRecord, settle: Settle | None = None) -> BillingRecord:
        """Commit `record` (after `settle`, in the same transaction, may change it); returns it as written."""
        if self._inline is not None and not self._committing and self._queue.empty():
            written = self._inline.write(record, settle)
            if written is not None:
                return written
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Pending(record, settle, loop, future))
        # Shielded: a client that goes away must not cancel the wait for its own bill.
        return await asyncio.shield(future)

    def close(self, timeout: float = 10.0) -> None:
        """Drain what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._inline is not None:
            self._inline.close()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop_after = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    break
                batch.append(item)
            self._committing = True
            try:
                written, error = self._commit(batch)
            finally:
                # Before the waiters wake: a row written by one of them at once may be committed inline.
                self._committing = False
            for pending in batch:
                # A row already in the ledger (a repeated write) is answered with the record as given.
                _resolve(pending, None if error else written.get(pending.record.entry.id, pending.record), error)
            if stop_after:
                return

    def _commit(self, batch: list[_Pending]) -> tuple[dict[str, BillingRecord], Exception | None]:
        """The batch's records as written, or the failure every waiter must hear, whatever it is."""
        settlements = {pending.record.entry.id: pending.settle for pending in batch if pending.settle is not None}
        try:
            return record_batch(self._engine, [pending.record for pending in batch], settlements), None
        except Exception as exc:
            log.error("ledger write of %d rows failed: %s", len(batch), exc.__class__.__name__)
            return {}, exc


def _resolve(pending: _Pending, record: BillingRecord | None, error: BaseException | None) -> None:
    def settle() -> None:
        if pending.future.done():
            return
        if error is None:
            pending.future.set_result(record)
        else:
            pending.future.set_exception(error)

    if pending.loop.is_closed():
        return
    pending.loop.call_soon_threadsafe(settle)


class _Inline:
    """Commits one row on the caller's thread when nobody holds SQLite's write lock; never waits for it."""

    BURST_SECONDS = 0.002
    """A write this soon after the last inline one is part of a burst: it goes to the writer thread,
    where the rows arriving with it share one commit (an inline commit per row costs twice the CPU
    of a shared one under load)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: Connection | None = None
        self._lock = threading.Lock()
        """One caller at a time (the connection is this object's alone); a second one uses the writer thread."""
        self._last_end = 0.0

    def write(self, record: BillingRecord, settle: Settle | None) -> BillingRecord | None:
        """The record as committed, or None when it should be queued: part of a burst, or the write
        lock (or this connection) is taken."""
        if time.monotonic() - self._last_end < self.BURST_SECONDS or not self._lock.acquire(blocking=False):
            return None
        try:
            connection = self._connect()
            with connection.begin():
                try:
                    _BEGIN_IMMEDIATE.rows(connection)
                except OperationalError:  # "database is locked": someone is writing; nothing was done
                    return None
                written = record_on(connection, [record], {record.entry.id: settle} if settle else None)
            # A row already in the ledger (a repeated write) is answered with the record as given.
            return written.get(record.entry.id, record)
        finally:
            self._last_end = time.monotonic()
            self._lock.release()

    def _connect(self) -> Connection:
        if self._connection is None:
            connection = self._engine.connect()
            connection.detach()  # its own for good: closing it must not return a pool connection without a busy timeout
            connection.exec_driver_sql("PRAGMA busy_timeout=0")
            connection.commit()
            self._connection = connection
        return self._connection

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
