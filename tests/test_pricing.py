"""Pricing: hand-computed charges, the rounding rule, and properties of the money path."""

from __future__ import annotations

import ast
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from plugin.rules.pricing import (
    CreditRule,
    LinearPrice,
    ProviderPrice,
    Usage,
    Weights,
    _half_up,
    price,
    price_from_model_cost,
    round_half_up,
    usd_per_token_from_table,
)
from plugin.runtime import build_price_book
from plugin.settings import MeterlineConfig

M = 1_000_000
PRICING_PY = Path(__file__).resolve().parents[1] / "plugin" / "rules" / "pricing.py"

# The documented default weights of meterline.yaml, as exact Fractions.
WEIGHTS = Weights(
    input=Fraction(1), cached_input=Fraction(1, 10), output=Fraction(4),
    audio_input=Fraction(8), audio_output=Fraction(16), image_input=Fraction(2),
)
TOKENS = CreditRule(basis="tokens", tokens_per_credit=Fraction(1000), weights=WEIGHTS)
COST = CreditRule(basis="cost", markup=Fraction(3, 10), credits_per_usd=Fraction(1000))


def usd_per_million(value: str) -> Fraction:
    return Fraction(value) / M


# ------------------------------------------------------------------ round_half_up


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Fraction(0), 0),
        (Fraction(1, 2), 1),
        (Fraction(3, 2), 2),
        (Fraction(5, 2), 3),
        (Fraction(499_999, 1_000_000), 0),
        (Fraction(7, 3), 2),
        (Fraction(8, 3), 3),
        (Fraction(10), 10),
        (Fraction(-1, 2), -1),
        (Fraction(-5, 2), -3),
        (Fraction(-7, 3), -2),
        (Fraction(-8, 3), -3),
        (Fraction(-499_999, 1_000_000), 0),
        (Fraction(2 * 10**30 + 1, 2), 10**30 + 1),  # big values stay exact
    ],
)
def test_round_half_up_table(value, expected):
    result = round_half_up(value)
    assert result == expected
    assert type(result) is int


# ------------------------------------------------------------------ tokens basis, by hand


def test_tokens_basis_plain_input_and_output():
    # 1000 input x 1 + 500 output x 4 = 3000 weighted tokens = 3 credits.
    charge = price(Usage(prompt_tokens=1000, completion_tokens=500), TOKENS, None)
    assert charge.credits_ucr == 3 * M
    assert charge.exact_ucr == 3 * M
    assert charge.provider_cost_uusd == 0
    assert charge.priced is False


def test_cached_tokens_priced_at_cached_weight_only():
    # 600 fresh x 1 + 400 cached x 0.1 = 640 weighted tokens (NOT 1000 + 40).
    charge = price(Usage(prompt_tokens=1000, cached_tokens=400), TOKENS, None)
    assert charge.credits_ucr == 640_000


def test_reasoning_tokens_are_not_added_on_top_of_completion():
    # 500 completion tokens, 300 of which are reasoning: 500 x 4 = 2000, not 800 x 4.
    charge = price(Usage(completion_tokens=500, reasoning_tokens=300), TOKENS, None)
    assert charge.credits_ucr == 2 * M


def test_audio_and_image_classes_have_their_own_weights():
    usage = Usage(
        prompt_tokens=1000, cached_tokens=100, audio_input_tokens=200, image_input_tokens=100,
        completion_tokens=300, audio_output_tokens=100,
    )
    # text in 600 x 1 + cached 100 x 0.1 + audio in 200 x 8 + image 100 x 2
    # + text out 200 x 4 + audio out 100 x 16 = 600 + 10 + 1600 + 200 + 800 + 1600 = 4810
    assert price(usage, TOKENS, None).credits_ucr == 4_810_000


def test_tokens_basis_rounds_half_up_once_at_the_end():
    one_token = Usage(prompt_tokens=1)
    unit = Weights(input=Fraction(1))
    assert price(one_token, CreditRule(tokens_per_credit=Fraction(2 * M), weights=unit), None).credits_ucr == 1  # 0.5
    assert price(one_token, CreditRule(tokens_per_credit=Fraction(4 * M), weights=unit), None).credits_ucr == 0  # 0.25
    assert price(one_token, CreditRule(tokens_per_credit=Fraction(4 * M, 3), weights=unit), None).credits_ucr == 1  # 0.75
    three = Usage(prompt_tokens=3)
    rule = CreditRule(tokens_per_credit=Fraction(2 * M), weights=unit)
    assert price(three, rule, None).exact_ucr == Fraction(3, 2)
    assert price(three, rule, None).credits_ucr == 2


