"""Metering: parsing a provider's usage object, and turning a finished call into its ledger row."""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin.rules.metering import (
    FinishedCall,
    bill,
    prompt_token_bound,
    usage_from_openai,
)
from plugin.rules.pricing import CreditRule, PriceBook, ProviderPrice, Usage, Weights

M = 1_000_000
WHEN = datetime(2025, 3, 14, 15, 9, 26, tzinfo=UTC)

# ------------------------------------------------------------------ usage_from_openai


@pytest.mark.parametrize("raw", [None, {}])
def test_no_usage_at_all_is_none(raw):
    assert usage_from_openai(raw) is None


def test_plain_usage_without_details():
    assert usage_from_openai({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}) == Usage(
        prompt_tokens=10, completion_tokens=5
    )


def test_full_openai_usage_object():
    raw = {
        "prompt_tokens": 1000, "completion_tokens": 300, "total_tokens": 1300,
        "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 100, "image_tokens": 50},
        "completion_tokens_details": {"reasoning_tokens": 120, "audio_tokens": 30,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }
    assert usage_from_openai(raw) == Usage(
        prompt_tokens=1000, completion_tokens=300, cached_tokens=400, reasoning_tokens=120,
        audio_input_tokens=100, image_input_tokens=50, audio_output_tokens=30,
    )


def test_none_values_count_as_zero():
    raw = {
        "prompt_tokens": None, "completion_tokens": 5,
        "prompt_tokens_details": None,
        "completion_tokens_details": {"reasoning_tokens": None, "audio_tokens": None},
    }
    assert usage_from_openai(raw) == Usage(completion_tokens=5)


def test_details_that_are_not_mappings_are_ignored():
    raw = {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": [1, 2], "completion_tokens_details": "x"}
    assert usage_from_openai(raw) == Usage(prompt_tokens=10, completion_tokens=2)


def test_over_reported_subsets_are_clamped_to_their_totals():
    raw = {
        "prompt_tokens": 100, "completion_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 150, "audio_tokens": 50, "image_tokens": 7},
        "completion_tokens_details": {"reasoning_tokens": 99, "audio_tokens": 30},
    }
    usage = usage_from_openai(raw)
    assert usage == Usage(
        prompt_tokens=100, completion_tokens=20, cached_tokens=100, reasoning_tokens=20,
        audio_input_tokens=0, image_input_tokens=0, audio_output_tokens=20,
    )


def test_input_subsets_clamped_in_order_cached_audio_image():
    raw = {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 60, "audio_tokens": 30, "image_tokens": 30}}
    usage = usage_from_openai(raw)
    assert (usage.cached_tokens, usage.audio_input_tokens, usage.image_input_tokens) == (60, 30, 10)
    assert usage.classes().text_input == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [(12, 12), (12.0, 12), (12.5, 0), (-3, 0), (-3.0, 0), (True, 0), (False, 0), ("12", 0), ([12], 0), (float("nan"), 0)],
)
def test_token_counts_of_odd_types(value, expected):
    assert usage_from_openai({"prompt_tokens": value}).prompt_tokens == expected
    assert usage_from_openai({"completion_tokens": value}).completion_tokens == expected


json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens"]), json_scalar),
    st.one_of(json_scalar, st.dictionaries(st.sampled_from(["cached_tokens", "audio_tokens", "image_tokens"]), json_scalar)),
    st.one_of(json_scalar, st.dictionaries(st.sampled_from(["reasoning_tokens", "audio_tokens"]), json_scalar)),
)
def test_any_provider_usage_parses_to_a_consistent_usage(top, prompt_details, completion_details):
    raw = dict(top, prompt_tokens_details=prompt_details, completion_tokens_details=completion_details)
    usage = usage_from_openai(raw)  # Usage's own checks reject anything inconsistent
    assert isinstance(usage, Usage)
    classes = usage.classes()
    assert min(vars(classes).values()) >= 0
    assert sum(vars(classes).values()) == usage.total_tokens


# ------------------------------------------------------------------ bill

