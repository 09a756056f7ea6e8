"""Admission and settlement in-process, on real storage, with a simulated clock: a runaway loop
trips the breaker at the predicted request, a cool-down lets a trickle through and closes it
again; soft limits fire once per period. Runs with the counters in SQLite and in a real Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import update

from plugin import admission
from plugin.admission import Refused
from plugin.counters.base import Account, Settled, Snapshot
from plugin.ledger import accounts, store
from plugin.ledger.models import Customer
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.runtime import Meterline
from plugin.settings import MeterlineConfig, Settings, TermsOverride

M = 1_000_000
HOUR_START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
T0 = HOUR_START + timedelta(minutes=5)
CONFIG = MeterlineConfig.model_validate({
    "plans": {"pro": {"included_credits": 1000}, "payg": {"overage_usd_per_credit": "0.001"}},
    "policies": {"soft_thresholds_pct": [1, 2],
                 "breaker": {"floor_credits_per_hour": "5", "cool_down_minutes": 30, "trickle_requests": 3}},
})


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["embedded", "redis"])
def meterline(request, tmp_path) -> Iterator[Meterline]:
    redis_url = None
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'ledger.db'}", redis_url=redis_url, relay=False)
    meterline = Meterline(settings=settings, config=CONFIG)
    meterline.clock = Clock(T0)
    yield meterline
    meterline.close()


def customer_with_history(meterline: Meterline, customer_id: str, hourly_credits: int) -> None:
    """A customer for 30 days whose ledger shows `hourly_credits` an hour over the breaker's 7-day baseline."""
    store.add_customer(meterline.engine, customer_id, "pro")
    with meterline.engine.begin() as connection:
        connection.execute(update(Customer).where(Customer.id == customer_id)
                           .values(created_at=T0 - timedelta(days=30)))
    store.write_records(meterline.engine, [BillingRecord(LedgerRow(
        id=f"history-{customer_id}", customer_id=customer_id, model="m", credits_ucr=hourly_credits * 168 * M,
        created_at=HOUR_START - timedelta(days=3)))])


async def one_call(meterline: Meterline, customer_id: str, n: int, credits: int) -> None:
    """One request through admission: admit, bill `credits`, run the checks after billing."""
    admitted = await admission.admit(meterline, customer_id, f"{customer_id}-{n}", model="m", asked_max_tokens=None,
                                     prompt_tokens=lambda: 0)
    record = BillingRecord(LedgerRow(id=f"{customer_id}-{n}", customer_id=customer_id, model="m",
                                     credits_ucr=credits * M, created_at=meterline.clock()))
    bill = await admission.record_bill(meterline, admitted, record)
    assert bill.record.entry.credits_ucr == credits * M
    await bill.after


async def test_a_runaway_loop_trips_at_the_predicted_request_then_a_trickle_closes_it(meterline):
    """Typical spend 20 credits an hour, K = 10: the loop (5 credits every 10 s) is stopped once the
    last hour passes 200 credits, i.e. right after its 41st request (205 credits)."""
    customer_with_history(meterline, "agent", hourly_credits=20)
    clock = meterline.clock
    admitted = 0
    with pytest.raises(Refused) as refused:
        for n in range(100):
            await one_call(meterline, "agent", n, credits=5)
            admitted += 1
            clock.now += timedelta(seconds=10)
    assert admitted == 41
    assert (refused.value.status, refused.value.reason, refused.value.retry_after) == (402, "circuit_open", 1790.0)  # 30 min less the 10 s since it tripped
    tripped_at = T0 + timedelta(seconds=400)
    state = accounts.get_breaker(meterline.engine, "agent")
    assert (state.status.value, state.by, state.since) == ("open", "meterline", tripped_at)
    assert state.reason == ("spent 205000000 µcr in the last 1 h, over the threshold of 200000000 µcr "
                            "(10 x typical hourly spend)")
    [alert] = store.list_alerts(meterline.engine, "circuit_open")
    assert alert.customer_id == "agent"

    # Half-open after the 30-minute cool-down: three requests a minute while spend is still high.
    clock.now = tripped_at + timedelta(minutes=30)
    for n in range(3):
        await one_call(meterline, "agent", 1000 + n, credits=1)
    with pytest.raises(Refused) as trickle_spent:
        await one_call(meterline, "agent", 1003, credits=1)
    assert trickle_spent.value.reason == "circuit_open" and 0 < trickle_spent.value.retry_after <= 60
    # Two hours on, the last hour's spend is back under the threshold: the next request closes it.
    clock.now = HOUR_START + timedelta(hours=2, minutes=1)
    await one_call(meterline, "agent", 2000, credits=1)
    assert accounts.get_breaker(meterline.engine, "agent").status.value == "closed"
    history = [(event.before, event.after, event.by) for event in reversed(accounts.breaker_events(meterline.engine,
                                                                                                    "agent"))]
    assert history == [("closed", "open", "meterline"), ("open", "half_open", "meterline"),
                       ("half_open", "closed", "meterline")]


