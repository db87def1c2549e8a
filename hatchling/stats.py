"""Confidence intervals for the scores the eval and RLVR report; the spread of the benchmarks' repeats."""

from __future__ import annotations

import math
import statistics

Z95 = 1.959964     # the standard normal's 97.5th percentile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion: sound at 0 and 1 and for small n, unlike mean ± z·se."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def spread(values: list[float], digits: int = 2, name: str = "median") -> dict:
    """{name: the median, "min": ..., "max": ...} of repeated measurements (bench/), rounded to `digits`."""
    return {name: round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}
