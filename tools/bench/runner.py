"""Runs the scenarios, pairs each figure with its baseline, prints and saves the table
and draws the charts.

Every figure is paired with a baseline measured just before it on the same machine and
cluster; the ratio reported is the median of the per-pair ratios (these machines are
shared and drift, so absolute rates are only good to about ±15%). The ratio is always
figure / baseline; for figures where lower is better (ns, ms, bytes) the charts show
its inverse, so that on every bar 1.0 is the baseline and higher is better.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from service import eventstore, pgcluster
from service.migrate import migrate
from tools.bench import cache as cache_bench
from tools.bench import chart, servers
from tools.bench import check as check_bench
from tools.bench import ingest as ingest_bench
from tools.bench import keep_pace as keep_pace_bench
from tools.bench import lag as lag_bench
from tools.bench import peer as peer_bench
from tools.bench import replay as replay_bench
from tools.bench import reservations as reservations_bench
from tools.bench.rows import Row, number, progress, ratio_text

# Durable, as in production: an acknowledged record is on disk.
DURABLE = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "512MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "max_connections": "200",
}


async def create_keys(url: str, count: int) -> list[str]:
    """Secrets of keys in a team with a daily and a monthly budget, via the API."""
    return [key.secret for key in await servers.create_keys(url, count)]


async def empty_tables(dsn: str) -> None:
    """Every table of the service (and the peer's) empty, as after `migrate`."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch(
            "SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_tables"
            " WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
        )
        names = ", ".join(row["name"] for row in tables)
        # The log refuses TRUNCATE unless triggers are off (superuser only).
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


# --- scenarios -----------------------------------------------------------------------


# Ingest against raw COPY over as many connections as there are serving processes.
INGEST_MIN_RATIO = {1: 0.80, 2: 0.60}


async def scenario_ingest(dsn: str, args: argparse.Namespace) -> list[Row]:
    conn = await asyncpg.connect(dsn)
    await ingest_bench.prepare_raw_table(conn)
    raw = ingest_bench.raw_rows(args.raw_rows)
    rows: list[Row] = []
    for processes in (1, 2):
        baseline = f"raw binary COPY, 1000 rows/txn, {processes} connection(s)"
        batch = Row(
            f"ingest /api/usage/batch, {processes} process(es)",
            "records/s",
            baseline,
            min_ratio=INGEST_MIN_RATIO[processes],
            series="processes-batch",
            x=processes,
            overview=True,
        )
        ws = Row(
            f"ingest WebSocket, {processes} process(es)",
            "records/s",
            baseline,
            series="processes-websocket",
            x=processes,
            overview=True,
        )
        with servers.govledger(dsn, processes=processes) as url:
            keys = await create_keys(url, 100)
            for _ in range(args.reps):
                # New records every time: those of an earlier pair are duplicates.
                bodies = ingest_bench.batch_bodies(
                    keys, int(args.seconds * 250_000) + 50_000
                )
                await ingest_bench.reset_tables(conn)
                base = await ingest_bench.raw_copy(dsn, raw, connections=processes)
                await ingest_bench.reset_tables(conn)
                result = await ingest_bench.through_batch(
                    url, bodies, connections=args.connections, seconds=args.seconds
                )
                batch.add(
                    result.per_second,
                    base,
                    result.percentile(0.5),
                    result.percentile(0.99),
                )
                await ingest_bench.reset_tables(conn)
                base = await ingest_bench.raw_copy(dsn, raw, connections=processes)
                await ingest_bench.reset_tables(conn)
                result = await ingest_bench.through_websocket(
                    url, keys, connections=args.connections, seconds=args.seconds
                )
                ws.add(
                    result.per_second,
                    base,
                    result.percentile(0.5),
                    result.percentile(0.99),
                )
                progress(batch, ws)
        rows += [batch, ws]
    await conn.close()
    return rows


