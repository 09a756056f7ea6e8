"""Budget slices (plugin/rules/slices.py): the pure bookkeeping, and a property test of several processes
admitting from slices of one customer's budget against a model counter store (policy.grant and
policy.settle over plain integers), in any interleaving."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from plugin.rules.policy import Ask, Ceiling, Refusal, grant, settle
from plugin.rules.slices import Hold, Slice

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=2)


def a_slice(granted: int = 10_000, first: int = 1000) -> Slice:
    return Slice.leased("slice_1", cap_ucr=1_000_000, granted_ucr=granted, first="r0", first_ucr=first,
                        carving_until=LATER)


def test_requests_are_admitted_from_the_room_until_it_runs_out():
    lease = a_slice()
    assert (lease.room_ucr, lease.shared, lease.retired) == (9000, True, False)
    assert all(lease.carve(f"r{n}", 1000, cap_ucr=1_000_000, now=NOW) for n in range(1, 10))
    assert lease.room_ucr == 0
    assert not lease.carve("r10", 1000, cap_ucr=1_000_000, now=NOW)
    assert lease.hold(1000) == Hold("slice_1", 1000, shared=True)


def test_a_live_slice_covers_a_bill_its_request_holds_whole():
    lease = Slice.leased("slice_1", cap_ucr=1_000_000, granted_ucr=10_000, first="r0", first_ucr=1000,
                         carving_until=LATER, left_before_ucr=50_000, expires_at=LATER + timedelta(minutes=15))
    live_until = NOW + timedelta(minutes=7)
    assert lease.covers("r0", 1000, 1000, live_until=live_until)
    assert not lease.covers("r0", 1000, 1001, live_until=live_until)  # an overshoot: the store decides
    assert not lease.covers("r9", 1000, 10, live_until=live_until)  # not one of its requests
    assert not lease.covers("r0", 1000, 10, live_until=LATER + timedelta(minutes=15))  # running out
    assert not a_slice().covers("r0", 1000, 10, live_until=NOW)  # expiry unknown


def test_what_is_left_after_a_bill_is_what_was_left_at_the_lease_less_what_the_slice_spent_or_holds():
    lease = Slice.leased("slice_1", cap_ucr=1_000_000, granted_ucr=10_000, first="r0", first_ucr=1000,
                         carving_until=LATER, left_before_ucr=50_000, expires_at=LATER)
    assert lease.remaining_after(1000, 400) == 50_000 - 400  # the rest of the slice is still the customer's
    assert lease.carve("r1", 3000, cap_ucr=1_000_000, now=NOW)
    assert lease.remaining_after(1000, 400) == 50_000 - 400 - 3000  # r1 holds 3,000 while in flight
    lease.end("r0", 1000, 400)
    assert lease.remaining_after(3000, 3000) == 50_000 - 400 - 3000
    assert lease.remaining_after(3000, 9000) == 50_000 - 400 - 3000  # never past what it held
    assert a_slice().remaining_after(1000, 10) is None
    assert Slice.leased("s", cap_ucr=10, granted_ucr=10, first="r0", first_ucr=10, carving_until=LATER,
                        left_before_ucr=10).remaining_after(10, 10) == 0


def test_a_slice_stops_admitting_when_its_time_is_up_or_the_ceiling_changed():
    lease = a_slice()
    assert not lease.carve("r1", 1000, cap_ucr=1_000_000, now=LATER)
    assert not lease.carve("r1", 1000, cap_ucr=999_999, now=NOW)
    assert lease.carve("r1", 1000, cap_ucr=1_000_000, now=NOW)


def test_fits_says_what_carve_would_do_and_changes_nothing():
    lease = a_slice()
    for ask, cap, now in [(9000, 1_000_000, NOW), (9001, 1_000_000, NOW), (1, 1_000_000, LATER), (1, 999_999, NOW)]:
        assert lease.fits(ask, cap_ucr=cap, now=now) == (ask <= 9000 and cap == 1_000_000 and now < LATER)
    assert (lease.room_ucr, lease.holders) == (9000, {"r0"})
    lease.retire()
    assert not lease.fits(1, cap_ucr=1_000_000, now=NOW)


def test_what_a_request_did_not_spend_goes_back_to_the_room():
    lease = a_slice()
    lease.carve("r1", 1000, cap_ucr=1_000_000, now=NOW)
    assert lease.room_ucr == 8000
    assert not lease.end("r1", 1000, 300)
    assert lease.room_ucr == 8700
    assert not lease.end("r0", 1000, 0)  # failed: all of it back
    assert lease.room_ucr == 9700
    assert not lease.end("r0", 1000, 0)  # a second end of the same request changes nothing
    assert lease.room_ucr == 9700


def test_a_retired_slice_is_given_back_once_when_its_last_request_ends():
    lease = a_slice()
    lease.carve("r1", 1000, cap_ucr=1_000_000, now=NOW)
    assert not lease.retire()  # two requests still hold part of it
    assert not lease.retire()
    assert not lease.carve("r2", 1, cap_ucr=1_000_000, now=NOW)
    assert not lease.end("r0", 1000, 1000)
    assert lease.end("r1", 1000, 500)  # the last one: release the rest now
    assert not lease.end("r1", 1000, 500)
    idle = a_slice()
    idle.end("r0", 1000, 1000)
    assert idle.retire()  # nobody holds it: release at once


def test_a_grant_without_a_spare_is_a_single_requests_reservation():
    single = a_slice(granted=1000, first=1000)
    assert (single.shared, single.retired) == (False, True)
    assert single.hold(1000) == Hold("slice_1", 1000, shared=False)
    assert not single.carve("r1", 1, cap_ucr=1_000_000, now=NOW)


class Processes(RuleBasedStateMachine):
    """Three proxy processes admit one customer's requests from budget slices of a shared counter
    store, modelled with the pure policy; requests settle (under, at or over their worst case) or
    fail in any order, and slices time out whenever. A bill its slice holds whole is written to the
    ledger first and settled later (plugin.admission.record_bill); a process may die between the
    two, and its reservations then expire, which starts the counters again from the ledger
    (reserve.lua). Whatever happens, everything admitted is backed by the store, the counters are
    never short of the ledger, and nothing is billed past the ceiling."""

    SPARE_REQUESTS = 8

    def __init__(self) -> None:
        super().__init__()
        self.limit = Ceiling(200_000, Refusal.HARD_LIMIT)
        self.used = 0  # the store's counter
        self.ledger = 0  # what the ledger billed
        self.store: dict[str, int] = {}  # reservation id -> µcr held
        self.owner: dict[str, int] = {}  # reservation id -> the process that made it
        self.admitting: dict[int, Slice] = {}
        self.slices: dict[str, Slice] = {}  # not yet given back
        self.in_flight: dict[str, tuple[Hold, int]] = {}  # request id -> (hold, process)
        self.unsettled: dict[str, tuple[Hold, int, int]] = {}  # in the ledger, not settled: (hold, bill, process)
        self.orphaned: dict[str, tuple[Hold, int]] = {}  # unsettled bills of dead processes, until their reservations expire
        self.requests = 0

    def _release(self, reservation_id: str) -> None:
        self.store.pop(reservation_id, None)
        self.slices.pop(reservation_id, None)

    def _retire(self, process: int) -> None:
        lease = self.admitting.pop(process, None)
        if lease is not None and lease.retire():
            self._release(lease.lease_id)

    @rule(process=st.integers(0, 2), full=st.integers(1, 20_000), minimum=st.integers(1, 20_000))
    def request(self, process, full, minimum):
        """What plugin.slice_book.SliceBook.take does, over the model store."""
        minimum = min(minimum, full)
        self.requests += 1
        request_id = f"r{self.requests}"
        current = self.admitting.get(process)
        if current is not None and current.carve(request_id, full, cap_ucr=self.limit.ucr, now=NOW):
            self.in_flight[request_id] = (current.hold(full), process)
            return
        self._retire(process)
        lease_id = f"slice{self.requests}"
        granted = grant(Ask(full, minimum, spare_ucr=(self.SPARE_REQUESTS - 1) * full), used_ucr=self.used,
                        reserved_ucr=sum(self.store.values()), limit=self.limit)
        if granted is None:
            return
        self.store[lease_id] = granted
        self.owner[lease_id] = process
        lease = Slice.leased(lease_id, cap_ucr=self.limit.ucr, granted_ucr=granted, first=request_id,
                             first_ucr=min(granted, full), carving_until=LATER)
        if lease.shared:
            self.admitting[process] = self.slices[lease_id] = lease
        self.in_flight[request_id] = (lease.hold(min(granted, full)), process)

    @precondition(lambda self: self.in_flight)
    @rule(index=st.integers(0, 10**6), spent_pct=st.integers(0, 150))
    def bill_one(self, index, spent_pct):
        """What admission.record_bill does: a bill the slice holds whole goes to the ledger now and is
        settled later; otherwise the store settles first (never past the ceiling), then the ledger."""
        request_id = sorted(self.in_flight)[index % len(self.in_flight)]
        hold, process = self.in_flight.pop(request_id)
        actual = hold.ucr * spent_pct // 100
        if hold.shared and actual <= hold.ucr:
            self.ledger += actual
            self.unsettled[request_id] = (hold, actual, process)
            return
        held = self.store.get(hold.reservation_id, 0)
        taken = min(actual, hold.ucr, held) if hold.shared else held
        bill = settle(actual, reserved_for_this_ucr=taken, used_ucr=self.used,
                      reserved_ucr=sum(self.store.values()), limit=self.limit).bill_ucr
        if actual <= hold.ucr:
            assert bill == actual  # an honest worst case is always billed in full
        self.used += bill
        self.ledger += bill
        if not hold.shared:
            self.store.pop(hold.reservation_id, None)
            return
        self._settled(request_id, hold, held - taken, min(actual, hold.ucr))

    def _settled(self, request_id: str, hold: Hold, held_after: int, consumed: int) -> None:
        self.store[hold.reservation_id] = held_after
        lease = self.slices[hold.reservation_id]
        if lease.end(request_id, hold.ucr, consumed):
            self._release(lease.lease_id)

    @precondition(lambda self: self.unsettled)
    @rule(index=st.integers(0, 10**6))
    def settle_written(self, index):
        """The settlement after the response: the counters follow the ledger, unclamped."""
        request_id = sorted(self.unsettled)[index % len(self.unsettled)]
        hold, bill, _ = self.unsettled.pop(request_id)
        held = self.store[hold.reservation_id]
        self.used += bill
        self._settled(request_id, hold, held - min(bill, held), bill)

    @precondition(lambda self: self.in_flight)
    @rule(index=st.integers(0, 10**6))
    def fail_one(self, index):
        request_id = sorted(self.in_flight)[index % len(self.in_flight)]
        hold, _ = self.in_flight.pop(request_id)
        if not hold.shared:
            self._release(hold.reservation_id)
        elif self.slices[hold.reservation_id].end(request_id, hold.ucr, 0):
            self._release(hold.reservation_id)

    @rule(process=st.integers(0, 2))
    def time_is_up(self, process):
        self._retire(process)

    @rule(process=st.integers(0, 2))
    def dies(self, process):
        """Killed: its requests in flight are never billed, the bills it wrote are never settled, and its
        reservations stay in the store until they expire. A new process takes its place."""
        self.in_flight = {rid: entry for rid, entry in self.in_flight.items() if entry[1] != process}
        for request_id, (hold, bill, owner) in list(self.unsettled.items()):
            if owner == process:
                self.orphaned[request_id] = (hold, bill)
                del self.unsettled[request_id]
        self.admitting.pop(process, None)
        for lease_id in [lease_id for lease_id, owner in self.owner.items() if owner == process]:
            self.slices.pop(lease_id, None)
            self.owner[lease_id] = -1  # nobody's: it runs out

    @rule()
    def reservations_run_out(self):
        """The dead processes' reservations expire; the next reservation starts the counters again
        from the ledger (reserve.lua)."""
        expired = [lease_id for lease_id, owner in self.owner.items() if owner == -1 and lease_id in self.store]
        for lease_id in expired:
            del self.store[lease_id]
            del self.owner[lease_id]
        self.orphaned.clear()
        if expired:
            self.used = self.ledger

    def _unsettled_total(self) -> int:
        return sum(bill for _, bill, _ in self.unsettled.values()) + sum(bill for _, bill in self.orphaned.values())

    @invariant()
    def everything_admitted_is_backed_and_nothing_is_billed_past_the_ceiling(self):
        # Bills not yet settled are still held in their reservations: count them once.
        assert self.ledger - self._unsettled_total() + sum(self.store.values()) <= self.limit.ucr
        assert self.ledger <= self.limit.ucr
        for lease_id, lease in self.slices.items():
            holds = sum(hold.ucr for hold, _ in self.in_flight.values() if hold.reservation_id == lease_id)
            # A bill written but not settled: its request still holds all it held.
            holds += sum(hold.ucr for hold, _, _ in self.unsettled.values() if hold.reservation_id == lease_id)
            assert self.store[lease_id] == lease.room_ucr + holds
        for hold, _ in self.in_flight.values():
            assert hold.reservation_id in self.store
            if not hold.shared:
                assert self.store[hold.reservation_id] == hold.ucr

    @invariant()
    def the_counters_are_never_short_of_the_ledger(self):
        assert self.used >= self.ledger - self._unsettled_total()

    @invariant()
    def a_slice_is_given_back_once_nobody_holds_it(self):
        for lease in self.slices.values():
            assert not (lease.retired and not lease.holders)
        for lease in self.admitting.values():
            assert lease.lease_id in self.slices


TestProcesses = Processes.TestCase
TestProcesses.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
