"""How figures are written for people: the one set of format helpers for tables, summaries and the CLI."""

from __future__ import annotations

import math

DASH = "—"


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x: float | None, digits: int = 2) -> str:
    """A ratio as a percentage: 0.1234 → '12.34%'; None or NaN → '—'."""
    return DASH if _missing(x) else f"{100 * x:.{digits}f}%"


def ms(x_s: float | None, digits: int = 1, unit: bool = False) -> str:
    """Seconds as milliseconds: 0.0123 → '12.3' (or '12.3 ms'); None → '—'."""
    return DASH if _missing(x_s) else f"{1000 * x_s:.{digits}f}" + (" ms" if unit else "")


def si(x: float | None, unit: str = "") -> str:
    """A number with an SI prefix and 3 significant digits: 1.5e12, 'FLOP/s' → '1.5 TFLOP/s'; None → '—'."""
    if _missing(x):
        return DASH
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def giga(x: float | None, missing: str = "n/a") -> str:
    """A figure in units of 1e9 with thousands separators and 2 decimals: 1.5e12 → '1,500.00'."""
    return missing if _missing(x) else f"{x / 1e9:,.2f}"


def signed_pct(x: float | None, missing: str = "n/a") -> str:
    """A relative error as a signed percentage: 0.05 → '+5.0%'."""
    return missing if _missing(x) else f"{100 * x:+.1f}%"


def peak_warning(verdict: str | None, fix: str | None, detail: str = "") -> str:
    """The line every surface prints under its figures when the peak is not an upper bound."""
    return f"PEAK NOT CREDIBLE{detail}: {verdict}.\nFix: {fix}."


LOSS_NAMES = {"waste": "waste", "memory_bound": "memory", "beyond_roofline": "overhead", "idle": "idle"}


def largest_loss(waterfall: dict | None, lever: dict | None) -> str:
    """The lever as a short cell: 'memory 62%', 'waste 12% (rejected drafts)'; '—' without a waterfall."""
    if not waterfall or not lever:
        return DASH
    part = lever.get("part")
    cause = lever.get("cause")
    text = f"{LOSS_NAMES.get(part, part)} {pct(waterfall.get(part), digits=0)}"
    return text + (f" ({cause.replace('_', ' ')})" if cause else "")
