"""End to end: the real `litellm` proxy with meterline, driven by the real `openai` client.

Expected credits are computed here by hand from the test meterline.yaml (tokens basis, 1,000
tokens per credit, weights input 1, cached input 0.1, output 4), independently of plugin code.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import httpx
import openai
import pytest

from plugin.ledger import store
from plugin.ledger.store import make_engine
from tests.support.proxy import MASTER_KEY, METERLINE_YAML, run_proxy

pytestmark = pytest.mark.proxy


def expected_ucr(prompt: int, completion: int, cached: int = 0) -> int:
    # (uncached input x 1 + cached x 0.1 + output x 4) weighted tokens / 1000 per credit, in µcr
    return (prompt - cached) * 1000 + cached * 100 + completion * 4000


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(params=["sqlite", "postgres"])
def any_backend(request):
    """The same tests with the ledger on SQLite and on PostgreSQL."""
    return request.getfixturevalue("metered" if request.param == "sqlite" else "metered_pg")


def test_plain_response_is_billed_once_with_labels_and_header(any_backend, upstream):
    tenant = any_backend.tenant(f"acme-{unique()}")
    raw = tenant.client.chat.completions.with_raw_response.create(
        model="test-model", messages=ask(f"hello [[p=100 c=10 cached=40 reasoning=3 tag={tenant.customer_id}]]"),
        user="alice", extra_body={"metadata": {"action": "summarize"}},
    )
    assert raw.parse().usage.prompt_tokens == 100
    [row] = any_backend.ledger(tenant.customer_id)
    assert (row.prompt_tokens, row.completion_tokens, row.cached_tokens, row.reasoning_tokens) == (100, 10, 40, 3)
    assert row.credits_ucr == expected_ucr(100, 10, cached=40) == 104_000
    # provider cost: (60 x 0.15 + 40 x 0.075 + 10 x 0.60) / 1M USD = 18 µUSD exactly
    assert row.provider_cost_uusd == 18
    assert (row.member, row.action, row.model, row.provider) == ("alice", "summarize", "test-model", "openai")
    assert not row.cache_hit and not row.stream
    assert raw.headers["x-meterline-credits"] == "104000"
    assert store.list_outbox_ids(any_backend.engine, tenant.customer_id) == [row.id]  # same transaction


def test_action_header_is_used_when_the_body_names_none(metered):
    tenant = metered.tenant(f"hdr-{unique()}")
    tenant.client.chat.completions.create(
        model="test-model", messages=ask("[[p=5 c=1]]"), extra_headers={"X-Meterline-Action": "translate"}
    )
    [row] = metered.ledger(tenant.customer_id)
    assert (row.action, row.member) == ("translate", "-")


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_is_billed_from_the_provider_usage_chunk(any_backend, include_usage):
    tenant = any_backend.tenant(f"stream-{unique()}")
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(tenant.client.chat.completions.create(
        model="test-model", messages=ask("go [[p=12 c=7]]"), stream=True, **options
    ))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "w1 w2 w3 w4 w5 w6 w7"
    usage_chunks = [chunk.usage for chunk in chunks if chunk.usage]
    # the client sees a usage chunk only when it asked for one
    assert bool(usage_chunks) == include_usage
    [row] = any_backend.ledger(tenant.customer_id)
    assert (row.prompt_tokens, row.completion_tokens, row.stream) == (12, 7, True)
    assert row.credits_ucr == expected_ucr(12, 7)


def test_stream_without_provider_usage_is_billed_from_litellm_count(metered):
    tenant = metered.tenant(f"nousage-{unique()}")
    chunks = list(tenant.client.chat.completions.create(
        model="test-model", messages=ask("count me please [[c=7 nousage=1]]"), stream=True
    ))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices).startswith("w1")
    [row] = metered.ledger(tenant.customer_id)
    assert row.prompt_tokens > 0 and row.completion_tokens >= 7  # never 0 when tokens flowed
    assert row.credits_ucr == expected_ucr(row.prompt_tokens, row.completion_tokens) > 0


def response_path_counts(metered) -> dict[str, float]:
    """How many requests `meterline_response_path_seconds` has timed, by step."""
    with metered.api() as api:
        text = api.get("/metrics").text
    prefix = 'meterline_response_path_seconds_count{step="'
    return {line[len(prefix):].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


def test_the_time_spent_in_meterline_is_a_metric_by_step(metered):
    """Operators can see what billing adds to each request: auth, admission and billing are timed once per
    request, streamed or not."""
    tenant = metered.tenant(f"timed-{unique()}")
    before = response_path_counts(metered)
    tenant.client.chat.completions.create(model="test-model", messages=ask("[[p=5 c=1]]"))
    list(tenant.client.chat.completions.create(model="test-model", messages=ask("[[p=5 c=2]]"), stream=True))
    after = response_path_counts(metered)
    assert {step: after[step] - before.get(step, 0) for step in after} == {"auth": 2, "admission": 2, "billing": 2}


def test_cache_hit_is_recorded_free_with_what_it_saved(metered, upstream):
    tenant = metered.tenant(f"cache-{unique()}")
    messages = ask(f"cache me {unique()} [[p=50 c=5]]")
    calls_before = len(upstream.log())
    for _ in range(2):
        tenant.client.chat.completions.create(model="test-model", messages=messages, extra_body={"cache": {"use-cache": True}})
    assert len(upstream.log()) == calls_before + 1  # the second answer came from LiteLLM's cache
    first, second = metered.ledger(tenant.customer_id)
    assert (first.cache_hit, first.credits_ucr) == (False, expected_ucr(50, 5))
    assert (second.cache_hit, second.credits_ucr, second.provider_cost_uusd) == (True, 0, 0)
    assert second.saved_ucr == expected_ucr(50, 5)
    # a 0-credit row never becomes a meter event
    assert store.list_outbox_ids(metered.engine, tenant.customer_id) == [first.id]


def test_streamed_cache_hit_is_free(metered, upstream):
    tenant = metered.tenant(f"scache-{unique()}")
    messages = ask(f"stream cache {unique()} [[p=12 c=7]]")
    for _ in range(2):
        list(tenant.client.chat.completions.create(
            model="test-model", messages=messages, stream=True, extra_body={"cache": {"use-cache": True}}
        ))
    first, second = metered.ledger(tenant.customer_id)
    assert (first.cache_hit, first.credits_ucr) == (False, expected_ucr(12, 7))
    assert (second.cache_hit, second.credits_ucr, second.saved_ucr) == (True, 0, expected_ucr(12, 7))


def test_retry_after_a_500_bills_only_the_final_success(any_backend, upstream):
    tenant = any_backend.tenant(f"retry-{unique()}")
    request_id = unique()
    tenant.client.chat.completions.create(model="test-model", messages=ask(f"[[id={request_id} fail=1 p=20 c=2]]"))
    attempts = [entry["status"] for entry in upstream.log() if entry["id"] == request_id]
    assert attempts == [500, 200]
    [row] = any_backend.ledger(tenant.customer_id)
    assert row.credits_ucr == expected_ucr(20, 2)


def test_fallback_bills_the_deployment_that_answered_once(metered, upstream):
    tenant = metered.tenant(f"fallback-{unique()}")
    tag = unique()
    tenant.client.chat.completions.create(model="primary", messages=ask(f"[[p=30 c=3 tag={tag}]]"))
    statuses = [(entry["model"], entry["status"]) for entry in upstream.log() if entry["tag"] == tag]
    assert ("broken-model", 500) in statuses and statuses[-1] == ("gpt-4o", 200)
    [row] = metered.ledger(tenant.customer_id)
    assert row.model == "backup"
    assert row.credits_ucr == expected_ucr(30, 3)
    # priced at backup's rate: (30 x 2.50 + 3 x 10) / 1M USD = 105 µUSD
    assert row.provider_cost_uusd == 105


def test_a_request_that_fails_every_attempt_bills_nothing(metered, upstream):
    tenant = metered.tenant(f"fail-{unique()}")
    request_id = unique()
    with pytest.raises(openai.InternalServerError):
        tenant.client.chat.completions.create(model="test-model", messages=ask(f"[[id={request_id} fail=99]]"))
    assert len([entry for entry in upstream.log() if entry["id"] == request_id]) == 3  # 1 try + 2 retries
    assert metered.ledger(tenant.customer_id) == []


def test_tokens_billed_zero_credits_raise_an_alert(metered):
    tenant = metered.tenant(f"unpriced-{unique()}")
    tenant.client.chat.completions.create(model="unpriced", messages=ask("[[p=9 c=4]]"))
    [row] = metered.ledger(tenant.customer_id)
    assert row.credits_ucr == 0 and row.prompt_tokens == 9
    [alert] = [alert for alert in store.list_alerts(metered.engine, "unbilled_tokens") if alert.subject_id == row.id]
    assert alert.customer_id == tenant.customer_id
    assert "13 tokens on model 'unpriced'" in alert.message


async def test_two_customers_concurrently_are_billed_exactly_what_the_upstream_reported(any_backend, upstream):
    metered = any_backend
    tenants = [metered.tenant(f"conc-{unique()}") for _ in range(2)]
    rng = random.Random(7)
    semaphore = asyncio.Semaphore(25)

    async def one(index: int) -> None:
        tenant = tenants[index % 2]
        prompt, completion, cached = rng.randint(1, 400), rng.randint(0, 40), 0
        cached = rng.randint(0, prompt) if index % 5 == 0 else 0
        text = f"req {index} [[p={prompt} c={completion} cached={cached} tag={tenant.customer_id}]]"
        async with semaphore:
            if index % 3 == 0:
                stream = await tenant.async_client.chat.completions.create(
                    model="test-model", messages=ask(text), stream=True,
                    **({"stream_options": {"include_usage": True}} if index % 2 else {}),
                )
                async for _ in stream:
                    pass
            else:
                await tenant.async_client.chat.completions.create(model="test-model", messages=ask(text))

    await asyncio.gather(*(one(index) for index in range(100)))
    log = upstream.log()
    for tenant in tenants:
        reported = [entry for entry in log if entry["tag"] == tenant.customer_id and entry["status"] == 200]
        rows = metered.ledger(tenant.customer_id)
        assert len(rows) == len(reported) == 50
        assert sum(row.prompt_tokens for row in rows) == sum(entry["prompt_tokens"] for entry in reported)
        assert sum(row.completion_tokens for row in rows) == sum(entry["completion_tokens"] for entry in reported)
        assert sum(row.cached_tokens for row in rows) == sum(entry["cached_tokens"] for entry in reported)
        assert sum(row.credits_ucr for row in rows) == sum(
            expected_ucr(entry["prompt_tokens"], entry["completion_tokens"], entry["cached_tokens"]) for entry in reported
        )
        assert len({row.id for row in rows}) == 50


# ------------------------------------------------------------------------------ who is billed


def _error(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


def test_unknown_key_gets_401_invalid_api_key(metered):
    with pytest.raises(openai.AuthenticationError) as caught:
        metered.client("mk_not-a-real-key").chat.completions.create(model="test-model", messages=ask("hi"))
    assert _error(caught.value) == {
        "message": "This API key is unknown or has been revoked. Ask your operator for a valid key.",
        "type": "invalid_api_key", "param": None, "code": "401",
    }
    assert caught.value.response.headers["x-meterline-error"] == "invalid_api_key"


def test_revoked_key_gets_401(metered):
    tenant = metered.tenant(f"revoked-{unique()}")
    tenant.client.chat.completions.create(model="test-model", messages=ask("[[p=1 c=1]]"))
    [key] = store.list_keys(metered.engine, tenant.customer_id)
    store.revoke_key(metered.engine, key.id)
    revoked_at = time.monotonic()
    # the proxy remembers resolved keys for METERLINE_KEY_CACHE_SECONDS (1 s in these tests)
    while time.monotonic() - revoked_at < 5:
        try:
            tenant.client.chat.completions.create(model="test-model", messages=ask("[[p=1 c=1]]"))
        except openai.AuthenticationError as refused:
            assert _error(refused)["type"] == "invalid_api_key"
            break
        time.sleep(0.1)
    else:
        pytest.fail("a revoked key still worked 5 s later")
    assert time.monotonic() - revoked_at < 2.5
    billed = len(metered.ledger(tenant.customer_id))
    with pytest.raises(openai.AuthenticationError):
        tenant.client.chat.completions.create(model="test-model", messages=ask("[[p=1 c=1]]"))
    assert len(metered.ledger(tenant.customer_id)) == billed


def test_missing_key_gets_401(metered):
    response = httpx.post(metered.proxy.base_url + "/v1/chat/completions", json={"model": "test-model", "messages": ask("hi")})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_api_key"


def test_master_key_without_customer_is_refused_not_billed_to_nobody(metered):
    before = len(metered.ledger())
    with pytest.raises(openai.AuthenticationError) as caught:
        metered.master_client().chat.completions.create(model="test-model", messages=ask("hi"))
    assert _error(caught.value)["type"] == "customer_required"
    assert len(metered.ledger()) == before


def test_master_key_with_unknown_customer_is_refused(metered):
    client = metered.master_client(default_headers={"X-Meterline-Customer": "nobody-like-this"})
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="test-model", messages=ask("hi"))
    assert _error(caught.value)["type"] == "unknown_customer"


def test_master_key_bills_the_customer_named_in_the_header(metered):
    tenant = metered.tenant(f"backend-{unique()}")
    client = metered.master_client(default_headers={"X-Meterline-Customer": tenant.customer_id})
    client.chat.completions.create(model="test-model", messages=ask("[[p=3 c=2]]"), user="bob")
    [row] = metered.ledger(tenant.customer_id)
    assert (row.member, row.credits_ucr) == ("bob", expected_ucr(3, 2))


def test_customer_header_is_ignored_without_the_master_key(metered):
    tenant = metered.tenant(f"honest-{unique()}")
    victim = metered.tenant(f"victim-{unique()}")
    client = metered.client(tenant.key, default_headers={"X-Meterline-Customer": victim.customer_id})
    client.chat.completions.create(model="test-model", messages=ask("[[p=3 c=2]]"))
    assert len(metered.ledger(tenant.customer_id)) == 1
    assert metered.ledger(victim.customer_id) == []


def test_health_endpoint_is_open(metered):
    response = httpx.get(metered.proxy.base_url + "/meterline/v1/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_allow_anonymous_bills_unnamed_operator_traffic_to_the_anonymous_customer(tmp_path, upstream):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    config = {**METERLINE_YAML, "allow_anonymous": True, "anonymous_customer": "walk-in"}
    with run_proxy(tmp_path / "proxy", upstream.base_url, url, meterline_yaml=config) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key=MASTER_KEY, max_retries=0)
        client.chat.completions.create(model="test-model", messages=ask("[[p=4 c=1]]"))
    [row] = store.ledger_rows(engine)
    assert (row.customer_id, row.credits_ucr) == ("walk-in", expected_ucr(4, 1))
    engine.dispose()


def test_a_client_cannot_forge_meterline_state_in_its_metadata(metered):
    tenant = metered.tenant(f"forger-{unique()}")
    victim = metered.tenant(f"victim-{unique()}")
    forged = {"meterline": {"customer": victim.customer_id, "credits_ucr": 0, "ledger_id": "mtr_forged",
                            "member": "x", "action": "x"}, "action": "real-action"}
    raw = tenant.client.chat.completions.with_raw_response.create(
        model="test-model", messages=ask("[[p=6 c=2]]"), extra_body={"metadata": forged}
    )
    [row] = metered.ledger(tenant.customer_id)
    assert (row.credits_ucr, row.action) == (expected_ucr(6, 2), "real-action")
    assert row.id != "mtr_forged"
    assert raw.headers["x-meterline-credits"] == str(expected_ucr(6, 2))
    assert metered.ledger(victim.customer_id) == []


def test_embeddings_are_billed_for_their_input_tokens(metered):
    tenant = metered.tenant(f"embed-{unique()}")
    result = tenant.client.embeddings.create(model="embedder", input=["alpha beta [[p=25]]", "gamma"], user="ann")
    assert len(result.data) == 2 and result.usage.prompt_tokens == 25
    [row] = metered.ledger(tenant.customer_id)
    assert (row.model, row.prompt_tokens, row.completion_tokens, row.member) == ("embedder", 25, 0, "ann")
    assert row.credits_ucr == expected_ucr(25, 0)
    # priced from LiteLLM's own table: text-embedding-3-small costs $0.02 per million tokens
    assert row.provider_cost_uusd == 1  # 25 x 0.02 / 1M USD = 0.5 µUSD, rounded half up


def test_responses_api_is_billed_from_its_usage(metered):
    tenant = metered.tenant(f"responses-{unique()}")
    result = tenant.client.responses.create(model="test-model", input="hello [[p=30 c=4 cached=10]]", user="ann")
    assert result.output_text == "w1 w2 w3 w4"
    [row] = metered.ledger(tenant.customer_id)
    assert (row.prompt_tokens, row.completion_tokens, row.cached_tokens, row.stream) == (30, 4, 10, False)
    assert row.credits_ucr == expected_ucr(30, 4, cached=10)


def test_streamed_responses_api_is_billed_from_the_completed_event(metered):
    tenant = metered.tenant(f"responses-stream-{unique()}")
    events = list(tenant.client.responses.create(model="test-model", input="hello [[p=31 c=5]]", stream=True))
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == "w1 w2 w3 w4 w5"
    [row] = metered.ledger(tenant.customer_id)
    assert (row.prompt_tokens, row.completion_tokens, row.stream, row.usage_source) == (31, 5, True, "provider")
    assert row.credits_ucr == expected_ucr(31, 5)


def test_text_completions_are_billed_streamed_or_not(metered):
    tenant = metered.tenant(f"legacy-{unique()}")
    result = tenant.client.completions.create(model="test-model", prompt="hello [[p=30 c=4]]")
    assert result.choices[0].text == "w1 w2 w3 w4"
    streamed = "".join(chunk.choices[0].text or "" for chunk in tenant.client.completions.create(
        model="test-model", prompt="hello there [[c=6]]", stream=True) if chunk.choices)
    assert streamed == "w1 w2 w3 w4 w5 w6"
    plain, stream = metered.ledger(tenant.customer_id)
    assert (plain.prompt_tokens, plain.completion_tokens, plain.credits_ucr) == (30, 4, expected_ucr(30, 4))
    # LiteLLM asks no usage for text-completion streams: billed from LiteLLM's own count, never 0
    assert stream.stream and stream.usage_source == "litellm"
    assert stream.prompt_tokens > 0 and stream.completion_tokens >= 6
    assert stream.credits_ucr == expected_ucr(stream.prompt_tokens, stream.completion_tokens)


def test_anthropic_messages_route_is_billed_streamed_or_not(metered):
    tenant = metered.tenant(f"messages-{unique()}")
    headers = {"Authorization": f"Bearer {tenant.key}"}
    body = {"model": "test-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hi [[p=40 c=3]]"}]}
    response = httpx.post(metered.proxy.base_url + "/v1/messages", headers=headers, json=body, timeout=30)
    assert response.status_code == 200 and response.json()["usage"]["input_tokens"] == 40
    body["messages"][0]["content"] = "hi [[p=41 c=3]]"
    with httpx.stream("POST", metered.proxy.base_url + "/v1/messages", headers=headers,
                      json={**body, "stream": True}, timeout=30) as stream:
        lines = list(stream.iter_lines())
    assert any('"text_delta"' in line for line in lines) and any('"message_stop"' in line for line in lines)
    plain, streamed = metered.ledger(tenant.customer_id)
    assert (plain.prompt_tokens, plain.completion_tokens, plain.credits_ucr) == (40, 3, expected_ucr(40, 3))
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.stream) == (41, 3, True)
    assert streamed.credits_ucr == expected_ucr(41, 3)
