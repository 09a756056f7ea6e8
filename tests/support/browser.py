"""Debian's chromium, headless, for end-to-end tests of pages: the DOM as rendered (`dump_dom`),
screenshots, and a page driven over the DevTools protocol (`devtools_page`) to fill and submit forms
as a person would, with real key and mouse input. Every wait is bounded, and every browser started
here is killed (with its helper processes) when its call or block ends.

`Dom` reads a page's HTML as a browser parsed it: elements by id, table rows, every tag.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--disable-default-apps", "--disable-extensions", "--mute-audio"]
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class BrowserError(RuntimeError):
    pass


def _chromium() -> str:
    """The browser; missing is a failure, not a skip (`make test` installs it)."""
    if not CHROMIUM.exists():
        raise BrowserError(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    return str(CHROMIUM)


def _kill(process: subprocess.Popen) -> None:
    """Kill the browser and every helper it started (its own process group, which it leads)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)  # even after the browser itself exited: its helpers may not have
    except ProcessLookupError:
        pass  # the whole group had already exited: nothing left to stop
    process.wait(timeout=10)


def _run(arguments: list[str], timeout: float) -> str:
    """Run chromium with a fresh profile until it exits; its stdout. Killed after `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        process = subprocess.Popen([_chromium(), *FLAGS, f"--user-data-dir={profile}", *arguments],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BrowserError(f"chromium did not finish in {timeout} s: {arguments}") from None
        finally:
            _kill(process)
    if process.returncode != 0:
        raise BrowserError(f"chromium exited with {process.returncode}: {err.decode(errors='replace')[-2000:]}")
    return out.decode()


def dump_dom(url: str, timeout: float = 60) -> str:
    """The page's DOM after it loaded, serialized (what a person's browser would show)."""
    return _run(["--dump-dom", url], timeout)


def screenshot(url: str, path: Path, width: int, height: int, timeout: float = 60) -> Path:
    """A PNG of the page's first `width` x `height` pixels."""
    _run([f"--screenshot={path}", f"--window-size={width},{height}", url], timeout)
    if not path.exists() or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise BrowserError(f"chromium wrote no PNG at {path}")
    return path


