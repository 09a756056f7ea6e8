"""A fake OpenAI-compatible provider for tests that run a real LiteLLM proxy.

The server decides the token usage of every chat completion and records what it
did, so a test can compare what the provider reported with what got billed.

Directive language
------------------
Directives go anywhere in the message texts (string content or the ``text`` of
list-of-parts content), as one or more bracket groups: ``[[key=value key2=value2]]``.

=============  ==============================================================
``p=INT``      prompt_tokens (default: 10 + number of words in all messages,
               directive groups excluded)
``c=INT``      completion_tokens (default 5; capped by ``max_tokens`` /
               ``max_completion_tokens`` when those are smaller)
``cached=INT`` usage.prompt_tokens_details.cached_tokens (default 0)
``reasoning=INT``  usage.completion_tokens_details.reasoning_tokens (default 0;
               already part of completion_tokens)
``tag=STR``    label recorded in the log (tests put a customer id there)
``id=STR``     request identity for ``fail``; attempts are counted per id
``fail=INT``   the first ``fail`` attempts carrying this ``id`` answer HTTP 500
``nousage=1``  when streaming, never send the usage chunk
``delay_ms=INT``   sleep before answering
``word_ms=INT``    when streaming, sleep this long before each word (a slow stream)
``cut=INT``    when streaming, drop the connection after this many words (a provider failing mid-stream)
=============  ==============================================================

``POST /v1/completions`` (legacy text completions) and ``POST /v1/responses`` (the Responses API, streamed as typed events) takes the same directives.
``POST /v1/embeddings`` answers too, with ``prompt_tokens`` decided as for chat.

The answer is exactly ``c`` words, ``"w1 w2 ... wc"``. A model whose name starts
with ``broken`` always answers 500. Control endpoints live under ``/_control``.

Run it with ``python -m tests.support.upstream --port N`` or, from a test, use
the :func:`run_upstream` context manager, which starts it as a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.processes import free_port, serving

DIRECTIVE_GROUP = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
INT_KEYS = ("p", "c", "cached", "reasoning", "fail", "nousage", "delay_ms", "word_ms", "cut")
MODELS = ("gpt-4o-mini", "gpt-4o", "broken-model")


@dataclass
class State:
    """Everything the server remembers between requests."""

    log: list[dict[str, Any]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    fail_next_count: int = 0
    fail_next_status: int = 500

    def reset(self) -> None:
        self.log.clear()
        self.attempts.clear()
        self.fail_next_count = 0


# --------------------------------------------------------------------------- parsing


def message_texts(messages: list[dict[str, Any]]) -> list[str]:
    """The text of every message, whether its content is a string or a list of parts."""
    texts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part.get("text", "") for part in content if isinstance(part, dict))
    return texts


def parse_directives(texts: list[str]) -> dict[str, Any]:
    """Collect ``key=value`` pairs from every ``[[...]]`` group; integer keys are converted."""
    directives: dict[str, Any] = {}
    for text in texts:
        for group in DIRECTIVE_GROUP.findall(text):
            for item in group.split():
                key, sep, value = item.partition("=")
                if sep:
                    directives[key] = int(value) if key in INT_KEYS else value
    return directives


def count_words(texts: list[str]) -> int:
    return sum(len(DIRECTIVE_GROUP.sub(" ", text).split()) for text in texts)


def decide_usage(body: dict[str, Any], directives: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """The OpenAI ``usage`` object this request will be answered with."""
    prompt = directives.get("p", 10 + count_words(texts))
    completion = directives.get("c", 5)
    for limit_key in ("max_tokens", "max_completion_tokens"):
        limit = body.get(limit_key)
        if isinstance(limit, int) and limit < completion:
            completion = limit
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": directives.get("cached", 0), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": directives.get("reasoning", 0),
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def failure_status(state: State, model: str, directives: dict[str, Any]) -> int | None:
    """HTTP status to fail with, or None. Every request carrying an ``id`` counts as an attempt."""
    attempt = 0
    if "id" in directives:
        attempt = state.attempts.get(directives["id"], 0) + 1
        state.attempts[directives["id"]] = attempt
    if state.fail_next_count > 0:
        state.fail_next_count -= 1
        return state.fail_next_status
    if model.startswith("broken"):
        return 500
    if attempt and attempt <= directives.get("fail", 0):
        return 500
    return None


# --------------------------------------------------------------------------- responses


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def chunk(base: dict[str, Any], delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {**base, "choices": [choice]}


class StreamCut(Exception):
    """Raised inside a stream to make the server drop the connection mid-response."""


async def stream_events(
    base: dict[str, Any], words: list[str], usage: dict[str, Any] | None, word_seconds: float = 0.0,
    cut_after: int | None = None,
) -> AsyncIterator[str]:
    """SSE lines: one chunk per word, a stop chunk, an optional usage chunk, then [DONE]."""
    first: dict[str, Any] = {"role": "assistant", "content": words[0] if words else ""}
    yield f"data: {json.dumps(chunk(base, first))}\n\n"
    for sent, word in enumerate(words[1:], start=1):
        if cut_after is not None and sent >= cut_after:
            raise StreamCut(f"cut after {sent} words")
        if word_seconds:
            await asyncio.sleep(word_seconds)
        yield f"data: {json.dumps(chunk(base, {'content': ' ' + word}))}\n\n"
    yield f"data: {json.dumps(chunk(base, {}, 'stop'))}\n\n"
    if usage is not None:
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


def log_request(state: State, body: dict[str, Any], directives: dict[str, Any], usage: dict[str, Any], *,
                status: int = 200, stream: bool = False, usage_sent: bool = True) -> None:
    """Record what this request was answered with (failed requests too: their usage is never sent)."""
    state.log.append({
        "tag": directives.get("tag"),
        "id": directives.get("id"),
        "model": str(body.get("model", "")),
        "status": status,
        "stream": stream,
        "usage_sent": usage_sent,
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
        "reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"],
        "user": body.get("user"),
    })


async def chat_completions(request: Request) -> Response:
    state: State = request.app.state.upstream
    body = await request.json()
    model = str(body.get("model", ""))
    stream = bool(body.get("stream"))
    texts = message_texts(body.get("messages") or [])
    try:
        directives = parse_directives(texts)
    except ValueError as exc:
        return JSONResponse(error_body(400, f"bad directive: {exc}"), status_code=400)
    usage = decide_usage(body, directives, texts)
    want_usage = bool((body.get("stream_options") or {}).get("include_usage")) and not directives.get("nousage")

    if directives.get("delay_ms"):
        await asyncio.sleep(directives["delay_ms"] / 1000)
    status = failure_status(state, model, directives)
    usage_sent = status is None and (want_usage if stream else True)
    log_request(state, body, directives, usage, status=status or 200, stream=stream, usage_sent=usage_sent)
    if status is not None:
        return JSONResponse(error_body(status, f"upstream failure ({status})"), status_code=status)

    words = [f"w{i}" for i in range(1, usage["completion_tokens"] + 1)]
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model,
            "system_fingerprint": None}
    if stream:
        base["object"] = "chat.completion.chunk"
        events = stream_events(
            base, words, usage if usage_sent else None, directives.get("word_ms", 0) / 1000, directives.get("cut"),
        )
        return StreamingResponse(events, media_type="text/event-stream")
    message = {"role": "assistant", "content": " ".join(words)}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": usage})


def input_texts(value: object) -> list[str]:
    """The texts of an `input` or `prompt` field: one string or a list of them."""
    return [value] if isinstance(value, str) else [str(item) for item in value or []]


async def embeddings(request: Request) -> Response:
    """OpenAI embeddings: prompt_tokens as for chat (``[[p=..]]``, else 10 + the words of the inputs)."""
    state: State = request.app.state.upstream
    body = await request.json()
    texts = input_texts(body.get("input"))
    directives = parse_directives(texts)
    usage = decide_usage({}, {**directives, "c": 0}, texts)
    log_request(state, body, directives, usage)
    data = [{"object": "embedding", "index": index, "embedding": [0.0, 0.1, 0.2]} for index in range(len(texts))]
    return JSONResponse({
        "object": "list", "data": data, "model": body.get("model"),
        "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"]},
    })


async def completions(request: Request) -> Response:
    """Legacy text completions: the same directives as chat, `prompt` instead of messages."""
    state: State = request.app.state.upstream
    body = await request.json()
    texts = input_texts(body.get("prompt"))
    directives = parse_directives(texts)
    usage = decide_usage(body, directives, texts)
    stream = bool(body.get("stream"))
    want_usage = bool((body.get("stream_options") or {}).get("include_usage")) and not directives.get("nousage")
    log_request(state, body, directives, usage, stream=stream, usage_sent=want_usage if stream else True)
    words = [f"w{i}" for i in range(1, usage["completion_tokens"] + 1)]
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model")}
    if not stream:
        choice = {"index": 0, "text": " ".join(words), "logprobs": None, "finish_reason": "stop"}
        return JSONResponse({**base, "choices": [choice], "usage": usage})

    async def events() -> AsyncIterator[str]:
        for index, word in enumerate(words):
            choice = {"index": 0, "text": (" " if index else "") + word, "logprobs": None, "finish_reason": None}
            yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
        stop = {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
        yield f"data: {json.dumps({**base, 'choices': [stop]})}\n\n"
        if want_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def responses_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """The chat usage object in the Responses API's shape (cached tokens inside input_tokens)."""
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]},
        "total_tokens": usage["total_tokens"],
    }


