"""The relay's own logic (lanes, leases, outcomes, staleness) with a scripted in-memory sink.

The same relay against real sinks (the Stripe emulator, an OpenMeter server) is in
test_delivery_stripe.py and test_openmeter_sink.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from plugin.ledger import store as ledger
from plugin.ledger.store import make_engine
from plugin.outbox import store
from plugin.outbox.relay import Relay, RelayOptions
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.sinks.base import DELIVERED, DUPLICATE, MeterEvent, Outcome, OutcomeKind

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class ScriptedSink:
    """Answers from a script keyed by identifier (default: delivered) and checks per-customer exclusivity."""

    name = "scripted"

    def __init__(self, *, serial: bool = True, max_batch: int = 1, window=timedelta(hours=24)) -> None:
        self.serial_per_customer = serial
        self.max_batch = max_batch
        self.dedupe_window = window
        self.script: dict[str, list[Outcome]] = {}
        self.calls: list[list[MeterEvent]] = []
        self.in_flight: Counter = Counter()
        self.overlaps = 0
        self.received: Counter = Counter()

    async def send(self, events: Sequence[MeterEvent]) -> list[Outcome]:
        assert len(events) <= self.max_batch
        self.calls.append(list(events))
        customers = {event.customer_id for event in events}
        for customer in customers:
            self.in_flight[customer] += 1
            self.overlaps += self.in_flight[customer] > 1
        await asyncio.sleep(0.001)
        for customer in customers:
            self.in_flight[customer] -= 1
        outcomes = []
        for event in events:
            scripted = self.script.get(event.identifier)
            outcome = scripted.pop(0) if scripted else DELIVERED
            if outcome.kind in (OutcomeKind.DELIVERED, OutcomeKind.DUPLICATE):
                self.received[event.identifier] += 1
            outcomes.append(outcome)
        return outcomes

    async def aclose(self) -> None:
        return None


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'relay.db'}")
    for customer in ("acme", "globex", "initech"):
        ledger.add_customer(engine, customer, "pro", f"cus_{customer}")
    ledger.add_customer(engine, "nostripe", "pro")
    yield engine
    engine.dispose()


def put(engine, count: int, customer: str = "acme", at: datetime = T0, prefix: str | None = None) -> list[str]:
    ids = [f"{prefix or customer}-{n:04d}" for n in range(count)]
    ledger.write_records(engine, [
        BillingRecord(LedgerRow(id=i, customer_id=customer, model="m", credits_ucr=1500, created_at=at)) for i in ids
    ])
    return ids


def relay(engine, sink, clock, **options) -> Relay:
    return Relay(engine, sink, options=RelayOptions(**options), worker="w1", clock=clock, jitter=lambda: 0.0)


async def test_drain_delivers_everything_with_customers_in_parallel_but_each_one_serially(engine):
    for customer in ("acme", "globex", "initech"):
        put(engine, 30, customer)
    sink = ScriptedSink(serial=True)
    report = await relay(engine, sink, Clock(), batch=40, concurrency=8).drain()
    assert report.claimed == 90 and report.statuses == {"delivered": 90}
    assert sink.overlaps == 0
    assert sorted(sink.received.values()) == [1] * 90
    first = sink.calls[0][0]
    assert (first.value_ucr, first.stripe_customer_id, first.occurred_at) == (1500, "cus_acme", T0)


async def test_batched_sinks_get_full_batches(engine):
    put(engine, 250)
    sink = ScriptedSink(serial=False, max_batch=100)
    await relay(engine, sink, Clock(), batch=500).drain()
    assert [len(call) for call in sink.calls] == [100, 100, 50]


async def test_outcomes_become_statuses(engine):
    [ok, dup, bad, flaky] = put(engine, 4)
    [held] = put(engine, 1, "nostripe")
    sink = ScriptedSink()
    sink.script = {dup: [DUPLICATE], bad: [Outcome(OutcomeKind.REJECTED, "stripe 400: bad")],
                   flaky: [Outcome(OutcomeKind.RETRY, "stripe 500", uncertain=True)],
                   held: [Outcome(OutcomeKind.NO_CUSTOMER, "no stripe id")]}
    clock = Clock()
    report = await relay(engine, sink, clock).drain()
    assert report.statuses == {"delivered": 2, "dead": 1, "pending": 1, "held": 1}
    [dead] = store.list_events(engine, status="dead")
    assert (dead.id, dead.last_error) == (bad, "stripe 400: bad")
    [pending] = store.list_events(engine, status="pending")
    assert pending.uncertain and pending.next_attempt_at is not None
    clock.now = T0 + timedelta(seconds=1)  # backoff for attempt 1 is 0.5 s with jitter 0
    assert (await relay(engine, sink, clock).drain()).statuses == {"delivered": 1}
    assert sink.received[flaky] == 1 and sink.received[ok] == 1


async def test_a_worker_killed_mid_send_loses_and_doubles_nothing(engine):
    """The first worker claims and sends, then dies before recording: its lease runs out, a second
    worker resends the same identifiers, the sink's dedupe answers duplicate, all end delivered once."""
    ids = put(engine, 20)
    clock = Clock()
    dying = store.claim(engine, "dead-worker", limit=10, now=clock(), lease=timedelta(seconds=60))
    assert len(dying) == 10  # sent (say) and never recorded
    sink = ScriptedSink()
    sink.script = {event.id: [DUPLICATE] for event in dying}
    clock.now = T0 + timedelta(seconds=61)
    report = await relay(engine, sink, clock).drain()
    assert report.statuses == {"delivered": 20}
    assert set(sink.received) == set(ids)


