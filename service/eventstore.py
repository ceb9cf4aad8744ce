"""The event log: append with optimistic concurrency and idempotency, gap-safe reads.

Every SQL statement on `events` lives here: appends, ingest's COPY, reads, the gap-safe
tail, import's appends as given and the audited rewrite's one UPDATE.
Tailing readers only take rows whose writing transaction is below the snapshot xmin
and order by (tx_id, global_position), so an event whose transaction commits late is
delivered late, never skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import reduce
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from service.domain import upcast
from service.domain.events import (
    EVENT_TYPES,
    AnyEvent,
    UsageCharge,
    UsageRecorded,
    type_name,
)
from service.errors import IdempotencyConflict, LegacyEventRefused, VersionConflict
from service.records import (
    Appended,
    Batch,
    Checkpoint,
    Envelope,
    NewEvent,
    RecordedEvent,
    Refused,
    envelope,
)

# One connection, pooled or not (what a transaction runs on).
Connection = asyncpg.Connection | PoolConnectionProxy
# Anything a query runs on: a pool, a pooled connection or a plain one.
Queryable = asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy

# The database cannot be reached (down, restarting, refusing connections, or the
# connection dropped mid-request): a 503 the client may retry, never a 500.
UNREACHABLE: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)

_encode = msgspec.json.Encoder().encode
_decode_metadata = msgspec.json.Decoder(dict[str, Any]).decode
_DECODERS = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}


# --- codec -------------------------------------------------------------------------


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb travels as raw JSON bytes both ways: msgspec encodes and decodes it."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        format="binary",
        encoder=_jsonb_encode,
        decoder=_jsonb_decode,
    )


def _jsonb_encode(value: bytes | Any) -> bytes:
    return b"\x01" + (value if isinstance(value, bytes) else _encode(value))


def _jsonb_decode(value: bytes) -> bytes:
    return bytes(value[1:])


async def create_pool(dsn: str, **kwargs: Any) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, init=init_connection, **kwargs)
    assert pool is not None
    return pool


def encode_event(event: AnyEvent) -> bytes:
    """The `data` column of an event: its fields without the tag, money as strings."""
    return _encode(msgspec.structs.asdict(event))


def decode_event(type_: str, schema_version: int, data: bytes) -> AnyEvent:
    """Decode a stored event, upcasting a legacy schema version on the way."""
    cls = EVENT_TYPES.get(type_)
    if cls is not None and schema_version == cls.schema_version:
        return _DECODERS[type_].decode(data)
    name, current = upcast.upcast(type_, schema_version, upcast.decode_legacy(data))
    return msgspec.convert(current, EVENT_TYPES[name], strict=False)


def record_of(row: asyncpg.Record) -> RecordedEvent:
    event = decode_event(row["type"], row["schema_version"], row["data"])
    return RecordedEvent(
        global_position=row["global_position"],
        tx_id=row["tx_id"],
        event_id=str(row["event_id"]),
        stream_id=row["stream_id"],
        stream_version=row["stream_version"],
        schema_version=type(event).schema_version,
        event=event,
        metadata=_decode_metadata(row["metadata"]),
        recorded_at=row["recorded_at"],
    )


# --- append ------------------------------------------------------------------------

_APPEND = "SELECT * FROM append_events($1, $2, $3, $4, $5, $6, $7, $8)"


async def append(
    conn: Queryable,
    stream_id: str,
    expected_version: int | None,
    events: Sequence[NewEvent],
    *,
    recorded_at: datetime | None = None,
) -> list[Appended]:
    """Append to one stream in one statement (its own transaction unless inside one).

    `expected_version`: None = any, 0 = the stream must be new, n = exactly n.
    A retry with the same event ids returns the original positions marked duplicate.
    """
    try:
        rows = await conn.fetch(
            _APPEND,
            stream_id,
            expected_version,
            [e.event_id for e in events],
            [type_name(e.event) for e in events],
            [type(e.event).schema_version for e in events],
            [encode_event(e.event) for e in events],
            [_encode(e.metadata) for e in events],
            recorded_at,
        )
    except asyncpg.PostgresError as exc:
        raise _translate(exc, stream_id) from exc
    return [
        Appended(
            stream_version=r["stream_version"],
            global_position=r["global_position"],
            recorded_at=r["recorded_at"],
            duplicate=r["duplicate"],
        )
        for r in rows
    ]


def _translate(exc: asyncpg.PostgresError, stream_id: str) -> Exception:
    state = exc.sqlstate
    constraint = getattr(exc, "constraint_name", None)
    if state == "GL001" or constraint == "events_stream_version_key":
        return VersionConflict(f"{stream_id} was changed by someone else; reload it")
    if state == "GL002" or constraint == "events_event_id_key":
        return IdempotencyConflict(
            f"an event id of this append to {stream_id} was already used elsewhere"
        )
    return exc


# --- usage ingest: the group-commit writer's statements -------------------------

# Usage streams are unversioned: a usage row's stream_version is its position.
USAGE_COLUMNS = (
    "global_position",
    "stream_version",
    "event_id",
    "stream_id",
    "type",
    "schema_version",
    "data",
    "metadata",
)


async def position_sequence(conn: Queryable) -> str:
    """The statement that draws n positions of the log in one round trip."""
    sequence: str = await conn.fetchval(
        "SELECT pg_get_serial_sequence('events', 'global_position')"
    )
    return (
        f"SELECT array_agg(nextval({_literal(sequence)}::regclass))"
        " FROM generate_series(1, $1)"
    )


def _literal(text: str) -> str:
    """`text` as an SQL string literal (for a catalog name from the server itself)."""
    return "'" + text.replace("'", "''") + "'"


async def draw_positions(conn: Queryable, statement: str, count: int) -> list[int]:
    """`count` fresh positions, in the order drawn (`statement`: position_sequence)."""
    drawn: list[int] = await conn.fetchval(statement, count)
    return drawn


async def copy_usage(conn: Connection, records: Sequence[tuple[Any, ...]]) -> None:
    """One binary COPY of usage rows (USAGE_COLUMNS); all or nothing."""
    await conn.copy_records_to_table("events", records=records, columns=USAGE_COLUMNS)


async def stored_positions(conn: Queryable, event_ids: Sequence[Any]) -> dict[int, int]:
    """The positions of the events already stored under these ids (uuid.int keys)."""
    rows = await conn.fetch(
        "SELECT event_id, global_position FROM events WHERE event_id = ANY($1::uuid[])",
        event_ids,
    )
    return {r["event_id"].int: r["global_position"] for r in rows}


# --- read --------------------------------------------------------------------------

_COLUMNS = (
    "global_position, tx_id, event_id, stream_id, stream_version, type,"
    " schema_version, data, metadata, recorded_at"
)


async def read_stream(
    conn: Queryable, stream_id: str
) -> tuple[int, list[RecordedEvent]]:
    """A stream's version and its events in order (version 0: no such stream)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM events WHERE stream_id = $1 ORDER BY stream_version",
        stream_id,
    )
    events = [record_of(r) for r in rows]
    return (events[-1].stream_version if events else 0), events


