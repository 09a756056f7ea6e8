"""The relay: claims due outbox events, hands them to the sink, stores what happened.

Runs inside the proxy (a thread with its own event loop, so LiteLLM's loop never waits on it) and
as `meterline relay` workers; any number may run against Postgres, each claiming disjoint rows
under a lease. A worker killed mid-send leaves its rows `sending`; when the lease runs out another
worker takes them, marks them uncertain and resends with the same identifier, which the sink
dedupes. So nothing is lost and nothing is billed twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from plugin.ledger import store as ledger_store
from plugin.outbox import store
from plugin.outbox.retry import (
    UNKNOWN_REASON,
    RetryPolicy,
    Status,
    Step,
    decide,
    may_resend,
)
from plugin.outbox.store import Claimed
from plugin.sinks.base import MeterEvent, Outcome, OutcomeKind, Sink

log = logging.getLogger("meterline.relay")


def worker_name() -> str:
    """host:pid:random, so a lease names the process that holds it."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class DrainReport:
    """What one or more drains did, by resulting status."""

    claimed: int = 0
    statuses: Counter = field(default_factory=Counter)

    def add(self, other: DrainReport) -> None:
        self.claimed += other.claimed
        self.statuses.update(other.statuses)

    def summary(self) -> str:
        parts = ", ".join(f"{count} {status}" for status, count in sorted(self.statuses.items()))
        return f"{self.claimed} claimed" + (f": {parts}" if parts else "")


@dataclass
class RelayOptions:
    batch: int = 500
    """Events claimed per round trip to the database."""
    lease: timedelta = timedelta(seconds=60)
    """How long a claim is exclusive; must outlast sending one batch."""
    concurrency: int = 16
    """Sink calls in flight at once (for Stripe v1: customers sent to in parallel)."""
    poll_seconds: float = 1.0
    alert_age: timedelta = timedelta(minutes=15)
    """Raise an `outbox_stale` alert when the oldest waiting event is older than this."""
    check_every: timedelta = timedelta(seconds=30)
    """How often a running relay looks at the queue's age (a query over every undelivered event)."""
    policy: RetryPolicy = RetryPolicy()


