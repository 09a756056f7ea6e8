"""Pure: what a streamed response delivered, whatever shape its chunks have.

LiteLLM hands the streaming hook different chunk types per route: chat-completion chunk objects
(usage on the last chunk), text-completion chunks (zero-filled usage placeholders on every
chunk, text in `choices[].text`), Responses-API events (usage on `response.completed`), and, on
the Anthropic `/v1/messages` route, raw SSE bytes (input tokens on `message_start`, output tokens
on `message_delta`). A `StreamTally` reads all of them into one usage object and the text that
was delivered, so no route is billed 0 by omission.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

from plugin.rules.metering import usage_from_openai
from plugin.rules.pricing import Usage


def as_mapping(value: object) -> Mapping[str, object] | None:
    """A dict, a pydantic model (model_dump) or None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value
    dump = getattr(value, "model_dump", None)
    return dump() if callable(dump) else None


def _sse_payloads(raw: bytes | str) -> Iterator[Mapping[str, object]]:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        try:
            payload = json.loads(line[5:].strip())
        except ValueError:
            continue  # "[DONE]" and keep-alive comments carry nothing to count
        if isinstance(payload, Mapping):
            yield payload


def _has_tokens(usage: Mapping[str, object]) -> bool:
    return any(isinstance(value, int) and not isinstance(value, bool) and value > 0 for value in usage.values())


def _get(holder: object, key: str) -> object:
    """`holder[key]` for dicts, `holder.key` for LiteLLM's objects (no per-chunk model_dump)."""
    if holder is None:
        return None
    return holder.get(key) if isinstance(holder, Mapping) else getattr(holder, key, None)


class StreamTally:
    """Accumulates usage and delivered text over the chunks of one stream."""

    def __init__(self) -> None:
        self._usage: dict[str, object] = {}
        self.chunks = 0

    def usage(self) -> Usage | None:
        """The provider's usage for the stream, or None when it sent none."""
        return usage_from_openai(self._usage) if _has_tokens(self._usage) else None

    def observe(self, chunk: object) -> str:
        """Record one chunk; returns the text it carries (for counting what was delivered)."""
        self.chunks += 1
        if isinstance(chunk, (bytes, str)):
            return "".join(self._observe_payload(payload) for payload in _sse_payloads(chunk))
        return self._observe_payload(chunk)

    def _observe_payload(self, payload: object) -> str:
        for holder in (payload, _get(payload, "message"), _get(payload, "response")):
            usage = as_mapping(_get(holder, "usage"))
            if usage and _has_tokens(usage):
                # Later events refine earlier ones (Anthropic: input on message_start, output on
                # message_delta); zero placeholders never overwrite a count.
                self._usage.update({key: value for key, value in usage.items() if value not in (None, 0)})
        return _payload_text(payload)


def _payload_text(payload: object) -> str:
    parts: list[str] = []
    delta = _get(payload, "delta")
    if isinstance(delta, str):  # Responses API text / arguments delta
        parts.append(delta)
    elif isinstance(_get(delta, "text"), str):  # Anthropic text_delta
        parts.append(_get(delta, "text"))
    for choice in _get(payload, "choices") or []:
        choice_delta = _get(choice, "delta")
        tool_arguments = [_get(_get(call, "function"), "arguments") for call in _get(choice_delta, "tool_calls") or []]
        for text in (_get(choice_delta, "content"), _get(choice, "text"), *tool_arguments):
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts)


def response_usage(response: object) -> Usage | None:
    """The usage of a complete (non-streamed) response: an object or, on some routes, a dict."""
    return usage_from_openai(as_mapping(_get(response, "usage")))


def response_text(response: object) -> str:
    """The text of a complete response, for counting when the provider sent no usage."""
    parts = []
    for choice in _get(response, "choices") or []:
        content = _get(_get(choice, "message"), "content")
        for text in (content, _get(choice, "text")):
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts)
