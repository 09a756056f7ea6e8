"""Plugin overhead: the same LiteLLM proxy with meterline on and off, against the same upstream.

Both proxies run side by side. Latency requests alternate one by one between the sides, and
load runs alternate (on, off, then off, on, ...), so drift in the machine's load hits both alike.
Reported:
  - latency at 1 concurrent: p50 and p99 per side and their difference (the plugin's added
    latency), measured twice: alternating request by request between the sides, and back to back
    on one side (where each request meets the previous one's background logging work);
  - throughput at N concurrent: requests/s per side (median of the load runs) and the ratio on/off:
    the median of the ratios of pairs of runs, one per side, seconds apart (the machine's speed
    drifts by more than the plugin costs within a minute), with the pairs' spread;
  - proxy CPU time per request (user + system, from /proc), per side;
  - the time the 1-concurrent requests spent in meterline's hooks, by step, from the plugin-on
    proxy's own `meterline_response_path_seconds` histogram (interpolated within its buckets):
    what the plugin itself adds, without the machine's noise between the two sides.

Run: .venv/bin/python bench/overhead.py  (or `make bench`). Takes about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugin.ledger import store  # noqa: E402
from plugin.ledger.store import make_engine  # noqa: E402
from plugin.settings import MeterlineConfig, Settings  # noqa: E402
from plugin.stripe_setup import StripeSetup  # noqa: E402
from tests.support.delivery import PRICED_YAML, stripe_env  # noqa: E402
from tests.support.proxy import MASTER_KEY, METERLINE_YAML, run_proxy  # noqa: E402
from tests.support.redis_server import running_redis  # noqa: E402
from tests.support.stripe_emulator import run_stripe_emulator  # noqa: E402
from tests.support.upstream import run_upstream  # noqa: E402

BODY = {"model": "test-model", "messages": [{"role": "user", "content": "bench [[p=40 c=8]]"}], "user": "bench"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


STEPS = ("auth", "admission", "billing")


async def time_in_meterline(client: httpx.AsyncClient) -> dict[str, list[tuple[float, float]]]:
    """The plugin-on proxy's `meterline_response_path_seconds` buckets: per step, (upper bound, cumulative count)."""
    response = await client.get("/meterline/v1/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"})
    response.raise_for_status()
    buckets: dict[str, list[tuple[float, float]]] = {step: [] for step in STEPS}
    for family in text_string_to_metric_families(response.text):
        if family.name == "meterline_response_path_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets[sample.labels["step"]].append((float(sample.labels["le"]), sample.value))
    return buckets


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The q-quantile (seconds) of a histogram's cumulative buckets, interpolated within its bucket."""
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank and count > below:
            if upper == float("inf"):  # past the last bound: say the bound
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


async def latency_phase(clients: dict, sides: dict, count: int) -> dict[str, list[float]]:
    """Sequential requests alternating between the sides, so any drift hits both alike."""
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(count):
        for name, side in sides.items():
            start = time.perf_counter()
            response = await clients[name].post(
                "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {side['key']}"}
            )
            samples[name].append((time.perf_counter() - start) * 1000)
            response.raise_for_status()
    return samples


async def back_to_back_phase(client: httpx.AsyncClient, key: str, count: int) -> list[float]:
    """Sequential requests to one side only: each request meets the previous one's background work."""
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
    results = {name: {"latency": [], "back_to_back": [], "rps": [], "cpu": 0.0, "requests": 0,
                      "timed": {step: [] for step in STEPS}} for name in sides}
    clients = {
        name: httpx.AsyncClient(base_url=side["url"], timeout=60, limits=httpx.Limits(max_connections=args.concurrency + 5))
        for name, side in sides.items()
    }
    try:
        await latency_phase(clients, sides, 20)  # warm-up: imports, connection pools, first-request caches
        for round_number in range(args.rounds):
            before = {name: cpu_seconds(side["pid"]) for name, side in sides.items()}
            timed_before = await time_in_meterline(clients["on"])
            for name, samples in (await latency_phase(clients, sides, args.latency_requests)).items():
                results[name]["latency"] += samples
            timed_after = await time_in_meterline(clients["on"])
            for step in STEPS:  # what the 1-concurrent requests of this round added to each bucket
                results["on"]["timed"][step].append([(upper, after - before) for (upper, after), (_, before)
                                                     in zip(timed_after[step], timed_before[step], strict=True)])
            order = list(sides.items()) if round_number % 2 == 0 else list(reversed(sides.items()))
            for name, side in order:
                results[name]["back_to_back"] += await back_to_back_phase(clients[name], side["key"], args.latency_requests)
            for pair in range(args.load_pairs):  # short loads, side by side: a pair's two runs are seconds apart
                for name, side in order if pair % 2 == 0 else order[::-1]:
                    results[name]["rps"].append(
                        await throughput_phase(clients[name], side["key"], args.load_requests, args.concurrency)
                    )
            for name, side in sides.items():
                results[name]["cpu"] += cpu_seconds(side["pid"]) - before[name]
                results[name]["requests"] += 2 * args.latency_requests + args.load_pairs * args.load_requests
    finally:
        for client in clients.values():
            await client.aclose()
    return results


