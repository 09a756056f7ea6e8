"""Every Redis key meterline uses, built here and nowhere else.

All keys of one customer share the hash tag `{customer}`, so a multi-key script stays in one
Redis Cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from plugin.counters.base import Account

PREFIX = "meterline"


@dataclass(frozen=True)
class AccountKeys:
    counters: str
    """Hash: `used`, `reserved` (µcr)."""
    reservations: str
    """Hash: reservation id -> µcr held."""
    expiries: str
    """Sorted set: reservation id scored by its expiry (Unix ms)."""

    def all(self) -> list[str]:
        return [self.counters, self.reservations, self.expiries]


def _customer(customer_id: str) -> str:
    return f"{PREFIX}:{{{customer_id}}}"


def account_keys(account: Account) -> AccountKeys:
    base = f"{_customer(account.customer_id)}:{account.period_key}"
    return AccountKeys(counters=f"{base}:counters", reservations=f"{base}:reservations", expiries=f"{base}:expiries")


def rate_keys(customer_id: str, window: int) -> list[str]:
    """Strings: requests counted in rate-limit window `window` and in the one before it."""
    return [f"{_customer(customer_id)}:rate:{window}", f"{_customer(customer_id)}:rate:{window - 1}"]


def hour_keys(customer_id: str, hour: int) -> list[str]:
    """Strings: µcr billed in clock hour `hour` (hours since the epoch) and in the one before it."""
    return [f"{_customer(customer_id)}:spend:{hour}", f"{_customer(customer_id)}:spend:{hour - 1}"]
