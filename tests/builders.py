"""Shared builders of the tests: ids, budgets and events as the domain writes them,
`append` (events into the log at a chosen time), `governance` (a small chain of
owners in the log, folded into an enforcement cache) and `behind_an_older_transaction`
(a commit the gap-safe head does not show yet)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg

from projections.cache import GovernanceCache
from service import eventstore
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerCreated,
    ProviderConfig,
    TeamCreated,
    UsageRecorded,
    VirtualKeyCreated,
)
from service.records import Checkpoint, NewEvent

T = TypeVar("T")

# The chain `governance()` appends: a key under a team of a customer (with an openai
# provider config), and a key of the customer alone.
CUSTOMER_ID = "c0000000-0000-4000-8000-000000000001"
TEAM_ID = "70000000-0000-4000-8000-000000000001"
KEY_ID = "a0000000-0000-4000-8000-000000000001"
SOLO_KEY_ID = "a0000000-0000-4000-8000-000000000002"
CONFIG_ID = "b0000000-0000-4000-8000-000000000001"
SECRET = "sk-gl-" + "s" * 32
SOLO_SECRET = "sk-gl-" + "o" * 32


def uid() -> str:
    return str(uuid.uuid4())


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def budget(
    budget_id: str,
    limit: str,
    duration: str,
    *,
    calendar_aligned: bool = False,
    reset_usage: bool = False,
) -> Budget:
    return Budget(
        budget_id=budget_id,
        max_limit=Decimal(limit),
        reset_duration=duration,
        calendar_aligned=calendar_aligned,
        reset_usage=reset_usage,
    )


def key_created(key_id: str, **fields: Any) -> VirtualKeyCreated:
    """A key named "ci" whose secret hash and hint are made up from its id."""
    return VirtualKeyCreated(
        **{
            "virtual_key_id": key_id,
            "name": "ci",
            "value_sha256": f"sha-{key_id}",
            "value_hint": "abcd",
            **fields,
        }
    )


def usage_event(key_id: str, cost: str, at: datetime, **fields: Any) -> UsageRecorded:
    """`cost` spent on openai's gpt-4o by `key_id`, occurred at `at`."""
    return UsageRecorded(
        **{
            "virtual_key_id": key_id,
            "provider": "openai",
            "model": "gpt-4o",
            "cost": Decimal(cost),
            "occurred_at": at,
            **fields,
        }
    )


async def append(
    pool: asyncpg.Pool, stream_id: str, *events: AnyEvent, at: datetime | None = None
) -> int:
    """Append to a stream (recorded at `at`, else by the database's clock); the
    global position of the last event."""
    appended = await eventstore.append(
        pool, stream_id, None, [NewEvent(event=e) for e in events], recorded_at=at
    )
    return appended[-1].global_position


async def governance(pool: asyncpg.Pool) -> GovernanceCache:
    """A real cache folded from real events: the chain of the ids above."""
    appends: list[tuple[str, AnyEvent]] = [
        (
            f"customer-{CUSTOMER_ID}",
            CustomerCreated(customer_id=CUSTOMER_ID, name="acme"),
        ),
        (
            f"team-{TEAM_ID}",
            TeamCreated(team_id=TEAM_ID, name="platform", customer_id=CUSTOMER_ID),
        ),
        (
            f"virtual_key-{KEY_ID}",
            VirtualKeyCreated(
                virtual_key_id=KEY_ID,
                name="gateway",
                value_sha256=sha256(SECRET),
                value_hint=SECRET[-4:],
                team_id=TEAM_ID,
                provider_configs=(
                    ProviderConfig(provider_config_id=CONFIG_ID, provider="openai"),
                ),
            ),
        ),
        (
            f"virtual_key-{SOLO_KEY_ID}",
            VirtualKeyCreated(
                virtual_key_id=SOLO_KEY_ID,
                name="solo",
                value_sha256=sha256(SOLO_SECRET),
                value_hint=SOLO_SECRET[-4:],
                customer_id=CUSTOMER_ID,
            ),
        ),
    ]
    for stream_id, event in appends:
        await eventstore.append(pool, stream_id, 0, [NewEvent(event=event)])
    cache = GovernanceCache()
    for record in await eventstore.read_all(pool, Checkpoint(), 100):
        cache.apply(record)
    return cache


async def behind_an_older_transaction(
    pool: asyncpg.Pool,
    write: Callable[[], Awaitable[object]],
    read: Callable[[], Awaitable[T]],
    *,
    open_for_s: float = 0.1,
) -> T:
    """`read`'s result, after `write` committed while a transaction that took its id
    before it stays open, so that the gap-safe head does not show the write yet; the
    older transaction ends `open_for_s` after `read` starts."""
    async with pool.acquire() as older:
        holding = older.transaction()
        await holding.start()
        await older.fetchval("SELECT pg_current_xact_id()")
        await write()

        async def end_in_a_moment() -> None:
            await asyncio.sleep(open_for_s)  # how long the older one holds on
            await holding.rollback()

        ending = asyncio.create_task(end_in_a_moment())
        try:
            return await read()
        finally:
            await ending


async def against_commit_order(pool: asyncpg.Pool) -> tuple[int, int]:
    """Two new teams whose positions run against commit order: the second position
    is appended in a transaction whose id was taken before the first's, so the log
    in (tx_id, position) order holds (earlier xid, second) then (later xid, first).
    Returns (first, second)."""

    async def new_team(conn: eventstore.Queryable) -> int:
        team_id = str(uuid.uuid4())
        event = TeamCreated(team_id=team_id, name=f"team {team_id[:8]}")
        [appended] = await eventstore.append(
            conn, f"team-{team_id}", 0, [NewEvent(event=event)]
        )
        return appended.global_position

    async with pool.acquire() as early, early.transaction():
        await early.fetchval("SELECT pg_current_xact_id()")  # the earlier xid
        first = await new_team(pool)
        second = await new_team(early)
    assert second == first + 1
    return first, second
