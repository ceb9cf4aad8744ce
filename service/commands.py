"""The governance command path: in one REPEATABLE READ transaction, check the
customers and teams a body names, execute the command on its stream
(`eventstore.execute`, the events carrying the command's name and request id), detach
what pointed at a deleted customer or team, render the answer and keep it for the
request's Idempotency-Key.

A concurrent change to any stream the transaction read aborts it (a version conflict
or a serialization failure). Without If-Match the command is then decided again on
fresh state, which is safe since `decide` is pure. A retry under the same
Idempotency-Key, or a concurrent request with it that committed first, gets the first
answer back; a refusal is kept for the key too (`refuse`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from functools import reduce
from typing import Any, Generic, NamedTuple, TypeVar

import asyncpg
import structlog

from service import eventstore, idempotency
from service.domain import customers, teams, virtual_keys
from service.domain.commands import DetachTeam, DetachVirtualKey
from service.domain.events import AnyEvent
from service.errors import VersionConflict
from service.eventstore import Connection, Executed, Queryable
from service.idempotency import Idempotency, Reply

log = structlog.get_logger()

S = TypeVar("S")
C = TypeVar("C")

# Without If-Match a conflicting command is decided again on fresh state.
ATTEMPTS = 8
_RETRIED = (VersionConflict, asyncpg.SerializationError, asyncpg.DeadlockDetectedError)


class Entity(NamedTuple, Generic[S, C]):
    """One aggregate: `name` prefixes its streams (`team-<id>`)."""

    name: str
    decide: Callable[[C, S | None], Sequence[AnyEvent]]
    evolve: Callable[[S | None, AnyEvent], S | None]


CUSTOMER = Entity("customer", customers.decide, customers.evolve)
TEAM = Entity("team", teams.decide, teams.evolve)
VIRTUAL_KEY = Entity("virtual_key", virtual_keys.decide, virtual_keys.evolve)


class Call(NamedTuple):
    """How a command was asked for, beside the command itself."""

    at: datetime  # the events' recorded_at, and `now` for the answer
    request_id: str | None
    idempotency: Idempotency | None
    expected_version: int | None  # If-Match; None: retried on a conflict


# The answer to a save, rendered in its transaction from what the command executed.
MakeReply = Callable[[Connection, Executed[S]], Awaitable[Reply]]


async def save(
    pool: asyncpg.Pool,
    entity: Entity[S, C],
    entity_id: str,
    command: Callable[[frozenset[str]], C],
    call: Call,
    reply: MakeReply[S],
    *,
    customer_id: object = None,
    team_id: object = None,
) -> Reply:
    """Create or update one entity. `command` gets the ids among `customer_id` and
    `team_id` (those a body names; None or UNSET: none) that name nothing; `reply`
    renders the answer."""
    stream_id = f"{entity.name}-{entity_id}"

    async def run(conn: Connection) -> tuple[Reply, int]:
        unknown = await unknown_references(
            conn, customer_id=customer_id, team_id=team_id
        )
        executed = await _execute(
            conn, entity, entity_id, command(unknown), call, call.expected_version
        )
        return await reply(conn, executed), executed.position

    return await _transact(pool, stream_id, call, run)


async def delete(
    pool: asyncpg.Pool,
    entity: Entity[S, C],
    entity_id: str,
    command: C,
    call: Call,
    reply: Callable[[int], Reply],
) -> Reply:
    """Delete one entity and detach what pointed at it; `reply` gets the position
    of the last event appended."""
    stream_id = f"{entity.name}-{entity_id}"

    async def run(conn: Connection) -> tuple[Reply, int]:
        executed = await _execute(
            conn, entity, entity_id, command, call, call.expected_version
        )
        detached = await _detach(conn, entity.name, entity_id, call)
        position = max([executed.position, *detached])
        return reply(position), position

    return await _transact(pool, stream_id, call, run)


async def keep(pool: asyncpg.Pool, key: Idempotency, answer: Reply) -> Reply:
    """Keep an answer for its key in a transaction of its own (a refusal, whose
    command rolled back, or the answer of a command the usage writer committed);
    the answer of a concurrent request with the same key if it came first."""
    try:
        async with pool.acquire() as conn:
            await idempotency.remember(conn, key, answer)
    except asyncpg.UniqueViolationError as exc:
        if not idempotency.is_taken(exc):
            raise
        replayed = await idempotency.replay(pool, key)
        if replayed is None:  # not expected: the row that took the key is committed
            raise
        return replayed
    return answer


def _metadata(command: object, request_id: str | None) -> dict[str, Any]:
    """What each event of a command carries beside its data."""
    return {"command": type(command).__name__, "request_id": request_id}


# --- the transaction ---------------------------------------------------------------


async def _transact(
    pool: asyncpg.Pool,
    stream_id: str,
    call: Call,
    run: Callable[[Connection], Awaitable[tuple[Reply, int]]],
) -> Reply:
    """Run `run` in its own transaction until it commits, keeping its answer for the
    Idempotency-Key; retried on a conflict when the call has no If-Match."""
    key = call.idempotency
    failure: Exception | None = None
    attempt = 0
    while True:
        # The one place an earlier answer for the key is looked up: before each
        # attempt, and before giving up (what failed may have been a concurrent
        # request with the same key).
        if key is not None and (replayed := await idempotency.replay(pool, key)):
            return replayed
        if failure is not None:
            raise failure
        attempt += 1
        try:
            # REPEATABLE READ: a stream row changed by a concurrent commit fails the
            # attempt (40001, retried on a fresh snapshot) instead of appending after
            # it with an older tx_id than its events, which would break the
            # per-stream delivery order that tailers read by tx_id.
            async with (
                pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read"),
            ):
                reply, position = await run(conn)
                if key is not None:
                    await idempotency.remember(conn, key, reply)
        except asyncpg.UniqueViolationError as exc:
            # The same key committed first in a concurrent request: answer as it did.
            if key is None or not idempotency.is_taken(exc):
                raise
            failure = exc
        except _RETRIED as exc:
            if call.expected_version is None and attempt < ATTEMPTS:
                log.info("command_retried", attempt=attempt, error=type(exc).__name__)
                continue
            failure = exc
            if not isinstance(exc, VersionConflict):
                failure = VersionConflict(
                    f"{stream_id} was changed by someone else meanwhile; reload it"
                )
                failure.__cause__ = exc
        else:
            structlog.contextvars.bind_contextvars(position=position)
            return reply


async def _execute(
    conn: Connection,
    entity: Entity[S, C],
    entity_id: str,
    command: C,
    call: Call,
    expected_version: int | None = None,
) -> Executed[S]:
    return await eventstore.execute(
        conn,
        f"{entity.name}-{entity_id}",
        command,
        entity.decide,
        entity.evolve,
        recorded_at=call.at,
        expected_version=expected_version,
        metadata=_metadata(command, call.request_id),
    )


# --- references --------------------------------------------------------------------


async def unknown_references(
    conn: Queryable, *, customer_id: object = None, team_id: object = None
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


async def _exists(
    conn: Queryable, stream_id: str, evolve: Callable[[S | None, AnyEvent], S | None]
) -> bool:
    _, history = await eventstore.read_stream(conn, stream_id)
    return reduce(evolve, (r.event for r in history), None) is not None


async def _detach(conn: Connection, owner: str, owner_id: str, call: Call) -> list[int]:
    """Detach the teams and keys that point at a deleted customer or team; the
    positions of their streams after it."""
    if owner == "customer":
        streams = await eventstore.streams_naming(conn, "customer_id", owner_id)
    elif owner == "team":
        streams = await eventstore.streams_naming(conn, "team_id", owner_id)
    else:
        return []
    customer_id = owner_id if owner == "customer" else None
    team_id = owner_id if owner == "team" else None
    positions: list[int] = []
    for stream_id in streams:  # ordered by stream id: concurrent deletes lock in order
        entity_id = stream_id.partition("-")[2]
        detached: Executed[Any]
        if stream_id.startswith("team-") and customer_id is not None:
            team: teams.TeamCommand = DetachTeam(
                team_id=entity_id, customer_id=customer_id
            )
            detached = await _execute(conn, TEAM, entity_id, team, call)
        elif stream_id.startswith("virtual_key-"):
            key: virtual_keys.VirtualKeyCommand = DetachVirtualKey(
                virtual_key_id=entity_id, team_id=team_id, customer_id=customer_id
            )
            detached = await _execute(conn, VIRTUAL_KEY, entity_id, key, call)
        else:
            continue
        positions.append(detached.position)
    return positions
