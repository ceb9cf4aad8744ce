"""A line of the report: a figure beside its baseline from the same run, their
ratio and latencies; and the progress line printed as each pair lands."""

from __future__ import annotations

import statistics
from typing import Any


class Row:
    """One line of the report: a figure, its baseline, their ratio, latencies.

    `target`: the figure must be at most (lower_is_better) or at least this;
    `min_ratio`: and figure / baseline at least this. `series` and `x` place a row
    on a scaling curve (e.g. events in the log) instead of the overview chart, or
    on both with `overview=True`; `timeline` is what a scenario's own chart draws.
    """

    def __init__(
        self,
        scenario: str,
        unit: str,
        baseline_name: str,
        *,
        lower_is_better: bool = False,
        target: float | None = None,
        min_ratio: float | None = None,
        series: str | None = None,
        x: float | None = None,
        overview: bool | None = None,
    ) -> None:
        self.scenario = scenario
        self.unit = unit
        self.baseline_name = baseline_name
        self.lower_is_better = lower_is_better
        self.target = target
        self.min_ratio = min_ratio
        self.series = series
        self.x = x
        self.overview = series is None if overview is None else overview
        self.timeline: dict[str, Any] | None = None
        self.pairs: list[tuple[float, float]] = []
        self.p50: list[float] = []
        self.p99: list[float] = []
        self.note = ""

    def add(
        self, value: float, baseline: float, p50: float = 0.0, p99: float = 0.0
    ) -> None:
        self.pairs.append((value, baseline))
        self.p50.append(p50)
        self.p99.append(p99)

    def as_dict(self) -> dict[str, Any]:
        values = [v for v, _ in self.pairs]
        baselines = [b for _, b in self.pairs]
        ratios = [v / b for v, b in self.pairs if b]
        value = statistics.median(values)
        ratio = statistics.median(ratios) if ratios else 0.0
        return {
            "scenario": self.scenario,
            "unit": self.unit,
            "value": value,
            "baseline": self.baseline_name,
            "baseline_value": statistics.median(baselines),
            "ratio": ratio,
            "ratios": [round(r, 3) for r in ratios],
            # Oriented so that higher is better and the baseline is 1.0.
            "speed": (1 / ratio if ratio else 0.0) if self.lower_is_better else ratio,
            "lower_is_better": self.lower_is_better,
            "p50_ms": statistics.median(self.p50) if any(self.p50) else None,
            "p99_ms": statistics.median(self.p99) if any(self.p99) else None,
            "target": self.target,
            "min_ratio": self.min_ratio,
            "meets": self._meets(value, ratio),
            "series": self.series,
            "x": self.x,
            "overview": self.overview,
            "note": self.note,
            **({"timeline": self.timeline} if self.timeline else {}),
        }

    def _meets(self, value: float, ratio: float) -> bool | None:
        if self.target is None and self.min_ratio is None:
            return None
        ok = True
        if self.target is not None:
            ok = value <= self.target if self.lower_is_better else value >= self.target
        if self.min_ratio is not None:
            ok = ok and ratio >= self.min_ratio
        return ok


def progress(*rows: Row) -> None:
    for row in rows:
        value, base = row.pairs[-1]
        ratio = f"{value / base:.2f}" if base else "-"
        print(
            f"  {row.scenario}: {number(value)} {row.unit} vs {number(base)} = {ratio}",
            flush=True,
        )


def number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def ratio_text(value: float, bound: float | None) -> str:
    """`value` to two places, or to three where two would show it equal to the
    `bound` it does not reach (0.698 against 0.70 reads as the miss it is)."""
    text = f"{value:.2f}"
    if bound is not None and value != bound and text == f"{bound:.2f}":
        return f"{value:.3f}"
    return text
