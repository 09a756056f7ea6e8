"""Meter events from the ledger to Stripe, end to end, with real parts only.

A real LiteLLM proxy with meterline, driven by the real `openai` client; the unmodified `stripe`
SDK against the local Stripe emulator (a separate process); `meterline relay` workers as real
processes, killed with SIGKILL; SQLite and a real PostgreSQL. The proof is always the same
comparison: the emulator's recorded events against the ledger, by identifier.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from plugin import runtime
from plugin.cli import main as cli_main
from plugin.ledger import store
from plugin.ledger.store import make_engine
from plugin.outbox import store as outbox
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.settings import MeterlineConfig
from plugin.stripe.setup import StripeSetup
from tests.support.delivery import PRICED_YAML, ask, stripe_env, wait_for
from tests.support.postgres import empty_all_tables
from tests.support.processes import stop_process
from tests.support.proxy import MASTER_KEY, run_proxy
from tests.support.stripe_emulator import StripeEmulator, run_stripe_emulator

pytestmark = pytest.mark.proxy

METERLINE_BIN = str(Path(sys.executable).with_name("meterline"))


def drained(engine) -> bool:
    depth = outbox.stats(engine).depth
    return depth["pending"] == depth["sending"] == depth["held"] == 0


def delivered_ids(engine) -> set[str]:
    return {event.id for event in outbox.list_events(engine, status="delivered", limit=100_000)}


def assert_exactly_once(emulator: StripeEmulator, engine, customer_ids: list[str] | None = None) -> None:
    """The emulator holds exactly one event per billed ledger row, with the ledger's value and customer."""
    stripe_ids = {customer.id: customer.stripe_customer_id for customer in store.list_customers(engine)}
    expected = {
        row.id: (stripe_ids[row.customer_id], str(row.credits_ucr))
        for row in store.ledger_rows(engine) if row.credits_ucr > 0
        and (customer_ids is None or row.customer_id in customer_ids)
    }
    recorded = [event for event in emulator.meter_events() if event["identifier"] in expected]
    counts = Counter(event["identifier"] for event in recorded)
    assert [identifier for identifier, count in counts.items() if count > 1] == []
    assert set(counts) == set(expected), f"missing at Stripe: {sorted(set(expected) - set(counts))[:5]}"
    assert {event["identifier"]: (event["customer"], event["value"]) for event in recorded} == expected


@pytest.fixture(scope="module")
def emulator() -> Iterator[StripeEmulator]:
    with run_stripe_emulator() as server:
        StripeSetup(server.client(), MeterlineConfig.model_validate(PRICED_YAML)).run()
        yield server


def stripe_customer(emulator: StripeEmulator, name: str) -> str:
    return emulator.client().v1.customers.create({"name": name}).id


@pytest.fixture(scope="module")
def delivering(tmp_path_factory, upstream, emulator):
    """A proxy whose in-process relay delivers to the emulator (v1 meter events)."""
    workdir = tmp_path_factory.mktemp("delivering")
    url = f"sqlite:///{workdir / 'ledger.db'}"
    engine = make_engine(url)
    with run_proxy(workdir / "proxy", upstream.base_url, url, meterline_yaml=PRICED_YAML,
                   env=stripe_env(emulator)) as proxy:
        yield proxy, engine
    engine.dispose()


def tenant(engine, emulator, customer_id: str, proxy, *, stripe: bool = True):
    import openai

    store.add_customer(engine, customer_id, "pro", stripe_customer(emulator, customer_id) if stripe else None)
    _, key = store.create_key(engine, customer_id)
    return openai.AsyncOpenAI(base_url=proxy.base_url + "/v1", api_key=key, max_retries=0, timeout=60)


