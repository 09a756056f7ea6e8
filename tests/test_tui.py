"""The operator console shell starts and quits (its screens arrive with later issues)."""

from __future__ import annotations

from textual.widgets import Static

from tui.app import make_app


async def test_console_starts_shows_its_placeholder_and_quits_on_q():
    app = make_app()
    async with app.run_test() as pilot:
        assert app.title == "meterline"
        assert "operator console" in str(app.query_one("#placeholder", Static).render())
        await pilot.press("q")
    assert app.return_code == 0
