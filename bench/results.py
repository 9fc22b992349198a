"""Figures, their targets, and the files a run writes (JSON and a Markdown table)."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.console import say

# Comparison of a figure with its target: its ratio to the baseline, or its value alone.
Check = Literal["ratio>=", "ratio<=", "value>=", "value<="]


@dataclass
class Figure:
    name: str
    title: str
    value: float | None
    unit: str
    check: Check
    threshold: float
    baseline: float | None = None
    baseline_title: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def target(self) -> str:
        operator = "≥" if self.check.endswith(">=") else "≤"
        if self.check.startswith("ratio"):
            return f"{operator} {self.threshold:g} × {self.baseline_title}"
        return f"{operator} {self.threshold:g} {self.unit}"

    @property
    def meets_target(self) -> bool:
        measured = self.ratio if self.check.startswith("ratio") else self.value
        if measured is None or math.isnan(measured):
            return False
        if self.check.endswith(">="):
            return measured >= self.threshold
        return measured <= self.threshold

    def as_json(self) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "value": _rounded(self.value),
            "unit": self.unit,
            "baseline": _rounded(self.baseline),
            "ratio": None if ratio is None else round(ratio, 3),
            "target": self.target,
            "meets_target": self.meets_target,
        }


def _rounded(value: float | None) -> float | None:
    if value is None:
        return None
    return round(value, 3) if abs(value) < 100 else round(value, 1)


@dataclass
class Report:
    mode: str
    figures: list[Figure] = field(default_factory=list)
    # Every raw measurement behind the figures: baselines, process CPU, counts.
    details: dict[str, Any] = field(default_factory=dict)
    # Conditions of the run that may have disturbed its figures, shown under the table.
    warnings: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        say(f"  {figure.name}: {format_value(figure.value, figure.unit)}")

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        latest = directory / "latest.json"
        latest.write_text(
            json.dumps({f.name: f.as_json() for f in self.figures}, indent=2) + "\n"
        )
        (directory / "latest-details.json").write_text(
            json.dumps(self.details, indent=2, default=str) + "\n"
        )
        (directory / "latest.md").write_text(self.markdown())
        return latest

    def markdown(self) -> str:
        lines = [
            "| figure | value | baseline | ratio | target | met |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for figure in self.figures:
            ratio = figure.ratio
            baseline = (
                f"{format_value(figure.baseline, figure.unit)} ({figure.baseline_title})"
                if figure.baseline is not None
                else "—"
            )
            lines.append(
                f"| {figure.title} | {format_value(figure.value, figure.unit)} "
                f"| {baseline} | {'—' if ratio is None else f'{ratio:.2f}'} "
                f"| {figure.target} | {'yes' if figure.meets_target else '**no**'} |"
            )
        notes = [f"- {f.title}: {f.note}" for f in self.figures if f.note]
        if notes:
            lines += ["", *notes]
        if self.warnings:
            lines += ["", *(f"- warning: {warning}" for warning in self.warnings)]
        return "\n".join(lines) + "\n"


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"
