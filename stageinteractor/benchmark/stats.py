"""Summaries of repeated timings: spread (median, quartiles, ...) and ratios of paired runs.

Pure Python (no torch): every function takes plain lists of floats.
"""

import statistics
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["spread", "ratio", "speedups", "paired_median_ratio"]


def spread(values: Sequence[float]) -> Optional[Dict[str, Any]]:
    """median, quartiles (inclusive method), IQR, min, max, n and the sorted values of a list
    (None if empty). One value: q1 = q3 = that value."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "median": statistics.median(xs),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": xs[0],
        "max": xs[-1],
        "n": len(xs),
        "values": xs,
    }


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing or b is 0."""
    return None if a is None or b in (None, 0) else float(a) / float(b)


def speedups(theirs: Sequence[float], ours: Sequence[float]) -> Dict[str, float]:
    """theirs / ours of interleaved timings: ratio of medians (``median``) and median of the
    per-iteration ratios (``paired``); > 1: ours is faster."""
    return {
        "median": statistics.median(theirs) / statistics.median(ours),
        "paired": statistics.median([t / o for t, o in zip(theirs, ours)]),
    }


def paired_median_ratio(a: Sequence[float], b: Sequence[float], invert: bool = False) -> float:
    """Median over iterations i of a[i] / b[i] (``invert``: of b[i] / a[i], e.g. a throughput
    ratio from times)."""
    pr: List[float] = [x / y for x, y in zip(a, b)]
    return statistics.median([1 / r for r in pr] if invert else pr)
