"""Admission and settlement of one request, for any gateway: the breaker, the rate limit and the
ceiling before the call; the bill, soft limits and the breaker's trip after it.

The decisions are the pure policies (plugin.rules.policy, plugin.rules.ratelimit, plugin.rules.breaker,
plugin.rules.limits); this module fetches their inputs (customer profile, counters), applies their
answers (refuse, clamp, reserve, trip, notify) and never imports a gateway. plugin.litellm_hooks
turns a `Refused` into LiteLLM's error, calls `admit` / `record_bill` / `release`, and runs a bill's
`after` in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial

from sqlalchemy.exc import SQLAlchemyError

from plugin import metrics
from plugin.counters.base import Account, CounterError, Grant, Settled
from plugin.ledger import accounts
from plugin.ledger import store as ledger_store
from plugin.ledger.accounts import GLOBAL_OVERAGE_BLOCK, Profile
from plugin.notify import Notice
from plugin.rules import breaker
from plugin.rules.breaker import BreakerStatus
from plugin.rules.limits import crossed_thresholds, soft_limit_base_ucr
from plugin.rules.policy import (
    Ceiling,
    Estimate,
    Refusal,
    ask,
    credits_text,
    interpret,
    plan_max_tokens,
    refusal_message,
)
from plugin.rules.ratelimit import RateLimit
from plugin.rules.ratelimit import decide as rate_decide
from plugin.rules.records import BillingRecord
from plugin.rules.slices import Hold
from plugin.runtime import Meterline
from plugin.tasks import to_the_end

log = logging.getLogger("meterline")


class Refused(Exception):
    """A request meterline will not let through: the status, the reason (`error.type`) and a message
    for a person. `retry_after` (seconds) becomes a Retry-After header when known."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.retry_after = status, reason, message, retry_after
        metrics.REFUSALS.labels(str(reason)).inc()


@dataclass(frozen=True)
class Admitted:
    """What a request may do, and what its settlement needs to know."""

    customer_id: str
    period_start: datetime
    cap_ucr: int | None
    hold: Hold | None
    """What the request holds in the counter store (release it if the request fails); None: nothing."""
    max_tokens: int | None = None
    """Lowered `max_tokens`: the plan's `max_output_tokens`, or what the customer can still afford when that
    is lower; None = as asked."""
    metered: bool = True
    """False on a legacy flat-rate plan or for a grandfathered customer (`Meterline.plan_of`): the call is in
    the ledger but never sent to the sink."""


async def profile(meterline: Meterline, customer_id: str) -> Profile | None:
    """The customer's profile from memory. Past its `ttl` it is still used once more while a fresh copy
    is read in the background (stale-while-revalidate): no request waits for the database except a
    customer's first. Changes made in this process apply at once (`Directory.forget`)."""
    directory = meterline.directory
    known = directory.cached_profile(customer_id)
    if known is not None:
        return known
    stale = directory.cached_profile(customer_id, stale_ok=True)
    if stale is None:
        return await asyncio.to_thread(directory.reload_profile, customer_id)
    _refresh(("profile", customer_id), directory.reload_profile, customer_id)
    return stale


_refreshing: dict[tuple, asyncio.Future] = {}


def _refresh(key: tuple, read: Callable, *args) -> None:
    """Run `read(*args)` on a worker thread unless the same refresh is already under way."""
    if key in _refreshing:
        return
    future = asyncio.get_running_loop().run_in_executor(None, read, *args)
    _refreshing[key] = future

    def done(finished: asyncio.Future) -> None:
        _refreshing.pop(key, None)
        if not finished.cancelled() and finished.exception() is not None:
            log.warning("meterline: could not refresh %s: %s", key[0], finished.exception().__class__.__name__)

    future.add_done_callback(done)


