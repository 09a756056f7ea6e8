"""The customer's usage page as HTML (DESIGN "Contract: usage API", `GET /usage/page`).

Pure: a usage report (`plugin.services.usage.usage_report`) in, a string out. Rendered here, server-side,
with no script and no external resource, so it works offline and inside a customer's iframe; every text
from the report is escaped. Money is shown in credits (never µcr) and dollars, from Decimal, never floats.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from html import escape
from typing import Any

from plugin.rules.policy import credits_grouped, credits_text, usd_text
from plugin.rules.pricing import UCR_PER_CREDIT
from plugin.rules.usage import top_actions

MEMBERS_SHOWN = 20
FORM_FIELDS = ("soft_thresholds_pct", "hard_limit_credits", "block_overage")
"""The limits form's inputs, as posted to `POST /usage/page/limits`."""

_UNNAMED = "-"  # the ledger's name for "no action" / "no member"
_CHART_WIDTH, _CHART_HEIGHT = 1000, 300


def _about_credits(ucr: Fraction) -> str:
    """An approximate amount of credits, to the cent of a credit (a chart label, never a charge)."""
    exact = Decimal(ucr.numerator) / Decimal(ucr.denominator) / UCR_PER_CREDIT
    return format(exact.quantize(Decimal("0.01"), ROUND_HALF_UP).normalize(), ",f")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}%"


def _x(value: Fraction | int) -> str:
    """A chart coordinate (geometry, not money)."""
    return f"{float(value):.2f}".rstrip("0").rstrip(".")


def _name(name: str, unnamed: str) -> str:
    return unnamed if name == _UNNAMED else name


def _day(iso: str) -> date:
    return datetime.fromisoformat(iso).date()


def _headline(report: Mapping[str, Any]) -> str:
    used, included, share = report["used_ucr"], report["included_ucr"], report["included_pct"]
    if included > 0:
        of_included = f"of {escape(credits_grouped(included))} included"
    else:
        of_included = f"nothing included in the {escape(report['plan'])} plan"
    width = "0" if share is None else _x(Fraction(min(share, 100.0)))
    over = " over" if share is not None and share > 100 else ""
    projected = f"On track for ${escape(report['projected_usd'])} this month"
    overage_usd = report["projected_overage_usd"]
    if Decimal(overage_usd) > 0:
        projected += f": ${escape(overage_usd)} over included."
    else:
        projected += ", nothing over included."
    return f"""<section class="headline" aria-labelledby="used-label">
<p id="used-label" class="label">Credits used this period</p>
<p class="big"><span id="used-credits">{escape(credits_grouped(used))}</span> <span class="unit">credits</span></p>
<p class="of">{of_included}</p>
<div class="bar{over}" role="progressbar" aria-label="Share of included credits used" aria-valuemin="0"
 aria-valuemax="100" aria-valuenow="{width}"><div class="fill" style="width:{width}%"></div></div>
<p class="pct"><span id="included-pct">{escape(_pct(share))}</span> of included</p>
<p id="projected-usd" class="projection">{projected}</p>
</section>"""


def _rates(report: Mapping[str, Any]) -> str:
    """What a credit past the included quota costs: one sentence for a flat rate; for graduated tiers a
    table with the tier the next credit falls in marked. Empty on a plan that charges no overage."""
    rates, included = report.get("overage_rates") or [], report["included_ucr"]
    if not rates:
        return ""
    if len(rates) == 1:
        usd = usd_text(Fraction(Decimal(rates[0]["usd_per_credit"])))
        return f'<p id="overage-rates" class="hint">Past the included credits: {escape(usd)} per credit.</p>'
    rows = []
    for rate in rates:
        low, high = rate["from_ucr"] - included, rate["up_to_ucr"]
        if high is None:
            span = f"Beyond {credits_grouped(low)}"
        else:
            span = f"First {credits_grouped(high - included)}" if low == 0 else \
                f"{credits_grouped(low)} to {credits_grouped(high - included)}"
        current = ' class="current" aria-current="true"' if rate["current"] else ""
        span += " (current)" if rate["current"] else ""
        usd = usd_text(Fraction(Decimal(rate["usd_per_credit"])))
        rows.append(f'<tr{current}><td>{escape(span)}</td><td class="num">{escape(usd)}</td></tr>')
    body = "\n".join(rows)
    return f"""<section aria-labelledby="rates-label">
<h2 id="rates-label">Overage rates</h2>
<table id="overage-rates">
<thead><tr><th scope="col">Credits past included</th><th scope="col" class="num">Per credit</th></tr></thead>
<tbody>
{body}
</tbody>
</table>
</section>"""


