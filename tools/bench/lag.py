"""Projection lag: from a usage batch's ack (its commit) until the enforcement cache
and the read model answer for it, at a fixed ingest rate; beside the LISTEN/NOTIFY
round trip (append + notify → listener woken) of raw asyncpg.

No polling: right after an ack, a check and a read are sent with `min_position` set to
the acked position; the service holds each until its projection has applied that
position, so the time from the ack to each answer is the lag as a client sees it. A
third probe, a check without `min_position`, gives the round trip of a request to the
loaded service that waits for nothing: the part of the lag that is not projection.
The probing client sends only the probing bodies; the rest of the load comes from a
process of its own, so that the client's own event loop does not delay the probes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import asyncpg
import msgspec

from service import eventstore
from tools.bench import ingest as ingest_bench
from tools.bench.load import post_loop
from tools.bench.servers import Key

CHANNEL = "govledger_bench_lag"
# Probes per second at most: enough samples, little load of their own.
PROBES_PER_SECOND = 100


class LagResult(msgspec.Struct, frozen=True, kw_only=True):
    cache_ms: list[float]  # ack → check with min_position answered
    model_ms: list[float]  # ack → read with min_position answered
    floor_ms: list[float]  # ack → check without min_position answered (no wait)
    records_per_second: float  # achieved
    target_per_second: float
    errors: int  # answers other than 200 (503s included)
    lagging: int  # 503 projection_lag: not applied within the service's 2 s
    late: int  # sends the pacing could not make on time (the service fell behind)


def _count(status: int, counts: dict[str, int]) -> None:
    if status != 200:
        counts["errors"] += 1
    if status == 503:
        counts["lagging"] += 1


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the baseline ------------------------------------------------------------------


async def notify_round_trips(
    dsn: str, *, samples: int, rows: Sequence[tuple[object, ...]]
) -> list[float]:
    """ms from BEGIN of {COPY `rows`; pg_notify} to the listener's callback, one
    notification in flight at a time, into a copy of the events table."""
    listener = await asyncpg.connect(dsn)
    sender = await asyncpg.connect(dsn)
    await eventstore.init_connection(sender)
    await ingest_bench.prepare_raw_table(sender)
    await ingest_bench.reset_tables(sender)
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[float]] = []

    def woken(*_: object) -> None:
        now = time.perf_counter()
        if waiting and not waiting[0].done():
            waiting[0].set_result(now)

    await listener.add_listener(CHANNEL, woken)
    spans: list[float] = []
    try:
        for i in range(samples + samples // 10):
            fresh = [
                (uuid.uuid4(), row[1], i * len(rows) + j + 1, *row[3:])
                for j, row in enumerate(rows)
            ]
            waiting[:] = [loop.create_future()]
            started = time.perf_counter()
            async with sender.transaction():
                await sender.copy_records_to_table(
                    ingest_bench.RAW_TABLE,
                    records=fresh,
                    columns=ingest_bench.COPY_COLUMNS,
                )
                await sender.execute("SELECT pg_notify($1, '')", CHANNEL)
            woke = await asyncio.wait_for(waiting[0], timeout=5)
            if i >= samples // 10:  # the first tenth warms up
                spans.append((woke - started) * 1000)
    finally:
        await listener.close()
        await sender.execute(f"TRUNCATE {ingest_bench.RAW_TABLE}")
        await sender.close()
    return spans


# --- the service -------------------------------------------------------------------


def bodies(keys: Sequence[Key], count: int, per_body: int) -> list[bytes]:
    return ingest_bench.batch_bodies(
        [k.secret for k in keys], count * per_body, per_body=per_body
    )


class Ceiling(msgspec.Struct, frozen=True):
    burst: float  # records/s acknowledged, closed loop
    sustained: float  # the same records over that time plus the read model's catch-up


async def ceiling(
    dsn: str, url: str, keys: Sequence[Key], *, per_body: int, seconds: float
) -> Ceiling:
    """The most records/s the service takes with these bodies (closed loop, 16
    connections), and the most it sustains: the projections catch up after a
    burst, so a rate the read model cannot follow is counted with the time it then
    needs."""
    body_list = bodies(keys, int(seconds * 4000) + 1000, per_body)
    result = await post_loop(
        f"{url}/api/usage/batch",
        body_list,
        connections=16,
        seconds=seconds,
        units_per_body=[per_body] * len(body_list),
        content_type="application/x-ndjson",
        units_of=ingest_bench.accepted,
    )
    started = time.perf_counter()
    await caught_up(dsn, url)
    catch_up = time.perf_counter() - started
    return Ceiling(result.per_second, result.units / (result.seconds + catch_up))


async def caught_up(dsn: str, url: str, *, give_up_s: float = 300) -> None:
    """Until the read model (the slower projection) applied the log's head: each
    read waits up to the service's 2 s for it, then answers 503 and is sent again."""
    conn = await asyncpg.connect(dsn)
    try:
        position = await eventstore.max_position(conn)
    finally:
        await conn.close()
    deadline = time.monotonic() + give_up_s
    params = {"min_position": str(position), "owner_type": "customer"}
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(
                f"{url}/api/governance/budgets", params=params
            ) as resp:
                await resp.read()
                if resp.status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the read model did not reach {position}")


