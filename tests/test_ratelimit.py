"""The sliding-window rate limit over plain integers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from plugin.rules.ratelimit import RateDecision, RateLimit, admits, decide

TEN_A_MINUTE = RateLimit(requests=10, window_ms=60_000)


def test_a_fresh_window_admits_up_to_the_limit():
    assert decide(TEN_A_MINUTE, 0, current=0, previous=0) == RateDecision(True, 10, 9, 0)
    assert decide(TEN_A_MINUTE, 0, current=9, previous=0) == RateDecision(True, 10, 0, 0)
    refused = decide(TEN_A_MINUTE, 30_000, current=10, previous=0)
    assert (refused.allowed, refused.remaining) == (False, 0)
    # ten in this window and none before: the next request fits once the window turns over
    assert refused.retry_after_ms == 30_000 + 6_000


def test_the_previous_window_counts_by_how_much_of_it_is_still_inside():
    # 45 s into the window, the previous window's 20 requests weigh a quarter: 5, plus 4 now = 9
    assert decide(TEN_A_MINUTE, 45_000, current=4, previous=20) == RateDecision(True, 10, 0, 0)
    refused = decide(TEN_A_MINUTE, 45_000, current=5, previous=20)  # 5 + 5 + 1 > 10
    assert not refused.allowed
    # 20 * (15 s - wait) / 60 s <= 4  ->  wait >= 3 s
    assert refused.retry_after_ms == 3_000


@given(limit=st.integers(1, 50), window=st.sampled_from([1_000, 60_000]), now=st.integers(0, 10**9),
       current=st.integers(0, 80), previous=st.integers(0, 80))
def test_retry_after_is_the_earliest_moment_a_request_fits(limit, window, now, current, previous):
    rate = RateLimit(limit, window)
    decision = decide(rate, now, current, previous)
    assert decision.allowed == admits(rate, now, current, previous)
    if decision.allowed:
        assert decision.retry_after_ms == 0 and 0 <= decision.remaining < limit
        return
    wait = decision.retry_after_ms
    assert wait > 0

    def fits_after(ms: int) -> bool:
        later = now + ms
        if later // window == now // window:
            return admits(rate, later, current, previous)
        if later // window == now // window + 1:
            return admits(rate, later, 0, current)
        return True

    assert fits_after(wait) and not fits_after(wait - 1)
