"""Keep pace: ingest at full rate for a while, then how long after the last
acknowledgement the enforcement cache and the read model have applied it, and the
lag of each over the burst.

The load is closed-loop (as the ingest scenario: N connections, 500 records a body);
every acknowledgement is kept with its position and time. Meanwhile a sampler asks,
every SAMPLE_S, for the cache's position (a check without `min_position` answers
with it) and the read model's (its checkpoint row). After the last acknowledgement a
check and a read are sent with `min_position` set to the highest acknowledged
position; the service holds each until its projection has applied it (answering 503
after its 2 s wait, when it is sent again), so the time from the last ack to each
answer is how far behind each projection was, as a client sees it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import aiohttp
import asyncpg
import msgspec

from tools.bench.servers import Key

SAMPLE_S = 0.1
PER_BODY = 500
GIVE_UP_S = 300.0
_HEADERS = {"Content-Type": "application/x-ndjson"}
_READ_MODEL_POSITION = (
    "SELECT last_position FROM projection_checkpoints WHERE projection = 'governance'"
)


class Sample(msgspec.Struct, frozen=True, array_like=True):
    t: float  # seconds since the burst started
    acked: int  # highest position acknowledged so far
    cache: int  # the cache's position (a check's answer)
    model: int  # the read model's checkpoint position


class Ack(msgspec.Struct, frozen=True, array_like=True):
    t: float  # seconds since the burst started
    position: int  # the highest position of the body's records


class Burst(msgspec.Struct, frozen=True, kw_only=True):
    seconds: float  # from the first send to the last acknowledgement
    records: int  # acknowledged
    errors: int  # answers other than 200
    acks: list[Ack]
    last: Ack  # when the last ack came, and the highest position acknowledged
    latencies_ms: list[float]
    samples: list[Sample]
    cache_s: float  # last ack → a check with min_position answered 200
    model_s: float  # last ack → a read with min_position answered 200

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0

    @property
    def sustained_per_second(self) -> float:
        """The records over the time until both projections had applied them."""
        until = self.seconds + max(self.cache_s, self.model_s)
        return self.records / until if until else 0.0

    def latency(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def lag_seconds(acks: Sequence[Ack], t: float, position: int) -> float:
    """How old the oldest acknowledgement that `position` does not cover was at
    `t` (0 when it covers every one acknowledged by then)."""
    for ack in acks:
        if ack.t > t:
            break
        if ack.position > position:
            return t - ack.t
    return 0.0


def timeline(burst: Burst) -> dict[str, Any]:
    """What the keep-pace chart draws, as plain lists (saved in results.json)."""
    acks = sorted(burst.acks, key=lambda a: a.t)
    return {
        "t": [round(s.t, 3) for s in burst.samples],
        "cache_events": [max(0, s.acked - s.cache) for s in burst.samples],
        "model_events": [max(0, s.acked - s.model) for s in burst.samples],
        "cache_s": [round(lag_seconds(acks, s.t, s.cache), 3) for s in burst.samples],
        "model_s": [round(lag_seconds(acks, s.t, s.model), 3) for s in burst.samples],
        "last_ack_s": round(burst.last.t, 3),
        "cache_caught_up_s": round(burst.cache_s, 3),
        "model_caught_up_s": round(burst.model_s, 3),
        "records_per_second": round(burst.records_per_second),
    }


def bodies(keys: Sequence[Key], seconds: float) -> Iterator[bytes]:
    """Unique NDJSON bodies: enough for 120,000 records/s built before timing, then
    (should the service outrun that) built on demand."""
    lines = [
        (
            b'{"event_id":"%s","virtual_key":"'
            + key.secret.encode()
            + b'","provider":"openai","model":"gpt-4o","cost":"0.000123",'
            b'"input_tokens":100,"output_tokens":20}'
        )
        for key in keys
    ]

    def body(n: int) -> bytes:
        start = n * PER_BODY
        return b"\n".join(
            lines[(start + i) % len(lines)] % str(uuid.uuid4()).encode()
            for i in range(PER_BODY)
        )

    ready = [body(n) for n in range(int(seconds * 120_000 / PER_BODY) + 16)]
    return itertools.chain(ready, map(body, itertools.count(len(ready))))


async def run(
    dsn: str,
    url: str,
    keys: Sequence[Key],
    *,
    seconds: float,
    connections: int,
) -> Burst:
    source = bodies(keys, seconds)
    acks: list[Ack] = []
    latencies: list[float] = []
    samples: list[Sample] = []
    counts = {"records": 0, "errors": 0}
    probe_key = keys[0]
    conn = await asyncpg.connect(dsn)
    connector = aiohttp.TCPConnector(limit=connections + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def cache_position(min_position: int | None = None) -> tuple[int, int]:
            payload: dict[str, object] = {
                "virtual_key": probe_key.secret,
                "provider": "openai",
                "model": "gpt-4o",
            }
            if min_position is not None:
                payload["min_position"] = min_position
            async with session.post(
                f"{url}/api/governance/check", json=payload
            ) as resp:
                answer = await resp.read()
            return resp.status, int(msgspec.json.decode(answer).get("position", 0))

        async def worker() -> None:
            while time.perf_counter() < deadline:
                body = next(source)
                sent = time.perf_counter()
                async with session.post(
                    f"{url}/api/usage/batch", data=body, headers=_HEADERS
                ) as resp:
                    answer = await resp.read()
                now = time.perf_counter()
                if resp.status != 200:
                    counts["errors"] += 1
                    continue
                summary = msgspec.json.decode(answer)
                counts["records"] += int(summary["accepted"])
                acks.append(Ack(now - started, int(summary["position"])))
                latencies.append((now - sent) * 1000)

        async def sample(stop: asyncio.Event) -> None:
            while not stop.is_set():
                t = time.perf_counter() - started
                acked = max((a.position for a in acks), default=0)
                _, cache = await cache_position()
                model = int(await conn.fetchval(_READ_MODEL_POSITION) or 0)
                samples.append(Sample(t, acked, cache, model))
                # A sampling period, not a wait for a projection.
                await asyncio.sleep(SAMPLE_S)

        async def caught_up(probe: Callable[[], Awaitable[int]]) -> float:
            """Seconds from the last ack until `probe` answers 200."""
            while True:
                status = await probe()
                now = time.perf_counter() - started
                if status == 200:
                    return now - last.t
                if status != 503 or now - last.t > GIVE_UP_S:
                    raise RuntimeError(f"not caught up: {status} after {now:.0f} s")

        async def cache_probe() -> int:
            status, _ = await cache_position(last.position)
            return status

        async def model_probe() -> int:
            params = {"owner_type": "customer", "min_position": str(last.position)}
            async with session.get(
                f"{url}/api/governance/budgets", params=params
            ) as resp:
                await resp.read()
                return resp.status

        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(stop))
        try:
            await asyncio.gather(*(worker() for _ in range(connections)))
            if not acks:
                raise RuntimeError(f"no body acknowledged ({counts['errors']} errors)")
            # The last acknowledgement, and the highest position acknowledged.
            last = Ack(max(a.t for a in acks), max(a.position for a in acks))
            cache_s, model_s = await asyncio.gather(
                caught_up(cache_probe), caught_up(model_probe)
            )
        finally:
            stop.set()
            await sampler
            await conn.close()
    return Burst(
        seconds=last.t,
        records=counts["records"],
        errors=counts["errors"],
        acks=acks,
        last=last,
        latencies_ms=latencies,
        samples=samples,
        cache_s=cache_s,
        model_s=model_s,
    )
