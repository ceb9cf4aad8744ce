"""The event log on a real PostgreSQL: append, concurrency, idempotency, tailing."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from decimal import Decimal

import asyncpg
import pytest

from service import eventstore
from service.domain.events import Budget, TeamCreated, TeamDeleted, TeamUpdated
from service.errors import IdempotencyConflict, VersionConflict
from service.records import Checkpoint, NewEvent


def team_created(team_id: str, limit: str = "100.123456789") -> TeamCreated:
    return TeamCreated(
        team_id=team_id,
        name="platform",
        budgets=(
            Budget(budget_id="b1", max_limit=Decimal(limit), reset_duration="1d"),
        ),
    )


async def test_append_then_read_stream_round_trips_exact_decimals(pool):
    event = team_created("t1")
    appended = await eventstore.append(pool, "team-t1", 0, [NewEvent(event=event)])
    version, records = await eventstore.read_stream(pool, "team-t1")

    assert version == 1
    assert [r.event for r in records] == [event]
    assert records[0].event.budgets[0].max_limit == Decimal("100.123456789")
    assert [a.stream_version for a in appended] == [1]
    assert records[0].global_position == appended[0].global_position
    assert appended[0].duplicate is False


async def test_reading_an_unknown_stream_gives_version_zero(pool):
    assert await eventstore.read_stream(pool, "team-nobody") == (0, [])


async def test_stale_expected_version_raises_version_conflict(pool):
    await eventstore.append(pool, "team-t1", 0, [NewEvent(event=team_created("t1"))])

    with pytest.raises(VersionConflict):
        await eventstore.append(
            pool, "team-t1", 0, [NewEvent(event=TeamDeleted(team_id="t1"))]
        )
    assert (await eventstore.read_stream(pool, "team-t1"))[0] == 1


async def test_retry_with_same_event_ids_returns_original_positions_and_appends_nothing(
    pool,
):
    events = [
        NewEvent(event=team_created("t1")),
        NewEvent(event=TeamUpdated(team_id="t1", name="renamed")),
    ]
    first = await eventstore.append(pool, "team-t1", 0, events)
    # A retry after a lost answer: same ids, and by now a stale expected version.
    retry = await eventstore.append(pool, "team-t1", 0, events)

    assert [(a.stream_version, a.global_position) for a in retry] == [
        (a.stream_version, a.global_position) for a in first
    ]
    assert [a.duplicate for a in retry] == [True, True]
    assert (await eventstore.read_stream(pool, "team-t1"))[0] == 2
    assert await pool.fetchval("SELECT count(*) FROM events") == 2


async def test_event_id_reused_on_another_stream_is_an_idempotency_conflict(pool):
    event_id = str(uuid.uuid4())
    await eventstore.append(
        pool, "team-t1", 0, [NewEvent(event=team_created("t1"), event_id=event_id)]
    )

    with pytest.raises(IdempotencyConflict):
        await eventstore.append(
            pool, "team-t2", 0, [NewEvent(event=team_created("t2"), event_id=event_id)]
        )


async def test_a_late_committing_transaction_is_delivered_late_never_skipped(pool):
    async with pool.acquire() as conn_a:
        tx_a = conn_a.transaction()
        await tx_a.start()
        try:
            [a] = await eventstore.append(
                conn_a, "team-a", 0, [NewEvent(event=team_created("a"))]
            )
            [b] = await eventstore.append(
                pool, "team-b", 0, [NewEvent(event=team_created("b"))]
            )
            # B committed with a later position, but A still holds an older slot.
            assert b.global_position > a.global_position
            assert await eventstore.read_all(pool, Checkpoint()) == []
        finally:
            await tx_a.commit()

    records = await eventstore.read_all(pool, Checkpoint())
    assert [r.stream_id for r in records] == ["team-a", "team-b"]


async def test_tailing_after_a_checkpoint_returns_only_later_events(pool):
    for i in range(3):
        await eventstore.append(
            pool, f"team-{i}", 0, [NewEvent(event=team_created(str(i)))]
        )
    first_two = await eventstore.read_all(pool, Checkpoint(), limit=2)
    rest = await eventstore.read_all(pool, first_two[-1].checkpoint)

    assert [r.stream_id for r in first_two] == ["team-0", "team-1"]
    assert [r.stream_id for r in rest] == ["team-2"]
    assert await eventstore.head(pool) == rest[-1].checkpoint


@pytest.mark.timeout(300)
async def test_concurrent_writers_and_a_tailing_reader_deliver_every_event_once(pool):
    writers, appends_each, streams = 8, 1000, 300
    rng = random.Random(7)
    done = asyncio.Event()
    appended = asyncio.Event()
    delivered: list[tuple[str, int]] = []

    async def writer(w: int) -> None:
        for _ in range(appends_each):
            stream = f"team-s{rng.randrange(streams)}"
            while True:
                version, _ = await eventstore.read_stream(pool, stream)
                event = (
                    team_created(stream)
                    if version == 0
                    else TeamUpdated(team_id=stream, name=f"w{w}")
                )
                try:
                    await eventstore.append(
                        pool, stream, version, [NewEvent(event=event)]
                    )
                    appended.set()
                    break
                except VersionConflict:
                    continue

    async def reader() -> None:
        checkpoint = Checkpoint()
        while True:
            finished = done.is_set()
            appended.clear()
            batch = await eventstore.read_all(pool, checkpoint, limit=500)
            delivered.extend((r.stream_id, r.stream_version) for r in batch)
            if batch:
                checkpoint = batch[-1].checkpoint
            elif finished:
                return
            else:
                await appended.wait()

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(w) for w in range(writers)))
    done.set()
    appended.set()
    await reading

    assert len(delivered) == writers * appends_each
    assert len(set(delivered)) == len(delivered)
    per_stream: dict[str, list[int]] = defaultdict(list)
    for stream, version in delivered:
        per_stream[stream].append(version)
    for versions in per_stream.values():
        assert versions == list(range(1, len(versions) + 1))


async def test_the_log_refuses_update_and_delete(pool):
    await eventstore.append(pool, "team-t1", 0, [NewEvent(event=team_created("t1"))])

    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await pool.execute("UPDATE events SET type = 'Forged'")
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await pool.execute("DELETE FROM events")
    assert await pool.fetchval("SELECT type FROM events") == "TeamCreated"


async def test_a_rewrite_session_without_a_running_run_is_refused(pool):
    await eventstore.append(pool, "team-t1", 0, [NewEvent(event=team_created("t1"))])
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "SELECT set_config('govledger.rewrite_run', $1, true)", str(uuid.uuid4())
        )
        with pytest.raises(asyncpg.PostgresError, match="not running"):
            await conn.execute("UPDATE events SET schema_version = 2")
