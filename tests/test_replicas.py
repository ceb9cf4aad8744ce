"""Two `govledger serve` processes on one database, on different ports: concurrent
PUTs of one team through both lose no update, both caches converge on the same check
answers, one replica at a time applies the SQL projector (seen in pg_locks), and a
SIGKILL of the replica applying it hands the projector to the other within seconds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest

from projections import replay
from tests.served import (
    BUDGETS,
    CHECK,
    TEAMS,
    Fleet,
    Hierarchy,
    Served,
    call,
    hierarchy,
    known_to_cache,
    post_batch,
    usage,
)

HANDOVER_BOUND_S = 5.0
# The governance projector's advisory lock: (projection_checkpoints' oid, hashtext).
_HOLDERS = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid = 'projection_checkpoints'::regclass::oid
  AND l.objid = hashtext('governance')::oid AND l.objsubid = 2
"""
_CHECKPOINT = """
SELECT last_tx_id::text::bigint AS tx_id, last_position FROM projection_checkpoints
WHERE projection = 'governance'
"""
_HOLD_CHECKPOINT = """
SELECT 1 FROM projection_checkpoints WHERE projection = 'governance' FOR UPDATE
"""


@pytest.fixture
def fleet(database: str) -> Any:
    with Fleet(database) as fleet:
        yield fleet


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def replicas(fleet: Fleet, session: aiohttp.ClientSession) -> list[Served]:
    pair = [fleet.start(name="replica-a"), fleet.start(name="replica-b")]
    await asyncio.gather(*(served.ready(session) for served in pair))
    return pair


async def put_team(
    session: aiohttp.ClientSession,
    served: Served,
    team_id: str,
    name: str,
    if_match: int | None,
) -> tuple[int, Any]:
    headers = {} if if_match is None else {"If-Match": str(if_match)}
    return await call(
        session,
        "PUT",
        f"{served.url}{TEAMS}/{team_id}",
        {"name": name},
        headers=headers,
    )


async def read_team(
    session: aiohttp.ClientSession, served: Served, team_id: str, position: int
) -> dict[str, Any]:
    status, answer = await call(
        session, "GET", f"{served.url}{TEAMS}/{team_id}?min_position={position}"
    )
    assert status == 200, answer
    return dict(answer["team"])


async def test_concurrent_puts_through_two_replicas_lose_no_update(fleet, session):
    a, b = await replicas(fleet, session)
    status, created = await call(session, "POST", a.url + TEAMS, {"name": "t"})
    assert status == 201, created
    team_id, version = created["team"]["id"], created["team"]["version"]

    # With If-Match: exactly one PUT per round wins, the others get 409.
    for round_ in range(3):
        names = [f"r{round_}-{i}" for i in range(6)]
        answers = await asyncio.gather(
            *(
                put_team(session, (a, b)[i % 2], team_id, name, version)
                for i, name in enumerate(names)
            )
        )
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200, 409, 409, 409, 409, 409], answers
        assert {
            answer["error"]["code"] for status, answer in answers if status == 409
        } == {"version_conflict"}
        [won] = [answer for status, answer in answers if status == 200]
        assert won["team"]["version"] == version + 1
        for served in (a, b):
            team = await read_team(session, served, team_id, won["position"])
            assert (team["name"], team["version"]) == (won["team"]["name"], version + 1)
        version += 1

    # Without If-Match: every PUT succeeds, one after the other; the last one stays.
    names = [f"free-{i}" for i in range(6)]
    answers = await asyncio.gather(
        *(
            put_team(session, (a, b)[i % 2], team_id, name, None)
            for i, name in enumerate(names)
        )
    )
    assert [status for status, _ in answers] == [200] * 6, answers
    last = max((answer for _, answer in answers), key=lambda x: x["position"])
    assert sorted(answer["team"]["version"] for _, answer in answers) == list(
        range(version + 1, version + 7)
    )
    for served in (a, b):
        team = await read_team(session, served, team_id, last["position"])
        assert (team["name"], team["version"]) == (last["team"]["name"], version + 6)


