"""Stripe's request parameters: the bracket form encoding of v1, and typed access to any decoded params.

The SDK flattens nested params into ``tiers[0][up_to]=inf``, ``recurring[interval]=month``,
``expand[0]=tiers`` (v1 bodies and every query string). `decode_form` / `decode_query` turn that back
into plain dicts and lists; `Params` then reads one field at a time and, when a value is wrong, raises
`InvalidParam` naming the parameter the way Stripe does (``tiers[1][up_to]``), so a caller's mistake
surfaces exactly as it would against the real API. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_SUBKEY = re.compile(r"\[([^\[\]]*)\]")
MAX_DECIMAL_PLACES = 12
"""Stripe accepts at most 12 decimal places in ``*_decimal`` amounts."""


class InvalidParam(Exception):
    """A request parameter Stripe would refuse with a 400 ``invalid_request_error``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# ------------------------------------------------------------------------------ decoding


def split_key(key: str) -> list[str]:
    """``tiers[0][up_to]`` -> ``["tiers", "0", "up_to"]``; an empty ``[]`` segment means "append"."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise InvalidParam(f"Invalid parameter name: {key!r}.", key)
    return [match.group(1), *_SUBKEY.findall(match.group(2))]


def decode_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Nest flat ``(key, value)`` pairs; containers whose keys are exactly 0..n-1 become lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        path = split_key(key)
        container = root
        for depth, segment in enumerate(path):
            if segment == "":
                segment = str(len(container))  # `expand[]=a&expand[]=b` appends
            last = depth == len(path) - 1
            existing = container.get(segment)
            if last:
                if existing is not None:
                    raise InvalidParam(f"Received a parameter twice: {key}.", key)
                container[segment] = value
            else:
                if existing is None:
                    existing = container[segment] = {}
                elif not isinstance(existing, dict):
                    raise InvalidParam(f"Invalid hash: {key} mixes a value and nested keys.", key)
                container = existing
    return _lists_from_indexed(root)


def _lists_from_indexed(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {key: _lists_from_indexed(value) for key, value in node.items()}
    if converted and set(converted) == {str(index) for index in range(len(converted))}:
        return [converted[str(index)] for index in range(len(converted))]
    return converted


def decode_form(body: bytes) -> dict[str, Any]:
    """A v1 ``application/x-www-form-urlencoded`` body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParam("The request body is not valid UTF-8.") from exc
    return decode_query(text)


def decode_query(query: str) -> dict[str, Any]:
    """A query string (GET params, in the same bracket notation)."""
    return decode_pairs(parse_qsl(query, keep_blank_values=True))


# ------------------------------------------------------------------------------ typed access