async def responses(request: Request) -> Response:
    """OpenAI Responses API: the same directives as chat; streams as typed SSE events."""
    state: State = request.app.state.upstream
    body = await request.json()
    inputs = body.get("input")
    texts = [inputs] if isinstance(inputs, str) else message_texts(inputs or [])
    directives = parse_directives(texts)
    usage = decide_usage({"max_tokens": body.get("max_output_tokens")}, directives, texts)
    stream = bool(body.get("stream"))
    log_request(state, body, directives, usage, stream=stream)
    text = " ".join(f"w{i}" for i in range(1, usage["completion_tokens"] + 1))
    message = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    final = {
        "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
        "status": "completed", "model": body.get("model"), "output": [message], "usage": responses_usage(usage),
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None, "incomplete_details": None,
        "instructions": None, "metadata": {}, "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}},
    }
    if not stream:
        return JSONResponse(final)

    async def events() -> AsyncIterator[str]:
        started = {**final, "status": "in_progress", "output": [], "usage": None}
        sequence = [("response.created", {"response": started})]
        sequence += [
            ("response.output_text.delta",
             {"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": (" " if index else "") + word})
            for index, word in enumerate(text.split())
        ]
        sequence.append(("response.completed", {"response": final}))
        for number, (kind, payload) in enumerate(sequence):
            yield f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': number, **payload})}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# --------------------------------------------------------------------------- control


