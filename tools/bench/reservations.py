"""The reservations scenario: concurrent gateway calls with and without holds
(same run, same load), a reserving check against a plain one, and what several
serving processes admit beyond the headroom, with the lag that bounds it."""

from __future__ import annotations

import argparse
import json
import statistics
from decimal import Decimal

from tools.bench import admission, overspend, servers
from tools.bench import check as check_bench
from tools.bench import ingest as ingest_bench
from tools.bench import lag as lag_bench
from tools.bench.rows import Row, progress


async def scenario(dsn: str, args: argparse.Namespace) -> list[Row]:
    return [
        *await _overspend(dsn, args),
        *await _reserving_check(dsn, args),
        *await _over_admission(dsn, args),
    ]


async def _overspend(dsn: str, args: argparse.Namespace) -> list[Row]:
    """Concurrent gateway calls with plain checks, then with holds, same load."""
    calls, room = args.reservation_calls, args.reservation_room
    load = f"{calls} concurrent calls, room for {room}, 1 process"
    admitted = Row(
        f"{load}: calls admitted, reserve → record",
        "calls",
        "check → record, same load",
        lower_is_better=True,
        target=room,
    )
    above = Row(
        f"{load}: spend above the limit, reserve → record",
        "$",
        "check → record, same load",
        lower_is_better=True,
        overview=False,  # 0 with holds: no bar on a log scale
    )
    runs: dict[bool, list[overspend.Calls]] = {False: [], True: []}
    with servers.govledger(dsn) as url:
        for _ in range(args.reps):
            for reserve in (False, True):
                runs[reserve].append(
                    await overspend.gateway_calls(
                        url,
                        calls=calls,
                        room=room,
                        latency_s=args.reservation_latency_ms / 1000,
                        reserve=reserve,
                    )
                )
            plain, held = runs[False][-1], runs[True][-1]
            admitted.add(held.admitted, plain.admitted)
            above.add(float(held.above_limit), float(plain.above_limit))
            progress(admitted, above)
    # Holds keep the spend within the limit plus what the admitted calls cost
    # beyond their estimates.
    above.target = min(float(c.beyond_estimates) for c in runs[True])
    admitted.timeline = {
        "calls": calls,
        "room": room,
        "spend": {
            "plain": overspend.detail(runs[False]),
            "reserve": overspend.detail(runs[True]),
        },
    }
    spend = admitted.timeline["spend"]
    admitted.note = above.note = (
        f"each call: check (estimate ${overspend.ESTIMATE}),"
        f" {args.reservation_latency_ms:g} ms of provider latency, POST /api/usage"
        f" of its actual cost (the estimate times"
        f" {', '.join(map(str, overspend.ACTUAL))} by call), spend as the service"
        f" counts it; above the limit by run: plain ${spend['plain']['above']},"
        f" with holds ${spend['reserve']['above']} (the admitted calls' cost beyond"
        f" their estimates ${spend['reserve']['beyond_estimates']})"
    )
    return [admitted, above]


async def _reserving_check(dsn: str, args: argparse.Namespace) -> list[Row]:
    """A reserving check against a plain one: same key, same client, 64
    connections, alternating."""
    per_second = Row(
        "reserving check over HTTP, 1 process",
        "checks/s",
        "plain check, same key, same client",
    )
    p99 = Row(
        "reserving check over HTTP, 1 process, latency",
        "ms p99",
        "plain check p99, same key, same client",
        lower_is_better=True,
    )
    runs: dict[bool, list[check_bench.WrkResult]] = {False: [], True: []}
    with servers.govledger(dsn) as url:
        [key] = await servers.create_keys(url, 1)
        body = {
            "virtual_key": key.secret,
            "provider": "openai",
            "model": "gpt-4o",
            "estimated_cost": "0.01",
        }
        bodies = {
            False: json.dumps(body).encode(),
            True: json.dumps({**body, "reserve": True, "ttl_s": 60}).encode(),
        }
        for _ in range(args.reps):
            for reserve in (False, True):
                result = await check_bench.http_checks(
                    url, bodies[reserve], connections=64, seconds=args.seconds
                )
                if result.errors:
                    raise RuntimeError(f"{result.errors} checks failed")
                runs[reserve].append(result)
            base, ours = runs[False][-1], runs[True][-1]
            per_second.add(ours.per_second, base.per_second, ours.p50_ms, ours.p99_ms)
            p99.add(ours.p99_ms, base.p99_ms)  # latencies: on the row above
            progress(per_second, p99)
    per_second.timeline = {
        "check": {
            mode: {
                "per_second": [r.per_second for r in results],
                "p50_ms": [r.p50_ms for r in results],
                "p99_ms": [r.p99_ms for r in results],
            }
            for mode, results in (("plain", runs[False]), ("reserve", runs[True]))
        }
    }
    p50s = [statistics.median(r.p50_ms for r in runs[m]) for m in (True, False)]
    per_second.note = p99.note = (
        f"client: {runs[True][0].client}, 64 connections; p50 reserving / plain:"
        f" {p50s[0]:.2f} / {p50s[1]:.2f} ms"
    )
    return [per_second, p99]


