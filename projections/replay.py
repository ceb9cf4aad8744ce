"""Replay of a SQL projection from the log: rebuild into shadow tables and swap them
in atomically, verify them row by row against the live tables, or build the state as
of a past time or position into an audit schema.

The projection's own `apply` runs unchanged: each batch runs on a connection whose
`search_path` puts the shadow schema first, where the tables are copies of the live
ones (columns, defaults, identity, constraints and indexes under their own names);
`events` and `projection_checkpoints` exist only in `public`, so they resolve there.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from projections import governance, runner
from service import eventstore
from service.eventstore import Checkpoint, RecordedEvent

Connection = asyncpg.Connection | PoolConnectionProxy
# (events applied so far, last position read)
ProgressFn = Callable[[int, int], None]


class Projection(msgspec.Struct, frozen=True):
    """A SQL projection: its checkpoint name, its tables' prefix, its apply."""

    name: str
    prefix: str
    apply: runner.Apply


PROJECTIONS = {
    "governance": Projection("governance", "governance_", governance.apply),
}


class ReplayError(Exception):
    """A replay that cannot run (unknown projection, a busy lock, a bad target)."""


class TableDiff(msgspec.Struct, frozen=True, kw_only=True):
    """Rows of one table found only live (`missing` from the replay) or only in it."""

    table: str
    missing: int
    extra: int
    lines: list[str]


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


