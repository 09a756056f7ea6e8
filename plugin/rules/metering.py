"""Pure metering: a finished call -> the ledger row (and alert) that bills it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from plugin.rules.pricing import PriceBook, Usage
from plugin.rules.records import BillingRecord, LedgerRow


def _count(value: object) -> int:
    """Provider counts arrive as int, None, or occasionally a float; anything else counts as 0."""
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and value.is_integer():
        return max(int(value), 0)
    return 0


def _details(usage: Mapping[str, object], key: str) -> Mapping[str, object]:
    details = usage.get(key)
    return details if isinstance(details, Mapping) else {}


def usage_from_openai(usage: Mapping[str, object] | None) -> Usage | None:
    """Parse a `usage` object. Returns None when there is no usage at all.

    Chat-completions shape (`prompt_tokens`, ...) and the `input_tokens` shapes of the Responses
    API (cached tokens inside input_tokens) and of Anthropic's Messages API (cache reads and
    writes reported beside input_tokens) are all understood, so no route bills 0 by omission.
    Subset counts a provider over-reports are clamped to their totals, so a token is never
    priced twice even when the provider's numbers do not add up.
    """
    if not usage:
        return None
    if "prompt_tokens" not in usage and "input_tokens" in usage:
        usage = _as_chat_usage(usage)
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    prompt_details = _details(usage, "prompt_tokens_details")
    completion_details = _details(usage, "completion_tokens_details")
    cached = min(_count(prompt_details.get("cached_tokens")), prompt)
    audio_in = min(_count(prompt_details.get("audio_tokens")), prompt - cached)
    image_in = min(_count(prompt_details.get("image_tokens")), prompt - cached - audio_in)
    audio_out = min(_count(completion_details.get("audio_tokens")), completion)
    reasoning = min(_count(completion_details.get("reasoning_tokens")), completion)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
        reasoning_tokens=reasoning, audio_input_tokens=audio_in, image_input_tokens=image_in,
        audio_output_tokens=audio_out,
    )


def _as_chat_usage(usage: Mapping[str, object]) -> dict[str, object]:
    """Responses-API or Anthropic usage -> the chat-completions shape."""
    cache_read = _count(usage.get("cache_read_input_tokens"))
    cache_write = _count(usage.get("cache_creation_input_tokens"))
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        prompt, cached = _count(usage.get("input_tokens")) + cache_read + cache_write, cache_read  # Anthropic
    else:
        prompt, cached = _count(usage.get("input_tokens")), _count(_details(usage, "input_tokens_details").get("cached_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": _count(usage.get("output_tokens")),
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {
            "reasoning_tokens": _count(_details(usage, "output_tokens_details").get("reasoning_tokens"))
        },
    }


@dataclass(frozen=True)
class FinishedCall:
    """What the gateway knows about one call that succeeded (after retries and fallbacks)."""

    ledger_id: str
    customer_id: str
    member: str
    action: str
    model: str
    usage: Usage
    finished_at: datetime
    deployment_model: str | None = None
    provider: str = "-"
    cache_hit: bool = False
    stream: bool = False
    usage_source: str = "provider"
    chunks: int = 0
    """How many chunks a stream carried; a long stream with no countable tokens is suspicious."""


def bill(call: FinishedCall, book: PriceBook) -> BillingRecord:
    """Price a finished call. A cache hit costs the cache-hit fee (0 by default) and records what it saved."""
    charge = book.charge(call.usage, call.model, call.deployment_model)
    credits = min(book.cache_hit_fee_ucr, charge.credits_ucr) if call.cache_hit else charge.credits_ucr
    entry = LedgerRow(
        id=call.ledger_id,
        customer_id=call.customer_id,
        member=call.member,
        action=call.action,
        model=call.model,
        provider=call.provider or "-",
        prompt_tokens=call.usage.prompt_tokens,
        completion_tokens=call.usage.completion_tokens,
        cached_tokens=call.usage.cached_tokens,
        reasoning_tokens=call.usage.reasoning_tokens,
        credits_ucr=credits,
        provider_cost_uusd=0 if call.cache_hit else charge.provider_cost_uusd,
        cache_hit=call.cache_hit,
        saved_ucr=charge.credits_ucr - credits if call.cache_hit else 0,
        stream=call.stream,
        usage_source=call.usage_source,
        created_at=call.finished_at,
        price_version=book.version,
    )
    alert = None
    if not call.cache_hit and call.usage.total_tokens > 0 and credits == 0:
        why = "no provider price is known for it" if not charge.priced else "its pricing rule yields zero"
        alert = (
            f"{call.usage.total_tokens} tokens on model {call.model!r} were billed 0 credits because {why}; "
            "add a price or a credit rule for it in meterline.yaml"
        )
    elif not call.cache_hit and call.usage.total_tokens == 0 and call.chunks > 2:
        alert = (
            f"a stream of {call.chunks} chunks on model {call.model!r} had no usage and no countable text, "
            "so it was billed 0 credits; its chunk format is not understood"
        )
    return BillingRecord(entry=entry, alert=alert)


TEMPLATE_TOKENS_PER_MESSAGE = 8
"""More than a chat template adds around each message (OpenAI's counting: 3, and 1 for a name)."""
TEMPLATE_TOKENS_PER_PROMPT = 8
"""More than the template adds once per prompt (OpenAI's counting: 3, priming the reply)."""
_PLAIN_MESSAGE_KEYS = frozenset({"role", "content", "name"})


def prompt_token_bound(messages: object) -> int | None:
    """At least as many tokens as a tokenizer counts in a chat prompt, without one: each token of
    the byte-level BPE and SentencePiece tokenizers LiteLLM counts with stands for at least one byte
    of UTF-8 text, and the chat template adds a few per message. None for anything but plain text
    messages (images, audio, tool calls are counted by other rules)."""
    if not isinstance(messages, list) or not messages:
        return None
    total = TEMPLATE_TOKENS_PER_PROMPT
    for message in messages:
        if not isinstance(message, Mapping) or not message.keys() <= _PLAIN_MESSAGE_KEYS:
            return None
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(part, Mapping) and part.keys() == {"type", "text"} and part["type"] == "text"
                       and isinstance(part["text"], str) for part in content):
                return None
            texts = [part["text"] for part in content]
        elif content is None or isinstance(content, str):
            texts = [content or ""]
        else:
            return None
        labels = [message.get("role"), message.get("name")]
        if not all(label is None or isinstance(label, str) for label in labels):
            return None
        # surrogatepass: a lone surrogate (valid in JSON) counts its 3 bytes instead of failing
        total += TEMPLATE_TOKENS_PER_MESSAGE + sum(len(text.encode("utf-8", "surrogatepass"))
                                                   for text in [*texts, *filter(None, labels)])
    return total