_READ_ALL = f"""
SELECT {_COLUMNS} FROM events
WHERE (tx_id, global_position) > ($1::xid8, $2::bigint)
  AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY tx_id, global_position
LIMIT $3
"""


async def read_all(
    conn: Queryable, after: Checkpoint, limit: int = 500
) -> list[RecordedEvent]:
    """The next events after a checkpoint, only from finished transactions."""
    rows = await conn.fetch(_READ_ALL, after.tx_id, after.position, limit)
    return [record_of(r) for r in rows]


async def read_batch(conn: Queryable, after: Checkpoint, limit: int = 500) -> Batch:
    """`read_all` for projectors: a legacy row with no current form (upcast refuses
    it) is returned as refused instead of failing the whole read."""
    rows = await conn.fetch(_READ_ALL, after.tx_id, after.position, limit)
    records: list[RecordedEvent] = []
    refused: list[Refused] = []
    for row in rows:
        read = record_or_refused(row)
        if isinstance(read, Refused):
            refused.append(read)
        else:
            records.append(read)
    end = Checkpoint(rows[-1]["tx_id"], rows[-1]["global_position"]) if rows else after
    return Batch(records=records, refused=refused, end=end)


def record_or_refused(row: asyncpg.Record) -> RecordedEvent | Refused:
    """A row's record, or its refusal when it is a legacy event with no current
    form (upcast refuses it): readers pass over a refused row, never fail on it."""
    try:
        return record_of(row)
    except LegacyEventRefused as exc:
        return refused_of(row, exc)


