"""Reconciliation at fleet scale: one full `reconcile()` run (plugin/services/reconcile.py, the code behind
`meterline reconcile`, `POST /reconciliation` and the proxy's timer) over N customers against the Stripe
emulator, timed, with the Stripe calls it made and what they would cost at Stripe's live rate limit.

Per N (--customers, e.g. 1000,3000,10000), from scratch:
  - a fresh Stripe emulator (`meterline stripe-emulator`, its own process) with the meter, product and
    prices of `meterline stripe setup` (`StripeSetup`), and N Stripe customers made through the SDK
    (`v1.customers.create`, --create-threads at a time; timed: it is what linking N customers costs);
  - a SQLite ledger in a temporary directory: N meterline customers on plan `pro`, each linked to its Stripe
    customer (`store.add_customer`), and --events ledger rows each (`store.write_records`, ledger + outbox),
    at random instants between the start of the calendar month (UTC, the period) and 10 minutes ago;
  - the events sent to the emulator through the v2 meter event stream (batches of 100, identifier = the
    ledger id, as the relay sends them), without the relay, and their outbox rows marked delivered with one
    UPDATE; the emulator's log is checked to hold every one of them, none refused;
  - --runs timed runs of `reconcile(meterline, now)` (wall time, this process's CPU, the emulator process's
    CPU from /proc, the emulator's own call counters); each run must find every customer `ok` with a
    divergence of 0 and Stripe's total equal to the ledger's, or the benchmark fails;
  - at --profile-at customers, one more run under cProfile (cumulative time, top functions, and the time in
    HTTP, in SQL and in the SDK's request/response handling).
At the smallest N, one more timed run with `now` set 30 minutes before the period's end (skipped with
--no-month-end): the calls per customer on the last day of a month, when the hourly summaries of ~740 hours
take several pages of 100.

The cost at Stripe: calls / rate limit seconds, at 100 read requests/s (Stripe's documented live-mode
limit for reads, account-wide) and at 25 requests/s (the current docs' default per endpoint, which
`GET /v1/billing/meters/{id}/event_summaries` would fall under unless Stripe lists it otherwise).

Run: LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/python bench/reconcile.py [--customers 1000,3000,10000]
     [--events 3] [--runs 2] [--profile-at 1000] [--no-month-end]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from sqlalchemy import text  # noqa: E402

from plugin.ledger import store  # noqa: E402
from plugin.rules.plans import calendar_month  # noqa: E402
from plugin.rules.records import BillingRecord, LedgerRow  # noqa: E402
from plugin.runtime import Meterline  # noqa: E402
from plugin.services.reconcile import Run, reconcile  # noqa: E402
from plugin.settings import MeterlineConfig, load_config, load_settings  # noqa: E402
from plugin.stripe.setup import StripeSetup  # noqa: E402
from tests.support.delivery import PRICED_YAML  # noqa: E402
from tests.support.stripe_emulator import (  # noqa: E402
    DEFAULT_API_KEY,
    StripeEmulator,
    run_stripe_emulator,
)

READ_LIMIT = 100
"""Stripe live mode: 100 read operations per second per account (docs.stripe.com/rate-limits)."""
ENDPOINT_LIMIT = 25
"""The same page, current text: 25 requests per second per API endpoint unless listed otherwise."""
STREAM_BATCH = 100
MAX_CUSTOMERS = 100_000
"""A bound on --customers (every loop below is bounded by N x --events)."""
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Timed:
    wall: float
    cpu: float
    emulator_cpu: float
    calls: int
    emulator_calls: dict[str, int]


@dataclass
class Result:
    customers: int
    events: int
    setup: dict[str, float] = field(default_factory=dict)
    runs: list[Timed] = field(default_factory=list)
    month_end: Timed | None = None
    profile: str = ""


def emulator_call_counts(emulator: StripeEmulator) -> dict[str, int]:
    return dict(emulator.calls())


def call_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def create_stripe_customers(emulator: StripeEmulator, count: int, threads: int) -> list[str]:
    client = emulator.client()  # the SDK's requests client keeps one session per thread

    def create(index: int) -> str:
        return client.v1.customers.create({"name": f"bench-{index:06d}"}).id

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(create, range(count), chunksize=64))


def ledger_rows(customers: list[str], events: int, start: datetime, end: datetime, rng: random.Random
                ) -> list[LedgerRow]:
    span = int((end - start).total_seconds())
    rows = []
    for customer in customers:
        for index in range(events):
            at = start + timedelta(seconds=rng.randrange(span), microseconds=rng.randrange(1_000_000))
            rows.append(LedgerRow(id=f"mtr_{customer}_{index}", customer_id=customer, model="m",
                                  credits_ucr=rng.randrange(1, 5_000_000), created_at=at))
    return rows


def send_stream(emulator: StripeEmulator, event_name: str, rows: list[LedgerRow], stripe_ids: dict[str, str]) -> int:
    """The rows as meter events through the v2 stream, as the relay's Stripe sink sends them; returns calls."""
    client = emulator.client()
    calls = 0
    token = None
    for offset in range(0, len(rows), STREAM_BATCH):
        if calls % 500 == 0:  # a fresh session now and then (they last 15 minutes)
            token = client.v2.billing.meter_event_session.create().authentication_token
        body = {"events": [
            {"event_name": event_name, "identifier": row.id,
             "timestamp": row.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
             "payload": {"stripe_customer_id": stripe_ids[row.customer_id], "value": str(row.credits_ucr)}}
            for row in rows[offset:offset + STREAM_BATCH]]}
        emulator.client(token).v2.billing.meter_event_stream.create(body)
        calls += 1
    return calls


