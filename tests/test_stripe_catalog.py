"""Pure parts of Stripe delivery and setup: error classification, Stripe's time window, the catalog."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import aiohttp
import httpx
import pytest
import stripe
from aiohttp.client_reqrep import ConnectionKey

from plugin.settings import ConfigError, MeterlineConfig
from plugin.sinks.base import OutcomeKind
from plugin.sinks.stripe import classify_error, outside_window
from plugin.stripe.setup import Tier, catalog, exact_decimal

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def connection_error(cause: Exception) -> stripe.APIConnectionError:
    try:
        raise stripe.APIConnectionError("Unexpected error communicating with Stripe") from cause
    except stripe.APIConnectionError as error:
        return error


@pytest.mark.parametrize(("error", "kind", "uncertain"), [
    # Stripe's duplicate-identifier answer: 400, no code, no param, "do not retry": counted already
    (stripe.InvalidRequestError("An event already exists with identifier mtr_x.", None, http_status=400,
                                headers={"Stripe-Should-Retry": "false"}), OutcomeKind.DUPLICATE, False),
    # a code Stripe does not send for meter events is not taken for a duplicate: a 400 is a dead letter
    (stripe.InvalidRequestError("An event with identifier 'x' already exists", "identifier",
                                code="resource_already_exists", http_status=400), OutcomeKind.REJECTED, False),
    (stripe.InvalidRequestError("No such customer: 'cus_x'", "payload", code="resource_missing", http_status=400),
     OutcomeKind.REJECTED, False),
    (stripe.AuthenticationError("Invalid API Key provided: sk_test_****abcd", http_status=401),
     OutcomeKind.REJECTED, False),
    (stripe.RateLimitError("Too many requests", http_status=429, code="rate_limit"), OutcomeKind.RETRY, False),
    (stripe.APIError("Internal error", http_status=500), OutcomeKind.RETRY, True),
    (stripe.IdempotencyError("Keys for idempotent requests can only be used...", http_status=409),
     OutcomeKind.RETRY, True),
    (connection_error(httpx.ConnectError("refused")), OutcomeKind.RETRY, False),
    (connection_error(aiohttp.ClientConnectorError(ConnectionKey("127.0.0.1", 1, False, True, None, None, None),
                                                   ConnectionRefusedError(111, "refused"))), OutcomeKind.RETRY, False),
    (connection_error(aiohttp.ServerDisconnectedError()), OutcomeKind.RETRY, True),
    (connection_error(TimeoutError()), OutcomeKind.RETRY, True),
    (connection_error(httpx.ReadTimeout("slow")), OutcomeKind.RETRY, True),
    (connection_error(httpx.RemoteProtocolError("cut")), OutcomeKind.RETRY, True),
])
def test_stripe_errors_are_classified(error, kind, uncertain):
    outcome = classify_error(error)
    assert (outcome.kind, outcome.uncertain) == (kind, uncertain)
    assert "\n" not in outcome.reason and outcome.reason.startswith("stripe ")


@pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), ("Tue, 24 Nov 2026 12:00:30 GMT", 30.0), ("", None),
                                                ("soon", None)])
def test_retry_after_is_taken_from_a_429(header, seconds):
    error = stripe.RateLimitError("slow down", http_status=429, headers={"Retry-After": header})
    assert classify_error(error, NOW).retry_after == seconds


@pytest.mark.parametrize(("age", "refused"), [
    (timedelta(days=34, hours=23), False), (timedelta(days=35, seconds=1), True),
    (timedelta(minutes=-4, seconds=-59), False), (timedelta(minutes=-5, seconds=-1), True),
])
def test_stripe_time_window(age, refused):
    assert (outside_window(NOW - age, NOW) is not None) is refused


def plans(**pro) -> MeterlineConfig:
    return MeterlineConfig.model_validate({"plans": {"free": {"cap_credits": 100}, "pro": pro}})


def test_catalog_graduated_usage_price_and_flat_base_price():
    usage, base = catalog(plans(included_credits=10000, base_fee_usd="20", overage_usd_per_credit="0.002"))
    assert (usage.lookup_key, usage.kind, usage.currency) == ("meterline_pro_usage", "usage", "usd")
    # 10,000 credits = 10^10 µcr free, then $0.002 per credit = 0.2 cents per 10^6 µcr
    assert usage.tiers == (Tier(10_000_000_000, Decimal(0)), Tier(None, Decimal("0.0000002")))
    params = usage.create_params("prod_x", "mtr_1")
    assert params["tiers"] == [{"up_to": 10_000_000_000, "unit_amount_decimal": "0"},
                               {"up_to": "inf", "unit_amount_decimal": "0.0000002"}]
    assert params["recurring"] == {"interval": "month", "usage_type": "metered", "meter": "mtr_1"}
    assert params["transfer_lookup_key"] is True and params["tiers_mode"] == "graduated"
    assert (base.lookup_key, base.unit_amount) == ("meterline_pro_base", 2000)
    assert base.create_params("prod_x", "mtr_1")["recurring"] == {"interval": "month"}


def test_catalog_without_included_credits_has_one_tier_and_unpriced_plans_have_none():
    [usage] = catalog(plans(overage_usd_per_credit="0.01"))
    assert usage.tiers == (Tier(None, Decimal("0.000001")),)
    assert catalog(plans(included_credits=5)) == []


@pytest.mark.parametrize(("pro", "message"), [
    ({"overage_usd_per_credit": "0.00000000000001"}, "decimal places"),
    ({"base_fee_usd": "9.999"}, "whole cents"),
    ({"included_credits": "0.0000001", "overage_usd_per_credit": "1"}, "micro-credits"),
])
def test_catalog_refuses_what_stripe_cannot_represent_exactly(pro, message):
    with pytest.raises(ConfigError, match=message):
        catalog(plans(**pro))


def test_exact_decimal():
    assert exact_decimal(Fraction(1, 8), "x") == Decimal("0.125")
    with pytest.raises(ConfigError):
        exact_decimal(Fraction(1, 3), "x")


def test_idempotency_key_is_the_ledger_id_on_the_first_send_and_fresh_on_every_other():
    from plugin.sinks.base import MeterEvent
    from plugin.sinks.stripe import idempotency_key

    assert idempotency_key(MeterEvent("mtr_abc", "acme", 5, NOW, "cus_1")) == "mtr_abc"
    keys = {idempotency_key(MeterEvent("mtr_abc", "acme", 5, NOW, "cus_1", requeues=requeues, attempt=attempt))
            for requeues in range(3) for attempt in range(1, 4)}
    assert len(keys) == 9 and all(key.startswith("mtr_abc") and len(key) <= 255 for key in keys)
