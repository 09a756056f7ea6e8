"""`meterline ledger import` at scale: a million-row CSV into a fresh SQLite ledger.

The file: --rows rows of --customers customers (rank k gets a share proportional to 1/k, so a few
customers hold most rows, as real fleets do), spread evenly over the --days days before the current
calendar month (all of it history the import accepts), in time order as `meterline ledger export`
writes it, ids random (LiteLLM's call ids are UUIDs: the worst order for the ledger's primary key).
Six models, 40 actions, members per customer in proportion to the square root of its rows.

Timed, in this process, through the service the CLI calls (plugin/services/ledger_import.py): a dry
run (every row checked and staged, ids looked up in the ledger, nothing written), then the import
itself (the same, then the one transaction: rows into the ledger, the usage rollups, the commit; its
time is reported apart, as on SQLite it holds the write lock). Afterwards the ledger's row count and
the rollups' totals are checked against the file's, and the outbox found empty.

Run: .venv/bin/python bench/ledger_import.py [--rows 1000000] [--customers 300] [--days 180] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import pstats
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, select  # noqa: E402

from plugin.ledger import store  # noqa: E402
from plugin.ledger.models import LedgerEntry, UsageDay, UsageHour  # noqa: E402
from plugin.rules.ledger_import import COLUMNS  # noqa: E402
from plugin.rules.plans import calendar_month  # noqa: E402
from plugin.runtime import Meterline  # noqa: E402
from plugin.services import ledger_import  # noqa: E402
from plugin.services.ledger_import import import_ledger  # noqa: E402
from plugin.settings import MeterlineConfig, Settings  # noqa: E402

MODELS = [("gpt-4o-mini", "openai", 1), ("gpt-4o", "openai", 15), ("claude-3-5-haiku", "anthropic", 5),
          ("claude-sonnet-4", "anthropic", 20), ("gemini-2.0-flash", "gemini", 1), ("o3-mini", "openai", 8)]
ACTIONS = [f"{area}.{verb}" for area in ("chat", "search", "docs", "mail", "code", "support", "sales", "ops")
           for verb in ("summarize", "draft", "classify", "answer", "extract")]


def write_file(path: Path, rows: int, customers: int, days: int, now: datetime, seed: int = 7) -> int:
    """The CSV; returns its total µcr."""
    rng = random.Random(seed)
    weights = [1 / rank for rank in range(1, customers + 1)]
    names = [f"cust-{rank:04d}" for rank in range(1, customers + 1)]
    expected = {name: weight / sum(weights) * rows for name, weight in zip(names, weights, strict=True)}
    members = {name: [f"user-{index}" for index in range(max(1, int(share ** 0.5)))]
               for name, share in expected.items()}
    end = calendar_month(now).start
    start = end - timedelta(days=days)
    step = (end - start).total_seconds() / rows
    total = 0
    with path.open("w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(COLUMNS)
        picked = rng.choices(names, weights, k=rows)
        for index, customer in enumerate(picked):
            model, provider, multiplier = rng.choice(MODELS)
            prompt, completion = rng.randint(20, 4000), rng.randint(1, 1500)
            cached = rng.randint(0, prompt) if rng.random() < 0.2 else 0
            hit = rng.random() < 0.03
            credits = 0 if hit else (prompt + completion) * multiplier * 100
            total += credits
            writer.writerow([
                f"chatcmpl-{rng.getrandbits(128):032x}", customer, rng.choice(members[customer]), rng.choice(ACTIONS),
                model, provider, prompt, completion, cached, credits, (prompt + completion) * multiplier,
                "true" if hit else "false", (prompt + completion) * multiplier * 100 if hit else 0,
                "true" if rng.random() < 0.4 else "false",
                (start + timedelta(seconds=index * step)).isoformat(timespec="microseconds"),
            ])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--profile", action="store_true", help="cProfile the import; top functions by own time")
    args = parser.parse_args()
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="meterline-import-") as folder:
        path = Path(folder) / "history.csv"
        began = time.perf_counter()
        total_ucr = write_file(path, args.rows, args.customers, args.days, now)
        print(f"file: {args.rows:,} rows, {args.customers} customers, {args.days} days, "
              f"{path.stat().st_size / 1e6:.0f} MB, written in {time.perf_counter() - began:.1f} s")
        meterline = Meterline(settings=Settings(database_url=f"sqlite:///{Path(folder) / 'ledger.db'}", relay=False),
                              config=MeterlineConfig.model_validate({"plans": {"pro": {"included_credits": 1000}}}))
        for rank in range(1, args.customers + 1):
            store.add_customer(meterline.engine, f"cust-{rank:04d}", "pro")

        locked = []
        load = ledger_import._load

        def timed_load(*args):  # the one transaction: on SQLite, the time the write lock is held
            began = time.perf_counter()
            try:
                return load(*args)
            finally:
                locked.append(time.perf_counter() - began)

        ledger_import._load = timed_load
        for label, dry_run in (("dry run", True), ("import", False)):
            profile = cProfile.Profile() if args.profile and not dry_run else None
            cpu, began = time.process_time(), time.perf_counter()
            if profile is not None:
                profile.enable()
            result = import_ledger(meterline, path, now, dry_run=dry_run)
            if profile is not None:
                profile.disable()
            wall, cpu = time.perf_counter() - began, time.process_time() - cpu
            assert not result.bad_rows and result.rows == args.rows, result
            under_lock = "" if dry_run else f"; of it in the one transaction (write lock held): {locked[0]:.1f} s"
            print(f"{label}: {wall:.1f} s wall, {cpu:.1f} s CPU, {args.rows / wall:,.0f} rows/s{under_lock}")
            if profile is not None:
                text = io.StringIO()
                pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(20)
                print(text.getvalue())

        with meterline.engine.connect() as connection:
            rows = connection.execute(select(func.count()).select_from(LedgerEntry)).scalar_one()
            hours = connection.execute(select(func.sum(UsageHour.requests), func.sum(UsageHour.credits_ucr))).one()
            days = connection.execute(select(func.sum(UsageDay.requests), func.sum(UsageDay.credits_ucr))
                                      .where(UsageDay.dimension == "model")).one()
            outbox = connection.execute(select(func.count()).select_from(store._OUTBOX)).scalar_one()
        assert rows == args.rows and tuple(hours) == tuple(days) == (args.rows, total_ucr) and outbox == 0, \
            (rows, hours, days, outbox)
        print(f"checked: {rows:,} ledger rows, rollups {hours[0]:,} requests / {hours[1]:,} µcr as in the file, "
              f"no outbox rows; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        meterline.close()


if __name__ == "__main__":
    main()
