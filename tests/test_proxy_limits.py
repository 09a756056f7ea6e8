"""Plans and limits through the real proxy: reservations keep concurrent requests under a cap."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import pytest

from plugin.counters.base import Account, Snapshot
from plugin.counters.sql import SqlCounterStore
from plugin.ledger import store
from plugin.plans import calendar_month

pytestmark = pytest.mark.proxy

M = 1_000_000
CAP_UCR = 100 * M  # tests/support/proxy.py: plans.free.cap_credits = 100


async def test_500_concurrent_requests_never_bill_past_a_free_cap(metered):
    """Each request may cost about 4 credits (1,000 output tokens at weight 4); the free plan has
    100. 500 of them at once: the ledger stays under 100 credits, the cap is used up (the last
    requests are clamped, not refused), and every refusal is the same clear 402."""
    tenant = metered.tenant("capped-free", plan="free")
    headers = {"Authorization": f"Bearer {tenant.key}"}
    body = {"model": "test-model", "messages": [{"role": "user", "content": "[[c=1000]] hello"}], "max_tokens": 1000}
    period_end = calendar_month(datetime.now(UTC)).end
    expected_refusal = {"error": {
        "message": "You've used the 100 credits of your free plan for this period. Upgrade your plan to continue, "
                   f"or wait until {period_end:%Y-%m-%d %H:%M} UTC.",
        "type": "free_cap_reached", "param": None, "code": "402",
    }}
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=metered.proxy.base_url, timeout=120, limits=limits) as client:
        # Warm the proxy first: a cold one under 100 new connections at once resets a few of them
        # (seen with the plugin on, with or without limits; see the issue note), which is not what is tested here.
        warm = metered.tenant("capped-warmup", plan="pro")
        for _ in range(10):
            (await client.post("/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {warm.key}"})).raise_for_status()
        answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=body, headers=headers)
                                         for _ in range(500)))
    ok = [answer for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code != 200]
    billed = sum(row.credits_ucr for row in metered.ledger("capped-free"))
    assert billed <= CAP_UCR
    assert billed > CAP_UCR - 1 * M, "the cap should be used up, the last requests clamped to what was left"
    assert len(ok) == len(metered.ledger("capped-free")) >= 24
    assert any(answer.json()["usage"]["completion_tokens"] < 1000 for answer in ok), "some request was clamped"
    assert refused and all(answer.status_code == 402 for answer in refused)
    assert {answer.headers["x-meterline-error"] for answer in refused} == {"free_cap_reached"}
    assert all(answer.json() == expected_refusal for answer in refused)
    counters = SqlCounterStore(metered.engine)
    account = Account("capped-free", calendar_month(datetime.now(UTC)).start)
    assert counters.snapshot(account, datetime.now(UTC)) == Snapshot(billed, 0)


def test_customers_without_a_ceiling_reserve_nothing(metered):
    tenant = metered.tenant("uncapped-pro", plan="pro")
    tenant.client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "[[c=5]] hi"}])
    account = Account("uncapped-pro", calendar_month(datetime.now(UTC)).start)
    assert SqlCounterStore(metered.engine).snapshot(account, datetime.now(UTC)) == Snapshot(0, 0)
    assert store.ledger_rows(metered.engine, "uncapped-pro")