class Relay:
    def __init__(self, engine: Engine, sink: Sink, *, options: RelayOptions | None = None, worker: str | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), jitter: Callable[[], float] = random.random,
                 on_outcomes: Callable[[str, Sequence[Step]], None] | None = None) -> None:
        self.engine = engine
        self.sink = sink
        self.options = options or RelayOptions()
        self.worker = worker or worker_name()
        self.clock = clock
        self.jitter = jitter
        self.on_outcomes = on_outcomes
        self._last_stale_alert: datetime | None = None

    async def drain_once(self) -> DrainReport:
        """Claim one batch, send it, record the results."""
        claimed = await asyncio.to_thread(
            store.claim, self.engine, self.worker, limit=self.options.batch, now=self.clock(),
            lease=self.options.lease, one_customer_per_worker=self.sink.serial_per_customer,
            max_customers=self.options.concurrency,
        )
        if not claimed:
            return DrainReport()
        steps = await self._deliver(claimed)
        # Shielded: once the sink has answered, the answer must be stored even if we are being cancelled.
        await asyncio.shield(asyncio.to_thread(store.record, self.engine, self.worker, steps, self.clock()))
        report = DrainReport(claimed=len(claimed), statuses=Counter(step.status.value for _, step in steps))
        if self.on_outcomes is not None:
            self.on_outcomes(self.sink.name, [step for _, step in steps])
        _log_problems(steps)
        return report

    async def drain(self) -> DrainReport:
        """Drain until nothing is due (events scheduled for later are left for later)."""
        total = DrainReport()
        while (report := await self.drain_once()).claimed:
            total.add(report)
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: send batch after batch while there is a backlog (a full claim), look at the
        queue's age now and then, and otherwise wait for the poll interval (or `stop`).

        Waiting after a partial claim is what batches a steady trickle: chasing each new event the
        moment it is written would cost a claim, a sink call and a record per request, in the proxy's
        own process. `stop` is checked between batches, so a busy relay still stops promptly."""
        next_check = self.clock()
        while not stop.is_set():
            backlog = False
            try:
                backlog = (await self.drain_once()).claimed >= self.options.batch
                if self.clock() >= next_check:
                    await asyncio.to_thread(self.check_staleness)
                    next_check = self.clock() + self.options.check_every
            except Exception:  # the relay must outlive a database or sink hiccup; the error is logged
                log.exception("relay round failed; retrying in %.1f s", self.options.poll_seconds)
            if backlog:
                continue
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.options.poll_seconds)
            except TimeoutError:
                continue

    def check_staleness(self) -> bool:
        """Alert (once per `alert_age`) when the oldest waiting event is older than `alert_age`."""
        now = self.clock()
        age = store.stats(self.engine).oldest_age_seconds(now)
        limit = self.options.alert_age
        if age <= limit.total_seconds():
            return False
        if self._last_stale_alert is not None and now - self._last_stale_alert < limit:
            return False
        self._last_stale_alert = now
        message = (f"the oldest undelivered meter event is {int(age)} s old (alert threshold "
                   f"{int(limit.total_seconds())} s): is the sink reachable? see `meterline outbox list`")
        ledger_store.add_alert(self.engine, "outbox_stale", message)
        log.warning(message)
        return True

    async def _deliver(self, claimed: list[Claimed]) -> list[tuple[Claimed, Step]]:
        now = self.clock()
        window, policy = self.sink.dedupe_window, self.options.policy
        steps: list[tuple[Claimed, Step]] = []
        sendable = []
        for event in claimed:
            if may_resend(event.uncertain, event.first_attempt_at, now, window, policy):
                sendable.append(event)
            else:
                steps.append((event, Step(Status.UNKNOWN, reason=UNKNOWN_REASON, uncertain=True)))
        sink_ids = await asyncio.to_thread(
            store.stripe_customer_ids, self.engine, (event.customer_id for event in sendable)
        )
        semaphore = asyncio.Semaphore(self.options.concurrency)

        async def send_lane(lane: list[Claimed]) -> None:
            async with semaphore:
                for start in range(0, len(lane), self.sink.max_batch):
                    chunk = lane[start:start + self.sink.max_batch]
                    outcomes = await self._send(chunk, sink_ids)
                    answered = self.clock()
                    steps.extend(
                        (event, decide(outcome, attempts=event.attempts, first_attempt_at=event.first_attempt_at,
                                       uncertain=event.uncertain, now=answered, jitter=self.jitter(),
                                       dedupe_window=window, policy=policy))
                        for event, outcome in zip(chunk, outcomes, strict=True)
                    )

        await asyncio.gather(*(send_lane(lane) for lane in self._lanes(sendable)))
        return steps

    def _lanes(self, events: list[Claimed]) -> list[list[Claimed]]:
        """Sequences of events to send one call after another: one lane per customer when the sink
        forbids concurrent calls per customer, else one lane per batch."""
        if self.sink.serial_per_customer:
            by_customer: dict[str, list[Claimed]] = defaultdict(list)
            for event in events:
                by_customer[event.customer_id].append(event)
            return list(by_customer.values())
        size = self.sink.max_batch
        return [events[start:start + size] for start in range(0, len(events), size)]

    async def _send(self, chunk: list[Claimed], sink_ids: dict[str, str | None]) -> Sequence[Outcome]:
        events = [
            MeterEvent(event.id, event.customer_id, event.value_ucr, event.occurred_at, sink_ids.get(event.customer_id),
                       event.requeues, event.attempts)
            for event in chunk
        ]
        try:
            return await self.sink.send(events)
        except Exception as error:  # a sink bug must not strand the batch: retry it, as possibly sent
            log.exception("sink %s failed on a batch of %d", self.sink.name, len(events))
            return [Outcome(OutcomeKind.RETRY, f"sink error: {error.__class__.__name__}", uncertain=True)] * len(events)


def _log_problems(steps: Sequence[tuple[Claimed, Step]]) -> None:
    """One warning per distinct problem in a batch, not one per event: a bad key dead-letters thousands."""
    problems: dict[tuple[Status, str], list[str]] = defaultdict(list)
    for event, step in steps:
        if step.status in (Status.DEAD, Status.UNKNOWN):
            problems[(step.status, step.reason)].append(event.id)
    for (status, reason), ids in problems.items():
        log.warning("%d outbox event(s) are %s (e.g. %s): %s", len(ids), status, ids[0], reason)


class RelayThread:
    """A relay on its own thread and event loop, for running inside the proxy."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="meterline-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(timeout=10)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self.relay.run(self._stop)
        finally:
            await self.relay.sink.aclose()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=timeout)