def _period_days(report: Mapping[str, Any]) -> list[date]:
    """Every UTC date the period touches: the chart's slots, today's and the days still to come."""
    start = datetime.fromisoformat(report["period_start"])
    last = datetime.fromisoformat(report["period_end"]) - timedelta(microseconds=1)
    days = [start.date() + timedelta(days=offset) for offset in range((last.date() - start.date()).days + 1)]
    shown = [_day(day["date"]) for day in report["daily"]]
    return days if set(shown) <= set(days) else sorted(set(days) | set(shown))


def _chart(report: Mapping[str, Any]) -> str:
    """One bar per day so far, on the period's full width, and the included quota spread per day. The
    SVG stretches to its box (so it reads at 360 px and on a desktop); its labels are HTML beside it."""
    slots = _period_days(report)
    index = {day: position for position, day in enumerate(slots)}
    period = datetime.fromisoformat(report["period_end"]) - datetime.fromisoformat(report["period_start"])
    included_per_day = Fraction(report["included_ucr"] * 86_400, max(int(period.total_seconds()), 1))
    busiest = max((day["used_ucr"] for day in report["daily"]), default=0)
    top = max(busiest, included_per_day, 1) * Fraction(11, 10)  # headroom above the tallest bar or line
    slot = Fraction(_CHART_WIDTH, len(slots))
    gap = slot * Fraction(15, 100)

    parts = []
    for day in report["daily"]:
        height = Fraction(day["used_ucr"] * _CHART_HEIGHT) / top
        x = index[_day(day["date"])] * slot + gap
        tip = f"{day['date']}: {credits_grouped(day['used_ucr'])} credits, {day['requests']} requests"
        parts.append(f'<rect class="day" data-date="{escape(day["date"])}" data-used-ucr="{int(day["used_ucr"])}" '
                     f'x="{_x(x)}" y="{_x(_CHART_HEIGHT - height)}" width="{_x(slot - 2 * gap)}" '
                     f'height="{_x(height)}"><title>{escape(tip)}</title></rect>')
    legend = []
    if report["included_ucr"] > 0:
        y = _x(_CHART_HEIGHT - included_per_day * _CHART_HEIGHT / top)
        parts.append(f'<line class="included-line" x1="0" x2="{_CHART_WIDTH}" y1="{y}" y2="{y}" '
                     'vector-effect="non-scaling-stroke"><title>Included credits per day</title></line>')
        legend.append(f'<span class="key-included">Included per day: {escape(_about_credits(included_per_day))} '
                      "credits</span>")
    if busiest > 0:
        legend.append(f"<span>Busiest day: {escape(credits_grouped(busiest))} credits</span>")
    bars = "\n".join(parts)
    return f"""<section aria-labelledby="daily-label">
<h2 id="daily-label">Credits per day</h2>
<svg id="daily-chart" viewBox="0 0 {_CHART_WIDTH} {_CHART_HEIGHT}" preserveAspectRatio="none" role="img"
 aria-labelledby="daily-label">
{bars}
</svg>
<p class="axis"><span>{escape(slots[0].isoformat())}</span><span>{escape(slots[-1].isoformat())}</span></p>
<p class="legend">{" ".join(legend) or "No usage yet this period."}</p>
</section>"""


