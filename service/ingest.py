"""Usage group commit: screen records, dedupe by event_id, append, ack after commit.

Records of many concurrent requests and stream frames meet in one bounded queue. The
writer of a process takes what is queued (at most `group_max` records a group), draws
that many positions in one round trip and appends them with one binary COPY on an
autocommit connection of its own: one statement, one transaction, one fsync, one
NOTIFY. Under pressure (half a group queued) a second connection (lane) commits a
group of its own, so the next group is copied while the last one waits for its
fsync. Each sender is answered only after the COPY that holds its records returned,
so an answer means committed (synchronous_commit stays on). A full queue makes
senders wait; nothing is dropped. Idempotency: the unique index on event_id is the
truth; a bounded map of recently written ids (ints, which the cyclic GC does not
track) answers most repeats without the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Protocol

import asyncpg
import msgspec
import structlog

from service import eventstore, metrics
from service.domain.events import ReservationHeld, ReservationReleased, UsageRecorded
from service.domain.usage import (
    UNKNOWN_VIRTUAL_KEY,
    KeyResolver,
    Rejected,
    Row,
    UsageRecord,
    event_key,
    screen,
)
from service.errors import Unavailable
from service.eventstore import Queryable

log = structlog.get_logger()


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """Where a row is stored: its own new position, or its original's (duplicate)."""

    position: int
    duplicate: bool


# --- queueing ----------------------------------------------------------------------

# Records screened between two turns of the event loop.
SLICE = 1000


async def queue_records(
    writer: Writer,
    records: Sequence[tuple[int, UsageRecord]],
    resolver: KeyResolver,
    now: datetime,
    metadata: bytes,
    refresh: Callable[[], Awaitable[None]] | None = None,
    log: Queryable | None = None,
) -> tuple[Submitted, list[Rejected]]:
    """Screen records and queue the valid ones, a slice at a time.

    Between slices the loop runs other callbacks: the writer's COPY round trips must
    not wait behind the screening of a whole large body, and the first slices commit
    while later ones are screened. A key the cache does not know yet may have been
    created a moment ago: `refresh` (once per call, see `reach_head`) brings the
    cache up to the log head before those records are screened again, so a record
    is rejected as `unknown_virtual_key` only once the cache has seen every event
    committed before the request asked. When the cache cannot get there in time,
    the call raises ProjectionLag (a 503: retry), once what it already queued has
    committed (a retry finds those as duplicates). With `log`, a record refused
    for an unknown key whose event_id the log holds already is answered as the
    duplicate it is (`_repeats`).
    """
    submitted = Submitted()
    rejected: list[Rejected] = []
    for start in range(0, len(records), SLICE):
        if start:
            await asyncio.sleep(0)
        part = records[start : start + SLICE]
        rows, refused = screen(part, resolver, now)
        unknown = {r.where for r in refused if r.why is UNKNOWN_VIRTUAL_KEY}
        if unknown and refresh is not None:
            try:
                await refresh()
            except Exception:  # lag or an unreachable database: a retryable 503
                with contextlib.suppress(Exception):
                    await submitted.outcomes()
                raise
            refresh = None
            again = screen([(at, r) for at, r in part if at in unknown], resolver, now)
            rows += again.rows
            refused = [r for r in refused if r.where not in unknown] + again.rejected
        if log is not None and refused:
            refused = await _repeats(writer, log, part, refused, submitted)
        rejected.extend(refused)
        await writer.submit(rows, metadata, submitted)
    rejected.sort(key=lambda r: r.where)
    return submitted, rejected


async def _repeats(
    writer: Writer,
    log: Queryable,
    part: Sequence[tuple[int, UsageRecord]],
    refused: list[Rejected],
    into: Submitted,
) -> list[Rejected]:
    """`refused` but the repeats: a record refused for a key no longer known (deleted,
    or its secret rotated, since it was first sent) whose event_id is stored already
    is a repeat of a record that was taken, and a repeat is answered as a duplicate
    (API.md), not refused. Only refused records are looked up: not the hot path."""
    unknown = [r for r in refused if r.why is UNKNOWN_VIRTUAL_KEY]
    if not unknown:
        return refused
    by_at = dict(part)
    keys = {r.where: event_key(by_at[r.where]) for r in unknown}
    stored = await writer.stored(log, [by_at[r.where] for r in unknown])
    repeats = [r for r in unknown if keys[r.where] in stored]
    if not repeats:
        return refused
    writer.answered(into, [stored[keys[r.where]] for r in repeats])
    return [r for r in refused if r not in repeats]


