"""Meter events as Stripe takes them: v1 one at a time and synchronously, v2 in batches and asynchronously.

Both versions share one rule book (`MeterEvents._ingest`): the event must name an active meter and a known
customer, carry a number, and fall between 35 days ago and 5 minutes ahead; an identifier counts once
per rolling 24 h. They differ only in how they answer: v1 refuses with a 400 now, v2 records what it can
and reports the rest later in ``billing.meter.error_report_triggered`` events.

Summaries (`MeterEvents.meter_event_summaries`) are what a ledger reconciles against, so they copy the
two ways Stripe's can disagree with what was sent: they lag (events received less than
`summary_lag_seconds` ago are not in them yet) and, for tests, a recorded event can be forgotten
(`forget_meter_event`), as if Stripe had lost it.
"""

from __future__ import annotations

import secrets
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from plugin.stripe.emulator.catalog import Catalog
from plugin.stripe.emulator.clock import DAY, Expiring, parse_rfc3339, rfc3339
from plugin.stripe.emulator.errors import ApiError, rate_limited
from plugin.stripe.emulator.forms import InvalidParam, Params, parse_decimal
from plugin.stripe.emulator.money import json_number
from plugin.stripe.emulator.store import LIST_PARAMS, Store, new_id, paginate

IDENTIFIER_WINDOW_SECONDS = DAY
TIMESTAMP_PAST_SECONDS = 35 * DAY
TIMESTAMP_FUTURE_SECONDS = 5 * 60
SESSION_SECONDS = 15 * 60
MAX_STREAM_EVENTS = 100
MAX_IDENTIFIER_LENGTH = 100

Slot = tuple[str, str]
"""(meter id, customer id): what v1 allows one call at a time for, and what usage is kept under."""
HOUR = 3600
GROUPING_WINDOWS = {"day": DAY, "hour": HOUR}
"""`value_grouping_window` and its size in seconds."""


@dataclass(frozen=True, slots=True)
class RecordedUsage:
    """One recorded event as aggregations read it; `log_index` is its entry in `MeterEvents.recorded`."""

    identifier: str
    timestamp: int
    value: Decimal
    received_at: int
    """The emulator's clock when the event was recorded: what the summaries' lag is measured from."""
    slot: Slot
    log_index: int


@dataclass(frozen=True)
class MeterEventInput:
    """One meter event as sent on v1 or v2, after its shape was checked."""

    event_name: str
    payload: dict[str, str]
    identifier: str | None
    timestamp: int | None


def duplicate_identifier(identifier: str | None) -> ApiError:
    """Stripe's answer to an identifier it already counted (within its rolling 24 h): a plain 400
    `invalid_request_error`, no `code`, no `param`, and `Stripe-Should-Retry: false` (DESIGN "Stripe
    facts"). The event is counted: a client must treat this answer as delivered."""
    return ApiError(400, f"An event already exists with identifier {identifier}.", should_retry=False)


