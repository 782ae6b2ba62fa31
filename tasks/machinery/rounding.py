"""Numbers in log lines: floats at 4 significant digits (0.02779, 27.77, 1.235e-05), so that a
line reads at a glance and says no more than the measurement does; counts stay whole.
(`reporting.format_metrics` and the CLI's figures use it.)"""
from __future__ import annotations

import numbers
from typing import Any

SIGNIFICANT_DIGITS = 4


def rounded(value: Any) -> str:
    """`value` for a log line: a float (Python's, numpy's) at 4 significant digits; anything
    else (an int, None, a name) as `str` gives it."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{float(value):.{SIGNIFICANT_DIGITS}g}"
    return str(value)