def refused_of(row: asyncpg.Record, exc: LegacyEventRefused) -> Refused:
    return Refused(
        global_position=row["global_position"],
        tx_id=row["tx_id"],
        event_id=str(row["event_id"]),
        stream_id=row["stream_id"],
        type=row["type"],
        schema_version=row["schema_version"],
        code=exc.code,
        message=exc.message,
    )


# The next rows of the log as the folds read them in bulk (the cache's tail, the read
# model's replay), with `_READ_ALL`'s gap-safe rule as is (only rows of finished
# transactions, in (tx_id, position) order). `data` comes as text (decoded in C:
# msgspec takes str as it takes bytes), and a current usage row, which a fold
# decodes from `data` alone (`decode_usage`), comes without its event id and
# metadata (NULL: no decoding at all). Any other row is whole for `record_of`.
_READ_ROWS = """
SELECT global_position, tx_id, stream_id, stream_version, type, schema_version,
       data::text AS data, recorded_at,
       CASE WHEN type = $4 AND schema_version = $5 THEN NULL ELSE event_id END
           AS event_id,
       CASE WHEN type = $4 AND schema_version = $5 THEN NULL ELSE metadata END
           AS metadata
FROM events
WHERE (tx_id, global_position) > ($1::xid8, $2::bigint)
  AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY tx_id, global_position
LIMIT $3
"""
USAGE = UsageRecorded.__struct_config__.tag
USAGE_VERSION = UsageRecorded.schema_version
decode_usage = msgspec.json.Decoder(UsageCharge).decode


async def read_rows(
    conn: Queryable, after: Checkpoint, limit: int
) -> list[asyncpg.Record]:
    """The next rows after `after`, as bulk folds read them (`_READ_ROWS`)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _READ_ROWS, after.tx_id, after.position, limit, USAGE, USAGE_VERSION
    )
    return rows


def usages_of(rows: Sequence[asyncpg.Record]) -> list[UsageCharge | None]:
    """Each `read_rows` row's usage (a current usage record, read without its event
    id and metadata), decoded only into what it charges; None for any other row
    (whole for `record_or_refused`). One pass: the bulk folds' hot loop."""
    decode = decode_usage
    return [
        decode(row["data"])
        if row["type"] == USAGE and row["schema_version"] == USAGE_VERSION
        else None
        for row in rows
    ]


def place_of(row: asyncpg.Record) -> Checkpoint:
    """Where a row read from the log sits."""
    return Checkpoint(row["tx_id"], row["global_position"])


async def read_all_rows(
    conn: Queryable, after: Checkpoint, limit: int = 500
) -> list[asyncpg.Record]:
    """`read_all` without decoding, for bulk readers that decode themselves."""
    return await conn.fetch(_READ_ALL, after.tx_id, after.position, limit)


# A page reads below the snapshot xmin (a later commit never fills a gap before a
# page's end), so a transaction open since before the newest commit (a projector's
# batch, a slower append) hides events already acknowledged. A page first waits, at
# most SETTLE_WAIT_S, until every event committed before it was asked for reads
# below the horizon: what was acknowledged is listed.
SETTLE_WAIT_S = 1.0
_NEWEST = "SELECT max(tx_id), pg_snapshot_xmin(pg_current_snapshot()) FROM events"
_HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())"