def check(run: Run, expected: dict[str, int]) -> None:
    """The run is a correct one: every customer compared, `ok`, nothing diverged, Stripe's sums = the ledger's."""
    problems = []
    if len(run.customers) != len(expected):
        problems.append(f"{len(run.customers)} customers compared, {len(expected)} expected")
    for found in run.customers:
        if found.status.value != "ok" or found.divergence_ucr != 0 or found.in_flight_ucr != 0:
            problems.append(f"{found.customer_id}: {found.status.value}, divergence {found.divergence_ucr}")
        elif found.ledger_ucr != expected.get(found.customer_id) or found.stripe_ucr != found.ledger_ucr:
            problems.append(f"{found.customer_id}: ledger {found.ledger_ucr}, Stripe {found.stripe_ucr}, "
                            f"expected {expected.get(found.customer_id)}")
        if len(problems) > 5:
            break
    if problems or run.landed or run.resent:
        raise SystemExit(f"reconciliation is not right: {problems[:5]} (landed {run.landed}, resent {run.resent})")


def timed_run(meterline: Meterline, emulator: StripeEmulator, now: datetime, expected: dict[str, int]) -> Timed:
    calls_before = emulator_call_counts(emulator)
    emulator_cpu = cpu_of(emulator.process.pid)
    cpu, started = time.process_time(), time.perf_counter()
    run = reconcile(meterline, now)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    emulator_cpu = cpu_of(emulator.process.pid) - emulator_cpu
    check(run, expected)
    return Timed(wall, cpu, emulator_cpu, run.stripe_calls, call_delta(calls_before, emulator_call_counts(emulator)))


PROFILE_BUCKETS = [
    ("summary reads (SummaryReader.hourly: the whole Stripe side)", "plugin/stripe/summaries.py", "hourly"),
    ("  the SDK's calls (stripe _APIRequestor.request)", "stripe/_api_requestor.py", "request"),
    ("    HTTP: requests' send (write, wait for the emulator, read)", "requests/sessions.py", "send"),
    ("    the answer's JSON made into StripeObjects", "stripe/_util.py", "_convert_to_stripe_object"),
    ("SQL: outbox hourly totals", "plugin/outbox/store.py", "hourly_totals"),
    ("SQL: profiles", "plugin/ledger/accounts.py", "profile_rows"),
    ("SQL: Stripe ids", "plugin/outbox/store.py", "stripe_customer_ids"),
    ("SQL: save the run", "plugin/ledger/reconciliations.py", "save"),
    ("periods (period_of)", "plugin/services/usage.py", "period_of"),
    ("comparison (rules.compare)", "plugin/rules/reconcile.py", "compare"),
    ("report JSON (_report)", "plugin/services/reconcile.py", "_report"),
]


