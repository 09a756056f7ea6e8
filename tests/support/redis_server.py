"""A throwaway real `redis-server` on a free port (`make test` installs it when missing)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from tests.support.processes import free_port, stop_process


@contextmanager
def running_redis() -> Iterator[str]:
    """Start redis-server without persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is missing: `make test` installs it with apt-get")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(200):  # bounded: 10 s
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {process.returncode}") from None
                time.sleep(0.05)
        else:
            raise TimeoutError("redis-server did not answer PING within 10 s")
        yield url
    finally:
        stop_process(process)
