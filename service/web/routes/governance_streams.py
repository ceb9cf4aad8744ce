"""The streams a governance command touches: one step on a stream (read, decide,
append with the command's metadata), whether the customers and teams a body names
exist, and the teams and keys a delete detaches, all in the command's transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from functools import reduce
from typing import Any, TypeVar

import structlog

from service import eventstore
from service.domain import customers, teams, virtual_keys
from service.domain.commands import DetachTeam, DetachVirtualKey
from service.domain.events import AnyEvent
from service.eventstore import Executed, Executor

S = TypeVar("S")
C = TypeVar("C")


async def step(
    conn: Executor,
    stream_id: str,
    command: C,
    decide: Callable[[C, S | None], Sequence[AnyEvent]],
    evolve: Callable[[S | None, AnyEvent], S | None],
    at: datetime,
    expected_version: int | None = None,
) -> Executed[S]:
    """Execute `command` on one stream as of `at`; the events carry the command's
    name and the request id as metadata."""
    metadata = {
        "command": type(command).__name__,
        "request_id": structlog.contextvars.get_contextvars().get("request_id"),
    }
    return await eventstore.execute(
        conn,
        stream_id,
        command,
        decide,
        evolve,
        recorded_at=at,
        expected_version=expected_version,
        metadata=metadata,
    )


async def _exists(
    conn: Executor, stream_id: str, evolve: Callable[[S | None, AnyEvent], S | None]
) -> bool:
    _, history = await eventstore.read_stream(conn, stream_id)
    return reduce(evolve, (r.event for r in history), None) is not None


async def unknown_references(
    conn: Executor, *, customer_id: object = None, team_id: object = None
) -> frozenset[str]:
    """The customer and team ids a body names that do not exist (None, UNSET: none)."""
    unknown: set[str] = set()
    if isinstance(customer_id, str) and not await _exists(
        conn, f"customer-{customer_id}", customers.evolve
    ):
        unknown.add(customer_id)
    if isinstance(team_id, str) and not await _exists(
        conn, f"team-{team_id}", teams.evolve
    ):
        unknown.add(team_id)
    return frozenset(unknown)


# Every stream whose entity events ever named the id; the partial indexes of
# migration 0004 serve exactly these type lists. Folding each stream tells which
# still point at it.
_STREAMS_NAMING_CUSTOMER = """
SELECT DISTINCT stream_id FROM events
WHERE type IN ('TeamCreated', 'TeamUpdated', 'VirtualKeyCreated', 'VirtualKeyUpdated')
  AND data ->> 'customer_id' = $1
ORDER BY stream_id
"""
_STREAMS_NAMING_TEAM = """
SELECT DISTINCT stream_id FROM events
WHERE type IN ('VirtualKeyCreated', 'VirtualKeyUpdated') AND data ->> 'team_id' = $1
ORDER BY stream_id
"""


async def detach(conn: Executor, at: datetime, owner: str, owner_id: str) -> list[int]:
    """Detach the teams and keys that point at a deleted customer or team."""
    if owner == "customer":
        rows = await conn.fetch(_STREAMS_NAMING_CUSTOMER, owner_id)
    elif owner == "team":
        rows = await conn.fetch(_STREAMS_NAMING_TEAM, owner_id)
    else:
        return []
    customer_id = owner_id if owner == "customer" else None
    team_id = owner_id if owner == "team" else None
    positions: list[int] = []
    for row in rows:  # ordered by stream id: concurrent deletes lock in one order
        stream_id: str = row["stream_id"]
        detached: Executed[Any]
        if stream_id.startswith("team-") and customer_id is not None:
            team = DetachTeam(team_id=stream_id[5:], customer_id=customer_id)
            detached = await step(conn, stream_id, team, teams.decide, teams.evolve, at)
        elif stream_id.startswith("virtual_key-"):
            key = DetachVirtualKey(
                virtual_key_id=stream_id[12:], team_id=team_id, customer_id=customer_id
            )
            detached = await step(
                conn, stream_id, key, virtual_keys.decide, virtual_keys.evolve, at
            )
        else:
            continue
        positions.append(detached.position)
    return positions
