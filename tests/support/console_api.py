"""Fixed answers of meterline's operator API, for the console's snapshot tests: a small fleet in which
every state a row can take appears once (breaker open, over quota, hard limit hit, open alerts,
idle), alerts of each kind, a queue with a dead letter, a reconciliation with a diverged, an ok and
a not linked customer, and invoices: a held draft and two finalized ones, one differing from the
ledger. Served through httpx's MockTransport, so the console runs unchanged; `tests/test_tui.py` (and
tests/test_tui_stripe.py for the reconciliation) checks that these answers have the fields the real
API's answers have, so the pictures cannot drift from what a proxy sends."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tui.client import PREFIX

NOW = datetime(2026, 12, 3, 14, 30, tzinfo=UTC)
PERIOD_START = datetime(2026, 12, 1, tzinfo=UTC)
PERIOD_END = datetime(2027, 1, 1, tzinfo=UTC)
CREDIT = 1_000_000
INCLUDED = {"free": 100 * CREDIT, "pro": 1_000 * CREDIT, "team": 10_000 * CREDIT}
GRANDFATHERED = {"juno-games": datetime(2026, 11, 15, tzinfo=UTC)}
"""Kept on its flat plan for good (`meterline migrate grandfather`): never billed overage."""

# (id, plan, used this period, this hour, typical hour, breaker, hard limit, alerts) in credits
_CUSTOMERS = (
    ("acme-corp", "team", 8_412, 61, 12, "closed", None, 1),
    ("beta-labs", "pro", 1_240, 4, 5, "closed", None, 2),
    ("cobalt-ai", "pro", 990, 0, 3, "open", None, 1),
    ("delta-search", "free", 100, 0, 1, "closed", 100, 1),
    ("echo-support", "team", 3_020, 18, 17, "closed", None, 0),
    ("fjord-health", "pro", 412, 2, 2, "half_open", None, 0),
    ("gamma-docs", "free", 37, 1, 1, "closed", None, 0),
    ("helix-legal", "pro", 760, 9, 4, "closed", 900, 0),
    ("iris-retail", "team", 0, 0, 0, "closed", None, 0),
    ("juno-games", "pro", 151, 0, 1, "closed", None, 0),
    ("kite-travel", "free", 12, 0, 0, "closed", None, 0),
    ("lumen-bank", "team", 12_950, 140, 20, "closed", None, 0),
    ("mesa-energy", "pro", 505, 3, 3, "closed", None, 0),
    ("nova-tutor", "free", 64, 2, 1, "closed", None, 0),
    ("orbit-maps", "pro", 233, 1, 2, "closed", None, 0),
    ("pico-notes", "free", 3, 0, 0, "closed", None, 0),
    ("quartz-hr", "pro", 1_050, 7, 6, "closed", None, 0),
    ("rhea-media", "team", 4_480, 22, 25, "closed", None, 0),
    ("sol-insure", "pro", 88, 0, 1, "closed", None, 0),
    ("tide-logs", "pro", 640, 5, 4, "closed", None, 0),
)


def _hourly(seed: int, hour_ucr: int, typical_ucr: int) -> list[int]:
    """24 hourly totals ending with this hour: a day's curve around the typical hour."""
    shape = (1, 1, 0, 0, 0, 1, 2, 3, 5, 7, 8, 8, 9, 8, 7, 7, 8, 9, 8, 6, 4, 3, 2, 1)
    return [typical_ucr * shape[(i + seed) % 24] // 6 for i in range(23)] + [hour_ucr]


def fleet_row(index: int, *, grown_ucr: int = 0) -> dict[str, Any]:
    """The `GET /customers` row of the index-th customer; `grown_ucr` added to its hour, day and period."""
    customer_id, plan, used, hour, typical, breaker, hard, alerts = _CUSTOMERS[index]
    used_ucr, hour_ucr, typical_ucr = used * CREDIT + grown_ucr, hour * CREDIT + grown_ucr, typical * CREDIT
    included = INCLUDED[plan]
    elapsed = (NOW - PERIOD_START) / (PERIOD_END - PERIOD_START)
    return {
        "customer_id": customer_id, "plan": plan,
        "grandfathered_at": GRANDFATHERED[customer_id].isoformat() if customer_id in GRANDFATHERED else None,
        "used_ucr": used_ucr, "included_ucr": included,
        "included_pct": round(100 * used_ucr / included, 1), "hour_ucr": hour_ucr,
        "today_ucr": used_ucr // 3 if used_ucr else 0, "typical_hour_ucr": typical_ucr,
        "burn_ratio": round(hour_ucr / typical_ucr, 2) if typical_ucr else None,
        "breaker": breaker, "hard_limit_ucr": None if hard is None else hard * CREDIT,
        "cap_ucr": 100 * CREDIT if plan == "free" else None, "block_overage": customer_id == "helix-legal",
        "alerts_open": alerts, "hourly_ucr": _hourly(index, hour_ucr, typical_ucr),
        "projected_ucr": int(used_ucr / elapsed),
    }


def fleet(*, refreshed: bool = False) -> dict[str, Any]:
    """The whole fleet; `refreshed`: a later answer in which three customers spent more."""
    grown = {0: 3 * CREDIT, 4: CREDIT // 2, 11: 9 * CREDIT} if refreshed else {}
    return {"generated_at": (NOW + timedelta(seconds=5 if refreshed else 0)).isoformat(),
            "customers": [fleet_row(i, grown_ucr=grown.get(i, 0)) for i in range(len(_CUSTOMERS))],
            "next_cursor": None}


def _event_id(n: int) -> str:
    """An id shaped like the ledger's (mtr_ and 32 hex digits), the same every run."""
    return "mtr_" + hashlib.md5(str(n).encode()).hexdigest()


def _index(customer_id: str) -> int:
    return next(i for i, row in enumerate(_CUSTOMERS) if row[0] == customer_id)


def detail(customer_id: str) -> dict[str, Any]:
    row = fleet_row(_index(customer_id))
    members = [("ana@acme", 0.52, 812), ("support-bot", 0.31, 2_944), ("ben@acme", 0.17, 120)]
    actions = [("summarise", "gpt-4o"), ("classify", "gpt-4o-mini"), ("draft-reply", "claude-sonnet")]
    return row | {
        "members": [{"member": name, "used_ucr": int(row["used_ucr"] * share), "requests": calls}
                    for name, share, calls in members],
        "recent": [{"id": _event_id(i), "customer_id": customer_id, "member": members[i % 3][0],
                    "action": actions[i % 3][0], "model": actions[i % 3][1], "provider": "openai",
                    "prompt_tokens": 1_200 + 37 * i, "completion_tokens": 300 + 11 * i, "cached_tokens": 0,
                    "credits_ucr": 2 * CREDIT + 137_000 * i, "provider_cost_uusd": 1_500 + 90 * i,
                    "cache_hit": False, "saved_ucr": 0, "stream": i % 2 == 0,
                    "created_at": (NOW - timedelta(minutes=3 * i + 1)).isoformat()} for i in range(6)],
        "breaker_history": [
            {"at": (NOW - timedelta(hours=2)).isoformat(), "before": "closed", "after": "open",
             "by": "api:console:ops", "why": "runaway agent loop"},
            {"at": (NOW - timedelta(days=1, hours=3)).isoformat(), "before": "open", "after": "closed",
             "by": "api:console:ops", "why": "reset from the console"},
        ],
    }


def usage(customer_id: str) -> dict[str, Any]:
    row = fleet_row(_index(customer_id))
    days = [(PERIOD_START + timedelta(days=d)).date().isoformat() for d in range((NOW - PERIOD_START).days + 1)]
    daily = [row["used_ucr"] * share // 10 for share in (3, 4, 3)][:len(days)]
    return {
        "customer_id": customer_id, "plan": row["plan"], "grandfathered_at": row["grandfathered_at"],
        "period_start": PERIOD_START.isoformat(),
        "period_end": PERIOD_END.isoformat(), "used_ucr": row["used_ucr"], "reserved_ucr": 0,
        "included_ucr": row["included_ucr"], "included_pct": row["included_pct"], "overage_ucr": 0,
        "hard_limit_ucr": row["hard_limit_ucr"], "cap_ucr": row["cap_ucr"], "remaining_ucr": None,
        "projected_ucr": row["projected_ucr"], "projected_usd": "0.00", "projected_overage_usd": "0.00",
        "overage_rates": [],
        "currency": "usd", "requests": 3_876, "saved_ucr": 0,
        "by_model": {"gpt-4o": row["used_ucr"]}, "by_action": {"summarise": row["used_ucr"]},
        "by_member": {"ana@acme": row["used_ucr"]},
        "top_actions": [{"action": "summarise", "used_ucr": row["used_ucr"] * 6 // 10, "share_pct": 60.0},
                        {"action": "classify", "used_ucr": row["used_ucr"] * 3 // 10, "share_pct": 30.0},
                        {"action": "draft-reply", "used_ucr": row["used_ucr"] // 10, "share_pct": 10.0}],
        "daily": [{"date": day, "used_ucr": used, "requests": used // (2 * CREDIT)} for day, used in zip(days, daily)],
        "breaker": row["breaker"], "limits": limits(customer_id), "stripe": None,
    }


def limits(customer_id: str) -> dict[str, Any]:
    row = fleet_row(_index(customer_id))
    return {"customer_id": customer_id, "soft_thresholds_pct": [50, 80] if customer_id == "acme-corp" else None,
            "effective_soft_thresholds_pct": [50, 80] if customer_id == "acme-corp" else [80],
            "hard_limit_ucr": row["hard_limit_ucr"], "hard_limit_usd": None, "block_overage": row["block_overage"],
            "notify_email": None, "notify_webhook_url": None, "cap_ucr": row["cap_ucr"], "cap_reason": None}


ALERTS = [
    (9, "circuit_open", "cobalt-ai", "circuit breaker opened for cobalt-ai: 31 credits in 5 min, 9.8× typical", 4),
    (8, "soft_limit", "acme-corp", "acme-corp has used 80% of its 10,000 included credits", 12),
    (7, "soft_limit", "beta-labs", "beta-labs has used 100% of its 1,000 included credits", 40),
    (6, "unbilled_tokens", "beta-labs", "provider reported no usage for a streamed answer; billed by estimate", 65),
    (5, "outbox_stale", None, "3 meter events have waited more than 15 min for Stripe", 90),
    (4, "soft_limit", "delta-search", "delta-search has used 100% of its 100 included credits", 180),
    (3, "meter_error_report", None, "Stripe refused meter event mtr_0a1b: customer not found", 300),
]


def alerts() -> dict[str, Any]:
    return {"alerts": [{"id": id_, "kind": kind, "customer_id": customer, "subject_id": None, "message": message,
                        "created_at": (NOW - timedelta(minutes=minutes)).isoformat(),
                        "acknowledged": id_ in (3, 4), "acknowledged_at": None if id_ not in (3, 4) else
                        (NOW - timedelta(minutes=1)).isoformat()} for id_, kind, customer, message, minutes in ALERTS]}


def outbox() -> dict[str, Any]:
    def event(i: int, customer: str, status: str, attempts: int, error: str | None) -> dict[str, Any]:
        at = NOW - timedelta(minutes=20 - i)
        return {"id": _event_id(100 + i), "customer_id": customer, "value_ucr": (i + 1) * 1_250_000,
                "status": status, "attempts": attempts, "occurred_at": at.isoformat(),
                "next_attempt_at": None if status == "dead" else (at + timedelta(minutes=attempts)).isoformat(),
                "uncertain": status == "unknown", "last_error": error}

    events = [event(0, "beta-labs", "dead", 8, "Stripe: No such customer: 'cus_missing' (resource_missing)"),
              event(1, "acme-corp", "unknown", 3, "timed out after 10 s; Stripe may have counted it"),
              event(2, "lumen-bank", "held", 0, "customer has no Stripe id yet"),
              event(3, "acme-corp", "pending", 1, "HTTP 503 from Stripe"),
              event(4, "echo-support", "pending", 0, None)]
    depth = {"pending": 2, "sending": 0, "held": 1, "dead": 1, "unknown": 1}
    return {"depth": depth, "oldest_waiting_at": events[0]["occurred_at"], "oldest_age_seconds": 1_200.0,
            "events": events}


def _hour(hours_ago: int) -> str:
    return (NOW.replace(minute=0) - timedelta(hours=hours_ago)).isoformat()


def reconciliation() -> dict[str, Any]:
    """The last run: acme-corp diverged (Stripe lost events in four hours), two customers ok (one with
    events in flight), gamma-docs not linked to Stripe."""
    def customer(customer_id: str, stripe_id: str | None, ledger: int, in_flight: int, stripe: int,
                 hours: list[tuple[int, int, int]]) -> dict[str, Any]:
        divergence = ledger - in_flight - stripe if stripe_id else 0
        pct = round(abs(divergence) / max(ledger, 1) * 100, 2)
        status = "not_linked" if stripe_id is None else "diverged" if pct > 1 else "ok"
        return {"customer_id": customer_id, "stripe_customer_id": stripe_id, "ledger_ucr": ledger,
                "in_flight_ucr": in_flight, "stripe_ucr": stripe, "divergence_ucr": divergence,
                "divergence_pct": pct, "status": status,
                "hours": [{"start": _hour(ago), "ledger_ucr": at_ledger, "stripe_ucr": at_stripe}
                          for ago, at_ledger, at_stripe in hours]}

    lost = [(26, 62_250_000, 0), (9, 41_100_000, 36_000_000), (5, 10_000_000, 0), (2, 125_000_000, 110_000_000)]
    short = sum(at_ledger - at_stripe for _, at_ledger, at_stripe in lost)  # 92.35 credits: 1.1% of acme's
    return {
        "period_start": PERIOD_START.isoformat(), "period_end": (NOW - timedelta(minutes=2)).isoformat(),
        "checked_at": NOW.isoformat(), "threshold_pct": 1.0,
        "customers": [
            customer("acme-corp", "cus_R4nd0mAcme01", 8_412 * CREDIT, 0, 8_412 * CREDIT - short, lost),
            customer("beta-labs", "cus_R4nd0mBeta02", 1_240 * CREDIT, 1_250_000, 1_240 * CREDIT - 1_250_000, []),
            customer("gamma-docs", None, 37 * CREDIT, 37 * CREDIT, 0, []),
            customer("lumen-bank", "cus_R4nd0mLume03", 12_950 * CREDIT, 0, 12_950 * CREDIT, []),
        ],
    }


def invoices() -> dict[str, Any]:
    """acme-corp's November draft, held by the spike guard, and two finalized invoices: beta-labs' November
    one as the ledger says, acme-corp's October one $1.50 short of it."""
    october, november = datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)

    def invoice(id_: str, customer: str, stripe_id: str, status: str, total: int, ledger: int | None,
                start: datetime, end: datetime, held: bool = False) -> dict[str, Any]:
        return {"id": id_, "customer_id": customer, "stripe_customer_id": stripe_id, "status": status,
                "total_cents": total, "currency": "usd", "period_start": start.isoformat(),
                "period_end": end.isoformat(), "held": held, "ledger_cents": ledger,
                "finalized_at": None if status == "draft" else (end + timedelta(hours=1)).isoformat()}

    return {"invoices": [
        invoice("in_1QhZ9aAcmeNov0077", "acme-corp", "cus_R4nd0mAcme01", "draft", 5_000, 5_000, november,
                PERIOD_START, held=True),
        invoice("in_1Pk2mBetaNov00001", "beta-labs", "cus_R4nd0mBeta02", "paid", 2_000, 2_000, november, PERIOD_START),
        invoice("in_1Od7qAcmeOct00002", "acme-corp", "cus_R4nd0mAcme01", "paid", 1_850, 2_000, october, november),
    ]}


class FixedApi:
    """A stand-in proxy answering the console's GETs with the fixed data; `refreshed()` makes later
    fleet answers grow, so the ↑ markers show. Anything else is a 404, so a test notices."""

    def __init__(self) -> None:
        self.fleet = fleet()

    def refreshed(self) -> None:
        self.fleet = fleet(refreshed=True)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.answer)

    def answer(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix(PREFIX)
        parts = path.strip("/").split("/")
        if path == "/customers":
            body = self.fleet
        elif parts[0] == "customers" and len(parts) == 2:
            body = detail(parts[1])
        elif parts[0] == "customers" and parts[2:] == ["usage"]:
            body = usage(parts[1])
        elif path == "/limits":
            body = limits(request.headers["X-Meterline-Customer"])
        elif path == "/alerts":
            body = alerts()
        elif path == "/outbox":
            body = outbox()
        elif path == "/reconciliation":
            body = reconciliation()
        elif path == "/invoices":
            body = invoices()
        elif path == "/overage-block":
            body = {"enabled": False}
        else:
            return httpx.Response(404, json={"error": {"message": f"no {path} here"}})
        return httpx.Response(200, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