def _share_table(table_id: str, title: str, heading: str, rows: list[dict], unnamed: str, empty: str) -> str:
    if rows:
        body = "\n".join(
            f'<tr data-used-ucr="{int(row["used_ucr"])}"><td class="name">{escape(_name(row["name"], unnamed))}</td>'
            f'<td class="num">{escape(credits_grouped(row["used_ucr"]))}</td>'
            f'<td class="num">{escape(_pct(row["share_pct"]))}'
            "</td></tr>" for row in rows)
    else:
        body = f'<tr><td class="empty" colspan="3">{escape(empty)}</td></tr>'
    return f"""<section aria-labelledby="{table_id}-label">
<h2 id="{table_id}-label">{escape(title)}</h2>
<table id="{table_id}">
<thead><tr><th scope="col">{escape(heading)}</th><th scope="col" class="num">Credits</th>
<th scope="col" class="num">Share</th></tr></thead>
<tbody>
{body}
</tbody>
</table>
</section>"""


def _tables(report: Mapping[str, Any]) -> str:
    actions = [{"name": row["action"], "used_ucr": row["used_ucr"], "share_pct": row["share_pct"]}
               for row in report["top_actions"]]
    members = [{"name": row["action"], "used_ucr": row["used_ucr"], "share_pct": row["share_pct"]}
               for row in top_actions(report["by_member"], limit=MEMBERS_SHOWN)]
    return "\n".join([
        _share_table("top-actions", "Top actions", "Action", actions, "(no action)", "No usage yet this period."),
        _share_table("members", "Members", "Member", members, "(no member)", "No usage yet this period."),
    ])


def _form(report: Mapping[str, Any], form_action: str, notice: str | None, error: str | None,
          typed: Mapping[str, str] | None) -> str:
    limits = report["limits"]
    if typed is None:
        stored = limits["soft_thresholds_pct"]
        soft = "" if stored is None else ", ".join(str(pct) for pct in stored)
        hard = "" if limits["hard_limit_ucr"] is None else credits_text(limits["hard_limit_ucr"])
        block = bool(limits["block_overage"])
    else:
        soft, hard = typed.get("soft_thresholds_pct", ""), typed.get("hard_limit_credits", "")
        block = bool(typed.get("block_overage"))
    default = "the default"
    if limits["soft_thresholds_pct"] is None:  # the effective thresholds are the default: say which
        default += f' ({", ".join(str(pct) for pct in limits["effective_soft_thresholds_pct"]) or "none"})'
    lines = []
    if notice:
        lines.append(f'<p class="notice" role="status">{escape(notice)}</p>')
    if error:
        lines.append(f'<p id="limits-error" class="error" role="alert">{escape(error)}</p>')
    if limits.get("hard_limit_usd") is not None:
        lines.append(f'<p class="hint">Your hard limit is set in dollars: ${escape(limits["hard_limit_usd"])} of '
                     "overage. A limit in credits below replaces it.</p>")
    if limits.get("cap_ucr") is not None:
        lines.append(f'<p class="hint">Requests stop at <strong>{escape(credits_grouped(limits["cap_ucr"]))}</strong> '
                     "credits this period.</p>")
    messages = "\n".join(lines)
    return f"""<section aria-labelledby="limits-label">
<h2 id="limits-label">Your limits</h2>
{messages}
<form id="limits-form" method="post" action="{escape(form_action)}">
<label for="soft-thresholds">Warn me at (% of included)</label>
<input id="soft-thresholds" name="soft_thresholds_pct" value="{escape(soft)}" placeholder="{escape(default)}"
 inputmode="numeric" autocomplete="off" maxlength="100">
<small>Percentages separated by commas, e.g. 50, 80, 100. Empty: {escape(default)}.</small>
<label for="hard-limit">Hard limit (credits this period)</label>
<input id="hard-limit" name="hard_limit_credits" value="{escape(hard)}" placeholder="no limit"
 inputmode="decimal" autocomplete="off" maxlength="40">
<small>Requests are refused once the period reaches it. Empty: no limit.</small>
<label class="check"><input type="checkbox" name="block_overage" value="on"{" checked" if block else ""}>
Block overage: stop at the included credits instead of paying for more</label>
<button type="submit">Save limits</button>
</form>
</section>"""


