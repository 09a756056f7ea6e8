"""Budget slices: a share of a capped customer's remaining budget that one proxy process holds, so
most of its requests are admitted in memory instead of with a counter-store round trip each
(pure: plain values, no I/O, no clock).

A slice is ONE reservation in the counter store, made by the same atomic step as any other
(`policy.grant`, asking for a spare beside the request's own worst case). Every request admitted
from it takes its worst case out of the slice's room; when it settles, the store takes what it
really cost out of the slice's reservation (`portion_ucr`) and the rest of its share goes back
to the room. So the store's reservation is always the slice's room plus what its open requests
hold, and the sum of every process's slices and requests never exceeds what is left under the
ceiling: the cap holds exactly as with per-request reservations.

A slice stops admitting (is retired) when a request does not fit in its room, when the
customer's ceiling changed, or when its time is up (a couple of seconds: a slice is a burst's
budget, not a standing claim). Once retired and drained (no open requests), the rest of the
reservation is given back with one `release`. A grant without a spare (the customer is near its
ceiling: `policy.SPARE_SHARE`) is a plain per-request reservation, retired from the start and
ended by its request's own settlement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Hold:
    """What one admitted request holds in the counter store."""

    reservation_id: str
    """The store's reservation: the request's own, or the slice it was admitted from."""
    ucr: int
    """The request's worst case (what it took from the reservation)."""
    shared: bool
    """Part of a slice: settle with `portion_ucr` and leave the rest held; else end the reservation."""


@dataclass
class Slice:
    lease_id: str
    cap_ucr: int
    """The ceiling it was leased under: a changed ceiling retires it."""
    room_ucr: int
    """µcr of the reservation no open request holds."""
    carving_until: datetime
    shared: bool
    """Leased with a spare: its requests settle portions of it, and the rest is released once drained.
    Without one it is a single request's reservation, ended by that request's settlement."""
    holders: set[str] = field(default_factory=set)
    """Requests admitted from it and not yet settled or released (the one that leased it included)."""
    retired: bool = False
    leased_ucr: int = 0
    """The reservation it was leased with: its room, its requests' holds and what they have spent."""
    left_before_ucr: int | None = None
    """What was left under the ceiling when it was leased (others' bills and reservations deducted)."""
    expires_at: datetime | None = None
    """When the store drops its reservation if it is not released first."""

    @classmethod
    def leased(cls, lease_id: str, *, cap_ucr: int, granted_ucr: int, first: str, first_ucr: int,
               carving_until: datetime, left_before_ucr: int | None = None,
               expires_at: datetime | None = None) -> Slice:
        """A new slice of `granted_ucr`, `first_ucr` of it held by request `first`, which leased it."""
        room = granted_ucr - first_ucr
        return cls(lease_id, cap_ucr, room, carving_until, shared=room > 0, holders={first}, retired=room == 0,
                   leased_ucr=granted_ucr, left_before_ucr=left_before_ucr, expires_at=expires_at)

    def hold(self, ucr: int) -> Hold:
        return Hold(self.lease_id, ucr, self.shared)

    def fits(self, ask_ucr: int, *, cap_ucr: int, now: datetime) -> bool:
        """`carve` would admit a request whose worst case is `ask_ucr`."""
        return not self.retired and cap_ucr == self.cap_ucr and now < self.carving_until and ask_ucr <= self.room_ucr

    def carve(self, request_id: str, ask_ucr: int, *, cap_ucr: int, now: datetime) -> bool:
        """Admit a request whose worst case is `ask_ucr` from the room, if the slice may still admit
        and it fits. False: the caller retires the slice and leases another."""
        if not self.fits(ask_ucr, cap_ucr=cap_ucr, now=now):
            return False
        self.room_ucr -= ask_ucr
        self.holders.add(request_id)
        return True

    def end(self, request_id: str, held_ucr: int, consumed_ucr: int) -> bool:
        """Request `request_id`, which held `held_ucr`, took `consumed_ucr` of the reservation when it
        settled (0: released; never more than it held: the store is told the same, `portion_ucr`). The
        rest of its share goes back to the room. A request ends once; ending it again changes nothing.
        True exactly once: when the slice is retired and this was its last holder, so the rest of its
        reservation should be released."""
        if request_id not in self.holders:
            return False
        self.holders.remove(request_id)
        self.room_ucr += held_ucr - min(consumed_ucr, held_ucr)
        return self.retired and not self.holders

    def covers(self, request_id: str, held_ucr: int, bill_ucr: int, *, live_until: datetime) -> bool:
        """Its reservation still holds request `request_id`'s whole bill (no more than the request holds)
        and will until `live_until`: the bill can be written before the store hears of it."""
        return (request_id in self.holders and bill_ucr <= held_ucr and self.expires_at is not None
                and live_until < self.expires_at)

    def remaining_after(self, held_ucr: int, bill_ucr: int) -> int | None:
        """What the customer can still spend once a request of this slice that held `held_ucr` is billed
        `bill_ucr` (before `end`): what was left when the slice was leased, less what its requests have
        spent or still hold. What others spent since the lease is not in it; None when unknown."""
        if self.left_before_ucr is None:
            return None
        return max(0, self.left_before_ucr - self.leased_ucr + self.room_ucr + held_ucr - min(bill_ucr, held_ucr))

    def retire(self) -> bool:
        """Stop admitting from it. True exactly once: when it has no holder left (release it now);
        otherwise its last `end` says so."""
        if self.retired:
            return False
        self.retired = True
        return not self.holders