def profiled(meterline: Meterline, now: datetime) -> str:
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    run = reconcile(meterline, now)
    profiler.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    lines = [f"profiled run: {wall:.2f} s wall under cProfile, {run.stripe_calls:,} Stripe calls"]
    for label, path, name in PROFILE_BUCKETS:
        cumulative = sum(value[3] for (file, _, function), value in stats.stats.items()  # type: ignore[attr-defined]
                         if file.endswith(path) and function == name)
        lines.append(f"  {label:<66} {cumulative:7.2f} s  {cumulative / wall * 100:5.1f}%")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
    lines.append(out.getvalue())
    return "\n".join(lines)


def bench(customers: int, args: argparse.Namespace, workdir: Path, month_end: bool) -> Result:
    result = Result(customers, customers * args.events)
    rng = random.Random(customers)
    config_dict = PRICED_YAML
    with run_stripe_emulator() as emulator:
        started = time.perf_counter()
        StripeSetup(emulator.client(), MeterlineConfig.model_validate(config_dict)).run()
        stripe_ids_list = create_stripe_customers(emulator, customers, args.create_threads)
        result.setup["stripe customers (SDK)"] = time.perf_counter() - started

        directory = workdir / f"n{customers}"
        directory.mkdir()
        (directory / "meterline.yaml").write_text(yaml.safe_dump(config_dict))
        env = {"METERLINE_DATABASE_URL": f"sqlite:///{directory / 'ledger.db'}",
               "METERLINE_CONFIG": str(directory / "meterline.yaml"), "STRIPE_API_KEY": DEFAULT_API_KEY,
               "METERLINE_STRIPE_API_BASE": emulator.base_url}
        with environment(env):
            settings = load_settings()
            meterline = Meterline(settings=settings, config=load_config(settings.config))
        try:
            engine = meterline.engine
            ids = [f"cust-{index:06d}" for index in range(customers)]
            stripe_ids = dict(zip(ids, stripe_ids_list, strict=True))
            started = time.perf_counter()
            for customer in ids:
                store.add_customer(engine, customer, "pro", stripe_ids[customer])
            result.setup["meterline customers (store.add_customer)"] = time.perf_counter() - started

            now = datetime.now(UTC)
            rows = ledger_rows(ids, args.events, month_start(now), now - timedelta(minutes=10), rng)
            started = time.perf_counter()
            for offset in range(0, len(rows), 5_000):
                store.write_records(engine, [BillingRecord(row) for row in rows[offset:offset + 5_000]])
            result.setup["ledger + outbox rows (store.write_records)"] = time.perf_counter() - started

            started = time.perf_counter()
            stream_calls = send_stream(emulator, meterline.config.stripe.meter_event_name, rows, stripe_ids)
            with engine.begin() as connection:
                marked = connection.execute(
                    text("UPDATE outbox SET status = 'delivered', delivered_at = :now WHERE status = 'pending'"),
                    {"now": datetime.now(UTC)}).rowcount
            result.setup[f"events to the emulator (v2 stream, {stream_calls} calls)"] = time.perf_counter() - started
            log = emulator.meter_event_log(offset=len(rows))
            if marked != len(rows) or log["count"] != len(rows) or log["rejected"] or log["duplicates"]:
                raise SystemExit(f"setup: {marked} outbox rows marked, the emulator recorded {log['count']} "
                                 f"(rejected {log['rejected']}, duplicates {log['duplicates']}) of {len(rows)}")

            expected: dict[str, int] = {}
            for row in rows:
                expected[row.customer_id] = expected.get(row.customer_id, 0) + row.credits_ucr
            for _ in range(args.runs):
                result.runs.append(timed_run(meterline, emulator, datetime.now(UTC), expected))
                print(f"  N={customers:,}: run {len(result.runs)}: {result.runs[-1].wall:.2f} s", flush=True)
            if month_end:
                period = calendar_month(datetime.now(UTC))  # the customers have no period anchor
                result.month_end = timed_run(meterline, emulator, period.end - timedelta(minutes=30), expected)
            if customers == args.profile_at:
                result.profile = profiled(meterline, datetime.now(UTC))
        finally:
            meterline.close()
    return result


