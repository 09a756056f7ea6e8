"""Pure pricing: token usage -> integer micro-credits and integer micro-USD provider cost.

Units: 1 credit = 1,000,000 µcr; provider cost in µUSD. Every rate is an exact `Fraction`;
the only rounding happens once per request, at the end, half up to a whole µcr (or µUSD).
So a request's charge is within 0.5 µcr of its exact value, and a sum of n charges is within
n/2 µcr of the exact sum: it never drifts.

Token classes never overlap. From the provider's usage:
    cached input   = prompt_tokens_details.cached_tokens (a subset of prompt_tokens)
    audio input    = prompt_tokens_details.audio_tokens, image input likewise (subsets)
    text input     = prompt_tokens - cached - audio - image
    audio output   = completion_tokens_details.audio_tokens (a subset of completion_tokens)
    text output    = completion_tokens - audio output
Reasoning tokens are already inside completion_tokens: recorded, never added again.

Two bases:
    tokens: µcr = Σ(class tokens × class weight) × 1,000,000 / tokens_per_credit
    cost:   µcr = provider cost in USD × (1 + markup) × credits_per_usd × 1,000,000
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from fractions import Fraction
from math import lcm
from operator import attrgetter, mul
from typing import Literal

UCR_PER_CREDIT = 1_000_000
UUSD_PER_USD = 1_000_000
PER_MILLION = Fraction(1, 1_000_000)


def round_half_up(value: Fraction) -> int:
    """The one rounding rule of the money path: to the nearest integer, halves away from zero."""
    if value < 0:
        return -round_half_up(-value)
    return int((value + Fraction(1, 2)).__floor__())


def divide_half_up(numerator: int, denominator: int) -> int:
    """round_half_up(Fraction(numerator, denominator)) for non-negative integers, in integer arithmetic
    (the fleet computes a few of these per customer for thousands of customers per request)."""
    if numerator < 0 or denominator <= 0:
        return round_half_up(Fraction(numerator, denominator))
    return (2 * numerator + denominator) // (2 * denominator)


@dataclass(frozen=True)
class Usage:
    """What a provider reported for one call. Subset counts must fit inside their totals."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0
    image_input_tokens: int = 0
    audio_output_tokens: int = 0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int:
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must not be negative")
        if self.cached_tokens + self.audio_input_tokens + self.image_input_tokens > self.prompt_tokens:
            raise ValueError("cached + audio + image input tokens exceed prompt_tokens")
        if self.audio_output_tokens > self.completion_tokens:
            raise ValueError("audio output tokens exceed completion_tokens")
        if self.reasoning_tokens > self.completion_tokens:
            raise ValueError("reasoning tokens exceed completion_tokens")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def classes(self) -> TokenClasses:
        return TokenClasses(
            text_input=self.prompt_tokens - self.cached_tokens - self.audio_input_tokens - self.image_input_tokens,
            cached_input=self.cached_tokens,
            audio_input=self.audio_input_tokens,
            image_input=self.image_input_tokens,
            text_output=self.completion_tokens - self.audio_output_tokens,
            audio_output=self.audio_output_tokens,
        )


@dataclass(frozen=True)
class TokenClasses:
    """Disjoint token counts: each token is priced exactly once."""

    text_input: int
    cached_input: int
    audio_input: int
    image_input: int
    text_output: int
    audio_output: int


@dataclass(frozen=True)
class Weights:
    """Credit weight per token class (tokens basis)."""

    input: Fraction = Fraction(1)
    cached_input: Fraction = Fraction(1)
    output: Fraction = Fraction(1)
    audio_input: Fraction = Fraction(1)
    audio_output: Fraction = Fraction(1)
    image_input: Fraction = Fraction(1)

    def weighted_tokens(self, tokens: TokenClasses) -> Fraction:
        return (
            tokens.text_input * self.input
            + tokens.cached_input * self.cached_input
            + tokens.audio_input * self.audio_input
            + tokens.image_input * self.image_input
            + tokens.text_output * self.output
            + tokens.audio_output * self.audio_output
        )


