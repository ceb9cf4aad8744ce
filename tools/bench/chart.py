"""The benchmark charts (matplotlib, PNG): each scenario against its baseline with its
latencies, and how cost grows with the events in the log and the keys in the cache.

Drawn from the result rows `runner` saves (dicts), so a chart can be redrawn from a
saved results.json. matplotlib is an optional extra of the bench.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Result = dict[str, Any]


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _ticker() -> Any:
    import matplotlib.ticker

    return matplotlib.ticker


def _label(row: Result) -> str:
    name = str(row["scenario"])
    if ", " in name:
        return name.replace(", ", "\n", 1)
    return name.replace(" (", "\n(", 1)


def _log_axis(axis: Any, low: float, high: float, suffix: str = "") -> None:
    """Readable ticks on a log axis: 1-2-5 steps over a short range, decades else."""
    ticker = _ticker()
    decades = math.log10(max(high, 1e-12) / max(low, 1e-12))
    subs = (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}{suffix}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def overview(rows: Sequence[Result], path: Path) -> bool:
    """Bars of each figure against its baseline (1.0, higher is better) and the
    p50/p99 latency of the rows that have one; False when there is nothing to draw."""
    shown = [r for r in rows if not r.get("series") and r.get("speed")]
    timed = [r for r in rows if not r.get("series") and r.get("p99_ms")]
    if not shown:
        return False
    plt = _pyplot()
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(16, max(5.0, 0.55 * max(len(shown), len(timed)) + 1.5)),
        gridspec_kw={"width_ratios": [1.1, 1]},
    )
    ys = list(range(len(shown)))
    speeds = [r["speed"] for r in shown]
    colors = ["#4c72b0" if r.get("meets") is not False else "#c44e52" for r in shown]
    # Bars grow from the baseline (1.0) to the figure, left when worse, right when
    # better, on a log scale so 0.5x and 2x are as long.
    left.barh(ys, [v - 1 for v in speeds], left=1.0, color=colors)
    left.axvline(1.0, color="black", linewidth=1, linestyle="--")
    left.set_xscale("log")
    reach = max(max(speeds), 1 / min(speeds), 2.0) * 1.6
    left.set_xlim(1 / reach, reach)
    _log_axis(left.xaxis, 1 / reach, reach, "x")
    left.set_yticks(ys, [_label(r) for r in shown], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("figure vs. its baseline (baseline = 1.0; right is better)")
    left.set_title("Each figure against its physical baseline (red: misses its target)")
    for y, speed in zip(ys, speeds, strict=True):
        left.annotate(
            f" {speed:.2f}x ",
            (speed, y),
            va="center",
            ha="left" if speed >= 1 else "right",
            fontsize=7,
        )
    if timed:
        tys = list(range(len(timed)))
        p50 = [r["p50_ms"] for r in timed]
        p99 = [r["p99_ms"] for r in timed]
        right.hlines(tys, p50, p99, color="grey", linewidth=2)
        right.scatter(p50, tys, marker="o", zorder=3, label="p50")
        right.scatter(p99, tys, marker="s", zorder=3, label="p99")
        right.set_xscale("log")
        _log_axis(right.xaxis, min(p50), max(p99))
        right.set_yticks(tys, [_label(r) for r in timed], fontsize=8)
        right.set_ylim(len(timed) - 0.5, -0.5)
        right.set_xlabel("latency, ms (log scale)")
        right.set_title("Latency p50 / p99", loc="left")
        right.grid(True, axis="x", which="both", alpha=0.3)
        right.legend(loc="lower right", bbox_to_anchor=(1.0, 1.04), ncol=2)
    else:
        right.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def scaling(rows: Sequence[Result], path: Path) -> bool:
    """Replay events/s over events in the log, check ns over keys in the cache,
    each beside its baseline; False when the scaling scenario has not run."""
    replay = sorted((r for r in rows if r.get("series") == "replay"), key=_x)
    check = sorted((r for r in rows if r.get("series") == "check"), key=_x)
    if not replay and not check:
        return False
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    _curve(
        left,
        replay,
        title="Replay of the read model vs. events in the log",
        ylabel="events/s (log scale)",
        xlabel="events in the log",
        target=100_000,
        log_y=True,
    )
    _curve(
        right,
        check,
        title="check() in process vs. keys in the cache",
        ylabel="ns per check (random keys)",
        xlabel="keys in the cache",
        target=2000,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _x(row: Result) -> float:
    return float(row.get("x") or 0)


def _curve(
    axes: Any,
    rows: Sequence[Result],
    *,
    title: str,
    ylabel: str,
    xlabel: str,
    target: float,
    log_y: bool = False,
) -> None:
    if not rows:
        axes.set_axis_off()
        return
    ticker = _ticker()
    xs = [_x(r) for r in rows]
    axes.plot(xs, [r["value"] for r in rows], marker="o", label="govledger")
    axes.plot(
        xs,
        [r["baseline_value"] for r in rows],
        marker="s",
        linestyle="--",
        label=f"baseline: {rows[0]['baseline']}",
    )
    axes.axhline(target, color="grey", linestyle=":", label=f"target {target:,.0f}")
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    if log_y:
        axes.set_yscale("log")
    else:
        axes.set_ylim(bottom=0)
    axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
