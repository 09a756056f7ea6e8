"""SQLite WAL checkpoints off the request path.

By default SQLite checkpoints (copies the write-ahead log back into the database) inside whichever
commit pushes the log past 1,000 pages: that commit takes several milliseconds instead of a
fraction of one. In the proxy that commit is a request's ledger write, so about one request in a
hundred paid for it (measured: 27 of 3,000 ledger writes over 2 ms with automatic checkpoints, 1
without). The proxy turns automatic checkpoints off and runs PASSIVE checkpoints from this thread
instead: they never block writers. Other processes on the same file (CLI, `meterline relay`) keep
SQLite's default, so the log is checkpointed even when no proxy runs.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger("meterline.ledger")


def _no_automatic_checkpoints(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


class WalCheckpointer:
    """Checkpoints the WAL every `interval` seconds on its own thread (SQLite only; a no-op otherwise)."""

    def __init__(self, engine: Engine, interval: float = 0.5) -> None:
        self._engine = engine
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._engine.dialect.name != "sqlite" or self._thread is not None:
            return
        event.listen(self._engine, "connect", _no_automatic_checkpoints)
        self._engine.dispose()  # pooled connections reopen with automatic checkpoints off
        self._thread = threading.Thread(target=self._run, name="meterline-wal-checkpoint", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        self._thread = None
        self.checkpoint()  # leave a short log behind

    def checkpoint(self) -> None:
        try:
            with self._engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except SQLAlchemyError as error:  # the log only grows until the next one succeeds
            log.error("meterline: WAL checkpoint failed: %s", error.__class__.__name__)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.checkpoint()
