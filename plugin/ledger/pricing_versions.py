"""The pricing changelog's table (`pricing_versions`) and the ledger reads a reprice needs.

Versions are numbered 1, 2, 3 ... by whoever records one: the next number is the newest plus one, and
the primary key refuses a second writer of the same number (`add` answers False; the caller re-reads
and decides again), so proxies starting together never record a version twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, and_, not_, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from plugin.ledger.models import LedgerEntry, PricingVersion

_LEDGER = LedgerEntry.__table__
ADJUSTMENT_PROVIDER, ADJUSTMENT_ACTION = "meterline", "reprice"
"""What marks a reprice's adjustment rows (plugin/services/pricing.py writes them)."""


def newest(engine: Engine) -> PricingVersion | None:
    with Session(engine) as session:
        return session.exec(select(PricingVersion).order_by(PricingVersion.version.desc()).limit(1)).scalars().first()


def get(engine: Engine, version: int) -> PricingVersion | None:
    with Session(engine) as session:
        return session.get(PricingVersion, version)


def every_version(engine: Engine) -> list[PricingVersion]:
    """The whole changelog, newest first (it grows by a few entries a year)."""
    with Session(engine) as session:
        return list(session.exec(select(PricingVersion).order_by(PricingVersion.version.desc())).scalars())


def add(engine: Engine, entry: PricingVersion) -> bool:
    """Record a version; False when that number is already taken (another process recorded it first)."""
    with Session(engine, expire_on_commit=False) as session:  # the caller reads the entry after
        session.add(entry)
        try:
            session.commit()
        except IntegrityError:
            return False
    return True


@dataclass(frozen=True)
class PricedRow:
    """What a reprice reads of one ledger row: enough to price it again."""

    customer_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    credits_ucr: int


def rows_priced_with(engine: Engine, version: int, start: datetime, end: datetime,
                     batch: int = 5000) -> Iterator[PricedRow]:
    """The ledger rows of [start, end) priced with `version`, streamed; left out: cache hits (they cost the
    cache-hit fee, not the price) and earlier reprices' adjustment rows (no tokens, only a difference)."""
    columns = [_LEDGER.c[name] for name in PricedRow.__dataclass_fields__]
    adjustment = and_(_LEDGER.c.provider == ADJUSTMENT_PROVIDER, _LEDGER.c.action == ADJUSTMENT_ACTION)
    query = select(*columns).where(_LEDGER.c.price_version == version, _LEDGER.c.created_at >= start,
                                   _LEDGER.c.created_at < end, _LEDGER.c.cache_hit.is_(False), not_(adjustment))
    with engine.connect() as connection:
        for row in connection.execution_options(yield_per=batch).execute(query):
            yield PricedRow(*row)


def credits_of(engine: Engine, ledger_ids: Iterable[str]) -> dict[str, int]:
    """The credits of the ledger rows with these ids that exist (id -> µcr)."""
    ids = list(ledger_ids)
    found: dict[str, int] = {}
    with engine.connect() as connection:
        for start in range(0, len(ids), 500):
            query = select(_LEDGER.c.id, _LEDGER.c.credits_ucr).where(_LEDGER.c.id.in_(ids[start:start + 500]))
            found.update({row[0]: int(row[1]) for row in connection.execute(query)})
    return found