# A bounded wait is the contract (API.md: 2 s), so its budget is a parameter rather
# than the caller's asyncio.timeout, as in projections.runner.
class Follower(Protocol):
    """A projection's tail, as a wait for a position sees it (projections.runner)."""

    async def wait_for(self, position: int, timeout: float) -> None: ...  # noqa: ASYNC109


async def reach_head(
    pool: Queryable,
    follower: Follower,
    timeout: float,  # noqa: ASYNC109
) -> None:
    """Return once `follower` has applied every event committed now: the rule before
    a key is answered as unknown (docs/API.md, "Retryable or final"). ProjectionLag
    when it cannot within `timeout`; Unavailable-class errors while the database
    cannot be read (both retryable)."""
    await follower.wait_for(await eventstore.max_position(pool), timeout)


# --- the writer --------------------------------------------------------------------

# What a usage stream holds; all are unversioned (stream_version = position).
_SCHEMA_VERSIONS = {
    cls.__struct_config__.tag: cls.schema_version
    for cls in (UsageRecorded, ReservationHeld, ReservationReleased)
}
# The server refused a group for what it holds (the connection is fine).
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


class _Lane:
    """One connection of the writer and the group it is committing."""

    __slots__ = ("conn", "inflight", "number", "retry_at", "task")

    def __init__(self, number: int) -> None:
        self.number = number  # 0 takes every group; the others, under pressure
        self.conn: asyncpg.Connection | None = None
        self.inflight: list[_Chunk] = []
        self.retry_at = 0.0  # no reconnect before (time.monotonic)
        self.task: asyncio.Task[None] | None = None


class _Chunk:
    """Rows of one sender that go into one group; answered through `future`."""

    __slots__ = ("future", "metadata", "rows")

    def __init__(
        self, rows: list[Row], metadata: bytes, future: asyncio.Future[list[Outcome]]
    ) -> None:
        self.rows = rows
        self.metadata = metadata
        self.future = future


class Submitted:
    """Rows handed to the writer; `outcomes()` waits for their commit."""

    def __init__(self) -> None:
        self.size = 0
        self._known: dict[int, Outcome] = {}  # answered from memory
        self._chunks: list[tuple[list[int], asyncio.Future[list[Outcome]]]] = []

    async def outcomes(self) -> list[Outcome]:
        """One outcome per row, in order; Unavailable if a group failed to commit
        (other rows of the same call may have committed: a retry finds them as
        duplicates)."""
        results = await asyncio.gather(
            *(future for _, future in self._chunks), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if not self._known and len(self._chunks) == 1:
            return results[0]  # type: ignore[return-value]
        outcomes: list[Outcome | None] = [None] * self.size
        for index, outcome in self._known.items():
            outcomes[index] = outcome
        for (indexes, _), chunk_outcomes in zip(self._chunks, results, strict=True):
            for index, outcome in zip(indexes, chunk_outcomes, strict=True):  # type: ignore[arg-type]
                outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]