async def test_a_steady_heavy_customer_is_not_tripped(meterline):
    """Spending at its usual rate (100 credits an hour) never comes near 10 x that."""
    customer_with_history(meterline, "steady", hourly_credits=100)
    clock = meterline.clock
    for n in range(60):  # 100 credits an hour for three hours
        await one_call(meterline, "steady", n, credits=5)
        clock.now += timedelta(minutes=3)
    assert accounts.get_breaker(meterline.engine, "steady").status.value == "closed"


async def test_soft_limits_fire_once_per_threshold_and_again_next_period(meterline):
    """1% and 2% of 1,000 included credits; the calendar month turns over in between."""
    store.add_customer(meterline.engine, "soft", "pro")
    accounts.put_limits(meterline.engine, "soft", {"notify_email": "billing@soft.example"}, by="test")
    clock = meterline.clock
    for n in range(6):  # 24 credits: past 10 and 20
        await one_call(meterline, "soft", n, credits=4)
    assert [alert.message.split(", ")[1][:2] for alert in store.list_alerts(meterline.engine, "soft_limit")] == [
        "1%", "2%"]
    for n in range(6, 9):  # still November: nothing new
        await one_call(meterline, "soft", n, credits=4)
    assert len(store.list_alerts(meterline.engine, "soft_limit")) == 2
    clock.now = datetime(2026, 12, 2, tzinfo=UTC)
    for n in range(9, 12):  # 12 credits in December: the 1% threshold again
        await one_call(meterline, "soft", n, credits=4)
    assert len(store.list_alerts(meterline.engine, "soft_limit")) == 3
    # No SMTP server is configured here: each undelivered email is an alert, not a silent loss.
    failed = store.list_alerts(meterline.engine, "notify_failed")
    assert len(failed) == 3 and failed[0].message == (
        "soft_limit notice not delivered: email to 1 recipient(s) not sent: no SMTP server configured")


async def test_without_quota_or_limit_soft_limits_measure_against_typical_spend(meterline):
    """Pay as you go: 80% of what the customer typically spends in a period (1 credit an hour over
    the last 7 days: 720 credits in November)."""
    customer_with_history(meterline, "payg-customer", hourly_credits=1)
    accounts.set_terms(meterline.engine, "payg-customer", plan="payg")
    # 600 credits at once is a spike the breaker would stop; it is not what this test is about
    meterline.config = CONFIG.model_copy(update={"policies": CONFIG.policies.model_copy(
        update={"breaker": CONFIG.policies.breaker.model_copy(update={"enabled": False})})})
    accounts.put_limits(meterline.engine, "payg-customer", {"soft_thresholds_pct": [80]}, by="test")
    for n in range(4):  # 168 credits of history this month, then 100 a call: 568
        await one_call(meterline, "payg-customer", n, credits=100)
    assert store.list_alerts(meterline.engine, "soft_limit") == []
    await one_call(meterline, "payg-customer", 4, credits=100)  # 668: past 576
    [alert] = store.list_alerts(meterline.engine, "soft_limit")
    assert alert.message.startswith("payg-customer has used 668 credits this period, 80% of 720.")


