"""Percentiles of latency samples."""

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], fraction: float) -> float | None:
    """Return the nearest-rank percentile (`fraction` in 0..1) of the samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summarize_ms(samples: Sequence[float]) -> dict[str, float | int | None]:
    """Return count, p50, p90, p99 and max of latencies in milliseconds."""

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {
        "count": len(samples),
        "p50": rounded(percentile(samples, 0.50)),
        "p90": rounded(percentile(samples, 0.90)),
        "p99": rounded(percentile(samples, 0.99)),
        "max": rounded(max(samples) if samples else None),
    }


def lowest_percentiles(
    summaries: Sequence[dict[str, float | int | None]],
) -> dict[str, float | int | None]:
    """Return each percentile's lowest value over several summaries of the same step.

    Noise on the machine only ever adds latency, so the lowest of repeated runs is the
    closest to the step on a quiet machine. A baseline taken so can only make a target
    harder to meet, never easier.
    """
    merged: dict[str, float | int | None] = {
        "count": min(int(summary["count"] or 0) for summary in summaries),
        "runs": len(summaries),
    }
    for name in ("p50", "p90", "p99", "max"):
        values = [
            float(value)
            for summary in summaries
            if (value := summary[name]) is not None
        ]
        merged[name] = min(values) if values else None
    return merged
