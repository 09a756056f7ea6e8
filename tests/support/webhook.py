"""A webhook receiver on 127.0.0.1 for tests (http.server in a thread), collecting JSON POST bodies.

    with receiving_webhooks() as hooks:
        post_webhook(hooks.url + "/hook", notice)
        [body] = hooks.wait_for(1)

Set `status` (at start or any time later) to make it answer something else than 200.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Call:
    """One POST as received: the path with its query string, the headers and the decoded JSON body."""

    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class WebhookReceiver:
    url: str
    status: int = 200
    calls: list[Call] = field(default_factory=list)
    _arrived: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def bodies(self) -> list[Any]:
        with self._arrived:
            return [call.body for call in self.calls]

    def wait_for(self, count: int, timeout: float = 2.0) -> list[Any]:
        """The bodies once at least `count` POSTs arrived; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.calls) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self.calls)} of {count} webhook call(s) after {timeout} s")
                self._arrived.wait(remaining)
            return [call.body for call in self.calls]

    def record(self, call: Call) -> None:
        with self._arrived:
            self.calls.append(call)
            self._arrived.notify_all()


def handler_for(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw  # kept as bytes so a test sees what was not JSON
            receiver.record(Call(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            answer = b"ok" if 200 <= receiver.status < 300 else b"failed"
            self.send_response(receiver.status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the default writes every request to stderr, cluttering pytest's output."""

    return Handler


@contextmanager
def receiving_webhooks(status: int = 200) -> Iterator[WebhookReceiver]:
    """A webhook receiver on 127.0.0.1 and a port the OS picks, until the block ends."""
    receiver = WebhookReceiver(url="", status=status)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(receiver))
    server.daemon_threads = True
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