# ------------------------------------------------------------------ cost basis, by hand


def test_cost_basis_input_and_output():
    provider = ProviderPrice(input=usd_per_million("0.15"), output=usd_per_million("0.60"))
    charge = price(Usage(prompt_tokens=1000, completion_tokens=500), COST, provider)
    # 1000 x 0.15/M + 500 x 0.60/M = 0.00045 USD = 450 µUSD; x 1.3 x 1000 credits/USD = 0.585 credits
    assert charge.provider_cost_uusd == 450
    assert charge.credits_ucr == 585_000
    assert charge.exact_ucr == Fraction(585_000)
    assert charge.priced is True


def test_cost_basis_subset_classes_own_rate_or_text_rate():
    provider = ProviderPrice(
        input=usd_per_million("2"), output=usd_per_million("8"),
        cached_input=usd_per_million("1"), audio_input=None,
        image_input=usd_per_million("5"), audio_output=usd_per_million("30"),
    )
    usage = Usage(
        prompt_tokens=1000, cached_tokens=100, audio_input_tokens=200, image_input_tokens=100,
        completion_tokens=300, audio_output_tokens=100,
    )
    # text in 600 x 2 + cached 100 x 1 + audio in 200 x 2 (no own rate: text input rate)
    # + image 100 x 5 + text out 200 x 8 + audio out 100 x 30 = 6800 µUSD
    charge = price(usage, COST, provider)
    assert charge.provider_cost_uusd == 6800
    assert charge.credits_ucr == 6800 * 13 * 100  # x 1.3 x 1000 credits/USD x 1e6 / 1e6


def test_cost_basis_audio_output_without_own_rate_uses_output_rate():
    provider = ProviderPrice(input=usd_per_million("1"), output=usd_per_million("10"))
    charge = price(Usage(completion_tokens=100, audio_output_tokens=40), COST, provider)
    assert charge.provider_cost_uusd == 1000


def test_cached_tokens_not_also_charged_at_input_rate_on_cost_basis():
    provider = ProviderPrice(input=usd_per_million("2"), output=usd_per_million("8"), cached_input=usd_per_million("1"))
    # 600 x 2 + 400 x 1 = 1600 µUSD (not 1000 x 2 + 400 x 1 = 2400)
    assert price(Usage(prompt_tokens=1000, cached_tokens=400), COST, provider).provider_cost_uusd == 1600


@pytest.mark.parametrize(
    ("tokens", "usd_per_token", "expected_uusd"),
    [
        (1, Fraction(1, 2 * M), 1),  # 0.5 µUSD -> 1
        (3, Fraction(1, 2 * M), 2),  # 1.5 -> 2
        (1, Fraction(1, 4 * M), 0),  # 0.25 -> 0
        (2, Fraction(1, 4 * M), 1),  # 0.5 -> 1
        (7, Fraction(1, 10 * M), 1),  # 0.7 -> 1
    ],
)
def test_provider_cost_in_uusd_rounds_half_up(tokens, usd_per_token, expected_uusd):
    provider = ProviderPrice(input=usd_per_token, output=Fraction(0))
    assert price(Usage(prompt_tokens=tokens), COST, provider).provider_cost_uusd == expected_uusd


def test_cost_basis_without_provider_price_is_zero_and_unpriced():
    charge = price(Usage(prompt_tokens=1000, completion_tokens=1000), COST, None)
    assert (charge.credits_ucr, charge.provider_cost_uusd, charge.priced) == (0, 0, False)


# ------------------------------------------------------------------ price book from meterline.yaml


def test_build_price_book_per_model_override_inherits_the_rest():
    config = MeterlineConfig.model_validate({
        "pricing": {
            "basis": "tokens", "tokens_per_credit": 1000, "markup": "0.30", "credits_per_usd": 1000,
            "weights": {"input": "1", "cached_input": "0.1", "output": "4",
                        "audio_input": "8", "audio_output": "16", "image_input": "1"},
            "models": {
                "cheap": {"weights": {"output": "2"}},
                "resold": {"basis": "cost"},
                "dense": {"tokens_per_credit": "500"},
            },
        },
        "prices": {"resold": {"input": "0.15", "output": "0.60"}},
    })
    book = build_price_book(config)
    usage = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=200)
    # default rule: 800 x 1 + 200 x 0.1 + 500 x 4 = 2820 weighted tokens
    assert book.charge(usage, "other").credits_ucr == 2_820_000
    # override on output weight only: 800 + 20 + 500 x 2 = 1820
    assert book.charge(usage, "cheap").credits_ucr == 1_820_000
    assert book.rule_for("cheap").weights.cached_input == Fraction(1, 10)
    # override on tokens_per_credit only: 2820 / 500
    assert book.charge(usage, "dense").credits_ucr == 5_640_000
    # override on basis; markup and credits_per_usd inherited; price from meterline.yaml prices
    # (no cached rate: the 200 cached tokens are charged at the input rate)
    resold = book.charge(usage, "resold")
    assert resold.provider_cost_uusd == 450  # 1000 x 0.15 + 500 x 0.60
    assert resold.credits_ucr == 585_000
    assert book.rule_for("resold").markup == Fraction(3, 10)


