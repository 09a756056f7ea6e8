"""The Redis counter store: each operation is ONE call of a Lua script (plugin/counters/lua/*.lua,
registered with redis-py's `register_script`, so it runs by EVALSHA), on keys from keys.py.

The scripts only add, subtract and compare integers (exact in Lua's doubles below 2^53 µcr, nine
billion credits), mirroring `plugin.policy.grant` / `settle` and `plugin.ratelimit.admits`; the
shared backend test-suite checks them against those functions.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from importlib.resources import files

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from plugin.counters.base import Account, CounterError, Grant, Settled, Snapshot, hour_index
from plugin.counters.keys import account_keys, hour_keys, rate_keys
from plugin.policy import Ask
from plugin.ratelimit import RateLimit, window_index

KEEP_KEYS = timedelta(days=75)
"""How long an account's keys live after their last use: past any period's end (31 days) with room
for reporting; the ledger stays the record (`rebuild`)."""

HOUR_KEYS_SECONDS = 3 * 3600
"""Spend buckets are read for the current and the previous hour only."""

UNSEEDED = -2
"""What a script answers for an account with no `used` yet (new, or Redis was flushed)."""

PROMPT_WAIT_SECONDS = 0.001
"""How long the event loop itself waits for Redis to answer a call it sent (`_call_promptly`): a local
or same-zone Redis answers a script in a fraction of this."""

PATIENT_SECONDS = 1.0
"""After an answer that did not come within PROMPT_WAIT_SECONDS, calls go to a worker thread for this long
(a slow or distant Redis must not cost the event loop a wait per call)."""

Billed = Callable[[str, datetime, datetime | None], int]
"""µcr the ledger billed a customer in [start, end) (end None: up to now)."""


def _script(client: redis.Redis, name: str):
    return client.register_script((files("plugin.counters") / "lua" / f"{name}.lua").read_text())


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _optional(value: int | None) -> str:
    return "" if value is None else str(value)


def _hour_start(hour: int) -> datetime:
    return datetime.fromtimestamp(hour * 3600, UTC)


@dataclass(frozen=True)
class _Call:
    """One script call on an account's keys; `args_once_seeded` replaces `args` when the account had to be
    started from the ledger first (the seed already counts what the call would add)."""

    script: Script
    account: Account
    keys: list[str]
    args: list
    hour: int
    args_once_seeded: list | None = None


class _Line:
    """A Redis connection the event loop uses itself, one call at a time (`lock`); a worker thread that
    takes over a slow answer holds the lock until it has read it."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.connection = pool.connection_class(**pool.connection_kwargs)
        self.lock = threading.Lock()


