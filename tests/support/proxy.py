"""Start the real `litellm` proxy with meterline, as a subprocess, for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from tests.support.processes import free_port

MASTER_KEY = "sk-test-master-key"
LITELLM = Path(sys.executable).with_name("litellm")

METERLINE_YAML = {
    "pricing": {
        "basis": "tokens",
        "tokens_per_credit": 1000,
        "weights": {"input": "1", "cached_input": "0.1", "output": "4"},
        "models": {"unpriced": {"basis": "cost"}},
    },
    "prices": {
        "test-model": {"input": "0.15", "output": "0.60", "cached_input": "0.075"},
        "backup": {"input": "2.50", "output": "10"},
    },
    "plans": {"pro": {"included_credits": 1000}, "free": {"cap_credits": 100}},
}


def litellm_config(upstream_base_url: str, plugin: bool = True) -> dict:
    """The proxy config the tests run: the project's hooks, the fake upstream behind every model."""

    def deployment(name: str, upstream_model: str) -> dict:
        return {
            "model_name": name,
            "litellm_params": {"model": f"openai/{upstream_model}", "api_base": upstream_base_url, "api_key": "x"},
        }

    config: dict = {
        "model_list": [
            deployment("test-model", "gpt-4o-mini"),
            deployment("primary", "broken-model"),
            deployment("backup", "gpt-4o"),
            deployment("unpriced", "unpriced-model"),
            deployment("embedder", "text-embedding-3-small"),
        ],
        "router_settings": {"fallbacks": [{"primary": ["backup"]}]},
        "litellm_settings": {
            "num_retries": 2,
            "cache": True,
            "cache_params": {"type": "local", "mode": "default_off"},
        },
        "general_settings": {},
    }
    if plugin:
        config["litellm_settings"]["callbacks"] = "plugin.litellm_hooks.meterline_logger"
        config["general_settings"]["custom_auth"] = "plugin.litellm_hooks.custom_auth"
    return config


@dataclass
class Proxy:
    port: int
    database_url: str
    workdir: Path
    process: subprocess.Popen

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return (self.workdir / "proxy.log").read_text(errors="replace")


def proxy_env(workdir: Path, database_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_MASTER_KEY=MASTER_KEY,
        METERLINE_DATABASE_URL=database_url,
        METERLINE_CONFIG=str(workdir / "meterline.yaml"),
        LITELLM_LOG="ERROR",
        METERLINE_KEY_CACHE_SECONDS="1",
    )
    env.update(extra or {})
    return env


@contextmanager
def run_proxy(workdir: Path, upstream_base_url: str, database_url: str, plugin: bool = True,
              meterline_yaml: dict | None = None, timeout: float = 90.0,
              env: dict[str, str] | None = None, port: int | None = None) -> Iterator[Proxy]:
    """Write the configs into `workdir`, start `litellm --config`, wait for it, stop it after."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "litellm_config.yaml").write_text(yaml.safe_dump(litellm_config(upstream_base_url, plugin)))
    (workdir / "meterline.yaml").write_text(yaml.safe_dump(meterline_yaml or METERLINE_YAML))
    port = port or free_port()
    with open(workdir / "proxy.log", "wb") as log_file:
        process = subprocess.Popen(
            [str(LITELLM), "--config", str(workdir / "litellm_config.yaml"), "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir, env=proxy_env(workdir, database_url, env), stdout=log_file, stderr=subprocess.STDOUT,
        )
        proxy = Proxy(port=port, database_url=database_url, workdir=workdir, process=process)
        try:
            _wait_ready(proxy, plugin, timeout)
            yield proxy
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _wait_ready(proxy: Proxy, plugin: bool, timeout: float) -> None:
    path = "/meterline/v1/health" if plugin else "/health/liveliness"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            raise RuntimeError(f"litellm exited with {proxy.process.returncode}:\n{proxy.log_text()[-4000:]}")
        try:
            ready = httpx.get(proxy.base_url + path, timeout=2).status_code == 200
        except httpx.HTTPError:
            ready = False  # not listening yet: poll again until the deadline
        if ready:
            return
        time.sleep(0.25)
    raise TimeoutError(f"litellm did not become ready in {timeout}s:\n{proxy.log_text()[-4000:]}")