def test_price_book_prefers_meterline_prices_then_litellm_table_then_deployment():
    config = MeterlineConfig.model_validate({"prices": {"mine": {"input": "1", "output": "2"}}})
    table = {
        "mine": {"input_cost_per_token": 9e-06, "output_cost_per_token": 9e-06},
        "openai/gpt-x": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07},
    }
    book = build_price_book(config, table)
    assert book.price_for("mine").input == Fraction(1, M)
    assert book.price_for("alias", "openai/gpt-x").output == Fraction(6, 10 * M)
    assert book.price_for("nobody") is None
    assert book.price_for(None, "") is None


# ------------------------------------------------------------------ LiteLLM price table


def test_price_from_model_cost_converts_floats_exactly():
    entry = {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07, "cache_read_input_token_cost": 7.5e-08}
    provider = price_from_model_cost(entry)
    assert provider.input == Fraction(15, 100_000_000)
    assert provider.output == Fraction(6, 10_000_000)
    assert provider.cached_input == Fraction(75, 1_000_000_000)
    assert provider.audio_input is None and provider.audio_output is None and provider.image_input is None
    # a million input tokens at $0.15/M is exactly 150000 µUSD, no float residue
    charge = price(Usage(prompt_tokens=M), COST, provider)
    assert charge.provider_cost_uusd == 150_000
    assert charge.exact_ucr == Fraction(150_000 * 13 * 100)


def test_price_from_model_cost_without_token_rates_is_none():
    assert price_from_model_cost({"input_cost_per_second": 0.0001}) is None
    assert price_from_model_cost({}) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (True, None), (0, Fraction(0)), (3, Fraction(3)), (1e-06, Fraction(1, M)), ("2.5e-6", Fraction(25, 10 * M))],
)
def test_usd_per_token_from_table(value, expected):
    assert usd_per_token_from_table(value) == expected


# ------------------------------------------------------------------ no floats on the money path


def test_pricing_module_has_no_float_literal_and_no_float_call():
    tree = ast.parse(PRICING_PY.read_text())
    float_literals = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, float)]
    float_calls = [
        node.lineno for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "float"
    ]
    assert float_literals == []
    assert float_calls == []


def test_price_stays_exact_when_every_input_is_int_or_fraction():
    """Plain ints are valid rationals: the exact amount must stay a Fraction, never a float.

    Fails today: with int weights and an int tokens_per_credit, `price()` divides int by int
    (`weighted * UCR_PER_CREDIT / rule.tokens_per_credit`) and gets a float.
    """
    int_weights = Weights(input=1, cached_input=1, output=1, audio_input=1, audio_output=1, image_input=1)
    charge = price(Usage(prompt_tokens=1), CreditRule(tokens_per_credit=3, weights=int_weights), None)
    assert isinstance(charge.exact_ucr, Fraction), f"exact_ucr is {type(charge.exact_ucr).__name__}: {charge.exact_ucr!r}"
    assert charge.exact_ucr == Fraction(M, 3)
    assert charge.credits_ucr == 333_333
    # A large call where the float quotient lands on .5 and rounds the wrong way:
    # exact = 8000009871e6 / 10001 = 799920995000.49975..., must round down.
    big = price(Usage(prompt_tokens=8_000_009_871), CreditRule(tokens_per_credit=10_001, weights=int_weights), None)
    assert big.credits_ucr == 799_920_995_000


def test_price_with_fraction_and_int_mix_on_cost_basis_is_exact():
    provider = ProviderPrice(input=Fraction(3, 20 * M), output=Fraction(0), cached_input=Fraction(3, 40 * M))
    rule = CreditRule(basis="cost", markup=0, credits_per_usd=1000)
    charge = price(Usage(prompt_tokens=1000, cached_tokens=1000), rule, provider)
    assert isinstance(charge.exact_ucr, Fraction)
    assert charge.provider_cost_uusd == 75  # 1000 cached x 0.075/M; nothing at the input rate