TOKENS_RULE = CreditRule(
    basis="tokens", tokens_per_credit=Fraction(1000),
    weights=Weights(input=Fraction(1), cached_input=Fraction(1, 10), output=Fraction(4)),
)
COST_RULE = CreditRule(basis="cost", markup=Fraction(3, 10), credits_per_usd=Fraction(1000))
BOOK = PriceBook(
    default_rule=TOKENS_RULE,
    rules={"resold": COST_RULE, "unpriced": COST_RULE, "zero": CreditRule(weights=Weights(*[Fraction(0)] * 6))},
    prices={
        "small": ProviderPrice(input=Fraction(15, 100 * M), output=Fraction(60, 100 * M)),
        "resold": ProviderPrice(input=Fraction(15, 100 * M), output=Fraction(60, 100 * M)),
    },
    model_cost={
        "openai/gpt-x": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06},
        "gpt-y": {"input_cost_per_token": 3e-06, "output_cost_per_token": 5e-06},
    },
)


def call(model: str = "small", usage: Usage | None = None, **kwargs) -> FinishedCall:
    defaults = dict(
        ledger_id="req-1", customer_id="acme", member="alice", action="chat", model=model,
        usage=usage if usage is not None else Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=200),
        finished_at=WHEN, provider="openai",
    )
    defaults.update(kwargs)
    return FinishedCall(**defaults)


def test_bill_normal_call():
    record = bill(call(), BOOK)
    entry = record.entry
    # tokens basis: 800 x 1 + 200 x 0.1 + 500 x 4 = 2820 weighted tokens
    assert entry.credits_ucr == 2_820_000
    # provider cost: 1000 x 0.15/M + 500 x 0.60/M = 450 µUSD (no cached rate: input rate)
    assert entry.provider_cost_uusd == 450
    assert (entry.cache_hit, entry.saved_ucr) == (False, 0)
    assert (entry.id, entry.customer_id, entry.member, entry.action, entry.model, entry.provider) == (
        "req-1", "acme", "alice", "chat", "small", "openai"
    )
    assert (entry.prompt_tokens, entry.completion_tokens, entry.cached_tokens, entry.reasoning_tokens) == (1000, 500, 200, 0)
    assert entry.created_at == WHEN
    assert (entry.stream, entry.usage_source) == (False, "provider")
    assert record.alert is None


def test_bill_records_reasoning_tokens_without_charging_them_twice():
    usage = Usage(prompt_tokens=0, completion_tokens=500, reasoning_tokens=300)
    entry = bill(call(usage=usage), BOOK).entry
    assert entry.reasoning_tokens == 300
    assert entry.credits_ucr == 2 * M  # 500 x 4, reasoning already inside


def test_bill_cost_basis_uses_provider_price():
    entry = bill(call(model="resold"), BOOK).entry
    assert entry.provider_cost_uusd == 450
    assert entry.credits_ucr == 585_000  # 450 µUSD x 1.3 x 1000 credits/USD


def test_bill_price_from_deployment_model_in_litellm_table():
    usage = Usage(prompt_tokens=1000, completion_tokens=1000)
    entry = bill(call(model="my-alias", deployment_model="openai/gpt-x", usage=usage), BOOK).entry
    assert entry.provider_cost_uusd == 3000  # 1000 x 1 + 1000 x 2 µUSD


def test_bill_price_from_unprefixed_deployment_model():
    usage = Usage(prompt_tokens=1000, completion_tokens=1000)
    entry = bill(call(model="my-alias", deployment_model="azure/gpt-y", usage=usage), BOOK).entry
    assert entry.provider_cost_uusd == 8000  # table knows "gpt-y": 1000 x 3 + 1000 x 5 µUSD


def test_bill_cache_hit_costs_nothing_and_records_the_saving():
    record = bill(call(cache_hit=True), BOOK)
    entry = record.entry
    assert entry.cache_hit is True
    assert entry.credits_ucr == 0
    assert entry.provider_cost_uusd == 0
    assert entry.saved_ucr == 2_820_000  # what the same call costs without the cache
    assert record.alert is None


def test_bill_stream_and_usage_source_are_recorded():
    entry = bill(call(stream=True, usage_source="litellm", provider=""), BOOK).entry
    assert (entry.stream, entry.usage_source, entry.provider) == (True, "litellm", "-")


def test_unpriced_model_on_cost_basis_raises_an_alert():
    record = bill(call(model="unpriced"), BOOK)
    assert record.entry.credits_ucr == 0
    assert record.entry.provider_cost_uusd == 0
    assert record.alert is not None
    assert "1500 tokens" in record.alert
    assert "'unpriced'" in record.alert
    assert "no provider price" in record.alert
    assert "meterline.yaml" in record.alert


def test_rule_that_yields_zero_raises_an_alert_naming_the_rule():
    record = bill(call(model="zero"), BOOK)
    assert record.entry.credits_ucr == 0
    assert record.alert is not None and "'zero'" in record.alert


