"""Export and import of the log as JSONL: one envelope of GET /api/events per line.

Export reads gap-safely by (tx_id, global_position) up to the head seen at its start,
a page at a time, upcast on read. Import appends envelopes as given (event_id, type,
schema_version, data, metadata, recorded_at, stream_id and stream_version kept; a
usage event's stream_version is its new global_position), a batch per transaction,
and is idempotent by event_id. A line is appended only if every read of it will
succeed: a legacy event through the one strict decoding of the upcaster (converted
when a legacy value has an exact current equivalent, refused otherwise), a current
one checked against the rules its command or ingest would have met, and every instant
in range (`recorded_at`, a usage event's `occurred_at`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import IO, Annotated, Any

import asyncpg
import msgspec

from service import eventstore
from service.domain import upcast, usage
from service.domain.events import (
    EVENT_TYPES,
    AnyEvent,
    CustomerEvent,
    TeamEvent,
    UsageRecorded,
)
from service.errors import Invalid, LegacyEventRefused
from service.eventstore import Connection
from service.records import Checkpoint, envelope

# (lines or events handled so far, events appended so far)
ProgressFn = Callable[[int, int], None]

_encode_line = msgspec.json.Encoder(decimal_format="number").encode
_encode = msgspec.json.encode
_decode_metadata = msgspec.json.Decoder(dict[str, Any]).decode


# --- export ------------------------------------------------------------------------


async def export(
    pool: asyncpg.Pool,
    out: IO[bytes],
    *,
    page_size: int = 5000,
    on_progress: ProgressFn | None = None,
) -> int:
    """Write every event committed before the call to `out` (up to the head, once
    they read below the gap-safe horizon: `eventstore.settle`); returns how many."""
    written = 0
    async with pool.acquire() as conn:
        await eventstore.settle(conn, eventstore.SETTLE_WAIT_S)
        target = await eventstore.head(conn)
        after = Checkpoint()
        while _before(after, target):
            records = await eventstore.read_all(conn, after, page_size)
            page = [r for r in records if not _before(target, r.checkpoint)]
            if not page:
                break
            out.write(b"".join(_encode_line(envelope(r)) + b"\n" for r in page))
            written += len(page)
            after = page[-1].checkpoint
            if on_progress:
                on_progress(written, written)
    return written


def _before(a: Checkpoint, b: Checkpoint) -> bool:
    return (a.tx_id, a.position) < (b.tx_id, b.position)


# --- import ------------------------------------------------------------------------


class Envelope(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One JSONL line; `global_position` is accepted and ignored."""

    event_id: uuid.UUID
    stream_id: Annotated[str, msgspec.Meta(min_length=1)]
    stream_version: Annotated[int, msgspec.Meta(ge=1)]
    type: str
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=32767)]
    data: msgspec.Raw
    metadata: dict[str, Any] = {}
    recorded_at: Annotated[datetime, msgspec.Meta(tz=True)]
    global_position: int | None = None


class Line(msgspec.Struct, frozen=True, kw_only=True):
    """A validated line: its envelope and the event it decodes to (upcast)."""

    number: int
    envelope: Envelope
    event: AnyEvent

    @property
    def is_usage(self) -> bool:
        return isinstance(self.event, UsageRecorded)


class ImportReport(msgspec.Struct, frozen=True, kw_only=True):
    lines: int
    appended: int
    present: int


class ImportFailed(Exception):
    """A line that cannot be imported; its batch was not written."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


_decode_envelope = msgspec.json.Decoder(Envelope).decode


def parse_line(number: int, raw: bytes, now: datetime) -> Line:
    """Validate one line: envelope shape, `recorded_at` in range (up to `now`), a
    known (type, schema_version) whose data decodes strictly (a legacy one through
    the upcaster) to an event that every read can take, and a stream that belongs to
    the event's owner."""
    try:
        env = _decode_envelope(raw)
    except msgspec.DecodeError as exc:
        raise ImportFailed(number, f"not a valid event envelope: {exc}") from None
    if not usage.is_in_range(env.recorded_at, now):
        raise ImportFailed(
            number,
            "recorded_at must lie between 2000-01-01T00:00:00Z and 5 minutes from"
            f" now, not {env.recorded_at.isoformat()}",
        )
    if env.type not in EVENT_TYPES and (env.type, env.schema_version) not in (
        upcast.STEPS
    ):
        raise ImportFailed(number, f"unknown event type {env.type!r}")
    try:
        event = decode_data(env.type, env.schema_version, env.data)
    except LegacyEventRefused as exc:
        raise ImportFailed(number, f"{exc.code}: {exc.message}") from None
    except (msgspec.DecodeError, upcast.UnknownSchema) as exc:
        raise ImportFailed(number, f"{env.type} v{env.schema_version}: {exc}") from None
    _check(number, env, event)
    expected = owner_stream(event)
    if env.stream_id != expected:
        raise ImportFailed(
            number,
            f"{env.type} of {expected} cannot be in stream {env.stream_id!r}",
        )
    return Line(number=number, envelope=env, event=event)