async def scenario_check(dsn: str, args: argparse.Namespace) -> list[Row]:
    row = Row(
        "check over HTTP, 1 process",
        "checks/s",
        "aiohttp handler doing no work, same client",
        min_ratio=0.70,
    )
    # The same checks beside the empty handler on uvloop, the loop serve runs on:
    # what the check costs beyond the loop (no target; the figure above has it).
    on_uvloop = Row(
        "check over HTTP, 1 process, against the empty handler on uvloop",
        "checks/s",
        "the same aiohttp handler doing no work, on uvloop",
    )
    with servers.govledger(dsn) as url:
        [secret] = await create_keys(url, 1)
        body = json.dumps(
            {
                "virtual_key": secret,
                "provider": "openai",
                "model": "gpt-4o",
                "estimated_cost": "0.01",
            }
        ).encode()
        with (
            servers.empty_handler() as empty_url,
            servers.empty_handler(uvloop=True) as uvloop_url,
        ):
            spent: dict[str, list[check_bench.CpuSpent]] = {}
            for _ in range(args.reps):
                runs = {}
                for name, server in (
                    ("the empty handler", empty_url),
                    ("serve", url),
                    ("the empty handler on uvloop", uvloop_url),
                ):
                    runs[name] = run = await check_bench.http_checks(
                        server,
                        body,
                        connections=64,
                        seconds=args.seconds,
                        pid=servers.pids(server)[0],
                    )
                    if run.cpu is not None:
                        spent.setdefault(name, []).append(run.cpu)
                result = runs["serve"]
                if result.errors:
                    raise RuntimeError(f"{result.errors} checks failed")
                for line, baseline in (
                    (row, runs["the empty handler"]),
                    (on_uvloop, runs["the empty handler on uvloop"]),
                ):
                    line.add(
                        result.per_second,
                        baseline.per_second,
                        result.p50_ms,
                        result.p99_ms,
                    )
                    line.note = f"client: {result.client}, 64 connections"
                    if spent:
                        line.note += "; " + _cpu_note(spent)
                    progress(line)
    return [row, on_uvloop]


def _cpu_note(spent: dict[str, list[check_bench.CpuSpent]]) -> str:
    """The CPU each server process spent a request, medians over the pairs: in
    user mode + in the kernel (where delivering an answer wakes a sleeping client)."""
    return "CPU a request, user + kernel: " + ", ".join(
        f"{name} {statistics.median(c.user_us for c in cpu):.1f}"
        f" + {statistics.median(c.system_us for c in cpu):.1f} µs"
        for name, cpu in spent.items()
    )


async def scenario_check_inproc(dsn: str, args: argparse.Namespace) -> list[Row]:
    shape = cache_bench.shape_for_keys(args.keys)
    measured = await cache_bench.measure_in_child(
        shape, reps=args.reps, checks=_checks(args)
    )
    baseline = "dict lookup + 3 Structs compared, same keys in the same order"
    random_keys = Row(
        f"check() in process, {shape.keys:,} keys, random keys",
        "ns/check",
        baseline,
        lower_is_better=True,
        target=2000,
    )
    for ours, base in zip(measured.random_ns, measured.random_base_ns, strict=True):
        random_keys.add(ours, base, measured.p50_ns / 1e6, measured.p99_ns / 1e6)
    hot = Row(
        f"check() in process, {shape.keys:,} keys, hot key",
        "ns/check",
        baseline,
        lower_is_better=True,
        target=2000,
    )
    for ours, base in zip(measured.hot_ns, measured.hot_base_ns, strict=True):
        hot.add(ours, base)
    random_keys.note = hot.note = (
        f"chain key → team → customer, 3 budgets each; {shape.teams:,} teams,"
        f" {shape.customers:,} customers; cache built by apply() of"
        f" {measured.events:,} events in {measured.build_s:.1f} s; baseline single"
        f" calls p50/p99 {measured.base_p50_ns:,.0f}/{measured.base_p99_ns:,.0f} ns"
    )
    progress(random_keys, hot)
    return [random_keys, hot]


def _checks(args: argparse.Namespace) -> int:
    """Checks per timing: 100,000 a second of --seconds."""
    return max(100_000, int(args.seconds * 100_000))


async def scenario_memory(dsn: str, args: argparse.Namespace) -> list[Row]:
    rows = []
    for budgets in (100_000, 1_000_000):
        shape = cache_bench.shape_for_budgets(budgets)
        measured = await cache_bench.measure_in_child(shape, reps=0, checks=0)
        row = Row(
            f"cache memory, {measured.budgets:,} budgets",
            "bytes/budget",
            "1 KiB target",
            lower_is_better=True,
            target=1024,
        )
        row.add(measured.rss_bytes / measured.budgets, 1024)
        row.note = (
            f"resident-set growth of a fresh interpreter building the cache by apply()"
            f" ({measured.rss_bytes / 2**20:,.0f} MiB after gc.collect()):"
            f" {shape.keys:,} keys, {shape.teams:,} teams, {shape.customers:,}"
            " customers, 3 budgets each, 1 usage event per key"
        )
        progress(row)
        rows.append(row)
    return rows


