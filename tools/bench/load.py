"""A closed-loop HTTP load client (aiohttp) that records every request's latency."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence

import aiohttp
import msgspec


class LoadResult(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    seconds: float
    errors: int
    latencies_ms: list[float]
    units: int  # what each request carried (records for ingest, 1 for a check)

    @property
    def per_second(self) -> float:
        return self.units / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def post_loop(
    url: str,
    bodies: Sequence[bytes],
    *,
    connections: int,
    seconds: float,
    units_per_body: Sequence[int] | int = 1,
    content_type: str = "application/json",
    warmup_s: float = 0.5,
    units_of: Callable[[bytes], int] | None = None,
) -> LoadResult:
    """POST bodies round-robin from `connections` keep-alive connections for `seconds`.

    Each body is sent at most once when `units_per_body` is a sequence (ingest: every
    record is unique), so the caller must supply enough bodies for the duration.
    With `units_of`, a request counts the units its answer reports (ingest: the
    records stored as new, so a duplicate, answered from memory, never counts).
    """
    per_body = (
        [units_per_body] * len(bodies)
        if isinstance(units_per_body, int)
        else list(units_per_body)
    )
    once = not isinstance(units_per_body, int)
    cursor = itertools.count()
    latencies: list[float] = []
    counters = {"requests": 0, "errors": 0, "units": 0}
    measuring = False
    stop_at = 0.0
    headers = {"Content-Type": content_type}
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)

    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while True:
                now = time.perf_counter()
                if measuring and now >= stop_at:
                    return
                i = next(cursor)
                if once and i >= len(bodies):
                    return
                body = bodies[i % len(bodies)]
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    answer = await resp.read()
                    ok = resp.status < 300
                if not measuring:
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                counters["requests"] += 1
                if ok and units_of is not None:
                    counters["units"] += units_of(answer)
                elif ok:
                    counters["units"] += per_body[i % len(bodies)]
                else:
                    counters["errors"] += 1

        warm = [asyncio.create_task(worker()) for _ in range(connections)]
        await asyncio.sleep(warmup_s)  # warm-up window of a timed benchmark
        measuring = True
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*warm)
        elapsed = time.perf_counter() - started
    return LoadResult(
        requests=counters["requests"],
        seconds=elapsed,
        errors=counters["errors"],
        latencies_ms=latencies,
        units=counters["units"],
    )