async def test_every_billed_request_becomes_exactly_one_meter_event(delivering, emulator):
    proxy, engine = delivering
    clients = {name: tenant(engine, emulator, name, proxy) for name in ("deliver-a", "deliver-b")}

    async def call(name: str, n: int) -> None:
        messages = ask(f"[[p={100 + n} c={1 + n % 7}]]")
        if n % 3:
            await clients[name].chat.completions.create(model="test-model", messages=messages)
            return
        stream = await clients[name].chat.completions.create(model="test-model", messages=messages, stream=True)
        assert [chunk async for chunk in stream]

    await asyncio.gather(*(call(name, n) for name in clients for n in range(20)))
    wait_for(lambda: drained(engine), what="the outbox to drain")
    assert len([row for row in store.ledger_rows(engine) if row.customer_id in clients]) == 40
    assert_exactly_once(emulator, engine, list(clients))
    # the identifier is the ledger id, and the timestamp the billing time
    row = next(store.ledger_rows(engine, "deliver-a"))
    [event] = [event for event in emulator.meter_events() if event["identifier"] == row.id]
    assert event["timestamp"] == int(store.as_utc(row.created_at).timestamp())
    assert event["event_name"] == "meterline_credits" and event["source"] == "v1"


async def test_requests_succeed_while_stripe_is_down_and_land_after(delivering, emulator):
    proxy, engine = delivering
    client = tenant(engine, emulator, "outage", proxy)
    emulator.fail_next(40, status=500, path_prefix="/v1/billing/meter_events")
    for n in range(8):
        answer = await client.chat.completions.create(model="test-model", messages=ask(f"[[p={n + 5} c=2]]"))
        assert answer.usage.prompt_tokens == n + 5
    wait_for(lambda: drained(engine), what="delivery after the outage")
    assert_exactly_once(emulator, engine, ["outage"])
    assert all(event.attempts >= 1 for event in outbox.list_events(engine, status="delivered", customer_id="outage"))


async def test_an_answer_lost_after_stripe_recorded_it_is_not_doubled(delivering, emulator):
    """Stripe records the event, then answers 500 (and saves that 500 under the Idempotency-Key): the
    resend carries the same identifier under a fresh key, Stripe answers "An event already exists with
    identifier …", and the relay counts it delivered: once at Stripe, nothing dead."""
    proxy, engine = delivering
    client = tenant(engine, emulator, "ambiguous", proxy)
    emulator.fail_next(3, status=500, path_prefix="/v1/billing/meter_events", after_record=True)
    for n in range(3):
        await client.chat.completions.create(model="test-model", messages=ask(f"[[p={n + 20} c=2]]"))
    wait_for(lambda: drained(engine), what="delivery")
    assert_exactly_once(emulator, engine, ["ambiguous"])
    assert outbox.list_events(engine, status="dead", customer_id="ambiguous") == []
    assert emulator.meter_event_log()["duplicates"] >= 3  # each lost answer was learnt from the identifier


