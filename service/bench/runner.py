"""Runs the scenarios, pairs each figure with its baseline, prints and saves the table.

Every figure is paired with a baseline measured just before it on the same machine and
cluster; the ratio reported is the median of the per-pair ratios (these machines are
shared and drift, so absolute rates are only good to about ±15%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from service import pgcluster
from service.bench import check as check_bench
from service.bench import ingest as ingest_bench
from service.bench import servers
from service.migrate import migrate

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


class Row:
    """One line of the report: a figure, its baseline, their ratio, latencies."""

    def __init__(self, scenario: str, unit: str, baseline_name: str) -> None:
        self.scenario = scenario
        self.unit = unit
        self.baseline_name = baseline_name
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
        return {
            "scenario": self.scenario,
            "unit": self.unit,
            "value": statistics.median(values),
            "baseline": self.baseline_name,
            "baseline_value": statistics.median(baselines),
            "ratio": statistics.median(v / b for v, b in self.pairs if b),
            "ratios": [round(v / b, 3) for v, b in self.pairs if b],
            "p50_ms": statistics.median(self.p50) if any(self.p50) else None,
            "p99_ms": statistics.median(self.p99) if any(self.p99) else None,
            "note": self.note,
        }


async def create_keys(url: str, count: int) -> list[str]:
    """Virtual keys (each in a team with a daily and a monthly budget) via the API."""
    secrets: list[str] = []
    async with aiohttp.ClientSession() as session:
        team = await _post(
            session,
            f"{url}/api/governance/teams",
            {
                "name": "bench",
                "budgets": [
                    {"max_limit": "1000000000", "reset_duration": "1d"},
                    {"max_limit": "1000000000", "reset_duration": "1M"},
                ],
            },
        )
        team_id = team["team"]["id"]
        for i in range(count):
            body = await _post(
                session,
                f"{url}/api/governance/virtual-keys",
                {
                    "name": f"bench-{i}",
                    "team_id": team_id,
                    "budgets": [{"max_limit": "1000000000", "reset_duration": "1d"}],
                },
            )
            secrets.append(body["virtual_key"]["value"])
    return secrets


async def _post(session: aiohttp.ClientSession, url: str, body: object) -> Any:
    async with session.post(url, json=body) as resp:
        if resp.status >= 300:
            raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        return await resp.json()


async def wait_caught_up(url: str, position: int) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{url}/api/governance/budgets", params={"min_position": str(position)}
        ) as resp,
    ):
        await resp.read()


# --- scenarios -----------------------------------------------------------------------


async def scenario_ingest(dsn: str, args: argparse.Namespace) -> list[Row]:
    conn = await asyncpg.connect(dsn)
    await ingest_bench.prepare_raw_table(conn)
    raw = ingest_bench.raw_rows(args.raw_rows)
    rows: list[Row] = []
    for processes in (1, 2):
        baseline = f"raw binary COPY, 1000 rows/txn, {processes} connection(s)"
        batch = Row(
            f"ingest /api/usage/batch, {processes} process(es)", "records/s", baseline
        )
        ws = Row(f"ingest WebSocket, {processes} process(es)", "records/s", baseline)
        with servers.govledger(dsn, processes=processes) as url:
            keys = await create_keys(url, 100)
            bodies = ingest_bench.batch_bodies(
                keys, int(args.seconds * 250_000) + 50_000
            )
            for _ in range(args.reps):
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
                _progress(batch, ws)
        rows += [batch, ws]
    await conn.close()
    return rows


async def scenario_check(dsn: str, args: argparse.Namespace) -> list[Row]:
    row = Row(
        "check over HTTP, 1 process",
        "checks/s",
        "aiohttp handler doing no work, same client",
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
        with servers.empty_handler() as empty_url:
            for _ in range(args.reps):
                base = await check_bench.http_checks(
                    empty_url, body, connections=64, seconds=args.seconds
                )
                result = await check_bench.http_checks(
                    url, body, connections=64, seconds=args.seconds
                )
                if result.errors:
                    raise RuntimeError(f"{result.errors} checks failed")
                row.add(
                    result.per_second, base.per_second, result.p50_ms, result.p99_ms
                )
                row.note = f"client: {result.client}, 64 connections"
                _progress(row)
    return [row]


SCENARIOS: dict[str, Callable[[str, argparse.Namespace], Any]] = {
    "ingest": scenario_ingest,
    "check": scenario_check,
}


def _progress(*rows: Row) -> None:
    for row in rows:
        value, base = row.pairs[-1]
        print(
            f"  {row.scenario}: {value:,.0f} {row.unit} vs {base:,.0f} "
            f"= {value / base:.2f}",
            flush=True,
        )


def render(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| scenario | figure | baseline | ratio (pairs) | p50 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lat = (
            f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}" if r["p50_ms"] is not None else ""
        )
        lines.append(
            f"| {r['scenario']} | {r['value']:,.0f} {r['unit']} | "
            f"{r['baseline']}: {r['baseline_value']:,.0f} | "
            f"**{r['ratio']:.2f}** ({', '.join(map(str, r['ratios']))}) | {lat} |"
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
            for row in await SCENARIOS[name](dsn, args):
                results.append(row.as_dict())
    table = render(results)
    print()
    print(table)
    out = Path(args.output)
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
            "results": results,
        },
    )
    print(f"\nsaved {out} ({time.perf_counter() - started:.0f} s)")
    return 0


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
    p.add_argument("--output", default=".bench/results.json")


def main(args: argparse.Namespace) -> int:
    return asyncio.run(run(args))