async def settle(conn: Queryable, at_most_s: float) -> bool:
    """Wait until every event committed before the call reads below the gap-safe
    horizon (True), or until `at_most_s` passed (False: an older transaction is
    still open)."""
    row = await conn.fetchrow(_NEWEST)
    assert row is not None
    newest, horizon = row
    if newest is None or newest < horizon:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + at_most_s
    pause = 0.001
    while (remaining := deadline - loop.time()) > 0:
        await asyncio.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.02)
        if newest < await conn.fetchval(_HORIZON):
            return True
    return False


async def read_page(
    conn: Queryable, *, after: int, limit: int, stream_id: str | None = None
) -> list[Envelope]:
    """Events by position for inspection (GET /api/events): committed ones only,
    upcast on read, every event committed before the call among them (`settle`); a
    legacy event with no current form as it is stored."""
    await settle(conn, SETTLE_WAIT_S)
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM events
        WHERE global_position > $1 AND ($3::text IS NULL OR stream_id = $3)
          AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY global_position LIMIT $2
        """,
        after,
        limit,
        stream_id,
    )
    page: list[Envelope] = []
    for row in rows:
        try:
            page.append(envelope(record_of(row)))
        except LegacyEventRefused:
            page.append(_stored_envelope(row))
    return page


def _stored_envelope(row: asyncpg.Record) -> Envelope:
    return Envelope(
        global_position=row["global_position"],
        event_id=str(row["event_id"]),
        stream_id=row["stream_id"],
        stream_version=row["stream_version"],
        type=row["type"],
        schema_version=row["schema_version"],
        data=_decode_metadata(row["data"]),
        metadata=_decode_metadata(row["metadata"]),
        recorded_at=row["recorded_at"],
    )


async def head(conn: Queryable) -> Checkpoint:
    """The last safely readable (tx_id, position): what a reader has to reach."""
    row = await conn.fetchrow(
        """
        SELECT tx_id, global_position FROM events
        WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY tx_id DESC, global_position DESC LIMIT 1
        """
    )
    return Checkpoint(row["tx_id"], row["global_position"]) if row else Checkpoint()


async def read_event_of(
    conn: Queryable, type_: str, event_ids: Sequence[str]
) -> RecordedEvent | None:
    """The first event of type `type_` stored under one of `event_ids`, if any (an
    event of another type under such an id is not it)."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM events WHERE event_id = ANY($1::uuid[])"
        " AND type = $2 ORDER BY global_position LIMIT 1",
        list(event_ids),
        type_,
    )
    return None if row is None else record_of(row)


async def checkpoint_of(conn: Queryable, position: int) -> Checkpoint | None:
    """The checkpoint of the event at `position` (None: no such event, or not yet
    committed)."""
    tx_id = await conn.fetchval(
        "SELECT tx_id FROM events WHERE global_position = $1", position
    )
    return None if tx_id is None else Checkpoint(int(tx_id), position)


async def last_at_or_before(
    conn: Queryable, position: int
) -> tuple[Checkpoint, datetime] | None:
    """The checkpoint and recorded_at of the last event at or before `position`."""
    row = await conn.fetchrow(
        "SELECT tx_id, global_position, recorded_at FROM events"
        " WHERE global_position <= $1 ORDER BY global_position DESC LIMIT 1",
        position,
    )
    if row is None:
        return None
    return Checkpoint(int(row["tx_id"]), row["global_position"]), row["recorded_at"]


async def high_water(conn: Queryable, checkpoint: Checkpoint) -> int:
    """The highest position at or before `checkpoint` in commit order: an event drawn
    after the checkpoint's own, in an earlier transaction, comes before it."""
    return int(
        await conn.fetchval(
            "SELECT coalesce(max(global_position), $2::bigint) FROM events"
            " WHERE global_position > $2::bigint AND tx_id < $1::xid8",
            checkpoint.tx_id,
            checkpoint.position,
        )
    )


