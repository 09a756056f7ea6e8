"""Where reconciliation runs are kept: the last one answers `GET /reconciliation`, fills the usage
API's `stripe` field and the console's screen 4."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from plugin.ledger.models import ReconciliationRun
from plugin.ledger.store import has_alert, insert_alert

_RUNS = ReconciliationRun.__table__
EVERYONE = "all"


def save(engine: Engine, report: dict[str, Any], checked_at: datetime, scope: str = EVERYONE) -> None:
    with engine.begin() as connection:
        connection.execute(_RUNS.insert(), {"checked_at": checked_at, "scope": scope, "report": json.dumps(report)})


def last(engine: Engine, scope: str | None = None) -> dict[str, Any] | None:
    """The newest run (of `scope` when given: a whole-fleet run is `all`), or None before the first."""
    query = select(_RUNS.c.report).order_by(_RUNS.c.id.desc()).limit(1)
    if scope is not None:
        query = query.where(_RUNS.c.scope == scope)
    with engine.connect() as connection:
        found = connection.execute(query).first()
    return None if found is None else json.loads(found[0])


def alert_once(engine: Engine, kind: str, subject_id: str, message: str, customer_id: str | None) -> bool:
    """An alert unless one of this kind was already raised for `subject_id`; True when raised now."""
    with engine.begin() as connection:
        if has_alert(connection, kind, subject_id):
            return False
        insert_alert(connection, kind, message, customer_id=customer_id, subject_id=subject_id)
        return True


def stripe_field(engine: Engine, customer_id: str, period_start: datetime, period_end: datetime
                 ) -> dict[str, Any] | None:
    """The usage API's `stripe` field: the customer in the last whole-fleet run, if that run was made
    during this period; None before one."""
    report = last(engine, EVERYONE)
    if report is None or not period_start <= datetime.fromisoformat(report["checked_at"]) < period_end:
        return None
    entry = next((item for item in report["customers"] if item["customer_id"] == customer_id), None)
    if entry is None:
        return None
    keep = ("stripe_ucr", "in_flight_ucr", "divergence_ucr", "divergence_pct", "status")
    return {"checked_at": report["checked_at"], **{name: entry[name] for name in keep}}
