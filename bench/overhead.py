"""Plugin overhead: the same LiteLLM proxy with meterline on and off, against the same upstream.

Both proxies run side by side; phases are interleaved (on, off, on, off, ...) so drift in the
machine's load hits both alike. Reported:
  - latency at 1 concurrent: p50 and p99 per side, and the difference (the plugin's added latency);
  - throughput at N concurrent: requests/s per side and the ratio on/off;
  - proxy CPU time per request (user + system, from /proc), per side.

Run: .venv/bin/python bench/overhead.py  (or `make bench`). Takes about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugin.ledger import store  # noqa: E402
from plugin.ledger.store import make_engine  # noqa: E402
from tests.support.proxy import MASTER_KEY, run_proxy  # noqa: E402
from tests.support.upstream import run_upstream  # noqa: E402

BODY = {"model": "test-model", "messages": [{"role": "user", "content": "bench [[p=40 c=8]]"}], "user": "bench"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def latency_phase(client: httpx.AsyncClient, key: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        response = await client.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
        samples.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return samples


async def throughput_phase(client: httpx.AsyncClient, key: str, count: int, concurrency: int) -> float:
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            response = await client.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
            response.raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start)


async def measure(sides: dict, args) -> dict:
    results = {name: {"latency": [], "rps": [], "cpu": 0.0, "requests": 0} for name in sides}
    clients = {
        name: httpx.AsyncClient(base_url=side["url"], timeout=60, limits=httpx.Limits(max_connections=args.concurrency + 5))
        for name, side in sides.items()
    }
    try:
        for name, side in sides.items():  # warm-up: imports, connection pools, first-request caches
            await latency_phase(clients[name], side["key"], 20)
        for _ in range(args.rounds):
            for name, side in sides.items():
                before = cpu_seconds(side["pid"])
                results[name]["latency"] += await latency_phase(clients[name], side["key"], args.latency_requests)
                results[name]["rps"].append(
                    await throughput_phase(clients[name], side["key"], args.load_requests, args.concurrency)
                )
                results[name]["cpu"] += cpu_seconds(side["pid"]) - before
                results[name]["requests"] += args.latency_requests + args.load_requests
    finally:
        for client in clients.values():
            await client.aclose()
    return results


def report(results: dict, args) -> str:
    on = results["on"]
    p50 = {name: statistics.median(side["latency"]) for name, side in results.items()}
    p99 = {name: percentile(side["latency"], 99) for name, side in results.items()}
    rps = {name: statistics.median(side["rps"]) for name, side in results.items()}
    cpu = {name: side["cpu"] / side["requests"] * 1000 for name, side in results.items()}
    lines = [
        "| measure | plugin off | plugin on | on - off / ratio |",
        "|---|---|---|---|",
        f"| p50 latency, 1 concurrent (ms) | {p50['off']:.2f} | {p50['on']:.2f} | +{p50['on'] - p50['off']:.2f} ms |",
        f"| p99 latency, 1 concurrent (ms) | {p99['off']:.2f} | {p99['on']:.2f} | +{p99['on'] - p99['off']:.2f} ms |",
        f"| throughput, {args.concurrency} concurrent (req/s) | {rps['off']:.1f} | {rps['on']:.1f} | ratio {rps['on'] / rps['off']:.3f} |",
        f"| proxy CPU per request (ms) | {cpu['off']:.2f} | {cpu['on']:.2f} | +{cpu['on'] - cpu['off']:.2f} ms |",
    ]
    samples = f"{len(on['latency'])} latency samples and {len(on['rps'])} load rounds of {args.load_requests} per side"
    return "\n".join(lines) + f"\n\n{samples}; ledger on SQLite (embedded defaults)."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--load-requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    with tempfile.TemporaryDirectory(prefix="meterline-bench-") as tmp, run_upstream() as upstream:
        work = Path(tmp)
        url = f"sqlite:///{work / 'ledger.db'}"
        engine = make_engine(url)
        store.add_customer(engine, "bench", "pro")
        _, key = store.create_key(engine, "bench")
        with run_proxy(work / "on", upstream.base_url, url) as plugin_on, \
                run_proxy(work / "off", upstream.base_url, url, plugin=False) as plugin_off:
            sides = {
                "on": {"url": plugin_on.base_url, "key": key, "pid": plugin_on.process.pid},
                "off": {"url": plugin_off.base_url, "key": MASTER_KEY, "pid": plugin_off.process.pid},
            }
            results = asyncio.run(measure(sides, args))
        billed = sum(1 for _ in store.ledger_rows(engine, "bench"))
    print(report(results, args))
    print(f"\nledger rows written by the plugin-on proxy: {billed} (expected {results['on']['requests'] + 20})")


if __name__ == "__main__":
    main()