# ------------------------------------------------------------------ properties

small = st.integers(min_value=0, max_value=10_000)
ratio = st.builds(Fraction, st.integers(min_value=0, max_value=50), st.integers(min_value=1, max_value=20))
positive_ratio = st.builds(Fraction, st.integers(min_value=1, max_value=5_000), st.integers(min_value=1, max_value=20))


@st.composite
def usages(draw):
    prompt = draw(small)
    cached = draw(st.integers(0, prompt))
    audio_in = draw(st.integers(0, prompt - cached))
    image_in = draw(st.integers(0, prompt - cached - audio_in))
    completion = draw(small)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
        reasoning_tokens=draw(st.integers(0, completion)), audio_input_tokens=audio_in,
        image_input_tokens=image_in, audio_output_tokens=draw(st.integers(0, completion)),
    )


weights_st = st.builds(
    Weights, input=ratio, cached_input=ratio, output=ratio, audio_input=ratio, audio_output=ratio, image_input=ratio
)
rules = st.one_of(
    st.builds(CreditRule, basis=st.just("tokens"), tokens_per_credit=positive_ratio, weights=weights_st),
    st.builds(CreditRule, basis=st.just("cost"), markup=ratio, credits_per_usd=positive_ratio),
)
per_token = st.builds(Fraction, st.integers(0, 100), st.integers(1, 10**7))
provider_prices = st.one_of(
    st.none(),
    st.builds(
        ProviderPrice, input=per_token, output=per_token, cached_input=st.none() | per_token,
        audio_input=st.none() | per_token, audio_output=st.none() | per_token, image_input=st.none() | per_token,
    ),
)


def expected_exact(usage: Usage, rule: CreditRule, provider: ProviderPrice | None) -> Fraction:
    """An independent statement of the formula, class by class."""
    text_in = usage.prompt_tokens - usage.cached_tokens - usage.audio_input_tokens - usage.image_input_tokens
    text_out = usage.completion_tokens - usage.audio_output_tokens
    if rule.basis == "tokens":
        w = rule.weights
        weighted = (text_in * w.input + usage.cached_tokens * w.cached_input + usage.audio_input_tokens * w.audio_input
                    + usage.image_input_tokens * w.image_input + text_out * w.output + usage.audio_output_tokens * w.audio_output)
        return Fraction(weighted) * M / rule.tokens_per_credit
    if provider is None:
        return Fraction(0)
    p = provider
    own = lambda rate, fallback: fallback if rate is None else rate  # noqa: E731
    usd = (text_in * p.input + usage.cached_tokens * own(p.cached_input, p.input)
           + usage.audio_input_tokens * own(p.audio_input, p.input) + usage.image_input_tokens * own(p.image_input, p.input)
           + text_out * p.output + usage.audio_output_tokens * own(p.audio_output, p.output))
    return Fraction(usd) * (1 + rule.markup) * rule.credits_per_usd * M


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(usages(), rules, provider_prices), min_size=1, max_size=40))
def test_sum_of_rounded_charges_never_drifts(calls):
    exact_total = Fraction(0)
    billed_total = 0
    for usage, rule, provider in calls:
        charge = price(usage, rule, provider)
        exact = expected_exact(usage, rule, provider)
        assert charge.exact_ucr == exact
        assert abs(charge.credits_ucr - exact) <= Fraction(1, 2)
        exact_total += exact
        billed_total += charge.credits_ucr
    assert abs(billed_total - exact_total) <= Fraction(len(calls), 2)
    assert abs(billed_total - exact_total) <= len(calls)


@settings(max_examples=300, deadline=None)
@given(usages(), rules, provider_prices)
def test_amounts_are_always_plain_ints(usage, rule, provider):
    charge = price(usage, rule, provider)
    assert type(charge.credits_ucr) is int
    assert type(charge.provider_cost_uusd) is int
    assert charge.credits_ucr >= 0 and charge.provider_cost_uusd >= 0


@settings(max_examples=500, deadline=None)
@given(usages(), rules, provider_prices)
def test_linear_price_charges_exactly_what_price_charges(usage, rule, provider):
    """The billing path's integer form (PriceBook.charge) against the reference, to the last µcr and µUSD."""
    assert LinearPrice.of(rule, provider).charge(usage) == price(usage, rule, provider)


@pytest.mark.parametrize(("numerator", "denominator"),
                         [(1, 2), (3, 2), (-1, 2), (-3, 2), (5, 3), (-5, 3), (0, 7), (7, 7)])
