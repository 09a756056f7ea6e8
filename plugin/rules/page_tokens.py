"""Signed links to a customer's usage page (`GET /usage/page?token=`), minted with the master key.

A token is `mlp_<payload>.<signature>`, both parts unpadded URL-safe base64: the payload is the JSON
`{"c": customer id, "e": expiry in whole Unix seconds}`, the signature an HMAC-SHA256 over
`mlp_<payload>` with the page secret. Stateless on purpose: nothing is stored, so a token cannot be
revoked one by one; it expires, and changing the secret revokes them all. Pure: the clock is passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime

PREFIX = "mlp_"


class InvalidPageToken(ValueError):
    """A token that is malformed, not signed with our secret, or expired; the message is for a person."""


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, payload: str) -> str:
    return _encode(hmac.new(secret, (PREFIX + payload).encode(), hashlib.sha256).digest())


def mint(secret: bytes, customer_id: str, now: datetime, ttl_seconds: int) -> tuple[str, datetime]:
    """A token naming `customer_id`, valid from `now` (aware) for `ttl_seconds`; returns (token, expires_at)."""
    if not customer_id or ttl_seconds <= 0:
        raise ValueError("a page token needs a customer id and a positive lifetime")
    expires = int(now.timestamp()) + ttl_seconds
    payload = _encode(json.dumps({"c": customer_id, "e": expires}, separators=(",", ":")).encode())
    return f"{PREFIX}{payload}.{_signature(secret, payload)}", datetime.fromtimestamp(expires, UTC)


def verify(secret: bytes, token: str, now: datetime) -> str:
    """The customer id a token names, if we signed it and it has not expired at `now`; else InvalidPageToken."""
    payload, dot, signature = token.removeprefix(PREFIX).partition(".")
    if not token.startswith(PREFIX) or not dot:
        raise InvalidPageToken("This is not a usage page token.")
    if not hmac.compare_digest(signature.encode(), _signature(secret, payload).encode()):
        raise InvalidPageToken("This usage page link is not valid: ask for a new one.")
    try:
        claims = json.loads(_decode(payload))
        customer_id, expires = claims["c"], claims["e"]
    except (ValueError, KeyError, TypeError):  # bad base64, bad JSON, not an object
        raise InvalidPageToken("This usage page link is damaged: ask for a new one.") from None
    if not isinstance(customer_id, str) or not customer_id or type(expires) is not int:
        raise InvalidPageToken("This usage page link is damaged: ask for a new one.")
    if now.timestamp() >= expires:
        ended = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
        raise InvalidPageToken(f"This usage page link expired at {ended}: ask for a new one.")
    return customer_id