async def scenario_lag(dsn: str, args: argparse.Namespace) -> list[Row]:
    await empty_tables(dsn)
    per_body = 20
    baseline = f"LISTEN/NOTIFY: COPY {per_body} rows + pg_notify → listener woken"
    cache_row = Row(
        "lag: ack → cache applied (check min_position)",
        "ms p99",
        baseline,
        lower_is_better=True,
        target=50,
    )
    model_row = Row(
        "lag: ack → read model applied (GET min_position)",
        "ms p99",
        baseline,
        lower_is_better=True,
        target=50,
    )
    template = ingest_bench.raw_rows(per_body)
    with servers.govledger(dsn) as url:
        keys = await servers.create_keys(url, 100)
        ceiling = await lag_bench.ceiling(
            dsn, url, keys, per_body=per_body, seconds=min(args.seconds, 3.0)
        )
        rate = ceiling.sustained * args.lag_load
        notes: list[str] = []
        for _ in range(args.reps):
            await lag_bench.caught_up(dsn, url)
            base = await lag_bench.notify_round_trips(dsn, samples=500, rows=template)
            base_p50 = lag_bench.percentile(base, 0.5)
            base_p99 = lag_bench.percentile(base, 0.99)
            result = await lag_bench.drive(
                url, keys, rate=rate, seconds=args.seconds, per_body=per_body
            )
            for row, spans in (
                (cache_row, result.cache_ms),
                (model_row, result.model_ms),
            ):
                p50 = lag_bench.percentile(spans, 0.5)
                p99 = lag_bench.percentile(spans, 0.99)
                row.add(p99, base_p99, p50, p99)
            notes.append(
                f"{result.records_per_second:,.0f} records/s"
                f" ({len(result.cache_ms)} probes, {result.errors} errors of which"
                f" {result.lagging} projection_lag,"
                f" {result.late} late sends); baseline p50/p99"
                f" {base_p50:.2f}/{base_p99:.2f} ms; a check that waits for nothing"
                f" p50/p99 {lag_bench.percentile(result.floor_ms, 0.5):.2f}"
                f"/{lag_bench.percentile(result.floor_ms, 0.99):.2f} ms"
            )
            progress(cache_row, model_row)
    cache_row.note = model_row.note = (
        f"{args.lag_load:.0%} of the {ceiling.sustained:,.0f} records/s the service"
        f" sustains with the same {per_body}-record batches (bursts:"
        f" {ceiling.burst:,.0f} records/s before the read model catches up); "
        + "; ".join(notes)
    )
    return [cache_row, model_row]


