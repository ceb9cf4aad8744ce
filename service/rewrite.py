"""The one-shot upcaster: legacy rows of the log rewritten in place, audited, resumable.

Each batch is one short transaction: lock up to `batch_size` legacy rows (keyset on
global_position), archive the originals, write the current form produced by the very
steps that upcast on read (`service.domain.upcast`), stamp `metadata.upcast`, and
move the run's `last_position` and counts. Event ids, positions, stream versions, tx
ids and recorded_at never change (the trigger of migrations/0001 enforces it), so
projectors do not see the rows again and the meaning of every event is what they
already applied.
"""

from __future__ import annotations

import difflib
import hashlib
import uuid
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from service import eventstore
from service.domain import upcast
from service.domain.events import type_name
from service.errors import LegacyEventRefused
from service.eventstore import Connection

KIND = "upcast"
# Two-int advisory lock key (service.migrate uses (namespace, 1)): one upcast at a time.
_LOCK_NAMESPACE = 0x676C6564
_LOCK_KEY = 2

# (events rewritten so far, last position reached)
ProgressFn = Callable[[int, int], None]


class Converted(msgspec.Struct, frozen=True, kw_only=True):
    """One legacy row and the current form the rewrite writes for it."""

    event_id: str
    global_position: int
    from_type: str
    from_version: int
    to_type: str
    to_version: int
    before: upcast.Data
    after: bytes

    @property
    def key(self) -> str:
        return f"{self.from_type} v{self.from_version}"


class RewriteReport(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    counts: dict[str, int]
    events: int
    last_position: int
    resumed_from: int
    superseded: list[str]
    finished: bool


class DryRunReport(msgspec.Struct, frozen=True, kw_only=True):
    counts: dict[str, int]
    events: int
    samples: list[Converted]
    failures: list[str]


class RewriteFailed(Exception):
    """A legacy row that cannot be brought to the current schema; nothing of its
    batch was written and the run is marked failed."""


class RewriteBusy(Exception):
    """Another upcast run holds the lock."""


def code_version() -> str:
    """The package version plus a hash of the steps' source: what produced a row."""
    try:
        version = metadata.version("govledger")
    except metadata.PackageNotFoundError:
        version = "0"
    digest = hashlib.sha256(Path(upcast.__file__).read_bytes()).hexdigest()[:12]
    return f"{version}+{digest}"


def convert_row(row: asyncpg.Record) -> Converted:
    """Upcast one stored row and prove the result decodes strictly as current: the
    decoding every read of the row goes through, so the rewrite refuses exactly the
    legacy events that reads refuse."""
    try:
        before = upcast.decode_legacy(row["data"])
        event = upcast.to_current(row["type"], row["schema_version"], before)
    except (upcast.UnknownSchema, LegacyEventRefused) as exc:
        raise RewriteFailed(
            f"event {row['event_id']} at position {row['global_position']}"
            f" ({row['type']} v{row['schema_version']}): {exc}"
        ) from exc
    return Converted(
        event_id=str(row["event_id"]),
        global_position=row["global_position"],
        from_type=row["type"],
        from_version=row["schema_version"],
        to_type=type_name(event),
        to_version=type(event).schema_version,
        before=before,
        after=eventstore.encode_event(event),
    )


# --- the run -----------------------------------------------------------------------


async def rewrite(
    pool: asyncpg.Pool,
    *,
    batch_size: int = 500,
    on_progress: ProgressFn | None = None,
    stop_after: int | None = None,
) -> RewriteReport:
    """Rewrite every legacy row once; a run found 'running' (its process died) is
    marked failed and this run continues from its last position.

    `stop_after` ends the run after that many batches exactly as a kill would, leaving
    it 'running' for the next run to take over (the resume path, for tests and drills).
    A run with nothing to rewrite is still recorded, as 'done' with no counts: the
    audit trail shows when the log was last checked and by which code.
    """
    if not 1 <= batch_size <= 10_000:
        raise ValueError("batch_size must be between 1 and 10000")
    keys = upcast.legacy_keys()
    async with pool.acquire() as conn:
        # A session lock, held across the per-batch transactions and released by
        # PostgreSQL if this process dies: that is what makes a 'running' run found
        # under the lock an abandoned one.
        if not await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", _LOCK_NAMESPACE, _LOCK_KEY
        ):
            raise RewriteBusy("another upcast run is in progress")
        try:
            run_id, resumed_from, superseded = await _start(conn)
            counts: Counter[str] = Counter()
            position = resumed_from
            batches = 0
            try:
                while stop_after is None or batches < stop_after:
                    done, position = await _rewrite_batch(
                        conn, run_id, position, keys, batch_size, counts
                    )
                    batches += 1
                    if on_progress:
                        on_progress(counts.total(), position)
                    if done:
                        continue
                    # Nothing past `position`: sweep once more from the lowest legacy
                    # row left below it (a resumed run, or a row that committed late).
                    lowest = await eventstore.lowest_legacy(conn, position, keys)
                    if lowest is None:
                        await _finish(conn, run_id, "done", counts, {})
                        return _report(
                            run_id,
                            counts,
                            position,
                            resumed_from,
                            superseded,
                            finished=True,
                        )
                    position = lowest - 1
            except Exception as exc:
                await _finish(conn, run_id, "failed", counts, {"error": str(exc)})
                raise
            return _report(
                run_id, counts, position, resumed_from, superseded, finished=False
            )
        finally:
            await conn.execute(
                "SELECT pg_advisory_unlock($1, $2)", _LOCK_NAMESPACE, _LOCK_KEY
            )