_STYLE = """
:root { color-scheme: light; --ink: #1d2330; --muted: #5c6475; --line: #e3e6ec; --accent: #2f6fde;
  --over: #c2410c; --bg: #ffffff; --soft: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 760px; margin: 0 auto; padding: 16px; }
header h1 { font-size: 1.1rem; margin: 0; }
.meta, .label, .of, .pct, small, .hint { color: var(--muted); }
.meta { margin: 2px 0 12px; font-size: .9rem; overflow-wrap: anywhere; }
section { margin: 0 0 22px; }
h2 { font-size: 1rem; margin: 0 0 8px; }
.label { margin: 0; font-size: .9rem; }
.big { margin: 0; font-size: 2.2rem; font-weight: 650; letter-spacing: -.02em; line-height: 1.15;
  font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.big .unit { display: inline-block; font-size: 1rem; font-weight: 500; line-height: 1; color: var(--muted);
  letter-spacing: 0; }
.of { margin: 0 0 10px; }
.bar { height: 10px; background: var(--soft); border: 1px solid var(--line); border-radius: 6px; overflow: hidden; }
.bar .fill { height: 100%; background: var(--accent); }
.bar.over .fill { background: var(--over); }
.pct { margin: 6px 0 0; font-variant-numeric: tabular-nums; }
.projection { margin: 10px 0 0; font-size: 1.05rem; font-weight: 550; }
svg { display: block; width: 100%; height: 140px; background: var(--soft); border-bottom: 1px solid #b8bec9; }
svg .day { fill: var(--accent); }
svg .included-line { stroke: var(--over); stroke-width: 2; stroke-dasharray: 6 4; }
.axis { display: flex; justify-content: space-between; margin: 2px 0 0; font-size: .8rem; color: var(--muted); }
.legend { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 4px 0 0; font-size: .85rem; color: var(--muted); }
.key-included { color: var(--over); }
.key-included::before { content: ""; display: inline-block; width: 18px; margin: 0 6px 3px 0;
  border-top: 2px dashed var(--over); vertical-align: middle; }
@media (min-width: 640px) { svg { height: 180px; } }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 4px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-size: .85rem; color: var(--muted); font-weight: 550; }
td.name { overflow-wrap: anywhere; }
.num { text-align: right; white-space: nowrap; }
tr.current td { font-weight: 650; background: var(--soft); }
.empty { color: var(--muted); }
form { display: grid; gap: 6px; max-width: 480px; }
label { font-weight: 550; margin-top: 8px; }
label.check { font-weight: 450; display: flex; gap: 8px; align-items: flex-start; }
label.check input { margin-top: 4px; }
input[type=text], input:not([type]) { font: inherit; padding: 8px 10px; border: 1px solid #c5cad3;
  border-radius: 6px; width: 100%; }
small { font-size: .85rem; }
button { justify-self: start; margin-top: 10px; font: inherit; font-weight: 600; padding: 8px 16px;
  color: #fff; background: var(--accent); border: 0; border-radius: 6px; cursor: pointer; }
.notice { background: #e8f5ec; color: #17603a; padding: 8px 10px; border-radius: 6px; }
.error { background: #fdecea; color: #a0281b; padding: 8px 10px; border-radius: 6px; }
@media (min-width: 640px) { main { padding: 28px 24px; } .big { font-size: 3.2rem; } }
"""


def render_page(report: Mapping[str, Any], *, form_action: str, notice: str | None = None, error: str | None = None,
                typed: Mapping[str, str] | None = None) -> str:
    """The whole page. `typed`: the form's fields as the customer posted them, shown again with `error`
    when they were refused."""
    start = _day(report["period_start"])
    last = (datetime.fromisoformat(report["period_end"]) - timedelta(microseconds=1)).date()
    meta = f"{report['customer_id']} · {report['plan']} plan · {start.isoformat()} to {last.isoformat()} (UTC)"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Usage · {escape(report["customer_id"])}</title>
<style>{_STYLE}</style>
</head>
<body>
<main>
<header><h1>Usage</h1><p class="meta">{escape(meta)}</p></header>
{_headline(report)}
{_rates(report)}
{_chart(report)}
{_tables(report)}
{_form(report, form_action, notice, error, typed)}
</main>
</body>
</html>
"""
