"""The log is append-only in the database itself: UPDATE, DELETE and TRUNCATE of
`events` are refused (SQLSTATE GL003) for every role, the owner and an audited
rewrite session included; only a superuser's `session_replication_role = replica`,
which switches every ordinary trigger off, passes (the test suite's cleanup)."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from service import eventstore
from service.domain.events import TeamCreated
from service.records import NewEvent

TEAM = "00000000-0000-4000-8000-0000000000f1"


async def one_event(pool: asyncpg.Pool) -> None:
    await eventstore.append(
        pool,
        f"team-{TEAM}",
        0,
        [NewEvent(event=TeamCreated(team_id=TEAM, name="platform", budgets=()))],
    )


async def refusal(conn: asyncpg.Connection, statement: str) -> tuple[str, str]:
    with pytest.raises(asyncpg.PostgresError) as refused:
        async with conn.transaction():
            await conn.execute(statement)
    return refused.value.sqlstate, str(refused.value)


@pytest.mark.parametrize(
    "statement",
    [
        "TRUNCATE events",
        "TRUNCATE ONLY events",
        "TRUNCATE TABLE events RESTART IDENTITY",
        "TRUNCATE events CASCADE",
        "TRUNCATE streams, events",
    ],
)
async def test_truncate_of_the_log_is_refused(pool, statement):
    await one_event(pool)

    async with pool.acquire() as conn:
        assert await refusal(conn, statement) == (
            "GL003",
            "events is append-only: TRUNCATE refused",
        )

    assert await pool.fetchval("SELECT count(*) FROM events") == 1
    # One statement: the other table named beside the log was not emptied either.
    assert await pool.fetchval("SELECT count(*) FROM streams") == 1


@pytest.mark.parametrize(
    ("statement", "operation"),
    [
        ("UPDATE events SET type = 'Forged'", "UPDATE"),
        ("DELETE FROM events", "DELETE"),
    ],
)
async def test_update_and_delete_are_still_refused(pool, statement, operation):
    await one_event(pool)

    async with pool.acquire() as conn:
        assert await refusal(conn, statement) == (
            "GL003",
            f"events is append-only: {operation} refused",
        )

    assert await pool.fetchval("SELECT type FROM events") == "TeamCreated"


async def test_an_audited_rewrite_session_may_not_truncate_either(pool):
    await one_event(pool)
    run_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO event_rewrite_runs (run_id, kind, code_version)"
        " VALUES ($1, 'upcast', 'test')",
        run_id,
    )

    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(
                "SELECT set_config('govledger.rewrite_run', $1, true)", str(run_id)
            )
            assert await refusal(conn, "TRUNCATE events") == (
                "GL003",
                "events is append-only: TRUNCATE refused",
            )
        finally:
            await tx.rollback()

    assert await pool.fetchval("SELECT count(*) FROM events") == 1


async def test_a_role_granted_truncate_is_refused_and_cannot_switch_triggers_off(pool):
    await one_event(pool)
    async with pool.acquire() as conn:
        # Roles are cluster-wide: create, grant and use inside one transaction that
        # rolls back, so the role never outlives the test.
        tx = conn.transaction()
        await tx.start()
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_roles WHERE rolname = 'govledger_app'"
            )
            if not exists:
                await conn.execute("CREATE ROLE govledger_app NOLOGIN")
            await conn.execute(
                "GRANT SELECT, INSERT, TRUNCATE ON events TO govledger_app"
            )
            await conn.execute("SET LOCAL ROLE govledger_app")

            assert await refusal(conn, "TRUNCATE events") == (
                "GL003",
                "events is append-only: TRUNCATE refused",
            )
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.execute("SET LOCAL session_replication_role = replica")
            assert await conn.fetchval("SELECT count(*) FROM events") == 1
        finally:
            await tx.rollback()


async def test_a_superuser_switching_triggers_off_may_truncate(pool):
    """The escape the test suite's cleanup uses, and only a superuser has."""
    await one_event(pool)

    async with pool.acquire() as conn, conn.transaction():
        assert await conn.fetchval(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        )
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute("TRUNCATE events, streams")

    assert await pool.fetchval("SELECT count(*) FROM events") == 0
    # The setting was local to that transaction: the refusal is back.
    await one_event(pool)
    async with pool.acquire() as conn:
        assert await refusal(conn, "TRUNCATE events") == (
            "GL003",
            "events is append-only: TRUNCATE refused",
        )
