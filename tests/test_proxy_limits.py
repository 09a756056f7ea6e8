"""Plans and limits through the real proxy: reservations keep concurrent requests under a cap."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import pytest

from plugin.counters.base import Account, Snapshot
from plugin.ledger import accounts, store
from plugin.ledger.store import make_engine
from plugin.rules.plans import calendar_month

pytestmark = pytest.mark.proxy

M = 1_000_000
CAP_UCR = 100 * M  # tests/support/proxy.py: plans.free.cap_credits = 100


@pytest.fixture(params=["embedded", "redis"])
def capped_proxy(request):
    """The proxy with its counters in the ledger's database, and with them in a real redis-server."""
    return request.getfixturevalue("metered" if request.param == "embedded" else "metered_redis")


async def test_500_concurrent_requests_never_bill_past_a_free_cap(capped_proxy):
    """Each request may cost about 4 credits (1,000 output tokens at weight 4); the free plan has
    100. 500 of them at once: the ledger stays under 100 credits, the cap is used up (the last
    requests are clamped, not refused), and every refusal is the same clear 402."""
    metered = capped_proxy
    tenant = metered.tenant("capped-free", plan="free")
    headers = {"Authorization": f"Bearer {tenant.key}"}
    body = {"model": "test-model", "messages": [{"role": "user", "content": "[[c=1000]] hello"}], "max_tokens": 1000}
    period_end = calendar_month(datetime.now(UTC)).end
    expected_refusal = {"error": {
        "message": "You've used the 100 credits of your free plan for this period. Upgrade your plan to continue, "
                   f"or wait until {period_end:%Y-%m-%d %H:%M} UTC.",
        "type": "free_cap_reached", "param": None, "code": "402",
    }}
    # No keep-alive: reusing one of 100 kept-alive connections to the plugin-on proxy sometimes meets a
    # connection the server is closing (about 1 in 100 requests here, never with the plugin off or without
    # keep-alive; under investigation, see the issue note). That race is not what this test is about.
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=metered.proxy.base_url, timeout=120, limits=limits) as client:
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
    counters = metered.counters()
    account = Account("capped-free", calendar_month(datetime.now(UTC)).start)
    assert counters.snapshot(account, datetime.now(UTC)) == Snapshot(billed, 0)


async def test_a_capped_customer_far_from_its_limit_is_admitted_from_budget_slices(capped_proxy):
    """200 concurrent requests under a limit far above them: every one admitted and in the ledger, the
    counters agree with it, each answer's remaining headroom is the limit less what was billed before
    it and what other requests still held, and the budget slices are given back within seconds."""
    import time

    metered = capped_proxy
    tenant = metered.tenant("sliced", plan="pro")
    limit = 100_000 * M
    accounts.put_limits(metered.engine, "sliced", {"hard_limit_ucr": limit}, by="test")
    headers = {"Authorization": f"Bearer {tenant.key}"}
    body = {"model": "test-model", "messages": [{"role": "user", "content": "[[c=20]] hello"}], "max_tokens": 100}
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=metered.proxy.base_url, timeout=120, limits=limits) as client:
        answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=body, headers=headers)
                                         for _ in range(200)))
    assert [answer.status_code for answer in answers] == [200] * 200
    billed = sum(row.credits_ucr for row in metered.ledger("sliced"))
    assert len(metered.ledger("sliced")) == 200 and billed == sum(int(a.headers["x-meterline-credits"]) for a in answers)
    worst_case = 100 * 4 * M // 1000 + 1 * M  # 100 output tokens at weight 4, and the prompt
    for answer in answers:
        remaining = int(answer.headers["x-meterline-remaining"])
        assert limit - billed - 50 * worst_case <= remaining <= limit - int(answer.headers["x-meterline-credits"])
    account = Account("sliced", calendar_month(datetime.now(UTC)).start)
    for _ in range(100):  # slices stop admitting after 2 s and are then given back
        if metered.counters().snapshot(account, datetime.now(UTC)) == Snapshot(billed, 0):
            break
        time.sleep(0.1)
    assert metered.counters().snapshot(account, datetime.now(UTC)) == Snapshot(billed, 0)


def test_customers_without_a_ceiling_reserve_nothing_but_are_counted(metered):
    """No reservation for an unlimited customer; its usage still counts (soft limits, the breaker)."""
    tenant = metered.tenant("uncapped-pro", plan="pro")
    answer = tenant.client.chat.completions.with_raw_response.create(
        model="test-model", messages=[{"role": "user", "content": "[[c=5]] hi"}])
    account = Account("uncapped-pro", calendar_month(datetime.now(UTC)).start)
    billed = sum(row.credits_ucr for row in metered.ledger("uncapped-pro"))
    assert billed > 0
    assert metered.counters().snapshot(account, datetime.now(UTC)) == Snapshot(billed, 0)
    assert answer.headers["x-meterline-credits"] == str(billed)
    assert answer.headers["x-meterline-remaining"] == "unlimited"


