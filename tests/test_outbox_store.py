"""Outbox queries (claim under a lease, record, re-queue, stats) on SQLite and a real PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from plugin.ledger import store as ledger
from plugin.ledger.store import make_engine
from plugin.outbox import store
from plugin.outbox.retry import Status, Step
from plugin.rules.records import BillingRecord, LedgerRow

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    ledger.add_customer(engine, "acme", "pro", "cus_acme")
    ledger.add_customer(engine, "globex", "pro")
    yield engine
    engine.dispose()


def put(engine, *ids: str, customer: str = "acme", at: datetime = T0, credits: int = 1000) -> None:
    ledger.write_records(engine, [
        BillingRecord(LedgerRow(id=event_id, customer_id=customer, model="m", credits_ucr=credits, created_at=at))
        for event_id in ids
    ])


def statuses(engine) -> dict[str, str]:
    return {event.id: event.status for event in store.list_events(engine, limit=1000)} | {
        event.id: event.status for event in store.list_events(engine, status=Status.DELIVERED, limit=1000)
    }


def test_claim_takes_due_events_oldest_first_under_a_lease(engine):
    put(engine, "b", at=T0 + timedelta(seconds=1))
    put(engine, "a")
    claimed = store.claim(engine, "w1", limit=10, now=T0 + timedelta(seconds=2), lease=LEASE)
    assert [(event.id, event.attempts, event.uncertain) for event in claimed] == [("a", 1, False), ("b", 1, False)]
    assert claimed[0].first_attempt_at == T0 + timedelta(seconds=2)
    assert claimed[0].value_ucr == 1000 and claimed[0].customer_id == "acme"
    assert store.claim(engine, "w2", limit=10, now=T0 + timedelta(seconds=3), lease=LEASE) == []


def test_events_not_yet_due_are_left_alone(engine):
    put(engine, "later", at=T0 + timedelta(minutes=5))
    assert store.claim(engine, "w1", limit=10, now=T0, lease=LEASE) == []


def test_an_expired_lease_is_reclaimed_as_uncertain(engine):
    """The first worker died mid-send: the event may have landed, so the next send is marked uncertain."""
    put(engine, "a")
    store.claim(engine, "dead-worker", limit=10, now=T0, lease=LEASE)
    assert store.claim(engine, "w2", limit=10, now=T0 + LEASE - timedelta(seconds=1), lease=LEASE) == []
    [again] = store.claim(engine, "w2", limit=10, now=T0 + LEASE + timedelta(seconds=1), lease=LEASE)
    assert (again.attempts, again.uncertain, again.first_attempt_at) == (2, True, T0)


def test_record_touches_only_rows_the_worker_still_holds(engine):
    put(engine, "a", "b")
    first = store.claim(engine, "w1", limit=10, now=T0, lease=LEASE)
    later = T0 + LEASE + timedelta(seconds=1)
    [taken_over] = store.claim(engine, "w2", limit=1, now=later, lease=LEASE)
    retry = Step(Status.PENDING, later + timedelta(seconds=5), "stripe 500", uncertain=True)
    store.record(engine, "w1", [(event, retry) for event in first], later)
    store.record(engine, "w2", [(taken_over, Step(Status.DELIVERED))], later)
    assert statuses(engine) == {"a": Status.DELIVERED, "b": Status.PENDING}
    [pending] = store.list_events(engine, status=Status.PENDING)
    assert (pending.last_error, pending.uncertain, pending.lease_until) == ("stripe 500", True, None)


def test_per_customer_claims_skip_customers_another_worker_is_sending(engine):
    put(engine, "a1", "a2")
    put(engine, "g1", customer="globex")
    mine = store.claim(engine, "w1", limit=1, now=T0, lease=LEASE, one_customer_per_worker=True)
    assert [event.id for event in mine] == ["a1"]
    theirs = store.claim(engine, "w2", limit=10, now=T0, lease=LEASE, one_customer_per_worker=True)
    assert [event.id for event in theirs] == ["g1"]
    store.record(engine, "w1", [(mine[0], Step(Status.DELIVERED))], T0)
    assert [event.id for event in store.claim(engine, "w2", limit=10, now=T0, lease=LEASE,
                                              one_customer_per_worker=True)] == ["a2"]


def test_per_customer_claims_take_at_most_max_customers_so_workers_share_them(engine):
    for customer in ("acme", "globex"):
        put(engine, *[f"{customer}-{n}" for n in range(3)], customer=customer)
    mine = store.claim(engine, "w1", limit=100, now=T0, lease=LEASE, one_customer_per_worker=True, max_customers=1)
    assert {event.customer_id for event in mine} == {"acme"} and len(mine) == 3
    theirs = store.claim(engine, "w2", limit=100, now=T0, lease=LEASE, one_customer_per_worker=True, max_customers=1)
    assert {event.customer_id for event in theirs} == {"globex"} and len(theirs) == 3


def test_requeue_dead_and_held_but_unknown_only_when_forced(engine):
    put(engine, "dead1", "dead2", "unknown", "held")
    claimed = {event.id: event for event in store.claim(engine, "w", limit=10, now=T0, lease=LEASE)}
    store.record(engine, "w", [
        (claimed["dead1"], Step(Status.DEAD, reason="400")), (claimed["dead2"], Step(Status.DEAD, reason="400")),
        (claimed["unknown"], Step(Status.UNKNOWN, reason="?", uncertain=True)),
        (claimed["held"], Step(Status.HELD, T0 + timedelta(hours=1), "no stripe id")),
    ], T0)
    assert store.requeue(engine, now=T0, ids=["dead1", "unknown"]) == 1
    assert store.requeue(engine, now=T0, ids=["unknown"], force=True) == 1
    assert store.requeue(engine, now=T0, all_dead=True) == 1
    assert store.requeue(engine, now=T0, ids=["held"]) == 1
    assert set(statuses(engine).values()) == {Status.PENDING}
    [again] = store.claim(engine, "w", limit=1, now=T0, lease=LEASE)
    assert (again.attempts, again.uncertain, again.requeues) == (1, False, 1)


def test_release_held_makes_a_customers_held_events_due(engine):
    put(engine, "g1", customer="globex")
    [event] = store.claim(engine, "w", limit=1, now=T0, lease=LEASE)
    store.record(engine, "w", [(event, Step(Status.HELD, T0 + timedelta(hours=1), "no stripe id"))], T0)
    assert store.claim(engine, "w", limit=1, now=T0, lease=LEASE) == []
    assert store.release_held(engine, "globex", T0) == 1
    assert [e.id for e in store.claim(engine, "w", limit=1, now=T0, lease=LEASE)] == ["g1"]


def test_stats_count_waiting_events_and_the_oldest(engine):
    put(engine, "old", at=T0 - timedelta(minutes=10))
    put(engine, "new", at=T0)
    stats = store.stats(engine)
    assert stats.depth["pending"] == 2 and stats.depth["dead"] == 0
    assert stats.oldest_age_seconds(T0) == 600
    claimed = store.claim(engine, "w", limit=10, now=T0, lease=LEASE)
    store.record(engine, "w", [(event, Step(Status.DELIVERED)) for event in claimed], T0)
    assert store.stats(engine).oldest_waiting_at is None


def test_stripe_customer_ids(engine):
    assert store.stripe_customer_ids(engine, ["acme", "globex", "acme"]) == {"acme": "cus_acme", "globex": None}


def test_concurrent_claims_never_share_a_row(engine):
    """Eight workers claim at once, many rounds: every event is claimed by exactly one of them."""
    put(engine, *[f"e{i:04d}" for i in range(400)])
    seen: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        for _ in range(100):  # bounded
            claimed = store.claim(engine, name, limit=7, now=T0, lease=LEASE)
            if not claimed:
                return
            with lock:
                seen.extend(event.id for event in claimed)

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(seen) == 400 and len(set(seen)) == 400
