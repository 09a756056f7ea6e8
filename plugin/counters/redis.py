"""The Redis counter store: each operation is ONE call of a Lua script (plugin/counters/lua/*.lua,
registered with redis-py's `register_script`, so it runs by EVALSHA), on keys from keys.py.

The scripts only add, subtract and compare integers (exact in Lua's doubles below 2^53 µcr, nine
billion credits), mirroring `plugin.rules.policy.grant` / `settle` and `plugin.rules.ratelimit.admits`; the
shared backend test-suite checks them against those functions.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from importlib.resources import files

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from plugin.counters.base import (
    Account,
    CounterError,
    Grant,
    Settled,
    Snapshot,
    hour_index,
)
from plugin.counters.keys import account_keys, hour_keys, rate_keys
from plugin.rules.policy import Ask
from plugin.rules.ratelimit import RateLimit, window_index

log = logging.getLogger("meterline.counters")

KEEP_KEYS = timedelta(days=75)
"""How long an account's keys live after their last use: past any period's end (31 days) with room
for reporting; the ledger stays the record (`rebuild`)."""

HOUR_KEYS_SECONDS = 3 * 3600
"""Spend buckets are read for the current and the previous hour only."""

UNSEEDED = -2
"""What a script answers for an account with no `used` yet (new, Redis was flushed, or a reservation ran out)."""

SEED_ATTEMPTS = 3
"""Starts from the ledger one call may make: each is followed by the call, which an account reset again
meanwhile (another reservation ran out, a flush) answers with UNSEEDED once more."""

PROMPT_WAIT_SECONDS = 0.001
"""How long the event loop itself waits for Redis to answer a call it sent (`_call_promptly`): a local
or same-zone Redis answers a script in a fraction of this."""

PATIENT_SECONDS = 1.0
"""After an answer that did not come within PROMPT_WAIT_SECONDS, calls do not wait on the loop for this long:
their answers are read when the socket says they have come, the loop serving other requests meanwhile
(a slow, distant or busy Redis must not cost the event loop a wait per call)."""

MAX_LINES = 32
"""Connections the event loop keeps for its own calls, one per call in flight; a call beyond them is made
by a worker thread on the client's pool."""

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
    """A Redis connection the event loop uses itself, for one call at a time."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.connection = pool.connection_class(**pool.connection_kwargs)

    def usable(self) -> bool:
        """Connected, and not closed by Redis while idle (a restart, an idle timeout: it has something to read)."""
        try:
            return self.connection.is_connected and not self.connection.can_read(timeout=0)
        except redis.RedisError:
            return False

    async def readable(self) -> None:
        """Until the answer to the call sent on it has come (the loop serves others meanwhile); redis-py's
        socket timeout bounds the wait, as it bounds a blocking read."""
        loop = asyncio.get_running_loop()
        came: asyncio.Future[None] = loop.create_future()
        fd = self.connection._sock.fileno()  # redis-py has no public accessor for its socket
        loop.add_reader(fd, lambda: came.done() or came.set_result(None))
        # A client without a socket timeout still does not leave a call waiting on the loop for ever.
        timeout = self.connection.socket_timeout or PATIENT_SECONDS
        timer = loop.call_later(timeout, lambda: came.done() or came.set_exception(
            redis.TimeoutError("Timeout reading from socket")))
        try:
            await came
        finally:
            timer.cancel()
            loop.remove_reader(fd)


class _Lines:
    """The event loop's own connections: a call takes an idle one (or opens one, up to MAX_LINES) and gives it
    back once it has read the answer."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._idle: list[_Line] = []
        self._open = 0
        self._lock = threading.Lock()
        """Loops in several threads may share a store; each line still serves one call at a time."""

    def take(self) -> _Line | None:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if self._open >= MAX_LINES:
                return None
            self._open += 1
        return _Line(self._pool)

    def give_back(self, line: _Line) -> None:
        with self._lock:
            self._idle.append(line)

    def close(self) -> None:
        with self._lock:
            for line in self._idle:
                line.connection.disconnect()


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
        self._lines = _Lines(client.connection_pool)
        self._finishing: set[asyncio.Task] = set()
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
        run it again (a few times: another reservation may run out meanwhile)."""
        try:
            if answer is None:
                self._refuse_while_down()
                answer = call.script(keys=call.keys, args=call.args)
            for _ in range(SEED_ATTEMPTS):
                if answer[0] != UNSEEDED:
                    return answer
                self._seed(call.account, call.hour)
                answer = call.script(keys=call.keys, args=call.args_once_seeded or call.args)
        except redis.RedisError as error:
            raise self._failed(error) from error
        if answer[0] == UNSEEDED:
            raise CounterError(f"redis counters: still unseeded after {SEED_ATTEMPTS} starts from the ledger")
        return answer

    async def _call_promptly(self, call: _Call) -> list:
        """`_call` for a caller on an event loop, without a worker thread.

        Any await on the response path costs the wait for whatever else the loop has queued (in the
        proxy, the gateway's own post-response work: about a millisecond), so the loop sends the
        script on a connection of its own and reads the answer itself if it arrives within
        PROMPT_WAIT_SECONDS. A later answer is read once the socket says it has come, and for
        PATIENT_SECONDS after one, calls do not wait on the loop at all: a thread per call costs
        more CPU than the call under load. A worker thread connects a line (a connect can take
        seconds when Redis is unreachable), makes the call when every line is busy, loads a script
        Redis no longer has and seeds an account from the ledger. The script runs once either way."""
        self._refuse_while_down()
        line = self._lines.take()
        if line is None:
            return await asyncio.to_thread(self._call, call)
        if not line.usable():
            return await asyncio.to_thread(self._connect_then_call, line, call)
        try:
            line.connection.send_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        except redis.RedisError as error:
            raise self._lost(line, error) from error
        try:
            answer = await self._answer(line)
        except asyncio.CancelledError:
            self._finish_later(call, line)
            raise
        return await self._completed(call, answer)

    async def _answer(self, line: _Line) -> list | None:
        """The answer to the script sent on `line` (None: Redis did not have it, so it did not run), the line
        given back; a caller cancelled while it waits leaves the line to `_finish_later`."""
        patient = self._clock() < self._patient_until
        try:
            if patient or not line.connection.can_read(timeout=PROMPT_WAIT_SECONDS):
                if not patient:
                    self._patient_until = self._clock() + PATIENT_SECONDS
                await line.readable()
            answer = line.connection.read_response()
        except NoScriptError:
            answer = None
        except redis.RedisError as error:
            raise self._lost(line, error) from error
        self._lines.give_back(line)
        return answer

    async def _completed(self, call: _Call, answer: list | None) -> list:
        if answer is None or answer[0] == UNSEEDED:
            return await asyncio.to_thread(self._call, call, answer)
        return answer

    def _finish_later(self, call: _Call, line: _Line) -> None:
        """A caller was cancelled after its script was sent: the call is still completed, exactly once, and
        its answer read off the line (where it would be taken for the next call's) before the line is reused."""
        finishing = asyncio.get_running_loop().create_task(self._finish(call, line))
        self._finishing.add(finishing)
        finishing.add_done_callback(self._finishing.discard)

    async def _finish(self, call: _Call, line: _Line) -> None:
        try:
            await self._completed(call, await self._answer(line))
        except CounterError as error:
            log.warning("a cancelled caller's counter call failed: %s", error)

    def _lost(self, line: _Line, error: redis.RedisError) -> CounterError:
        """The line broke mid-call: it is closed (the next call on it reconnects) and given back."""
        line.connection.disconnect()
        self._lines.give_back(line)
        return self._failed(error)

    def _connect_then_call(self, line: _Line, call: _Call) -> list:
        """Connect `line` for the next calls (a connect can take seconds when Redis is unreachable: never on the
        event loop) and make this one the usual way."""
        try:
            line.connection.disconnect()
            line.connection.connect()
        except redis.RedisError as error:
            raise self._failed(error) from error
        finally:
            self._lines.give_back(line)
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
        self._lines.close()
        self.client.close()
