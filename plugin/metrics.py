"""Prometheus metrics, served at GET /meterline/v1/metrics.

Queue depth and age are read from the outbox table at scrape time, so they are right whichever
process (proxy or `meterline relay` worker) did the delivering. Relay outcomes are counted by the
process that saw them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from plugin.outbox import store as outbox_store
from plugin.outbox.retry import Step

REGISTRY = CollectorRegistry(auto_describe=True)
"""meterline's own registry: LiteLLM may register its metrics in the default one."""

RELAY_EVENTS = Counter(
    "meterline_relay_events", "Meter events the relay handled, by sink and resulting status.",
    ["sink", "status"], registry=REGISTRY,
)


REFUSALS = Counter(
    "meterline_refusals", "Requests meterline refused before the provider call, by reason (error.type).",
    ["reason"], registry=REGISTRY,
)
BREAKER_TRIPS = Counter(
    "meterline_breaker_trips", "Circuit breakers this process opened on a spend spike.", registry=REGISTRY,
)
RESPONSE_PATH_SECONDS = Histogram(
    "meterline_response_path_seconds",
    "Wall time a request spends in meterline on its way in (auth: the key lookup that replaces "
    "LiteLLM's; admission: breaker, rate limit, ceiling) and out (billing: the ledger row and, for a "
    "capped customer, its settlement, before the answer is sent).",
    ["step"], registry=REGISTRY,
    buckets=(0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05,
             0.1, 0.5, 2.5),
)
AUTH_SECONDS, ADMISSION_SECONDS, BILLING_SECONDS = (RESPONSE_PATH_SECONDS.labels(step)
                                                    for step in ("auth", "admission", "billing"))

SOFT_LIMIT_NOTICES = Counter(
    "meterline_soft_limit_notices", "Soft-limit thresholds crossed (each fires once per customer and period).",
    registry=REGISTRY,
)


def count_outcomes(sink: str, steps: Sequence[Step]) -> None:
    for step in steps:
        RELAY_EVENTS.labels(sink, step.status.value).inc()


class OutboxCollector(Collector):
    """Outbox depth per status and the age of the oldest waiting event, queried per scrape."""

    def __init__(self, engine: Callable[[], Engine], clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self._engine = engine
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = outbox_store.stats(self._engine())
        depth = GaugeMetricFamily("meterline_outbox_depth", "Undelivered meter events by status.", labels=["status"])
        for status, count in sorted(stats.depth.items()):
            depth.add_metric([status], count)
        yield depth
        yield GaugeMetricFamily(
            "meterline_outbox_oldest_age_seconds", "Age of the oldest meter event not yet delivered (0 if none).",
            value=stats.oldest_age_seconds(self._clock()),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected lazily: no database query at registration


_collector: OutboxCollector | None = None


def render(engine: Callable[[], Engine]) -> bytes:
    """The exposition text; the outbox collector is registered on first use."""
    global _collector
    if _collector is None:
        _collector = OutboxCollector(engine)
        REGISTRY.register(_collector)
    return generate_latest(REGISTRY)
