"""Pure rules: pricing, metering, identity, plans, policy, limits, rate limit, breaker, slices, streams.

Nothing here does I/O (no database, Redis, HTTP or LiteLLM); the clock is always passed in, so every
rule is tested with plain values. The edges (plugin/ledger, plugin/counters, plugin/admission, ...)
call these and do the reading and writing.
"""
