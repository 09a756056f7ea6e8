"""Durability through the real proxy: what a client received is billed, even if the proxy dies."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest
from sqlalchemy import text

from plugin.ledger import store
from plugin.ledger.store import make_engine
from tests.support.proxy import run_proxy
from tests.support.rollups import assert_rollups_match_ledger
from tests.test_proxy_metering import ask, expected_ucr, unique

pytestmark = pytest.mark.proxy


def _wait_for_rows(metered, customer_id: str, count: int, timeout: float = 15.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = metered.ledger(customer_id)
        if len(rows) >= count:
            return rows
        time.sleep(0.1)
    return metered.ledger(customer_id)


def test_abandoned_stream_bills_what_was_delivered(metered):
    tenant = metered.tenant(f"gone-{unique()}")
    body = {
        "model": "test-model", "stream": True,
        "messages": ask("a long story [[p=20 c=300 word_ms=15]]"),
    }
    received = 0
    with httpx.stream("POST", metered.proxy.base_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {tenant.key}"}, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                received += 1
            if received == 20:
                break  # the client goes away mid-stream
    [row] = _wait_for_rows(metered, tenant.customer_id, 1)
    assert row.stream and row.usage_source == "delivered"
    # about 20 words of "wN" were delivered (LiteLLM's tokenizer counts ~2 tokens per word); never the full 300
    assert 0 < row.completion_tokens < 150
    assert row.credits_ucr == expected_ucr(row.prompt_tokens, row.completion_tokens)


@pytest.fixture
def killable(tmp_path, upstream):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    store.add_customer(engine, "durable", "pro")
    _, key = store.create_key(engine, "durable")
    with run_proxy(tmp_path / "proxy", upstream.base_url, url) as proxy:
        yield proxy, engine, key
    engine.dispose()


async def test_every_response_received_is_in_the_ledger_after_kill_9(killable):
    proxy, engine, key = killable
    headers = {"Authorization": f"Bearer {key}"}
    received: set[int] = set()

    async def one(client: httpx.AsyncClient, prompt: int) -> None:
        stream = prompt % 2 == 0
        body = {"model": "test-model", "messages": ask(f"[[p={prompt} c=3]]"), "stream": stream}
        try:
            if stream:
                async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                    lines = [line async for line in response.aiter_lines()]
                complete = response.status_code == 200 and lines and lines[-1] == "data: [DONE]"
            else:
                response = await client.post("/v1/chat/completions", json=body, headers=headers)
                complete = response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == prompt
        except httpx.HTTPError:
            return  # cut off by the kill: the client did not receive this response in full
        if complete:
            received.add(prompt)
            if len(received) == 15:
                proxy.process.send_signal(signal.SIGKILL)

    async with httpx.AsyncClient(base_url=proxy.base_url, timeout=30) as client:
        await asyncio.gather(*(one(client, prompt) for prompt in range(1000, 1060)))
    proxy.process.wait(10)
    assert len(received) >= 15
    billed = {row.prompt_tokens for row in store.ledger_rows(engine, "durable")}
    assert received <= billed, f"received but never billed: {sorted(received - billed)}"
    assert assert_rollups_match_ledger(engine) == len(billed)  # the usage read model died with the ledger, intact


def test_an_answer_that_cannot_be_billed_is_withheld_with_503(metered):
    tenant = metered.tenant(f"nobill-{unique()}")
    with metered.engine.begin() as connection:  # the ledger refuses every insert, as a full disk would
        connection.execute(text(
            "CREATE TRIGGER refuse_ledger BEFORE INSERT ON ledger BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        ))
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            tenant.client.chat.completions.create(model="test-model", messages=ask("[[p=5 c=2]]"))
    finally:
        with metered.engine.begin() as connection:
            connection.execute(text("DROP TRIGGER refuse_ledger"))
    assert caught.value.status_code == 503
    assert caught.value.response.json()["error"] == {
        "message": "The request could not be recorded for billing, so its answer was withheld. Try again shortly.",
        "type": "billing_unavailable", "param": None, "code": "503",
    }
    assert metered.ledger(tenant.customer_id) == []
    # the writer recovers as soon as the database does
    tenant.client.chat.completions.create(model="test-model", messages=ask("[[p=5 c=2]]"))
    [row] = metered.ledger(tenant.customer_id)
    assert row.credits_ucr == expected_ucr(5, 2)


def test_stream_the_provider_breaks_mid_way_bills_what_was_delivered(metered):
    tenant = metered.tenant(f"broken-{unique()}")
    received: list[str] = []
    with pytest.raises(openai.APIError):
        for chunk in tenant.client.chat.completions.create(
            model="test-model", messages=ask("[[p=8 c=50 cut=10 word_ms=20]]"), stream=True
        ):
            received.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(received).startswith("w1 w2")
    [row] = _wait_for_rows(metered, tenant.customer_id, 1)
    assert (row.stream, row.usage_source) == (True, "delivered")
    assert 0 < row.completion_tokens < 40  # ~10 words delivered, never the 50 the provider would have sent
