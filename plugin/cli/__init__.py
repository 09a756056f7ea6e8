"""The `meterline` command: one module per command group, each with a `register(commands)`.
Exit 0 on success, 2 on bad input (one line on stderr), 1 on failure."""

from __future__ import annotations

import sys
from typing import TextIO

import stripe
from sqlalchemy.exc import SQLAlchemyError

from plugin.cli import (
    customers,
    delivery,
    demo,
    invoices,
    keys,
    ledger,
    limits,
    migrate,
    pricing,
    reconcile,
    stripe_commands,
    tui,
    usage,
)
from plugin.cli.common import BadInput, Parser
from plugin.counters.base import CounterError
from plugin.ledger import store
from plugin.settings import ConfigError

GROUPS = (customers, keys, usage, limits, ledger, delivery, reconcile, invoices, migrate, pricing, stripe_commands,
          tui, demo)


def build_parser() -> Parser:
    parser = Parser(prog="meterline", description="Usage-based billing inside the LiteLLM proxy.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
        args.run(args, out)
    except (BadInput, ConfigError, store.StoreError) as problem:
        print(str(problem).splitlines()[0], file=sys.stderr)
        return 2
    except CounterError as problem:  # the message names the backend and the error class, no addresses
        print(f"meterline: spending counters unreachable ({problem}); check METERLINE_REDIS_URL", file=sys.stderr)
        return 1
    except stripe.StripeError as problem:  # Stripe masks keys in its messages; keep one line
        print(f"meterline: Stripe refused: {' '.join(str(problem.user_message or problem).split())[:300]}",
              file=sys.stderr)
        return 1
    except SQLAlchemyError as problem:  # the message may carry connection details: name the class only
        print(f"meterline: database error ({problem.__class__.__name__}); check METERLINE_DATABASE_URL "
              "and that the database is running", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