async def drive(
    url: str,
    keys: Sequence[Key],
    *,
    rate: float,
    seconds: float,
    per_body: int,
    warmup_s: float = 1.0,
) -> LagResult:
    """`rate` records/s in bodies of `per_body` (open loop) for `seconds`: the probing
    bodies, PROBES_PER_SECOND of them (or all, at a lower rate), from this process,
    the rest from a process of its own (`_load`), so that generating the load never
    holds up a probe on this event loop. After each probing body's ack, the cache
    (check) and the read model (GET budgets) are probed with that ack's position,
    and a check that waits for nothing beside them. Probes of the first `warmup_s`
    are not counted (the client opens its connections, the service's pool
    connections prepare the reads' statements), as the baseline's first tenth is
    not."""
    # Below PROBES_PER_SECOND bodies a second, every body probes, at `rate`.
    probe_interval = max(1 / PROBES_PER_SECOND, per_body / rate)
    load_rate = max(0.0, rate - per_body / probe_interval)
    secrets = [k.secret for k in keys]
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    load = multiprocessing.get_context("spawn").Process(
        target=_load,
        args=(_Load(url, secrets, load_rate, warmup_s + seconds, per_body), theirs),
        daemon=True,
    )
    load.start()
    try:
        if not await asyncio.to_thread(ours.poll, 60) or ours.recv() != "ready":
            raise RuntimeError("the load process did not start")
        started = time.perf_counter() + 0.1
        ours.send(started)
        probed = await _probe(
            url,
            keys,
            started=started,
            interval=probe_interval,
            count=int((warmup_s + seconds) / probe_interval),
            warmup=int(warmup_s / probe_interval),
            per_body=per_body,
        )
        if not await asyncio.to_thread(ours.poll, 60 + seconds):
            raise RuntimeError("the load process did not report")
        loaded: dict[str, int] = ours.recv()
    finally:
        load.join(timeout=10)
        if load.is_alive():
            load.kill()
    elapsed = time.perf_counter() - started
    return LagResult(
        cache_ms=probed.cache_ms,
        model_ms=probed.model_ms,
        floor_ms=probed.floor_ms,
        records_per_second=(loaded["records"] + probed.records) / elapsed,
        target_per_second=rate,
        errors=loaded["errors"] + probed.errors,
        lagging=probed.lagging,
        late=loaded["late"] + probed.late,
    )


class _Probed(msgspec.Struct, kw_only=True):
    cache_ms: list[float]
    model_ms: list[float]
    floor_ms: list[float]
    records: int = 0
    errors: int = 0
    lagging: int = 0
    late: int = 0


