"""What every command group shares: the one error type for bad input, the parser that reports it
in one line, and argument types."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime
from fractions import Fraction

from plugin.settings import valid_customer_id


class BadInput(Exception):
    """The user asked for something invalid; the message is shown as is, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        raise BadInput(f"{self.prog}: {message}")


def customer_id_arg(value: str) -> str:
    if not valid_customer_id(value):
        raise argparse.ArgumentTypeError(
            f"invalid customer id {value!r} (letters, digits and _.@:- only, at most 64 characters)"
        )
    return value


def stripe_customer_id_arg(value: str) -> str:
    if not re.fullmatch(r"cus_[A-Za-z0-9]{1,250}", value):
        raise argparse.ArgumentTypeError(f"invalid Stripe customer id {value!r} (expected cus_...)")
    return value


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return int(value)


def iso_moment(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO date and time, e.g. 2026-11-15T00:00:00Z, got {value!r}") \
            from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def decimal_arg(value: str) -> str:
    if not re.fullmatch(r"\d{1,12}(\.\d{1,12})?", value):
        raise argparse.ArgumentTypeError(f"expected a non-negative decimal number, e.g. 0.0015, got {value!r}")
    return value


def credits_arg(value: str) -> Fraction:
    if not re.fullmatch(r"\d{1,12}(\.\d{1,6})?", value):
        raise BadInput(f"expected credits as a decimal number, e.g. 500 or 2.5, got {value!r}")
    return Fraction(value)