async def max_position(conn: Queryable) -> int:
    return int(
        await conn.fetchval("SELECT coalesce(max(global_position), 0) FROM events")
    )


# Every stream whose entity events ever named a customer (or a team). The key and the
# type list are literals, not parameters: the partial indexes of migration 0004 serve
# exactly these statements.
_STREAMS_NAMING = {
    "customer_id": """
SELECT DISTINCT stream_id FROM events
WHERE type IN ('TeamCreated', 'TeamUpdated', 'VirtualKeyCreated', 'VirtualKeyUpdated')
  AND data ->> 'customer_id' = $1
ORDER BY stream_id
""",
    "team_id": """
SELECT DISTINCT stream_id FROM events
WHERE type IN ('VirtualKeyCreated', 'VirtualKeyUpdated') AND data ->> 'team_id' = $1
ORDER BY stream_id
""",
}


async def streams_naming(
    conn: Queryable, field: Literal["customer_id", "team_id"], value: str
) -> list[str]:
    """The streams whose events ever set `field` to `value`, ordered by stream id;
    folding each tells whether it still does."""
    return [r["stream_id"] for r in await conn.fetch(_STREAMS_NAMING[field], value)]


# --- commands ----------------------------------------------------------------------

S = TypeVar("S")
C = TypeVar("C")


class Executed(NamedTuple, Generic[S]):
    """A stream after a command: its state and every event with its recorded_at."""

    state: S | None
    timeline: list[tuple[AnyEvent, datetime]]
    version: int
    position: int  # of the stream's last event, appended now or before