def capped_customer(meterline: Meterline, customer_id: str, hard_limit_credits: int) -> int:
    """A pro customer with a hard limit; returns the worst case (µcr) of one request with no max_tokens."""
    store.add_customer(meterline.engine, customer_id, "pro")
    accounts.put_limits(meterline.engine, customer_id, {"hard_limit_ucr": hard_limit_credits * M}, by="test")
    return meterline.estimate("m", 0, None).cost(meterline.config.policies.reservation_output_tokens)


def test_what_is_left_counts_the_slice_room_and_never_exceeds_what_is_not_billed():
    settled = Settled(billed_ucr=5, used_ucr=100, reserved_ucr=10, hour_ucr=5, previous_hour_ucr=0)
    assert admission.remaining_ucr(1000, settled, slice_room_ucr=0) == 890
    assert admission.remaining_ucr(1000, settled, slice_room_ucr=10) == 900  # the room is this process's to spend
    assert admission.remaining_ucr(1000, settled, slice_room_ucr=50) == 900  # a room missing from the figures
    assert admission.remaining_ucr(100, settled, slice_room_ucr=0) == 0


def counting_reservations(meterline: Meterline) -> list[str]:
    """Record each counter-store reservation (the real store still makes it)."""
    made: list[str] = []
    store_reserve = meterline.counters.reserve_promptly

    async def reserve(account, reservation_id, *args, **kwargs):
        made.append(reservation_id)
        return await store_reserve(account, reservation_id, *args, **kwargs)

    meterline.counters.reserve_promptly = reserve
    return made


async def test_a_capped_customer_is_admitted_from_a_budget_slice_with_one_reservation(meterline):
    full = capped_customer(meterline, "capped", hard_limit_credits=1_000_000)
    made = counting_reservations(meterline)
    for n in range(40):
        await one_call(meterline, "capped", n, credits=1)
    assert len(made) == 1 and made[0].startswith("slice_")
    account = Account("capped", datetime(2026, 11, 1, tzinfo=UTC))
    room = meterline.slices.room(account)
    assert room == 32 * full - 40 * M  # room for 32 worst cases, less what the 40 requests really cost
    assert meterline.counters.snapshot(account, meterline.clock()) == Snapshot(40 * M, room)
    assert store.billed_between(meterline.engine, "capped", account.period, None) == 40 * M
    # The store counts the slice as reserved; what the customer can still spend does not.
    admitted = await admission.admit(meterline, "capped", "capped-x", model="m", asked_max_tokens=None,
                                     prompt_tokens=lambda: 0)
    assert meterline.slices.room(account) == room - full
    settled = Settled(0, 40 * M, room, 0, 0)
    assert admission.remaining_ucr(admitted.cap_ucr, settled, meterline.slices.room(account)) == \
        1_000_000 * M - 40 * M - full
    await admission.release(meterline, admitted, "capped-x")
    await admission.release(meterline, admitted, "capped-x")  # twice: no harm
    assert meterline.slices.room(account) == room

    # Two seconds on the slice stops admitting: the next request leases a new one, the old one is given back.
    meterline.clock.now += timedelta(seconds=2)
    await one_call(meterline, "capped", 40, credits=1)
    assert len(made) == 2
    expected = Snapshot(41 * M, 32 * full - M)
    for _ in range(100):
        if meterline.counters.snapshot(account, meterline.clock()) == expected:
            break
        await asyncio.sleep(0.02)
    assert meterline.counters.snapshot(account, meterline.clock()) == expected
    meterline.slices.close()  # the process stops: what it held is free again
    assert meterline.counters.snapshot(account, meterline.clock()) == Snapshot(41 * M, 0)


