"""Reading usage and delivered text from every chunk shape LiteLLM hands the streaming hook."""

from __future__ import annotations

import json

from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices
from litellm.types.utils import Usage as LiteLLMUsage

from plugin.rules.pricing import Usage
from plugin.rules.streams import StreamTally, response_text, response_usage


def sse(event: str, payload: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


def test_chat_chunk_objects_usage_on_the_last_chunk():
    tally = StreamTally()
    texts = [tally.observe(ModelResponseStream(choices=[StreamingChoices(delta=Delta(content=word))]))
             for word in ("w1", " w2")]
    last = ModelResponseStream(choices=[])
    last.usage = LiteLLMUsage(prompt_tokens=12, completion_tokens=2, total_tokens=14)
    tally.observe(last)
    assert texts == ["w1", " w2"]
    assert tally.usage() == Usage(prompt_tokens=12, completion_tokens=2)
    assert tally.chunks == 3


def test_zero_filled_placeholder_usage_is_no_usage():
    tally = StreamTally()
    for word in ("a", "b"):
        tally.observe({"choices": [{"index": 0, "text": word}], "usage": {"prompt_tokens": 0, "completion_tokens": 0}})
    assert tally.usage() is None


def test_text_completion_chunks_carry_text_in_choices():
    tally = StreamTally()
    assert tally.observe({"choices": [{"index": 0, "text": " w3"}]}) == " w3"


def test_anthropic_sse_bytes_combine_input_from_start_and_output_from_delta():
    tally = StreamTally()
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 41, "output_tokens": 1,
                                                             "cache_read_input_tokens": 0}}}
    assert tally.observe(sse("message_start", start)) == ""
    assert tally.observe(sse("content_block_delta", {"type": "content_block_delta",
                                                    "delta": {"type": "text_delta", "text": "hi"}})) == "hi"
    tally.observe(sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 3}}))
    tally.observe(b"event: message_stop\ndata: {\"type\": \"message_stop\"}\n\n")
    assert tally.usage() == Usage(prompt_tokens=41, completion_tokens=3)


def test_responses_api_events_usage_on_completed():
    tally = StreamTally()
    assert tally.observe({"type": "response.output_text.delta", "delta": "w1"}) == "w1"
    tally.observe({"type": "response.completed", "response": {"usage": {
        "input_tokens": 31, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 4}}}})
    assert tally.usage() == Usage(prompt_tokens=31, completion_tokens=5, cached_tokens=4)


def test_garbage_chunks_count_but_carry_nothing():
    tally = StreamTally()
    assert tally.observe(b": keep-alive\n\n") == ""
    assert tally.observe(b"data: [DONE]\n\n") == ""
    assert tally.observe(object()) == ""
    assert tally.usage() is None and tally.chunks == 3


def test_complete_responses_as_objects_or_dicts():
    assert response_usage({"usage": {"input_tokens": 40, "output_tokens": 3}}) == Usage(40, 3)
    assert response_usage({"content": []}) is None
    chat = {"choices": [{"message": {"content": "w1 w2"}}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    assert response_usage(chat) == Usage(5, 2)
    assert response_text(chat) == "w1 w2"
    assert response_text({"choices": [{"text": "legacy"}]}) == "legacy"


def test_tool_call_arguments_count_as_delivered_text():
    tally = StreamTally()
    chunk = {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"city": '}}]}}]}
    assert tally.observe(chunk) == '{"city": '