@dataclass
class Traffic:
    """Usage of the hierarchy's keys through both replicas (single and batch);
    pg_locks and the checkpoint sampled meanwhile."""

    session: aiohttp.ClientSession
    pool: asyncpg.Pool
    tree: Hierarchy
    occurred_at: str
    rng: random.Random = field(default_factory=random.Random)
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    holders: list[str] = field(default_factory=list)  # who held the lock, per sample
    most_at_once: int = 0
    checkpoints: list[tuple[int, int]] = field(default_factory=list)
    held: asyncio.Event = field(default_factory=asyncio.Event)  # a holder was seen

    async def record(self, served: Served, stop: asyncio.Event, at_most: int) -> None:
        """Until `stop` or the replica is gone; 5xx never."""
        try:
            for turn in range(at_most):
                if stop.is_set():
                    return
                key = self.tree.keys[turn % len(self.tree.keys)]
                records = [
                    usage(key, f"0.{self.rng.randint(1, 999):03d}", self.occurred_at)
                    for _ in range(1 if turn % 3 else 25)
                ]
                self.sent.update((r["event_id"], r) for r in records)
                status, answer = await post_batch(self.session, served.url, records)
                assert (status, answer["rejected"]) == (200, []), answer
        except (aiohttp.ClientError, ConnectionError):
            return  # killed

    async def sample(self, stop: asyncio.Event, at_most: int = 20_000) -> None:
        for _ in range(at_most):
            if stop.is_set():
                return
            holders = [r["application_name"] for r in await self.pool.fetch(_HOLDERS)]
            self.most_at_once = max(self.most_at_once, len(holders))
            self.holders += holders
            if holders:
                self.held.set()
            row = await self.pool.fetchrow(_CHECKPOINT)
            if row is not None:
                self.checkpoints.append((row["tx_id"], row["last_position"]))
            await asyncio.sleep(0.002)  # a sampling period, not a wait

    def spent(self) -> dict[str, Decimal]:
        spent = {key["id"]: Decimal(0) for key in self.tree.keys}
        for record in self.sent.values():
            key_id = next(
                k["id"] for k in self.tree.keys if k["value"] == record["virtual_key"]
            )
            spent[key_id] += Decimal(record["cost"])
        return spent


async def start_traffic(
    fleet: Fleet, session: aiohttp.ClientSession, pool: asyncpg.Pool
) -> tuple[list[Served], Traffic]:
    pair = await replicas(fleet, session)
    tree = await hierarchy(
        session,
        pair[0].url,
        keys=2,
        key_limit=10**6,
        team_limit=10**7,
        customer_limit=10**8,
    )
    for served in pair:
        await known_to_cache(session, served.url, tree)
        # ... and the projector has applied it (its checkpoint row exists).
        await read_model_reaches(session, served, tree.position, time.monotonic())
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return pair, Traffic(session, pool, tree, now)


