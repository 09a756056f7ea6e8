"""Relay throughput: events/s drained from the outbox to the local Stripe emulator, v1 and v2 stream.

One run, both transports, same machine: the emulator runs as its own process (`meterline
stripe-emulator`), the relay in this process with the settings the proxy would use. Each phase
fills a fresh SQLite outbox with N events spread over C customers, drains it with
`Relay.drain()`, and checks the emulator recorded every identifier exactly once.

Run: .venv/bin/python bench/relay.py [--v1-events 5000] [--v2-events 50000] (or `make bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugin.ledger import store  # noqa: E402
from plugin.ledger.store import make_engine  # noqa: E402
from plugin.outbox.relay import Relay, RelayOptions  # noqa: E402
from plugin.rules.records import BillingRecord, LedgerRow  # noqa: E402
from plugin.sinks.stripe import StripeConfig, StripeSink  # noqa: E402
from tests.support.processes import free_port, stop_process  # noqa: E402

API_KEY = "sk_test_meterline_bench"
EVENT_NAME = "meterline_credits"


def start_emulator() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("meterline")), "stripe-emulator", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):  # bounded: 20 s
        try:
            httpx.get(base + "/_emulator/meter_events", timeout=1)
            return process, base
        except httpx.HTTPError:
            time.sleep(0.1)
    stop_process(process)
    raise RuntimeError("the Stripe emulator did not start")


def prepare_stripe(base: str, customers: int) -> list[str]:
    client = StripeConfig(api_key=API_KEY, api_base=base).client()
    client.v1.billing.meters.create({
        "display_name": "bench", "event_name": EVENT_NAME, "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
        "value_settings": {"event_payload_key": "value"},
    })
    return [client.v1.customers.create({"name": f"bench-{n}"}).id for n in range(customers)]


def fill_outbox(engine, stripe_ids: list[str], events: int) -> None:
    for n, stripe_id in enumerate(stripe_ids):
        store.add_customer(engine, f"c{n}", "pro", stripe_id)
    now = datetime.now(UTC) - timedelta(seconds=1)
    run = secrets.token_hex(4)
    records = [
        BillingRecord(LedgerRow(id=f"mtr_{run}_{i:08d}", customer_id=f"c{i % len(stripe_ids)}", model="m",
                                credits_ucr=1000 + i, created_at=now))
        for i in range(events)
    ]
    for start in range(0, events, 5000):
        store.write_records(engine, records[start:start + 5000])


async def drain(engine, base: str, stream: bool, batch: int, concurrency: int) -> tuple[float, str]:
    sink = StripeSink(StripeConfig(api_key=API_KEY, api_base=base, event_name=EVENT_NAME, stream=stream))
    relay = Relay(engine, sink, options=RelayOptions(batch=batch, concurrency=concurrency))
    start = time.perf_counter()
    try:
        report = await relay.drain()
    finally:
        await sink.aclose()
    return time.perf_counter() - start, report.summary()


def phase(name: str, base: str, stripe_ids: list[str], events: int, stream: bool, batch: int,
          concurrency: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        engine = make_engine(f"sqlite:///{Path(workdir) / 'bench.db'}")
        fill_outbox(engine, stripe_ids, events)
        before = len(httpx.get(base + "/_emulator/meter_events", timeout=30).json()["events"])
        seconds, summary = asyncio.run(drain(engine, base, stream, batch, concurrency))
        recorded = httpx.get(base + "/_emulator/meter_events", timeout=30).json()["events"][before:]
        engine.dispose()
    identifiers = [event["identifier"] for event in recorded]
    result = {"phase": name, "events": events, "seconds": seconds, "per_second": events / seconds,
              "recorded": len(identifiers), "distinct": len(set(identifiers)), "relay": summary}
    print(f"{name:<28} {events:>7} events in {seconds:6.2f} s = {events / seconds:>9,.0f} events/s   "
          f"emulator recorded {len(identifiers)} ({len(set(identifiers))} distinct)   relay: {summary}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--v1-events", type=int, default=5000)
    parser.add_argument("--v2-events", type=int, default=50000)
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    process, base = start_emulator()
    try:
        stripe_ids = prepare_stripe(base, args.customers)
        results = [
            phase("v1 meter events", base, stripe_ids, args.v1_events, stream=False, batch=500, concurrency=16),
            phase("v2 meter event stream", base, stripe_ids, args.v2_events, stream=True, batch=2000,
                  concurrency=8),
        ]
    finally:
        stop_process(process)
    bad = [result["phase"] for result in results if result["recorded"] != result["events"]
           or result["distinct"] != result["events"]]
    if bad:
        print(f"MISMATCH in {', '.join(bad)}: the emulator did not record every event exactly once")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
