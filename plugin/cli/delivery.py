"""`meterline relay` and `meterline outbox list|retry`: meter events on their way to the sink."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import UTC, datetime
from typing import TextIO

from plugin import runtime
from plugin.cli.common import BadInput, customer_id_arg, positive_int
from plugin.ledger import store
from plugin.outbox import store as outbox_store
from plugin.outbox.retry import Status


def _sink(meterline: runtime.Meterline):
    sink = meterline.sink()
    if sink is None:
        raise BadInput("no sink configured: set STRIPE_API_KEY (and METERLINE_STRIPE_API_BASE for a local server) "
                       "or METERLINE_SINK=openmeter with METERLINE_OPENMETER_URL")
    return sink


def cmd_relay(args, out: TextIO) -> None:
    """Deliver outbox events: drain what is due and exit (--once), or keep running until SIGINT/SIGTERM."""
    meterline = runtime.current()
    relay = meterline.relay(_sink(meterline))

    async def once():
        try:
            return await relay.drain()
        finally:
            await relay.sink.aclose()

    async def forever():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        print(f"relay {relay.worker} delivering to {relay.sink.name}; Ctrl-C to stop", file=sys.stderr)
        try:
            await relay.run(stop)
        finally:
            await relay.sink.aclose()

    if args.once:
        report = asyncio.run(once())
        print(f"relay {relay.worker}: {report.summary()}", file=out)
    else:
        asyncio.run(forever())


def _event_json(event) -> dict:
    def when(value):
        return None if value is None else store.as_utc(value).isoformat()

    return {
        "id": event.id, "customer_id": event.customer_id, "value_ucr": event.value_ucr, "status": event.status,
        "attempts": event.attempts, "occurred_at": when(event.occurred_at),
        "next_attempt_at": when(event.next_attempt_at), "first_attempt_at": when(event.first_attempt_at),
        "uncertain": bool(event.uncertain), "last_error": event.last_error,
    }


def cmd_outbox_list(args, out: TextIO) -> None:
    engine = runtime.current().engine
    events = outbox_store.list_events(engine, status=args.status, customer_id=args.customer, limit=args.limit)
    if args.json:
        for event in events:
            print(json.dumps(_event_json(event)), file=out)
        return
    stats = outbox_store.stats(engine)
    depth = ", ".join(f"{count} {status}" for status, count in stats.depth.items() if count) or "empty"
    print(f"outbox: {depth}; oldest waiting {stats.oldest_age_seconds(datetime.now(UTC)):.0f} s", file=out)
    for event in events:
        print(f"{event.id}\t{event.customer_id}\t{event.value_ucr}\t{event.status}\t{event.attempts}\t"
              f"{event.last_error or '-'}", file=out)


def cmd_outbox_retry(args, out: TextIO) -> None:
    if bool(args.ids) == args.all_dead:
        raise BadInput("meterline outbox retry: give event ids or --all-dead (not both)")
    count = outbox_store.requeue(runtime.current().engine, now=datetime.now(UTC), ids=args.ids,
                                 all_dead=args.all_dead, force=args.force)
    if args.ids and count < len(args.ids):
        print(f"{len(args.ids) - count} event(s) were not dead or held (unknown ones need --force: resending "
              "them may bill twice)", file=sys.stderr)
    print(f"{count} event(s) queued for delivery", file=out)


def register(commands) -> None:
    relay = commands.add_parser("relay", help="deliver meter events to the sink (Stripe, OpenMeter)")
    relay.add_argument("--once", action="store_true", help="drain what is due now, then exit")
    relay.set_defaults(run=cmd_relay)

    outbox = commands.add_parser("outbox", help="meter events waiting for delivery").add_subparsers(
        dest="action", required=True)
    outbox_list = outbox.add_parser("list", help="undelivered events (or one status)")
    outbox_list.add_argument("--status", choices=[status.value for status in Status], default=None)
    outbox_list.add_argument("--customer", type=customer_id_arg, default=None)
    outbox_list.add_argument("--limit", type=positive_int, default=100)
    outbox_list.add_argument("--json", action="store_true")
    outbox_list.set_defaults(run=cmd_outbox_list)
    retry = outbox.add_parser("retry", help="re-queue dead (or held) events")
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all-dead", action="store_true")
    retry.add_argument("--force", action="store_true", help="also re-queue `unknown` events (may bill twice)")
    retry.set_defaults(run=cmd_outbox_retry)
