"""Reading Stripe webhook events meterline acts on (pure: parsed dicts in, plain values out).

Signature checking is the stripe SDK's (`stripe.Webhook.construct_event`), in the API route.

Meter error reports: events sent through the v2 meter event stream are validated after Stripe
has accepted them, so the relay has already marked them delivered. Stripe reports the failures
later, as `billing.meter.error_report_triggered` (`v1.billing.meter.error_report_triggered` for
event destinations), with a count per error code and *samples* of the failed identifiers. The
samples become dead letters; the count goes into an alert, because unsampled failures can only
be found by reconciling the ledger against Stripe's meter summaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

METER_ERROR_REPORT_TYPES = ("billing.meter.error_report_triggered", "v1.billing.meter.error_report_triggered",
                            "v1.billing.meter.no_meter_found")
"""Stripe sends the reports as thin events (`v1.`; `no_meter_found` for events naming no meter), the same data."""


def is_meter_error_report(event_type: str) -> bool:
    """Whether an event type is one of the reports, named with or without the thin events' `v1.` prefix."""
    return event_type.removeprefix("v1.") in {kind.removeprefix("v1.") for kind in METER_ERROR_REPORT_TYPES}


@dataclass(frozen=True)
class RejectedSample:
    identifier: str
    code: str
    message: str

    def reason(self) -> str:
        return f"stripe rejected it after accepting it (v2 stream): {self.code}: {' '.join(self.message.split())}"[:500]


@dataclass(frozen=True)
class MeterErrorReport:
    event_id: str
    meter: str | None
    error_count: int
    samples: tuple[RejectedSample, ...]

    def alert_message(self) -> str:
        codes = sorted({sample.code for sample in self.samples})
        return (f"Stripe reports {self.error_count} invalid meter event(s) on meter {self.meter or '?'} "
                f"({', '.join(codes) or 'no sample'}); {len(self.samples)} sampled event(s) are now dead letters "
                "(`meterline outbox list --status dead`). Others may be affected: reconcile against Stripe.")


def meter_error_report(event: Mapping[str, Any]) -> MeterErrorReport | None:
    """The report in a webhook event, or None when the event is something else."""
    if not is_meter_error_report(str(event.get("type") or "")):
        return None
    data = event.get("data") or {}
    body = data.get("object") or data  # snapshot events wrap it in `object`; event destinations do not
    reason = body.get("reason") or {}
    samples = tuple(
        RejectedSample(str(sample["request"]["identifier"]), str(error_type.get("code") or "unknown"),
                       str(sample.get("error_message") or ""))
        for error_type in reason.get("error_types") or []
        for sample in error_type.get("sample_errors") or []
        if (sample.get("request") or {}).get("identifier")
    )
    related = event.get("related_object") or {}
    return MeterErrorReport(
        event_id=str(event.get("id") or ""), meter=body.get("meter") or related.get("id"),
        error_count=int(reason.get("error_count") or len(samples)), samples=samples,
    )