def _check(number: int, env: Envelope, event: AnyEvent) -> None:
    """A current event meets what its command or ingest would have checked (a legacy
    one did in the upcaster), so projecting it cannot fail."""
    if isinstance(event, UsageRecorded):
        rejection = usage.validate_recorded(event, env.recorded_at)
        if rejection is not None:
            raise ImportFailed(number, f"{rejection.code}: {rejection.message}")
        return
    try:
        upcast.check_values(event)
    except Invalid as exc:
        raise ImportFailed(
            number, f"{env.type} v{env.schema_version}: {exc.code}: {exc.message}"
        ) from None


def decode_data(type_: str, schema_version: int, data: bytes | msgspec.Raw) -> AnyEvent:
    """Strict and lossless: current data as typed, legacy data through the steps
    (LegacyEventRefused when it has no exact current form)."""
    cls = EVENT_TYPES.get(type_)
    if cls is not None and cls.schema_version == schema_version:
        return msgspec.json.decode(data, type=cls)
    return upcast.to_current(type_, schema_version, upcast.decode_legacy(data))


def owner_stream(event: AnyEvent) -> str:
    """The stream an event belongs in."""
    if isinstance(event, UsageRecorded):
        return f"usage-{event.virtual_key_id}"
    if isinstance(event, CustomerEvent):
        return f"customer-{event.customer_id}"
    if isinstance(event, TeamEvent):
        return f"team-{event.team_id}"
    return f"virtual_key-{event.virtual_key_id}"


_BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, which some editors write
# The longest envelope line read: the largest event a command can write (a key with
# 64 provider configs of 256 models of 256 characters) is about 4 MiB of JSON.
MAX_LINE_BYTES = 16 << 20


def bounded_lines(source: IO[bytes]) -> Iterator[bytes]:
    """The lines of `source`, each read with at most MAX_LINE_BYTES + 1 bytes held:
    a longer line comes cut there (and `import_lines` refuses it by its number), so a
    file without line ends cannot take the process's memory."""
    while line := source.readline(MAX_LINE_BYTES + 1):
        yield line
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            return  # refused at this line: nothing after it is read


async def import_lines(
    pool: asyncpg.Pool,
    lines: Iterable[bytes],
    *,
    batch_size: int = 1000,
    on_progress: ProgressFn | None = None,
) -> ImportReport:
    """Append the envelopes of `lines` (blank lines skipped, and a byte order mark
    before the first ignored, as RFC 8259 allows), a batch per transaction.

    An event_id already in the log with the same content is skipped (a second import
    appends nothing); with other content, or any invalid line, the import stops with
    ImportFailed and nothing of that line's batch is written (earlier batches stay).
    """
    total = appended = present = 0
    batch: list[Line] = []
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        for number, raw in enumerate(lines, start=1):
            if number == 1:
                raw = raw.removeprefix(_BOM)
            if len(raw) > MAX_LINE_BYTES:
                raise ImportFailed(
                    number, f"a line takes at most {MAX_LINE_BYTES:,} bytes"
                )
            if not raw.strip():
                continue
            batch.append(parse_line(number, raw, now))
            total += 1
            if len(batch) >= batch_size:
                added, skipped = await _write(conn, batch)
                appended, present = appended + added, present + skipped
                batch = []
                if on_progress:
                    on_progress(total, appended)
        if batch:
            added, skipped = await _write(conn, batch)
            appended, present = appended + added, present + skipped
            if on_progress:
                on_progress(total, appended)
    return ImportReport(lines=total, appended=appended, present=present)


