"""Plugin overhead: the same LiteLLM proxy with meterline on and off, against the same upstream.

Both proxies run side by side, pinned to one CPU of their own (the load generator, the upstream
and redis-server run on the other; `--no-pin` leaves placement to the scheduler). Reported:
  - latency at 1 concurrent: p50 and p99 per side and their difference (the plugin's added
    latency), measured twice: alternating request by request between the sides, and back to back
    on one side (where each request meets the previous one's background logging work);
  - latency at N concurrent against a model that takes --model-ms to answer (a steady stream of
    requests, one every model-ms / N, so that N are in flight as with real models): p50 and p99
    per side and their difference;
  - throughput at N concurrent: both sides loaded at once, N requests in flight each, in short
    windows; the ratio on/off of the requests each answered per window (median over windows).
    Sharing one CPU, each proxy gets half of it, so the ratio is how much less work per second
    the plugin leaves LiteLLM; the capacity ratio, CPU per request off / on in the same windows,
    says the same without relying on the scheduler's fairness;
  - proxy CPU time per request (user + system, from /proc), per side;
  - the time the 1-concurrent requests spent in meterline's hooks, by step, from the plugin-on
    proxy's own `meterline_response_path_seconds` histogram (interpolated within its buckets):
    what the plugin itself adds, without the machine's noise between the two sides.
Differences and ratios come with a 95% bootstrap interval. This machine's speed drifts by tens of
percent within seconds: load runs taken one side after the other, seconds apart, differed by up
to 40% with no change in code, which is why the sides are loaded together. `--control` runs the
same measurement with the plugin off on both sides (an A/A run): the method's own noise.

Run: .venv/bin/python bench/overhead.py  (or `make bench`). Takes about six minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugin.ledger import store  # noqa: E402
from plugin.ledger.store import make_engine  # noqa: E402
from plugin.settings import MeterlineConfig, Settings  # noqa: E402
from plugin.stripe.setup import StripeSetup  # noqa: E402
from tests.support.delivery import PRICED_YAML, stripe_env  # noqa: E402
from tests.support.proxy import MASTER_KEY, METERLINE_YAML, run_proxy  # noqa: E402
from tests.support.redis_server import running_redis  # noqa: E402
from tests.support.stripe_emulator import run_stripe_emulator  # noqa: E402
from tests.support.upstream import run_upstream  # noqa: E402

BODY = {"model": "test-model", "messages": [{"role": "user", "content": "bench [[p=40 c=8]]"}], "user": "bench"}


def slow_model_body(model_ms: int) -> dict:
    """BODY, answered by the upstream after `model_ms` (a model's generation time)."""
    return BODY | {"messages": [{"role": "user", "content": f"bench [[p=40 c=8 delay_ms={model_ms}]]"}]}


@contextlib.contextmanager
def started_on(cpus: set[int] | None) -> Iterator[None]:
    """Processes started inside the block run on `cpus` (a child inherits its parent's CPU
    affinity at fork); None leaves the affinity alone."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


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


async def chat(client: httpx.AsyncClient, key: str, body: dict = BODY) -> None:
    """One chat completion through a proxy; a failed one ends the run (every answer must count)."""
    response = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()


async def latency_phase(clients: dict, sides: dict, count: int) -> dict[str, list[float]]:
    """Sequential requests alternating between the sides, so any drift hits both alike."""
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(count):
        for name, side in sides.items():
            start = time.perf_counter()
            await chat(clients[name], side["key"])
            samples[name].append((time.perf_counter() - start) * 1000)
    return samples


async def back_to_back_phase(client: httpx.AsyncClient, key: str, count: int) -> list[float]:
    """Sequential requests to one side only: each request meets the previous one's background work."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await chat(client, key)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def steady_phase(client: httpx.AsyncClient, key: str, count: int, concurrency: int, model_ms: int) -> list[float]:
    """Latency (ms) under a steady stream: a request every model_ms / concurrency, so that about
    `concurrency` are in flight. Each latency counts from when its request was due, so a proxy
    that falls behind is charged for the wait (no coordinated omission)."""
    body, interval = slow_model_body(model_ms), model_ms / 1000 / concurrency
    start = time.perf_counter()

    async def one(due: float) -> float:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        await chat(client, key, body)
        return (time.perf_counter() - due) * 1000

    return list(await asyncio.gather(*(one(start + i * interval) for i in range(count))))


async def load_window(clients: dict, sides: dict, seconds: float, concurrency: int) -> dict[str, tuple[int, float, float]]:
    """Both sides at once, each with `concurrency` requests in flight, for `seconds`: per side the
    requests answered, the proxy's CPU seconds and the window's wall seconds. Loaded together (and,
    pinned, on one shared CPU), the two proxies meet the same moment of the machine: its speed
    drifts by tens of percent within seconds, which makes load runs taken one after the other
    differ by more than the plugin costs."""
    answered = dict.fromkeys(sides, 0)
    stop = time.perf_counter() + seconds

    async def worker(name: str) -> None:
        while time.perf_counter() < stop:
            await chat(clients[name], sides[name]["key"])
            answered[name] += 1

    cpu_before = {name: cpu_seconds(side["pid"]) for name, side in sides.items()}
    start = time.perf_counter()
    await asyncio.gather(*(worker(name) for name in sides for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {name: (answered[name], cpu_seconds(side["pid"]) - cpu_before[name], elapsed) for name, side in sides.items()}


async def measure(sides: dict, args) -> dict:
    results = {name: {"latency": [], "back_to_back": [], "steady": [], "windows": [], "cpu": 0.0, "requests": 0,
                      "timed": {step: [] for step in STEPS}} for name in sides}
    clients = {
        # Idle connections are dropped before uvicorn's 5 s keep-alive ends: while one side is loaded the
        # other's connections idle, and reusing one the server is closing fails the request (ReadError).
        name: httpx.AsyncClient(base_url=side["url"], timeout=60,
                                limits=httpx.Limits(max_connections=args.concurrency + 5, keepalive_expiry=2))
        for name, side in sides.items()
    }
    try:
        await latency_phase(clients, sides, 20)  # warm-up: imports, connection pools, first-request caches
        for round_number in range(args.rounds):
            before = {name: cpu_seconds(side["pid"]) for name, side in sides.items()}
            timed_before = None if args.control else await time_in_meterline(clients["on"])
            for name, samples in (await latency_phase(clients, sides, args.latency_requests)).items():
                results[name]["latency"] += samples
            timed_after = None if args.control else await time_in_meterline(clients["on"])
            for step in STEPS if timed_after else ():  # what the 1-concurrent requests of this round added to each bucket
                results["on"]["timed"][step].append([(upper, after - before) for (upper, after), (_, before)
                                                     in zip(timed_after[step], timed_before[step], strict=True)])
            order = list(sides.items()) if round_number % 2 == 0 else list(reversed(sides.items()))
            for name, side in order:
                results[name]["back_to_back"] += await back_to_back_phase(clients[name], side["key"], args.latency_requests)
            for pair in range(args.steady_pairs):
                for name, side in order if pair % 2 == 0 else order[::-1]:
                    results[name]["steady"].append(await steady_phase(
                        clients[name], side["key"], args.steady_requests, args.concurrency, args.model_ms))
            for _ in range(args.load_windows):
                for name, window in (await load_window(clients, sides, args.load_seconds, args.concurrency)).items():
                    results[name]["windows"].append(window)
                    results[name]["requests"] += window[0]
            for name, side in sides.items():
                results[name]["cpu"] += cpu_seconds(side["pid"]) - before[name]
                results[name]["requests"] += 2 * args.latency_requests + args.steady_pairs * args.steady_requests
    finally:
        for client in clients.values():
            await client.aclose()
    return results


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(estimate, samples: list, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap: the interval `estimate(samples)` falls in when the samples are drawn
    again. A sample is a pair where the sides were measured together (request i on and request i
    off; one run per side seconds apart; one load window), keeping the pairing that cancels the
    machine's drift. Seeded: the same samples give the same interval."""
    draw = random.Random(0)
    estimates = sorted(estimate(draw.choices(samples, k=len(samples))) for _ in range(BOOTSTRAP_RESAMPLES))
    tail = (1 - confidence) / 2
    return estimates[round(tail * (BOOTSTRAP_RESAMPLES - 1))], estimates[round((1 - tail) * (BOOTSTRAP_RESAMPLES - 1))]


def added(pct: float):
    """The on - off difference of a latency percentile over pairs of runs measured together: a
    pair of requests at 1 concurrent, or a pair of steady-stream runs seconds apart. Requests in a
    steady run share its moment of the machine, so runs, not requests, are what is resampled
    (resampling their requests gave two identical proxies an interval that excluded zero)."""
    def difference(pairs: list[tuple[list[float], list[float]]]) -> float:
        return (percentile([latency for on, _ in pairs for latency in on], pct)
                - percentile([latency for _, off in pairs for latency in off], pct))
    return difference


def latency_row(label: str, latencies: dict[str, list[float]], pct: float, interval: tuple[float, float] | None) -> str:
    """A table row: the side's percentile, the difference on - off and its bootstrap interval."""
    off, on = percentile(latencies["off"], pct), percentile(latencies["on"], pct)
    spread = f" [{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else ""
    return f"| {label} (ms) | {off:.2f} | {on:.2f} | {on - off:+.2f} ms{spread} |"


def report(results: dict, args) -> str:
    on, off = results["on"], results["off"]
    alternating = [([on_ms], [off_ms]) for on_ms, off_ms in zip(on["latency"], off["latency"], strict=True)]
    sides = {phase: {"on": on[phase], "off": off[phase]} for phase in ("latency", "back_to_back")}
    sides["steady"] = {name: [latency for run in side["steady"] for latency in run] for name, side in results.items()}
    steady_runs = list(zip(on["steady"], off["steady"], strict=True))
    windows = list(zip(on["windows"], off["windows"], strict=True))
    rps = {name: statistics.median(answered / elapsed for answered, _, elapsed in side["windows"])
           for name, side in results.items()}
    ratios = [on_answered / off_answered for (on_answered, _, _), (off_answered, _, _) in windows]
    ratio_low, ratio_high = bootstrap_interval(statistics.median, ratios)
    loaded_cpu = {name: statistics.median(cpu / answered * 1000 for answered, cpu, _ in side["windows"])
                  for name, side in results.items()}
    capacity = [(off_cpu / off_answered) / (on_cpu / on_answered)
                for (on_answered, on_cpu, _), (off_answered, off_cpu, _) in windows]
    capacity_low, capacity_high = bootstrap_interval(statistics.median, capacity)
    cpu = {name: side["cpu"] / side["requests"] * 1000 for name, side in results.items()}
    steady = f"{args.concurrency} concurrent, {args.model_ms} ms model"
    lines = [
        "| measure | plugin off | plugin on | on - off / ratio [95% interval] |",
        "|---|---|---|---|",
        *(latency_row(f"p{pct} latency, 1 concurrent, alternating", sides["latency"], pct,
                      bootstrap_interval(added(pct), alternating)) for pct in (50, 99)),
        *(latency_row(f"p{pct} latency, back to back", sides["back_to_back"], pct, None) for pct in (50, 99)),
        *(latency_row(f"p{pct} latency, {steady}", sides["steady"], pct,
                      bootstrap_interval(added(pct), steady_runs))
          for pct in ((50, 99) if on["steady"] else ())),
        (f"| throughput, {args.concurrency} concurrent each, both sides at once (req/s) | {rps['off']:.1f} | {rps['on']:.1f} | "
         f"ratio {statistics.median(ratios):.3f} [{ratio_low:.3f}, {ratio_high:.3f}] (windows {min(ratios):.3f} to {max(ratios):.3f}) |"),
        (f"| proxy CPU per request in those windows (ms) | {loaded_cpu['off']:.2f} | {loaded_cpu['on']:.2f} | "
         f"{loaded_cpu['on'] - loaded_cpu['off']:+.2f} ms; capacity ratio off/on {statistics.median(capacity):.3f} "
         f"[{capacity_low:.3f}, {capacity_high:.3f}] |"),
        f"| proxy CPU per request, whole run (ms) | {cpu['off']:.2f} | {cpu['on']:.2f} | {cpu['on'] - cpu['off']:+.2f} ms |",
    ]
    for step in STEPS:  # the rounds' buckets added up
        rounds = on["timed"][step]
        if not rounds:  # an A/A run has no meterline to time
            continue
        summed = [(upper, sum(counts[i][1] for counts in rounds)) for i, (upper, _) in enumerate(rounds[0])]
        if summed[-1][1]:
            lines.append(f"| time in meterline, {step}, 1 concurrent: p50 / p99 (ms) | | "
                         f"{bucket_quantile(summed, 0.5) * 1000:.2f} / {bucket_quantile(summed, 0.99) * 1000:.2f} | |")
    samples = (f"{len(on['latency'])} + {len(on['back_to_back'])} latency samples at 1 concurrent, {len(sides['steady']['on'])} at "
               f"{args.concurrency} concurrent and {len(windows)} load windows of {args.load_seconds:g} s")
    counters = "counters in Redis" if args.redis else "counters in the ledger's database"
    customer = "a capped customer (reserve + settle)" if args.capped else "an unlimited customer (settle only)"
    return "\n".join(lines) + f"\n\n{samples}; ledger on SQLite, {counters}, {customer}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--load-windows", type=int, default=6, help="load windows (both sides at once) per round")
    parser.add_argument("--load-seconds", type=float, default=4.0, help="how long a load window lasts")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--model-ms", type=int, default=4000,
                        help="how long the upstream takes to answer in the steady-stream latency runs")
    parser.add_argument("--steady-requests", type=int, default=100, help="requests per steady-stream run")
    parser.add_argument("--steady-pairs", type=int, default=2, help="steady-stream runs per side and round")
    parser.add_argument("--deliver", choices=("v1", "v2"), default=None,
                        help="the plugin-on proxy's relay also delivers meter events to the Stripe emulator, "
                             "with v1 meter events or the v2 stream")
    parser.add_argument("--capped", action="store_true",
                        help="bill a customer on a capped plan, so every request also reserves before the call")
    parser.add_argument("--redis", action="store_true",
                        help="keep the spending counters in a real redis-server instead of the ledger's database")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="run both proxies on one CPU of their own and the rest on the others (default on)")
    parser.add_argument("--control", action="store_true",
                        help="an A/A run: the plugin off on both sides, to show the method's own noise")
    args = parser.parse_args()
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    # Pinned: the proxies share the last CPU and everything else (this load generator, the upstream,
    # redis-server, the Stripe emulator) runs on the others. The proxies then meet the same
    # neighbours, and in a load window, loaded together, each gets half of one CPU.
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus = {cpus[-1]} if args.pin and len(cpus) > 1 else None
    if proxy_cpus:
        os.sched_setaffinity(0, set(cpus[:-1]))
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
        with started_on(proxy_cpus):
            plugin_on = stack.enter_context(run_proxy(work / "on", upstream.base_url, url, env=env,
                                                      meterline_yaml=meterline_yaml, plugin=not args.control))
            plugin_off = stack.enter_context(run_proxy(work / "off", upstream.base_url, url, plugin=False))
        sides = {
            "on": {"url": plugin_on.base_url, "key": MASTER_KEY if args.control else key, "pid": plugin_on.process.pid},
            "off": {"url": plugin_off.base_url, "key": MASTER_KEY, "pid": plugin_off.process.pid},
        }
        results = asyncio.run(measure(sides, args))
        billed = sum(1 for _ in store.ledger_rows(engine, "bench"))
        delivered = len(emulator.meter_events()) if emulator else None
    print(report(results, args))
    if args.control:
        print("\nA/A control: both sides ran without meterline; the 'plugin on' column is a second plugin-off proxy.")
        return
    print(f"\nledger rows written by the plugin-on proxy: {billed} (expected {results['on']['requests'] + 20})")
    if delivered is not None:
        print(f"meter events at the Stripe emulator by the end of the run: {delivered}")


if __name__ == "__main__":
    main()