async def test_an_uncertain_event_past_the_dedupe_window_is_not_resent(engine):
    put(engine, 1)
    clock = Clock()
    store.claim(engine, "dead-worker", limit=10, now=clock(), lease=timedelta(seconds=60))
    clock.now = T0 + timedelta(hours=23, minutes=30)
    sink = ScriptedSink()
    report = await relay(engine, sink, clock).drain()
    assert report.statuses == {"unknown": 1} and sink.calls == []


async def test_a_sink_that_raises_leaves_the_batch_pending_and_uncertain(engine):
    put(engine, 3)

    class Broken(ScriptedSink):
        async def send(self, events):
            raise RuntimeError("bug")

    report = await relay(engine, Broken(serial=False, max_batch=10), Clock()).drain_once()
    assert report.statuses == {"pending": 3}
    assert all(event.uncertain for event in store.list_events(engine, status="pending"))


async def test_stale_queue_raises_one_alert_per_alert_age(engine):
    put(engine, 1, at=T0 - timedelta(minutes=20))
    clock = Clock()
    worker = relay(engine, ScriptedSink(), clock, alert_age=timedelta(minutes=15))
    assert worker.check_staleness() is True
    assert worker.check_staleness() is False
    clock.now = T0 + timedelta(minutes=16)
    assert worker.check_staleness() is True
    alerts = ledger.list_alerts(engine, "outbox_stale")
    assert len(alerts) == 2 and "meterline outbox list" in alerts[0].message


async def test_run_stops_when_told(engine):
    put(engine, 5)
    sink = ScriptedSink()
    worker = relay(engine, sink, Clock(), poll_seconds=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    for _ in range(100):
        if len(sink.received) == 5:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert len(sink.received) == 5


async def test_run_stops_between_batches_even_while_events_keep_coming(engine):
    """A busy proxy keeps the outbox full: stopping must not wait for it to empty."""
    put(engine, 5)

    class Endless(ScriptedSink):
        async def send(self, events):
            put(engine, 1, prefix=f"more-{len(self.calls)}")  # every call brings a new event
            return await super().send(events)

    sink = Endless()
    worker = relay(engine, sink, Clock(), batch=1)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    for _ in range(200):
        if len(sink.calls) >= 20:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert len(sink.calls) >= 20 and store.stats(engine).depth["pending"] >= 1
