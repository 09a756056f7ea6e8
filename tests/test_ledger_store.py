"""The ledger store and its group-commit writer, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from plugin.ledger import store
from plugin.ledger.store import make_engine
from plugin.ledger.writer import LedgerWriter
from plugin.rules.records import BillingRecord, LedgerRow


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    store.add_customer(engine, "acme", "pro")
    store.add_customer(engine, "globex", "free")
    yield engine
    engine.dispose()


def entry(ledger_id: str, customer_id: str = "acme", credits: int = 1000, **fields) -> LedgerRow:
    values = dict(
        id=ledger_id, customer_id=customer_id, model="m", prompt_tokens=10, completion_tokens=5,
        credits_ucr=credits, created_at=datetime.now(UTC),
    )
    values.update(fields)
    return LedgerRow(**values)


def test_write_is_idempotent_per_ledger_id(engine):
    assert store.write_records(engine, [BillingRecord(entry("a")), BillingRecord(entry("b"))]) == 2
    assert store.write_records(engine, [BillingRecord(entry("a", credits=999_999))]) == 0
    rows = {row.id: row.credits_ucr for row in store.ledger_rows(engine)}
    assert rows == {"a": 1000, "b": 1000}
    assert store.list_outbox_ids(engine) == ["a", "b"]


def test_zero_credit_rows_make_no_meter_event_and_alerts_are_written_with_their_row(engine):
    store.write_records(engine, [
        BillingRecord(entry("hit", credits=0, cache_hit=True, saved_ucr=500)),
        BillingRecord(entry("zero", credits=0), alert="15 tokens billed 0"),
    ])
    assert store.list_outbox_ids(engine) == []
    [alert] = store.list_alerts(engine)
    assert (alert.kind, alert.subject_id, alert.customer_id) == ("unbilled_tokens", "zero", "acme")


def test_a_failing_batch_writes_nothing(engine):
    bad = entry("bad", customer_id="x" * 65)  # longer than the column allows on Postgres; on SQLite a NULL model
    if engine.dialect.name == "sqlite":
        bad = entry("bad", model=None)
    with pytest.raises(DBAPIError):
        store.write_records(engine, [BillingRecord(entry("good")), BillingRecord(bad)])
    assert list(store.ledger_rows(engine)) == []
    assert store.list_outbox_ids(engine) == []


def test_keys_resolve_until_revoked_and_are_stored_hashed(engine):
    key_id, secret = store.create_key(engine, "acme")
    assert store.customer_for_secret(engine, secret) == "acme"
    with engine.connect() as connection:
        stored = connection.execute(text("select key_hash from api_keys")).scalars().all()
    assert secret not in stored and store.hash_key(secret) in stored
    store.revoke_key(engine, key_id)
    assert store.customer_for_secret(engine, secret) is None
    with pytest.raises(store.StoreError):
        store.create_key(engine, "nobody")


async def test_group_commit_writer_commits_every_concurrent_write_once(engine):
    writer = LedgerWriter(engine, max_batch=64)
    try:
        await asyncio.gather(*(writer.write(BillingRecord(entry(f"row-{n}", credits=n + 1))) for n in range(500)))
        # a duplicate in a later batch changes nothing
        await writer.write(BillingRecord(entry("row-0", credits=123456)))
    finally:
        writer.close()
    rows = list(store.ledger_rows(engine))
    assert len(rows) == 500
    assert sum(row.credits_ucr for row in rows) == sum(range(1, 501))
    assert len(store.list_outbox_ids(engine)) == 500


async def test_writer_reports_a_failed_commit_to_every_waiter(engine):
    writer = LedgerWriter(engine)
    engine_for_bad_row = entry("x", customer_id="acme", model=None)
    try:
        with pytest.raises(DBAPIError):
            await writer.write(BillingRecord(engine_for_bad_row))
        await writer.write(BillingRecord(entry("after")))  # the writer keeps going after a failure
    finally:
        writer.close()
    assert [row.id for row in store.ledger_rows(engine)] == ["after"]


async def test_an_idle_writer_commits_sqlite_rows_at_once_and_never_waits_for_a_lock(tmp_path):
    """With the writer thread idle a row is committed on the caller's thread (no hand-off); while
    another connection holds SQLite's write lock it goes to the writer thread, which waits for the
    lock, and the event loop keeps running meanwhile."""
    import sqlite3
    import threading

    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.add_customer(engine, "acme", "pro")
    committed_by: list[str] = []

    def note_thread(connection, record: BillingRecord) -> BillingRecord:
        committed_by.append(threading.current_thread().name)
        return record

    writer = LedgerWriter(engine)
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    try:
        await writer.write(BillingRecord(entry("idle")), note_thread)
        assert committed_by == [threading.current_thread().name]
        other.execute("BEGIN IMMEDIATE")
        waiting = asyncio.ensure_future(writer.write(BillingRecord(entry("locked")), note_thread))
        ticks = 0
        for _ in range(20):  # the event loop is free while the row waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not waiting.done()
        other.execute("ROLLBACK")
        await asyncio.wait_for(waiting, 10)
        assert committed_by[1] == "meterline-ledger-writer"
        await writer.write(BillingRecord(entry("idle-again")), note_thread)
        assert committed_by[2] == threading.current_thread().name
    finally:
        other.close()
        writer.close()
        engine.dispose()
    assert {row.id for row in store.ledger_rows(engine)} == {"idle", "locked", "idle-again"}


def test_a_database_from_an_earlier_build_gets_the_new_columns(tmp_path):
    """The metering core's outbox had no delivery columns: opening it adds them, keeping its rows."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE outbox (id VARCHAR(100) PRIMARY KEY, customer_id VARCHAR(64) NOT NULL, value_ucr BIGINT "
            "NOT NULL, occurred_at DATETIME NOT NULL, status VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, "
            "next_attempt_at DATETIME NOT NULL, last_error TEXT)")
        connection.execute("INSERT INTO outbox VALUES ('old', 'acme', 5, '2026-11-01 00:00:00', 'pending', 0, "
                           "'2026-11-01 00:00:00', NULL)")
    engine = make_engine(f"sqlite:///{path}")
    from plugin.outbox import store as outbox

    [event] = outbox.list_events(engine)
    assert (event.id, event.uncertain, event.requeues, event.claimed_by, event.first_attempt_at) == (
        "old", False, 0, None, None)
    make_engine(f"sqlite:///{path}").dispose()  # a second start finds nothing to add
    engine.dispose()


