"""Figures and failures as the processes print them: one line, never a traceback."""
from __future__ import annotations

import math


def one_line(e):
    """An exception as one line: 'Type: first line of the message'."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def number(v, spec=".4f", scale=1):
    """A figure for a log line: `v * scale` formatted, or 'n/a' when it is null, not a number or not finite
    (an evaluator's loss can be null; whatever arrives from outside may be anything)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v * scale):
        return "n/a"
    return format(v * scale, spec)