async def _write(conn: Connection, batch: list[Line]) -> tuple[int, int]:
    # REPEATABLE READ, as a command's transaction (service/commands.py): a stream
    # row changed by a concurrent commit fails this batch (retried on a fresh
    # snapshot) instead of appending after it with an older tx_id than its events.
    for _attempt in range(5):
        try:
            async with conn.transaction(isolation="repeatable_read"):
                return await _append(conn, batch)
        except (asyncpg.SerializationError, asyncpg.UniqueViolationError):
            continue
    raise ImportFailed(batch[0].number, "the log kept changing under this batch")


class _Stored(msgspec.Struct, frozen=True):
    """What two copies of an event must agree on (positions aside)."""

    stream_id: str
    stream_version: int | None
    event: AnyEvent
    recorded_at: datetime
    metadata: dict[str, Any]


def _comparable(line: Line) -> _Stored:
    env = line.envelope
    return _Stored(
        env.stream_id,
        None if line.is_usage else env.stream_version,
        line.event,
        env.recorded_at,
        _without_stamp(env.metadata),
    )


def _stored(row: asyncpg.Record) -> _Stored | None:
    """A stored event as comparable, None when it is a refused legacy event (which
    no line that decodes can equal)."""
    try:
        event = decode_data(row["type"], row["schema_version"], row["data"])
    except LegacyEventRefused:
        return None
    return _Stored(
        row["stream_id"],
        None if isinstance(event, UsageRecorded) else row["stream_version"],
        event,
        row["recorded_at"],
        _without_stamp(_decode_metadata(row["metadata"])),
    )


def _without_stamp(metadata: dict[str, Any]) -> dict[str, Any]:
    # The upcaster's audit stamp is the one change a stored event may have had.
    return {k: v for k, v in metadata.items() if k != "upcast"}


async def _append(conn: Connection, batch: list[Line]) -> tuple[int, int]:
    existing = {
        str(r["event_id"]): _stored(r)
        for r in await eventstore.stored_rows(
            conn, [line.envelope.event_id for line in batch]
        )
    }
    versions = await _lock_streams(
        conn, sorted({line.envelope.stream_id for line in batch if not line.is_usage})
    )
    new: list[Line] = []
    present = 0
    for line in batch:
        event_id = str(line.envelope.event_id)
        if event_id in existing:
            if existing[event_id] != _comparable(line):
                raise ImportFailed(
                    line.number,
                    f"event {event_id} is already in the log with other content",
                )
            present += 1
            continue
        existing[event_id] = _comparable(line)
        if not line.is_usage:
            stream_id = line.envelope.stream_id
            if line.envelope.stream_version != versions[stream_id] + 1:
                raise ImportFailed(
                    line.number,
                    f"{stream_id} is at version {versions[stream_id]};"
                    f" this event has version {line.envelope.stream_version}",
                )
            versions[stream_id] += 1
        new.append(line)
    if not new:
        return 0, present
    positions = await eventstore.next_positions(conn, len(new))
    await eventstore.insert_as_given(
        conn,
        positions,
        [line.envelope.event_id for line in new],
        [line.envelope.stream_id for line in new],
        [
            position if line.is_usage else line.envelope.stream_version
            for line, position in zip(new, positions, strict=True)
        ],
        [line.envelope.type for line in new],
        [line.envelope.schema_version for line in new],
        [bytes(line.envelope.data) for line in new],
        [_encode(line.envelope.metadata) for line in new],
        [line.envelope.recorded_at for line in new],
    )
    if versions:
        await conn.execute(
            "UPDATE streams SET version = u.version, updated_at = now()"
            " FROM unnest($1::text[], $2::bigint[]) AS u(stream_id, version)"
            " WHERE streams.stream_id = u.stream_id AND streams.version < u.version",
            list(versions),
            list(versions.values()),
        )
    return len(new), present


async def _lock_streams(conn: Connection, stream_ids: list[str]) -> dict[str, int]:
    """Create-or-lock the rows of versioned streams, in id order; their versions."""
    if not stream_ids:
        return {}
    await conn.execute(
        "INSERT INTO streams (stream_id) SELECT unnest($1::text[]) ORDER BY 1"
        " ON CONFLICT (stream_id) DO NOTHING",
        stream_ids,
    )
    rows = await conn.fetch(
        "SELECT stream_id, version FROM streams WHERE stream_id = ANY($1::text[])"
        " ORDER BY stream_id FOR UPDATE",
        stream_ids,
    )
    return {r["stream_id"]: r["version"] for r in rows}