class Page:
    """One browser tab over the DevTools protocol. Events are kept in order, so a test marks where it is
    (`mark`) before an action and then waits for what the action causes, never for an older event."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, timeout: float) -> None:
        self._socket, self._timeout = socket, timeout
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    async def _receive(self) -> dict[str, Any]:
        message = await self._socket.receive()
        if message.type != aiohttp.WSMsgType.TEXT:
            raise BrowserError(f"the DevTools connection ended ({message.type.name})")
        return json.loads(message.data)

    async def call(self, method: str, *, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Call a DevTools method on this tab, or on a frame attached to it (`session`, see `frames`)."""
        self._next_id += 1
        call_id = self._next_id
        message = {"id": call_id, "method": method, "params": params} | ({"sessionId": session} if session else {})
        await self._socket.send_json(message)
        async with asyncio.timeout(self._timeout):
            while True:
                message = await self._receive()
                if message.get("id") == call_id:
                    if "error" in message:
                        raise BrowserError(f"{method}: {message['error']}")
                    return message.get("result", {})
                if "method" in message:
                    self.events.append(message)

    def mark(self) -> int:
        return len(self.events)

    async def wait_for(self, method: str, since: int) -> dict[str, Any]:
        """The first `method` event at or after `since`, waiting for it (bounded)."""
        async with asyncio.timeout(self._timeout):
            position = since
            while True:
                while position < len(self.events):
                    if self.events[position]["method"] == method:
                        return self.events[position]["params"]
                    position += 1
                message = await self._receive()
                if "method" in message:
                    self.events.append(message)

    def document_statuses(self, since: int) -> list[int]:
        """HTTP statuses of the top-level documents loaded since `since`, redirects included, in order."""
        statuses = []
        for event in self.events[since:]:
            params = event["params"]
            if event["method"] == "Network.requestWillBeSent" and params.get("redirectResponse"):
                statuses.append(params["redirectResponse"]["status"])
            elif event["method"] == "Network.responseReceived" and params.get("type") == "Document":
                statuses.append(params["response"]["status"])
        return statuses

    async def goto(self, url: str) -> int:
        """Load `url` and wait until it has loaded; returns where the events of this load start."""
        since = self.mark()
        answer = await self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise BrowserError(f"{url}: {answer['errorText']}")
        await self.wait_for("Page.loadEventFired", since)
        return since

    async def evaluate(self, expression: str, *, session: str | None = None) -> Any:
        answer = await self.call("Runtime.evaluate", session=session, expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def type_into(self, selector: str, text: str) -> None:
        """Replace an input's text as a person would: focus it, select what is there, type."""
        await self.evaluate(f"(() => {{ const field = document.querySelector({json.dumps(selector)});"
                            "field.focus(); field.select(); })()")
        await self.call("Input.dispatchKeyEvent", type="rawKeyDown", key="Delete", code="Delete",
                        windowsVirtualKeyCode=46)
        await self.call("Input.dispatchKeyEvent", type="keyUp", key="Delete", code="Delete", windowsVirtualKeyCode=46)
        if text:
            await self.call("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        """A left click in the middle of the element, scrolled into view first."""
        box = await self.evaluate(f"(() => {{ const element = document.querySelector({json.dumps(selector)});"
                                  "element.scrollIntoView({block: 'center'});"
                                  "const box = element.getBoundingClientRect();"
                                  "return [box.x + box.width / 2, box.y + box.height / 2]; })()")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def click_and_load(self, selector: str) -> int:
        """Click something that navigates (a submit button) and wait for the next page; where its events start."""
        since = self.mark()
        await self.click(selector)
        await self.wait_for("Page.loadEventFired", since)
        return since


def _devtools_address(log: Path, process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := _LISTENING.search(log.read_text(errors="replace"))) is not None:
            return found.group(1)
        if process.poll() is not None:
            raise BrowserError(f"chromium exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise BrowserError(f"chromium did not open its DevTools port in {timeout} s")


def _start_with_devtools(profile: Path, log: Path, width: int, height: int) -> subprocess.Popen:
    """Chromium with a blank tab and a DevTools port of its choosing, which it writes to `log`."""
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [_chromium(), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


@asynccontextmanager
async def devtools_page(timeout: float = 30, width: int = 1200, height: int = 900) -> AsyncIterator[Page]:
    """A fresh headless chromium with one blank tab, driven over the DevTools protocol."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        log = Path(profile) / "stderr.log"
        process = await asyncio.to_thread(_start_with_devtools, Path(profile), log, width, height)
        try:
            address = await asyncio.to_thread(_devtools_address, log, process, timeout)
            port = re.search(r":(\d+)/", address).group(1)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
                    targets = await answer.json()
                tab = next(target for target in targets if target.get("type") == "page")
                async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as socket:
                    page = Page(socket, timeout)
                    for domain in ("Page", "Runtime", "Network"):
                        await page.call(f"{domain}.enable")
                    yield page
        finally:
            _kill(process)


class Dom(HTMLParser):
    """A page's elements by id (tag, attributes, text), the rows of its tables by id, and every tag seen."""

    _VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                       "wbr", "line", "rect"})

    def __init__(self, page: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._open: list[dict[str, Any]] = []
        self._table: str | None = None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        element = {"tag": tag, "attrs": attributes, "text": ""}
        if "id" in attributes:
            self.by_id[attributes["id"]] = element
        if tag == "table":
            self._table = attributes.get("id") or ""
            self.rows[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.rows[self._table].append([])
        elif tag == "td" and self._table is not None and self.rows[self._table]:
            self.rows[self._table][-1].append("")
        if tag not in self._VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, -1, -1):  # close up to the matching tag, as browsers do
            if self._open[depth]["tag"] == tag:
                del self._open[depth:]
                break
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element["text"] += data
        if self._open and self._open[-1]["tag"] == "td" and self._table is not None and self.rows[self._table]:
            self.rows[self._table][-1][-1] += data

    def text(self, element_id: str) -> str:
        """An element's text, whitespace collapsed."""
        return " ".join(self.by_id[element_id]["text"].split())

    def table(self, element_id: str) -> list[list[str]]:
        """The body rows of a table, each a list of its cells' text (header rows, which have no cells, left out)."""
        return [[" ".join(cell.split()) for cell in row] for row in self.rows[element_id] if row]

    def all(self, tag: str, **attributes: str) -> list[dict[str, str | None]]:
        """The attributes of every `tag` element having these attribute values (`class_` for class)."""
        wanted = {name.rstrip("_"): value for name, value in attributes.items()}
        return [attrs for seen, attrs in self.tags
                if seen == tag and all(attrs.get(name) == value for name, value in wanted.items())]