async def _probe(
    url: str,
    keys: Sequence[Key],
    *,
    started: float,
    interval: float,
    count: int,
    warmup: int,
    per_body: int,
) -> _Probed:
    """Send a body every `interval` s from `started`; after each ack, the probes."""
    body_list = bodies(keys, count, per_body)
    probed = _Probed(cache_ms=[], model_ms=[], floor_ms=[])
    counts = {"errors": 0, "lagging": 0}
    headers = {"Content-Type": "application/x-ndjson"}

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64)
    ) as session:

        async def probe_check(
            key: Key, position: int | None, acked: float, spans: list[float] | None
        ) -> None:
            payload: dict[str, object] = {
                "virtual_key": key.secret,
                "provider": "openai",
                "model": "gpt-4o",
            }
            if position is not None:
                payload["min_position"] = position
            async with session.post(
                f"{url}/api/governance/check", json=payload
            ) as resp:
                await resp.read()
                _count(resp.status, counts)
                if resp.status not in (200, 503):
                    return
            # A 503 (projection_lag) waited its 2 s: it counts, with what it waited.
            if spans is not None:
                spans.append((time.perf_counter() - acked) * 1000)

        async def probe_read(
            key: Key, position: int, acked: float, spans: list[float] | None
        ) -> None:
            params = {
                "owner_type": "virtual_key",
                "owner_id": key.id,
                "min_position": str(position),
            }
            async with session.get(
                f"{url}/api/governance/budgets", params=params
            ) as resp:
                await resp.read()
                _count(resp.status, counts)
                if resp.status not in (200, 503):
                    return
            # A 503 (projection_lag) waited its 2 s: it counts, with what it waited.
            if spans is not None:
                spans.append((time.perf_counter() - acked) * 1000)

        async def send(i: int) -> None:
            async with session.post(
                f"{url}/api/usage/batch", data=body_list[i], headers=headers
            ) as resp:
                answer = await resp.read()
                acked = time.perf_counter()
                if resp.status != 200:
                    counts["errors"] += 1
                    return
            summary = msgspec.json.decode(answer)
            probed.records += int(summary["accepted"])
            key = keys[(i * per_body) % len(keys)]
            position = int(summary["position"])
            counted = i >= warmup
            await asyncio.gather(
                probe_check(key, position, acked, probed.cache_ms if counted else None),
                probe_read(key, position, acked, probed.model_ms if counted else None),
                probe_check(key, None, acked, probed.floor_ms if counted else None),
            )

        probed.late = await _paced(
            send, started=started, interval=interval, count=count
        )
    probed.errors, probed.lagging = counts["errors"], counts["lagging"]
    return probed


async def _paced(
    send: Callable[[int], Coroutine[Any, Any, None]],
    *,
    started: float,
    interval: float,
    count: int,
) -> int:
    """`send(i)` at `started + i * interval` (open loop), all awaited; returns how
    many sends the pacing could not make on time (the service fell behind)."""
    late = 0
    tasks: list[asyncio.Task[None]] = []
    for i in range(count):
        delay = started + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing of an open-loop load
        elif delay < -interval:
            late += 1
        tasks.append(asyncio.create_task(send(i)))
    await asyncio.gather(*tasks)
    return late


class _Load(msgspec.Struct, frozen=True):
    """What the load process sends: `rate` records/s in bodies of `per_body`, over
    these key secrets, for `seconds`."""

    url: str
    secrets: list[str]
    rate: float
    seconds: float
    per_body: int


def _load(load: _Load, pipe: Connection) -> None:
    """The load process: `load`, from the perf_counter instant the pipe sends
    (CLOCK_MONOTONIC, shared by every process), then {records, errors, late} back."""
    pipe.send(asyncio.run(_load_loop(load, pipe)))


async def _load_loop(load: _Load, pipe: Connection) -> dict[str, int]:
    url, rate, per_body = load.url, load.rate, load.per_body
    counts = {"records": 0, "errors": 0, "late": 0}
    count = int(load.seconds * rate / per_body) if rate > 0 else 0
    body_list = ingest_bench.batch_bodies(load.secrets, count * per_body, per_body)
    headers = {"Content-Type": "application/x-ndjson"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256)
    ) as session:

        async def send(i: int) -> None:
            async with session.post(
                f"{url}/api/usage/batch", data=body_list[i], headers=headers
            ) as resp:
                answer = await resp.read()
            if resp.status != 200:
                counts["errors"] += 1
                return
            counts["records"] += int(msgspec.json.decode(answer)["accepted"])

        pipe.send("ready")
        started: float = await asyncio.to_thread(pipe.recv)
        if count:
            counts["late"] = await _paced(
                send, started=started, interval=per_body / rate, count=count
            )
    return counts