async def _over_admission(dsn: str, args: argparse.Namespace) -> list[Row]:
    """Bursts of reserving checks spread over 2 serving processes: admitted beyond
    ⌊H/e⌋ beside the same burst of plain checks, and the lag that explains it."""
    calls, room, processes = args.reservation_calls, args.reservation_room, 2
    gaps = [float(g) for g in args.reservation_gaps_ms.split(",")]
    where = f"{processes} processes, {calls} checks, headroom for {room}"
    over = {
        gap: Row(
            f"{where}: admitted beyond ⌊H/e⌋, "
            + (f"one every {gap:g} ms" if gap else "all at once"),
            "checks",
            "the same burst with plain checks",
            lower_is_better=True,
            target=(processes - 1) * room,
            overview=not gap,  # paced ones are often 0: their own chart only
        )
        for gap in gaps
    }
    seen = Row(
        f"{processes} processes: hold ack → another process's cache (min_position)",
        "ms p99",
        "LISTEN/NOTIFY: COPY 1 row + pg_notify → listener woken",
        lower_is_better=True,
    )
    bursts: list[admission.Burst] = []
    probes: list[admission.Probe] = []
    template = ingest_bench.raw_rows(1)
    with servers.govledger(dsn, processes=processes) as url:
        async with admission.connections(calls) as sessions:
            key_id, _ = await servers.budget_key(sessions[0], url, Decimal(10**9))
            for _ in range(args.reservation_runs):
                notify = await lag_bench.notify_round_trips(
                    dsn, samples=100, rows=template
                )
                groups = await admission.pin(url, sessions, key_id)
                if len(groups) != processes:
                    raise RuntimeError(f"{calls} connections reached {len(groups)}")
                timed = await admission.probes(
                    url, groups, key_id, args.reservation_probes
                )
                probes += timed
                spans = [p.seen_ms for p in timed]
                p50, p99 = (lag_bench.percentile(spans, q) for q in (0.5, 0.99))
                seen.add(p99, lag_bench.percentile(notify, 0.99), p50, p99)
                plain = await admission.burst(
                    url, sessions, room=room, gap_ms=0, reserve=False
                )
                bursts.append(plain)
                for gap in gaps:
                    held = await admission.burst(
                        url, sessions, room=room, gap_ms=gap, reserve=True
                    )
                    bursts.append(held)
                    over[gap].add(held.over, plain.over)
                progress(seen, *over.values())
    found = admission.detail(bursts, probes, processes)
    seen.timeline = {"room": room, "processes": found}
    spread = sorted({"/".join(map(str, sent)) for sent in found["spread"]})
    window = found["window_ms"]["p50"]
    for gap, row in over.items():
        # A check is over-admitted when holds taken elsewhere are not yet visible
        # to it: about the checks arriving within one decision → visible window.
        arriving = f"{window / gap:.1f}" if gap else f"all {calls}"
        row.note = (
            f"by run {found['over'][f'{gap:g}']} (plain {found['over']['plain']});"
            f" checks arriving within one decision → visible window (p50"
            f" {window:.0f} ms): {arriving}; connections per process"
            f" {', '.join(spread)}; after min_position the processes agreed on the"
            f" holds {found['agreed']} times of {found['of']}"
        )
    seen.note = (
        f"{len(probes)} holds one at a time, each on the next process; reserving"
        f" check p50 {found['hold_ms']['p50']:.1f} ms; a check waiting for nothing"
        f" p50 {found['floor_ms']['p50']:.1f} ms; decision → visible on another"
        f" process (hold + ack → seen) p50/p99 {found['window_ms']['p50']:.1f}"
        f"/{found['window_ms']['p99']:.1f} ms"
    )
    return [seen, *over.values()]