def parse_at(text: str) -> int | datetime:
    """A position (digits) or an RFC 3339 time (UTC when it names no offset)."""
    if text.isdigit():
        return int(text)
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(
            f"--at takes a position or an RFC 3339 time: {text!r}"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


# --- rebuild, verify, swap ---------------------------------------------------------


async def rebuild(
    pool: asyncpg.Pool,
    name: str = "governance",
    *,
    verify: bool = False,
    batch_size: int = 2000,
    lock_timeout_s: float = 2.0,
    on_progress: ProgressFn | None = None,
) -> ReplayReport:
    """Replay the projection from position 0 into a shadow schema while the service
    keeps serving, then either swap it in (the checkpoint row moves with it) or, with
    `verify`, compare it with the live tables at the live checkpoint and drop it."""
    spec = projection(name)
    shadow = f"replay_{spec.name}"
    async with pool.acquire() as conn, _replay_lock(conn, spec):
        tables = await _copy_tables(conn, spec, shadow)
        try:
            # Verify compares at the live checkpoint, so never read past it.
            async def bound() -> Checkpoint:
                if verify:
                    return await runner.load_checkpoint(conn, spec.name)
                return await eventstore.head(conn)

            events, reached = await _bulk(
                conn, spec, shadow, Checkpoint(), bound, batch_size, on_progress
            )
            for attempt in range(10):
                try:
                    return await _finish(
                        conn,
                        spec,
                        shadow,
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
        more, reached = await _apply_range(conn, spec, shadow, reached, target)
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
        await conn.execute(f"LOCK TABLE {qualified} IN ACCESS EXCLUSIVE MODE")
        await conn.execute(f"DROP SCHEMA IF EXISTS {retired} CASCADE")
        await conn.execute(f"CREATE SCHEMA {retired}")
        for table in tables:
            await conn.execute(
                f"ALTER TABLE public.{_ident(table)} SET SCHEMA {retired}"
            )
            await conn.execute(
                f"ALTER TABLE {shadow}.{_ident(table)} SET SCHEMA public"
            )
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
    batch_size: int = 2000,
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
    async with pool.acquire() as conn:
        if isinstance(at, int):
            row = await conn.fetchrow(
                "SELECT tx_id, global_position, recorded_at FROM events"
                " WHERE global_position <= $1 ORDER BY global_position DESC LIMIT 1",
                at,
            )
            if row is None:
                raise ReplayError(f"the log has no event at or before position {at}")
            target = Checkpoint(int(row["tx_id"]), row["global_position"])
            as_of = row["recorded_at"]
        else:
            target, as_of = await eventstore.head(conn), at
        tables = await _copy_tables(conn, spec, schema)
        until = at if isinstance(at, datetime) else None

        async def bound() -> Checkpoint:
            return target

        try:
            events, reached = await _bulk(
                conn, spec, schema, Checkpoint(), bound, batch_size, on_progress, until
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
        await _use(conn, schema)
        return {
            "customers": await governance.list_customers(conn, now),
            "teams": await governance.list_teams(conn, now),
            "virtual_keys": await governance.list_virtual_keys(conn, now),
            "budgets": await governance.list_budgets(conn, now),
        }


# --- the bulk phase ----------------------------------------------------------------


async def _bulk(
    conn: Connection,
    spec: Projection,
    schema: str,
    start: Checkpoint,
    bound: Callable[[], Awaitable[Checkpoint]],
    batch_size: int,
    on_progress: ProgressFn | None,
    until: datetime | None = None,
) -> tuple[int, Checkpoint]:
    """Apply batches until `bound()` is reached, each in its own short transaction
    (a long one would hold back vacuum and the tailing readers' horizon); returns
    (events applied, checkpoint reached)."""
    events, reached = 0, start
    while True:
        target = await bound()
        async with conn.transaction():
            more, reached, full = await _apply_batch(
                conn, spec, schema, reached, target, batch_size, until
            )
        events += more
        if on_progress:
            on_progress(events, reached.position)
        if not full:
            return events, reached


async def _apply_range(
    conn: Connection,
    spec: Projection,
    schema: str,
    start: Checkpoint,
    target: Checkpoint,
    batch_size: int = 5000,
) -> tuple[int, Checkpoint]:
    """Apply everything up to `target` inside the caller's transaction."""
    events, reached = 0, start
    full = True
    while full:
        more, reached, full = await _apply_batch(
            conn, spec, schema, reached, target, batch_size, None
        )
        events += more
    return events, reached


async def _apply_batch(
    conn: Connection,
    spec: Projection,
    schema: str,
    after: Checkpoint,
    target: Checkpoint,
    batch_size: int,
    until: datetime | None,
) -> tuple[int, Checkpoint, bool]:
    """One read and apply; returns (events applied, checkpoint, whether to go on)."""
    await _use(conn, schema)
    await conn.execute("SELECT set_config('synchronous_commit', 'off', true)")
    records = await eventstore.read_all(conn, after, batch_size)
    page = [r for r in records if not _after(r.checkpoint, target)]
    if not page:
        return 0, after, False
    chosen: Sequence[RecordedEvent] = page
    if until is not None:
        chosen = [r for r in page if r.recorded_at <= until]
    if chosen:
        await spec.apply(conn, chosen)
    return len(chosen), page[-1].checkpoint, len(page) == len(records) == batch_size


def _after(a: Checkpoint, b: Checkpoint) -> bool:
    return (a.tx_id, a.position) > (b.tx_id, b.position)


async def _use(conn: Connection, schema: str) -> None:
    """Unqualified names resolve in `schema` first, for this transaction only."""
    await conn.execute(
        "SELECT set_config('search_path', $1, true)", f"{schema}, public"
    )


# --- copying the live tables' shape ------------------------------------------------

_TABLES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind = 'r' AND starts_with(c.relname, $1)
ORDER BY c.relname
"""
# Printed while search_path is only `public`, so references come out unqualified and
# bind to the copies when replayed with the copy's schema first.
_CONSTRAINTS = """
SELECT t.relname, c.conname, pg_get_constraintdef(c.oid) AS definition
FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = 'public' AND t.relname = ANY($1::text[])
  AND c.contype IN ('p', 'u', 'x', 'c', 'f')
ORDER BY position(c.contype IN 'puxcf'), t.relname, c.conname
"""
_INDEXES = """
SELECT t.relname, pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = 'public' AND t.relname = ANY($1::text[])
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
ORDER BY t.relname
"""
_REFERENCED_FROM_OUTSIDE = """
SELECT c.conname FROM pg_constraint c
JOIN pg_class t ON t.oid = c.conrelid JOIN pg_class r ON r.oid = c.confrelid
JOIN pg_namespace n ON n.oid = r.relnamespace
WHERE c.contype = 'f' AND n.nspname = 'public' AND r.relname = ANY($1::text[])
  AND NOT (t.relnamespace = r.relnamespace AND t.relname = ANY($1::text[]))
"""


async def _copy_tables(conn: Connection, spec: Projection, schema: str) -> list[str]:
    """(Re)create `schema` with empty copies of the projection's live tables."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('search_path', 'public', true)")
        tables = [r["relname"] for r in await conn.fetch(_TABLES, spec.prefix)]
        if not tables:
            raise ReplayError(f"no tables named {spec.prefix}* in schema public")
        outside = await conn.fetch(_REFERENCED_FROM_OUTSIDE, tables)
        if outside:
            names = ", ".join(r["conname"] for r in outside)
            raise ReplayError(f"other tables reference the projection's: {names}")
        constraints = await conn.fetch(_CONSTRAINTS, tables)
        indexes = await conn.fetch(_INDEXES, tables)
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.execute(f"CREATE SCHEMA {schema}")
        await _use(conn, schema)
        for table in tables:
            await conn.execute(
                f"CREATE TABLE {schema}.{_ident(table)} (LIKE public.{_ident(table)}"
                " INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING IDENTITY"
                " INCLUDING STORAGE)"
            )
        for c in constraints:
            await conn.execute(
                f"ALTER TABLE {schema}.{_ident(c['relname'])}"
                f" ADD CONSTRAINT {_ident(c['conname'])} {c['definition']}"
            )
        for i in indexes:
            definition = _retarget_index(i["definition"], i["relname"], schema)
            await conn.execute(definition)
    return tables


def _retarget_index(definition: str, table: str, schema: str) -> str:
    """`CREATE INDEX name ON public.t USING …` → the same index on `schema`.t."""
    name = f"{re.escape(_ident(table))}|{re.escape(table)}"
    pattern = rf" ON (ONLY )?(public\.)?({name}) USING "
    retargeted, found = re.subn(
        pattern, f" ON {schema}.{_ident(table)} USING ", definition, count=1
    )
    if not found:
        raise ReplayError(f"cannot copy index: {definition}")
    return retargeted


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- comparing ---------------------------------------------------------------------

_COLUMNS = """
SELECT a.attname, a.attidentity <> '' AS is_identity
FROM pg_attribute a
WHERE a.attrelid = format('public.%I', $1::text)::regclass
  AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
# Single-column foreign keys to an identity column, and the referenced table's first
# unique constraint: the natural key that stands in for the surrogate id.
_IDENTITY_REFERENCES = """
SELECT a.attname AS column, r.relname AS referenced, ra.attname AS referenced_column,
    (SELECT array_agg(ua.attname ORDER BY ua.attnum)
     FROM pg_constraint u JOIN pg_attribute ua
       ON ua.attrelid = u.conrelid AND ua.attnum = ANY(u.conkey)
     WHERE u.conrelid = r.oid AND u.contype = 'u'
       AND u.oid = (SELECT min(u2.oid) FROM pg_constraint u2
                    WHERE u2.conrelid = r.oid AND u2.contype = 'u')) AS natural_key
FROM pg_constraint c
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
JOIN pg_class r ON r.oid = c.confrelid
JOIN pg_attribute ra ON ra.attrelid = c.confrelid AND ra.attnum = c.confkey[1]
WHERE c.conrelid = format('public.%I', $1::text)::regclass AND c.contype = 'f'
  AND cardinality(c.conkey) = 1 AND ra.attidentity <> ''
"""


async def _row_expression(conn: Connection, table: str) -> tuple[str, list[str]]:
    """A jsonb expression of a row of `table` (alias t, schema {schema}) without its
    identity columns, references to identity columns replaced by natural keys; and
    the columns that identify a row for pairing (its primary key, else all)."""
    columns = await conn.fetch(_COLUMNS, table)
    references = {
        r["column"]: r
        for r in await conn.fetch(_IDENTITY_REFERENCES, table)
        if r["natural_key"]
    }
    pairs: list[str] = []
    for column in columns:
        name = column["attname"]
        if column["is_identity"]:
            continue
        ref = references.get(name)
        if ref is None:
            pairs.append(f"{_literal(name)}, t.{_ident(name)}")
            continue
        natural = ", ".join(f"{_literal(k)}, r.{_ident(k)}" for k in ref["natural_key"])
        pairs.append(
            f"{_literal(name)}, (SELECT jsonb_build_object({natural})"
            f" FROM {{schema}}.{_ident(ref['referenced'])} r"
            f" WHERE r.{_ident(ref['referenced_column'])} = t.{_ident(name)})"
        )
    key = await conn.fetchval(
        "SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_constraint c"
        " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)"
        " WHERE c.conrelid = format('public.%I', $1::text)::regclass"
        " AND c.contype = 'p' AND a.attidentity = ''",
        table,
    )
    return f"jsonb_build_object({', '.join(pairs)})", list(key or [])


async def compare(
    conn: Connection,
    tables: Sequence[str],
    live: str,
    replayed: str,
    *,
    shown: int = 20,
) -> list[TableDiff]:
    """Rows that differ between two schemas' copies of `tables`, as a multiset."""
    diffs: list[TableDiff] = []
    for table in tables:
        expression, key = await _row_expression(conn, table)
        side = {
            schema: f"SELECT {expression.format(schema=schema)} AS row"
            f" FROM {schema}.{_ident(table)} t"
            for schema in (live, replayed)
        }
        only: dict[str, list[dict[str, Any]]] = {}
        counts: dict[str, int] = {}
        for one, other in ((live, replayed), (replayed, live)):
            rows = await conn.fetch(
                f"SELECT row::text, count(*) OVER () AS n FROM"
                f" ({side[one]} EXCEPT ALL {side[other]}) AS d ORDER BY 1 LIMIT $1",
                shown,
            )
            only[one] = [_decode_row(r["row"]) for r in rows]
            counts[one] = rows[0]["n"] if rows else 0
        if counts[live] or counts[replayed]:
            diffs.append(
                TableDiff(
                    table=table,
                    missing=counts[live],
                    extra=counts[replayed],
                    lines=_diff_lines(only[live], only[replayed], key),
                )
            )
    return diffs


async def snapshot(
    conn: Connection, tables: Sequence[str], schema: str
) -> dict[str, list[str]]:
    """Every row of `tables` in `schema`, as compared (sorted JSON): for equality
    checks across databases, where `compare` cannot reach."""
    out: dict[str, list[str]] = {}
    for table in tables:
        expression, _key = await _row_expression(conn, table)
        rows = await conn.fetch(
            f"SELECT {expression.format(schema=schema)}::text AS row"
            f" FROM {schema}.{_ident(table)} t ORDER BY 1"
        )
        out[table] = [r["row"] for r in rows]
    return out


async def tables_of(conn: Connection, name: str = "governance") -> list[str]:
    """The live tables of a projection."""
    return [r["relname"] for r in await conn.fetch(_TABLES, projection(name).prefix)]


def _diff_lines(
    live: list[dict[str, Any]], replayed: list[dict[str, Any]], key: list[str]
) -> list[str]:
    """Rows paired by key show their differing columns; the rest show whole."""

    def ident(row: dict[str, Any]) -> tuple[str, ...]:
        return tuple(str(row.get(k)) for k in key)

    by_key = {ident(r): r for r in replayed} if key else {}
    lines: list[str] = []
    paired: set[tuple[str, ...]] = set()
    for row in live:
        other = by_key.get(ident(row))
        if other is None:
            lines.append(f"- live only:   {_json(row)}")
            continue
        paired.add(ident(row))
        changed = [
            f"{c}: live {_json(row.get(c))} != replay {_json(other.get(c))}"
            for c in sorted(set(row) | set(other))
            if row.get(c) != other.get(c)
        ]
        where = ", ".join(f"{k}={row.get(k)}" for k in key)
        lines.append(f"~ {where}: " + "; ".join(changed))
    lines.extend(
        f"+ replay only: {_json(r)}" for r in replayed if ident(r) not in paired
    )
    return lines


_decode_row = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal).decode
_encode_value = msgspec.json.Encoder(decimal_format="number").encode


def _json(value: Any) -> str:
    return _encode_value(value).decode()


def render(diffs: Sequence[TableDiff]) -> str:
    """The readable diff of `compare`."""
    out: list[str] = []
    for d in diffs:
        out.append(
            f"{d.table}: {d.missing} row(s) only live, {d.extra} only in the replay"
        )
        out.extend(f"  {line}" for line in d.lines)
    return "\n".join(out)
