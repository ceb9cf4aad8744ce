"""Replay of a SQL projection from the log: rebuild into shadow tables and swap them
in atomically, verify them row by row against the live tables, or build the state as
of a past time or position into an audit schema.

The projection's own `apply` runs unchanged: each batch runs on a connection whose
`search_path` puts the shadow schema first (`projections.shadow` copies the tables
there and compares them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import asyncpg
import msgspec

from projections import governance, governance_reads, runner
from projections.governance_books import Books

# _ident and _literal by these names: the quoting functions the SQL review in
# tests/test_security.py recognises.
from projections.shadow import (
    ShadowError,
    TableDiff,
    _ident,
    _literal,
    compare,
    copy_tables,
    use,
)
from service import eventstore
from service.domain import usage
from service.eventstore import Connection, place_of
from service.records import Checkpoint, Refused

# Events a bulk-phase transaction applies. What usage moves stays in the books (in
# memory) across batches and is written every BULK_FLUSH events or so: usage of one
# owner and cell is written once per flush, so writes cost per cell, not per event;
# the flush bounds the memory the unwritten cells take.
BULK_BATCH = 25_000
BULK_FLUSH = 250_000

# (events applied so far, last position read)
ProgressFn = Callable[[int, int], None]


class BulkApply(Protocol):
    """A projection's apply as replay runs it: rows as `eventstore.read_rows` reads
    them, its ledgers kept in `books` across batches, written only with `flush` (or
    by `books.flush`); returns the rows it refused."""

    async def __call__(
        self,
        conn: Connection,
        rows: Sequence[asyncpg.Record],
        books: Books | None = None,
        *,
        flush: bool = True,
    ) -> list[Refused]: ...


class Projection(msgspec.Struct, frozen=True):
    """A SQL projection: its checkpoint name, its tables' prefix, its apply."""

    name: str
    prefix: str
    apply: BulkApply


PROJECTIONS = {
    "governance": Projection("governance", "governance_", governance.apply_rows),
}


class ReplayError(Exception):
    """A replay that cannot run (unknown projection, a busy lock, a bad target)."""


class ReplayReport(msgspec.Struct, frozen=True, kw_only=True):
    projection: str
    events: int
    checkpoint: Checkpoint
    swapped: bool = False
    schema: str | None = None
    as_of: datetime | None = None
    rows: dict[str, int] = {}
    differences: list[TableDiff] = []


def projection(name: str) -> Projection:
    try:
        return PROJECTIONS[name]
    except KeyError:
        known = ", ".join(sorted(PROJECTIONS))
        raise ReplayError(f"unknown projection {name!r} (known: {known})") from None


# Positions are PostgreSQL bigints.
MAX_POSITION = 2**63 - 1


def parse_at(text: str, now: datetime) -> int | datetime:
    """A position (digits) or an RFC 3339 time (UTC when it names no offset) between
    2000-01-01 and 5 minutes after `now`."""
    if text.isascii() and text.isdigit():
        if len(text) > 19 or int(text) > MAX_POSITION:
            raise ReplayError(f"--at is past the largest position: {text[:30]!r}")
        return int(text)
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(
            f"--at takes a position or an RFC 3339 time: {text[:100]!r}"
        ) from None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    if not usage.is_in_range(at, now):
        raise ReplayError(
            "--at must lie between 2000-01-01T00:00:00Z and 5 minutes from now:"
            f" {text!r}"
        )
    return at


# --- rebuild, verify, swap ---------------------------------------------------------


