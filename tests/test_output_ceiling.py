"""A plan's `max_output_tokens`: a request's output limit is lowered to it, a request without one gets it,
and the affordability clamp still wins when it is lower. In process (admission and previews over real
SQLite counters) and through the real proxy, where the fake provider answers no more tokens than the
limit it received."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from plugin import admission
from plugin.ledger import accounts, store
from plugin.runtime import Meterline
from plugin.services.preview import preview_answer
from plugin.settings import MeterlineConfig, Settings
from tests.conftest import MeteredProxy, _metered_proxy
from tests.support.proxy import METERLINE_YAML

M = 1_000_000
CEILING = 64
OUTPUT_UCR = 4_000  # µcr per output token: tokens basis, 1,000 tokens a credit, output weight 4
PLANS = {
    "bounded": {"included_credits": 1000, "max_output_tokens": CEILING},
    "bounded-capped": {"cap_credits": 1, "max_output_tokens": CEILING},
    "pro": {"included_credits": 1000},
}
CONFIG = MeterlineConfig.model_validate({"plans": PLANS, "policies": {"slice_requests": 1}})


class Clock:
    def __call__(self) -> datetime:
        return datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.fixture
def meterline(tmp_path) -> Iterator[Meterline]:
    meterline = Meterline(settings=Settings(database_url=f"sqlite:///{tmp_path / 'ledger.db'}", relay=False),
                          config=CONFIG)
    meterline.clock = Clock()
    for customer, plan in (("bounded", "bounded"), ("capped", "bounded-capped"), ("pro", "pro")):
        store.add_customer(meterline.engine, customer, plan)
    yield meterline
    meterline.close()


async def admit(meterline: Meterline, customer: str, asked: int | None, n: int = 0) -> admission.Admitted:
    return await admission.admit(meterline, customer, f"{customer}-{asked}-{n}", model="m", asked_max_tokens=asked,
                                 prompt_tokens=lambda: 0)


@pytest.mark.parametrize(("asked", "sent"), [(None, CEILING), (CEILING + 1, CEILING), (10_000, CEILING),
                                             (CEILING, None), (10, None)])
async def test_an_unlimited_customer_is_held_to_its_plans_output_ceiling(meterline, asked, sent):
    admitted = await admit(meterline, "bounded", asked)
    assert (admitted.max_tokens, admitted.hold) == (sent, None)  # lowered (None: as asked), nothing reserved


async def test_a_plan_without_a_ceiling_leaves_max_tokens_alone(meterline):
    assert (await admit(meterline, "pro", None)).max_tokens is None
    assert (await admit(meterline, "pro", 100_000)).max_tokens is None


async def test_a_capped_customer_reserves_for_the_clamped_limit_and_the_lower_clamp_wins(meterline):
    # 1 credit of cap: 250 output tokens' worth. Asking 10,000 (or nothing) reserves for the plan's 64.
    for n, asked in enumerate((10_000, None)):
        admitted = await admit(meterline, "capped", asked, n)
        assert (admitted.max_tokens, admitted.hold.ucr) == (CEILING, CEILING * OUTPUT_UCR)
        await admission.release(meterline, admitted, f"capped-{asked}-{n}")
    accounts.put_limits(meterline.engine, "capped", {"hard_limit_ucr": 40 * OUTPUT_UCR}, by="test")
    meterline.directory.forget("capped")
    admitted = await admit(meterline, "capped", 10_000, 9)
    assert (admitted.max_tokens, admitted.hold.ucr) == (40, 40 * OUTPUT_UCR)  # what is left affords 40: lower wins


def test_a_preview_reports_the_plans_ceiling(meterline):
    profile = accounts.load_profile(meterline.engine, "bounded")
    lowered = preview_answer(meterline, profile, "m", 0, 10_000)
    assert (lowered["reason"], lowered["max_tokens"], lowered["credits_ucr"]) == (
        "plan_max_output_tokens", CEILING, CEILING * OUTPUT_UCR)
    supplied = preview_answer(meterline, profile, "m", 0, None)
    assert (supplied["reason"], supplied["max_tokens"]) == ("plan_max_output_tokens", CEILING)
    within = preview_answer(meterline, profile, "m", 0, 10)
    assert (within["reason"], within["max_tokens"], within["credits_ucr"]) == (None, None, 10 * OUTPUT_UCR)
    accounts.put_limits(meterline.engine, "capped", {"hard_limit_ucr": 40 * OUTPUT_UCR}, by="test")
    capped = preview_answer(meterline, accounts.load_profile(meterline.engine, "capped"), "m", 0, 10_000)
    assert (capped["reason"], capped["max_tokens"]) == ("max_tokens_lowered", 40)


# ------------------------------------------------------------------------------ through the real proxy


@pytest.fixture(scope="module")
def bounded_proxy(tmp_path_factory, upstream) -> Iterator[MeteredProxy]:
    workdir = tmp_path_factory.mktemp("bounded")
    yaml = {**METERLINE_YAML, "plans": {**METERLINE_YAML["plans"], **PLANS}}
    yield from _metered_proxy(workdir, upstream, f"sqlite:///{workdir / 'ledger.db'}", meterline_yaml=yaml)


THOUSAND_WORDS = [{"role": "user", "content": "[[c=1000]] write at length"}]


@pytest.mark.proxy
def test_the_provider_receives_the_plans_ceiling_and_the_bill_follows(bounded_proxy):
    """The fake provider answers `c` words, never more than the max_tokens / max_completion_tokens (or the
    Responses API's max_output_tokens) it received: what it answers is what it was sent."""
    bounded = bounded_proxy.tenant("proxy-bounded", plan="bounded")
    chat = bounded.client.chat.completions.create
    assert chat(model="test-model", messages=THOUSAND_WORDS).usage.completion_tokens == CEILING  # none asked
    assert chat(model="test-model", messages=THOUSAND_WORDS, max_tokens=5000).usage.completion_tokens == CEILING
    assert chat(model="test-model", messages=THOUSAND_WORDS,
                max_completion_tokens=5000).usage.completion_tokens == CEILING
    assert chat(model="test-model", messages=THOUSAND_WORDS, max_tokens=10).usage.completion_tokens == 10
    streamed = list(chat(model="test-model", messages=THOUSAND_WORDS, stream=True,
                         stream_options={"include_usage": True}))
    assert streamed[-1].usage.completion_tokens == CEILING
    responses = bounded.client.responses.create(model="test-model", input="[[c=1000]] write at length")
    assert responses.usage.output_tokens == CEILING
    embedded = bounded.client.embeddings.create(model="embedder", input="no output tokens here")
    assert len(embedded.data) == 1
    assert [row.completion_tokens for row in bounded_proxy.ledger("proxy-bounded")
            if row.completion_tokens] == [CEILING, CEILING, CEILING, 10, CEILING, CEILING]

    unbounded = bounded_proxy.tenant("proxy-pro", plan="pro")
    assert unbounded.client.chat.completions.create(
        model="test-model", messages=THOUSAND_WORDS).usage.completion_tokens == 1000

    with bounded_proxy.api(bounded.key) as api:
        preview = api.post("/preview", json={"model": "test-model", "prompt_tokens": 0, "max_tokens": 5000}).json()
    assert (preview["verdict"], preview["reason"], preview["max_tokens"], preview["credits_ucr"]) == (
        "allowed", "plan_max_output_tokens", CEILING, CEILING * OUTPUT_UCR)