async def _start(conn: Connection) -> tuple[str, int, list[str]]:
    run_id = str(uuid.uuid4())
    async with conn.transaction():
        abandoned = await conn.fetch(
            "SELECT run_id, last_position FROM event_rewrite_runs"
            " WHERE kind = $1 AND status = 'running' FOR UPDATE",
            KIND,
        )
        resumed_from = max((r["last_position"] for r in abandoned), default=0)
        await conn.execute(
            "INSERT INTO event_rewrite_runs (run_id, kind, code_version, last_position,"
            " counts) VALUES ($1, $2, $3, $4, $5)",
            run_id,
            KIND,
            code_version(),
            resumed_from,
            msgspec.json.encode({"resumed_from": resumed_from}),
        )
        await conn.execute(
            "UPDATE event_rewrite_runs SET status = 'failed', finished_at = now(),"
            " counts = counts || jsonb_build_object('superseded_by', $2::text)"
            " WHERE run_id = ANY($1::uuid[])",
            [r["run_id"] for r in abandoned],
            run_id,
        )
    return run_id, resumed_from, [str(r["run_id"]) for r in abandoned]


async def _rewrite_batch(
    conn: Connection,
    run_id: str,
    after: int,
    keys: list[str],
    batch_size: int,
    counts: Counter[str],
) -> tuple[bool, int]:
    """One transaction; returns (whether it found rows, the position reached)."""
    async with conn.transaction():
        await conn.execute(
            "SELECT set_config('govledger.rewrite_run', $1, true)", run_id
        )
        rows = await eventstore.legacy_rows(conn, after, keys, batch_size, lock=True)
        if not rows:
            return False, after
        converted = [convert_row(r) for r in rows]
        ids = [c.event_id for c in converted]
        await eventstore.archive(conn, run_id, ids)
        rewritten = await eventstore.rewrite_in_place(
            conn,
            run_id,
            ids,
            [c.from_type for c in converted],
            [c.from_version for c in converted],
            [c.to_type for c in converted],
            [c.to_version for c in converted],
            [c.after for c in converted],
        )
        if rewritten != len(converted):
            raise RewriteFailed(
                f"expected to rewrite {len(converted)} rows, rewrote {rewritten}"
            )
        batch_counts = Counter(c.key for c in converted)
        position = converted[-1].global_position
        await conn.execute(
            "UPDATE event_rewrite_runs SET last_position = $2,"
            " counts = counts || $3::jsonb WHERE run_id = $1",
            run_id,
            position,
            _counts_json(counts + batch_counts),
        )
    # Only once the batch committed: a rolled-back batch counts nothing.
    counts.update(batch_counts)
    return True, position


async def _finish(
    conn: Connection,
    run_id: str,
    status: str,
    counts: Counter[str],
    extra: dict[str, str],
) -> None:
    await conn.execute(
        "UPDATE event_rewrite_runs SET status = $2, finished_at = now(),"
        " counts = counts || $3::jsonb WHERE run_id = $1",
        run_id,
        status,
        {**msgspec.json.decode(_counts_json(counts)), **extra},
    )


def _counts_json(counts: Counter[str]) -> bytes:
    return msgspec.json.encode({"rewritten": dict(counts), "events": counts.total()})


def _report(
    run_id: str,
    counts: Counter[str],
    position: int,
    resumed_from: int,
    superseded: list[str],
    *,
    finished: bool,
) -> RewriteReport:
    return RewriteReport(
        run_id=run_id,
        counts=dict(sorted(counts.items())),
        events=counts.total(),
        last_position=position,
        resumed_from=resumed_from,
        superseded=superseded,
        finished=finished,
    )


# --- dry run -----------------------------------------------------------------------


async def dry_run(
    pool: asyncpg.Pool,
    *,
    samples: int = 3,
    batch_size: int = 2000,
    max_failures: int = 20,
    on_progress: ProgressFn | None = None,
) -> DryRunReport:
    """What `rewrite` would do, from one snapshot, changing nothing: counts per legacy
    type, the first `samples` conversions, and every row it would fail on."""
    keys = upcast.legacy_keys()
    counts: Counter[str] = Counter()
    kept: list[Converted] = []
    failures: list[str] = []
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        position = 0
        while rows := await eventstore.legacy_rows(conn, position, keys, batch_size):
            position = rows[-1]["global_position"]
            for row in rows:
                try:
                    converted = convert_row(row)
                except RewriteFailed as exc:
                    if len(failures) < max_failures:
                        failures.append(str(exc))
                    continue
                counts[converted.key] += 1
                if len(kept) < samples:
                    kept.append(converted)
            if on_progress:
                on_progress(counts.total(), position)
    return DryRunReport(
        counts=dict(sorted(counts.items())),
        events=counts.total(),
        samples=kept,
        failures=failures,
    )


def render_diff(converted: Converted) -> str:
    """A unified diff of one row's data, before and after, keys sorted."""
    before = _pretty(
        {
            "type": converted.from_type,
            "schema_version": converted.from_version,
            "data": converted.before,
        }
    )
    after = _pretty(
        {
            "type": converted.to_type,
            "schema_version": converted.to_version,
            "data": msgspec.json.decode(converted.after),
        }
    )
    return "".join(
        difflib.unified_diff(
            before,
            after,
            fromfile=f"{converted.event_id} @ {converted.global_position} (stored)",
            tofile=f"{converted.event_id} @ {converted.global_position} (rewritten)",
        )
    )


_sorted_encode = msgspec.json.Encoder(order="sorted", decimal_format="number").encode


def _pretty(value: dict[str, Any]) -> list[str]:
    text = msgspec.json.format(_sorted_encode(value), indent=2)
    return [line + "\n" for line in text.decode().splitlines()]