async def rebuild(
    pool: asyncpg.Pool,
    name: str = "governance",
    *,
    verify: bool = False,
    batch_size: int = BULK_BATCH,
    lock_timeout_s: float = 2.0,
    on_progress: ProgressFn | None = None,
) -> ReplayReport:
    """Replay the projection from position 0 into a shadow schema while the service
    keeps serving, then either swap it in (the checkpoint row moves with it) or, with
    `verify`, compare it with the live tables at the live checkpoint and drop it."""
    spec = projection(name)
    shadow = f"replay_{spec.name}"

    # Verify compares at the live checkpoint, so never read past it.
    async def bound(on: Connection) -> Checkpoint:
        if verify:
            return await runner.load_checkpoint(on, spec.name)
        return await eventstore.head(on)

    async with (
        pool.acquire() as conn,
        pool.acquire() as reader,
        _replay_lock(conn, spec),
        _reading_ahead(reader, bound, Checkpoint(), batch_size) as batches,
    ):
        tables = await _copy_tables(conn, spec, shadow)
        try:
            books = Books()
            events, reached = await _bulk(
                conn, batches, spec, shadow, books, on_progress
            )
            for attempt in range(10):
                try:
                    return await _finish(
                        conn,
                        spec,
                        shadow,
                        books,
                        tables,
                        reached,
                        events,
                        verify,
                        lock_timeout_s,
                    )
                except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
                    # Readers or the live projector held on longer than lock_timeout:
                    # nothing changed; try again shortly.
                    await asyncio.sleep(0.1 * (attempt + 1))
            raise ReplayError("could not take the locks for the swap; retry later")
        finally:
            await conn.execute(f"DROP SCHEMA IF EXISTS {shadow} CASCADE")


async def _finish(
    conn: Connection,
    spec: Projection,
    shadow: str,
    books: Books,
    tables: list[str],
    reached: Checkpoint,
    events: int,
    verify: bool,
    lock_timeout_s: float,
) -> ReplayReport:
    """One short transaction holding the projection's lock, so the live projector
    pauses: catch the shadow up, then compare it or swap it in."""
    async with conn.transaction():
        await conn.execute(
            "SELECT set_config('lock_timeout', $1, true)",
            f"{int(lock_timeout_s * 1000)}ms",
        )
        await conn.execute(
            "SELECT pg_advisory_xact_lock("
            "'projection_checkpoints'::regclass::oid::int, hashtext($1))",
            spec.name,
        )
        live = await runner.load_checkpoint(conn, spec.name)
        target = live if verify else await eventstore.head(conn)
        more, reached = await _apply_range(conn, spec, shadow, books, reached, target)
        events += more
        if verify:
            return ReplayReport(
                projection=spec.name,
                events=events,
                checkpoint=reached,
                differences=await compare(conn, tables, "public", shadow),
            )
        retired = f"replay_retired_{spec.name}"
        qualified = ", ".join(f"public.{_ident(t)}" for t in tables)
        # One round trip: readers wait from the LOCK until the commit.
        swap = [
            f"LOCK TABLE {qualified} IN ACCESS EXCLUSIVE MODE",
            f"DROP SCHEMA IF EXISTS {retired} CASCADE",
            f"CREATE SCHEMA {retired}",
        ]
        for table in tables:
            swap.append(f"ALTER TABLE public.{_ident(table)} SET SCHEMA {retired}")
            swap.append(f"ALTER TABLE {shadow}.{_ident(table)} SET SCHEMA public")
        await conn.execute(";\n".join(swap))
        await conn.execute(
            "INSERT INTO public.projection_checkpoints AS p"
            " (projection, last_tx_id, last_position) VALUES ($1, $2, $3)"
            " ON CONFLICT (projection) DO UPDATE SET last_tx_id = EXCLUDED.last_tx_id,"
            " last_position = EXCLUDED.last_position, updated_at = now()",
            spec.name,
            reached.tx_id,
            reached.position,
        )
        await conn.execute(f"DROP SCHEMA {retired} CASCADE")
    return ReplayReport(
        projection=spec.name, events=events, checkpoint=reached, swapped=True
    )


# A session lock (freed if this process dies): one replay of a projection at a time.
_TRY_REPLAY_LOCK = (
    "SELECT pg_try_advisory_lock("
    "'projection_checkpoints'::regclass::oid::int, hashtext($1))"
)
_REPLAY_UNLOCK = (
    "SELECT pg_advisory_unlock('projection_checkpoints'::regclass::oid::int,"
    " hashtext($1))"
)


@contextlib.asynccontextmanager
async def _replay_lock(conn: Connection, spec: Projection) -> AsyncIterator[None]:
    key = f"replay:{spec.name}"
    if not await conn.fetchval(_TRY_REPLAY_LOCK, key):
        raise ReplayError(f"another replay of {spec.name} is running")
    try:
        yield
    finally:
        await conn.execute(_REPLAY_UNLOCK, key)


