"""Usage reads at scale: one customer's `GET /customers/{id}/usage` and the fleet's `GET /customers`
against a ledger of millions of rows, on SQLite and on Postgres.

The data: --rows ledger rows over --customers customers, Zipf-skewed (rank k gets a share
proportional to 1/k^--zipf), spread over the last --days days, except the heaviest customer, whose
--heaviest-rows rows all fall in the current calendar month so far (so that one customer's period
holds at least that many). A handful of models, tens of actions and, per customer, members in
proportion to the square root of its rows (hundreds for the heaviest). Rows are generated with
numpy, in time order, and loaded with the raw driver (SQLite: executemany, journal off; Postgres:
COPY), the ledger's secondary index built after the load; then the usage rollups are built from
the ledger with the code an upgrade runs (`make_engine` after `rollups.forget_backfill`), timed.
The database is kept in --data and reused by later runs of the same shape in the same month (it is
regenerated when the month has turned: the heaviest customer's rows would no longer be in the
current period). Postgres runs from this machine's binaries, its cluster kept in --data too.

Served two ways, one after the other, each a subprocess on the same database:
  - the real LiteLLM proxy with meterline (as tests/support/proxy.py starts it), METERLINE_RELAY=0:
    client-side latency only;
  - a bare uvicorn app mounting `plugin.api.router` (the same route code) behind an ASGI
    middleware that times each request inside the server process: server-side latency as well.
Per server: an empty `GET /meterline/v1/health` (the floor: loopback, HTTP, a thread hop and a
`select 1`), the heaviest customer's usage, a random mix of customers' usage (uniform over the
fleet), and the fleet in one call (its first, cold call reported on its own: it reads the frozen
days and hours that later calls keep). Sequential requests on one keep-alive connection, after a
warm-up. p50/p99 are plain percentiles.

Run: .venv/bin/python bench/usage_query.py [--db sqlite|postgres|both] [--rows 10000000]
     [--customers 10000] [--data DIR] [--profile-fleet]
A first run at full scale generates for several minutes per database; later runs reuse the data.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert, text  # noqa: E402
from sqlalchemy.schema import CreateIndex  # noqa: E402

from plugin.ledger import rollups  # noqa: E402
from plugin.ledger.models import Customer, CustomerLimits, LedgerEntry  # noqa: E402
from plugin.ledger.store import make_engine  # noqa: E402
from plugin.rules.plans import calendar_month  # noqa: E402
from tests.support import postgres as pg  # noqa: E402
from tests.support.processes import free_port, stop_process, wait_answering  # noqa: E402
from tests.support.proxy import MASTER_KEY, METERLINE_YAML, run_proxy  # noqa: E402

PREFIX = "/meterline/v1"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
LEDGER_INDEX = "ix_ledger_customer_created"

MODELS = [("gpt-4o-mini", "openai", 0.35, 1), ("gpt-4o", "openai", 0.2, 15), ("claude-3-5-haiku", "anthropic", 0.15, 5),
          ("claude-sonnet-4", "anthropic", 0.12, 20), ("gemini-2.0-flash", "gemini", 0.12, 1),
          ("o3-mini", "openai", 0.06, 8)]
"""(name, provider, share of calls, credits multiplier)."""
ACTIONS = [f"{area}.{verb}" for area in ("chat", "search", "docs", "mail", "code", "support", "sales", "ops")
           for verb in ("summarize", "draft", "classify", "answer", "extract")]
"""40 action names."""

BENCH_YAML = METERLINE_YAML | {
    "plans": {
        "free": {"cap_credits": 100, "requests_per_minute": 60},
        "pro": {"included_credits": 10000, "base_fee_usd": "20", "overage_usd_per_credit": "0.002"},
        "enterprise": {"included_credits": 100000, "base_fee_usd": "500", "overage_usd_per_credit": "0.0015"},
    },
}


# ------------------------------------------------------------------------------ the data


class Shape:
    """What to generate, and the name its database is kept under."""

    def __init__(self, rows: int, customers: int, heaviest: int, days: int, zipf: float, seed: int) -> None:
        self.rows, self.customers, self.heaviest, self.days, self.zipf, self.seed = (
            rows, customers, heaviest, days, zipf, seed)

    @property
    def key(self) -> str:
        return f"r{self.rows}_c{self.customers}_h{self.heaviest}_d{self.days}_z{self.zipf:g}_s{self.seed}".replace(
            ".", "p")

    def as_dict(self) -> dict:
        return {"rows": self.rows, "customers": self.customers, "heaviest_rows": self.heaviest, "days": self.days,
                "zipf": self.zipf, "seed": self.seed}


def customer_ids(count: int) -> list[str]:
    return [f"cust-{n:05d}" for n in range(count)]


class Generated:
    """The ledger rows, column by column (numpy arrays in time order), and per customer what it got."""

    def __init__(self, shape: Shape, now: datetime) -> None:
        rng = np.random.default_rng(shape.seed)
        self.now = now
        ids = customer_ids(shape.customers)
        order = rng.permutation(shape.customers)  # rank -> customer index: the heaviest is not cust-00000
        self.ids = ids
        self.rank_ids = [ids[i] for i in order]
        others = shape.rows - shape.heaviest
        weights = 1.0 / np.arange(2, shape.customers + 1, dtype=np.float64) ** shape.zipf
        counts = np.maximum(1, np.floor(weights / weights.sum() * others)).astype(np.int64)
        counts[0] += others - counts.sum()  # the rounding's remainder to the second heaviest
        counts = np.concatenate([[shape.heaviest], counts])
        self.counts = dict(zip(self.rank_ids, counts.tolist(), strict=True))
        now_us = int(now.timestamp() * 1_000_000)
        end_us = now_us - 60_000_000  # nothing in the last minute
        period_us = int(calendar_month(now).start.timestamp() * 1_000_000)
        window_us = now_us - shape.days * 86_400_000_000
        model_p = np.array([model[2] for model in MODELS], dtype=np.float64)
        model_p /= model_p.sum()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in ("customer", "at", "member", "action", "model")}
        self.members: dict[str, int] = {}
        self.actions: dict[str, int] = {}
        for rank, (customer, count) in enumerate(zip(self.rank_ids, counts.tolist(), strict=True)):
            start = period_us if rank == 0 else window_us
            members = int(min(1000, max(1, round(math.sqrt(count) / 2))))
            actions = int(min(len(ACTIONS), max(1, round(2 * math.log2(count + 1)))))
            self.members[customer], self.actions[customer] = members, actions
            parts["customer"].append(np.full(count, order[rank], dtype=np.int32))
            parts["at"].append(rng.integers(start, end_us, size=count, dtype=np.int64))
            parts["member"].append(_zipf_pick(rng, members, count).astype(np.int16))
            chosen = rng.choice(len(ACTIONS), size=actions, replace=False)
            parts["action"].append(chosen[_zipf_pick(rng, actions, count)].astype(np.int8))
            parts["model"].append(rng.choice(len(MODELS), size=count, p=model_p).astype(np.int8))
        columns = {name: np.concatenate(arrays) for name, arrays in parts.items()}
        time_order = np.argsort(columns["at"], kind="stable")
        self.columns = {name: array[time_order] for name, array in columns.items()}
        rows = len(time_order)
        prompt = np.minimum(rng.lognormal(6.5, 1.0, rows), 120_000).astype(np.int64)
        completion = np.minimum(rng.lognormal(5.0, 1.0, rows), 16_000).astype(np.int64)
        cached = np.where(rng.random(rows) < 0.3, prompt // 2, 0)
        reasoning = np.where(self.columns["model"] == len(MODELS) - 1, completion * 2, 0)
        multiplier = np.array([model[3] for model in MODELS], dtype=np.int64)[self.columns["model"]]
        # µcr: 1 credit = 1,000 weighted tokens (input 1, cached input 0.1, output 4), times a model factor
        credits = ((prompt - cached) * 1000 + cached * 100 + completion * 4000) * multiplier
        cache_hit = rng.random(rows) < 0.02
        self.columns |= {
            "prompt": prompt, "completion": completion, "cached": cached, "reasoning": reasoning,
            "credits": np.where(cache_hit, 0, credits), "saved": np.where(cache_hit, credits, 0),
            "cost": credits // 800, "cache_hit": cache_hit, "stream": rng.random(rows) < 0.3,
        }
        self.rows = rows
        self.in_period = int((self.columns["at"] >= period_us).sum())
        self.heaviest_in_period = int(((self.columns["at"] >= period_us)
                                       & (self.columns["customer"] == order[0])).sum())

    def batches(self, size: int, dialect: str) -> Iterator[list[tuple] | str]:
        """Rows in time order, `size` at a time: tuples for sqlite3, COPY text for Postgres."""
        c = self.columns
        member_names = [f"user{m}@example.com" for m in range(1000)]
        model_names = [model[0] for model in MODELS]
        providers = [model[1] for model in MODELS]
        for start in range(0, self.rows, size):
            stop = min(start + size, self.rows)
            at = np.datetime_as_string(c["at"][start:stop].astype("datetime64[us]"), unit="us")
            view = at.view(np.uint32).reshape(len(at), -1)
            view[:, 10] = ord(" ")  # 2026-12-01 10:11:12.123456: SQLAlchemy's SQLite format
            at = at.tolist()
            ids = [f"req_{n:016x}" for n in range(start, stop)]
            customers = [self.ids[i] for i in c["customer"][start:stop].tolist()]
            members = [member_names[m] for m in c["member"][start:stop].tolist()]
            actions = [ACTIONS[a] for a in c["action"][start:stop].tolist()]
            models = c["model"][start:stop].tolist()
            numbers = [c[name][start:stop].tolist() for name in
                       ("prompt", "completion", "cached", "reasoning", "credits", "cost")]
            saved = c["saved"][start:stop].tolist()
            hits, streams = c["cache_hit"][start:stop].tolist(), c["stream"][start:stop].tolist()
            if dialect == "sqlite":
                yield list(zip(ids, customers, members, actions, [model_names[m] for m in models],
                               [providers[m] for m in models], *numbers[:6], [int(h) for h in hits],
                               saved, [int(s) for s in streams], ["provider"] * len(ids), at, strict=True))
            else:
                yield "".join(
                    f"{i}\t{cu}\t{me}\t{ac}\t{model_names[mo]}\t{providers[mo]}\t{p}\t{co}\t{ca}\t{r}\t{cr}\t{cost}\t"
                    f"{'t' if h else 'f'}\t{sa}\t{'t' if s else 'f'}\tprovider\t{a}+00\n"
                    for i, cu, me, ac, mo, p, co, ca, r, cr, cost, h, sa, s, a in zip(
                        ids, customers, members, actions, models, *numbers, hits, saved, streams, at, strict=True))


def _zipf_pick(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """`size` picks of 0..n-1, pick k with probability proportional to 1/(k+1)."""
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64)
    return rng.choice(n, size=size, p=p / p.sum())


LEDGER_COLUMNS = ("id", "customer_id", "member", "action", "model", "provider", "prompt_tokens", "completion_tokens",
                  "cached_tokens", "reasoning_tokens", "credits_ucr", "provider_cost_uusd", "cache_hit", "saved_ucr",
                  "stream", "usage_source", "created_at")


def ledger_index_ddl(dialect) -> str:
    index = next(index for index in LedgerEntry.__table__.indexes if index.name == LEDGER_INDEX)
    return str(CreateIndex(index).compile(dialect=dialect))


def insert_customers(engine, generated: Generated, rng: random.Random) -> dict[str, int]:
    """Every customer (plans by size) and, for one in ten, limits; in big batches (store.add_customer is
    one transaction each). Returns how many are on each plan."""
    created = generated.now - timedelta(days=400)
    rank = {customer: n for n, customer in enumerate(generated.rank_ids)}
    plans: dict[str, int] = {}
    customers, limits = [], []
    for customer in generated.ids:
        plan = "enterprise" if rank[customer] < 100 else ("free" if rng.random() < 0.25 else "pro")
        plans[plan] = plans.get(plan, 0) + 1
        customers.append({"id": customer, "plan": plan, "stripe_customer_id": None, "created_at": created,
                          "period_anchor": None, "terms": None})
        if plan != "free" and rng.random() < 0.1:
            limits.append({"customer_id": customer, "soft_thresholds_pct": "[50, 80, 100]",
                           "hard_limit_ucr": None, "hard_limit_usd": "5000", "block_overage": rng.random() < 0.5,
                           "notify_email": None, "notify_webhook_url": None, "updated_at": generated.now,
                           "updated_by": "bench"})
    with engine.begin() as connection:
        for start in range(0, len(customers), 5000):
            connection.execute(insert(Customer.__table__), customers[start:start + 5000])
        if limits:
            connection.execute(insert(CustomerLimits.__table__), limits)
    return plans


# ------------------------------------------------------------------------------ the databases


def sqlite_paths(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def load_sqlite(path: Path, generated: Generated, batch: int) -> dict:
    for stale in sqlite_paths(path):
        stale.unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    engine = make_engine(url)  # the tables, as meterline makes them (and an empty rollup backfill)
    engine.dispose()
    timings = {}
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-1000000")
        connection.execute(f"DROP INDEX {LEDGER_INDEX}")
        # a ledger from before the rollups: no rollup trigger while loading (the next start makes it again
        # and backfills, as an upgrade does)
        connection.execute("DROP TRIGGER IF EXISTS meterline_ledger_rollups")
        started = time.perf_counter()
        sql = f"INSERT INTO ledger ({', '.join(LEDGER_COLUMNS)}) VALUES ({', '.join('?' * len(LEDGER_COLUMNS))})"
        for n, rows in enumerate(generated.batches(batch, "sqlite")):
            connection.execute("BEGIN")
            connection.executemany(sql, rows)
            connection.execute("COMMIT")
            if n % 10 == 9:
                print(f"  sqlite: {(n + 1) * batch:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
        timings["load_s"] = time.perf_counter() - started
        started = time.perf_counter()
        connection.execute(ledger_index_ddl(_dialect("sqlite")))
        timings["ledger_index_s"] = time.perf_counter() - started
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()
    return timings


def _dialect(name: str):
    if name == "sqlite":
        from sqlalchemy.dialects import sqlite
        return sqlite.dialect()
    from sqlalchemy.dialects import postgresql
    return postgresql.dialect()


def load_postgres(url: str, generated: Generated, batch: int) -> dict:
    import psycopg

    engine = make_engine(url)
    engine.dispose()
    timings = {}
    with psycopg.connect(conninfo(url), autocommit=True) as connection:
        connection.execute(f"DROP INDEX {LEDGER_INDEX}")
        started = time.perf_counter()
        copy_sql = f"COPY ledger ({', '.join(LEDGER_COLUMNS)}) FROM STDIN"
        for n, block in enumerate(generated.batches(batch, "postgresql")):
            with connection.transaction(), connection.cursor() as cursor, cursor.copy(copy_sql) as copy:
                copy.write(block)
            if n % 10 == 9:
                print(f"  postgres: {(n + 1) * batch:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
        timings["load_s"] = time.perf_counter() - started
        started = time.perf_counter()
        connection.execute(ledger_index_ddl(_dialect("postgresql")))
        timings["ledger_index_s"] = time.perf_counter() - started
    return timings


def conninfo(url: str) -> str:
    """psycopg's connection string for one of our SQLAlchemy URLs (postgresql+psycopg://user@host:port/db)."""
    rest = url.split("://", 1)[1]
    user, rest = rest.split("@", 1)
    hostport, db = rest.split("/", 1)
    host, port = hostport.split(":")
    return f"host={host} port={port} user={user} dbname={db}"


