"""SIGKILL of `govledger serve` while recorders stream usage through all three ingest
paths (POST /api/usage, the NDJSON batch, the WebSocket stream). After every restart
the recorders resend everything they ever sent: every acknowledged record comes back
as a duplicate (it was durable), each one is stored exactly once, and after catch-up
the read model's spend, the cache's check answers and a replay from position 0 agree.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.served import (
    BUDGETS,
    CHECK,
    REQUEST_TIMEOUT_S,
    Fleet,
    Hierarchy,
    Served,
    call,
    hierarchy,
    known_to_cache,
    post_batch,
    usage,
)

KEY_LIMIT = 10**6
TEAM_LIMIT = 10**7
CUSTOMER_LIMIT = 10**8
RESEND_CHUNK = 5000  # records per batch when resending (well under 16 MiB)
PIPELINE = 4  # WebSocket frames in flight before waiting for an ack


@pytest.fixture
def fleet(database: str) -> Any:
    with Fleet(database) as fleet:
        yield fleet


@dataclass
class Recorder:
    """Sends fresh usage of one key through one ingest path until the server dies or
    `at_most` requests went out; remembers everything sent and acknowledged."""

    path: str  # "single", "batch" or "stream"
    key: dict[str, Any]
    occurred_at: str
    rng: random.Random
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    server_errors: list[Any] = field(default_factory=list)  # 5xx and error acks
    acknowledged: int = 0  # acks received while recording

    def new(self, count: int) -> list[dict[str, Any]]:
        records = [
            usage(self.key, f"0.{self.rng.randint(1, 999):03d}", self.occurred_at)
            for _ in range(count)
        ]
        self.sent.update((r["event_id"], r) for r in records)
        return records

    def ack(self, ids: Iterable[str]) -> None:
        before = len(self.acked)
        self.acked.update(ids)
        self.acknowledged += len(self.acked) - before

    async def run(self, session: aiohttp.ClientSession, url: str, at_most: int) -> None:
        try:
            if self.path == "stream":
                await self._stream(session, url, at_most)
            else:
                await self._post(session, url, at_most)
        except (aiohttp.ClientError, ConnectionError):
            return  # the server was killed under this request

    async def _post(
        self, session: aiohttp.ClientSession, url: str, at_most: int
    ) -> None:
        for _ in range(at_most):
            if self.path == "single":
                records = self.new(1)
                status, answer = await call(
                    session, "POST", url + "/api/usage", records[0]
                )
                ok = status == 202
            else:
                records = self.new(self.rng.randint(1, 60))
                status, answer = await post_batch(session, url, records)
                ok = status == 200 and answer["rejected"] == []
            if status >= 500:
                self.server_errors.append((status, answer))
            elif not ok:
                raise AssertionError(f"{self.path}: {status} {answer}")
            else:
                self.ack(r["event_id"] for r in records)

    async def _stream(
        self, session: aiohttp.ClientSession, url: str, at_most: int
    ) -> None:
        async with session.ws_connect(url + "/api/usage/stream") as ws:
            waiting: list[tuple[int, list[str]]] = []
            for seq in range(at_most):
                records = self.new(self.rng.randint(1, 40))
                await ws.send_str(json.dumps({"seq": seq, "records": records}))
                waiting.append((seq, [r["event_id"] for r in records]))
                while len(waiting) >= PIPELINE or (waiting and seq == at_most - 1):
                    message = await ws.receive(timeout=REQUEST_TIMEOUT_S)
                    if message.type is not aiohttp.WSMsgType.TEXT:
                        return  # closed: the server is gone
                    ack = json.loads(message.data)
                    expected_seq, ids = waiting.pop(0)
                    assert ack.get("seq") == expected_seq, ack
                    if "error" in ack:
                        self.server_errors.append(ack)
                    else:
                        assert ack["rejected"] == [], ack
                        self.ack(ids)


@dataclass
class Figures:
    seed: int
    cycles: int = 0
    records: int = 0
    acknowledged: int = 0  # acks received while recording (before the resends)
    unacknowledged_at_kills: int = 0  # sent, no ack when the server died
    committed_unacknowledged: int = 0  # of those, found in the log all the same
    losses: int = 0  # acknowledged, then not found in the log
    duplicates: int = 0  # event ids stored more than once
    server_errors: int = 0  # 5xx answers, error acks, request_failed log lines
    seconds: float = 0.0
    errors: list[Any] = field(default_factory=list, repr=False)

    def count_errors(self, errors: list[Any]) -> None:
        self.server_errors += len(errors)
        self.errors += errors


async def stored_counts(pool: asyncpg.Pool) -> Counter[str]:
    rows = await pool.fetch(
        "SELECT event_id::text AS id, count(*) AS n FROM events"
        " WHERE type = 'UsageRecorded' GROUP BY event_id"
    )
    return Counter({r["id"]: int(r["n"]) for r in rows})


async def resend(session: aiohttp.ClientSession, url: str, recorder: Recorder) -> None:
    """Everything again, in batches: what was acknowledged must come back entirely
    as duplicates; the rest is stored now (new, or found committed already)."""
    acked = [r for i, r in recorder.sent.items() if i in recorder.acked]
    rest = [r for i, r in recorder.sent.items() if i not in recorder.acked]
    for records, all_duplicates in ((acked, True), (rest, False)):
        for start in range(0, len(records), RESEND_CHUNK):
            chunk = records[start : start + RESEND_CHUNK]
            status, answer = await post_batch(session, url, chunk, within_s=60)
            assert (status, answer["rejected"]) == (200, []), answer
            assert answer["accepted"] + answer["duplicates"] == len(chunk)
            if all_duplicates:
                assert answer["accepted"] == 0, f"{answer['accepted']} acks were lost"
    recorder.acked.update(recorder.sent)


async def crash_cycles(
    fleet: Fleet,
    pool: asyncpg.Pool,
    *,
    cycles: int,
    kill_after_s: tuple[float, float],
    requests_per_cycle: int,
    seed: int,
) -> Figures:
    rng = random.Random(seed)
    figures = Figures(seed=seed, cycles=cycles)
    started = time.monotonic()
    port = None
    async with aiohttp.ClientSession() as session:
        recorders: list[Recorder] = []
        tree: Hierarchy | None = None
        for cycle in range(cycles + 1):
            served = fleet.start(name=f"crash-{cycle}", port=port)
            port = served.port
            await served.ready(session)
            if tree is None:
                tree = await hierarchy(
                    session,
                    served.url,
                    keys=3,
                    key_limit=KEY_LIMIT,
                    team_limit=TEAM_LIMIT,
                    customer_limit=CUSTOMER_LIMIT,
                )
                await known_to_cache(session, served.url, tree)
                now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
                recorders = [
                    Recorder(path, key, now, random.Random(rng.random()))
                    for path, key in zip(
                        ("single", "batch", "stream"), tree.keys, strict=True
                    )
                ]
            # Nothing acknowledged may be missing, whatever the kill interrupted.
            stored = await stored_counts(pool)
            for recorder in recorders:
                unacked = recorder.sent.keys() - recorder.acked
                figures.losses += len(recorder.acked - stored.keys())
                figures.unacknowledged_at_kills += len(unacked)
                figures.committed_unacknowledged += len(unacked & stored.keys())
                await resend(session, served.url, recorder)
            if cycle == cycles:
                break
            # Record through all three paths; kill the server at a random moment.
            tasks = [
                asyncio.create_task(r.run(session, served.url, requests_per_cycle))
                for r in recorders
            ]
            await asyncio.sleep(rng.uniform(*kill_after_s))  # the fault injector
            served.kill()
            await asyncio.wait_for(asyncio.gather(*tasks), REQUEST_TIMEOUT_S * 2)
        assert tree is not None
        stored = await stored_counts(pool)
        sent = {i for r in recorders for i in r.sent}
        figures.records = len(sent)
        figures.duplicates = sum(n - 1 for n in stored.values())
        figures.acknowledged = sum(r.acknowledged for r in recorders)
        figures.count_errors([e for r in recorders for e in r.server_errors])
        for each in fleet.servers:
            figures.count_errors(_failed_requests(each))
        assert set(stored) == sent
        await agree(session, served, pool, tree, recorders)
    figures.seconds = round(time.monotonic() - started, 1)
    return figures


def _failed_requests(served: Served) -> list[dict[str, Any]]:
    return [
        line
        for line in served.log_lines()
        if line.get("event") == "request_failed"
        or (line.get("status", 0) >= 500 and line.get("path") != "/readyz")
    ]


async def agree(
    session: aiohttp.ClientSession,
    served: Served,
    pool: asyncpg.Pool,
    tree: Hierarchy,
    recorders: list[Recorder],
) -> None:
    """The read model, the cache and a replay from 0 all count every record once."""
    spent = {
        r.key["id"]: sum((Decimal(x["cost"]) for x in r.sent.values()), Decimal(0))
        for r in recorders
    }
    total = sum(spent.values(), Decimal(0))
    head = int(await pool.fetchval("SELECT max(global_position) FROM events"))

    status, answer = await call(
        session, "GET", f"{served.url}{BUDGETS}?min_position={head}"
    )
    assert status == 200, answer
    usage_of = {
        (b["owner_type"], b["owner_id"]): Decimal(str(b["current_usage"]))
        for b in answer["budgets"]
    }
    assert usage_of == {
        ("customer", tree.customer["id"]): total,
        ("team", tree.team["id"]): total,
        **{("virtual_key", key_id): cost for key_id, cost in spent.items()},
    }

    async def remaining(key: dict[str, Any]) -> Decimal:
        status, answer = await call(
            session,
            "POST",
            served.url + CHECK,
            {"virtual_key_id": key["id"], "min_position": head},
        )
        assert (status, answer["allowed"]) == (200, True), answer
        return Decimal(str(answer["remaining"]))

    for key in tree.keys:
        assert await remaining(key) == KEY_LIMIT - spent[key["id"]]
    assert await remaining(tree.member) == TEAM_LIMIT - total
    assert await remaining(tree.solo) == CUSTOMER_LIMIT - total

    replay = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", "replay", "--verify"],
        env={**os.environ, "DATABASE_URL": served.dsn},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr


async def test_acknowledged_usage_survives_sigkill_exactly_once(fleet, pool):
    figures = await crash_cycles(
        fleet,
        pool,
        cycles=3,
        kill_after_s=(0.3, 1.0),
        requests_per_cycle=400,
        seed=random.randrange(1 << 32),
    )
    assert (figures.losses, figures.duplicates, figures.errors) == (0, 0, [])
    assert figures.acknowledged > 0, figures
    assert figures.unacknowledged_at_kills > 0, figures


@pytest.mark.soak
@pytest.mark.timeout(1200)
async def test_soak_acknowledged_usage_survives_many_sigkills(fleet, pool, capsys):
    seed = random.randrange(1 << 32)
    figures = await crash_cycles(
        fleet,
        pool,
        cycles=25,
        kill_after_s=(0.2, 2.0),
        requests_per_cycle=3000,
        seed=seed,
    )
    with capsys.disabled():
        print(f"\nsoak crash safety: {figures}")
    assert (figures.losses, figures.duplicates, figures.errors) == (0, 0, [])
