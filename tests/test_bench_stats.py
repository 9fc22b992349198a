"""The benchmark's percentile helpers (bench/stats.py)."""

from bench.stats import lowest_percentiles, percentile, summarize_ms


def test_percentile_takes_the_nearest_rank() -> None:
    samples = [float(value) for value in range(1, 101)]

    assert percentile(samples, 0.50) == 50.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile([], 0.5) is None


def test_lowest_percentiles_ignore_a_disturbed_tail() -> None:
    quiet = summarize_ms([1.0] * 98 + [2.0, 30.0])
    # A burst of other work during the second run raised its tail, not its median.
    disturbed = summarize_ms([0.9] * 90 + [500.0] * 10)

    merged = lowest_percentiles([quiet, disturbed])

    assert merged["p50"] == 0.9
    assert merged["p99"] == 2.0
    assert merged["max"] == 30.0
    assert merged["runs"] == 2
    assert merged["count"] == 100


def test_lowest_percentiles_skips_runs_without_samples() -> None:
    merged = lowest_percentiles([summarize_ms([]), summarize_ms([3.0, 4.0])])

    assert merged["p50"] == 3.0
    assert merged["count"] == 0