@asynccontextmanager
async def holding_the_checkpoint(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Hold the projector's checkpoint row (FOR UPDATE) for the block: the replica
    holding the projector's lock with a batch to apply then waits at its checkpoint's
    move, lock held, so a sample sees it at a point of our choosing (the lock is
    transaction-scoped and a batch takes milliseconds, so sampling alone can miss
    every one); the other replica's try-lock meanwhile fails."""
    async with pool.acquire() as conn, conn.transaction():
        assert await conn.fetchval(_HOLD_CHECKPOINT) == 1
        yield


async def lock_seen(traffic: Traffic) -> str:
    """The replica a sample names as holding the projector's lock, from now."""
    traffic.held.clear()
    async with asyncio.timeout(HANDOVER_BOUND_S):
        await traffic.held.wait()
    return traffic.holders[-1]


async def checks(
    session: aiohttp.ClientSession, served: Served, tree: Hierarchy, position: int
) -> list[dict[str, Any]]:
    answers = []
    for key in [*tree.keys, tree.member, tree.solo]:
        status, answer = await call(
            session,
            "POST",
            served.url + CHECK,
            {"virtual_key_id": key["id"], "min_position": position},
        )
        assert status == 200, answer
        assert answer["position"] >= position
        answers.append({k: v for k, v in answer.items() if k != "position"})
    return answers


async def head(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT max(global_position) FROM events"))


async def assert_read_model_counts_every_record_once(
    session: aiohttp.ClientSession, served: Served, pool: asyncpg.Pool, t: Traffic
) -> None:
    spent = t.spent()
    status, answer = await call(
        session, "GET", f"{served.url}{BUDGETS}?min_position={await head(pool)}"
    )
    assert status == 200, answer
    usage_of = {
        b["owner_id"]: Decimal(str(b["current_usage"])) for b in answer["budgets"]
    }
    total = sum(spent.values(), Decimal(0))
    assert usage_of == {
        t.tree.customer["id"]: total,
        t.tree.team["id"]: total,
        **spent,
    }
    report = await replay.rebuild(pool, verify=True)
    assert report.differences == []


async def test_caches_converge_and_one_replica_at_a_time_applies_the_projector(
    fleet, session, pool
):
    (a, b), traffic = await start_traffic(fleet, session, pool)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(traffic.record(a, stop, 150)),
        asyncio.create_task(traffic.record(b, stop, 150)),
        asyncio.create_task(traffic.sample(stop)),
    ]
    async with holding_the_checkpoint(pool):
        await lock_seen(traffic)
    await asyncio.gather(*tasks[:2])
    stop.set()
    await tasks[2]

    assert traffic.most_at_once == 1
    assert set(traffic.holders) <= {"replica-a", "replica-b"}
    assert traffic.holders, "no sample caught the projector's lock"
    assert traffic.checkpoints == sorted(traffic.checkpoints)  # never moves back
    position = await head(pool)
    assert await checks(session, a, traffic.tree, position) == await checks(
        session, b, traffic.tree, position
    )
    await assert_read_model_counts_every_record_once(session, b, pool, traffic)


async def read_model_reaches(
    session: aiohttp.ClientSession, served: Served, position: int, since: float
) -> float:
    """Seconds from `since` until `served`'s read model has applied `position`
    (each read waits up to 2 s for min_position, then answers 503 projection_lag)."""
    while True:
        status, answer = await call(
            session, "GET", f"{served.url}{BUDGETS}?min_position={position}"
        )
        took = time.monotonic() - since
        if status == 200:
            return took
        assert answer["error"]["code"] == "projection_lag", answer
        assert took < HANDOVER_BOUND_S, f"position {position} not applied in time"


async def handovers(
    fleet: Fleet, session: aiohttp.ClientSession, pool: asyncpg.Pool, rounds: int
) -> dict[str, Any]:
    """Kill the replica seen applying the projector, `rounds` times (restarting it
    in between): each time the other one takes over within HANDOVER_BOUND_S."""
    pair, traffic = await start_traffic(fleet, session, pool)
    live = {served.name: served for served in pair}
    stop = asyncio.Event()
    sampler = asyncio.create_task(traffic.sample(stop, at_most=10**7))
    recorders = {
        name: asyncio.create_task(traffic.record(served, stop, 10**7))
        for name, served in live.items()
    }
    took: list[float] = []
    try:
        for round_ in range(rounds):
            # Killed mid-batch: seen holding the lock, waiting at its checkpoint.
            async with holding_the_checkpoint(pool):
                victim = live[await lock_seen(traffic)]
                [survivor] = [s for s in live.values() if s is not victim]
                victim.kill()
                killed_at = time.monotonic()
            at_kill = await head(pool)
            await recorders.pop(victim.name)
            # The survivor applies the projector now: its read model passes the
            # head seen at the kill ...
            took.append(await read_model_reaches(session, survivor, at_kill, killed_at))
            seen = len(traffic.holders)
            # ... and keeps advancing with what is recorded after it.
            [key] = traffic.tree.keys[:1]
            record = usage(key, "0.5", traffic.occurred_at)
            traffic.sent[record["event_id"]] = record
            status, answer = await call(
                session, "POST", survivor.url + "/api/usage", record
            )
            assert status == 202, answer
            await read_model_reaches(
                session, survivor, answer["position"], time.monotonic()
            )
            assert set(traffic.holders[seen:]) <= {survivor.name}
            if round_ == rounds - 1:
                break
            restarted = fleet.start(name=victim.name)
            await restarted.ready(session)
            live[victim.name] = restarted
            recorders[victim.name] = asyncio.create_task(
                traffic.record(restarted, stop, 10**7)
            )
    finally:
        stop.set()
        await asyncio.gather(sampler, *recorders.values())
    assert traffic.most_at_once == 1

    # Whatever a victim was writing when it died: resend it all.
    records = list(traffic.sent.values())
    for start in range(0, len(records), 5000):
        status, answer = await post_batch(
            session, survivor.url, records[start : start + 5000], within_s=60
        )
        assert (status, answer["rejected"]) == (200, []), answer
    await assert_read_model_counts_every_record_once(session, survivor, pool, traffic)
    return {
        "handovers": rounds,
        "records": len(traffic.sent),
        "slowest_handover_s": round(max(took), 3),
        "lock_samples": len(traffic.holders),
    }


async def test_sigkill_of_the_replica_applying_the_projector_hands_it_over(
    fleet, session, pool
):
    figures = await handovers(fleet, session, pool, rounds=2)
    assert figures["slowest_handover_s"] < HANDOVER_BOUND_S


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_soak_the_projector_survives_repeated_sigkills_of_its_holder(
    fleet, session, pool, capsys
):
    figures = await handovers(fleet, session, pool, rounds=20)
    with capsys.disabled():
        print(f"\nsoak replicas: {figures}")
