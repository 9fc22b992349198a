"""`make bench`: the real stack measured against raw baselines in the same run.

`python -m bench.run` (quick mode) or `BENCH_MODE=full python -m bench.run`; see
docs/benchmarks.md for what each figure measures and the last recorded table.
"""