async def control_log(request: Request) -> Response:
    return JSONResponse(request.app.state.upstream.log)


async def control_reset(request: Request) -> Response:
    request.app.state.upstream.reset()
    return JSONResponse({"ok": True})


async def control_fail_next(request: Request) -> Response:
    body = await request.json()
    state: State = request.app.state.upstream
    state.fail_next_count = int(body.get("count", 1))
    state.fail_next_status = int(body.get("status", 500))
    return JSONResponse({"ok": True})


async def health(_: Request) -> Response:
    return JSONResponse({"ok": True})


async def list_models(_: Request) -> Response:
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "meterline-upstream"} for name in MODELS]
    return JSONResponse({"object": "list", "data": data})


def make_app() -> Starlette:
    """The ASGI app, with fresh state."""
    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/completions", completions, methods=["POST"]),
        Route("/responses", responses, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/_control/log", control_log, methods=["GET"]),
        Route("/_control/reset", control_reset, methods=["POST"]),
        Route("/_control/fail_next", control_fail_next, methods=["POST"]),
    ])
    app.state.upstream = State()
    return app


# --------------------------------------------------------------------------- test harness


@dataclass
class Upstream:
    """Handle on a running upstream subprocess."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def log(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.root_url}/_control/log", timeout=5)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        httpx.post(f"{self.root_url}/_control/reset", timeout=5).raise_for_status()

    def fail_next(self, count: int, status: int = 500) -> None:
        payload = {"count": count, "status": status}
        httpx.post(f"{self.root_url}/_control/fail_next", json=payload, timeout=5).raise_for_status()


@contextmanager
def run_upstream(port: int | None = None) -> Iterator[Upstream]:
    """Start the upstream as a subprocess, wait until healthy, stop it on exit."""
    port = port or free_port()
    command = [sys.executable, "-m", "tests.support.upstream", "--port", str(port)]
    with serving(command, f"http://127.0.0.1:{port}/health", "upstream") as process:
        yield Upstream(port=port, process=process)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(make_app(), host="127.0.0.1", port=args.port, log_level="warning", workers=1)


if __name__ == "__main__":
    main()