class Params:
    """Read decoded params field by field; every failure names the parameter as Stripe does."""

    def __init__(self, data: Mapping[str, Any], prefix: str = ""):
        if not isinstance(data, Mapping):
            raise InvalidParam(f"Invalid object: {prefix or 'the request'} must be a hash.", prefix or None)
        self.data = data
        self.prefix = prefix

    def name(self, key: str | int) -> str:
        return f"{self.prefix}[{key}]" if self.prefix else str(key)

    def has(self, key: str) -> bool:
        return key in self.data

    def only(self, *allowed: str) -> Params:
        """Refuse parameters this endpoint does not know (``expand`` is always allowed)."""
        for key in self.data:
            if key not in allowed and key != "expand":
                raise InvalidParam(f"Received unknown parameter: {self.name(key)}", self.name(key), "parameter_unknown")
        return self

    def _present(self, key: str, required: bool) -> Any:
        """The raw value, or None when absent (or an empty string, which Stripe reads as "unset")."""
        value = self.data.get(key)
        if value is None or value == "":
            if required:
                if value == "":
                    raise InvalidParam(
                        f"You passed an empty string for '{self.name(key)}'. We assume empty values are an attempt "
                        f"to unset a parameter; however '{self.name(key)}' cannot be unset.",
                        self.name(key), "parameter_invalid_empty",
                    )
                raise InvalidParam(f"Missing required param: {self.name(key)}.", self.name(key), "parameter_missing")
            return None
        return value

    def text(self, key: str, *, required: bool = False, max_length: int = 5000,
             choices: Iterable[str] | None = None) -> str | None:
        value = self._present(key, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise InvalidParam(f"Invalid string: {self.name(key)} must be a string.", self.name(key))
        if len(value) > max_length:
            raise InvalidParam(
                f"Invalid string: {value[:20]}...; must be at most {max_length} characters", self.name(key)
            )
        if choices is not None and value not in choices:
            options = ", ".join(f"`{choice}`" for choice in choices)
            raise InvalidParam(
                f"Invalid {self.name(key)}: must be one of {options}", self.name(key), "parameter_invalid_string"
            )
        return value

    def integer(self, key: str, *, required: bool = False, minimum: int | None = None) -> int | None:
        value = self._present(key, required)
        if value is None:
            return None
        number = parse_integer(value)
        if number is None:
            raise InvalidParam(f"Invalid integer: {value}", self.name(key), "parameter_invalid_integer")
        if minimum is not None and number < minimum:
            raise InvalidParam(
                f"Invalid integer: {self.name(key)} must be at least {minimum}", self.name(key),
                "parameter_invalid_integer",
            )
        return number

    def boolean(self, key: str) -> bool | None:
        value = self._present(key, False)
        if value is None or isinstance(value, bool):
            return value
        if value not in ("true", "false"):
            raise InvalidParam(f"Invalid boolean: {value}", self.name(key))
        return value == "true"

    def decimal(self, key: str, *, required: bool = False) -> Decimal | None:
        """A ``*_decimal`` amount (a string of at most 12 decimal places)."""
        value = self._present(key, required)
        if value is None:
            return None
        number = parse_decimal(value)
        if number is None or number < 0 or -number.as_tuple().exponent > MAX_DECIMAL_PLACES:  # type: ignore[operator]
            raise InvalidParam(
                f"Invalid decimal: {value}; a non-negative number with at most {MAX_DECIMAL_PLACES} decimal places",
                self.name(key),
            )
        return number

    def strings(self, key: str, *, required: bool = False) -> dict[str, str]:
        """A hash of strings, such as ``metadata`` or a meter event ``payload``."""
        value = self._present(key, required)
        if value is None:
            return {}
        if isinstance(value, list):  # `metadata[0]=x` decodes as a list; Stripe keys are strings
            value = {str(index): item for index, item in enumerate(value)}
        if not isinstance(value, Mapping):
            raise InvalidParam(f"Invalid hash: {self.name(key)} must be a hash of strings.", self.name(key))
        for item_key, item in value.items():
            if not isinstance(item, str):
                raise InvalidParam(
                    f"Invalid string: {self.name(key)}[{item_key}] must be a string.", f"{self.name(key)}[{item_key}]"
                )
        return dict(value)

    def texts(self, key: str) -> list[str]:
        """An array of strings, such as ``lookup_keys``."""
        value = self._present(key, False)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise InvalidParam(f"Invalid array: {self.name(key)} must be an array of strings.", self.name(key))
        return value

    def child(self, key: str, *, required: bool = False) -> Params | None:
        value = self._present(key, required)
        return None if value is None else Params(value, self.name(key))

    def children(self, key: str, *, required: bool = False) -> list[Params]:
        """An array of hashes, such as ``tiers`` or ``items``."""
        value = self._present(key, required)
        if value is None:
            return []
        if not isinstance(value, list):
            raise InvalidParam(f"Invalid array: {self.name(key)} must be an array indexed from 0.", self.name(key))
        return [Params(item, f"{self.name(key)}[{index}]") for index, item in enumerate(value)]


def parse_integer(value: Any) -> int | None:
    """An int from an int or a string of digits (with an optional sign); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit() and value.isascii():
        return int(value)
    return None


def parse_decimal(value: Any) -> Decimal | None:
    """A finite Decimal from a string or an int; None for anything else (floats included: no binary money)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None