def test_no_alert_for_a_cache_hit_on_an_unpriced_model():
    record = bill(call(model="unpriced", cache_hit=True), BOOK)
    assert record.entry.credits_ucr == 0 and record.entry.saved_ucr == 0
    assert record.alert is None


def test_no_alert_for_zero_tokens():
    record = bill(call(model="unpriced", usage=Usage()), BOOK)
    assert record.entry.credits_ucr == 0
    assert record.alert is None


def test_tokens_basis_model_without_provider_price_is_billed_without_alert():
    record = bill(call(model="no-price-anywhere"), BOOK)
    assert record.entry.credits_ucr == 2_820_000
    assert record.entry.provider_cost_uusd == 0
    assert record.alert is None


def test_responses_api_usage_counts_cached_tokens_inside_input_tokens():
    usage = usage_from_openai({
        "input_tokens": 100, "output_tokens": 30,
        "input_tokens_details": {"cached_tokens": 60}, "output_tokens_details": {"reasoning_tokens": 10},
    })
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, usage.reasoning_tokens) == (100, 60, 30, 10)


def test_anthropic_usage_adds_cache_reads_and_writes_beside_input_tokens():
    usage = usage_from_openai({
        "input_tokens": 20, "output_tokens": 7, "cache_read_input_tokens": 500, "cache_creation_input_tokens": 40,
    })
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (560, 500, 7)


def test_chat_shape_wins_when_both_shapes_are_present():
    usage = usage_from_openai({"prompt_tokens": 9, "completion_tokens": 2, "input_tokens": 999, "output_tokens": 999})
    assert (usage.prompt_tokens, usage.completion_tokens) == (9, 2)


def test_a_long_stream_with_nothing_countable_raises_an_alert():
    record = bill(call(usage=Usage(), stream=True, chunks=40), BOOK)
    assert record.entry.credits_ucr == 0
    assert "a stream of 40 chunks" in record.alert
    assert bill(call(usage=Usage(), stream=True, chunks=2), BOOK).alert is None  # e.g. an empty answer


def test_cache_hit_flat_fee_is_billed_and_never_more_than_the_call_would_cost():
    from dataclasses import replace

    book = replace(BOOK, cache_hit_fee_ucr=10_000)
    record = bill(call(cache_hit=True), book)
    full = bill(call(), BOOK).entry.credits_ucr
    assert record.entry.credits_ucr == 10_000
    assert record.entry.saved_ucr == full - 10_000
    assert record.entry.provider_cost_uusd == 0
    tiny = bill(call(cache_hit=True, usage=Usage(prompt_tokens=1)), replace(BOOK, cache_hit_fee_ucr=10**12))
    assert tiny.entry.saved_ucr == 0 and tiny.entry.credits_ucr == bill(call(usage=Usage(prompt_tokens=1)), BOOK).entry.credits_ucr


# ------------------------------------------------------------------ a bound on the prompt's tokens

plain_text = st.text(max_size=200)
plain_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]),
         "content": st.one_of(plain_text, st.lists(st.builds(lambda text: {"type": "text", "text": text}, plain_text),
                                                  max_size=3))},
        optional={"name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True)},
    ),
    min_size=1, max_size=5,
)


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-3.5-turbo", "claude-3-5-sonnet-20240620"])
@settings(max_examples=150, deadline=None)
@given(messages=plain_messages)
def test_the_prompt_bound_is_never_below_litellms_count(model, messages):
    """Admission may price a capped request on the bound instead of LiteLLM's count: it must never be lower."""
    import litellm

    assert prompt_token_bound(messages) >= litellm.token_counter(model=model, messages=messages)


@pytest.mark.parametrize("messages", [
    None, [], "hi", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
    [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
    [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}],
    [{"role": "tool", "content": "42", "tool_call_id": "1"}], [{"role": "user", "content": 7}],
    [{"role": "user", "content": "hi", "name": 3}], ["hi"],
])
def test_the_prompt_bound_declines_anything_but_plain_text(messages):
    assert prompt_token_bound(messages) is None


def test_the_prompt_bound_counts_bytes_and_a_template_allowance():
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": None, "name": "bot"},
                {"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "\ud800"}]}]
    # 8 per prompt + 3 x 8 per message + bytes: "user" 4 + "héllo" 6, "assistant" 9 + "bot" 3,
    # "user" 4 + "ab" 2 + a lone surrogate 3 (as sent in JSON; it must not fail)
    assert prompt_token_bound(messages) == 8 + 24 + 10 + 12 + 9
