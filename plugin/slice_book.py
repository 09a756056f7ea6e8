"""This process's budget slices (plugin/rules/slices.py): at most one admitting slice per account, leased
from the counter store when a request does not fit in the current one, given back when retired
and drained. Runs on the event loop only, so the slices need no lock; the store calls run on
worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial

from plugin.counters.base import Account, CounterError, CounterStore
from plugin.rules.policy import Ask
from plugin.rules.slices import Hold, Slice
from plugin.tasks import in_background, to_the_end

log = logging.getLogger("meterline")


@dataclass(frozen=True)
class Taken:
    """What a capped request got: a hold (None: refused) and, when the store was asked, what was left
    under the ceiling before it (for the refusal or the clamp)."""

    hold: Hold | None
    available_ucr: int | None


class SliceBook:
    def __init__(self, counters: CounterStore, *, requests: int, seconds: float, reservation_seconds: float) -> None:
        self.counters = counters
        self.requests = requests
        """A slice asks for room for this many requests like the one that leases it (1: no slices)."""
        self.seconds = seconds
        self.reservation_seconds = reservation_seconds
        self._admitting: dict[Account, Slice] = {}
        self._open: dict[str, tuple[Account, Slice]] = {}
        """Shared slices not yet given back, by lease id: their requests' settlements end here."""
        self._leasing: dict[Account, asyncio.Future] = {}
        self._per_request_until: dict[Account, datetime] = {}
        """Accounts near their ceiling: no spare was granted, so requests reserve for themselves until then."""

    async def take(self, account: Account, request_id: str, ask: Ask, *, cap_ucr: int, now: datetime) -> Taken:
        """Admit a capped request from this process's slice of the account, or lease a new slice (one
        counter-store call) when it does not fit. One lease at a time per account: requests that
        arrive meanwhile wait for it and try its slice first. Near the ceiling (the last lease came
        without a spare) requests reserve for themselves, in parallel, for a slice's time. Raises
        CounterError."""
        if self.requests == 1 or self._per_request(account, now):
            return await self._reserve(account, request_id, ask, cap_ucr, now)
        while True:
            current = self._admitting.get(account)
            if current is not None and current.carve(request_id, ask.full_ucr, cap_ucr=cap_ucr, now=now):
                return Taken(current.hold(ask.full_ucr), None)
            leasing = self._leasing.get(account)
            if leasing is None:
                break
            await asyncio.shield(leasing)
            if self._per_request(account, now):  # the lease that was under way found the ceiling near
                return await self._reserve(account, request_id, ask, cap_ucr, now)
        if current is not None:
            self._retire(account, current)
        # Room for at least twice as many requests as held the last slice: under concurrency a slice
        # of `requests` would run out before its own requests finish, and every lease makes requests wait.
        requests = self.requests if current is None else max(self.requests, 2 * len(current.holders))
        self._leasing[account] = done = asyncio.get_running_loop().create_future()
        try:
            spare = replace(ask, spare_ucr=(requests - 1) * ask.full_ucr)
            return await self._reserve(account, request_id, spare, cap_ucr, now,
                                       reservation_id=f"slice_{secrets.token_hex(12)}")
        finally:
            del self._leasing[account]
            done.set_result(None)

    def admits_now(self, account: Account, ask_ucr: int, *, cap_ucr: int, now: datetime) -> bool:
        """`take` would admit a request whose worst case is `ask_ucr` from the live slice, at once."""
        if self.requests == 1 or self._per_request(account, now):
            return False
        current = self._admitting.get(account)
        return current is not None and current.fits(ask_ucr, cap_ucr=cap_ucr, now=now)

    def _per_request(self, account: Account, now: datetime) -> bool:
        until = self._per_request_until.get(account)
        if until is None:
            return False
        if now < until:
            return True
        del self._per_request_until[account]
        return False

    async def _reserve(self, account: Account, request_id: str, ask: Ask, cap_ucr: int, now: datetime, *,
                       reservation_id: str | None = None) -> Taken:
        """One counter-store reservation: a slice when it comes with a spare, else the request's own.
        A request cancelled meanwhile (its client went away) does not leave it held until it expires:
        once made, its share is given back."""
        return await to_the_end(self._reserve_now(account, request_id, ask, cap_ucr, now, reservation_id or request_id),
                                partial(self._abandon, account, request_id))

    def _abandon(self, account: Account, request_id: str, taken: Taken) -> None:
        hold = taken.hold
        if hold is None:
            return
        if hold.shared:
            self.end(hold, request_id, 0)
        else:
            self.release_later(account, hold.reservation_id, "giving back a reservation")

    async def _reserve_now(self, account: Account, request_id: str, ask: Ask, cap_ucr: int, now: datetime,
                           reservation_id: str) -> Taken:
        carving_until = now + timedelta(seconds=self.seconds)
        expires_at = carving_until + timedelta(seconds=self.reservation_seconds)
        granted = await self.counters.reserve_promptly(account, reservation_id, ask, cap_ucr=cap_ucr, now=now,
                                                       expires_at=expires_at)
        if granted.granted_ucr is None:
            return Taken(None, granted.available_ucr)
        first = min(granted.granted_ucr, ask.full_ucr)
        lease = Slice.leased(reservation_id, cap_ucr=cap_ucr, granted_ucr=granted.granted_ucr, first=request_id,
                             first_ucr=first, carving_until=carving_until, left_before_ucr=granted.available_ucr,
                             expires_at=expires_at)
        if lease.shared:
            self._admitting[account] = lease
            self._open[reservation_id] = (account, lease)
            asyncio.get_running_loop().call_later(self.seconds, self._retire, account, lease)
        elif ask.spare_ucr and self.requests > 1:
            self._per_request_until[account] = carving_until
        return Taken(lease.hold(first), granted.available_ucr)

    def end(self, hold: Hold, request_id: str, consumed_ucr: int) -> None:
        """Request `request_id`, admitted from a shared slice, settled `consumed_ucr` (0: it failed).
        Ending a request twice changes nothing."""
        entry = self._open.get(hold.reservation_id)
        if entry is not None and entry[1].end(request_id, hold.ucr, consumed_ucr):
            self._give_back(*entry)

    def covering(self, hold: Hold, request_id: str, bill_ucr: int, now: datetime) -> Slice | None:
        """The shared slice `hold` is part of, when its reservation holds the request's whole bill and is far
        from running out (half its life left: other proxies' clocks may run ahead of this one's)."""
        entry = self._open.get(hold.reservation_id) if hold.shared else None
        margin = timedelta(seconds=self.reservation_seconds / 2)
        if entry is None or not entry[1].covers(request_id, hold.ucr, bill_ucr, live_until=now + margin):
            return None
        return entry[1]

    def room(self, account: Account) -> int:
        """µcr this process holds for the account's next requests (counted as reserved in the store)."""
        current = self._admitting.get(account)
        return 0 if current is None else current.room_ucr

    def _retire(self, account: Account, lease: Slice) -> None:
        if self._admitting.get(account) is lease:
            del self._admitting[account]
        if lease.retire():
            self._give_back(account, lease)

    def _give_back(self, account: Account, lease: Slice) -> None:
        if self._open.pop(lease.lease_id, None) is not None:  # not given back already (by `close`)
            self.release_later(account, lease.lease_id, "giving back a budget slice")

    def release(self, account: Account, reservation_id: str) -> None:
        """End a reservation this process holds in the counter store, a slice or a single request's
        (blocking: call it off the event loop). If the store cannot answer, it expires by itself."""
        try:
            self.counters.release(account, reservation_id)
        except CounterError as error:
            log.warning("meterline: could not release reservation %s (it expires by itself): %s", reservation_id,
                        error)

    def release_later(self, account: Account, reservation_id: str, what: str) -> None:
        """`release` on a worker thread, awaited by nobody (a failure is logged as `what`)."""
        in_background(asyncio.to_thread(self.release, account, reservation_id), what)

    def close(self) -> None:
        """Give back every slice still held (the process is stopping); what cannot be reached expires."""
        for lease_id, (account, _) in list(self._open.items()):
            self.release(account, lease_id)
        self._open.clear()
        self._admitting.clear()

