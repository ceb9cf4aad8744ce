"""The log's own records: an event to append, an event as stored, a reader's
checkpoint, and the one JSON envelope of a stored event (GET /api/events and the
lines of export/import). Pure: msgspec and the domain's events only."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec

from service.domain.events import AnyEvent, type_name


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event to append, with the id that makes a retry idempotent."""

    event: AnyEvent
    event_id: str = msgspec.field(default_factory=lambda: str(uuid.uuid4()))
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class Appended(msgspec.Struct, frozen=True, kw_only=True):
    stream_version: int
    global_position: int
    recorded_at: datetime
    duplicate: bool


class Checkpoint(msgspec.Struct, frozen=True):
    """A tailing reader's place: the last (tx_id, global_position) it took."""

    tx_id: int = 0
    position: int = 0


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as stored, upcast to the current schema."""

    global_position: int
    tx_id: int
    event_id: str
    stream_id: str
    stream_version: int
    schema_version: int
    event: AnyEvent
    metadata: dict[str, Any]
    recorded_at: datetime

    @property
    def type(self) -> str:
        return type_name(self.event)

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.tx_id, self.global_position)


class Refused(msgspec.Struct, frozen=True, kw_only=True):
    """A stored legacy event with no exact current form (see upcast): what it was,
    where it is, and why it is refused. Every reader refuses the same rows, so every
    projection passes over the same events and none disagrees with another."""

    global_position: int
    tx_id: int
    event_id: str
    stream_id: str
    type: str
    schema_version: int
    code: str
    message: str

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.tx_id, self.global_position)


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """A tailing read: the events that decode, the rows refused, and the checkpoint
    of the last row read (`end`; the `after` asked for when nothing was read)."""

    records: list[RecordedEvent]
    refused: list[Refused]
    end: Checkpoint


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """The wire form of a stored event: a line of export, an item of GET /api/events."""

    global_position: Annotated[int, msgspec.Meta(extra_json_schema={"minimum": 0})]
    event_id: Annotated[str, msgspec.Meta(extra_json_schema={"format": "uuid"})]
    stream_id: str
    stream_version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: Annotated[datetime, msgspec.Meta(tz=True)]


def envelope(record: RecordedEvent) -> Envelope:
    return Envelope(
        global_position=record.global_position,
        event_id=record.event_id,
        stream_id=record.stream_id,
        stream_version=record.stream_version,
        type=record.type,
        schema_version=record.schema_version,
        data=msgspec.structs.asdict(record.event),
        metadata=record.metadata,
        recorded_at=record.recorded_at,
    )