async def test_what_is_left_after_each_bill_is_the_limit_less_what_was_billed(meterline):
    """On Redis a bill the slice holds whole is written before the counters hear of it (they follow off
    the response path) and what is left is the slice's figure; on the embedded store both commit
    together. Either way the answer is the same."""
    capped_customer(meterline, "reader", hard_limit_credits=1000)
    account = Account("reader", datetime(2026, 11, 1, tzinfo=UTC))
    for n in range(5):
        admitted = await admission.admit(meterline, "reader", f"reader-{n}", model="m", asked_max_tokens=None,
                                         prompt_tokens=lambda: 0)
        record = BillingRecord(LedgerRow(id=f"reader-{n}", customer_id="reader", model="m", credits_ucr=3 * M,
                                         created_at=meterline.clock()))
        bill = await admission.record_bill(meterline, admitted, record)
        assert bill.remaining_ucr == (1000 - 3 * (n + 1)) * M
        assert store.billed_between(meterline.engine, "reader", account.period, None) == 3 * (n + 1) * M
        if meterline.counters_in_ledger is None:
            assert meterline.counters.snapshot(account, meterline.clock()).used_ucr == 3 * n * M  # not yet
        await bill.after
        assert meterline.counters.snapshot(account, meterline.clock()).used_ucr == 3 * (n + 1) * M


async def test_a_proxy_killed_after_writing_a_bill_it_had_not_settled_loses_nothing(meterline):
    """The bill is in the ledger, the counters never heard of it, the process is gone without giving
    its slice back. Once the slice's reservation runs out, another process's counters count the bill."""
    capped_customer(meterline, "killed", hard_limit_credits=1000)
    admitted = await admission.admit(meterline, "killed", "killed-0", model="m", asked_max_tokens=None,
                                     prompt_tokens=lambda: 0)
    record = BillingRecord(LedgerRow(id="killed-0", customer_id="killed", model="m", credits_ucr=3 * M,
                                     created_at=meterline.clock()))
    bill = await admission.record_bill(meterline, admitted, record)
    bill.after.close()  # killed before the settlement ran
    meterline.slices._open.clear()  # and before its slices were given back
    account = Account("killed", datetime(2026, 11, 1, tzinfo=UTC))
    expected_used = 3 * M if meterline.counters_in_ledger is not None else 0  # embedded: one commit for both
    assert meterline.counters.snapshot(account, meterline.clock()).used_ucr == expected_used

    other = Meterline(settings=meterline.settings, config=CONFIG)
    other.clock = Clock(T0 + timedelta(seconds=2 + CONFIG.policies.reservation_seconds + 1))
    try:
        await one_call(other, "killed", 1, credits=1)
        assert other.counters.snapshot(account, other.clock()).used_ucr == 4 * M
    finally:
        other.close()


async def test_with_room_in_the_slice_a_bound_of_the_prompt_prices_it_and_without_it_it_is_counted(meterline):
    """The tokenizer is skipped while the live slice admits even the bound at once; the request is
    admitted just as the count would admit it. Without that room (no slice yet, or near the ceiling)
    the prompt is counted."""
    capped_customer(meterline, "bounded", hard_limit_credits=1_000_000)
    counted: list[str] = []

    def counter(tokens: int):
        def count() -> int:
            counted.append("count")
            return tokens
        return count

    async def admit(n: int, bound: int | None, count: int, asked: int | None = None):
        return await admission.admit(meterline, "bounded", f"bounded-{n}", model="m", asked_max_tokens=asked,
                                     prompt_tokens=counter(count), prompt_token_bound=lambda: bound)

    counted_cost = meterline.estimate("m", 100, None).cost(meterline.config.policies.reservation_output_tokens)
    first = await admit(0, bound=400, count=100)  # no slice yet: the lease is priced on the count
    assert counted == ["count"] and first.hold.ucr == counted_cost
    account = Account("bounded", datetime(2026, 11, 1, tzinfo=UTC))
    room = meterline.slices.room(account)
    second = await admit(1, bound=400, count=100, asked=50)
    bound_estimate = meterline.estimate("m", 400, 50)
    assert counted == ["count"]  # not counted again
    assert second.max_tokens is None and second.hold.ucr == bound_estimate.cost(50)
    assert meterline.slices.room(account) == room - bound_estimate.cost(50)
    assert await admit(2, bound=None, count=100) and counted == ["count", "count"]  # no bound: counted
    # A bound the room cannot take at once: counted, and admitted on the count.
    huge = await admit(3, bound=10**12, count=100)
    assert counted == ["count"] * 3 and huge.hold.ucr == counted_cost and huge.max_tokens is None