def build(url: str, dialect: str, shape: Shape, sqlite_path: Path | None, batch: int) -> dict:
    """Generate, load, add customers, backfill the rollups (timed, as an upgrade runs it). Returns the facts."""
    now = datetime.now(UTC)
    started = time.perf_counter()
    generated = Generated(shape, now)
    facts: dict = {"generated_at": now.isoformat(), "generate_s": time.perf_counter() - started}
    print(f"  generated {generated.rows:,} rows in {facts['generate_s']:.0f} s", flush=True)
    if dialect == "sqlite":
        facts |= load_sqlite(sqlite_path, generated, batch)
    else:
        facts |= load_postgres(url, generated, batch)
    print(f"  loaded in {facts['load_s']:.0f} s, ledger index in {facts['ledger_index_s']:.0f} s", flush=True)
    engine = make_engine(url)
    try:
        facts["plans"] = insert_customers(engine, generated, random.Random(shape.seed))
        rollups.forget_backfill(engine)
    finally:
        engine.dispose()
    started = time.perf_counter()
    engine = make_engine(url)  # what the first start after an upgrade runs: the backfill
    facts["backfill_s"] = time.perf_counter() - started
    print(f"  rollups backfilled in {facts['backfill_s']:.0f} s", flush=True)
    try:
        if dialect == "postgresql":  # what autovacuum would do on its own soon after; here at once, for every run alike
            started = time.perf_counter()
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text("VACUUM ANALYZE"))
            facts["vacuum_analyze_s"] = time.perf_counter() - started
        with engine.connect() as connection:
            facts["usage_hours_rows"] = connection.execute(text("SELECT count(*) FROM usage_hours")).scalar()
            facts["usage_days_rows"] = connection.execute(text("SELECT count(*) FROM usage_days")).scalar()
    finally:
        engine.dispose()
    heaviest = generated.rank_ids[0]
    members = sorted(generated.members.values())
    facts |= {
        "rows": generated.rows, "customers": len(generated.ids), "heaviest": heaviest,
        "heaviest_rows_in_period": generated.heaviest_in_period, "rows_in_period": generated.in_period,
        "second_heaviest_rows": generated.counts[generated.rank_ids[1]],
        "median_customer_rows": int(np.median(list(generated.counts.values()))),
        "customers_with_100_rows_or_fewer": sum(1 for n in generated.counts.values() if n <= 100),
        "heaviest_members": generated.members[heaviest], "heaviest_actions": generated.actions[heaviest],
        "max_members": members[-1], "median_members": members[len(members) // 2],
        "customers_with_100_members_or_more": sum(1 for m in members if m >= 100),
        "models": len(MODELS), "actions": len(ACTIONS), "period_start": calendar_month(now).start.isoformat(),
    }
    return facts


def sqlite_size(path: Path) -> dict:
    """The files' sizes (WAL included), and each table's and index's pages (when SQLite has dbstat)."""
    sizes = {p.name: p.stat().st_size for p in sqlite_paths(path) if p.exists()}
    found = {"total_bytes": sum(sizes.values()), "files": sizes}
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        found["objects"] = dict(connection.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name "
                                                   "ORDER BY 2 DESC LIMIT 12").fetchall())
    except sqlite3.Error:
        pass  # built without dbstat
    finally:
        connection.close()
    return found


