"""Helpers shared by the local servers the tests start as subprocesses (fake upstream, fake OpenMeter,
Stripe emulator, PostgreSQL): a free port, waiting until a server answers, stopping it."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False  # not listening yet


def wait_answering(process: subprocess.Popen, url: str, name: str, timeout: float = 15.0) -> None:
    """Poll `url` until it answers 200; fail early if the process dies, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited early with code {process.returncode}")
        if answers(url):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{name} at {url} not answering after {timeout} s")


@contextmanager
def serving(command: list[str], health_url: str, name: str, timeout: float = 15.0) -> Iterator[subprocess.Popen]:
    """Run `command` from the repository root until the block ends; yields once `health_url` answers."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_answering(process, health_url, name, timeout)
        yield process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
