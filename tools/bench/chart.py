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

from tools.bench.rows import ratio_text

Result = dict[str, Any]

MET = "#4c72b0"
MISSED = "#c44e52"


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


def required_speed(row: Result) -> float | None:
    """The target as a ratio to the baseline, oriented like `speed` (higher is
    better): where a row's bar must reach to meet it; None without a target."""
    needed = []
    if row.get("min_ratio") is not None:
        needed.append(float(row["min_ratio"]))
    target, baseline = row.get("target"), row.get("baseline_value")
    if target is not None and baseline:
        needed.append(
            baseline / target if row["lower_is_better"] else target / baseline
        )
    return max(needed) if needed else None


def _in_overview(row: Result) -> bool:
    return bool(row.get("speed")) and bool(row.get("overview", not row.get("series")))


def overview(rows: Sequence[Result], path: Path) -> bool:
    """Bars of each figure against its baseline (1.0, higher is better), its target
    marked on the bar, and the p50/p99 latency of the rows that have one; False
    when there is nothing to draw."""
    shown = [r for r in rows if _in_overview(r)]
    timed = [r for r in shown if r.get("p99_ms")]
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
    needed = [required_speed(r) for r in shown]
    # Red: a target missed, whether an absolute one or a ratio (see Row.meets).
    colors = [MISSED if r.get("meets") is False else MET for r in shown]
    # A log scale (0.5x and 2x as long) whose bars all start at its left edge, so a
    # figure near its baseline (1.02x) draws a bar as long as any other.
    marks = [*speeds, *(n for n in needed if n), 1.0]
    floor = min(marks) / 2.5
    reach = max(max(marks) * 2.5, 2.0)
    left.barh(ys, [v - floor for v in speeds], left=floor, color=colors)
    left.axvline(1.0, color="black", linewidth=1, linestyle="--")
    targets = [(y, n) for y, n in zip(ys, needed, strict=True) if n is not None]
    if targets:
        left.scatter(
            [n for _, n in targets],
            [y for y, _ in targets],
            marker="|",
            s=260,
            linewidths=2.5,
            color="black",
            zorder=3,
        )
    left.set_xscale("log")
    left.set_xlim(floor, reach)
    _log_axis(left.xaxis, floor, reach, "x")
    left.set_yticks(ys, [_label(r) for r in shown], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("figure vs. its baseline (baseline = 1.0, dashed; right is better)")
    left.set_title("Each figure against its baseline (red: misses its target |)")
    for y, speed, need in zip(ys, speeds, needed, strict=True):
        # Past the target's mark when that mark sits just beyond the bar's end.
        at = need if need is not None and speed < need < speed * 1.8 else speed
        left.annotate(f" {ratio_text(speed, need)}x", (at, y), va="center", fontsize=7)
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
    """Ingest over serving processes, replay events/s over events in the log, check
    ns over keys in the cache, each beside its baseline from the same run; False
    when neither the ingest nor the scaling scenario has run."""
    batch = sorted((r for r in rows if r.get("series") == "processes-batch"), key=_x)
    ws = sorted((r for r in rows if r.get("series") == "processes-websocket"), key=_x)
    replay = sorted((r for r in rows if r.get("series") == "replay"), key=_x)
    check = sorted((r for r in rows if r.get("series") == "check"), key=_x)
    if not (batch or ws or replay or check):
        return False
    plt = _pyplot()
    fig, (procs, events, keys) = plt.subplots(1, 3, figsize=(19, 5.5))
    _processes(procs, batch, ws)
    _curve(
        events,
        replay,
        title="Replay of the read model vs. events in the log",
        ylabel="events/s (log scale)",
        xlabel="events in the log",
        target=100_000,
        log_y=True,
    )
    _curve(
        keys,
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


def _processes(axes: Any, batch: Sequence[Result], ws: Sequence[Result]) -> None:
    """Records/s with 1 and 2 serving processes, raw COPY over as many
    connections beside them; a point that misses its target ratio is red."""
    if not (batch or ws):
        axes.set_axis_off()
        return
    ticker = _ticker()
    for rows, label, marker in (
        (batch, "ingest /api/usage/batch", "o"),
        (ws, "ingest WebSocket", "^"),
    ):
        if not rows:
            continue
        xs = [_x(r) for r in rows]
        axes.plot(xs, [r["value"] for r in rows], marker=marker, label=label)
        _mark_misses(axes, rows)
    baseline = batch or ws
    axes.plot(
        [_x(r) for r in baseline],
        [r["baseline_value"] for r in baseline],
        marker="s",
        linestyle="--",
        label="baseline: raw binary COPY, as many connections",
    )
    for r in baseline:
        if r.get("min_ratio") is not None:
            axes.scatter(
                [_x(r)],
                [r["baseline_value"] * r["min_ratio"]],
                marker="_",
                s=400,
                linewidths=2,
                color="grey",
                zorder=3,
            )
    axes.set_xticks([1, 2])
    axes.set_xlim(0.7, 2.3)
    axes.set_ylim(bottom=0)
    axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axes.set_title("Ingest vs. serving processes (— : target ratio)")
    axes.set_xlabel("serving processes (SO_REUSEPORT)")
    axes.set_ylabel("records/s")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)


def _mark_misses(axes: Any, rows: Sequence[Result]) -> None:
    """A red ring around each point that misses its target."""
    missed = [r for r in rows if r.get("meets") is False]
    if missed:
        axes.scatter(
            [_x(r) for r in missed],
            [r["value"] for r in missed],
            s=160,
            facecolors="none",
            edgecolors=MISSED,
            linewidths=2,
            zorder=4,
            label="misses its target",
        )


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
    _mark_misses(axes, rows)
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


def keep_pace(rows: Sequence[Result], path: Path) -> bool:
    """The keep-pace burst: each projection's lag behind the acknowledged records
    over time, in events and in seconds, with the targets after the last ack;
    False when the scenario has not run."""
    timeline = next(
        (r["timeline"] for r in rows if r.get("timeline") and "t" in r["timeline"]),
        None,
    )
    if timeline is None:
        return False
    plt = _pyplot()
    fig, (events, seconds) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    t = timeline["t"]
    last = timeline["last_ack_s"]
    done = {
        "cache": timeline["cache_caught_up_s"],
        "read model": timeline["model_caught_up_s"],
    }
    lines = (
        ("cache", "cache_events", "cache_s", 0.5, "#4c72b0"),
        ("read model", "model_events", "model_s", 2.0, "#dd8452"),
    )
    for name, in_events, in_seconds, target, color in lines:
        events.plot(t, timeline[in_events], label=name, color=color)
        seconds.plot(t, timeline[in_seconds], label=name, color=color)
        after = done[name]
        missed = after > target
        seconds.scatter(
            [last + after],
            [0],
            marker="v",
            s=90,
            color=MISSED if missed else color,
            zorder=4,
            label=f"{name} applied the last ack {after:.2f} s after it"
            f" (target ≤ {target:g} s{': missed' if missed else ''})",
        )
        seconds.axhline(target, color=color, linestyle=":", linewidth=1)
    for axes in (events, seconds):
        axes.axvline(last, color="black", linestyle="--", linewidth=1)
        axes.grid(True, alpha=0.3)
        axes.set_ylim(bottom=0)
    ticker = _ticker()
    events.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    events.set_ylabel("events acknowledged, not yet applied")
    events.set_title(
        f"Keep pace: /api/usage/batch at full rate"
        f" ({timeline['records_per_second']:,} records/s) until the last ack (dashed);"
        f" GOVLEDGER_PROJECTOR={timeline.get('projector', 'child')}"
    )
    events.legend(fontsize=8, loc="upper left")
    seconds.set_ylabel("age of the oldest unapplied ack, s")
    seconds.set_xlabel("seconds since the burst started")
    seconds.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


PLAIN = "#8c8c8c"


def reservations(rows: Sequence[Result], path: Path) -> bool:
    """Concurrent gateway calls with plain and with reserving checks (admitted, spend
    above the limit), a reserving check against a plain one, and what several serving
    processes admit beyond the headroom; False when the scenario has not run."""
    detail: Result = {}
    for row in rows:
        if row.get("group") == "reservations" and row.get("timeline"):
            detail |= row["timeline"]
    if not detail:
        return False
    plt = _pyplot()
    fig, panels = plt.subplots(
        1, 3, figsize=(19, 5.5), gridspec_kw={"width_ratios": [1.2, 1, 1.3]}
    )
    for axes, key, draw in zip(
        panels,
        ("spend", "check", "processes"),
        (_overspend, _check_cost, _over_admission),
        strict=True,
    ):
        if key in detail:
            draw(axes, detail)
        else:
            axes.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2


def _overspend(axes: Any, detail: Result) -> None:
    spend = detail["spend"]
    groups = ("calls admitted", "spend above the limit, $")
    fields = ("admitted", "above")
    for offset, (mode, label, color) in enumerate(
        (
            ("plain", "check → record", PLAIN),
            ("reserve", "reserve → record (holds)", MET),
        )
    ):
        xs = [g + (offset - 0.5) * 0.38 for g in range(len(groups))]
        values = [_median(spend[mode][f]) for f in fields]
        axes.bar(xs, values, width=0.36, color=color, label=label)
        for x, field in zip(xs, fields, strict=True):
            runs = spend[mode][field]
            axes.scatter([x] * len(runs), runs, color="black", s=10, zorder=3)
        for x, value in zip(xs, values, strict=True):
            axes.annotate(
                f"{value:g}", (x, value), ha="center", va="bottom", fontsize=8
            )
    room = detail["room"]
    axes.hlines(room, -0.5, 0.5, color="black", linestyle="--", linewidth=1)
    axes.annotate(f" room for {room}", (-0.5, room), va="bottom", fontsize=8)
    # With holds, spend stays within the limit plus what the admitted calls cost
    # beyond their estimates.
    beyond = max(spend["reserve"]["beyond_estimates"])
    axes.hlines(beyond, 1.0, 1.4, color=MET, linestyle=":", linewidth=1.5)
    axes.annotate(
        f"admitted calls beyond\ntheir estimates: {beyond:g}",
        (1.4, beyond),
        va="bottom",
        ha="right",
        fontsize=7,
    )
    axes.set_xticks(range(len(groups)), groups)
    axes.set_xlim(-0.6, len(groups) - 0.4)
    axes.set_title(
        f"{detail['calls']} concurrent calls against a budget with room for"
        f" {detail['room']}, 1 process",
        fontsize=10,
    )
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize=8)