# --- as of a past time or position -------------------------------------------------


async def build_at(
    pool: asyncpg.Pool,
    at: int | datetime,
    name: str = "governance",
    *,
    batch_size: int = BULK_BATCH,
    on_progress: ProgressFn | None = None,
) -> ReplayReport:
    """Build the projection as of a position (every event up to and including it in
    delivery order) or a time (every event recorded at or before it) into its own
    schema `audit_<projection>_<position or time>`, replaced if it exists. The live
    tables are never touched."""
    spec = projection(name)
    suffix = (
        f"p{at}"
        if isinstance(at, int)
        else at.astimezone(UTC).strftime("%Y%m%dt%H%M%S%fz")
    )
    schema = f"audit_{spec.name}_{suffix}"
    async with pool.acquire() as conn, pool.acquire() as reader:
        if isinstance(at, int):
            last = await eventstore.last_at_or_before(conn, at)
            if last is None:
                raise ReplayError(f"the log has no event at or before position {at}")
            target, as_of = last
        else:
            # Every event committed by now, also one an older open transaction hides.
            await eventstore.settle(conn, eventstore.SETTLE_WAIT_S)
            target, as_of = await eventstore.head(conn), at
        until = at if isinstance(at, datetime) else None

        async def bound(on: Connection) -> Checkpoint:
            return target

        async with _reading_ahead(reader, bound, Checkpoint(), batch_size) as batches:
            tables = await _copy_tables(conn, spec, schema)
            try:
                events, reached = await _bulk(
                    conn, batches, spec, schema, Books(), on_progress, until
                )
                if reached != target and isinstance(at, int):
                    raise ReplayError(
                        f"position {at} follows a transaction still in flight; retry"
                    )
            except BaseException:
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                raise
        note = f"{spec.name} as of {'position' if until is None else 'time'} {at}"
        await conn.execute(f"COMMENT ON SCHEMA {schema} IS {_literal(note)}")
        rows = {
            t: await conn.fetchval(f"SELECT count(*) FROM {schema}.{_ident(t)}")
            for t in tables
        }
    return ReplayReport(
        projection=spec.name,
        events=events,
        checkpoint=reached,
        schema=schema,
        as_of=as_of,
        rows=rows,
    )


async def read_state(conn: Connection, schema: str, now: datetime) -> dict[str, Any]:
    """The governance wire views (as GET would answer) of a schema's tables."""
    async with conn.transaction():
        await use(conn, schema)
        return {
            "customers": await governance_reads.list_customers(conn, now),
            "teams": await governance_reads.list_teams(conn, now),
            "virtual_keys": await governance_reads.list_virtual_keys(conn, now),
            "budgets": await governance_reads.list_budgets(conn, now),
        }


# --- the bulk phase ----------------------------------------------------------------


async def _bulk(
    conn: Connection,
    batches: Callable[[], Awaitable[_Read]],
    spec: Projection,
    schema: str,
    books: Books,
    on_progress: ProgressFn | None,
    until: datetime | None = None,
) -> tuple[int, Checkpoint]:
    """Apply `batches` on `conn` until one is not full, each in its own short
    transaction (a long one would hold back vacuum and the tailing readers'
    horizon), what usage moved written every BULK_FLUSH events and at the end;
    returns (events applied, checkpoint reached)."""
    events, unwritten = 0, 0
    with _young_collections() as collect:
        while True:
            batch = await batches()
            async with conn.transaction():
                more = await _apply(conn, spec, schema, books, batch, until)
                unwritten += more
                if not batch.full or unwritten >= BULK_FLUSH:
                    await books.flush(conn)
                    unwritten = 0
                    collect()
            events += more
            if on_progress:
                on_progress(events, batch.reached.position)
            if not batch.full:
                return events, batch.reached