async def execute(
    conn: Queryable,
    stream_id: str,
    command: C,
    decide: Callable[[C, S | None], Sequence[AnyEvent]],
    evolve: Callable[[S | None, AnyEvent], S | None],
    *,
    recorded_at: datetime,
    expected_version: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> Executed[S]:
    """Load the stream, decide, append with optimistic concurrency.

    `decide` is pure, so a caller may retry a VersionConflict when the client sent no
    If-Match. An entity that does not exist is decide's 404, whatever If-Match says.
    """
    version, history = await read_stream(conn, stream_id)
    state = reduce(evolve, (r.event for r in history), None)
    if state is not None and expected_version not in (None, version):
        raise VersionConflict(
            f"{stream_id} is at version {version}, not {expected_version}"
        )
    events = decide(command, state)
    timeline = [(r.event, r.recorded_at) for r in history]
    if not events:
        position = history[-1].global_position if history else 0
        return Executed(state, timeline, version, position)
    appended = await append(
        conn,
        stream_id,
        version,
        [NewEvent(event=e, metadata=metadata or {}) for e in events],
        recorded_at=recorded_at,
    )
    timeline += [(e, a.recorded_at) for e, a in zip(events, appended, strict=True)]
    return Executed(
        reduce(evolve, events, state),
        timeline,
        appended[-1].stream_version,
        appended[-1].global_position,
    )


# --- the audited rewrite (service.rewrite): the one UPDATE the log allows -----------

# Rows whose "type:schema_version" is one of the legacy keys given.
_LEGACY = "type || ':' || schema_version = ANY($2::text[])"

_LEGACY_ROWS = f"""
SELECT global_position, event_id, type, schema_version, data FROM events
WHERE global_position > $1 AND {_LEGACY}
ORDER BY global_position LIMIT $3
"""

_LOWEST_LEGACY = f"""
SELECT min(global_position) FROM events WHERE global_position <= $1 AND {_LEGACY}
"""

_ARCHIVE = """
INSERT INTO event_archive
    (event_id, run_id, global_position, type, schema_version, data, metadata)
SELECT event_id, $1::uuid, global_position, type, schema_version, data, metadata
FROM events WHERE event_id = ANY($2::uuid[])
ON CONFLICT DO NOTHING
"""

# The stamp is built from the old row (SET expressions see it); `at` is the batch's
# transaction time in UTC, whatever the session's time zone.
_REWRITE = """
UPDATE events AS e
SET type = u.to_type, schema_version = u.to_version, data = u.data,
    metadata = e.metadata || jsonb_build_object('upcast', jsonb_build_object(
        'run', $1::text, 'from_type', e.type, 'from_version', e.schema_version,
        'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))
FROM unnest($2::uuid[], $3::text[], $4::smallint[], $5::text[], $6::smallint[],
            $7::jsonb[])
     AS u(event_id, from_type, from_version, to_type, to_version, data)
WHERE e.event_id = u.event_id AND e.type = u.from_type
  AND e.schema_version = u.from_version
"""


async def legacy_rows(
    conn: Queryable, after: int, keys: Sequence[str], limit: int, *, lock: bool = False
) -> list[asyncpg.Record]:
    """Legacy rows after `after` by position (`keys`: "type:version"), locked for
    the rewrite's transaction with `lock`."""
    return await conn.fetch(
        _LEGACY_ROWS + (" FOR UPDATE" if lock else ""), after, list(keys), limit
    )


async def lowest_legacy(conn: Queryable, up_to: int, keys: Sequence[str]) -> int | None:
    position: int | None = await conn.fetchval(_LOWEST_LEGACY, up_to, list(keys))
    return position


async def archive(conn: Connection, run_id: str, event_ids: Sequence[str]) -> None:
    """Keep the original rows of a rewrite batch (the trigger insists on it)."""
    await conn.execute(_ARCHIVE, run_id, list(event_ids))


async def rewrite_in_place(
    conn: Connection,
    run_id: str,
    event_ids: Sequence[str],
    from_types: Sequence[str],
    from_versions: Sequence[int],
    to_types: Sequence[str],
    to_versions: Sequence[int],
    data: Sequence[bytes],
) -> int:
    """Replace legacy rows by their current form, stamped with the run; identity
    columns never change. Returns how many rows were rewritten."""
    status = await conn.execute(
        _REWRITE,
        run_id,
        list(event_ids),
        list(from_types),
        list(from_versions),
        list(to_types),
        list(to_versions),
        list(data),
    )
    return int(status.rsplit(" ", 1)[-1])


# --- import (service.transfer): events appended as given ----------------------------

_STORED = """
SELECT event_id, stream_id, stream_version, type, schema_version, data, metadata,
    recorded_at
FROM events WHERE event_id = ANY($1::uuid[])
"""
_NEXT_POSITIONS = """
SELECT nextval(pg_get_serial_sequence('events', 'global_position'))
FROM generate_series(1, $1)
"""
_INSERT_AS_GIVEN = """
INSERT INTO events (global_position, event_id, stream_id, stream_version, type,
                    schema_version, data, metadata, recorded_at)
SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::text[],
                     $6::smallint[], $7::jsonb[], $8::jsonb[], $9::timestamptz[])
"""


async def stored_rows(
    conn: Queryable, event_ids: Sequence[Any]
) -> list[asyncpg.Record]:
    """The stored rows of these event ids (raw: the caller decodes)."""
    return await conn.fetch(_STORED, list(event_ids))


async def next_positions(conn: Queryable, count: int) -> list[int]:
    """`count` fresh positions, ascending."""
    return sorted(r[0] for r in await conn.fetch(_NEXT_POSITIONS, count))


async def insert_as_given(
    conn: Connection,
    positions: Sequence[int],
    event_ids: Sequence[Any],
    stream_ids: Sequence[str],
    stream_versions: Sequence[int],
    types: Sequence[str],
    schema_versions: Sequence[int],
    data: Sequence[bytes],
    metadata: Sequence[bytes],
    recorded_at: Sequence[datetime],
) -> None:
    """Rows exactly as an import gives them (ids, types, versions, recorded_at)."""
    await conn.execute(
        _INSERT_AS_GIVEN,
        list(positions),
        list(event_ids),
        list(stream_ids),
        list(stream_versions),
        list(types),
        list(schema_versions),
        list(data),
        list(metadata),
        list(recorded_at),
    )