class Writer:
    """The group-commit writer of one process, on `lanes` connections of its own."""

    def __init__(
        self,
        dsn: str,
        *,
        lanes: int = 2,
        group_max: int = 2000,
        spill: int | None = None,
        queue_limit: int = 64,
        max_wait: float = 0.0,
        recent_capacity: int = 250_000,
        reconnect_delay: float = 0.5,
    ) -> None:
        self._dsn = dsn
        self.group_max = group_max
        self.max_wait = max_wait
        self._reconnect_delay = reconnect_delay
        # Chunks of at most group_max rows: the queue holds at most that many records
        # times queue_limit (plus one group in flight a lane and one carried over).
        self._queue: asyncio.Queue[_Chunk | None] = asyncio.Queue(queue_limit)
        self._carry: _Chunk | None = None
        self._lanes = [_Lane(number) for number in range(lanes)]
        # A lane past the first takes a group only while this many records wait
        # (default: half a group): under pressure, so a moderate rate is not split
        # into more, smaller groups (more commits, more wake-ups of every tail).
        self._spill = max(1, group_max // 2) if spill is None else spill
        self._pressure = asyncio.Event()
        self._recent: dict[int, int] = {}
        self._older: dict[int, int] = {}
        self._recent_capacity = recent_capacity
        self._sequence = ""
        self._closing = False
        self._stopped = False
        self.backlog = 0  # records queued or carried, not yet taken into a group

    # --- senders ---

    async def write(
        self, rows: Sequence[Row], metadata: bytes = b"{}"
    ) -> list[Outcome]:
        """Append rows; return where each one is stored, once committed."""
        return await (await self.submit(rows, metadata)).outcomes()

    async def submit(
        self,
        rows: Sequence[Row],
        metadata: bytes = b"{}",
        into: Submitted | None = None,
    ) -> Submitted:
        """Queue rows (waiting while the queue is full), after those already in
        `into`; the caller awaits `outcomes()` later, so it can screen or read more
        meanwhile."""
        if self._closing:
            raise Unavailable("the service is shutting down; retry on another replica")
        submitted = Submitted() if into is None else into
        base = submitted.size
        submitted.size += len(rows)
        todo: list[int] = []
        recent, older = self._recent, self._older
        known = 0
        for index, row in enumerate(rows, base):
            position = recent.get(row.key)
            if position is None:
                position = older.get(row.key)
            if position is None:
                todo.append(index)
            else:
                submitted._known[index] = Outcome(position, True)
                known += 1
        if known:
            metrics.count_records(duplicates=known)
        loop = asyncio.get_running_loop()
        for start in range(0, len(todo), self.group_max):
            indexes = todo[start : start + self.group_max]
            future: asyncio.Future[list[Outcome]] = loop.create_future()
            chunk = _Chunk([rows[i - base] for i in indexes], metadata, future)
            # Registered before the wait: outcomes() must see every queued chunk.
            submitted._chunks.append((indexes, future))
            await self._queue.put(chunk)
            self.backlog += len(chunk.rows)
            if self.backlog >= self._spill:
                self._pressure.set()
            if self._stopped and not future.done():
                # Queued after the writer stopped and drained: nobody will take it.
                future.set_exception(_shutting_down())
        return submitted

    async def stored(
        self, log: Queryable, records: Sequence[UsageRecord]
    ) -> dict[int, int]:
        """The positions of those records' events already stored, by event key:
        from this writer's memory of recent rows, else from `log`."""
        found: dict[int, int] = {}
        missing: list[str] = []
        for record in records:
            key = event_key(record)
            position = self._recent.get(key, self._older.get(key))
            if position is None:
                missing.append(record.event_id)
            else:
                found[key] = position
        if missing:
            found.update(await eventstore.stored_positions(log, missing))
        return found

    def answered(self, into: Submitted, positions: Sequence[int]) -> None:
        """Outcomes of rows stored already, answered without a row (duplicates)."""
        for position in positions:
            into._known[into.size] = Outcome(position, True)
            into.size += 1
        metrics.count_records(duplicates=len(positions))

    # --- lifetime ---

    async def start(self) -> None:
        for lane in self._lanes:
            await self._connect(lane)
        for lane in self._lanes:
            lane.task = asyncio.create_task(
                self._run(lane), name=f"usage-writer-{lane.number}"
            )

    async def close(self, grace: float = 10.0) -> None:
        """Stop taking records, commit what is queued (for up to `grace` seconds),
        then stop; whatever is left is answered 503."""
        self._closing = True
        self._pressure.set()  # every lane takes its end mark
        tasks = [lane.task for lane in self._lanes if lane.task is not None]
        graceful = True
        if tasks:
            try:
                await asyncio.wait_for(self._finish(tasks), grace)
            except TimeoutError:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                graceful = False  # a statement may be in flight: just hang up
        self._stopped = True
        self._fail_leftovers()
        for lane in self._lanes:
            await self._drop_connection(lane, graceful=graceful)

    def _fail_leftovers(self) -> None:
        """Answer every chunk taken or queued but not committed: 503."""
        leftovers: list[_Chunk | None] = [
            *(chunk for lane in self._lanes for chunk in lane.inflight),
            *([self._carry] if self._carry else []),
        ]
        for lane in self._lanes:
            lane.inflight = []
        self._carry = None
        while not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        for chunk in leftovers:
            if chunk is not None:
                _fail(chunk, _shutting_down())

    async def _finish(self, tasks: list[asyncio.Task[None]]) -> None:
        for _ in tasks:  # one end mark a lane: each lane stops at the first it takes
            await self._queue.put(None)
        # A lane that failed was logged where it failed (`_run`).
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def backend_pid(self) -> int | None:
        """The first lane's server process (None while disconnected): with nothing
        else in flight, the lane that takes the next group."""
        return self.backend_pids[0]

    @property
    def backend_pids(self) -> list[int | None]:
        """Each lane's server process (None while disconnected)."""
        return [
            None if conn is None or conn.is_closed() else conn.get_server_pid()
            for conn in (lane.conn for lane in self._lanes)
        ]

    # --- the loop ---

    async def _run(self, lane: _Lane) -> None:
        try:
            while True:
                if lane.number > 0:
                    await self._under_pressure()
                group = await self._take()
                if not group:
                    return
                chunks = lane.inflight = [c for c in group if c is not None]
                await self._commit(lane, chunks, isolate=len(chunks) > 1)
                lane.inflight = []
                if group[-1] is None:
                    return
        except Exception:
            # Not expected (every database failure is answered in _commit); without
            # a writer nothing can be acknowledged, so refuse instead of hanging.
            log.exception("ingest_writer_failed")
            self._closing = self._stopped = True
            self._fail_leftovers()
            raise

    async def _under_pressure(self) -> None:
        """Until `spill` records wait to be taken, or the writer closes."""
        while self.backlog < self._spill and not self._closing:
            self._pressure.clear()
            await self._pressure.wait()

    async def _take(self) -> list[_Chunk | None]:
        """The next group: whatever is queued, up to group_max records, after
        waiting max_wait (default 0) for more once the first chunk is in."""
        first = self._carry or await self._queue.get()
        self._carry = None
        if first is None:
            return []
        group: list[_Chunk | None] = [first]
        size = len(first.rows)
        self.backlog -= size
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while size < self.group_max:
            if not self._queue.empty():
                chunk = self._queue.get_nowait()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # Sleep rather than wait_for(get()): a get cancelled by the timeout
                # just as it receives a chunk could lose that chunk (Python 3.11).
                await asyncio.sleep(remaining)
                continue
            if chunk is None:
                group.append(None)  # closing: commit this group, then stop
                break
            if size + len(chunk.rows) > self.group_max:
                self._carry = chunk
                break
            group.append(chunk)
            size += len(chunk.rows)
            self.backlog -= len(chunk.rows)
        return group

    async def _commit(
        self, lane: _Lane, chunks: list[_Chunk], *, isolate: bool
    ) -> None:
        """Write one group and answer its senders. If the server refuses the group
        for its content, each sender's chunk is retried alone (`isolate`), so one
        bad record fails only its own request."""
        # A repeat within the group is a duplicate of its first occurrence.
        unique: list[tuple[Row, bytes]] = []
        slots: list[int] = []  # per row of the group, in order: index into unique
        seen: dict[int, int] = {}
        for chunk in chunks:
            for row in chunk.rows:
                slot = seen.get(row.key)
                if slot is None:
                    slot = seen[row.key] = len(unique)
                    unique.append((row, chunk.metadata))
                    slots.append(slot)
                else:
                    slots.append(~slot)  # negative: a repeat of `slot`
        started = time.perf_counter()
        try:
            conn = await self._connection(lane)
            positions, existing = await self._append(conn, unique)
        except Exception as exc:  # every failure must answer the senders
            refused = isinstance(exc, _REFUSED)
            if refused and isolate:
                for chunk in chunks:
                    await self._commit(lane, [chunk], isolate=False)
                return
            if not isinstance(exc, Unavailable):
                log.warning("ingest_group_failed", error=repr(exc), records=len(slots))
            if not refused:
                await self._drop_connection(lane, graceful=False)
            error = Unavailable("the database did not commit these records; retry them")
            for chunk in chunks:
                _fail(chunk, error)
            return
        written = len(unique) - len(existing)
        metrics.observe_group(written, time.perf_counter() - started)
        metrics.count_records(accepted=written, duplicates=len(slots) - written)
        self._remember(unique, positions)
        index = 0
        for chunk in chunks:
            outcomes: list[Outcome] = []
            for _ in chunk.rows:
                slot = slots[index]
                index += 1
                if slot >= 0:
                    outcomes.append(Outcome(positions[slot], slot in existing))
                else:
                    outcomes.append(Outcome(positions[~slot], True))
            if not chunk.future.done():
                chunk.future.set_result(outcomes)

    async def _append(
        self, conn: asyncpg.Connection, unique: list[tuple[Row, bytes]]
    ) -> tuple[list[int], set[int]]:
        """COPY the rows; a row whose event_id is already stored is not written.

        Returns the position of every row (new, or the original's) and the indexes of
        those that were already stored.
        """
        drawn = await eventstore.draw_positions(conn, self._sequence, len(unique))
        live = list(range(len(unique)))
        positions = [0] * len(unique)
        existing: set[int] = set()
        while live:
            for position, slot in zip(drawn, live, strict=False):
                positions[slot] = position
            # Copied in event id order, as every lane (and process) copies: a
            # group that meets an id another one is writing waits for it and
            # finds it stored, never both waiting for each other (a deadlock).
            records = []
            for slot in sorted(live, key=lambda slot: unique[slot][0].key):
                row, metadata = unique[slot]
                position = positions[slot]
                records.append(
                    (
                        position,
                        position,  # usage streams are unversioned
                        row.event_id,
                        row.stream_id,
                        row.type,
                        _SCHEMA_VERSIONS[row.type],
                        row.data,
                        metadata,
                    )
                )
            try:
                await eventstore.copy_usage(conn, records)
                break
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != "events_event_id_key":
                    raise
                # The COPY rolled back whole; its positions were not used, so the
                # rows that remain take them again in order.
                stored = await eventstore.stored_positions(
                    conn, [unique[slot][0].event_id for slot in live]
                )
                if not stored:
                    raise
                remaining = []
                for slot in live:
                    original = stored.get(unique[slot][0].key)
                    if original is None:
                        remaining.append(slot)
                    else:
                        positions[slot] = original
                        existing.add(slot)
                live = remaining
        return positions, existing

    def _remember(self, unique: list[tuple[Row, bytes]], positions: list[int]) -> None:
        recent = self._recent
        for (row, _), position in zip(unique, positions, strict=True):
            recent[row.key] = position
        if len(recent) >= self._recent_capacity:
            self._older, self._recent = recent, {}

    # --- the connection ---

    async def _connection(self, lane: _Lane) -> asyncpg.Connection:
        conn = lane.conn
        if conn is not None and not conn.is_closed():
            return conn
        if time.monotonic() < lane.retry_at:
            raise Unavailable("the database is unreachable")
        return await self._connect(lane)

    async def _connect(self, lane: _Lane) -> asyncpg.Connection:
        lane.retry_at = time.monotonic() + self._reconnect_delay
        conn = await asyncpg.connect(self._dsn, timeout=5)
        try:
            await eventstore.init_connection(conn)
            self._sequence = await eventstore.position_sequence(conn)
        except BaseException:
            conn.terminate()
            raise
        lane.conn = conn
        log.info(
            "ingest_writer_connected",
            backend_pid=conn.get_server_pid(),
            lane=lane.number,
        )
        return conn

    async def _drop_connection(self, lane: _Lane, *, graceful: bool) -> None:
        """Forget the lane's connection; after a failure, hang up without waiting
        (the writer uses no explicit transaction, so nothing is left half done)."""
        conn, lane.conn = lane.conn, None
        if conn is None or conn.is_closed():
            return
        if not graceful:
            conn.terminate()
            return
        try:
            await asyncio.wait_for(conn.close(), 2)
        except Exception:  # a broken connection is dropped anyway
            conn.terminate()


def _fail(chunk: _Chunk, error: Exception) -> None:
    if not chunk.future.done():
        chunk.future.set_exception(error)


def _shutting_down() -> Unavailable:
    return Unavailable("the service is shutting down; retry these records")
