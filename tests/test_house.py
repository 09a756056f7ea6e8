"""The house's rules that a machine can check (DESIGN "Layout", STYLE "One place, two front doors")."""

from __future__ import annotations

import ast
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[1] / "plugin"

IO_MODULES = ("plugin.ledger", "plugin.counters", "plugin.outbox", "plugin.sinks", "plugin.stripe", "plugin.api",
              "plugin.services", "plugin.runtime", "plugin.cli", "plugin.admission", "plugin.notify",
              "sqlalchemy", "sqlmodel", "redis", "httpx", "aiohttp", "stripe", "litellm", "fastapi", "requests",
              "socket", "smtplib", "sqlite3", "psycopg")


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(paths, forbidden) -> dict[str, list[str]]:
    found = {}
    for path in paths:
        bad = sorted(name for name in imports_of(path)
                     if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden))
        if bad:
            found[str(path.relative_to(PLUGIN))] = bad
    return found


def test_rules_do_no_io():
    assert offending(sorted((PLUGIN / "rules").glob("*.py")), IO_MODULES) == {}


def test_the_cli_and_the_api_do_not_import_each_other():
    assert offending(sorted((PLUGIN / "cli").glob("*.py")), ("plugin.api",)) == {}
    assert offending(sorted((PLUGIN / "api").glob("*.py")), ("plugin.cli",)) == {}


def test_services_know_neither_front_door():
    assert offending(sorted((PLUGIN / "services").glob("*.py")), ("plugin.api", "plugin.cli", "fastapi")) == {}


def test_only_the_hooks_module_imports_litellm():
    importers = offending(sorted(PLUGIN.rglob("*.py")), ("litellm",))
    assert list(importers) == ["litellm_hooks.py"]


def test_the_check_itself_catches_an_import(tmp_path):
    """The checks above would pass vacuously if imports_of found nothing."""
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from sqlalchemy import text\n")
    assert imports_of(sample) == {"sqlalchemy", "sqlalchemy.text"}
