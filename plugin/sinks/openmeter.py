"""The OpenMeter sink: meter events as CloudEvents, POSTed to OpenMeter's ingest API.

OpenMeter dedupes on (id, source); the ledger id is the CloudEvent id, so a resend is a no-op.
Everything that decides is pure and takes plain values (`cloud_event`, `classify`,
`transport_outcome`); `OpenMeterSink` only encodes, POSTs and maps.

HTTP answer -> outcome:
    2xx                   DELIVERED (OpenMeter answers 204 to duplicates too: no DUPLICATE here)
    429                   RETRY, certain, retry_after from Retry-After when present
    5xx, 408              RETRY, uncertain (the events may have been recorded)
    400 (413) on a batch  the whole batch was refused: each event is resent alone and judged alone
    400 on one event      REJECTED with the problem's detail
    401, 403, other 4xx   REJECTED
    no answer             RETRY: certain if never connected, uncertain once the request may have left
"""

from __future__ import annotations

import http
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from plugin.sinks.base import (
    DELIVERED,
    MeterEvent,
    Outcome,
    OutcomeKind,
    one_line,
    retry_after_seconds,
)

SINGLE_TYPE = "application/cloudevents+json"
BATCH_TYPE = "application/cloudevents-batch+json"
BATCH_REFUSED = frozenset({400, 413})
"""Statuses that refuse a whole batch for what may be one event's fault: worth splitting."""
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Transport failures that happen before a single byte of the request left: a resend cannot double-count."""


# --------------------------------------------------------------------------- pure: events


def rfc3339_utc(moment: datetime) -> str:
    """`moment` as RFC 3339 in UTC with a `Z`. Naive values are UTC already (SQLite drops the zone)."""
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return utc.isoformat(timespec="microseconds").replace("+00:00", "Z")


def cloud_event(event: MeterEvent, source: str, event_type: str) -> dict[str, Any]:
    """The CloudEvent for one meter event. Credits travel as a digit string: JSON numbers may become floats.

    Raises ValueError for an event no billing system should see (no id, no customer, credits not a
    positive whole number): OpenMeter would accept some of these and bill them.
    """
    if not event.identifier:
        raise ValueError("the event has no identifier")
    if not event.customer_id:
        raise ValueError(f"event {event.identifier} has no customer_id")
    if type(event.value_ucr) is not int or event.value_ucr <= 0:
        raise ValueError(f"event {event.identifier}: value_ucr must be a positive int, got {event.value_ucr!r}")
    return {
        "specversion": "1.0",
        "id": event.identifier,
        "source": source,
        "type": event_type,
        "subject": event.customer_id,
        "time": rfc3339_utc(event.occurred_at),
        "data": {"credits_ucr": str(event.value_ucr)},
    }


def encode(cloud_events: Sequence[dict[str, Any]]) -> tuple[bytes, str]:
    """Request body and content type: one event as a plain CloudEvent, several as a batch array."""
    payload: Any = cloud_events[0] if len(cloud_events) == 1 else list(cloud_events)
    content_type = SINGLE_TYPE if len(cloud_events) == 1 else BATCH_TYPE
    return json.dumps(payload, separators=(",", ":")).encode(), content_type


# --------------------------------------------------------------------------- pure: answers


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by case-insensitive name, from httpx headers or a plain dict."""
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


