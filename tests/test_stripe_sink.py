"""StripeSink against the local Stripe emulator: each answer Stripe can give, as the relay sees it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from plugin.settings import MeterlineConfig
from plugin.sinks.base import MeterEvent, OutcomeKind
from plugin.sinks.stripe import StripeConfig, StripeSink
from plugin.stripe.setup import StripeSetup
from tests.support.delivery import PRICED_YAML
from tests.support.processes import free_port
from tests.support.stripe_emulator import (
    DEFAULT_API_KEY,
    StripeEmulator,
    run_stripe_emulator,
)


@pytest.fixture(scope="module")
def emulator() -> Iterator[StripeEmulator]:
    with run_stripe_emulator() as server:
        yield server


@pytest.fixture
def customer(emulator) -> str:
    """A fresh account: meter, prices and one customer."""
    emulator.reset()
    StripeSetup(emulator.client(), MeterlineConfig.model_validate(PRICED_YAML)).run()
    return emulator.client().v1.customers.create({"name": "sink"}).id


def sink(emulator: StripeEmulator, *, stream: bool = False, timeout: float = 5.0, base: str | None = None) -> StripeSink:
    return StripeSink(StripeConfig(api_key=DEFAULT_API_KEY, api_base=base or emulator.base_url, stream=stream,
                                   timeout_seconds=timeout))


def event(identifier: str, customer: str | None, value: int = 1500, at: datetime | None = None) -> MeterEvent:
    return MeterEvent(identifier, "acme", value, at or datetime.now(UTC) - timedelta(seconds=1), customer)


async def test_delivered_then_duplicate_on_a_new_idempotency_key(emulator, customer):
    stripe_sink = sink(emulator)
    try:
        sent = event("mtr_s1", customer)  # one event: two made a second apart would differ in `timestamp`
        [first] = await stripe_sink.send([sent])
        [replayed] = await stripe_sink.send([sent])  # same key, same params: replay
        [duplicate] = await stripe_sink.send([MeterEvent("mtr_s1", "acme", 1500, datetime.now(UTC), customer,
                                                         requeues=1)])  # new key, known identifier
    finally:
        await stripe_sink.aclose()
    assert (first.kind, replayed.kind, duplicate.kind) == (OutcomeKind.DELIVERED, OutcomeKind.DELIVERED,
                                                          OutcomeKind.DUPLICATE)
    assert [e["identifier"] for e in emulator.meter_events()] == ["mtr_s1"]
    assert emulator.meter_events()[0]["value"] == "1500"


async def test_refusals_decided_without_calling_stripe(emulator, customer):
    stripe_sink = sink(emulator)
    calls = emulator.calls().get("POST /v1/billing/meter_events", 0)
    try:
        held, old, future = await stripe_sink.send([event("mtr_h", None)]) + await stripe_sink.send(
            [event("mtr_old", customer, at=datetime.now(UTC) - timedelta(days=36))]) + await stripe_sink.send(
            [event("mtr_future", customer, at=datetime.now(UTC) + timedelta(minutes=10))])
    finally:
        await stripe_sink.aclose()
    assert (held.kind, old.kind, future.kind) == (OutcomeKind.NO_CUSTOMER, OutcomeKind.REJECTED, OutcomeKind.REJECTED)
    assert "set-stripe" in held.reason and "35 days" in old.reason and "5 minutes" in future.reason
    assert emulator.calls().get("POST /v1/billing/meter_events", 0) == calls


async def test_stripe_refusals_and_failures(emulator, customer):
    stripe_sink = sink(emulator)
    try:
        [unknown] = await stripe_sink.send([event("mtr_u", "cus_nobody")])
        emulator.fail_next(1, status=429)
        [limited] = await stripe_sink.send([event("mtr_r", customer)])
        emulator.fail_next(1, status=500)
        [failed] = await stripe_sink.send([event("mtr_f", customer)])
    finally:
        await stripe_sink.aclose()
    assert (unknown.kind, unknown.uncertain) == (OutcomeKind.REJECTED, False)
    assert "No such customer" in unknown.reason and DEFAULT_API_KEY not in unknown.reason
    assert (limited.kind, limited.uncertain) == (OutcomeKind.RETRY, False)
    assert (failed.kind, failed.uncertain) == (OutcomeKind.RETRY, True)


async def test_network_failures_say_whether_the_event_may_have_landed(emulator, customer):
    nobody = sink(emulator, base=f"http://127.0.0.1:{free_port()}")  # nothing listens: never sent
    slow = sink(emulator, timeout=0.3)
    emulator.delay(1500)  # Stripe records it, but answers after our timeout
    try:
        [refused] = await nobody.send([event("mtr_n", customer)])
        [timed_out] = await slow.send([event("mtr_t", customer)])
    finally:
        emulator.delay(0)
        await nobody.aclose()
        await slow.aclose()
    assert (refused.kind, refused.uncertain) == (OutcomeKind.RETRY, False)
    assert (timed_out.kind, timed_out.uncertain) == (OutcomeKind.RETRY, True)


async def test_v2_stream_sends_a_batch_and_renews_an_expired_session(emulator, customer):
    stripe_sink = sink(emulator, stream=True)
    try:
        outcomes = await stripe_sink.send([event(f"mtr_v2_{n}", customer, value=n + 1) for n in range(100)])
        emulator.advance_clock(16 * 60)  # the 15-minute session expired at Stripe, not by our clock
        again = await stripe_sink.send([event("mtr_v2_late", customer)])
    finally:
        await stripe_sink.aclose()
    assert {outcome.kind for outcome in outcomes + again} == {OutcomeKind.DELIVERED}
    recorded = {e["identifier"]: e for e in emulator.meter_events()}
    assert len(recorded) == 101 and recorded["mtr_v2_41"]["value"] == "42" and recorded["mtr_v2_41"]["source"] == "v2"
    assert emulator.calls()["POST /v2/billing/meter_event_session"] == 2
    assert emulator.calls()["POST /v2/billing/meter_event_stream"] == 3  # the refused call was retried once