@contextlib.asynccontextmanager
async def _reading_ahead(
    reader: Connection,
    bound: Callable[[Connection], Awaitable[Checkpoint]],
    start: Checkpoint,
    batch_size: int,
) -> AsyncIterator[Callable[[], Awaitable[_Read]]]:
    """Batches of the log after `start`, none past `bound()`, each read on `reader`
    while the caller applies the one before (the first from the moment this
    opens): the log's rows do not change once readable, so a read needs no part of
    the apply's transaction, and PostgreSQL sends them while this process folds.
    Yields the function that returns the next batch."""

    async def read(after: Checkpoint) -> _Read:
        return await _read(reader, after, await bound(reader), batch_size)

    ahead = asyncio.ensure_future(read(start))

    async def next_batch() -> _Read:
        nonlocal ahead
        batch = await ahead
        if batch.full:
            ahead = asyncio.ensure_future(read(batch.reached))
        return batch

    try:
        yield next_batch
    finally:
        ahead.cancel()
        await asyncio.gather(ahead, return_exceptions=True)


@contextlib.contextmanager
def _young_collections() -> Iterator[Callable[[], object]]:
    """The bulk phase allocates rows by the hundred thousand (asyncpg records,
    tracked by the cyclic garbage collector) and frees them by reference count.
    Left on its own the collector walks the surviving objects again and again in
    full collections that find nothing: a quarter of the phase's time (measured
    on 200,000 events, where no collection found a single unreachable object).
    During the phase the collector runs only as the young collection this yields,
    called at each flush to bound what a cycle could hold, and as one full
    collection at its end (about 15 ms there); afterwards as before. The switch is
    the whole process's: replay runs in its own command (`govledger replay`), never
    inside a serving process."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield functools.partial(gc.collect, 1)
    finally:
        gc.collect()  # what the phase put off, paid here, not by what runs next
        if enabled:
            gc.enable()


async def _apply_range(
    conn: Connection,
    spec: Projection,
    schema: str,
    books: Books,
    start: Checkpoint,
    target: Checkpoint,
    batch_size: int = 5000,
) -> tuple[int, Checkpoint]:
    """Apply everything up to `target` inside the caller's transaction."""
    events, batch = 0, _Read([], start, True)
    while batch.full:
        batch = await _read(conn, batch.reached, target, batch_size)
        events += await _apply(conn, spec, schema, books, batch, None, flush=True)
    return events, batch.reached


class _Read(NamedTuple):
    """A batch of rows read, where it ends, and whether more may follow."""

    rows: list[asyncpg.Record]
    reached: Checkpoint
    full: bool


async def _read(
    conn: Connection, after: Checkpoint, target: Checkpoint, batch_size: int
) -> _Read:
    """The next rows after `after`, none past `target`."""
    rows = await eventstore.read_rows(conn, after, batch_size)
    full = len(rows) == batch_size
    if rows and _after(place_of(rows[-1]), target):
        # In (tx_id, position) order: those up to the target lead.
        rows = [r for r in rows if not _after(place_of(r), target)]
        full = False
    if not rows:
        return _Read([], after, False)
    return _Read(rows, place_of(rows[-1]), full)


async def _apply(
    conn: Connection,
    spec: Projection,
    schema: str,
    books: Books,
    batch: _Read,
    until: datetime | None,
    *,
    flush: bool = False,
) -> int:
    """Apply a batch into `schema` in the caller's transaction (its unqualified
    names resolve there from now on); returns the events applied. Without `flush`
    what usage moved stays in `books`."""
    # Before any early return: the caller's flush writes there too.
    await use(conn, schema)
    await conn.execute("SELECT set_config('synchronous_commit', 'off', true)")
    rows = batch.rows
    if until is not None:
        rows = [r for r in rows if r["recorded_at"] <= until]
    if not rows:
        return 0
    # Refused legacy events are passed over here as by the live projectors.
    refused = await spec.apply(conn, rows, books, flush=flush)
    return len(rows) - len(refused)


def _after(a: Checkpoint, b: Checkpoint) -> bool:
    return (a.tx_id, a.position) > (b.tx_id, b.position)


async def _copy_tables(conn: Connection, spec: Projection, schema: str) -> list[str]:
    """(Re)create `schema` with empty copies of the projection's live tables."""
    try:
        return await copy_tables(conn, spec.prefix, schema)
    except ShadowError as exc:
        raise ReplayError(str(exc)) from exc