async def scenario_keep_pace(dsn: str, args: argparse.Namespace) -> list[Row]:
    await empty_tables(dsn)
    # GOVLEDGER_PROJECTOR=inline govledger bench keep-pace: the projector inside serve.
    placement = os.environ.get("GOVLEDGER_PROJECTOR") or "child"
    seconds = args.keep_pace_seconds
    notify = f"LISTEN/NOTIFY: COPY {keep_pace_bench.PER_BODY} rows + pg_notify →"
    notify += " listener woken, p50"
    cache_row = Row(
        f"keep pace: last ack → cache applied, after {seconds:g} s at full rate",
        "ms",
        notify,
        lower_is_better=True,
        target=500,
    )
    model_row = Row(
        f"keep pace: last ack → read model applied, after {seconds:g} s at full rate",
        "ms",
        notify,
        lower_is_better=True,
        target=2000,
    )
    ingest_row = Row(
        "keep pace: ingest /api/usage/batch until both projections applied it,"
        " 1 process",
        "records/s",
        "raw binary COPY, 1000 rows/txn, 1 connection",
        min_ratio=INGEST_MIN_RATIO[1],
    )
    conn = await asyncpg.connect(dsn)
    await ingest_bench.prepare_raw_table(conn)
    raw = ingest_bench.raw_rows(args.raw_rows)
    template = ingest_bench.raw_rows(keep_pace_bench.PER_BODY)
    notes: list[str] = []
    # What serve and its projector child log (warnings, errors), kept for after.
    serve_log = Path(args.output).with_name("keep-pace-serve.log")
    serve_log.unlink(missing_ok=True)
    try:
        with servers.govledger(dsn, log=serve_log) as url:
            keys = await servers.create_keys(url, 100)
            for _ in range(args.reps):
                await ingest_bench.reset_tables(conn)
                copy = await ingest_bench.raw_copy(dsn, raw)
                await ingest_bench.reset_tables(conn)
                spans = await lag_bench.notify_round_trips(
                    dsn, samples=200, rows=template
                )
                notify_ms = lag_bench.percentile(spans, 0.5)
                await lag_bench.caught_up(dsn, url)
                burst = await keep_pace_bench.run(
                    dsn, url, keys, seconds=seconds, connections=args.connections
                )
                cache_row.add(burst.cache_s * 1000, notify_ms)
                model_row.add(burst.model_s * 1000, notify_ms)
                ingest_row.add(
                    burst.sustained_per_second,
                    copy,
                    burst.latency(0.5),
                    burst.latency(0.99),
                )
                timeline = keep_pace_bench.timeline(burst)
                cache_row.timeline = {**timeline, "projector": placement}
                notes.append(
                    f"{burst.records:,} records acknowledged in {burst.seconds:.1f} s"
                    f" ({burst.records_per_second:,.0f}/s, {burst.errors} errors),"
                    f" both projections done {max(burst.cache_s, burst.model_s):.2f} s"
                    f" later; lag at most {max(timeline['cache_s']):.2f} s (cache),"
                    f" {max(timeline['model_s']):.2f} s (read model)"
                )
                progress(cache_row, model_row, ingest_row)
    finally:
        await ingest_bench.reset_tables(conn)
        await conn.close()
    cache_row.note = model_row.note = ingest_row.note = (
        f"{args.connections} connections, {keep_pace_bench.PER_BODY} records a body,"
        f" GOVLEDGER_PROJECTOR={placement}, serve's log in {serve_log}; "
        + "; ".join(notes)
    )
    return [cache_row, model_row, ingest_row]


async def scenario_replay(dsn: str, args: argparse.Namespace) -> list[Row]:
    await empty_tables(dsn)
    log = await replay_bench.create_owners(dsn)
    load = await replay_bench.append_usage(
        dsn, log, max(0, args.replay_events - log.owner_events)
    )
    row = Row(
        f"replay of the read model, {log.events:,} events",
        "events/s",
        "keyset read of the same rows + decode_event",
        target=100_000,
        min_ratio=0.5,
    )
    pool = await eventstore.create_pool(dsn, min_size=1, max_size=2)
    try:
        await replay_bench.warm_up(pool)
        for _ in range(args.reps):
            read, base = await replay_bench.raw_read(pool)
            rebuilt, ours = await replay_bench.rebuild(pool)
            if read != log.events or rebuilt != log.events:
                raise RuntimeError(f"read {read}, rebuilt {rebuilt} of {log.events}")
            row.add(ours, base)
            progress(row)
        spend = await replay_bench.spend_of(pool)
    finally:
        await pool.close()
    row.note = (
        f"{len(log.chains):,} keys in 100 teams in 10 customers, 3 budgets each,"
        f" keys with a rate limit; usage loaded by COPY at {load:,.0f} rows/s;"
        f" total spend rebuilt {spend}"
    )
    return [row]


async def scenario_peer(dsn: str, args: argparse.Namespace) -> list[Row]:
    if not peer_bench.available():
        print("  skipped: install eventsourcing[postgres] (pip install -e '.[bench]')")
        return []
    row = Row(
        "append 1 event per call, 1 connection (eventstore.append)",
        "events/s",
        "eventsourcing save(new aggregate), 1 event per save",
    )
    for _ in range(args.reps):
        await empty_tables(dsn)
        theirs = await asyncio.to_thread(
            peer_bench.peer_saves, dsn, seconds=args.seconds
        )
        await empty_tables(dsn)
        ours = await peer_bench.our_appends(dsn, seconds=args.seconds)
        row.add(ours, theirs)
        progress(row)
    row.note = f"{peer_bench.version()}; same cluster, fsync on, sequential"
    await empty_tables(dsn)
    return [row]


