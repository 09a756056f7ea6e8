"""Usage page tokens over plain values: they name one customer, are signed, and expire."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from plugin.rules.page_tokens import InvalidPageToken, _signature, mint, verify

SECRET = b"page-secret-for-tests"
NOW = datetime(2026, 3, 14, 15, 9, 26, 535_000, tzinfo=UTC)


def _payload(claims: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()


def test_a_token_names_its_customer_until_it_expires():
    token, expires_at = mint(SECRET, "acme", NOW, 3600)
    assert token.startswith("mlp_") and re.fullmatch(r"mlp_[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token)  # URL-safe as is
    assert expires_at == datetime(2026, 3, 14, 16, 9, 26, tzinfo=UTC)  # whole seconds
    assert verify(SECRET, token, NOW) == "acme"
    assert verify(SECRET, token, expires_at - timedelta(seconds=1)) == "acme"


def test_an_expired_token_is_refused_and_says_when_it_expired():
    token, expires_at = mint(SECRET, "acme", NOW, 60)
    with pytest.raises(InvalidPageToken, match="expired at 2026-03-14 15:10 UTC"):
        verify(SECRET, token, expires_at)


def test_a_tampered_payload_is_refused():
    token, _ = mint(SECRET, "acme", NOW, 3600)
    signature = token.partition(".")[2]
    other = "mlp_" + _payload({"c": "globex", "e": int(NOW.timestamp()) + 3600}) + "." + signature
    with pytest.raises(InvalidPageToken, match="not valid"):
        verify(SECRET, other, NOW)


def test_a_tampered_signature_is_refused():
    token, _ = mint(SECRET, "acme", NOW, 3600)
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(InvalidPageToken, match="not valid"):
        verify(SECRET, flipped, NOW)


def test_a_token_signed_with_another_secret_is_refused():
    token, _ = mint(b"someone-else", "acme", NOW, 3600)
    with pytest.raises(InvalidPageToken, match="not valid"):
        verify(SECRET, token, NOW)


def test_a_signed_but_malformed_payload_is_refused():
    """Only reachable with the secret, but the checks after the signature must not trust the payload."""
    for claims in ({"c": "", "e": 1}, {"c": "acme", "e": "soon"}, {"c": "acme", "e": True}, {"c": "acme"}, [1]):
        payload = _payload(claims)
        with pytest.raises(InvalidPageToken, match="damaged"):
            verify(SECRET, f"mlp_{payload}.{_signature(SECRET, payload)}", NOW)


@pytest.mark.parametrize("garbage", ["", "mlp_", "mlp_.", "sk-abc", "mlp_abc", "mlp_!!.??", "mlp_ä.ö", "x" * 5000])
def test_garbage_is_refused_with_a_message(garbage):
    with pytest.raises(InvalidPageToken) as refused:
        verify(SECRET, garbage, NOW)
    assert str(refused.value)


def test_minting_needs_a_customer_and_a_lifetime():
    with pytest.raises(ValueError):
        mint(SECRET, "", NOW, 60)
    with pytest.raises(ValueError):
        mint(SECRET, "acme", NOW, 0)
