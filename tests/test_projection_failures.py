"""A projection that meets an event it cannot apply says so once and precisely, and a
legacy event with no current form is passed over alike by every projection, without
stopping the others, the start-up or replay (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from decimal import Decimal

import pytest
from structlog.testing import capture_logs

from projections import governance, replay
from projections.runner import Failure, Projector, Wake
from service import eventstore, metrics
from service.domain.events import Budget, TeamCreated
from service.records import Checkpoint, NewEvent, RecordedEvent
from service.web.keys import readiness_key
from tests.api import serve


@pytest.fixture
def projector(pool) -> Projector:
    return Projector(pool, "governance", governance.APPLIER)


T1 = "00000000-0000-4000-8000-0000000000a1"
T2 = "00000000-0000-4000-8000-0000000000a2"
WITHIN_S = 10.0


async def append_teams(pool, count: int) -> list[int]:
    positions = []
    for n in range(count):
        team_id = str(uuid.UUID(int=0xB0 + n))
        [appended] = await eventstore.append(
            pool,
            f"team-{team_id}",
            0,
            [NewEvent(event=TeamCreated(team_id=team_id, name=f"t{n}"))],
        )
        positions.append(appended.global_position)
    return positions


async def until(condition, what: str) -> None:
    """Poll a condition on this process's own objects (not a projection's progress
    in the database), bounded."""
    async with asyncio.timeout(WITHIN_S):
        # The state polled lives in this process: there is no event to wait on.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def run_until(projector: Projector, condition, what: str) -> None:
    """Run the projector until `condition` holds (`until`), then stop it."""
    task = asyncio.create_task(projector.run(Wake()))
    try:
        await until(condition, what)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_failing_event_is_narrowed_down_reported_once_and_never_skipped(
    pool,
) -> None:
    positions = await append_teams(pool, 5)
    poisoned = positions[2]
    applied: list[int] = []
    attempts = [0]

    async def apply(_conn, records: Sequence[RecordedEvent]) -> None:
        if any(r.global_position == poisoned for r in records):
            attempts[0] += 1
            raise ValueError("cannot apply this one")
        applied.extend(r.global_position for r in records)

    projector = Projector(
        pool, "failing_test", apply, persistent=False, max_backoff_s=0.05
    )
    with capture_logs() as logs:
        # The batch, then the event alone, then retries of it: reported once.
        await run_until(projector, lambda: attempts[0] >= 5, "several retries")

    assert projector.failure == Failure(
        "failing_test", poisoned, "ValueError: cannot apply this one"
    )
    assert applied == positions[:2]
    assert projector.checkpoint.position == positions[1]
    failed = [e for e in logs if e["event"] == "projection_failed"]
    assert [(e["projection"], e["position"], e["error"]) for e in failed] == [
        ("failing_test", poisoned, "ValueError: cannot apply this one")
    ]
    assert (
        f'projection_failing_position{{projection="failing_test"}} {poisoned:.1f}'
        in metrics.render().decode()
    )


async def test_a_failed_batch_is_retried_in_halves_not_one_event_at_a_time(
    pool,
) -> None:
    # At full ingest a batch holds thousands of events: retrying one at a time
    # would leave the projection that many round trips behind.
    positions = await append_teams(pool, 64)
    poisoned = positions[40]
    sizes: list[int] = []

    async def apply(_conn, records: Sequence[RecordedEvent]) -> None:
        sizes.append(len(records))
        if any(r.global_position == poisoned for r in records):
            raise ValueError("cannot apply this one")

    projector = Projector(
        pool, "halving_test", apply, persistent=False, batch_size=64, max_backoff_s=1
    )
    with capture_logs() as logs:
        await run_until(projector, lambda: projector.failure is not None, "the failure")

    # 64 fails; 0-31 pass; 32-63, 32-47 fail; 32-39 pass; 40-47, 40-43, 40-41, 40 fail.
    assert sizes[:9] == [64, 32, 32, 16, 8, 8, 4, 2, 1]
    assert projector.failure == Failure(
        "halving_test", poisoned, "ValueError: cannot apply this one"
    )
    assert projector.checkpoint.position == positions[39]
    narrowed = [
        (e["first"], e["size"], e["retry_size"])
        for e in logs
        if e["event"] == "projection_batch_failed"
    ]
    assert narrowed == [
        (positions[0], 64, 32),
        (positions[32], 32, 16),
        (positions[32], 16, 8),
        (positions[40], 8, 4),
        (positions[40], 4, 2),
        (positions[40], 2, 1),
    ]
    assert (
        'projection_failed_batches_total{projection="halving_test"} 6.0'
        in metrics.render().decode()
    )


async def test_after_a_narrowed_failure_clears_the_rest_go_in_whole_batches(
    pool,
) -> None:
    positions = await append_teams(pool, 64)
    sizes: list[int] = []
    failures_left = [8]

    async def apply(_conn, records: Sequence[RecordedEvent]) -> None:
        sizes.append(len(records))
        if failures_left[0] and records[0].global_position == positions[0]:
            failures_left[0] -= 1
            raise ValueError("not yet")

    projector = Projector(
        pool,
        "clearing_test",
        apply,
        persistent=False,
        batch_size=64,
        max_backoff_s=0.02,
    )
    await run_until(
        projector, lambda: projector.checkpoint.position == positions[-1], "the head"
    )

    # Halved down to the first event, which fails twice more alone, then passes;
    # the 63 after it go in one batch, not one at a time.
    assert sizes == [64, 32, 16, 8, 4, 2, 1, 1, 1, 63]
    assert projector.failure is None


async def test_a_failure_that_clears_lets_the_projection_go_on(pool) -> None:
    positions = await append_teams(pool, 3)
    attempts = {"left": 3}
    applied: list[int] = []

    async def apply(_conn, records: Sequence[RecordedEvent]) -> None:
        if attempts["left"] and any(r.global_position == positions[1] for r in records):
            attempts["left"] -= 1
            raise ValueError("not yet")
        applied.extend(r.global_position for r in records)

    projector = Projector(
        pool, "flaky_test", apply, persistent=False, max_backoff_s=0.02
    )
    with capture_logs() as logs:
        await run_until(
            projector,
            lambda: projector.checkpoint.position == positions[-1],
            "the head",
        )

    assert applied == positions
    assert projector.failure is None
    assert [e["event"] for e in logs if e["event"].startswith("projection_")] == [
        "projection_batch_failed",  # the three together; then alone:
        "projection_failed",
        "projection_recovered",
    ]


async def insert_refused_legacy(pool) -> int:
    """A legacy budget update whose duration has no current form (the older system
    took `500ms`), written straight into the log as an old import would have."""
    await pool.execute(
        "INSERT INTO events (event_id, stream_id, stream_version, type, schema_version,"
        " data) VALUES ($1, $2, 2, 'TeamBudgetUpdated', 1, $3)",
        str(uuid.uuid4()),
        f"team-{T1}",
        {"team_id": T1, "max_limit": "1", "reset_duration": "500ms"},
    )
    return int(await pool.fetchval("SELECT max(global_position) FROM events"))


async def test_every_projection_passes_over_a_refused_legacy_event_alike(
    pool, projector
) -> None:
    budget = Budget(
        budget_id=str(uuid.UUID(int=7)), max_limit=Decimal(5), reset_duration="1d"
    )
    await eventstore.append(
        pool, f"team-{T1}", 0, [NewEvent(event=TeamCreated(team_id=T1, name="one"))]
    )
    refused_at = await insert_refused_legacy(pool)
    [after] = await eventstore.append(
        pool,
        f"team-{T2}",
        0,
        [NewEvent(event=TeamCreated(team_id=T2, name="two", budgets=(budget,)))],
    )

    with capture_logs() as logs:
        await projector.catch_up()
        batch = await eventstore.read_batch(pool, Checkpoint(), 100)

    assert [r.global_position for r in batch.refused] == [refused_at]
    assert batch.refused[0].code == "legacy_event_refused"
    assert projector.checkpoint.position == after.global_position
    assert [
        (e["event"], e["position"]) for e in logs if e["event"] == "event_refused"
    ] == [("event_refused", refused_at)]
    assert projector.refused == batch.refused
    teams = await pool.fetch("SELECT id, name FROM governance_teams ORDER BY name")
    assert [(r["id"], r["name"]) for r in teams] == [(T1, "one"), (T2, "two")]
    report = await replay.rebuild(pool, "governance", verify=True)
    assert report.differences == []


async def test_a_command_on_the_owner_of_a_refused_event_is_a_400(pool) -> None:
    await eventstore.append(
        pool, f"team-{T1}", 0, [NewEvent(event=TeamCreated(team_id=T1, name="one"))]
    )
    await insert_refused_legacy(pool)

    with pytest.raises(Exception, match="500ms") as refused:
        await eventstore.read_stream(pool, f"team-{T1}")
    assert getattr(refused.value, "code", None) == "legacy_event_refused"


# --- /readyz names what is wrong -----------------------------------------------------


async def test_readyz_names_a_refused_legacy_event_and_stays_ready(database, pool):
    await eventstore.append(
        pool, f"team-{T1}", 0, [NewEvent(event=TeamCreated(team_id=T1, name="one"))]
    )
    refused_at = await insert_refused_legacy(pool)

    async with serve(database) as api:
        await api.caught_up(refused_at)
        status, body = await api.call("GET", "/readyz")
        command = await api.call(
            "PUT", f"/api/governance/teams/{T1}", {"name": "renamed"}
        )
        _, log = await api.call("GET", "/api/events")

    assert (status, body["status"]) == (200, "ready")
    assert [(r["position"], r["type"], r["code"]) for r in body["refused"]] == [
        (refused_at, "TeamBudgetUpdated", "legacy_event_refused")
    ]
    assert (command[0], command[1]["error"]["code"]) == (400, "legacy_event_refused")
    # The log as stored: the refused event is shown in its stored form.
    stored = log["events"][-1]
    assert (stored["global_position"], stored["schema_version"], stored["data"]) == (
        refused_at,
        1,
        {"team_id": T1, "max_limit": "1", "reset_duration": "500ms"},
    )


async def test_readyz_names_a_failing_projection_its_position_and_error(database, pool):
    [position] = await append_teams(pool, 1)

    async def apply(_conn, records: Sequence[RecordedEvent]) -> None:
        raise RuntimeError("index row size exceeds btree version 4 maximum")

    async with serve(database) as api:
        # The service's own projections first: /readyz says `catching_up` until they
        # have applied the log, which would hide the degraded answer under test.
        await api.caught_up(position)
        broken = Projector(pool, "broken", apply, persistent=False, max_backoff_s=0.05)
        api.app[readiness_key]["broken"] = broken
        task = asyncio.create_task(broken.run(Wake()))
        try:
            await until(lambda: broken.failure is not None, "the failure")
            status, body = await api.call("GET", "/readyz")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert (status, body) == (
        200,
        {
            "status": "degraded",
            "failing": [
                {
                    "projection": "broken",
                    "position": position,
                    "error": "RuntimeError: index row size exceeds btree version 4"
                    " maximum",
                }
            ],
        },
    )