def test_integer_half_up_matches_round_half_up(numerator, denominator):
    assert _half_up(numerator, denominator) == round_half_up(Fraction(numerator, denominator))


def test_price_book_charge_is_price_of_the_model_rule_and_price():
    book = build_price_book(MeterlineConfig.model_validate({"pricing": {"tokens_per_credit": 7}}),
                            {"gpt-x": {"input_cost_per_token": 3e-07, "output_cost_per_token": 1.2e-06}})
    usage = Usage(prompt_tokens=1234, completion_tokens=567, cached_tokens=200)
    expected = price(usage, book.rule_for("grp"), book.price_for("grp", "openai/gpt-x", "gpt-x"))
    assert expected.provider_cost_uusd == 1051 and expected.priced  # 1034 x 0.3 + 200 x 0.3 + 567 x 1.2 µUSD
    assert book.charge(usage, "grp", "openai/gpt-x") == expected
    assert book.charge(usage, "grp", "openai/gpt-x") == expected  # remembered, same answer
    rule, group_price = book.rule_for("gpt-x"), book.price_for("gpt-x")
    assert book.token_rates("gpt-x") == (price(Usage(prompt_tokens=1), rule, group_price).exact_ucr,
                                         price(Usage(completion_tokens=1), rule, group_price).exact_ucr)
    assert book.token_rates("gpt-x") == (Fraction(1_000_000, 7), Fraction(4_000_000, 7))  # default weights 1 and 4


FIELDS = list(Usage.__dataclass_fields__)


@given(st.sampled_from(FIELDS), st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=1e6))
def test_usage_rejects_floats(field, value):
    with pytest.raises(TypeError):
        Usage(**{field: value})


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", [True, Fraction(1), "1", None])
def test_usage_rejects_non_int_types(field, value):
    with pytest.raises(TypeError):
        Usage(**{field: value})


@given(st.sampled_from(FIELDS), st.integers(max_value=-1))
def test_usage_rejects_negative_counts(field, value):
    with pytest.raises(ValueError):
        Usage(**{field: value})


@given(small, st.integers(min_value=1, max_value=100), st.sampled_from(["cached_tokens", "audio_input_tokens", "image_input_tokens"]))
def test_usage_rejects_input_subsets_larger_than_prompt(prompt, excess, field):
    with pytest.raises(ValueError):
        Usage(prompt_tokens=prompt, **{field: prompt + excess})


@given(small, small, small)
def test_usage_rejects_input_subsets_that_together_exceed_prompt(cached, audio, image):
    total = cached + audio + image
    assume(total > 0)
    with pytest.raises(ValueError):
        Usage(prompt_tokens=total - 1, cached_tokens=cached, audio_input_tokens=audio, image_input_tokens=image)


@given(small, st.integers(min_value=1, max_value=100), st.sampled_from(["reasoning_tokens", "audio_output_tokens"]))
def test_usage_rejects_output_subsets_larger_than_completion(completion, excess, field):
    with pytest.raises(ValueError):
        Usage(completion_tokens=completion, **{field: completion + excess})


@settings(max_examples=300, deadline=None)
@given(usages(), rules, provider_prices, st.integers(min_value=1, max_value=10_000))
def test_more_output_tokens_never_lower_credits(usage, rule, provider, extra):
    more = Usage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens + extra,
        cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens,
        audio_input_tokens=usage.audio_input_tokens, image_input_tokens=usage.image_input_tokens,
        audio_output_tokens=usage.audio_output_tokens,
    )
    before, after = price(usage, rule, provider), price(more, rule, provider)
    assert after.credits_ucr >= before.credits_ucr
    assert after.provider_cost_uusd >= before.provider_cost_uusd


def test_partial_weights_keep_the_defaults_of_the_classes_they_omit():
    from plugin.runtime import build_price_book
    from plugin.settings import DEFAULT_WEIGHTS, MeterlineConfig

    config = MeterlineConfig.model_validate(
        {"pricing": {"weights": {"output": "3"}, "models": {"m": {"weights": {"input": "2"}}}}}
    )
    book = build_price_book(config)
    base = book.rule_for("other").weights
    assert base.output == 3
    assert (base.input, base.cached_input, base.audio_input) == (
        DEFAULT_WEIGHTS.input, DEFAULT_WEIGHTS.cached_input, DEFAULT_WEIGHTS.audio_input,
    )
    model = book.rule_for("m").weights
    assert (model.input, model.output, model.cached_input) == (2, 3, Fraction(1, 10))