@dataclass(frozen=True)
class ProviderPrice:
    """USD per token. A class without its own rate is charged at the text rate of its side."""

    input: Fraction
    output: Fraction
    cached_input: Fraction | None = None
    audio_input: Fraction | None = None
    audio_output: Fraction | None = None
    image_input: Fraction | None = None

    def cost_usd(self, tokens: TokenClasses) -> Fraction:
        def rate(own: Fraction | None, fallback: Fraction) -> Fraction:
            return fallback if own is None else own

        return (
            tokens.text_input * self.input
            + tokens.cached_input * rate(self.cached_input, self.input)
            + tokens.audio_input * rate(self.audio_input, self.input)
            + tokens.image_input * rate(self.image_input, self.input)
            + tokens.text_output * self.output
            + tokens.audio_output * rate(self.audio_output, self.output)
        )


FREE = ProviderPrice(input=Fraction(0), output=Fraction(0))


@dataclass(frozen=True)
class CreditRule:
    """How one model's usage becomes credits."""

    basis: Literal["tokens", "cost"] = "tokens"
    tokens_per_credit: Fraction = Fraction(1000)
    weights: Weights = Weights()
    markup: Fraction = Fraction(0)
    credits_per_usd: Fraction = Fraction(1000)


@dataclass(frozen=True)
class Charge:
    """The priced outcome of one call; `exact_ucr` is kept for audits and tests."""

    credits_ucr: int
    provider_cost_uusd: int
    exact_ucr: Fraction
    priced: bool
    """False when the model has no provider price (cost basis then yields 0: worth an alert)."""


def _exact(tokens: TokenClasses, rule: CreditRule, provider_price: ProviderPrice | None) -> tuple[Fraction, Fraction]:
    """(exact µcr, provider cost in USD) of some tokens, unrounded."""
    cost_usd = (provider_price or FREE).cost_usd(tokens)
    if rule.basis == "tokens":
        return Fraction(rule.weights.weighted_tokens(tokens) * UCR_PER_CREDIT) / rule.tokens_per_credit, cost_usd
    return cost_usd * (1 + rule.markup) * rule.credits_per_usd * UCR_PER_CREDIT, cost_usd


def price(usage: Usage, rule: CreditRule, provider_price: ProviderPrice | None) -> Charge:
    """Price one call. Pure and exact; rounds once at the end."""
    exact, cost_usd = _exact(usage.classes(), rule, provider_price)
    return Charge(
        credits_ucr=round_half_up(exact),
        provider_cost_uusd=round_half_up(cost_usd * UUSD_PER_USD),
        exact_ucr=exact,
        priced=provider_price is not None,
    )


_CLASSES = tuple(f.name for f in fields(TokenClasses))
_counts = attrgetter(*_CLASSES)


def _half_up(numerator: int, denominator: int) -> int:
    """`round_half_up(Fraction(numerator, denominator))` in integers (denominator > 0)."""
    if numerator < 0:
        return -_half_up(-numerator, denominator)
    return (2 * numerator + denominator) // (2 * denominator)


@dataclass(frozen=True)
class LinearPrice:
    """`price` for one credit rule and provider price, folded into integers.

    A charge is linear in each token class, so its exact µcr is Σ tokens × rate over one common
    denominator, and so is its cost. Same results as `price` to the last µcr (tests/test_pricing.py
    checks them against each other); the ~30 Fraction operations `price` does per call cost ~50 µs
    on the billing path, this a few."""

    ucr_rates: tuple[int, ...]
    ucr_denominator: int
    uusd_rates: tuple[int, ...]
    uusd_denominator: int
    priced: bool

    @classmethod
    def of(cls, rule: CreditRule, provider_price: ProviderPrice | None) -> LinearPrice:
        units = [_exact(TokenClasses(**{name: int(name == unit) for name in _CLASSES}), rule, provider_price)
                 for unit in _CLASSES]
        ucr = [exact for exact, _ in units]
        uusd = [cost * UUSD_PER_USD for _, cost in units]
        ucr_denominator = lcm(*(rate.denominator for rate in ucr))
        uusd_denominator = lcm(*(rate.denominator for rate in uusd))
        return cls(tuple(int(rate * ucr_denominator) for rate in ucr), ucr_denominator,
                   tuple(int(rate * uusd_denominator) for rate in uusd), uusd_denominator,
                   provider_price is not None)

    def exact_ucr_per(self, token_class: str) -> Fraction:
        """Exact µcr of one token of a class (a `TokenClasses` field name)."""
        return Fraction(self.ucr_rates[_CLASSES.index(token_class)], self.ucr_denominator)

    def charge(self, usage: Usage) -> Charge:
        counts = _counts(usage.classes())
        ucr = sum(map(mul, counts, self.ucr_rates))
        uusd = sum(map(mul, counts, self.uusd_rates))
        return Charge(
            credits_ucr=_half_up(ucr, self.ucr_denominator),
            provider_cost_uusd=_half_up(uusd, self.uusd_denominator),
            exact_ucr=Fraction(ucr, self.ucr_denominator),
            priced=self.priced,
        )


