"""A fake OpenMeter ingest API for tests of the OpenMeter sink.

``POST /api/v1/events`` takes one CloudEvent (``application/cloudevents+json``) or an array of
them (``application/cloudevents-batch+json``) and answers like OpenMeter:

* 204 when every event is valid; events are deduplicated on ``(id, source)`` and duplicates counted.
* 400 ``application/problem+json`` for the **whole** request when any event is invalid: missing
  required CloudEvents field, ``specversion`` not ``1.0``, ``time`` not RFC 3339, ``data.credits_ucr``
  not a string of digits, or an id the test asked to refuse (``/_control/reject``).
* 401 when the server has a token and the bearer token differs. Its detail quotes the token it got,
  as careless servers do, so tests can prove the sink keeps tokens out of its reasons.
* 415 for any other content type.

Control endpoints live under ``/_control``:

==========================  ===================================================================
``GET  /_control/events``   accepted events, first arrival only
``GET  /_control/calls``    every ingest call: content type, ids, answered status
``GET  /_control/stats``    ``{"events": n, "duplicates": n, "calls": n}``
``POST /_control/reset``    forget everything, including failures, delays and refused ids
``POST /_control/fail_next``  ``{"count", "status", "after"?, "retry_after"?}``: let ``after`` calls
                            through, then answer the next ``count`` with ``status`` (nothing recorded)
``POST /_control/delay``    ``{"seconds", "count"}``: the next ``count`` calls record their events,
                            then wait before answering (an answer lost to a client timeout)
``POST /_control/reject``   ``{"ids": [...]}``: requests carrying these ids are refused with 400
==========================  ===================================================================

Run it with ``python -m tests.support.openmeter --port N [--token T]`` or, from a test, use
:func:`run_openmeter`, which starts it as a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.processes import free_port, serving

SINGLE_TYPE = "application/cloudevents+json"
BATCH_TYPE = "application/cloudevents-batch+json"
REQUIRED_STRINGS = ("id", "source", "type", "subject", "time")
DIGITS = re.compile(r"[0-9]+")
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")


@dataclass
class State:
    """Everything the server remembers between requests."""

    token: str | None
    events: list[dict[str, Any]] = field(default_factory=list)
    seen: set[tuple[str, str]] = field(default_factory=set)
    duplicates: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)
    fail_after: int = 0
    fail_count: int = 0
    fail_status: int = 500
    fail_retry_after: str | None = None
    delay_seconds: float = 0.0
    delay_count: int = 0
    refused_ids: set[str] = field(default_factory=set)

    def reset(self) -> None:
        self.events.clear()
        self.seen.clear()
        self.duplicates = 0
        self.calls.clear()
        self.fail_after = self.fail_count = 0
        self.fail_retry_after = None
        self.delay_seconds, self.delay_count = 0.0, 0
        self.refused_ids.clear()

    def injected_failure(self) -> int | None:
        """The status to fail this call with, counting down ``after`` then ``count``."""
        if self.fail_after > 0:
            self.fail_after -= 1
            return None
        if self.fail_count > 0:
            self.fail_count -= 1
            return self.fail_status
        return None

    def record(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            key = (event["id"], event["source"])
            if key in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(key)
                self.events.append(event)


# --------------------------------------------------------------------------- validation


def is_rfc3339(value: str) -> bool:
    if not RFC3339.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False  # right shape, impossible date (e.g. month 13)
    return True


def event_error(event: Any, refused_ids: set[str]) -> str | None:
    """Why OpenMeter would refuse this CloudEvent, or None."""
    if not isinstance(event, dict):
        return "an event must be a JSON object"
    if event.get("specversion") != "1.0":
        return "specversion must be \"1.0\""
    for name in REQUIRED_STRINGS:
        if not isinstance(event.get(name), str) or not event[name]:
            return f"{name} is required and must be a non-empty string"
    if not is_rfc3339(event["time"]):
        return f"time {event['time']!r} is not RFC 3339"
    data = event.get("data")
    credits = data.get("credits_ucr") if isinstance(data, dict) else None
    if not isinstance(credits, str) or not DIGITS.fullmatch(credits):
        return "data.credits_ucr must be a string of digits"
    if event["id"] in refused_ids:
        return f"event {event['id']} is refused by this server"
    return None


def parse_events(content_type: str, body: bytes) -> tuple[list[Any] | None, tuple[int, str] | None]:
    """The events of a request, or (status, detail) of the problem with it."""
    media = content_type.split(";")[0].strip().lower()
    if media not in (SINGLE_TYPE, BATCH_TYPE):
        return None, (415, f"unsupported content type {media!r}")
    try:
        payload = json.loads(body)
    except ValueError:
        return None, (400, "the body is not JSON")
    if media == SINGLE_TYPE:
        return [payload], None
    if not isinstance(payload, list) or not payload:
        return None, (400, "a batch must be a non-empty JSON array")
    return payload, None


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return Response(json.dumps(body), status_code=status, media_type="application/problem+json", headers=headers)


# --------------------------------------------------------------------------- ingest


def bearer_problem(state: State, authorization: str | None) -> Response | None:
    if state.token is None:
        return None
    presented = (authorization or "").removeprefix("Bearer ").strip()
    if presented == state.token:
        return None
    return problem(401, "Unauthorized", f"invalid bearer token {presented!r}" if presented else "missing bearer token")


async def ingest(request: Request) -> Response:
    state: State = request.app.state.openmeter
    body = await request.body()
    call: dict[str, Any] = {"content_type": request.headers.get("content-type", ""), "ids": [], "status": 204}
    state.calls.append(call)
    answer = await answer_ingest(state, request, body, call)
    call["status"] = answer.status_code
    return answer


async def answer_ingest(state: State, request: Request, body: bytes, call: dict[str, Any]) -> Response:
    refused = bearer_problem(state, request.headers.get("authorization"))
    if refused is not None:
        return refused
    events, error = parse_events(call["content_type"], body)
    if error is not None:
        status, detail = error
        return problem(status, "Bad Request" if status == 400 else "Unsupported Media Type", detail)
    call["ids"] = [event.get("id") if isinstance(event, dict) else None for event in events]
    failure = state.injected_failure()
    if failure is not None:
        headers = {"Retry-After": state.fail_retry_after} if state.fail_retry_after else None
        return problem(failure, "Injected failure", f"failing as told ({failure})", headers)
    for position, event in enumerate(events):
        reason = event_error(event, state.refused_ids)
        if reason is not None:
            return problem(400, "Bad Request", f"event {position}: {reason}")
    state.record(events)
    if state.delay_count > 0:
        state.delay_count -= 1
        await asyncio.sleep(state.delay_seconds)
    return Response(status_code=204)


# --------------------------------------------------------------------------- control


async def control_events(request: Request) -> Response:
    return JSONResponse(request.app.state.openmeter.events)


async def control_calls(request: Request) -> Response:
    return JSONResponse(request.app.state.openmeter.calls)


async def control_stats(request: Request) -> Response:
    state: State = request.app.state.openmeter
    return JSONResponse({"events": len(state.events), "duplicates": state.duplicates, "calls": len(state.calls)})


async def control_reset(request: Request) -> Response:
    request.app.state.openmeter.reset()
    return JSONResponse({"ok": True})


async def control_fail_next(request: Request) -> Response:
    body = await request.json()
    state: State = request.app.state.openmeter
    state.fail_after = int(body.get("after", 0))
    state.fail_count = int(body.get("count", 1))
    state.fail_status = int(body.get("status", 500))
    retry_after = body.get("retry_after")
    state.fail_retry_after = None if retry_after is None else str(retry_after)
    return JSONResponse({"ok": True})


async def control_delay(request: Request) -> Response:
    body = await request.json()
    state: State = request.app.state.openmeter
    state.delay_seconds = float(body["seconds"])
    state.delay_count = int(body.get("count", 1))
    return JSONResponse({"ok": True})


async def control_reject(request: Request) -> Response:
    body = await request.json()
    request.app.state.openmeter.refused_ids.update(str(identifier) for identifier in body["ids"])
    return JSONResponse({"ok": True})


async def health(_: Request) -> Response:
    return JSONResponse({"ok": True})


def make_app(token: str | None = None) -> Starlette:
    """The ASGI app, with fresh state; `token` None means no auth (self-hosted)."""
    app = Starlette(routes=[
        Route("/api/v1/events", ingest, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/_control/events", control_events, methods=["GET"]),
        Route("/_control/calls", control_calls, methods=["GET"]),
        Route("/_control/stats", control_stats, methods=["GET"]),
        Route("/_control/reset", control_reset, methods=["POST"]),
        Route("/_control/fail_next", control_fail_next, methods=["POST"]),
        Route("/_control/delay", control_delay, methods=["POST"]),
        Route("/_control/reject", control_reject, methods=["POST"]),
    ])
    app.state.openmeter = State(token=token)
    return app


# --------------------------------------------------------------------------- test harness


@dataclass
class OpenMeterServer:
    """Handle on a running fake OpenMeter subprocess."""

    port: int
    token: str | None
    process: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _get(self, path: str) -> Any:
        response = httpx.get(f"{self.base_url}/_control/{path}", timeout=5)
        response.raise_for_status()
        return response.json()

    def _post(self, path: str, payload: dict[str, Any] | None = None) -> None:
        httpx.post(f"{self.base_url}/_control/{path}", json=payload or {}, timeout=5).raise_for_status()

    def events(self) -> list[dict[str, Any]]:
        return self._get("events")

    def calls(self) -> list[dict[str, Any]]:
        return self._get("calls")

    def stats(self) -> dict[str, int]:
        return self._get("stats")

    def reset(self) -> None:
        self._post("reset")

    def fail_next(self, count: int, status: int = 500, *, after: int = 0, retry_after: str | None = None) -> None:
        self._post("fail_next", {"count": count, "status": status, "after": after, "retry_after": retry_after})

    def delay(self, seconds: float, count: int = 1) -> None:
        self._post("delay", {"seconds": seconds, "count": count})

    def reject(self, *ids: str) -> None:
        self._post("reject", {"ids": list(ids)})


@contextmanager
def run_openmeter(token: str | None = "om_test", port: int | None = None) -> Iterator[OpenMeterServer]:
    """Start the fake OpenMeter as a subprocess, wait until healthy, stop it on exit."""
    port = port or free_port()
    command = [sys.executable, "-m", "tests.support.openmeter", "--port", str(port)]
    if token is not None:
        command += ["--token", token]
    with serving(command, f"http://127.0.0.1:{port}/health", "fake OpenMeter") as process:
        yield OpenMeterServer(port=port, token=token, process=process)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default=None, help="bearer token to require (none: no auth)")
    args = parser.parse_args()
    uvicorn.run(make_app(args.token), host="127.0.0.1", port=args.port, log_level="warning", workers=1)


if __name__ == "__main__":
    main()