def postgres_size(url: str) -> dict:
    import psycopg

    with psycopg.connect(conninfo(url)) as connection:
        total = connection.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        tables = dict(connection.execute(
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname IN "
            "('ledger', 'usage_hours', 'usage_days', 'customers')").fetchall())
    return {"total_bytes": total, "tables": tables}


@contextlib.contextmanager
def kept_postgres(cluster: Path) -> Iterator[str]:
    """A PostgreSQL server on this machine's binaries whose cluster stays in `cluster` between runs
    (tests/support/postgres.py's throwaway one removes its files). Yields the URL of the server's
    `postgres` database; stopped when the block ends."""
    initdb, pg_ctl = pg._binary("initdb"), pg._binary("pg_ctl")
    data = cluster / "data"
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(cluster, ignore_errors=True)
        data.mkdir(parents=True, mode=0o700)
        cluster.chmod(0o755)
        if pg._as_root():
            import pwd
            user = pwd.getpwnam(pg._PG_SYSTEM_USER)
            for path in (cluster, data):
                os.chown(path, user.pw_uid, user.pw_gid)
        init = pg._run([initdb, "-D", str(data), "-A", "trust", "-U", pg.DB_USER, "--no-sync", "-E", "UTF8",
                        "--locale=C"], cwd=cluster, timeout=120)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
    port = free_port()
    log = data / "server.log"
    # The throwaway server's settings (no fsync: these are reads), and room for the bulk load's WAL.
    options = f"{pg._SERVER_OPTS} -c max_wal_size=8GB -p {port} -k {data}"
    start = pg._run([pg_ctl, "-w", "-t", "60", "-D", str(data), "-l", str(log), "-o", options, "start"],
                    cwd=cluster, timeout=90)
    try:
        if start.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({start.returncode}): {start.stderr.strip()}\n{pg._tail(log)}")
        yield f"postgresql+psycopg://{pg.DB_USER}@127.0.0.1:{port}/postgres"
    finally:
        pg._stop(pg_ctl, data, cluster)


