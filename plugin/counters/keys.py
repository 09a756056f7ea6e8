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


def account_keys(account: Account) -> AccountKeys:
    base = f"{PREFIX}:{{{account.customer_id}}}:{account.period_key}"
    return AccountKeys(counters=f"{base}:counters", reservations=f"{base}:reservations", expiries=f"{base}:expiries")
