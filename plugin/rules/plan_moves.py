"""The first-invoice safety credit's maths (DESIGN "Contract: migration and pricing operations"), pure.

A customer moved from a flat price to metered billing pays at most `cap_pct` percent of its old flat
price on its first metered invoice: a draft above that gets a credit for the difference, so the invoice
ends at the cap (rounded down to a whole cent: never above it).
"""

from __future__ import annotations

import math
from fractions import Fraction


def safety_cap_cents(flat_usd: Fraction, cap_pct: Fraction) -> int:
    """The most the first metered invoice may total, in whole cents (rounded down): `cap_pct`% of the flat price."""
    return math.floor(flat_usd * cap_pct)  # dollars × 100 cents × pct / 100


def safety_credit_cents(draft_total_cents: int, flat_usd: Fraction, cap_pct: Fraction) -> int:
    """The credit (positive cents) that brings the draft down to the cap; 0 when it is not above it."""
    return max(0, draft_total_cents - safety_cap_cents(flat_usd, cap_pct))