def postgres_database(server_url: str, name: str, fresh: bool) -> str:
    import psycopg
    from psycopg import sql

    with psycopg.connect(conninfo(server_url), autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and fresh:
            connection.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        if not exists or fresh:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server_url.rsplit("/", 1)[0] + "/" + name


def prepared(data_dir: Path, dialect: str, shape: Shape, url: str, sqlite_path: Path | None, regenerate: bool,
             batch: int) -> dict:
    """The facts of a database of this shape: the kept one when it is complete and of this month, else a new one."""
    meta_path = data_dir / f"{dialect}-{shape.key}.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if meta is not None and not regenerate:
        if meta["period_start"] == calendar_month(datetime.now(UTC)).start.isoformat():
            print(f"{dialect}: reusing the database generated at {meta['generated_at']} ({meta_path})", flush=True)
            return meta
        print(f"{dialect}: the kept database is of another month: regenerating", flush=True)
    meta_path.unlink(missing_ok=True)
    print(f"{dialect}: generating {shape.rows:,} rows over {shape.customers:,} customers", flush=True)
    facts = build(url, dialect, shape, sqlite_path, batch) | {"shape": shape.as_dict()}
    meta_path.write_text(json.dumps(facts, indent=2))
    return facts


# ------------------------------------------------------------------------------ serving


def serve_app(port: int) -> None:
    """The bare variant (run in a subprocess): plugin.api.router on uvicorn, with each request's time in
    this process recorded by an ASGI middleware and answered (then forgotten) at GET /_bench/timings."""
    import uvicorn
    from fastapi import FastAPI

    from plugin import runtime
    from plugin.api import router

    seen: list[tuple[str, float]] = []

    class Timed:
        def __init__(self, app) -> None:
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            if scope["path"] == "/_bench/timings":
                body = json.dumps(seen).encode()
                seen.clear()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
            started = time.perf_counter()

            async def timed_send(message) -> None:
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    seen.append((scope["path"], time.perf_counter() - started))

            await self.app(scope, receive, timed_send)

    app = FastAPI()
    app.include_router(router)
    runtime.current().start()
    try:
        uvicorn.run(Timed(app), host="127.0.0.1", port=port, log_level="warning")
    finally:
        runtime.current().close()


@contextlib.contextmanager
def running_app(workdir: Path, url: str) -> Iterator[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "meterline.yaml").write_text(yaml.safe_dump(BENCH_YAML))
    port = free_port()
    env = dict(os.environ) | {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": MASTER_KEY, "METERLINE_DATABASE_URL": url,
        "METERLINE_CONFIG": str(workdir / "meterline.yaml"), "METERLINE_RELAY": "0"}
    with open(workdir / "app.log", "wb") as log:
        process = subprocess.Popen([sys.executable, __file__, "--serve-app", str(port)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_answering(process, base + PREFIX + "/health", "the uvicorn app", timeout=120)
        yield base
    finally:
        stop_process(process)


@contextlib.contextmanager
def running_proxy(workdir: Path, url: str) -> Iterator[str]:
    # No model is called: the upstream URL only fills the config's model list.
    with run_proxy(workdir, "http://127.0.0.1:9/v1", url, meterline_yaml=BENCH_YAML, timeout=240,
                   env={"METERLINE_RELAY": "0"}) as proxy:
        yield proxy.base_url


# ------------------------------------------------------------------------------ measuring


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def timed_get(client: httpx.Client, path: str, headers: dict | None = None) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.get(path, headers=headers)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
    return seconds, response


def server_times(client: httpx.Client, server_side: bool) -> list[float] | None:
    if not server_side:
        return None
    return [seconds for _path, seconds in client.get("/_bench/timings").json()]


def phase(client: httpx.Client, name: str, paths: list[str], warm: list[str], server_side: bool,
          check=None, headers: dict | None = None) -> dict:
    for path in warm:
        timed_get(client, path, headers)
    server_times(client, server_side)  # forget the warm-up's
    client_s, last = [], None
    for path in paths:
        seconds, last = timed_get(client, path, headers)
        client_s.append(seconds)
    result = {"name": name, "n": len(client_s), "client_ms": ms_stats(client_s), "bytes": len(last.content),
              "content_encoding": last.headers.get("content-encoding", "none")}
    server = server_times(client, server_side)
    if server is not None:
        result["server_ms"] = ms_stats(server)
    if check is not None:
        result |= check(last)
    print(format_result(result), flush=True)
    return result


def ms_stats(seconds: list[float]) -> dict:
    return {"p50": percentile(seconds, 50) * 1000, "p99": percentile(seconds, 99) * 1000,
            "max": max(seconds) * 1000, "n": len(seconds)}


def format_result(result: dict) -> str:
    line = (f"  {result['name']:<34} n={result['n']:<4} client p50 {result['client_ms']['p50']:8.2f} ms  "
            f"p99 {result['client_ms']['p99']:8.2f} ms")
    if "server_ms" in result:
        line += f"   server p50 {result['server_ms']['p50']:8.2f} ms  p99 {result['server_ms']['p99']:8.2f} ms"
    extra = {key: value for key, value in result.items()
             if key not in ("name", "n", "client_ms", "server_ms", "bytes", "content_encoding")}
    encoding = result.get("content_encoding", "none")
    return line + f"   {result['bytes']:,} bytes" + (f" ({encoding} on the wire)" if encoding != "none" else "") + (
        f"   {extra}" if extra else "")


def measure(base: str, facts: dict, args, server_side: bool) -> list[dict]:
    rng = random.Random(args.seed + 1)
    ids = customer_ids(facts["customers"])
    heaviest = facts["heaviest"]
    usage = PREFIX + "/customers/{}/usage"
    results = []
    with httpx.Client(base_url=base, headers=AUTH, timeout=120) as client:
        server_times(client, server_side)  # forget the readiness probes'
        # The first fleet call builds what later calls keep (fleet_usage's frozen days and hours): timed alone.
        seconds, response = timed_get(client, PREFIX + "/customers")
        cold = {"name": "fleet, first call (cold)", "n": 1, "client_ms": ms_stats([seconds]),
                "bytes": len(response.content)}
        server = server_times(client, server_side)
        if server is not None:
            cold["server_ms"] = ms_stats(server)
        print(format_result(cold), flush=True)
        fleet_rows = len(response.json()["customers"])
        results.append(cold | {"customers_answered": fleet_rows})
        results.append(phase(client, "health (floor)", [PREFIX + "/health"] * args.requests,
                             [PREFIX + "/health"] * 20, server_side))

        def heaviest_check(response: httpx.Response) -> dict:
            body = response.json()
            return {"requests_in_period": body["requests"], "daily_days": len(body["daily"]),
                    "members": len(body["by_member"]), "actions": len(body["by_action"])}

        results.append(phase(client, "usage, heaviest customer", [usage.format(heaviest)] * args.requests,
                             [usage.format(heaviest)] * 20, server_side, heaviest_check))
        mix = [usage.format(rng.choice(ids)) for _ in range(args.requests)]
        warm = [usage.format(rng.choice(ids)) for _ in range(20)]
        results.append(phase(client, "usage, random mix of customers", mix, warm, server_side))
        # httpx asks for gzip, as the console's client does; "identity" measures the answer's making alone
        for encoding in ("gzip", "identity"):
            results.append(phase(client, f"fleet, {fleet_rows:,} per call (warm, {encoding})",
                                 [PREFIX + "/customers"] * args.fleet_requests, [PREFIX + "/customers"] * 5,
                                 server_side, lambda r: {"customers_answered": len(r.json()["customers"])},
                                 headers={"Accept-Encoding": encoding}))
    return results


@contextlib.contextmanager
def meterline_env(workdir: Path, url: str) -> Iterator[None]:
    """This process's environment as the servers get it, for in-process measurements."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "meterline.yaml").write_text(yaml.safe_dump(BENCH_YAML))
    names = {"LITELLM_MASTER_KEY": MASTER_KEY, "METERLINE_DATABASE_URL": url,
             "METERLINE_CONFIG": str(workdir / "meterline.yaml"), "METERLINE_RELAY": "0"}
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        from plugin import runtime
        runtime.reset_for_tests()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def in_process(workdir: Path, url: str, facts: dict, profile: bool, repeats: int) -> dict:
    """In this process, no HTTP: the fleet call's time (cold, then warm), an anchored period's usage for the
    heaviest customer (an edge read from the ledger itself), and with `profile`, cProfile of the fleet."""
    from plugin import runtime
    from plugin.services.fleet import fleet_json

    found: dict = {}
    with meterline_env(workdir, url):
        meterline = runtime.current()
        started = time.perf_counter()
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        fleet_json(meterline, meterline.clock())
        if profiler:
            profiler.disable()
            found["profile_cold"] = profile_text(profiler)
        found["fleet_cold_ms"] = (time.perf_counter() - started) * 1000
        warm = []
        profiler = cProfile.Profile() if profile else None
        for _ in range(repeats):
            started = time.perf_counter()
            if profiler:
                profiler.enable()
            fleet_json(meterline, meterline.clock())
            if profiler:
                profiler.disable()
            warm.append(time.perf_counter() - started)
        found["fleet_warm_ms"] = ms_stats(warm)
        if profiler:
            found["profile_warm"] = profile_text(profiler)
            found["fleet_warm_profiled_note"] = "warm times measured with the profiler on"
        # An anchored period (a subscription that started at noon): its first, partial day is read from the
        # ledger rows themselves. For the heaviest customer, half a day of its rows.
        period = calendar_month(meterline.clock())
        start = period.start + timedelta(hours=12)
        anchored = []
        for _ in range(10):
            started = time.perf_counter()
            rollups.breakdown(meterline.engine, facts["heaviest"], start, start + timedelta(days=31))
            anchored.append(time.perf_counter() - started)
        found["anchored_breakdown_heaviest_ms"] = ms_stats(anchored)
        started = time.perf_counter()
        rollups.breakdown(meterline.engine, facts["heaviest"], period.start, period.end)
        found["calendar_breakdown_heaviest_ms"] = (time.perf_counter() - started) * 1000
    return found


def profile_text(profiler: cProfile.Profile, lines: int = 30) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)
    return out.getvalue()


# ------------------------------------------------------------------------------ the run


def run_one(dialect: str, args, shape: Shape, data_dir: Path, workdir: Path, url: str,
            sqlite_path: Path | None) -> dict:
    facts = prepared(data_dir, dialect, shape, url, sqlite_path, args.regenerate, args.batch)
    result = {"dialect": dialect, "facts": facts, "servers": {}, "measured_at": datetime.now(UTC).isoformat(),
              "commit": code_commit()}
    for server in args.servers:
        started = time.perf_counter()
        runner = running_proxy(workdir / f"{dialect}-proxy", url) if server == "proxy" else \
            running_app(workdir / f"{dialect}-app", url)
        with runner as base:
            print(f"{dialect}, {server}: ready in {time.perf_counter() - started:.1f} s", flush=True)
            result["servers"][server] = {"ready_s": time.perf_counter() - started,
                                         "phases": measure(base, facts, args, server == "app")}
    if args.in_process or args.profile_fleet:
        result["in_process"] = in_process(workdir / f"{dialect}-inproc", url, facts, args.profile_fleet,
                                          args.fleet_requests if not args.profile_fleet else 10)
        found = result["in_process"]
        print(f"  in process: fleet cold {found['fleet_cold_ms']:.0f} ms, warm p50 "
              f"{found['fleet_warm_ms']['p50']:.1f} ms p99 {found['fleet_warm_ms']['p99']:.1f} ms; heaviest's usage "
              f"breakdown, calendar month {found['calendar_breakdown_heaviest_ms']:.1f} ms, anchored at noon p50 "
              f"{found['anchored_breakdown_heaviest_ms']['p50']:.1f} ms", flush=True)
        if args.profile_fleet:
            print(found["profile_cold"])
            print(found["profile_warm"])
    result["size"] = sqlite_size(sqlite_path) if dialect == "sqlite" else postgres_size(url)
    return result


def code_commit() -> str | None:
    """The commit the working tree is on (read only; the tree may hold uncommitted changes too)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def report(results: list[dict]) -> None:
    print("\n| database | server | measure | n | client p50 ms | client p99 ms | server p50 ms | server p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        for server, found in result["servers"].items():
            for ph in found["phases"]:
                s = ph.get("server_ms")
                server_cells = ("", "") if s is None else (f"{s['p50']:.2f}", f"{s['p99']:.2f}")
                print(f"| {result['dialect']} | {server} | {ph['name']} | {ph['n']} | {ph['client_ms']['p50']:.2f} | "
                      f"{ph['client_ms']['p99']:.2f} | {server_cells[0]} | {server_cells[1]} |")
    for result in results:
        facts = result["facts"]
        print(f"\n{result['dialect']}: {facts['rows']:,} rows, {facts['customers']:,} customers; heaviest "
              f"{facts['heaviest']} with {facts['heaviest_rows_in_period']:,} rows in the period from "
              f"{facts['period_start']} ({facts['heaviest_members']} members, {facts['heaviest_actions']} actions); "
              f"backfill {facts['backfill_s']:.1f} s (load {facts['load_s']:.0f} s, ledger index "
              f"{facts['ledger_index_s']:.0f} s); usage_hours {facts['usage_hours_rows']:,} rows, usage_days "
              f"{facts['usage_days_rows']:,} rows; size {result['size']['total_bytes'] / 1e9:.2f} GB {result['size']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--heaviest-rows", type=int, default=None,
                        help="the heaviest customer's rows, all in the current month (default 6%% of --rows)")
    parser.add_argument("--days", type=int, default=45, help="days of history the other customers' rows span")
    parser.add_argument("--zipf", type=float, default=1.0, help="customer k's share is proportional to 1/k^zipf")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "meterline-bench-usage",
                        help="where generated databases are kept and reused")
    parser.add_argument("--regenerate", action="store_true", help="generate even when a kept database fits")
    parser.add_argument("--batch", type=int, default=100_000, help="rows per load batch")
    parser.add_argument("--requests", type=int, default=300, help="requests per measured usage endpoint")
    parser.add_argument("--fleet-requests", type=int, default=100, help="measured fleet calls per server")
    parser.add_argument("--servers", nargs="+", choices=("proxy", "app"), default=["proxy", "app"])
    parser.add_argument("--in-process", action="store_true",
                        help="also time the fleet and an anchored period's breakdown in this process")
    parser.add_argument("--profile-fleet", action="store_true",
                        help="cProfile the fleet call in this process (cold and warm), printed")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--serve-app", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    if args.serve_app is not None:
        serve_app(args.serve_app)
        return 0
    heaviest = args.heaviest_rows if args.heaviest_rows is not None else round(args.rows * 0.06)
    shape = Shape(args.rows, args.customers, heaviest, args.days, args.zipf, args.seed)
    args.data.mkdir(parents=True, exist_ok=True)
    args.data.chmod(0o755)  # the Postgres cluster inside runs as the postgres user when we are root
    results = []
    with tempfile.TemporaryDirectory(prefix="meterline-bench-usage-") as tmp:
        workdir = Path(tmp)
        if args.db in ("sqlite", "both"):
            path = args.data / f"sqlite-{shape.key}.db"
            results.append(run_one("sqlite", args, shape, args.data, workdir, f"sqlite:///{path}", path))
        if args.db in ("postgres", "both"):
            with kept_postgres(args.data / "postgres") as server_url:
                name = f"bench_{shape.key}"
                meta = args.data / f"postgresql-{shape.key}.json"
                fresh = args.regenerate or not meta.exists() or json.loads(meta.read_text())["period_start"] != \
                    calendar_month(datetime.now(UTC)).start.isoformat()
                url = postgres_database(server_url, name, fresh)
                results.append(run_one("postgresql", args, shape, args.data, workdir, url, None))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