class EventRejected(Exception):
    """A meter event Stripe would not record: `code` is the code of Stripe's meter error reports."""

    def __init__(self, code: str, message: str, param: str | None = None, meter_id: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param, self.meter_id = code, message, param, meter_id


class MeterEvents:
    """Recorded usage by meter and customer, v2 session tokens, and the log the control API shows."""

    def __init__(self, store: Store, catalog: Catalog):
        self.store = store
        self.catalog = catalog
        self._sessions: dict[str, float] = {}
        self._identifiers: Expiring[int] = Expiring(IDENTIFIER_WINDOW_SECONDS)
        self._usage: dict[Slot, list[RecordedUsage]] = {}
        self._live_by_identifier: dict[str, list[RecordedUsage]] = {}
        """Recorded and not forgotten, oldest first (an identifier recurs once its 24 h have passed)."""
        self._busy_slots: set[Slot] = set()
        self.recorded: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []
        self.duplicates = 0
        self.forgotten = 0
        self.summary_lag_seconds = 0
        """Summaries leave out events received less than this long ago, as Stripe's are eventually consistent."""

    # -------------------------------------------------------------------------- v1

    def claim_meter_event_slot(self, raw: Mapping[str, Any]) -> Slot | None:
        """Stripe's "one concurrent call per customer per meter" on v1: 429 while another one runs.

        Returns the slot to release when the call is done, or None when there is nothing to hold
        (a request too malformed to name a customer and meter: it fails later).
        """
        event_name, payload = raw.get("event_name"), raw.get("payload")
        meter = self.catalog.active_meter(event_name) if isinstance(event_name, str) else None
        if meter is None or not isinstance(payload, Mapping):
            return None
        customer = payload.get(meter["customer_mapping"]["event_payload_key"])
        if not isinstance(customer, str):
            return None
        slot = (meter["id"], customer)
        if slot in self._busy_slots:
            raise rate_limited(
                f"Another meter event for customer '{customer}' on meter '{meter['id']}' is still being processed: "
                "send one request at a time per customer and meter."
            )
        self._busy_slots.add(slot)
        return slot

    def release_meter_event_slot(self, slot: Slot | None) -> None:
        if slot is not None:
            self._busy_slots.discard(slot)

    def create_meter_event(self, params: Params) -> dict[str, Any]:
        """v1: validated synchronously; a rejected or duplicate event is a 400 the caller sees now."""
        event = _v1_event(params)
        now = self.store.now()
        try:
            recorded = self._ingest(event, "v1", now)
        except EventRejected as rejected:
            raise ApiError(400, rejected.message, code=rejected.code, param=rejected.param) from None
        if recorded is None:
            raise duplicate_identifier(event.identifier)
        identifier, timestamp = recorded
        return {"object": "billing.meter_event", "created": now, "livemode": False, "event_name": event.event_name,
                "identifier": identifier, "payload": event.payload, "timestamp": timestamp}

    # -------------------------------------------------------------------------- v2

    def create_meter_event_session(self, params: Params) -> dict[str, Any]:
        params.only()
        now = self.store.clock()
        self._sessions = {token: expiry for token, expiry in self._sessions.items() if expiry > now}
        token = f"mes_tok_{secrets.token_urlsafe(32)}"
        self._sessions[token] = now + SESSION_SECONDS
        return {"id": new_id("mes"), "object": "v2.billing.meter_event_session", "authentication_token": token,
                "created": rfc3339(now), "expires_at": rfc3339(now + SESSION_SECONDS), "livemode": False}

    def check_session_token(self, token: str) -> None:
        expiry = self._sessions.get(token)
        if expiry is None or expiry <= self.store.clock():
            # Stripe's v2 error `temporary_session_expired` (the SDK raises TemporarySessionExpiredError)
            raise ApiError(401, "The meter event session has expired or is not valid; create a new meter event "
                           "session.", type="temporary_session_expired", code="billing_meter_event_session_expired")

    def accept_meter_event_stream(self, params: Params) -> None:
        """v2: the batch's shape is checked now; each event's content later, as Stripe does.

        A shape error refuses the whole batch (400). Otherwise every valid event is recorded (a known
        identifier is silently skipped) and the invalid ones are reported later, as Stripe does, in thin
        events only (in either webhook mode): one ``v1.billing.meter.error_report_triggered`` per meter,
        and ``v1.billing.meter.no_meter_found`` for events that named no meter; the caller's answer does
        not tell.
        """
        params.only("events")
        batch = params.children("events", required=True)
        if not 1 <= len(batch) <= MAX_STREAM_EVENTS:
            raise InvalidParam(f"events must contain between 1 and {MAX_STREAM_EVENTS} items; got {len(batch)}.",
                               "events")
        events = [_stream_event(item) for item in batch]
        now = self.store.now()
        rejected: list[tuple[MeterEventInput, EventRejected]] = []
        for event in events:
            try:
                self._ingest(event, "v2", now)
            except EventRejected as error:
                rejected.append((event, error))
        for report in error_reports(rejected, now):  # Stripe sends these thin only, whatever else it sends
            self.store.emit_thin(*thin_error_report(report), always=True)

    # -------------------------------------------------------------------------- the rules, for both versions

    def _ingest(self, event: MeterEventInput, source: str, now: int) -> tuple[str, int] | None:
        """Record `event`: its identifier and timestamp, or None for a known identifier (counted, not recorded).

        Raises `EventRejected` (and logs it) when Stripe would not record the event.
        """
        try:
            meter, customer, value = self._check_event(event, now)
        except EventRejected as error:
            self.rejections.append({
                "identifier": event.identifier, "event_name": event.event_name, "code": error.code,
                "message": error.message, "source": source, "received_at": now,
            })
            raise
        identifier = event.identifier or new_id("evtid")
        self._identifiers.expire(now)
        if identifier in self._identifiers:
            self.duplicates += 1
            return None
        timestamp = event.timestamp if event.timestamp is not None else now
        slot = (meter["id"], customer)
        usage = RecordedUsage(identifier, timestamp, value, now, slot, len(self.recorded))
        self._identifiers.put(identifier, now, now)
        self._usage.setdefault(slot, []).append(usage)
        self._live_by_identifier.setdefault(identifier, []).append(usage)
        self.recorded.append({
            "identifier": identifier, "event_name": event.event_name, "meter": meter["id"], "customer": customer,
            "value": event.payload.get(meter["value_settings"]["event_payload_key"]), "timestamp": timestamp,
            "source": source, "received_at": now, "forgotten": False,
        })
        return identifier, timestamp

    def _check_event(self, event: MeterEventInput, now: int) -> tuple[dict[str, Any], str, Decimal]:
        """The meter, customer and value of a valid event; `EventRejected` with Stripe's code otherwise."""
        meter = self.catalog.active_meter(event.event_name)
        if meter is None:
            raise EventRejected("archived_meter" if self.catalog.had_meter(event.event_name) else "no_meter",
                                f"No active meter was found for event_name '{event.event_name}'.", "event_name")
        customer_key = meter["customer_mapping"]["event_payload_key"]
        customer = event.payload.get(customer_key)
        if not customer:
            raise EventRejected("meter_event_no_customer_defined",
                                f"The payload has no '{customer_key}': the meter maps customers by that key.",
                                f"payload[{customer_key}]", meter["id"])
        if self.store.find("customer", customer) is None:
            raise EventRejected("meter_event_customer_not_found", f"No such customer: '{customer}'",
                                f"payload[{customer_key}]", meter["id"])
        value_key = meter["value_settings"]["event_payload_key"]
        value = _event_value(event.payload.get(value_key), meter, f"payload[{value_key}]")
        if event.timestamp is not None and event.timestamp < now - TIMESTAMP_PAST_SECONDS:
            raise EventRejected("timestamp_too_far_in_past",
                                f"Timestamp {event.timestamp} is more than 35 days in the past.", "timestamp",
                                meter["id"])
        if event.timestamp is not None and event.timestamp > now + TIMESTAMP_FUTURE_SECONDS:
            raise EventRejected("timestamp_in_future",
                                f"Timestamp {event.timestamp} is more than 5 minutes in the future.", "timestamp",
                                meter["id"])
        return meter, customer, value

    # -------------------------------------------------------------------------- reading usage

    def aggregated(self, meter: Mapping[str, Any], customer: str, start: int, end: int) -> Decimal:
        """The meter's aggregation of `customer`'s events with start <= timestamp < end (lag or not: invoices)."""
        usage = self._usage.get((meter["id"], customer), [])
        return aggregate(meter["default_aggregation"]["formula"], usage, start, end)

    def meter_event_summaries(self, meter_id: str, params: Params) -> dict[str, Any]:
        """Stripe's summaries: only events received at least `summary_lag_seconds` ago count."""
        params.only(*LIST_PARAMS, "customer", "start_time", "end_time", "value_grouping_window")
        meter = self.store.get("meter", meter_id)
        customer = params.text("customer", required=True)
        start, end = params.integer("start_time", required=True), params.integer("end_time", required=True)
        grouping = params.text("value_grouping_window", choices=tuple(GROUPING_WINDOWS))
        check_summary_bounds(start, end, grouping)
        windows = grouping_windows(start, end, GROUPING_WINDOWS[grouping] if grouping else None)
        visible_until = self.store.now() - self.summary_lag_seconds
        visible = [usage for usage in self._usage.get((meter_id, customer), []) if usage.received_at <= visible_until]
        values = summarize(meter["default_aggregation"]["formula"], visible, windows)
        summaries = [
            {"id": f"mtrsum_{meter_id[4:]}_{window_start}", "object": "billing.meter_event_summary",
             "livemode": False, "meter": meter_id, "start_time": window_start, "end_time": window_end,
             "aggregated_value": json_number(value)}
            for (window_start, window_end), value in zip(windows, values, strict=True)
        ]
        return paginate(summaries, f"/v1/billing/meters/{meter_id}/event_summaries", params)

    # -------------------------------------------------------------------------- test switches (control API)

    def set_summary_lag(self, seconds: int) -> int:
        """How far summaries trail what was received: reconciliation must tolerate Stripe's delay."""
        if seconds < 0:
            raise InvalidParam("seconds must be 0 or more.", "seconds")
        self.summary_lag_seconds = seconds
        return seconds

    def forget_meter_event(self, identifier: str) -> dict[str, Any]:
        """Lose the newest live record of `identifier`, to prove a reconciliation notices what Stripe lacks.

        A forgotten event is as if Stripe never recorded it: summaries and invoices stop counting it and
        its identifier is free again (a resend is recorded, not refused as a duplicate). Its log entry stays,
        flagged ``"forgotten": true``, so the log remains an append-only history that ``offset`` pages through.
        """
        live = self._live_by_identifier.get(identifier)
        if not live:
            raise ApiError(404, f"No recorded meter event with identifier '{identifier}'.", code="resource_missing",
                           param="identifier")
        usage = live.pop()
        if not live:
            del self._live_by_identifier[identifier]
        self._usage[usage.slot].remove(usage)
        self._identifiers.pop(identifier)  # the 24 h window can only hold the newest record: this one
        entry = self.recorded[usage.log_index]
        entry["forgotten"] = True
        self.forgotten += 1
        return dict(entry)

    def meter_event_log(self, offset: int = 0) -> dict[str, Any]:
        """What the control API shows: recorded events (from `offset`), rejections and duplicate attempts.

        ``count`` counts every record ever made, forgotten ones included (each keeps its entry, flagged
        ``"forgotten": true``): it is the cursor for `offset`. ``forgotten`` says how many were lost since.
        """
        return {"count": len(self.recorded), "events": self.recorded[offset:], "forgotten": self.forgotten,
                "rejected": len(self.rejections), "duplicates": self.duplicates, "rejections": list(self.rejections)}


# ------------------------------------------------------------------------------ pure parts


def _v1_event(params: Params) -> MeterEventInput:
    params.only("event_name", "payload", "identifier", "timestamp")
    return MeterEventInput(
        event_name=params.text("event_name", required=True, max_length=100),
        payload=params.strings("payload", required=True),
        identifier=params.text("identifier", max_length=MAX_IDENTIFIER_LENGTH),
        timestamp=params.integer("timestamp"),
    )


def _stream_event(item: Params) -> MeterEventInput:
    """A v2 stream event's shape (wrong shapes refuse the whole batch, synchronously)."""
    item.only("event_name", "identifier", "payload", "timestamp")
    timestamp_text = item.text("timestamp")
    timestamp = None if timestamp_text is None else parse_rfc3339(timestamp_text)
    if timestamp_text is not None and timestamp is None:
        raise InvalidParam(f"Invalid timestamp: {timestamp_text!r} is not an RFC 3339 date-time.",
                           item.name("timestamp"))
    return MeterEventInput(
        event_name=item.text("event_name", required=True, max_length=100),
        payload=item.strings("payload", required=True),
        identifier=item.text("identifier", max_length=MAX_IDENTIFIER_LENGTH),
        timestamp=timestamp,
    )


def _event_value(raw: str | None, meter: Mapping[str, Any], param: str) -> Decimal:
    """The number an event adds; a ``count`` meter counts events that carry none."""
    if meter["default_aggregation"]["formula"] == "count" and raw is None:
        return Decimal(1)
    if raw is None:
        raise EventRejected("meter_event_value_not_found", f"The payload has no value at {param}.", param,
                            meter["id"])
    value = parse_decimal(raw)
    if value is None:
        raise EventRejected("meter_event_invalid_value", f"Invalid value: {raw!r} is not a number.", param,
                            meter["id"])
    return value


def aggregate(formula: str, usage: Iterable[RecordedUsage], start: int, end: int) -> Decimal:
    """A meter's aggregation of the events with start <= timestamp < end."""
    inside = [event for event in usage if start <= event.timestamp < end]
    if formula == "count":
        return Decimal(len(inside))
    if formula == "last":
        return max(inside, key=lambda event: event.timestamp).value if inside else Decimal(0)
    return sum((event.value for event in inside), Decimal(0))


def summarize(formula: str, usage: Iterable[RecordedUsage], windows: Sequence[tuple[int, int]]) -> list[Decimal]:
    """`aggregate` for each of the consecutive `windows`, sorting the events into them in one pass."""
    starts = [start for start, _ in windows]
    buckets: list[list[RecordedUsage]] = [[] for _ in windows]
    for event in usage:
        if windows and windows[0][0] <= event.timestamp < windows[-1][1]:
            buckets[bisect_right(starts, event.timestamp) - 1].append(event)
    return [aggregate(formula, bucket, start, end) for bucket, (start, end) in zip(buckets, windows, strict=True)]


def check_summary_bounds(start: int, end: int, grouping: str | None) -> None:
    """Stripe's rules: whole minutes always; whole hours for hourly windows and UTC midnights for daily ones."""
    for name, value in (("start_time", start), ("end_time", end)):
        if value % 60:
            raise InvalidParam(f"{name} must be aligned with minute boundaries.", name)
        if grouping == "hour" and value % HOUR:
            raise InvalidParam(f"{name} must be aligned with hour boundaries when value_grouping_window is hour.",
                               name)
        if grouping == "day" and value % DAY:
            raise InvalidParam(f"{name} must be aligned with day boundaries (00:00 UTC) when value_grouping_window "
                               "is day.", name)
    if start >= end:
        raise InvalidParam("start_time must be before end_time.", "start_time")


def grouping_windows(start: int, end: int, size: int | None) -> list[tuple[int, int]]:
    """[start, end) cut at UTC multiples of `size` seconds (one window when size is None)."""
    if size is None:
        return [(start, end)]
    windows, cursor = [], start
    while cursor < end:
        boundary = min((cursor // size + 1) * size, end)
        windows.append((cursor, boundary))
        cursor = boundary
    return windows


def error_reports(rejected: Sequence[tuple[MeterEventInput, EventRejected]], now: int) -> list[dict[str, Any]]:
    """The data objects of ``billing.meter.error_report_triggered``: one per meter, errors grouped by code."""
    by_meter: dict[str | None, dict[str, list[tuple[MeterEventInput, EventRejected]]]] = {}
    for event, error in rejected:
        by_meter.setdefault(error.meter_id, {}).setdefault(error.code, []).append((event, error))
    reports = []
    for meter_id, by_code in by_meter.items():
        error_count = sum(len(errors) for errors in by_code.values())
        reports.append({
            "object": "billing.meter.error_report", "meter": meter_id, "livemode": False,
            "developer_message_summary": f"{error_count} meter event(s) could not be processed.",
            "validation_start": now, "validation_end": now,
            "reason": {
                "error_count": error_count,
                "error_types": [
                    {"code": code, "error_count": len(errors),
                     "sample_errors": [{"error_message": error.message,
                                        "request": {"identifier": event.identifier}} for event, error in errors]}
                    for code, errors in by_code.items()
                ],
            },
        })
    return reports


def thin_error_report(report: dict[str, Any]) -> tuple[str, dict[str, Any] | None, dict[str, Any]]:
    """A report as Stripe's thin event has it: (type, related meter or None, the event's ``data``).

    The v2 ``data`` holds the report's fields with RFC 3339 validation times; events naming no meter
    have no meter to relate to, so Stripe reports them under their own type.
    """
    data = {"developer_message_summary": report["developer_message_summary"], "reason": report["reason"],
            "validation_start": rfc3339(report["validation_start"]),
            "validation_end": rfc3339(report["validation_end"])}
    meter_id = report["meter"]
    if meter_id is None:
        return "v1.billing.meter.no_meter_found", None, data
    related = {"id": meter_id, "type": "billing.meter", "url": f"/v1/billing/meters/{meter_id}"}
    return "v1.billing.meter.error_report_triggered", related, data