def table(results: list[Result]) -> list[str]:
    lines = [
        "| customers | events | Stripe calls | calls / customer | wall time, run 1 / run 2 | ms / customer | "
        "customers/s | "
        f"CPU: bench / emulator | min. time at {READ_LIMIT} reads/s | at {ENDPOINT_LIMIT}/s per endpoint |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        calls = result.runs[0].calls
        walls = " / ".join(f"{run.wall:.1f} s" for run in result.runs)
        best = min(run.wall for run in result.runs)
        lines.append(
            f"| {result.customers:,} | {result.events:,} | {calls:,} | {calls / result.customers:.2f} | {walls} | "
            f"{best / result.customers * 1000:.1f} | {result.customers / best:,.0f} | "
            f"{result.runs[0].cpu:.1f} s / {result.runs[0].emulator_cpu:.1f} s | "
            f"{calls / READ_LIMIT:,.0f} s ({calls / READ_LIMIT / 60:.1f} min) | "
            f"{calls / ENDPOINT_LIMIT:,.0f} s ({calls / ENDPOINT_LIMIT / 60:.1f} min) |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", default="1000,3000,10000",
                        type=lambda value: [int(part.replace("_", "")) for part in value.split(",") if part])
    parser.add_argument("--events", type=int, default=3, help="ledger rows (meter events) per customer")
    parser.add_argument("--runs", type=int, default=2, help="timed reconcile() runs per N")
    parser.add_argument("--create-threads", type=int, default=4, help="Stripe customers created at a time")
    parser.add_argument("--profile-at", type=int, default=1000, help="profile one more run at this N (0: none)")
    parser.add_argument("--no-month-end", action="store_true", help="skip the month-end run at the smallest N")
    args = parser.parse_args()
    if not args.customers or max(args.customers) > MAX_CUSTOMERS or not 1 <= args.events <= 50 or \
            not 1 <= args.runs <= 10:
        parser.error(f"--customers 1..{MAX_CUSTOMERS:,}, --events 1..50, --runs 1..10")
    now = datetime.now(UTC)
    if now - month_start(now) < timedelta(minutes=30):
        parser.error("the month (the period) began less than 30 minutes ago: no room for events yet")
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores; day {now.day} of the month: "
          f"{(now - month_start(now)).total_seconds() / 3600:.0f} hours of period so far")
    results = []
    smallest = min(args.customers)
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="meterline-bench-reconcile-") as workdir:
        for customers in args.customers:
            print(f"N={customers:,}: setting up", flush=True)
            result = bench(customers, args, Path(workdir), not args.no_month_end and customers == smallest)
            results.append(result)
            for step, seconds in result.setup.items():
                print(f"  setup: {step}: {seconds:.1f} s ({customers / seconds:,.0f} customers/s)")
            for number, run in enumerate(result.runs, 1):
                print(f"  run {number}: {run.wall:.2f} s wall, {run.calls:,} Stripe calls "
                      f"({run.calls / customers:.2f}/customer, {run.wall / run.calls * 1000:.2f} ms/call), "
                      f"CPU {run.cpu:.2f} s here + {run.emulator_cpu:.2f} s emulator; emulator counted "
                      f"{run.emulator_calls}")
            if result.month_end:
                end = result.month_end
                print(f"  month-end run (now = 30 min before the period's end): {end.calls:,} Stripe calls "
                      f"({end.calls / customers:.2f}/customer), {end.wall:.2f} s wall; at {READ_LIMIT}/s "
                      f"{end.calls / READ_LIMIT:.0f} s, at {ENDPOINT_LIMIT}/s {end.calls / ENDPOINT_LIMIT:.0f} s")
            if result.profile:
                print(result.profile)
    print(f"\nall customers ok, divergence 0, in every run; bench total {time.perf_counter() - total:.0f} s\n")
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
