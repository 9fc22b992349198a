"""Processes that the benchmark starts: load generators, simulated phones and bare servers.

Each module runs as `python -m bench.tools.<name> '<json options>'` and prints one JSON
object (its result) on the last line of stdout, so that its CPU time and its output stay
apart from the orchestrator's.
"""
