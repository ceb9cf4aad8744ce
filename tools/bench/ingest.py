"""Ingest: durable records/s through the service against raw binary COPY."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import aiohttp
import asyncpg
import msgspec

from service import eventstore
from service.domain.events import UsageRecorded
from tools.bench.load import LoadResult, post_loop

RAW_TABLE = "bench_events"
COPY_COLUMNS = (
    "event_id",
    "stream_id",
    "stream_version",
    "type",
    "schema_version",
    "data",
    "metadata",
)


async def prepare_raw_table(conn: asyncpg.Connection) -> None:
    """A copy of `events` with the same columns, defaults, indexes and constraints."""
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {RAW_TABLE} (LIKE events INCLUDING ALL)"
    )


async def reset_tables(conn: asyncpg.Connection) -> None:
    """Same starting size for every measurement: empty tables, a fresh checkpoint."""
    await conn.execute(f"TRUNCATE {RAW_TABLE}")
    await conn.execute("CHECKPOINT")


def raw_rows(count: int) -> list[tuple[object, ...]]:
    """Rows shaped exactly like the ingest path's, built before timing."""
    payload = eventstore.encode_event(
        UsageRecorded(
            virtual_key_id=str(uuid.uuid4()),
            provider="openai",
            model="gpt-4o",
            cost=Decimal("0.000123"),
            input_tokens=100,
            output_tokens=20,
            occurred_at=datetime(2026, 11, 28, tzinfo=UTC),
            team_id=str(uuid.uuid4()),
            customer_id=str(uuid.uuid4()),
        )
    )
    return [
        (uuid.uuid4(), f"usage-{i % 100}", i + 1, "UsageRecorded", 1, payload, b"{}")
        for i in range(count)
    ]


async def raw_copy(
    dsn: str,
    rows: Sequence[tuple[object, ...]],
    *,
    connections: int = 1,
    per_txn: int = 1000,
) -> float:
    """Rows/s of binary COPY, `per_txn` rows a transaction, over `connections`."""
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    try:
        for conn in conns:
            await eventstore.init_connection(conn)
        shares = [rows[i::connections] for i in range(connections)]

        async def copy(
            conn: asyncpg.Connection, share: Sequence[tuple[object, ...]]
        ) -> None:
            for start in range(0, len(share), per_txn):
                await conn.copy_records_to_table(
                    RAW_TABLE,
                    records=share[start : start + per_txn],
                    columns=COPY_COLUMNS,
                )

        started = time.perf_counter()
        await asyncio.gather(*(copy(c, s) for c, s in zip(conns, shares, strict=True)))
        return len(rows) / (time.perf_counter() - started)
    finally:
        for conn in conns:
            await conn.close()


def batch_bodies(keys: Sequence[str], records: int, per_body: int = 500) -> list[bytes]:
    """NDJSON bodies of records over the given key secrets, each with a new event id:
    build them anew for every measurement (records sent before are duplicates,
    which the service answers from memory)."""
    encode = msgspec.json.encode
    bodies = []
    for start in range(0, records, per_body):
        lines = [
            encode(
                {
                    "event_id": str(uuid.uuid4()),
                    "virtual_key": keys[(start + i) % len(keys)],
                    "provider": "openai",
                    "model": "gpt-4o",
                    "cost": "0.000123",
                    "input_tokens": 100,
                    "output_tokens": 20,
                }
            )
            for i in range(per_body)
        ]
        bodies.append(b"\n".join(lines))
    return bodies


class _Accepted(msgspec.Struct):
    accepted: int


_decode_accepted = msgspec.json.Decoder(_Accepted).decode


def accepted(answer: bytes) -> int:
    """The records a POST /api/usage/batch answer says were stored as new."""
    return _decode_accepted(answer).accepted


async def through_batch(
    url: str,
    bodies: Sequence[bytes],
    *,
    connections: int,
    seconds: float,
    per_body: int = 500,
) -> LoadResult:
    return await post_loop(
        f"{url}/api/usage/batch",
        bodies,
        connections=connections,
        seconds=seconds,
        units_per_body=[per_body] * len(bodies),
        content_type="application/x-ndjson",
        units_of=accepted,
    )


async def through_websocket(
    url: str,
    keys: Sequence[str],
    *,
    connections: int,
    seconds: float,
    per_frame: int = 500,
    window: int = 4,
) -> LoadResult:
    """Each connection keeps `window` frames in flight; a record counts once acked."""
    frames_needed = int(200_000 * seconds / per_frame) + 64
    encode = msgspec.json.encode
    latencies: list[float] = []
    accepted = 0
    requests = 0
    deadline = 0.0

    def frame(seq: int) -> bytes:
        return encode(
            {
                "seq": seq,
                "records": [
                    {
                        "event_id": str(uuid.uuid4()),
                        "virtual_key": keys[(seq * per_frame + i) % len(keys)],
                        "provider": "openai",
                        "model": "gpt-4o",
                        "cost": "0.000123",
                        "input_tokens": 100,
                        "output_tokens": 20,
                    }
                    for i in range(per_frame)
                ],
            }
        )

    frames = [(s, frame(s).decode()) for s in range(frames_needed)]
    shares = [frames[i::connections] for i in range(connections)]

    async def one(session: aiohttp.ClientSession, share: list[tuple[int, str]]) -> None:
        nonlocal accepted, requests
        async with session.ws_connect(f"{url}/api/usage/stream") as ws:
            sent_at: dict[int, float] = {}
            queue = iter(share)
            inflight = 0

            async def send_next() -> bool:
                nonlocal inflight
                if time.perf_counter() >= deadline:
                    return False
                item = next(queue, None)
                if item is None:
                    return False
                seq, data = item
                sent_at[seq] = time.perf_counter()
                await ws.send_str(data)
                inflight += 1
                return True

            for _ in range(window):
                if not await send_next():
                    break
            while inflight:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                ack = msgspec.json.decode(msg.data)
                inflight -= 1
                latencies.append((time.perf_counter() - sent_at.pop(ack["seq"])) * 1000)
                accepted += int(ack.get("accepted", 0))
                requests += 1
                await send_next()

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(one(session, s) for s in shares))
        elapsed = time.perf_counter() - started
    return LoadResult(
        requests=requests,
        seconds=elapsed,
        errors=0,
        latencies_ms=latencies,
        units=accepted,
    )