async def scenario_scaling(dsn: str, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    baseline = "dict lookup + 3 Structs compared, same keys in the same order"
    for keys in (10_000, 100_000, 1_000_000):
        if keys > args.scaling_max_keys:
            break
        shape = cache_bench.shape_for_keys(keys)
        measured = await cache_bench.measure_in_child(
            shape, reps=1, checks=_checks(args)
        )
        row = Row(
            f"check() at {keys:,} keys, random keys",
            "ns/check",
            baseline,
            lower_is_better=True,
            target=2000,
            series="check",
            x=keys,
        )
        row.add(
            measured.random_ns[0],
            measured.random_base_ns[0],
            measured.p50_ns / 1e6,
            measured.p99_ns / 1e6,
        )
        row.note = (
            f"{measured.rss_bytes / measured.budgets:,.0f} bytes/budget;"
            f" built in {measured.build_s:.1f} s"
        )
        progress(row)
        rows.append(row)
    await empty_tables(dsn)
    log = await replay_bench.create_owners(dsn)
    pool = await eventstore.create_pool(dsn, min_size=1, max_size=2)
    try:
        for events in (10_000, 100_000, 1_000_000):
            size = min(events, args.scaling_max_events)
            if size <= log.events:
                break
            await replay_bench.append_usage(dsn, log, size - log.events)
            await replay_bench.warm_up(pool)
            _, base = await replay_bench.raw_read(pool)
            rebuilt, ours = await replay_bench.rebuild(pool)
            row = Row(
                f"replay at {rebuilt:,} events",
                "events/s",
                "keyset read of the same rows + decode_event",
                target=100_000,
                min_ratio=0.5,
                series="replay",
                x=rebuilt,
            )
            row.add(ours, base)
            progress(row)
            rows.append(row)
    finally:
        await pool.close()
    return rows


Scenario = Callable[[str, argparse.Namespace], Awaitable[list[Row]]]

SCENARIOS: dict[str, Scenario] = {
    "ingest": scenario_ingest,
    "check": scenario_check,
    "check-inproc": scenario_check_inproc,
    "memory": scenario_memory,
    "lag": scenario_lag,
    "keep-pace": scenario_keep_pace,
    "replay": scenario_replay,
    "peer": scenario_peer,
    "scaling": scenario_scaling,
    "reservations": reservations_bench.scenario,
}


def _duration(ms: float) -> str:
    if ms < 0.01:
        return f"{ms * 1e6:,.0f} ns"
    if ms < 1:
        return f"{ms * 1e3:.0f} µs"
    return f"{ms:.1f} ms"


def _target(r: dict[str, Any]) -> str:
    parts = []
    if r.get("target") is not None:
        sign = "≤" if r["lower_is_better"] else "≥"
        parts.append(f"{sign} {number(r['target'])}")
    if r.get("min_ratio") is not None:
        parts.append(f"ratio ≥ {r['min_ratio']:.2f}")
    if not parts:
        return ""
    return " and ".join(parts) + (" ✓" if r["meets"] else " ✗")


def render(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| scenario | figure | baseline | ratio (pairs) | p50 / p99 | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = (
            f"{_duration(r['p50_ms'])} / {_duration(r['p99_ms'])}"
            if r.get("p50_ms") is not None
            else ""
        )
        arrow = " (lower is better)" if r.get("lower_is_better") else ""
        lines.append(
            f"| {r['scenario']} | {number(r['value'])} {r['unit']}{arrow} | "
            f"{r['baseline']}: {number(r['baseline_value'])} | "
            f"**{ratio_text(r['ratio'], r.get('min_ratio'))}**"
            f" ({', '.join(map(str, r['ratios']))}) | {lat} |"
            f" {_target(r)} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(
            f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
        return 2
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    with pgcluster.throwaway(settings=DURABLE) as dsn:
        await migrate(dsn)
        for name in names:
            print(f"{name}:", flush=True)
            scenario_started = time.perf_counter()
            for row in await SCENARIOS[name](dsn, args):
                results.append({"group": name, **row.as_dict()})
            print(f"  ({time.perf_counter() - scenario_started:.0f} s)", flush=True)
    print()
    print(render(results))
    out = Path(args.output)
    # A run of some scenarios replaces their rows and keeps the others' last ones.
    kept = [r for r in _previous(out) if r.get("group") not in names]
    merged = sorted(
        kept + results, key=lambda r: list(SCENARIOS).index(r.get("group", "ingest"))
    )
    _save(
        out,
        {
            "machine": {
                "cpus": os.cpu_count() or 0,
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "seconds": round(time.perf_counter() - started, 1),
            "results": merged,
        },
    )
    print(f"\nsaved {out} ({time.perf_counter() - started:.0f} s)")
    if args.chart:
        _charts(merged, Path(args.chart))
    return 0


def _previous(path: Path) -> list[dict[str, Any]]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    rows = document.get("results", []) if isinstance(document, dict) else []
    return [r for r in rows if isinstance(r, dict) and r.get("group") in SCENARIOS]


def _charts(rows: list[dict[str, Any]], path: Path) -> None:
    if not chart.available():
        print("no chart: install matplotlib (pip install -e '.[bench]')")
        return
    if chart.overview(rows, path):
        print(f"chart {path}")
    scaling = path.with_name(f"{path.stem}-scaling{path.suffix}")
    if chart.scaling(rows, scaling):
        print(f"chart {scaling}")
    keep_pace = path.with_name(f"{path.stem}-keep-pace{path.suffix}")
    if chart.keep_pace(rows, keep_pace):
        print(f"chart {keep_pace}")
    reservations = path.with_name(f"{path.stem}-reservations{path.suffix}")
    if chart.reservations(rows, reservations):
        print(f"chart {reservations}")


def _save(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--reps", type=int, default=3, help="pairs per figure")
    p.add_argument(
        "--seconds", type=float, default=5.0, help="duration of a measurement"
    )
    p.add_argument(
        "--connections", type=int, default=8, help="ingest client connections"
    )
    p.add_argument(
        "--raw-rows", type=int, default=300_000, help="rows per raw COPY run"
    )
    p.add_argument(
        "--keys",
        type=int,
        default=100_000,
        help="keys in the cache of check-inproc (default 100,000)",
    )
    # Three rebuilds of 1,000,000 events would add minutes to `make bench`; the
    # scaling scenario rebuilds 1,000,000 once.
    p.add_argument(
        "--replay-events",
        type=int,
        default=200_000,
        help="events in the log of the replay scenario (default 200,000)",
    )
    p.add_argument(
        "--scaling-max-keys",
        type=int,
        default=1_000_000,
        help="largest cache of the scaling scenario (10,000 → this)",
    )
    p.add_argument(
        "--scaling-max-events",
        type=int,
        default=1_000_000,
        help="largest log the scaling scenario replays (10,000 → this)",
    )
    p.add_argument(
        "--keep-pace-seconds",
        type=float,
        default=10.0,
        help="length of the keep-pace scenario's full-rate burst (default 10)",
    )
    p.add_argument(
        "--lag-load",
        type=float,
        default=0.5,
        help="ingest rate of the lag scenario, as a fraction of the measured maximum",
    )
    p.add_argument(
        "--reservation-calls",
        type=int,
        default=64,
        help="concurrent calls (and checks) of the reservations scenario (default 64)",
    )
    p.add_argument(
        "--reservation-room",
        type=int,
        default=10,
        help="estimates the budget has room for in the reservations scenario",
    )
    p.add_argument(
        "--reservation-latency-ms",
        type=float,
        default=200.0,
        help="simulated provider latency between a call's check and its record",
    )
    p.add_argument(
        "--reservation-runs",
        type=int,
        default=5,
        help="bursts of each kind over 2 serving processes (default 5)",
    )
    p.add_argument(
        "--reservation-gaps-ms",
        default="0,2,5,20",
        help="time between the sends of a burst over 2 processes, comma-separated"
        " (0: all at once)",
    )
    p.add_argument(
        "--reservation-probes",
        type=int,
        default=40,
        help="holds per run timed from their ack to another process's cache",
    )
    p.add_argument("--output", default=".bench/results.json")
    p.add_argument(
        "--chart",
        default="docs/benchmarks.png",
        help="overview PNG (the scaling one goes beside it as NAME-scaling.png);"
        " empty: no chart",
    )


def main(args: argparse.Namespace) -> int:
    return asyncio.run(run(args))
