"""How the report spells numbers: one set of rules for the table (markdown, HTML) and the plots' ticks.

A learning rate reads 5e-5 in the table, in the headline and under a sweep
plot's axis alike, so a reader can match a tick to a row. summary.csv does not
go through here: it keeps unrounded numbers for scripts.
"""

from __future__ import annotations

import json
import math


def finite(value) -> float | None:
    """`value` as a float when it is a finite number (not a bool), else None: what ranking and deltas may use."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def compact_float(value: float) -> str:
    """5e-05 -> 5e-5, 0.0015 -> 1.5e-3, 0.05 -> 0.05, 1e+20 -> 1e20."""
    text = f"{value:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}e{int(exponent)}"
    if 0 < abs(value) < 0.01:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return text


def _count(value: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return str(int(value))


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _metric(value: float) -> str:
    if isinstance(value, int):  # counts such as invalid_json
        return str(value)
    return f"{value:.3f}" if abs(value) <= 1 else f"{value:.2f}"


# How each column kind spells a number (Column.kind in table.py).
NUMBER_FORMATS = {
    "count": _count,  # 4_884_480 -> 4.88M
    "int": lambda value: str(int(value)),
    "rate": lambda value: f"{value:,.0f}" if value >= 100 else f"{value:.3g}",  # tokens/s
    "seconds": _seconds,  # 206.3 -> 3m26s
    "mb": lambda value: f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB",
    "loss": lambda value: f"{value:.4g}",
    "metric": _metric,
    "delta": lambda value: f"{value:+.3f}" if abs(value) <= 1 else f"{value:+.3g}",
    "setting": lambda value: compact_float(value) if isinstance(value, float) else str(value),
}


def format_value(kind: str, value) -> str:
    """A cell's text: `kind` is its column's kind; missing values are blank, booleans on/off."""
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (int, float)) and kind in NUMBER_FORMATS:
        return NUMBER_FORMATS[kind](value)
    if kind == "setting" and isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