def test_reservations_of_failed_requests_are_released(metered):
    """A stream the provider breaks before anything was delivered, and a call that fails every attempt,
    bill nothing and give their reservation back at once (not after reservation_seconds)."""
    import time

    import openai

    tenant = metered.tenant("capped-failures", plan="free")
    with pytest.raises(openai.APIError):
        for _ in tenant.client.chat.completions.create(model="test-model", max_tokens=500, stream=True,
                                                       messages=[{"role": "user", "content": "[[c=50 cut=0]]"}]):
            pass
    with pytest.raises(openai.APIError):
        tenant.client.chat.completions.create(model="test-model", max_tokens=500,
                                              messages=[{"role": "user", "content": "[[id=never fail=9]] hi"}])
    account = Account("capped-failures", calendar_month(datetime.now(UTC)).start)
    for _ in range(50):  # the stream's release runs in the background: give it up to 5 s
        if metered.counters().snapshot(account, datetime.now(UTC)) == Snapshot(0, 0):
            break
        time.sleep(0.1)
    assert metered.counters().snapshot(account, datetime.now(UTC)) == Snapshot(0, 0)
    assert metered.ledger("capped-failures") == []


def test_a_stream_the_client_leaves_before_any_chunk_gives_its_reservation_back(metered):
    import time

    tenant = metered.tenant("capped-leaver", plan="free")
    body = {"model": "test-model", "max_tokens": 500, "stream": True,
            "messages": [{"role": "user", "content": "[[c=20 delay_ms=3000]] hi"}]}
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", metered.proxy.base_url + "/v1/chat/completions", json=body, timeout=1.0,
                          headers={"Authorization": f"Bearer {tenant.key}"}) as response:
            for _ in response.iter_bytes():
                pass
    account = Account("capped-leaver", calendar_month(datetime.now(UTC)).start)
    for _ in range(100):  # the proxy notices the client left when the provider's first chunk arrives (~3 s)
        if metered.counters().snapshot(account, datetime.now(UTC)) == Snapshot(0, 0):
            break
        time.sleep(0.1)
    assert metered.counters().snapshot(account, datetime.now(UTC)) == Snapshot(0, 0)
    assert metered.ledger("capped-leaver") == []


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_fail_mode_when_redis_is_unreachable(tmp_path, upstream, mode):
    """Counters in a Redis nobody is running: `closed` refuses capped requests with a 503, `open` lets
    them through unreserved; either way the operator gets one alert, and uncapped customers never notice."""
    import openai

    from tests.support.processes import free_port
    from tests.support.proxy import run_proxy

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    keys = {}
    for customer, plan in (("capped", "free"), ("uncapped", "pro")):
        store.add_customer(engine, customer, plan)
        keys[customer] = store.create_key(engine, customer)[1]
    env = {"METERLINE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "METERLINE_FAIL_MODE": mode}
    with run_proxy(tmp_path / "proxy", upstream.base_url, url, env=env) as proxy:
        def client(customer: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=proxy.base_url + "/v1", api_key=keys[customer], max_retries=0)

        ask = {"model": "test-model", "messages": [{"role": "user", "content": "[[c=3]] hi"}]}
        assert client("uncapped").chat.completions.create(**ask).usage.completion_tokens == 3
        for _ in range(3):
            if mode == "open":
                answer = client("capped").chat.completions.with_raw_response.create(**ask)
                assert answer.parse().usage.completion_tokens == 3
                # Billed, but what is left cannot be known: no header rather than a wrong one.
                assert int(answer.headers["x-meterline-credits"]) > 0
                assert "x-meterline-remaining" not in answer.headers
            else:
                with pytest.raises(openai.InternalServerError) as refused:
                    client("capped").chat.completions.create(**ask)
                assert refused.value.status_code == 503
                assert refused.value.body["type"] == "billing_unavailable"
                assert "Spending limits cannot be checked right now" in refused.value.body["message"]
    [alert] = store.list_alerts(engine, "counters_unavailable")
    assert f"METERLINE_FAIL_MODE={mode}" in alert.message and "redis counters: ConnectionError" in alert.message
    assert len(list(store.ledger_rows(engine, "capped"))) == (3 if mode == "open" else 0)
    engine.dispose()