def usd_per_token_from_table(value: object) -> Fraction | None:
    """LiteLLM's model_cost stores rates as floats; take their shortest decimal text exactly."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(Decimal(repr(value)))
    if isinstance(value, str):
        return Fraction(Decimal(value))
    return None


def price_from_model_cost(entry: Mapping[str, object]) -> ProviderPrice | None:
    """A LiteLLM `model_cost` entry -> ProviderPrice, or None when it has no token rates."""
    input_rate = usd_per_token_from_table(entry.get("input_cost_per_token"))
    output_rate = usd_per_token_from_table(entry.get("output_cost_per_token"))
    if input_rate is None and output_rate is None:
        return None
    return ProviderPrice(
        input=input_rate or Fraction(0),
        output=output_rate or Fraction(0),
        cached_input=usd_per_token_from_table(entry.get("cache_read_input_token_cost")),
        audio_input=usd_per_token_from_table(entry.get("input_cost_per_audio_token")),
        audio_output=usd_per_token_from_table(entry.get("output_cost_per_audio_token")),
        image_input=usd_per_token_from_table(entry.get("input_cost_per_image_token")),
    )


@dataclass
class PriceBook:
    """Credit rules per model and provider prices: meterline.yaml first, LiteLLM's table second.

    Converting the whole LiteLLM table up front costs start-up time for models nobody calls, so
    entries are converted on first use and remembered.
    """

    default_rule: CreditRule
    rules: Mapping[str, CreditRule] = field(default_factory=dict)
    cache_hit_fee_ucr: int = 0
    """What a cache hit costs (policy `cache_hits`): 0 when free, else a flat fee."""
    prices: Mapping[str, ProviderPrice] = field(default_factory=dict)
    model_cost: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    version: int | None = None
    """The pricing changelog's version these rules are (plugin/services/pricing.py): every ledger row
    priced with the book records it. None: not recorded (a book built outside a running meterline)."""
    _converted: dict[str, ProviderPrice | None] = field(default_factory=dict, repr=False)
    _linear: dict[tuple[str, str | None], LinearPrice] = field(default_factory=dict, repr=False)

    def rule_for(self, model: str) -> CreditRule:
        return self.rules.get(model, self.default_rule)

    def price_for(self, *names: str | None) -> ProviderPrice | None:
        """First known price among the given names (model group, then deployment model)."""
        for name in names:
            if not name:
                continue
            if name in self.prices:
                return self.prices[name]
            if name not in self._converted:
                entry = self.model_cost.get(name)
                self._converted[name] = price_from_model_cost(entry) if entry else None
            if self._converted[name] is not None:
                return self._converted[name]
        return None

    def token_rates(self, model: str) -> tuple[Fraction, Fraction]:
        """Exact µcr per fresh input token and per output token of a model group: pricing is linear
        in tokens, so this is what a reservation needs before the call (the deployment is not yet
        chosen, so the group's own price is used)."""
        linear = self._linear_for(model, None)
        return linear.exact_ucr_per("text_input"), linear.exact_ucr_per("text_output")

    def charge(self, usage: Usage, model: str, deployment_model: str | None = None) -> Charge:
        """Price a call of model group `model` served by `deployment_model` ("provider/name")."""
        return self._linear_for(model, deployment_model).charge(usage)

    def _linear_for(self, model: str, deployment_model: str | None) -> LinearPrice:
        """Remembered per model group and deployment: every request asks, and the book never changes."""
        linear = self._linear.get((model, deployment_model))
        if linear is None:
            unprefixed = deployment_model.split("/", 1)[1] if deployment_model and "/" in deployment_model else None
            linear = self._linear[model, deployment_model] = LinearPrice.of(
                self.rule_for(model), self.price_for(model, deployment_model, unprefixed))
        return linear