async def test_a_settlement_runs_in_the_writers_transaction_once_per_ledger_id(engine):
    """The embedded counters settle inside the ledger's transaction: counters and row commit together,
    a repeated write settles nothing, and a failing settlement writes nothing."""
    from dataclasses import replace

    from plugin.counters.base import Account
    from plugin.counters.sql import SqlCounterStore

    counters = SqlCounterStore(engine)
    account = Account("acme", datetime(2026, 11, 1, tzinfo=UTC))
    calls: list[str] = []

    def settle(connection, record: BillingRecord) -> BillingRecord:
        calls.append(record.entry.id)
        settled = counters.settle_on(connection, account, record.entry.id, record.entry.credits_ucr,
                                     cap_ucr=1500, now=datetime.now(UTC))
        return replace(record, entry=replace(record.entry, credits_ucr=settled.billed_ucr))

    writer = LedgerWriter(engine)
    try:
        first = await writer.write(BillingRecord(entry("s1", credits=1000)), settle)
        second = await writer.write(BillingRecord(entry("s2", credits=1000)), settle)  # only 500 fit under 1,500
        again = await writer.write(BillingRecord(entry("s2", credits=1000)), settle)  # already in the ledger

        def refuse(connection, record):
            raise DBAPIError("settle", {}, Exception("boom"))

        with pytest.raises(DBAPIError):
            await writer.write(BillingRecord(entry("s3", credits=1000)), refuse)
    finally:
        writer.close()
    assert (first.entry.credits_ucr, second.entry.credits_ucr, again.entry.credits_ucr) == (1000, 500, 1000)
    assert calls == ["s1", "s2"]
    assert {row.id: row.credits_ucr for row in store.ledger_rows(engine)} == {"s1": 1000, "s2": 500}
    assert counters.snapshot(account, datetime.now(UTC)).used_ucr == 1500


def test_the_proxy_checkpoints_the_wal_off_the_request_path(tmp_path):
    """With the checkpointer running, commits never checkpoint (automatic checkpoints are off on every
    pooled connection) and its own thread checkpoints every interval."""
    import time

    from plugin.ledger.checkpoint import WalCheckpointer

    class Counting(WalCheckpointer):
        runs = 0

        def checkpoint(self) -> None:
            Counting.runs += 1
            super().checkpoint()

    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000  # SQLite's default
    checkpointer = Counting(engine, interval=0.05)
    checkpointer.start()
    try:
        for n in range(20):
            store.write_records(engine, [BillingRecord(entry(f"w{n}"))])
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        deadline = time.monotonic() + 5
        while Counting.runs < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Counting.runs >= 3 and checkpointer.running
    finally:
        checkpointer.stop()
    assert not checkpointer.running
    assert len(list(store.ledger_rows(engine))) == 20
    engine.dispose()
