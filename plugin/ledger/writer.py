"""Group commit: one writer thread turns many concurrent ledger writes into few transactions.

The request path awaits its own row's commit (so a response the client received is in the
ledger), but the event loop never blocks on the database: rows queue up, the writer thread
commits whatever has gathered in one transaction, and each waiting request is woken with the
outcome of the transaction that carried its row.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from sqlalchemy import Engine

from plugin.ledger.store import BillingRecord, Settle, record_batch

log = logging.getLogger("meterline.ledger")

_STOP = object()


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
        self._thread = threading.Thread(target=self._run, name="meterline-ledger-writer", daemon=True)
        self._thread.start()

    async def write(self, record: BillingRecord, settle: Settle | None = None) -> BillingRecord:
        """Commit `record` (after `settle`, in the same transaction, may change it); returns it as written."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Pending(record, settle, loop, future))
        # Shielded: a client that goes away must not cancel the wait for its own bill.
        return await asyncio.shield(future)

    def close(self, timeout: float = 10.0) -> None:
        """Drain what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

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
            self._commit(batch)
            if stop_after:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        settlements = {pending.record.entry.id: pending.settle for pending in batch if pending.settle is not None}
        try:
            written = record_batch(self._engine, [pending.record for pending in batch], settlements)
        except Exception as exc:  # every waiter must hear the outcome, whatever it is
            log.error("ledger write of %d rows failed: %s", len(batch), exc.__class__.__name__)
            for pending in batch:
                _resolve(pending, None, exc)
            return
        for pending in batch:
            # A row already in the ledger (a repeated write) is answered with the record as given.
            _resolve(pending, written.get(pending.record.entry.id, pending.record), None)


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
