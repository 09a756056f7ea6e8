"""The console's refresh at 10,000 customers: what a refresh costs the UI thread, and the fleet's
fetch + parse, against a real API on a real database.

The database is bench/usage_query.py's (10 million ledger rows over --customers customers, generated
there and kept in --data; run that first); the API is its bare uvicorn app mounting meterline's
router (the same route code as the proxy). The console runs headless (Textual's `run_test`), with
the real client, at --size.

Measured, per refresh (--refreshes of them, after a warm-up):
  - fetch + parse: `ConsoleClient.fleet()` (HTTP, uncompressed on loopback, msgspec) plus the ↑/↓
    markers, which the poll worker does off the UI thread (but in the same process);
  - the poll worker inside the console: the same plus filtering and sorting for the table;
  - UI thread: the CPU time of `CustomersScreen.paint` (hand the ordered lines to the table, keep the
    cursor on its customer) plus the next screen update that draws the visible lines, with a filter
    on and the sort changed every other refresh (CPU time: the wall time of a headless
    test includes idle waits for the next frame);
  - memory: what one refresh's data holds (traced on one more refresh, outside the timings), and the
    process's peak RSS.

Run: .venv/bin/python bench/tui_refresh.py [--data DIR] [--customers 10000] [--refreshes 30]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import usage_query  # noqa: E402

from tui.app import make_app  # noqa: E402
from tui.client import ConsoleClient  # noqa: E402
from tui.fleet_view import FleetLine, mark_moves  # noqa: E402
from tui.screens.customers import CustomersScreen  # noqa: E402


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    return (f"p50 {statistics.median(ordered) * 1000:.1f} ms, p90 {ordered[int(len(ordered) * 0.9)] * 1000:.1f} ms, "
            f"max {ordered[-1] * 1000:.1f} ms (n={len(ordered)})")


async def measure(base: str, args) -> dict:
    client = ConsoleClient(base, usage_query.MASTER_KEY, timeout=60)
    fetches = []
    previous: list[FleetLine] = []
    for _ in range(args.refreshes):
        started = time.perf_counter()
        lines = (await client.fleet(FleetLine)).customers
        mark_moves(previous, lines)
        fetches.append(time.perf_counter() - started)
        previous = lines
    await client.aclose()

    app = make_app(ConsoleClient(base, usage_query.MASTER_KEY, timeout=60), refresh_seconds=3600,
                   freeze_heap=True)  # as `meterline tui` runs it
    painting: list[float] = []
    worker: list[float] = []
    async with app.run_test(size=args.size) as pilot:
        for _ in range(200):  # bounded: the first poll answers within seconds
            await pilot.pause(0.1)
            if isinstance(app.screen, CustomersScreen) and app.screen.lines:
                break
        screen: CustomersScreen = app.screen
        count = len(screen.lines)
        screen.filter_input.value = "cust-0"  # a filter that keeps about a tenth
        await pilot.pause()
        for number in range(args.refreshes):
            if number % 2:
                screen.table.sort_by("period" if number % 4 == 1 else "hour")
            started = time.perf_counter()
            refresh = await screen.fetch()  # the poll worker's part: HTTP, parse, markers, filter, sort
            fetched = time.perf_counter()
            cpu = time.process_time()
            screen.paint(refresh)
            await pilot.pause()  # the screen update that draws the visible lines
            painting.append(time.process_time() - cpu)
            worker.append(fetched - started)
        # memory, outside the timed refreshes (tracing slows Python several times): what one more
        # refresh's data holds once the previous one is gone
        tracemalloc.start()
        screen.paint(await screen.fetch())
        await pilot.pause()
        traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return {"customers": count, "fetch": fetches, "paint": painting, "worker": worker, "traced_mb": traced[0] / 1e6,
            "traced_peak_mb": traced[1] / 1e6,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "meterline-bench-usage")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--refreshes", type=int, default=30)
    parser.add_argument("--size", type=lambda text: tuple(int(part) for part in text.split("x")), default=(160, 50))
    args = parser.parse_args()
    shape = usage_query.Shape(args.rows, args.customers, round(args.rows * 0.06), 45, 1.0, 7)  # usage_query.py defaults
    database = args.data / f"sqlite-{shape.key}.db"
    if not database.exists():
        print(f"no database at {database}: run bench/usage_query.py --db sqlite first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as workdir, \
            usage_query.running_app(Path(workdir), f"sqlite:///{database}") as base:
        found = asyncio.run(measure(base, args))
    print(f"{found['customers']:,} customers, terminal {args.size[0]}x{args.size[1]}")
    print(f"  fetch + parse (HTTP, msgspec, markers):         {ms(found['fetch'])}")
    print(f"  poll worker, in the console (+ filter, sort):   {ms(found['worker'])}")
    print(f"  UI thread per refresh, CPU (paint + draw):      {ms(found['paint'])}")
    print(f"  memory: one refresh's data {found['traced_mb']:.0f} MB (peak while making it "
          f"{found['traced_peak_mb']:.0f} MB), "
          f"process peak RSS {found['max_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