def test_operator_api_shows_the_queue_and_metrics(delivering, emulator):
    proxy, engine = delivering
    store.add_customer(engine, "api-dead", "pro", "cus_doesnotexist")
    store.write_records(engine, [BillingRecord(LedgerRow(
        id="mtr_api_dead", customer_id="api-dead", model="m", credits_ucr=77, created_at=datetime.now(UTC)))])
    wait_for(lambda: outbox.list_events(engine, status="dead", customer_id="api-dead") != [], what="a dead letter")
    master = {"Authorization": f"Bearer {MASTER_KEY}"}
    answer = httpx.get(proxy.base_url + "/meterline/v1/outbox", params={"status": "dead"}, headers=master).json()
    [dead] = [event for event in answer["events"] if event["id"] == "mtr_api_dead"]
    assert dead["status"] == "dead" and "No such customer" in dead["last_error"]
    assert answer["depth"]["dead"] >= 1

    refused = httpx.get(proxy.base_url + "/meterline/v1/outbox", headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "invalid_api_key"
    assert refused.headers["x-meterline-error"] == "invalid_api_key"

    metrics = httpx.get(proxy.base_url + "/meterline/v1/metrics").text
    assert 'meterline_outbox_depth{status="dead"}' in metrics
    assert "meterline_outbox_oldest_age_seconds" in metrics
    assert 'meterline_relay_events_total{sink="stripe",status="dead"}' in metrics

    store.set_stripe_customer(engine, "api-dead", stripe_customer(emulator, "api-dead"))
    retried = httpx.post(proxy.base_url + "/meterline/v1/outbox/retry", json={"ids": ["mtr_api_dead"]}, headers=master)
    assert retried.json() == {"requeued": 1}
    wait_for(lambda: drained(engine), what="the re-queued event")
    assert_exactly_once(emulator, engine, ["api-dead"])
    retry = proxy.base_url + "/meterline/v1/outbox/retry"
    bad = httpx.post(retry, json={}, headers=master)
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_request"
    for body, message in (({"ids": 5}, "ids: Input should be a valid list"),
                          ({"ids": ["x"], "everything": True}, "everything: Extra inputs are not permitted")):
        answer = httpx.post(retry, json=body, headers=master)
        assert answer.status_code == 422
        assert answer.json() == {"error": {"message": message, "type": "invalid_request", "param": message.split(":")[0],
                                           "code": "422"}}
    garbled = httpx.post(retry, content=b"{not json", headers=master | {"Content-Type": "application/json"})
    assert garbled.json()["error"]["message"] == "The request body is not valid JSON."
    bad_query = httpx.get(proxy.base_url + "/meterline/v1/outbox", params={"limit": 0}, headers=master)
    assert bad_query.status_code == 422 and bad_query.json()["error"]["param"] == "limit"


# ------------------------------------------------------------------ relay workers as processes


@pytest.fixture
def worker_env(tmp_path, emulator) -> Callable[..., dict[str, str]]:
    config = tmp_path / "meterline.yaml"
    config.write_text(yaml.safe_dump(PRICED_YAML))

    def env(database_url: str, **extra: str) -> dict[str, str]:
        return dict(os.environ) | stripe_env(emulator) | {
            "METERLINE_DATABASE_URL": database_url, "METERLINE_CONFIG": str(config),
        } | extra

    return env


def fill(engine, emulator, customers: int, events: int, prefix: str, at: datetime | None = None) -> list[str]:
    names = [f"{prefix}-{n}" for n in range(customers)]
    for name in names:
        store.add_customer(engine, name, "pro", stripe_customer(emulator, name))
    at = at or datetime.now(UTC) - timedelta(seconds=1)
    ids = [f"mtr_{prefix}_{n:05d}" for n in range(events)]
    store.write_records(engine, [
        BillingRecord(LedgerRow(id=event_id, customer_id=names[n % customers], model="m", credits_ucr=1000 + n,
                                created_at=at))
        for n, event_id in enumerate(ids)
    ])
    return ids


def relay_once(env: dict[str, str]) -> str:
    done = subprocess.run([METERLINE_BIN, "relay", "--once"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_relay_worker_killed_mid_batch_loses_and_doubles_nothing(tmp_path, emulator, worker_env):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    ids = fill(engine, emulator, customers=4, events=240, prefix="killed")
    emulator.delay(15)  # slow Stripe: the kill lands mid-batch
    env = worker_env(url, METERLINE_RELAY_BATCH="60", METERLINE_RELAY_CONCURRENCY="4")
    worker = subprocess.Popen([METERLINE_BIN, "relay"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        # Killed while it holds a leased batch (between two batches it holds none, and the kill would prove little).
        wait_for(lambda: sum(e["identifier"] in ids for e in emulator.meter_events()) >= 30
                 and bool(outbox.list_events(engine, status="sending", limit=1)), what="some deliveries, a batch in flight")
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        stop_process(worker)
        emulator.delay(0)
    landed = sum(event["identifier"] in ids for event in emulator.meter_events())
    assert 30 <= landed < 240, "the kill should land mid-way"
    sending = outbox.list_events(engine, status="sending", limit=1000)
    assert sending, "the killed worker held leased rows it never recorded"
    time.sleep(2.2)  # its lease (METERLINE_RELAY_LEASE_SECONDS=2) runs out
    relay_once(env)
    assert delivered_ids(engine) >= set(ids)
    assert_exactly_once(emulator, engine, [f"killed-{n}" for n in range(4)])
    engine.dispose()


def test_two_workers_on_postgres_never_send_the_same_event(postgres_url, emulator, worker_env):
    """Two `meterline relay` processes share one Postgres outbox. Each event is sent once: no resend,
    no duplicate at Stripe, and no 429 from Stripe's one-call-per-customer rule."""
    engine = make_engine(postgres_url)
    empty_all_tables(engine)
    ids = fill(engine, emulator, customers=6, events=300, prefix="pg2")
    calls_before = emulator.calls().get("POST /v1/billing/meter_events", 0)
    log_before = emulator.meter_event_log()
    env = worker_env(postgres_url, METERLINE_RELAY_BATCH="25", METERLINE_RELAY_CONCURRENCY="3")
    emulator.delay(40)  # one worker alone would need ~4 s: long enough for both to start and share
    workers = [subprocess.Popen([METERLINE_BIN, "relay"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        wait_for(lambda: drained(engine), timeout=60, what="two workers to drain the outbox")
    finally:
        for worker in workers:
            stop_process(worker)
        emulator.delay(0)
    assert_exactly_once(emulator, engine, [f"pg2-{n}" for n in range(6)])
    log_after = emulator.meter_event_log()
    assert emulator.calls()["POST /v1/billing/meter_events"] - calls_before == len(ids)
    assert log_after["duplicates"] == log_before["duplicates"]
    assert log_after["rejected"] == log_before["rejected"]
    workers_seen = {event.claimed_by for event in outbox.list_events(engine, status="delivered", limit=1000)}
    assert len(workers_seen) == 2, "both workers took part"
    engine.dispose()


def test_duplicate_identifier_answer_counts_as_delivered(tmp_path, emulator, worker_env):
    """Stripe already has the identifier (sent before a crash, with another Idempotency-Key):
    it answers 400 "An event already exists with identifier …" (no code), and the relay marks the
    event delivered."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    [event_id] = fill(engine, emulator, customers=1, events=1, prefix="dup")
    [row] = store.ledger_rows(engine)
    emulator.client().v1.billing.meter_events.create({
        "event_name": "meterline_credits", "identifier": event_id,
        "payload": {"stripe_customer_id": store.get_customer(engine, "dup-0").stripe_customer_id,
                    "value": str(row.credits_ucr)},
    })
    duplicates = emulator.meter_event_log()["duplicates"]
    assert "1 delivered" in relay_once(worker_env(url))
    assert emulator.meter_event_log()["duplicates"] == duplicates + 1
    assert_exactly_once(emulator, engine, ["dup-0"])
    engine.dispose()


def test_dead_letters_are_listed_and_requeued(tmp_path, emulator, worker_env, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    store.add_customer(engine, "ghost", "pro", "cus_doesnotexist")
    now = datetime.now(UTC)
    store.write_records(engine, [
        BillingRecord(LedgerRow(id="mtr_ghost", customer_id="ghost", model="m", credits_ucr=5, created_at=now)),
        BillingRecord(LedgerRow(id="mtr_ancient", customer_id="ghost", model="m", credits_ucr=5,
                                created_at=now - timedelta(days=36))),
    ])
    env = worker_env(url)
    calls_before = emulator.calls().get("POST /v1/billing/meter_events", 0)
    assert "2 dead" in relay_once(env)
    # the ancient event never reached Stripe: its timestamp is outside Stripe's 35-day window
    assert emulator.calls().get("POST /v1/billing/meter_events", 0) - calls_before == 1
    reasons = {event.id: event.last_error for event in outbox.list_events(engine, status="dead")}
    assert "No such customer" in reasons["mtr_ghost"]
    assert "35 days" in reasons["mtr_ancient"]

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runtime.reset_for_tests()
    try:
        assert cli_main(["outbox", "list", "--status", "dead", "--json"]) == 0
        listed = capsys.readouterr().out
        assert "mtr_ghost" in listed and "mtr_ancient" in listed
        assert cli_main(["customers", "set-stripe", "ghost", stripe_customer(emulator, "ghost")]) == 0
        assert cli_main(["outbox", "retry", "--all-dead"]) == 0
        assert "2 event(s) queued" in capsys.readouterr().out
    finally:
        runtime.reset_for_tests()
    summary = relay_once(env)
    assert "1 delivered" in summary and "1 dead" in summary
    statuses = {event.id: event.status for event in outbox.list_events(engine, limit=10)}
    assert statuses == {"mtr_ancient": "dead"}, "the ancient one can never land; the other one did"
    assert "mtr_ghost" in delivered_ids(engine)
    engine.dispose()


def test_customers_without_a_stripe_id_are_held_until_subscribed(tmp_path, emulator, worker_env, monkeypatch,
                                                                 capsys):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    store.add_customer(engine, "newbie", "pro")
    store.write_records(engine, [BillingRecord(LedgerRow(
        id="mtr_newbie", customer_id="newbie", model="m", credits_ucr=9, created_at=datetime.now(UTC)))])
    env = worker_env(url)
    assert "1 held" in relay_once(env)
    [held] = outbox.list_events(engine, status="held")
    assert "no Stripe customer id" in held.last_error
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runtime.reset_for_tests()
    try:
        assert cli_main(["stripe", "subscribe", "newbie"]) == 0
        out = capsys.readouterr().out
        assert "created at Stripe" in out and "subscription" in out
    finally:
        runtime.reset_for_tests()
    assert "1 delivered" in relay_once(env)
    assert_exactly_once(emulator, engine, ["newbie"])
    engine.dispose()


# ------------------------------------------------------------------ the proxy killed, and the v2 stream


def ledger_with_customer(tmp_path, emulator, customer_id: str):
    """A fresh SQLite ledger with one customer (known to Stripe) and its key: (url, engine, key)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    store.add_customer(engine, customer_id, "pro", stripe_customer(emulator, customer_id))
    _, key = store.create_key(engine, customer_id)
    return url, engine, key


@pytest.mark.drill  # 25 s: `make drills`
async def test_proxy_killed_mid_load_loses_and_doubles_no_meter_event(tmp_path, upstream, emulator):
    url, engine, key = ledger_with_customer(tmp_path, emulator, "crash")
    headers = {"Authorization": f"Bearer {key}"}
    env = stripe_env(emulator)
    emulator.delay(5)
    try:
        with run_proxy(tmp_path / "first", upstream.base_url, url, meterline_yaml=PRICED_YAML, env=env) as proxy:
            answered = 0

            async def one(client: httpx.AsyncClient, n: int) -> None:
                nonlocal answered
                body = {"model": "test-model", "messages": ask(f"[[p={n} c=2]]")}
                try:
                    response = await client.post("/v1/chat/completions", json=body, headers=headers)
                except httpx.HTTPError:
                    return  # cut off by the kill
                answered += response.status_code == 200
                if answered == 25:
                    proxy.process.send_signal(signal.SIGKILL)

            async with httpx.AsyncClient(base_url=proxy.base_url, timeout=30) as client:
                await asyncio.gather(*(one(client, n) for n in range(100, 160)))
            proxy.process.wait(10)
    finally:
        emulator.delay(0)
    assert len(list(store.ledger_rows(engine, "crash"))) >= 25
    with run_proxy(tmp_path / "second", upstream.base_url, url, meterline_yaml=PRICED_YAML, env=env):
        wait_for(lambda: drained(engine), what="the restarted proxy's relay to drain")
    assert_exactly_once(emulator, engine, ["crash"])
    engine.dispose()


async def test_v2_meter_event_stream_delivers_in_batches(tmp_path, upstream, emulator):
    import openai

    url, engine, key = ledger_with_customer(tmp_path, emulator, "streamer")
    sessions_before = emulator.calls().get("POST /v2/billing/meter_event_session", 0)
    with run_proxy(tmp_path / "proxy", upstream.base_url, url, meterline_yaml=PRICED_YAML,
                   env=stripe_env(emulator, METERLINE_STRIPE_STREAM="1")) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url + "/v1", api_key=key, max_retries=0, timeout=60)
        await asyncio.gather(*(
            client.chat.completions.create(model="test-model", messages=ask(f"[[p={n} c=3]]")) for n in range(30, 60)
        ))
        wait_for(lambda: drained(engine), what="the v2 stream to deliver")
    assert_exactly_once(emulator, engine, ["streamer"])
    sources = {event["source"] for event in emulator.meter_events() if event["identifier"] in delivered_ids(engine)}
    assert sources == {"v2"}
    assert emulator.calls()["POST /v2/billing/meter_event_session"] - sessions_before == 1
    engine.dispose()
