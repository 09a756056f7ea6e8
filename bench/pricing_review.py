"""`meterline pricing review` at scale: a million-row SQLite ledger, reviewed over two 90-day windows.

The ledger: --rows rows of --customers customers on three plans, --models models, spread evenly over
the last 2 x --days days (so every row is in one of the two windows the review reads), each with
credits and a provider cost. Rows are written with plain SQL in one transaction (the review reads
the ledger's rows, not the rollups, so the rollup trigger is left out of the set-up to keep it short).

Timed, in this process, through the service the CLI calls (plugin/services/pricing.py `review`): the
whole answer, cold (first run) and warm (the database pages in the OS cache).

Run: .venv/bin/python bench/pricing_review.py [--rows 1000000] [--customers 1000] [--models 20] [--days 90]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugin.runtime import Meterline  # noqa: E402
from plugin.services.pricing import review  # noqa: E402
from plugin.settings import MeterlineConfig, Settings  # noqa: E402

PLANS = {"pro": {"included_credits": "1000", "overage_usd_per_credit": "0.002"},
         "scale": {"overage_tiers": [{"up_to_credits": "10000", "usd_per_credit": "0.0015"},
                                     {"usd_per_credit": "0.001"}]},
         "flat": {"metered": False}}


def build(meterline: Meterline, rows: int, customers: int, models: int, days: int, now: datetime) -> None:
    engine = meterline.engine
    plans = list(PLANS)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TRIGGER IF EXISTS meterline_ledger_rollups")
        connection.exec_driver_sql(
            "INSERT INTO customers (id, plan, created_at) VALUES (?, ?, ?)",
            [(f"c{n}", plans[n % len(plans)], now.isoformat(sep=" ")) for n in range(customers)])
    random.seed(19)
    span = 2 * days * 86_400
    batch = []
    with engine.begin() as connection:
        for n in range(rows):
            at = now - timedelta(seconds=span * (n + 0.5) / rows)
            batch.append((f"r{n:08d}", f"c{random.randrange(customers)}", f"model-{random.randrange(models)}",
                          random.randrange(1, 5000) * 1000, random.randrange(1, 5000), at.isoformat(sep=" ")))
            if len(batch) == 50_000:
                connection.exec_driver_sql(
                    "INSERT INTO ledger (id, customer_id, model, credits_ucr, provider_cost_uusd, created_at, member,"
                    " action, provider, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cache_hit,"
                    " saved_ucr, stream, usage_source, history) VALUES (?, ?, ?, ?, ?, ?, '-', '-', '-', 0, 0, 0, 0,"
                    " 0, 0, 0, 'provider', 0)", batch)
                batch.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--days", type=int, default=90)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        settings = Settings(database_url=f"sqlite:///{directory}/ledger.db", relay=False)
        meterline = Meterline(settings=settings, config=MeterlineConfig.model_validate({"plans": PLANS}))
        now = datetime.now(UTC)
        started = time.perf_counter()
        build(meterline, args.rows, args.customers, args.models, args.days, now)
        print(f"ledger: {args.rows:,} rows, {args.customers:,} customers, {args.models} models, "
              f"built in {time.perf_counter() - started:.1f} s")
        for run in ("cold", "warm"):
            started = time.perf_counter()
            found = review(meterline, now, days=args.days, drift_pct=Fraction(10))
            took = time.perf_counter() - started
            print(f"review ({run}): {took:.2f} s, {len(found['models'])} models, {len(found['plans'])} plans")
        with meterline.engine.connect() as connection:
            counted = connection.exec_driver_sql("SELECT count(*) FROM ledger").scalar_one()
        assert counted == args.rows, counted
        meterline.close()


if __name__ == "__main__":
    main()
