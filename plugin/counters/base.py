"""The counter-store protocol. The arithmetic it must do is `plugin.rules.policy.grant` and `settle`:
a backend only makes them atomic against concurrent requests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from plugin.rules.policy import Ask
from plugin.rules.ratelimit import RateLimit


class CounterError(Exception):
    """The counter store could not answer (Redis down, database locked...). The one error callers
    catch, whatever the backend, to apply METERLINE_FAIL_MODE."""


@dataclass(frozen=True)
class Snapshot:
    used_ucr: int
    reserved_ucr: int


@dataclass(frozen=True)
class Grant:
    """What an admission attempt got."""

    granted_ucr: int | None
    """µcr reserved, or None when refused (or when nothing was asked)."""
    available_ucr: int | None
    """µcr that were left under the ceiling before this reservation (None: no ceiling)."""
    rate_limited: bool = False
    """Refused by the rate limit: nothing was reserved."""
    rate_current: int = 0
    """Requests counted in the current rate window before this one (to explain a refusal)."""
    rate_previous: int = 0


@dataclass(frozen=True)
class Settled:
    """What a settlement did, and the figures the checks after it need."""

    billed_ucr: int
    used_ucr: int
    """The account's used µcr, this bill included."""
    reserved_ucr: int
    """µcr other requests still hold."""
    hour_ucr: int
    """µcr billed to the customer in the current clock hour, this bill included (the breaker's input)."""
    previous_hour_ucr: int


def hour_index(moment: datetime) -> int:
    """Hours since the Unix epoch: the breaker's spend buckets."""
    return int(moment.timestamp()) // 3600


@dataclass(frozen=True)
class Account:
    """Whose counters, for which period. `period` is the period's start (UTC)."""

    customer_id: str
    period: datetime

    @property
    def period_key(self) -> str:
        return str(int(self.period.timestamp()))


class CounterStore(Protocol):
    def reserve(self, account: Account, reservation_id: str, ask: Ask | None, *, cap_ucr: int | None,
                expires_at: datetime, now: datetime, rate: RateLimit | None = None) -> Grant:
        """ONE atomic admission step: count the request against `rate` (refusing it if it does not
        fit, per `plugin.rules.ratelimit.admits`), then drop the account's expired reservations and
        reserve per `policy.grant`. `ask=None` reserves nothing (a customer with no ceiling)."""
        ...

    async def reserve_promptly(self, account: Account, reservation_id: str, ask: Ask | None, *, cap_ucr: int | None,
                               expires_at: datetime, now: datetime, rate: RateLimit | None = None) -> Grant:
        """`reserve` for a caller on an event loop (see `settle_promptly`)."""
        ...

    def settle(self, account: Account, reservation_id: str, actual_ucr: int, *, cap_ucr: int | None,
               now: datetime, portion_ucr: int | None = None, already_in_ledger: bool = False) -> Settled:
        """Atomically: end the reservation, add what is billed (per `policy.settle`) to used and to
        the customer's spend in the current hour. An unknown reservation (expired, never made)
        bills as if it had reserved nothing.

        `portion_ucr`: the reservation is a slice several requests share (plugin.rules.slices): take at
        most this much of it for the bill and keep the rest held, instead of ending it.
        `already_in_ledger`: the bill's ledger row is committed (a customer without a ceiling, whose
        counters follow the ledger): if this call has to start the account from the ledger, the bill
        is in what it starts from and is not added again (still reported as billed)."""
        ...

    async def settle_promptly(self, account: Account, reservation_id: str, actual_ucr: int, *, cap_ucr: int | None,
                              now: datetime, portion_ucr: int | None = None,
                              already_in_ledger: bool = False) -> Settled:
        """`settle` for a caller on an event loop, answered as soon as the store can: the response path
        settles with it (never blocking the loop for long: slow work goes to a worker thread)."""
        ...

    def release(self, account: Account, reservation_id: str) -> None:
        """End a reservation without billing (the request failed, or a slice is given back)."""
        ...

    def snapshot(self, account: Account, now: datetime) -> Snapshot:
        """Used and reserved µcr, expired reservations not counted."""
        ...

    def hour_spend(self, customer_id: str, now: datetime) -> tuple[int, int]:
        """µcr billed in the current and the previous clock hour."""
        ...

    def rebuild(self, account: Account, used_ucr: int) -> None:
        """Set used from the ledger (after a Redis flush or a restore); reservations are kept."""
        ...

    def close(self) -> None:
        """Release the store's connections (the process is shutting down)."""
        ...
