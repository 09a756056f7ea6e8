"""Who is billed for a request: pure rules over the key, the headers and two lookups.

Rules (DESIGN.md "who is billed"):
- a meterline customer key bills its customer;
- the operator's master key bills the customer named in `X-Meterline-Customer` (trusted
  backend mode); without the master key that header is ignored;
- a LiteLLM virtual key bills the `meterline_customer` in its key or team metadata.
"""

from __future__ import annotations

import copy
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

CUSTOMER_HEADER = "x-meterline-customer"
ACTION_HEADER = "x-meterline-action"
METADATA_KEY = "meterline_customer"
NO_LABEL = "-"

Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class Identity:
    """The outcome of authentication. `customer_id` None = operator traffic naming nobody."""

    customer_id: str | None
    operator: bool


class AuthFailure(Exception):
    """Authentication refused; `reason` is the machine-readable error type."""

    def __init__(self, reason: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


class UnknownKey(Exception):
    """Not a meterline key: raised (instead of a 401) when LiteLLM's own key auth should decide."""


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                value = candidate
                break
    value = value.strip() if isinstance(value, str) else None
    return value or None


def is_master_key(api_key: str | None, master_key: str | None) -> bool:
    """Constant-time comparison, so response timing does not leak the master key."""
    return bool(api_key and master_key) and hmac.compare_digest(api_key.encode(), master_key.encode())


def identify(
    api_key: str | None,
    headers: Mapping[str, str],
    master_key: str | None,
    customer_for_secret: Callable[[str], str | None],
    customer_exists: Callable[[str], bool],
    defer_unknown_keys: bool = False,
) -> Identity:
    """Resolve the caller or raise AuthFailure. The lookups are the only I/O, passed in."""
    if not api_key:
        raise AuthFailure("invalid_api_key", "No API key was sent. Pass your meterline key as a Bearer token.")
    if is_master_key(api_key, master_key):
        named = _header(headers, CUSTOMER_HEADER)
        if named is None:
            return Identity(customer_id=None, operator=True)
        if not customer_exists(named):
            raise AuthFailure(
                "unknown_customer",
                f"X-Meterline-Customer names an unknown customer ({named!r}). "
                "Create it with `meterline customers add` first.",
                status=400,
            )
        return Identity(customer_id=named, operator=True)
    customer = customer_for_secret(api_key)
    if customer is not None:
        return Identity(customer_id=customer, operator=False)
    if defer_unknown_keys:
        raise UnknownKey()
    raise AuthFailure("invalid_api_key", "This API key is unknown or has been revoked. Ask your operator for a valid key.")


def customer_from_metadata(key_metadata: object, team_metadata: object) -> str | None:
    """The customer a LiteLLM key belongs to: key metadata first, then team metadata."""
    for metadata in (key_metadata, team_metadata):
        if isinstance(metadata, Mapping):
            value = metadata.get(METADATA_KEY)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def request_labels(body: Mapping[str, object], headers: Mapping[str, str]) -> tuple[str, str]:
    """(member, action) of a request: member = OpenAI `user`; action = metadata.action or header."""
    member = body.get("user")
    metadata = body.get("metadata")
    action = metadata.get("action") if isinstance(metadata, Mapping) else None
    if not isinstance(action, str) or not action.strip():
        action = _header(headers, ACTION_HEADER)
    return (
        member.strip()[:255] if isinstance(member, str) and member.strip() else NO_LABEL,
        action.strip()[:255] if isinstance(action, str) and action.strip() else NO_LABEL,
    )


class Template(Generic[Model]):
    """A validated model to hand out copies of, each with lists, dicts and sets of its own (one level
    deep): what a request's handling changes in its copy reaches neither the template nor other
    copies. Copying skips the validation, which for LiteLLM's 120-field UserAPIKeyAuth costs five
    times as much."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self._mutable = tuple(name for name, value in model.__dict__.items() if isinstance(value, (dict, list, set)))

    def copy(self) -> Model:
        return self._model.model_copy(update={name: copy.copy(getattr(self._model, name)) for name in self._mutable})
