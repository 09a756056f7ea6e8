"""The emulator as a process: parse the command line, serve until SIGTERM/SIGINT, exit 0."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator

import uvicorn

from plugin.stripe.emulator.app import create_app
from plugin.stripe.emulator.clock import AdjustableClock
from plugin.stripe.emulator.invoices import DEFAULT_GRACE_SECONDS
from plugin.stripe.emulator.state import EmulatorState
from plugin.stripe.emulator.store import WEBHOOK_MODES
from plugin.stripe.emulator.webhooks import WebhookSender

READY_POLL_SECONDS = 0.01


class _Server(uvicorn.Server):
    """uvicorn, except that a stop signal ends `serve` normally instead of being re-raised afterwards."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class BadArguments(Exception):
    """A command line we cannot run; the message is one line for stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like the `meterline` command
        raise BadArguments(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stripe-emulator", description="A local Stripe-compatible server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111, help="0 picks a free port (printed when ready)")
    parser.add_argument("--webhook-url", help="POST signed Stripe events here")
    parser.add_argument("--webhook-secret", default=os.environ.get("STRIPE_WEBHOOK_SECRET"),
                        help="signing secret for --webhook-url (default: $STRIPE_WEBHOOK_SECRET)")
    parser.add_argument("--strict-concurrency", action=argparse.BooleanOptionalAction, default=True,
                        help="429 when two v1 meter events of one customer and meter overlap (default: on)")
    parser.add_argument("--webhook-mode", choices=WEBHOOK_MODES, default="snapshot",
                        help="snapshot: v1 events with the object inline; thin: v2 notifications, as Stripe's event "
                             "destinations send (default: snapshot)")
    parser.add_argument("--invoice-grace-seconds", type=int, default=DEFAULT_GRACE_SECONDS,
                        help="how long a subscription's draft invoice waits before it finalizes itself "
                             f"(default: {DEFAULT_GRACE_SECONDS}, Stripe's hour)")
    return parser


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts so a busy port is one clear error (and --port 0 works)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def serve(server: uvicorn.Server, sock: socket.socket) -> None:
    """Serve on `sock`, and print the ready line once uvicorn accepts connections."""
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(READY_POLL_SECONDS)
    if server.started:
        host, port = sock.getsockname()[:2]
        print(f"stripe emulator listening on http://{host}:{port}", flush=True)
    await task


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.webhook_url and not args.webhook_secret:
            parser.error("--webhook-url needs --webhook-secret (or STRIPE_WEBHOOK_SECRET): Stripe signs every webhook")
        if args.invoice_grace_seconds < 0:
            parser.error("--invoice-grace-seconds must be 0 or more")
    except BadArguments as exc:
        print(exc, file=sys.stderr)
        return 2
    webhooks = WebhookSender(args.webhook_url, args.webhook_secret) if args.webhook_url else None
    state = EmulatorState(AdjustableClock(), strict_concurrency=args.strict_concurrency,
                          on_event=webhooks.publish if webhooks else None, webhook_mode=args.webhook_mode,
                          invoice_grace_seconds=args.invoice_grace_seconds)
    config = uvicorn.Config(create_app(state, webhooks=webhooks), access_log=False, log_level="warning",
                            lifespan="on")
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        print(f"stripe-emulator: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    server = _Server(config)
    with sock, asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(serve(server, sock))
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