async def test_a_changed_limit_retires_the_slice_at_once(meterline):
    capped_customer(meterline, "changing", hard_limit_credits=1_000_000)
    made = counting_reservations(meterline)
    await one_call(meterline, "changing", 0, credits=1)
    accounts.put_limits(meterline.engine, "changing", {"hard_limit_ucr": 500_000 * M}, by="test")
    meterline.directory.forget("changing")
    await one_call(meterline, "changing", 1, credits=1)
    assert len(made) == 2 and all(made_id.startswith("slice_") for made_id in made)


async def test_near_the_ceiling_requests_reserve_for_themselves_and_the_cap_holds(meterline):
    """A limit of six worst cases: a quarter of it cannot hold a spare, so no slice is leased; 20
    concurrent requests that each cost almost their worst case are never billed past it."""
    full = capped_customer(meterline, "tight", hard_limit_credits=1)
    accounts.put_limits(meterline.engine, "tight", {"hard_limit_ucr": 6 * full}, by="test")
    made = counting_reservations(meterline)

    async def call(n: int) -> int:
        admitted = await admission.admit(meterline, "tight", f"tight-{n}", model="m", asked_max_tokens=None,
                                         prompt_tokens=lambda: 0)
        await asyncio.sleep(0.01)  # the provider
        record = BillingRecord(LedgerRow(id=f"tight-{n}", customer_id="tight", model="m", credits_ucr=4 * M,
                                         created_at=meterline.clock()))
        bill = await admission.record_bill(meterline, admitted, record)
        await bill.after
        return bill.record.entry.credits_ucr

    outcomes = await asyncio.gather(*(call(n) for n in range(20)), return_exceptions=True)
    billed = [outcome for outcome in outcomes if isinstance(outcome, int)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, Refused)]
    assert len(billed) + len(refused) == 20 and len(billed) >= 6
    assert {refusal.reason for refusal in refused} == {"hard_limit_reached"}
    account = Account("tight", datetime(2026, 11, 1, tzinfo=UTC))
    assert sum(billed) == store.billed_between(meterline.engine, "tight", account.period, None) <= 6 * full
    assert meterline.counters.snapshot(account, meterline.clock()) == Snapshot(sum(billed), 0)
    assert made[0].startswith("slice_") and not any(made_id.startswith("slice_") for made_id in made[1:])


async def admission_cancelled_while_reserving(meterline: Meterline, customer_id: str) -> list:
    """Admit a request of `customer_id` and cancel it (its client went away) while the counter store is
    still making its reservation, which then completes; returns what the store granted."""
    import threading

    store_reserve, go_on, grants = meterline.counters.reserve_promptly, threading.Event(), []

    async def slow_reserve(*args, **kwargs):
        await asyncio.to_thread(go_on.wait, 10)
        grants.append(await store_reserve(*args, **kwargs))
        return grants[-1]

    meterline.counters.reserve_promptly = slow_reserve
    admitting = asyncio.ensure_future(admission.admit(meterline, customer_id, f"{customer_id}-0", model="m",
                                                      asked_max_tokens=None, prompt_tokens=lambda: 0))
    await asyncio.sleep(0.05)
    admitting.cancel()
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    meterline.counters.reserve_promptly = store_reserve
    return grants