async def admit(meterline: Meterline, customer_id: str, request_id: str, *, model: str,
                asked_max_tokens: int | None, prompt_tokens: Callable[[], int],
                prompt_token_bound: Callable[[], int | None] = lambda: None) -> Admitted:
    """Let a request through, lowered to what the customer can afford, or raise `Refused`.

    In order: an open circuit breaker (402 circuit_open), the rate limit (429 rate_limited) and the
    ceiling (402 with the ceiling's reason); the last two are ONE atomic counter-store call.
    `prompt_tokens` (counted) and `prompt_token_bound` (at least as many, without a tokenizer; None
    when it has none) are called only when a reservation has to be priced (`_worst_case`)."""
    now = meterline.clock()
    known = await profile(meterline, customer_id)
    if known is None:  # an anonymous (or unknown) customer: no plan, nothing to enforce
        return Admitted(customer_id, meterline.period(None, now).start, None, None)
    if known.breaker.status is not BreakerStatus.CLOSED:
        await _through_breaker(meterline, known, now)
    directory = meterline.directory
    if not directory.knows_switch(GLOBAL_OVERAGE_BLOCK, stale_ok=True):  # first read: off the event loop
        await asyncio.to_thread(directory.switch, GLOBAL_OVERAGE_BLOCK)
    elif not directory.knows_switch(GLOBAL_OVERAGE_BLOCK):  # remembered but old: refresh in the background
        _refresh(("switch", GLOBAL_OVERAGE_BLOCK), directory.switch, GLOBAL_OVERAGE_BLOCK)
    plan = meterline.plan_of(known)
    limit = meterline.ceiling_of(known, stale_ok=True)
    period = meterline.period(known, now)
    rate = None if plan.requests_per_minute is None else RateLimit(plan.requests_per_minute)
    max_tokens = plan_max_tokens(asked_max_tokens, plan.max_output_tokens)
    lowered = None if max_tokens == asked_max_tokens else max_tokens
    unreserved = Admitted(customer_id, period.start, None, None, lowered, metered=plan.metered)
    if limit is None and rate is None:
        return unreserved
    policies = meterline.config.policies
    account = Account(customer_id, period.start)
    estimate = None if limit is None else _worst_case(
        meterline, account, model, max_tokens, prompt_tokens, prompt_token_bound, cap_ucr=limit.ucr, now=now,
        from_slice=rate is None)
    request = None if estimate is None else ask(estimate, policies.min_output_tokens)
    try:
        if rate is None:  # a ceiling only: admitted from this process's budget slice when it can (plugin.rules.slices)
            taken = await meterline.slices.take(account, request_id, request, cap_ucr=limit.ucr, now=now)
            hold, available, counted = taken.hold, taken.available_ucr, None
        else:  # every request is counted against the rate limit: one counter-store call each
            counted = await to_the_end(meterline.counters.reserve_promptly(
                account, request_id, request, cap_ucr=None if limit is None else limit.ucr,
                expires_at=now + timedelta(seconds=policies.reservation_seconds), now=now, rate=rate,
            ), partial(_release_abandoned, meterline, account, request_id))
            hold = None if counted.granted_ucr is None else Hold(request_id, counted.granted_ucr, shared=False)
            available = counted.available_ucr
    except CounterError as error:
        await counters_down(meterline, error)
        if meterline.settings.fail_mode == "open":  # unreserved, but its bill still never passes the ceiling
            return replace(unreserved, cap_ucr=None if limit is None else limit.ucr)
        raise Refused(503, "billing_unavailable", "Spending limits cannot be checked right now, so the request was "
                      "not sent. Try again shortly.") from None
    if counted is not None and counted.rate_limited:
        verdict = rate_decide(rate, int(now.timestamp() * 1000), counted.rate_current, counted.rate_previous)
        wait = max(1, -(-verdict.retry_after_ms // 1000))
        raise Refused(429, Refusal.RATE_LIMITED, f"You've sent more than {rate.requests} requests in the last "
                      f"minute, the limit of your {known.plan} plan. Retry in {wait} s.", retry_after=wait)
    if estimate is None:
        return unreserved
    decision = interpret(estimate, None if hold is None else hold.ucr, available_ucr=available, limit=limit)
    if not decision.admit:
        raise Refused(402, decision.reason, refusal_message(decision.reason, limit, known.plan, period.end,
                                                            detail=policies.refusal_detail))
    return Admitted(customer_id, period.start, limit.ucr, hold, lowered if decision.max_tokens is None else
                    decision.max_tokens, metered=plan.metered)


def _worst_case(meterline: Meterline, account: Account, model: str, asked_max_tokens: int | None,
                prompt_tokens: Callable[[], int], prompt_token_bound: Callable[[], int | None], *, cap_ucr: int,
                now: datetime, from_slice: bool) -> Estimate:
    """What the request may cost. Counting the prompt's tokens (LiteLLM's tokenizer) is most of a
    capped request's admission time, so when the live budget slice admits at once even a bound of
    them, the bound prices the reservation: the request is admitted as it would be when counted (in
    full, its max_tokens unchanged) and only holds more of the slice until it settles. Otherwise
    (no slice, or little room left: near the ceiling, where a bound set too high could lower
    max_tokens or refuse) the prompt is counted."""
    if from_slice:
        bound = prompt_token_bound()
        if bound is not None:
            estimate = meterline.estimate(model, bound, asked_max_tokens)
            if meterline.slices.admits_now(account, estimate.cost(estimate.max_tokens), cap_ucr=cap_ucr, now=now):
                return estimate
    return meterline.estimate(model, prompt_tokens(), asked_max_tokens)


def _release_abandoned(meterline: Meterline, account: Account, request_id: str, granted: Grant) -> None:
    """Release what the reservation of a request cancelled meanwhile granted: not held until it expires."""
    if granted.granted_ucr is not None:
        meterline.slices.release_later(account, request_id, "releasing a cancelled request's reservation")


async def _through_breaker(meterline: Meterline, known: Profile, now: datetime) -> None:
    """An open (or half-open) breaker: refuse, or let the trickle through; store what changed."""
    try:
        this_hour, previous_hour = await asyncio.to_thread(meterline.counters.hour_spend, known.customer_id, now)
    except CounterError as error:  # without the spend figures it stays as it is: open
        await counters_down(meterline, error)
        raise Refused(402, Refusal.CIRCUIT_OPEN, breaker_message(known.breaker)) from None
    decision = await _breaker_decision(meterline, known, this_hour, previous_hour, now)
    if decision.state != known.breaker:
        await asyncio.to_thread(accounts.save_breaker, meterline.engine, known.customer_id, decision.state,
                                decision.transition)
        meterline.directory.remember_breaker(known.customer_id, decision.state)
    if not decision.admit:
        raise Refused(402, Refusal.CIRCUIT_OPEN, breaker_message(known.breaker), retry_after=decision.retry_after)


async def _breaker_decision(meterline: Meterline, known: Profile, this_hour_ucr: int, previous_hour_ucr: int,
                            now: datetime) -> breaker.BreakerDecision:
    """The breaker's answer from the hour buckets and the customer's baseline (read from the ledger,
    remembered for a while)."""
    config = meterline.breaker_config
    window = breaker.window_spend_ucr(this_hour_ucr, previous_hour_ucr, int(now.timestamp()) % 3600)
    threshold = breaker.threshold_ucr(await meterline.baselines.typical_hourly(known, now), config)
    return breaker.on_request(known.breaker, window_spend_ucr=window, threshold=threshold, now=now, config=config)


def breaker_message(state: breaker.BreakerState) -> str:
    if state.by == breaker.SYSTEM:
        return ("Requests on this account are paused: it spent far more in the last hour than it usually does, "
                "which looks like a runaway loop. The operator has been alerted and can resume it.")
    return "Requests on this account are paused by the operator. Contact them to resume it."


async def counters_down(meterline: Meterline, error: CounterError) -> None:
    """Log every time, alert the operator once a minute: caps are not enforced (open) or capped
    customers are refused (closed) until the counter store answers again."""
    mode = meterline.settings.fail_mode
    consequence = ("limits are not enforced and requests are admitted" if mode == "open"
                   else "limited customers' requests are refused with 503")
    log.warning("meterline: %s; %s (METERLINE_FAIL_MODE=%s)", error, consequence, mode)
    if meterline.first_in_a_while("counters_unavailable"):
        await alert(meterline, "counters_unavailable",
                    f"spending counters unreachable ({error}): {consequence} (METERLINE_FAIL_MODE={mode})")


async def alert(meterline: Meterline, kind: str, message: str, *, customer_id: str | None = None,
                notify_operator: bool = False) -> None:
    """An in-app alert (GET /meterline/v1/alerts), and optionally the operator's email and webhook."""
    try:
        await asyncio.to_thread(ledger_store.add_alert, meterline.engine, kind, message, customer_id=customer_id)
    except SQLAlchemyError as failure:  # the log line still says it
        log.error("meterline: could not record a %s alert: %s", kind, failure.__class__.__name__)
    if notify_operator:
        notice = Notice(kind=kind, subject=f"meterline: {kind.replace('_', ' ')}"
                        + (f" for {customer_id}" if customer_id else ""), text=message, customer_id=customer_id)
        await _told(meterline, notice, await asyncio.to_thread(meterline.tell_operator, notice))


async def _told(meterline: Meterline, notice: Notice, failures: list[str]) -> None:
    """A notice some channel could not deliver leaves a `notify_failed` alert in the app, so it is not lost."""
    if failures:
        await alert(meterline, "notify_failed", f"{notice.kind} notice not delivered: {'; '.join(failures)}",
                    customer_id=notice.customer_id)


@dataclass
class Bill:
    """A call as billed: its ledger row is committed; `after` is what still has to run, off the
    response path (the caller schedules it, or awaits it in tests)."""

    record: BillingRecord
    """As written (clamped to the ceiling if an estimate fell short)."""
    settled: Settled | None
    """The counters' settlement; None when it is not made yet (`after` makes it) or the counters could
    not answer."""
    remaining_ucr: int | None
    """What a customer with a ceiling can still spend (the `x-meterline-remaining` header); None
    without a ceiling or when the counters could not answer."""
    after: Coroutine[object, object, None]
    """The checks after a bill (soft limits, the breaker), after the counters' settlement when it was deferred."""


async def record_bill(meterline: Meterline, admitted: Admitted, record: BillingRecord) -> Bill:
    """Commit the call's ledger row and settle it through the counters (billed as used, never past
    the ceiling). Raises what the ledger write raised.

    The embedded counter store settles inside the ledger write's transaction: one commit for both.
    Redis settles before or after the ledger write, never inside it, where a Redis outage (seconds
    of connect timeout) would stall every request's write. When the bill is the usage whatever the
    counters say (a customer without a ceiling, or a request whose budget slice holds all of it
    in a reservation far from running out), the row is written first and the counters follow it
    off the response path (`Bill.after`), promptly (`settle_promptly`); what is left is then the
    slice's figure. Otherwise Redis settles first: the row must not bill past the ceiling, and the
    answer reports what is left. A proxy killed between the row and the settlement leaves the
    reservation to run out, and the counters then start again from the ledger, which has the bill
    (reserve.lua). If Redis cannot answer, the call is billed in full and logged."""
    if not admitted.metered:
        record = replace(record, meter=False)
    account = Account(admitted.customer_id, admitted.period_start)
    room_before = meterline.slices.room(account)
    actual, now, hold = record.entry.credits_ucr, meterline.clock(), admitted.hold
    held_as = None if hold is None else hold.reservation_id
    # Without a hold Redis still looks under the request's id, for a reservation whose answer was lost.
    reservation = held_as or record.entry.id
    # A shared slice: the store takes this request's part only, at most what it holds (an overshoot is
    # billed from what is free, like any request's), so the slice's room stays exactly what is left of it.
    portion = min(actual, hold.ucr) if hold is not None and hold.shared else None
    in_ledger = meterline.counters_in_ledger
    if in_ledger is not None:
        outcome: list[Settled] = []

        def settle_with_ledger(connection, pending: BillingRecord) -> BillingRecord:
            settled = in_ledger.settle_on(connection, account, held_as, actual, cap_ucr=admitted.cap_ucr, now=now,
                                          portion_ucr=portion)
            outcome[:] = [settled]
            return within(pending, settled)

        written = await meterline.writer.write(record, settle_with_ledger)
        settled = outcome[0] if outcome else None
        _ended(meterline, admitted, record.entry.id, actual)
        remaining = _remaining(meterline, admitted, settled, room_before)
        return Bill(written, settled, remaining, after_settle(meterline, admitted, settled))

    async def settled_in_redis(settling: Awaitable[Settled]) -> Settled | None:
        try:
            return await settling
        except CounterError as error:
            await counters_down(meterline, error)
            return None
        finally:
            _ended(meterline, admitted, record.entry.id, actual)  # whatever the ledger write does

    covering = None if hold is None or admitted.cap_ucr is None else \
        meterline.slices.covering(hold, record.entry.id, actual, now)
    if admitted.cap_ucr is None or covering is not None:
        remaining = None if covering is None else covering.remaining_after(hold.ucr, actual)
        written = await meterline.writer.write(record)

        async def settle_then_check() -> None:  # off the response path; promptly, as a hop to a thread per bill costs CPU
            # The counters follow the ledger, which has the bill: nothing to clamp.
            settling = meterline.counters.settle_promptly(account, reservation, actual, cap_ucr=None, now=now,
                                                          portion_ucr=portion, already_in_ledger=True)
            await after_settle(meterline, admitted, await settled_in_redis(settling))

        return Bill(written, None, remaining, settle_then_check())
    settled = await settled_in_redis(meterline.counters.settle_promptly(account, reservation, actual,
                                                                        cap_ucr=admitted.cap_ucr, now=now,
                                                                        portion_ucr=portion))
    remaining = _remaining(meterline, admitted, settled, room_before)
    written = await meterline.writer.write(record if settled is None else within(record, settled))
    return Bill(written, settled, remaining, after_settle(meterline, admitted, settled))


def _ended(meterline: Meterline, admitted: Admitted, request_id: str, actual_ucr: int) -> None:
    """A request of a shared budget slice is done with it, having cost `actual_ucr` (0: it failed). A
    second call for the same request changes nothing."""
    hold = admitted.hold
    if hold is not None and hold.shared:
        meterline.slices.end(hold, request_id, min(actual_ucr, hold.ucr))


def _remaining(meterline: Meterline, admitted: Admitted, settled: Settled | None, room_before_ucr: int) -> int | None:
    """`remaining_ucr` for this call. The slice's room is read before the settlement and once its answer
    is in (this request's share given back): the smaller counts, since a slice leased in between may
    be missing from the settlement's figures."""
    if admitted.cap_ucr is None or settled is None:
        return None
    hold = admitted.hold
    # What the request held and did not spend is back in the room by now (`_ended`), and was in the store's figures.
    unspent = hold.ucr - min(settled.billed_ucr, hold.ucr) if hold is not None and hold.shared else 0
    room_now = meterline.slices.room(Account(admitted.customer_id, admitted.period_start))
    return remaining_ucr(admitted.cap_ucr, settled, min(room_before_ucr + unspent, room_now))


def remaining_ucr(cap_ucr: int, settled: Settled, slice_room_ucr: int) -> int:
    """µcr a customer with a ceiling can still spend after a call. What this process holds in its
    budget slice (`slice_room_ucr`) is counted as reserved in the store but is still the customer's
    to spend; never more than what is not billed yet."""
    unbilled = cap_ucr - settled.used_ucr
    return max(0, min(unbilled, unbilled - settled.reserved_ucr + slice_room_ucr))


def within(record: BillingRecord, settled: Settled) -> BillingRecord:
    """The record billed as settled: what would have crossed the ceiling (an estimate fell short) is
    reported in an alert, not silently dropped."""
    actual = record.entry.credits_ucr
    if settled.billed_ucr >= actual:
        return record
    note = f"{actual - settled.billed_ucr} µcr of usage not billed: it would have crossed the customer's ceiling"
    return replace(record, entry=replace(record.entry, credits_ucr=settled.billed_ucr),
                   alert=f"{record.alert}; {note}" if record.alert else note)


async def release(meterline: Meterline, admitted: Admitted, request_id: str) -> None:
    """The request failed: what it held is free again (its share of a slice goes back to the slice)."""
    hold = admitted.hold
    if hold is None:
        return
    if hold.shared:
        _ended(meterline, admitted, request_id, 0)
        return
    await asyncio.to_thread(meterline.slices.release, Account(admitted.customer_id, admitted.period_start),
                            hold.reservation_id)


async def after_settle(meterline: Meterline, admitted: Admitted, settled: Settled | None) -> None:
    """What a bill may set off, off the response path: soft-limit notices and a breaker trip (nothing
    when the counters could not settle it)."""
    if settled is None or settled.billed_ucr <= 0:
        return
    known = await profile(meterline, admitted.customer_id)
    if known is None:
        return
    now = meterline.clock()
    await _maybe_trip(meterline, known, settled, now)
    await _soft_limits(meterline, known, admitted, settled, now)


async def _maybe_trip(meterline: Meterline, known: Profile, settled: Settled, now: datetime) -> None:
    config = meterline.breaker_config
    if not meterline.config.policies.breaker.enabled or known.breaker.status is not BreakerStatus.CLOSED:
        return
    window = breaker.window_spend_ucr(settled.hour_ucr, settled.previous_hour_ucr, int(now.timestamp()) % 3600)
    if window <= breaker.threshold_ucr(config.floor_ucr_per_hour, config):
        return  # under K x the floor: no need to know the customer's baseline
    decision = await _breaker_decision(meterline, known, settled.hour_ucr, settled.previous_hour_ucr, now)
    if decision.transition is None:
        return
    stored = await asyncio.to_thread(accounts.save_breaker, meterline.engine, known.customer_id, decision.state,
                                     decision.transition, expected=BreakerStatus.CLOSED)
    meterline.directory.remember_breaker(known.customer_id, decision.state)
    if stored:  # another proxy may have tripped it a moment earlier: it alerted then
        metrics.BREAKER_TRIPS.inc()
        await alert(meterline, "circuit_open", f"circuit breaker opened for {known.customer_id}: "
                    f"{decision.transition.why}", customer_id=known.customer_id, notify_operator=True)


async def _soft_limits(meterline: Meterline, known: Profile, admitted: Admitted, settled: Settled,
                       now: datetime) -> None:
    plan = meterline.plan_of(known)
    limit = meterline.ceiling_of(known, stale_ok=True)
    thresholds = known.limits.thresholds(meterline.config.policies.soft_thresholds_pct)
    if not thresholds:
        return
    period = meterline.period(known, admitted.period_start)  # the period the call was admitted (and billed) in
    typical = 0
    if not plan.included_credits and limit is None:
        typical = await meterline.baselines.typical_period(known, period, now)
    base = soft_limit_base_ucr(plan, limit, typical)
    if base is None:
        return
    crossed = crossed_thresholds(thresholds, base, before_ucr=settled.used_ucr - settled.billed_ucr,
                                 after_ucr=settled.used_ucr)
    period_key = Account(known.customer_id, admitted.period_start).period_key
    for pct in crossed:
        claimed = await asyncio.to_thread(accounts.claim_notice, meterline.engine, known.customer_id, period_key, pct)
        if not claimed:
            continue
        metrics.SOFT_LIMIT_NOTICES.inc()
        notice = soft_limit_notice(known, pct, base, settled.used_ucr, limit, period.end)
        await alert(meterline, "soft_limit", notice.text, customer_id=known.customer_id)
        await _told(meterline, notice, await asyncio.to_thread(meterline.tell_customer, known, notice))


def soft_limit_notice(known: Profile, pct: int, base_ucr: int, used_ucr: int, limit: Ceiling | None,
                      period_end: datetime) -> Notice:
    """What a customer is told when it crosses a soft threshold."""
    until = period_end.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"{known.customer_id} has used {credits_text(used_ucr)} credits this period, {pct}% of "
            f"{credits_text(base_ucr)}. The period ends {until}.")
    if limit is not None:
        text += f" Requests stop at {credits_text(limit.ucr)} credits ({limit.reason.value})."
    return Notice(
        kind="soft_limit", subject=f"meterline: {known.customer_id} reached {pct}% of its usage", text=text,
        customer_id=known.customer_id,
        fields={"threshold_pct": str(pct), "base_ucr": str(base_ucr), "used_ucr": str(used_ucr),
                "period_end": period_end.astimezone(UTC).isoformat()},
    )

