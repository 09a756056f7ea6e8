"""The pricing changelog as HTML (`GET /pricing/changelog.html`).

Pure: the changelog (`plugin.services.pricing.changelog`) in, a string out. No script, no external
resource, every text escaped (reasons are the operator's words, field names come from meterline.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

_STYLE = """
:root { color-scheme: light; --ink: #1d2330; --muted: #5c6475; --line: #e3e6ec; --old: #a0281b; --new: #17603a; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 760px; margin: 0 auto; padding: 16px; }
h1 { font-size: 1.2rem; margin: 0 0 4px; }
.intro, .meta, .empty { color: var(--muted); }
article { margin: 0 0 24px; padding-top: 12px; border-top: 1px solid var(--line); }
h2 { font-size: 1rem; margin: 0; }
.meta { margin: 2px 0 6px; font-size: .9rem; }
.reason { margin: 0 0 8px; overflow-wrap: anywhere; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 4px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-size: .85rem; color: var(--muted); font-weight: 550; }
td.field { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85rem;
  overflow-wrap: anywhere; }
td.old { color: var(--old); } td.new { color: var(--new); }
.num { text-align: right; white-space: nowrap; }
@media (min-width: 640px) { main { padding: 28px 24px; } }
"""


def _value(value: str | None) -> str:
    return "—" if value is None else escape(value)


def _entry(entry: Mapping[str, Any]) -> str:
    affected = entry["customers_affected"]
    meta = f"{entry['at'][:10]} · {affected:,} customer{'' if affected == 1 else 's'} affected"
    if entry["changes"]:
        rows = "\n".join(
            f'<tr><td class="field">{escape(change["field"])}</td><td class="num old">{_value(change["old"])}</td>'
            f'<td class="num new">{_value(change["new"])}</td></tr>' for change in entry["changes"])
        body = f"""<table id="changes-{int(entry['version'])}">
<thead><tr><th scope="col">What</th><th scope="col" class="num">Before</th><th scope="col" class="num">After</th>
</tr></thead>
<tbody>
{rows}
</tbody>
</table>"""
    else:
        body = '<p class="empty">The prices in force when this log began.</p>'
    return f"""<article id="version-{int(entry['version'])}">
<h2>Version {int(entry['version'])}</h2>
<p class="meta"><time datetime="{escape(entry['at'])}">{escape(meta)}</time></p>
<p class="reason">{escape(entry['reason'])}</p>
{body}
</article>"""


def render_changelog(log: Mapping[str, Any]) -> str:
    """The whole page, newest version first."""
    entries = "\n".join(_entry(entry) for entry in log["entries"]) or \
        '<p class="empty">No pricing has been recorded yet.</p>'
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Pricing changelog</title>
<style>{_STYLE}</style>
</head>
<body>
<main>
<h1>Pricing changelog</h1>
<p class="intro">Every change to plans and prices, newest first. Amounts are exact: dollars, credits and
ratios as configured.</p>
{entries}
</main>
</body>
</html>
"""