class RedisCounterStore:
    """`ledger_billed` reads the ledger: an account's counters (and the breaker's hour buckets) start
    from it, so a new period, a flushed Redis or usage from before the counters all start right."""

    def __init__(self, client: redis.Redis, ledger_billed: Billed, *, pause_after_failure: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.ledger_billed = ledger_billed
        self._pause = pause_after_failure
        self._clock = clock
        self._down_until = 0.0
        self._last_failure = ""
        self._line = _Line(client.connection_pool)
        self._patient_until = 0.0
        self._reserve = _script(client, "reserve")
        self._settle = _script(client, "settle")
        self._snapshot = _script(client, "snapshot")

    @classmethod
    def from_url(cls, url: str, ledger_billed: Billed) -> RedisCounterStore:
        return cls(redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2), ledger_billed)

    def _call(self, call: _Call, answer: list | None = None) -> list:
        """Run a script (unless `answer` is what it already answered); if the account is unseeded, seed it
        from the ledger (NX writes: a concurrent seeder wins harmlessly, both read the same ledger) and
        run it once more."""
        try:
            if answer is None:
                self._refuse_while_down()
                answer = call.script(keys=call.keys, args=call.args)
            if answer[0] == UNSEEDED:
                self._seed(call.account, call.hour)
                answer = call.script(keys=call.keys, args=call.args_once_seeded or call.args)
            return answer
        except redis.RedisError as error:
            raise self._failed(error) from error

    async def _call_promptly(self, call: _Call) -> list:
        """`_call` for a caller on an event loop, without a worker thread when Redis answers at once.

        Any await on the response path costs the wait for whatever else the loop has queued (in the
        proxy, the gateway's own post-response work: about a millisecond), so the loop sends the
        script on a connection of its own and reads the answer itself if it arrives within
        PROMPT_WAIT_SECONDS. Otherwise a worker thread reads it (the script runs once either way), as
        it does the whole call when the line is busy or unconnected, Redis has been slow, the script
        is not loaded or the account must be seeded first."""
        self._refuse_while_down()
        line = self._line
        if self._clock() < self._patient_until or not line.lock.acquire(blocking=False):
            return await asyncio.to_thread(self._call, call)
        try:
            # An idle connection with something to read was closed by Redis (a restart, an idle timeout).
            usable = line.connection.is_connected and not line.connection.can_read(timeout=0)
        except redis.RedisError:
            usable = False
        if not usable:
            line.connection.disconnect()
            return await asyncio.to_thread(self._connect_line_then_call, call)
        try:
            line.connection.send_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
            answered = line.connection.can_read(timeout=PROMPT_WAIT_SECONDS)
        except redis.RedisError as error:
            line.connection.disconnect()
            line.lock.release()
            raise self._failed(error) from error
        if not answered:
            self._patient_until = self._clock() + PATIENT_SECONDS
            return await asyncio.to_thread(self._read_line_then_call, call)  # the thread releases the line
        answer = self._read_line()
        if answer is None or answer[0] == UNSEEDED:
            return await asyncio.to_thread(self._call, call, answer)
        return answer

    def _read_line(self) -> list | None:
        """The line's answer (None: Redis did not have the script, which did not run), releasing the line."""
        line = self._line
        try:
            return line.connection.read_response()
        except NoScriptError:
            return None
        except redis.RedisError as error:
            line.connection.disconnect()
            raise self._failed(error) from error
        finally:
            line.lock.release()

    def _read_line_then_call(self, call: _Call) -> list:
        return self._call(call, self._read_line())

    def _connect_line_then_call(self, call: _Call) -> list:
        """Connect the line for the next calls (a connect can take seconds when Redis is unreachable: never
        on the event loop) and make this one the usual way."""
        try:
            self._line.connection.connect()
        except redis.RedisError as error:
            raise self._failed(error) from error
        finally:
            self._line.lock.release()
        return self._call(call)

    def _refuse_while_down(self) -> None:
        """Fail fast for a moment after Redis could not be reached: otherwise every request would wait
        out the connect timeout (seconds) while METERLINE_FAIL_MODE decides the same thing anyway."""
        if self._clock() < self._down_until:
            raise CounterError(f"redis counters: {self._last_failure} a moment ago, not retried yet")

    def _failed(self, error: redis.RedisError) -> CounterError:
        if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
            self._down_until = self._clock() + self._pause
            self._last_failure = error.__class__.__name__
        return CounterError(f"redis counters: {error.__class__.__name__}")

    def _seed(self, account: Account, hour: int) -> None:
        customer = account.customer_id
        try:
            used = self.ledger_billed(customer, account.period, None)
            spend = [self.ledger_billed(customer, _hour_start(h), _hour_start(h + 1)) for h in (hour, hour - 1)]
        except Exception as error:  # whatever the ledger raised, callers handle one error type
            raise CounterError(f"redis counters: cannot read the ledger to start from: {error.__class__.__name__}") \
                from error
        pipe = self.client.pipeline(transaction=False)
        pipe.hsetnx(account_keys(account).counters, "used", used)
        for key, value in zip(hour_keys(customer, hour), spend, strict=True):
            pipe.set(key, value, nx=True, ex=HOUR_KEYS_SECONDS)
        pipe.execute()

    def reserve(self, account: Account, reservation_id: str, ask: Ask | None, *, cap_ucr: int | None,
                expires_at: datetime, now: datetime, rate: RateLimit | None = None) -> Grant:
        return self._granted(self._call(self._reserve_call(account, reservation_id, ask, cap_ucr, expires_at, now,
                                                           rate)), cap_ucr)

    async def reserve_promptly(self, account: Account, reservation_id: str, ask: Ask | None, *, cap_ucr: int | None,
                               expires_at: datetime, now: datetime, rate: RateLimit | None = None) -> Grant:
        call = self._reserve_call(account, reservation_id, ask, cap_ucr, expires_at, now, rate)
        return self._granted(await self._call_promptly(call), cap_ucr)

    def _reserve_call(self, account: Account, reservation_id: str, ask: Ask | None, cap_ucr: int | None,
                      expires_at: datetime, now: datetime, rate: RateLimit | None) -> _Call:
        now_ms = _ms(now)
        window = window_index(now_ms, rate) if rate else 0
        keys = account_keys(account).all() + rate_keys(account.customer_id, window)
        args = [reservation_id, "" if ask is None else ask.full_ucr, 0 if ask is None else ask.minimum_ucr,
                _optional(cap_ucr), _ms(expires_at), now_ms, int(KEEP_KEYS.total_seconds()),
                "" if rate is None else rate.requests, 0 if rate is None else rate.window_ms,
                0 if ask is None else ask.spare_ucr]
        return _Call(self._reserve, account, keys, args, hour_index(now))

    @staticmethod
    def _granted(answer: list, cap_ucr: int | None) -> Grant:
        granted, available, verdict, current, previous = answer
        limited = verdict == 0  # refused before the ceiling was looked at: nothing is known about it
        return Grant(None if granted < 0 else int(granted), None if cap_ucr is None or limited else int(available),
                     rate_limited=limited, rate_current=int(current), rate_previous=int(previous))

    def settle(self, account: Account, reservation_id: str, actual_ucr: int, *, cap_ucr: int | None,
               now: datetime, portion_ucr: int | None = None, already_in_ledger: bool = False) -> Settled:
        call = self._settle_call(account, reservation_id, actual_ucr, cap_ucr, now, portion_ucr, already_in_ledger)
        return self._settled(self._call(call), actual_ucr, already_in_ledger)

    async def settle_promptly(self, account: Account, reservation_id: str, actual_ucr: int, *, cap_ucr: int | None,
                              now: datetime, portion_ucr: int | None = None,
                              already_in_ledger: bool = False) -> Settled:
        call = self._settle_call(account, reservation_id, actual_ucr, cap_ucr, now, portion_ucr, already_in_ledger)
        return self._settled(await self._call_promptly(call), actual_ucr, already_in_ledger)

    def _settle_call(self, account: Account, reservation_id: str, actual_ucr: int, cap_ucr: int | None,
                     now: datetime, portion_ucr: int | None, already_in_ledger: bool) -> _Call:
        hour = hour_index(now)
        keys = account_keys(account).all() + hour_keys(account.customer_id, hour)
        args = [reservation_id, actual_ucr, _optional(cap_ucr), int(KEEP_KEYS.total_seconds()), _optional(portion_ucr)]
        # Seeded from a ledger that has the bill (in used and in this hour's spend): settle nothing more.
        once_seeded = [reservation_id, 0, *args[2:]] if already_in_ledger else None
        return _Call(self._settle, account, keys, args, hour, once_seeded)

    @staticmethod
    def _settled(answer: list, actual_ucr: int, already_in_ledger: bool) -> Settled:
        settled = Settled(*(int(value) for value in answer))
        return replace(settled, billed_ucr=actual_ucr) if already_in_ledger else settled

    def release(self, account: Account, reservation_id: str) -> None:
        self.settle(account, reservation_id, 0, cap_ucr=None, now=datetime.now(UTC))

    def snapshot(self, account: Account, now: datetime) -> Snapshot:
        used, reserved = self._call(_Call(self._snapshot, account, account_keys(account).all(), [_ms(now)],
                                          hour_index(now)))
        return Snapshot(int(used), int(reserved))

    def hour_spend(self, customer_id: str, now: datetime) -> tuple[int, int]:
        self._refuse_while_down()
        try:
            current, previous = self.client.mget(hour_keys(customer_id, hour_index(now)))
        except redis.RedisError as error:
            raise self._failed(error) from error
        return int(current or 0), int(previous or 0)

    def rebuild(self, account: Account, used_ucr: int) -> None:
        try:
            self.client.hset(account_keys(account).counters, "used", used_ucr)
        except redis.RedisError as error:
            raise self._failed(error) from error

    def close(self) -> None:
        self._line.connection.disconnect()
        self.client.close()