def report(results: dict, args) -> str:
    on = results["on"]
    p50 = {name: statistics.median(side["latency"]) for name, side in results.items()}
    p99 = {name: percentile(side["latency"], 99) for name, side in results.items()}
    b2b50 = {name: statistics.median(side["back_to_back"]) for name, side in results.items()}
    b2b99 = {name: percentile(side["back_to_back"], 99) for name, side in results.items()}
    rps = {name: statistics.median(side["rps"]) for name, side in results.items()}
    ratios = [on_rps / off_rps for on_rps, off_rps in zip(on["rps"], results["off"]["rps"], strict=True)]
    cpu = {name: side["cpu"] / side["requests"] * 1000 for name, side in results.items()}
    lines = [
        "| measure | plugin off | plugin on | on - off / ratio |",
        "|---|---|---|---|",
        f"| p50 latency, 1 concurrent, alternating (ms) | {p50['off']:.2f} | {p50['on']:.2f} | {p50['on'] - p50['off']:+.2f} ms |",
        f"| p99 latency, 1 concurrent, alternating (ms) | {p99['off']:.2f} | {p99['on']:.2f} | {p99['on'] - p99['off']:+.2f} ms |",
        f"| p50 latency, back to back (ms) | {b2b50['off']:.2f} | {b2b50['on']:.2f} | {b2b50['on'] - b2b50['off']:+.2f} ms |",
        f"| p99 latency, back to back (ms) | {b2b99['off']:.2f} | {b2b99['on']:.2f} | {b2b99['on'] - b2b99['off']:+.2f} ms |",
        f"| throughput, {args.concurrency} concurrent (req/s) | {rps['off']:.1f} | {rps['on']:.1f} | ratio "
        f"{statistics.median(ratios):.3f} (pairs {min(ratios):.3f} to {max(ratios):.3f}) |",
        f"| proxy CPU per request (ms) | {cpu['off']:.2f} | {cpu['on']:.2f} | {cpu['on'] - cpu['off']:+.2f} ms |",
    ]
    for step in STEPS:  # the rounds' buckets added up
        rounds = on["timed"][step]
        summed = [(upper, sum(counts[i][1] for counts in rounds)) for i, (upper, _) in enumerate(rounds[0])]
        if summed[-1][1]:
            lines.append(f"| time in meterline, {step}, 1 concurrent: p50 / p99 (ms) | | "
                         f"{bucket_quantile(summed, 0.5) * 1000:.2f} / {bucket_quantile(summed, 0.99) * 1000:.2f} | |")
    samples = f"{len(on['latency'])} + {len(on['back_to_back'])} latency samples and {len(on['rps'])} load runs of {args.load_requests} per side"
    counters = "counters in Redis" if args.redis else "counters in the ledger's database"
    customer = "a capped customer (reserve + settle)" if args.capped else "an unlimited customer (settle only)"
    return "\n".join(lines) + f"\n\n{samples}; ledger on SQLite, {counters}, {customer}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--load-requests", type=int, default=300)
    parser.add_argument("--load-pairs", type=int, default=2, help="load runs per side and round")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--deliver", choices=("v1", "v2"), default=None,
                        help="the plugin-on proxy's relay also delivers meter events to the Stripe emulator, "
                             "with v1 meter events or the v2 stream")
    parser.add_argument("--capped", action="store_true",
                        help="bill a customer on a capped plan, so every request also reserves before the call")
    parser.add_argument("--redis", action="store_true",
                        help="keep the spending counters in a real redis-server instead of the ledger's database")
    args = parser.parse_args()
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="meterline-bench-"))
        upstream = stack.enter_context(run_upstream())
        work = Path(tmp)
        url = f"sqlite:///{work / 'ledger.db'}"
        engine = make_engine(url)
        # The proxy's own default for how long a key and a customer's terms are remembered (the tests'
        # run_proxy shortens it to 1 s, so that their changes apply quickly).
        env = {"METERLINE_KEY_CACHE_SECONDS": str(Settings.model_fields["key_cache_seconds"].default)}
        stripe_id, emulator, plan = None, None, "pro"
        # A benchmark is a runaway loop by design: the breaker's floor is set far above what a run spends
        # (its check still runs on every request).
        meterline_yaml = METERLINE_YAML | {"policies": {"breaker": {"floor_credits_per_hour": "1000000"}}}
        if args.capped:
            # A cap far above what the run spends: every request reserves and settles, none is refused.
            plan = "capped"
            meterline_yaml |= {"plans": METERLINE_YAML["plans"] | {"capped": {"cap_credits": 10**9}}}
        if args.redis:
            env["METERLINE_REDIS_URL"] = stack.enter_context(running_redis())
        if args.deliver:
            emulator = stack.enter_context(run_stripe_emulator())
            StripeSetup(emulator.client(), MeterlineConfig.model_validate(PRICED_YAML)).run()
            stripe_id = emulator.client().v1.customers.create({"name": "bench"}).id
            env |= stripe_env(emulator) | {"METERLINE_RELAY_POLL_SECONDS": "0.5",
                                           "METERLINE_STRIPE_STREAM": "1" if args.deliver == "v2" else "0"}
        store.add_customer(engine, "bench", plan, stripe_id)
        _, key = store.create_key(engine, "bench")
        with run_proxy(work / "on", upstream.base_url, url, env=env, meterline_yaml=meterline_yaml) as plugin_on, \
                run_proxy(work / "off", upstream.base_url, url, plugin=False) as plugin_off:
            sides = {
                "on": {"url": plugin_on.base_url, "key": key, "pid": plugin_on.process.pid},
                "off": {"url": plugin_off.base_url, "key": MASTER_KEY, "pid": plugin_off.process.pid},
            }
            results = asyncio.run(measure(sides, args))
        billed = sum(1 for _ in store.ledger_rows(engine, "bench"))
        delivered = len(emulator.meter_events()) if emulator else None
    print(report(results, args))
    print(f"\nledger rows written by the plugin-on proxy: {billed} (expected {results['on']['requests'] + 20})")
    if delivered is not None:
        print(f"meter events at the Stripe emulator by the end of the run: {delivered}")


if __name__ == "__main__":
    main()
