"""The counter-store protocol. The arithmetic it must do is `plugin.policy.grant` and `settle`:
a backend only makes them atomic against concurrent requests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from plugin.policy import Ask


class CounterError(Exception):
    """The counter store could not answer (Redis down, database locked...). The one error callers
    catch, whatever the backend, to apply METERLINE_FAIL_MODE."""


@dataclass(frozen=True)
class Snapshot:
    used_ucr: int
    reserved_ucr: int


@dataclass(frozen=True)
class Grant:
    """What a reservation attempt got."""

    granted_ucr: int | None
    """µcr reserved, or None when refused."""
    available_ucr: int | None
    """µcr that were left under the ceiling before this reservation (None: no ceiling)."""


@dataclass(frozen=True)
class Account:
    """Whose counters, for which period. `period` is the period's start (UTC)."""

    customer_id: str
    period: datetime

    @property
    def period_key(self) -> str:
        return str(int(self.period.timestamp()))


class CounterStore(Protocol):
    def reserve(self, account: Account, reservation_id: str, ask: Ask, *, cap_ucr: int | None,
                expires_at: datetime, now: datetime) -> Grant:
        """Atomically: drop the account's expired reservations, then reserve per `policy.grant`."""
        ...

    def settle(self, account: Account, reservation_id: str, actual_ucr: int, *, cap_ucr: int | None) -> int:
        """Atomically: end the reservation and add what is billed (per `policy.settle`) to used.
        Returns the µcr billed. An unknown (expired, already settled) reservation bills as if it
        had reserved nothing."""
        ...

    def release(self, account: Account, reservation_id: str) -> None:
        """End a reservation without billing (the request failed)."""
        ...

    def snapshot(self, account: Account, now: datetime) -> Snapshot:
        """Used and reserved µcr, expired reservations not counted."""
        ...

    def rebuild(self, account: Account, used_ucr: int) -> None:
        """Set used from the ledger (after a Redis flush or a restore); reservations are kept."""
        ...
