"""The Redis counter store: each operation is ONE call of a Lua script (plugin/counters/lua/*.lua,
registered with redis-py's `register_script`, so it runs by EVALSHA), on keys from keys.py.

The scripts only add, subtract and compare integers (exact in Lua's doubles below 2^53 µcr, nine
billion credits), mirroring `plugin.policy.grant` and `settle`; the shared backend test-suite
checks them against those functions.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from importlib.resources import files

import redis

from plugin.counters.base import Account, CounterError, Grant, Snapshot
from plugin.counters.keys import account_keys
from plugin.policy import Ask

KEEP_KEYS = timedelta(days=75)
"""How long an account's keys live after their last reservation: past any period's end (31 days) with
room for reporting; the ledger stays the record (`rebuild`)."""


def _script(client: redis.Redis, name: str):
    return client.register_script((files("plugin.counters") / "lua" / f"{name}.lua").read_text())


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _cap(cap_ucr: int | None) -> str:
    return "" if cap_ucr is None else str(cap_ucr)


UNSEEDED = -2
"""What a script answers for an account with no `used` yet (new, or Redis was flushed)."""


class RedisCounterStore:
    """`ledger_used(account)` is what the ledger billed the account so far: an account's counters start
    from it, so a new period, a flushed Redis or usage from before the counters all start right."""

    def __init__(self, client: redis.Redis, ledger_used: Callable[[Account], int]) -> None:
        self.client = client
        self.ledger_used = ledger_used
        self._reserve = _script(client, "reserve")
        self._settle = _script(client, "settle")
        self._snapshot = _script(client, "snapshot")

    @classmethod
    def from_url(cls, url: str, ledger_used: Callable[[Account], int]) -> RedisCounterStore:
        return cls(redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2), ledger_used)

    def _call(self, script, account: Account, *args) -> list | int:
        """Run a script; if the account is unseeded, seed `used` from the ledger (HSETNX: a concurrent
        seeder wins harmlessly, both read the same ledger) and run it once more."""
        keys = account_keys(account)
        try:
            answer = script(keys=keys.all(), args=list(args))
            if answer == UNSEEDED or (isinstance(answer, list) and answer[0] == UNSEEDED):
                self.client.hsetnx(keys.counters, "used", self._seed(account))
                answer = script(keys=keys.all(), args=list(args))
            return answer
        except redis.RedisError as error:
            raise CounterError(f"redis counters: {error.__class__.__name__}") from error

    def _seed(self, account: Account) -> int:
        try:
            return self.ledger_used(account)
        except Exception as error:  # whatever the ledger raised, callers handle one error type
            raise CounterError(f"redis counters: cannot read the ledger to start from: {error.__class__.__name__}") \
                from error

    def reserve(self, account: Account, reservation_id: str, ask: Ask, *, cap_ucr: int | None,
                expires_at: datetime, now: datetime) -> Grant:
        granted, available = self._call(self._reserve, account, reservation_id, ask.full_ucr, ask.minimum_ucr,
                                        _cap(cap_ucr), _ms(expires_at), _ms(now), int(KEEP_KEYS.total_seconds()))
        return Grant(None if granted < 0 else int(granted), None if cap_ucr is None else int(available))

    def settle(self, account: Account, reservation_id: str, actual_ucr: int, *, cap_ucr: int | None) -> int:
        return int(self._call(self._settle, account, reservation_id, actual_ucr, _cap(cap_ucr)))

    def release(self, account: Account, reservation_id: str) -> None:
        self._call(self._settle, account, reservation_id, 0, "")

    def snapshot(self, account: Account, now: datetime) -> Snapshot:
        used, reserved = self._call(self._snapshot, account, _ms(now))
        return Snapshot(int(used), int(reserved))

    def rebuild(self, account: Account, used_ucr: int) -> None:
        try:
            self.client.hset(account_keys(account).counters, "used", used_ucr)
        except redis.RedisError as error:
            raise CounterError(f"redis counters: {error.__class__.__name__}") from error