async def test_a_request_cancelled_while_its_slice_is_leased_gives_its_share_back(meterline):
    """The client goes away while the counter store is making the slice: the slice still arrives and
    is used, the cancelled request holds nothing of it, and it is given back when its time is up."""
    full = capped_customer(meterline, "leaver", hard_limit_credits=1_000_000)
    await admission_cancelled_while_reserving(meterline, "leaver")
    account = Account("leaver", datetime(2026, 11, 1, tzinfo=UTC))
    for _ in range(100):
        if meterline.slices.room(account) == 32 * full:
            break
        await asyncio.sleep(0.01)
    assert meterline.slices.room(account) == 32 * full  # all of it free for the next requests
    await one_call(meterline, "leaver", 1, credits=1)
    meterline.clock.now += timedelta(seconds=2)
    for _ in range(300):  # the slice's timer (2 s of real time) retires it; it is drained, so it goes back
        if meterline.counters.snapshot(account, meterline.clock()).reserved_ucr == 0:
            break
        await asyncio.sleep(0.02)
    assert meterline.counters.snapshot(account, meterline.clock()) == Snapshot(M, 0)


async def test_a_rate_limited_request_cancelled_while_it_reserves_does_not_keep_its_reservation(meterline):
    """Rate-limited requests reserve one by one (no slices): a request whose client goes away while its
    reservation is being made releases it once made, rather than holding it for reservation_seconds."""
    capped_customer(meterline, "hasty", hard_limit_credits=1_000_000)
    accounts.set_terms(meterline.engine, "hasty", terms=TermsOverride(requests_per_minute=100))
    grants = await admission_cancelled_while_reserving(meterline, "hasty")
    account = Account("hasty", datetime(2026, 11, 1, tzinfo=UTC))
    for _ in range(200):
        if grants and meterline.counters.snapshot(account, meterline.clock()).reserved_ucr == 0:
            break
        await asyncio.sleep(0.01)
    assert grants[0].granted_ucr > 0  # it was made...
    assert meterline.counters.snapshot(account, meterline.clock()) == Snapshot(0, 0)  # ...and released


async def test_a_slice_whose_time_comes_after_the_process_gave_it_back_is_not_given_back_twice(meterline):
    capped_customer(meterline, "closing", hard_limit_credits=1_000_000)
    released: list[str] = []
    store_release = meterline.counters.release

    def release(account, reservation_id):
        released.append(reservation_id)
        store_release(account, reservation_id)

    meterline.counters.release = release
    failures: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: failures.append(context))
    await one_call(meterline, "closing", 0, credits=1)
    meterline.slices.close()
    await asyncio.sleep(2.2)  # the slice's timer fires after the process gave it back
    assert failures == []
    assert len(released) == 1 and released[0].startswith("slice_")


async def test_under_concurrency_the_next_slice_has_room_for_twice_the_requests_holding_the_last(meterline):
    """100 requests of one customer in flight at once: a slice of 32, then of 64 (twice the 32 still
    holding the first), then of 128: three reservations instead of four."""
    capped_customer(meterline, "busy", hard_limit_credits=1_000_000)
    made = counting_reservations(meterline)

    async def call(n: int) -> None:
        admitted = await admission.admit(meterline, "busy", f"busy-{n}", model="m", asked_max_tokens=None,
                                         prompt_tokens=lambda: 0)
        await asyncio.sleep(0.2)  # the provider: every request is still in flight when the last one arrives
        record = BillingRecord(LedgerRow(id=f"busy-{n}", customer_id="busy", model="m", credits_ucr=M,
                                         created_at=meterline.clock()))
        await (await admission.record_bill(meterline, admitted, record)).after

    await asyncio.gather(*(call(n) for n in range(100)))
    assert len(made) == 3 and all(made_id.startswith("slice_") for made_id in made)
    account = Account("busy", datetime(2026, 11, 1, tzinfo=UTC))
    assert store.billed_between(meterline.engine, "busy", account.period, None) == 100 * M