def _check_cost(axes: Any, detail: Result) -> None:
    checks = detail["check"]
    modes = (("plain", "plain check", PLAIN), ("reserve", "reserving check", MET))
    medians = [_median(checks[m]["per_second"]) for m, _, _ in modes]
    axes.bar(
        range(len(modes)),
        medians,
        color=[c for _, _, c in modes],
        width=0.6,
    )
    for i, (mode, _, _) in enumerate(modes):
        p50 = _median(checks[mode]["p50_ms"])
        p99 = _median(checks[mode]["p99_ms"])
        axes.annotate(
            f"{medians[i]:,.0f}/s\np50 {p50:.1f} ms\np99 {p99:.1f} ms",
            (i, medians[i]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ratio = medians[1] / medians[0] if medians[0] else 0.0
    axes.set_xticks(range(len(modes)), [label for _, label, _ in modes])
    axes.set_ylim(0, max(medians) * 1.35)
    ticker = _ticker()
    axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axes.set_ylabel("checks/s over HTTP, same client, 64 connections")
    axes.set_title(f"A reserving check costs a commit: {ratio:.2f}x", fontsize=10)
    axes.grid(True, axis="y", alpha=0.3)


def _over_admission(axes: Any, detail: Result) -> None:
    processes, room = detail["processes"], detail["room"]
    over = processes["over"]
    labels = [k for k in over if k != "plain"]
    names = ["all at once" if float(k) == 0 else f"every {k} ms" for k in labels]
    for i, key in enumerate(labels):
        runs = over[key]
        axes.bar(i, _median(runs), width=0.6, color=MET)
        axes.scatter([i] * len(runs), runs, color="black", s=12, zorder=3)
    bound = (processes["count"] - 1) * room
    axes.axhline(bound, color=MISSED, linestyle="--", linewidth=1)
    axes.annotate(
        f" bound: (processes - 1) ⌊H/e⌋ = {bound}",
        (-0.5, bound),
        va="bottom",
        fontsize=8,
    )
    axes.set_xticks(range(len(labels)), names)
    axes.set_xlim(-0.6, len(labels) - 0.4)
    axes.set_ylim(0, max(bound, *(max(over[k]) for k in labels)) * 1.25 + 1)
    seen, window = processes["seen_ms"], processes["window_ms"]
    axes.set_xlabel(
        f"{sum(processes['spread'][0])} reserving checks over"
        f" {processes['count']} processes, alternating; plain checks admit"
        f" {_median(over['plain']):g} beyond\na hold is seen by another process"
        f" {window['p50']:.0f} ms (p50), {window['p99']:.0f} ms (p99) after its"
        f" decision\n(its ack → another cache: p50 {seen['p50']:.0f} ms,"
        f" p99 {seen['p99']:.0f} ms)",
        fontsize=8,
    )
    axes.set_ylabel("checks admitted beyond ⌊H/e⌋")
    axes.set_title(
        f"{processes['count']} serving processes (SO_REUSEPORT): over-admission",
        fontsize=10,
    )
    axes.grid(True, axis="y", alpha=0.3)