def problem_text(status: int, body: bytes | str) -> str:
    """`HTTP 400 Bad Request: <detail>` from an RFC 7807 body, or the first words of any other body."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        problem = json.loads(text)
    except ValueError:
        problem = None
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    if isinstance(problem, dict):
        title = str(problem.get("title") or phrase)
        detail = problem.get("detail")
        summary = f"HTTP {status} {title}" + (f": {detail}" if detail else "")
    else:
        summary = f"HTTP {status} {phrase}" + (f": {text}" if text.strip() else "")
    return one_line(summary)


def classify(
    status: int, headers: Mapping[str, str], body: bytes | str, *, now: datetime | None = None,
) -> Outcome:
    """What one answer from OpenMeter means for every event it carried (see the module docstring).

    A batch-level 400 is REJECTED here too; splitting the batch is the sink's job, not this function's.
    `now` only serves Retry-After given as an HTTP date.
    """
    if 200 <= status < 300:
        return DELIVERED
    problem = problem_text(status, body)
    retry_after = retry_after_seconds(header(headers, "retry-after"), now)
    if status == 429:
        return Outcome(OutcomeKind.RETRY, one_line(f"OpenMeter rate limit: {problem}"), retry_after=retry_after)
    if status >= 500 or status == 408:
        reason = one_line(f"OpenMeter failed: {problem}")
        return Outcome(OutcomeKind.RETRY, reason, uncertain=True, retry_after=retry_after)
    if status in (401, 403):
        return Outcome(OutcomeKind.REJECTED, one_line(f"OpenMeter refused the credentials: {problem}"))
    if status in BATCH_REFUSED:
        return Outcome(OutcomeKind.REJECTED, one_line(f"OpenMeter refused the event: {problem}"))
    return Outcome(OutcomeKind.REJECTED, one_line(f"unexpected answer from OpenMeter (is base_url right?): {problem}"))


def transport_outcome(error: httpx.RequestError) -> Outcome:
    """No answer: certain when the request never left (refused, connect timeout), uncertain otherwise."""
    detail = f"{type(error).__name__}: {error}".rstrip(": ")
    if isinstance(error, NOT_SENT):
        return Outcome(OutcomeKind.RETRY, one_line(f"OpenMeter unreachable: {detail}"))
    return Outcome(OutcomeKind.RETRY, one_line(f"no answer from OpenMeter after sending: {detail}"), uncertain=True)


def without_secret(outcome: Outcome, secret: str | None) -> Outcome:
    """The outcome with `secret` masked in its reason. A last guard: the sink masks answers before
    `classify` too, since a reason cut to length could end in half a token."""
    if not secret or secret not in outcome.reason:
        return outcome
    return replace(outcome, reason=outcome.reason.replace(secret, "[token]"))


# --------------------------------------------------------------------------- I/O


class OpenMeterSink:
    """Delivers meter events to OpenMeter, one HTTP call per `send` (more only to isolate a refused event)."""

    name = "openmeter"
    serial_per_customer = False

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        source: str = "meterline",
        event_type: str = "meterline.credits",
        timeout: float = 10.0,
        max_batch: int = 100,
        dedupe_window: timedelta | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        """`token` is optional (self-hosted OpenMeter may run without auth). `source` is half of OpenMeter's
        dedupe key: changing it makes every old identifier new again.

        `dedupe_window` is how long your OpenMeter remembers (id, source). None means forever, which is
        what the relay assumes by default; OpenMeter's deduplication is time-limited in some versions and
        deployments (a store with an expiry), so pass that period when it is: past it, an uncertain resend
        could bill twice. `client` is borrowed, not closed by `aclose`.
        """
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"OpenMeter base_url must be an http(s) URL, got {base_url!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if not source or not event_type:
            raise ValueError("source and event_type must not be empty")
        self.events_url = base_url.rstrip("/") + "/api/v1/events"
        self._token = token
        self.source = source
        self.event_type = event_type
        self.timeout = timeout
        self.max_batch = max_batch
        self.dedupe_window = dedupe_window
        self._client = client if client is not None else httpx.AsyncClient()
        self._owns_client = client is None

    async def send(self, events: Sequence[MeterEvent]) -> Sequence[Outcome]:
        """One outcome per event, in order. Events that cannot be expressed are REJECTED without a call."""
        if len(events) > self.max_batch:
            raise ValueError(f"{len(events)} events exceed max_batch={self.max_batch}")
        outcomes: list[Outcome | None] = [None] * len(events)
        ready: list[tuple[int, dict[str, Any]]] = []
        for index, event in enumerate(events):
            try:
                ready.append((index, cloud_event(event, self.source, self.event_type)))
            except ValueError as error:
                outcomes[index] = Outcome(OutcomeKind.REJECTED, one_line(f"not sent: {error}"))
        if ready:
            delivered = await self._deliver([payload for _, payload in ready])
            for (index, _), outcome in zip(ready, delivered, strict=True):
                outcomes[index] = outcome
        return [without_secret(outcome, self._token) for outcome in outcomes if outcome is not None]

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _deliver(self, cloud_events: list[dict[str, Any]]) -> list[Outcome]:
        outcome, status = await self._post(cloud_events)
        if status in BATCH_REFUSED and len(cloud_events) > 1:
            return await self._deliver_one_by_one(cloud_events)
        return [outcome] * len(cloud_events)

    async def _deliver_one_by_one(self, cloud_events: list[dict[str, Any]]) -> list[Outcome]:
        """After a refused batch: each event alone, so one bad event does not dead-letter the good ones.

        Stops at the first RETRY (server down, slow or rate-limiting): the rest were refused with the
        batch, never recorded, so they are a certain RETRY without costing one timeout each.
        """
        outcomes: list[Outcome] = []
        for cloud in cloud_events:
            outcome, _ = await self._post([cloud])
            outcomes.append(outcome)
            if outcome.kind is OutcomeKind.RETRY:
                skipped = Outcome(
                    OutcomeKind.RETRY, one_line(f"not sent after the batch was refused: {outcome.reason}"),
                    retry_after=outcome.retry_after,
                )
                return outcomes + [skipped] * (len(cloud_events) - len(outcomes))
        return outcomes

    async def _post(self, cloud_events: list[dict[str, Any]]) -> tuple[Outcome, int | None]:
        """One POST; its outcome and HTTP status (None when no answer came)."""
        body, content_type = encode(cloud_events)
        headers = {"Content-Type": content_type}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            response = await self._client.post(self.events_url, content=body, headers=headers, timeout=self.timeout)
        except httpx.RequestError as error:
            return transport_outcome(error), None
        answer = response.content
        if self._token:  # a server may quote the token it refused
            answer = answer.replace(self._token.encode(), b"[token]")
        outcome = classify(response.status_code, response.headers, answer, now=datetime.now(UTC))
        return outcome, response.status_code
