"""Shared fixtures: the fake upstream, a real LiteLLM proxy with meterline, customers and keys."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before anything imports litellm: no network

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest

from plugin.counters.redis import RedisCounterStore
from plugin.counters.sql import SqlCounterStore
from plugin.ledger import store
from plugin.ledger.store import make_engine
from tests.support.postgres import (
    empty_all_tables,
    postgres_available,
    running_postgres,
)
from tests.support.proxy import MASTER_KEY, Proxy, run_proxy
from tests.support.redis_server import running_redis
from tests.support.stripe_emulator import (
    StripeEmulator,
    WebhookReceiver,
    receiving,
    run_stripe_emulator,
)
from tests.support.upstream import Upstream, run_upstream


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    with run_upstream() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory) -> Iterator[str]:
    if not postgres_available():
        pytest.fail("PostgreSQL binaries (initdb, pg_ctl) are missing: `make test` expects them on this machine")
    with running_postgres(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    """An empty ledger database: a fresh SQLite file, or the session's PostgreSQL emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    empty_all_tables(engine)
    engine.dispose()
    return url


@dataclass
class Tenant:
    customer_id: str
    key: str
    client: openai.OpenAI
    async_client: openai.AsyncOpenAI


@dataclass
class MeteredProxy:
    proxy: Proxy
    engine: object
    redis_url: str | None = None

    def counters(self):
        """The counter store this proxy uses, for looking at it from the test."""
        if self.redis_url:
            return RedisCounterStore.from_url(
                self.redis_url, partial(store.billed_between, self.engine))
        return SqlCounterStore(self.engine)

    def api(self, key: str = MASTER_KEY, **headers: str) -> httpx.Client:
        """An HTTP client for meterline's own API, as the holder of `key`."""
        return httpx.Client(base_url=self.proxy.base_url + "/meterline/v1", timeout=30,
                            headers={"Authorization": f"Bearer {key}", **headers})

    def tenant(self, customer_id: str, plan: str = "pro") -> Tenant:
        if store.get_customer(self.engine, customer_id) is None:
            store.add_customer(self.engine, customer_id, plan)
        _, key = store.create_key(self.engine, customer_id)
        return Tenant(customer_id, key, self.client(key), self.async_client(key))

    def client(self, key: str, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.proxy.base_url + "/v1", api_key=key, max_retries=0, timeout=60, **kwargs)

    def async_client(self, key: str, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.proxy.base_url + "/v1", api_key=key, max_retries=0, timeout=60, **kwargs)

    def master_client(self, **kwargs) -> openai.OpenAI:
        return self.client(MASTER_KEY, **kwargs)

    def ledger(self, customer_id: str | None = None) -> list:
        return list(store.ledger_rows(self.engine, customer_id))


def _metered_proxy(workdir: Path, upstream: Upstream, database_url: str,
                   env: dict[str, str] | None = None, meterline_yaml: dict | None = None) -> Iterator[MeteredProxy]:
    engine = make_engine(database_url)
    with run_proxy(workdir, upstream.base_url, database_url, env=env, meterline_yaml=meterline_yaml) as proxy:
        yield MeteredProxy(proxy=proxy, engine=engine, redis_url=(env or {}).get("METERLINE_REDIS_URL"))
    engine.dispose()


@pytest.fixture(scope="session")
def metered(tmp_path_factory, upstream) -> Iterator[MeteredProxy]:
    """A real proxy with meterline on SQLite, shared by the end-to-end tests."""
    workdir = tmp_path_factory.mktemp("proxy")
    yield from _metered_proxy(workdir, upstream, f"sqlite:///{workdir / 'ledger.db'}")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the session (fakeredis is not used for anything Redis does here)."""
    with running_redis() as url:
        yield url


@pytest.fixture(scope="session")
def metered_redis(tmp_path_factory, upstream, redis_url) -> Iterator[MeteredProxy]:
    """The proxy with its spending counters in Redis (ledger on SQLite)."""
    workdir = tmp_path_factory.mktemp("proxy-redis")
    yield from _metered_proxy(workdir, upstream, f"sqlite:///{workdir / 'ledger.db'}",
                              env={"METERLINE_REDIS_URL": redis_url})


@pytest.fixture(scope="session")
def metered_pg(tmp_path_factory, upstream, postgres_url) -> Iterator[MeteredProxy]:
    """The same proxy with its ledger on PostgreSQL."""
    yield from _metered_proxy(tmp_path_factory.mktemp("proxy-pg"), upstream, postgres_url)


@pytest.fixture(scope="module")
def receiver(request) -> Iterator[WebhookReceiver]:
    """Receives the module's Stripe emulator's webhooks, signed with the module's WEBHOOK_SECRET."""
    with receiving(WebhookReceiver(request.module.WEBHOOK_SECRET)) as running:
        yield running


@pytest.fixture(scope="module")
def running(request, receiver) -> Iterator[StripeEmulator]:
    """One Stripe emulator per module, sending its webhooks to `receiver`."""
    with run_stripe_emulator(webhook_url=receiver.url, webhook_secret=request.module.WEBHOOK_SECRET) as emulator:
        yield emulator


@pytest.fixture
def emulator(running, receiver) -> StripeEmulator:
    """The module's emulator, emptied, and nothing received yet (a module may define its own `emulator`)."""
    running.reset()
    receiver.received.clear()
    return running
