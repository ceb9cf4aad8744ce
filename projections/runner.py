"""The tail loop: projectors that follow the log gap-safely, woken by LISTEN/NOTIFY
and a poll; a SQL projector applies each batch and moves its checkpoint in one
transaction under an advisory lock, so one replica at a time applies it exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import asyncpg
import structlog

from projections.commit_order import CommitOrder
from service import eventstore, metrics
from service.errors import ProjectionLag
from service.eventstore import UNREACHABLE, Connection, Queryable
from service.records import Checkpoint, RecordedEvent, Refused

log = structlog.get_logger()

CHANNEL = "govledger_events"
# A SQL projector announces each checkpoint it moves here, so that processes which
# only follow it (a serving process whose projector runs in `govledger project`)
# learn of it at once instead of at their next poll.
CHECKPOINT_CHANNEL = "govledger_checkpoints"
BATCH_SIZE = 500
# A projection that takes rows as read (FoldRows, ApplyRows) spends a few microseconds
# a row, so larger batches cost less per event at full ingest rate: fewer round trips,
# and for the read model fewer writes, since a batch writes each ledger, cell and
# usage-stream guard it touched once, however many records touched it.
ROWS_BATCH_SIZE = 2000
# How long a wait for ?min_position= waits for the tail to read a position it has not
# read yet (CommitOrder) before it asks the database where that position is. The
# cache's tail reads a committed event within milliseconds; a position it never
# reads (not in the log) costs a waiter this much before the database is asked.
LEARN_WAIT_S = 0.1

Apply = Callable[[Connection, Sequence[RecordedEvent]], Awaitable[None]]


ReadRows = Callable[[Connection, Checkpoint, int], Awaitable[Sequence[asyncpg.Record]]]


class FoldRows:
    """An in-memory projection's apply that takes the rows as read, undecoded: it
    decodes what it folds itself (the cache's usage: only its fields) and returns
    the rows it refused, as `eventstore.read_batch` refuses them. Synchronous: the
    whole batch is folded before anything else runs on the loop.

    `read` (default `eventstore.read_all_rows`) reads the next rows after a
    checkpoint; one of its own must keep that reader's gap-safe rule exactly (only
    rows of finished transactions, in (tx_id, position) order) and may leave out
    the columns `fold` does not need."""

    def __init__(
        self,
        fold: Callable[[Sequence[asyncpg.Record]], list[Refused]],
        read: ReadRows = eventstore.read_all_rows,
    ) -> None:
        self.fold = fold
        self.read = read


class ApplyRows:
    """A SQL projection's apply that takes the rows as read (`read`, default
    `eventstore.read_rows`), decodes what it applies itself, and returns the rows
    it refused, as `eventstore.read_batch` refuses them. It runs in the batch's
    transaction, as `Apply` does."""

    def __init__(
        self,
        apply: Callable[
            [Connection, Sequence[asyncpg.Record]], Awaitable[list[Refused]]
        ],
        read: ReadRows = eventstore.read_rows,
    ) -> None:
        self.apply = apply
        self.read = read


# Two-int advisory lock key: (this table's oid, hashtext(projection name)), so it
# cannot collide with the locks of other code in the same database.
#
# A batch commits asynchronously (`synchronous_commit` off for its transaction
# only): it holds nothing but what the log already holds durably, and its tables
# and checkpoint commit or vanish together, so a crash of PostgreSQL can only take
# the last batches back, to be applied again. Its commit then waits for no WAL
# flush, which at full ingest queues behind every acknowledging writer's.
_TRY_LOCK = (
    "SELECT pg_try_advisory_xact_lock("
    "'projection_checkpoints'::regclass::oid::int, hashtext($1))"
    " AND set_config('synchronous_commit', 'off', true) = 'off'"
)
_CHECKPOINT = """
SELECT last_tx_id, last_position, updated_at FROM projection_checkpoints
WHERE projection = $1
"""
_CREATE_CHECKPOINT = """
INSERT INTO projection_checkpoints (projection) VALUES ($1)
ON CONFLICT (projection) DO NOTHING
"""
# Compare-and-set: a batch whose checkpoint moved under it (a stale owner) rolls back.
# The move is announced inside the batch's transaction, so the notification is
# delivered at its commit, never before; it carries the new checkpoint
# (`announcement`), so a follower need not read the row to learn it.
_MOVE_CHECKPOINT = """
WITH moved AS (
    UPDATE projection_checkpoints
    SET last_tx_id = $2, last_position = $3, updated_at = now()
    WHERE projection = $1 AND last_tx_id = $4 AND last_position = $5
    RETURNING projection
)
SELECT pg_notify($6, $7) FROM moved
"""


def announcement(name: str, checkpoint: Checkpoint) -> str:
    """The payload of a moved checkpoint: `name tx_id position`."""
    return f"{name} {checkpoint.tx_id} {checkpoint.position}"


def announced(payload: str) -> tuple[str, Checkpoint] | None:
    """The projection and checkpoint an announcement names (None: not one, as sent
    by an older version, which named the projection alone)."""
    parts = payload.split(" ")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], Checkpoint(int(parts[1]), int(parts[2]))


class LostCheckpoint(Exception):
    """The checkpoint moved while this batch ran: someone else applied it."""


async def load_checkpoint(conn: Queryable, name: str) -> Checkpoint:
    """A projection's stored checkpoint (the start of the log if it has none)."""
    row = await conn.fetchrow(_CHECKPOINT, name)
    return Checkpoint() if row is None else _checkpoint(row)


def _checkpoint(row: asyncpg.Record) -> Checkpoint:
    return Checkpoint(int(row["last_tx_id"]), row["last_position"])


def _reached(checkpoint: Checkpoint, target: Checkpoint) -> bool:
    return (checkpoint.tx_id, checkpoint.position) >= (target.tx_id, target.position)


async def _wait(event: asyncio.Event, at_most_s: float) -> bool:
    """Wait for `event` at most `at_most_s`; whether it was set.

    asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
    that lands as the event is set, and a cancelled tail would then never stop.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(at_most_s):
            await event.wait()
    return event.is_set()


class Wake:
    """A broadcast wake-up: each notify reaches every waiter, none clears it for
    the others (a waiter passes the generation it saw before it last read).

    `checkpoints`: the last checkpoint announced for each projection, kept by the
    listener that wakes followers of moved checkpoints."""

    def __init__(self) -> None:
        self.generation = 0
        self._event = asyncio.Event()
        self.checkpoints: dict[str, Checkpoint] = {}

    def notify(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seen: int, at_most_s: float) -> None:
        """Return once notified after generation `seen`, or after `at_most_s`."""
        if self.generation != seen:
            return
        await _wait(self._event, at_most_s)


def _error_text(exc: Exception) -> str:
    """How a failure to apply is said: in the log, /readyz and `Failure`."""
    return f"{type(exc).__name__}: {exc}"


class Failure(NamedTuple):
    """What stops a projection: the first event it could not apply, and why."""

    projection: str
    position: int
    error: str


# How many refused events /readyz names, per projection.
MAX_REFUSED_SHOWN = 10


class _Batch(NamedTuple):
    first: int  # position of its first event
    last: Checkpoint
    size: int

    @classmethod
    def of(cls, records: Sequence[RecordedEvent]) -> _Batch:
        return cls(records[0].global_position, records[-1].checkpoint, len(records))


class Projector:
    """Follows the log from its checkpoint and applies batches in (tx_id, position)
    order, never skipping one.

    persistent=True: `apply` writes SQL; each batch and the `projection_checkpoints`
    row move together in one transaction under an advisory lock; while another
    replica holds it this one only follows the row. persistent=False: an in-memory
    projection; `apply` must not write, the checkpoint lives in this object only
    (starting at `start`), and a failed batch is retried whole, so `apply` must leave
    its state unchanged when it raises (or be idempotent per event).

    follow_only=True (persistent only): never take the lock, never apply; only follow
    the checkpoint row another process writes (`govledger project`), so that waits
    for ?min_position=, readiness and the lag gauges still work here.

    commit_order: where a wait for ?min_position= first looks up the position's
    checkpoint (the database only for what it does not hold); an in-memory
    projection that folds rows also notes every row it reads in it.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        name: str,
        apply: Apply | FoldRows | ApplyRows,
        *,
        persistent: bool = True,
        follow_only: bool = False,
        start: Checkpoint | None = None,
        batch_size: int | None = None,
        poll_interval_s: float = 0.5,
        max_backoff_s: float = 30.0,
        commit_order: CommitOrder | None = None,
    ) -> None:
        if follow_only and not persistent:
            raise ValueError("only a persistent projection can be followed")
        if persistent and isinstance(apply, FoldRows):
            raise ValueError("a persistent projection applies decoded events")
        if not persistent and isinstance(apply, ApplyRows):
            raise ValueError("an in-memory projection folds rows (FoldRows)")
        self.name = name
        self.persistent = persistent
        self.follow_only = follow_only
        self._pool = pool
        self._apply = apply
        if batch_size is None:
            rows = isinstance(apply, FoldRows | ApplyRows)
            batch_size = ROWS_BATCH_SIZE if rows else BATCH_SIZE
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._max_backoff_s = max_backoff_s
        self._commit_order = commit_order
        self._checkpoint = start or Checkpoint()
        self._advanced = asyncio.Event()
        self._step_lock = asyncio.Lock()
        self._start_head: Checkpoint | None = None
        self._ready = False
        # The last attempt to read or apply failed (the database may be out of
        # reach): what this projection serves is as of `checkpoint`, maybe stale.
        self.failing = False
        # A failure that is not the database being out of reach: the event at
        # `failure.position` could not be applied (reported, retried, never skipped).
        self.failure: Failure | None = None
        # The batch being applied; while a failed batch is narrowed down to its
        # failing event, the end of that batch and the size of the batches that
        # retry it (halved at each failure, down to one event).
        self._applying: _Batch | None = None
        self._narrow_until: Checkpoint | None = None
        self._narrow_size = 0
        # Legacy events passed over (the last few, for /readyz).
        self.refused: list[Refused] = []
        self._refused_up_to = 0
        # Lag as of the last step: events behind the log head, and seconds.
        self.lag_events = 0
        self.lag_seconds = 0.0
        # A follower: the checkpoints announced (`Wake.checkpoints` of the wake it
        # runs on, set by `run`), the last one taken, and when it last read the row.
        self.announced: Mapping[str, Checkpoint] = {}
        self._heard_last: Checkpoint | None = None
        self._followed_at = -math.inf

    @property
    def checkpoint(self) -> Checkpoint:
        return self._checkpoint

    @property
    def ready(self) -> bool:
        """Caught up with the log head seen when this projector started."""
        if not self._ready and self._start_head is not None:
            self._ready = _reached(self._checkpoint, self._start_head)
        return self._ready

    async def run(self, wake: Wake) -> None:
        """Follow the log for ever; on error back off and retry the same place.

        An unreachable database is logged as such and retried at least every
        second. Any other failure is first narrowed down to one event (the failed
        batch is retried in halves, then halves of the half that fails, so a
        batch of n events costs about 2·log2(n) retries, not n, and a failure
        that does not recur costs one), then reported once (a log line,
        `failure` for /readyz, a gauge for /metrics) and retried with back-off:
        never skipped, since an event skipped by one projection would leave it
        disagreeing with the others for good.
        """
        delay = 0.0
        self.announced = wake.checkpoints
        while True:
            seen = wake.generation
            try:
                if self._start_head is None:
                    self._start_head = await eventstore.head(self._pool)
                more = await self.step(self._step_size())
            except Exception as exc:
                self.failing = True
                applying, self._applying = self._applying, None
                if isinstance(exc, UNREACHABLE):
                    delay = min(max(delay * 2, 0.1), 1.0)
                    log.warning(
                        "projection_waiting_for_database",
                        projection=self.name,
                        error=repr(exc),
                        retry_in_s=delay,
                    )
                elif applying is not None and applying.size > 1:
                    # Find the event: retry this batch in halves, now.
                    self._narrow(applying)
                    metrics.count_failed_batch(self.name)
                    log.warning(
                        "projection_batch_failed",
                        projection=self.name,
                        first=applying.first,
                        size=applying.size,
                        retry_size=self._narrow_size,
                        error=_error_text(exc),
                    )
                    continue
                else:
                    delay = min(max(delay * 2, 0.1), self._max_backoff_s)
                    position = applying.first if applying else self._checkpoint.position
                    self._report_failure(position, exc, delay)
                await asyncio.sleep(delay)
                continue
            if self.failure is not None:
                log.info(
                    "projection_recovered",
                    projection=self.name,
                    position=self.failure.position,
                )
                self.failure = None
                metrics.set_projection_failure(self.name, None)
                # The event that failed is applied: the rest go in whole batches
                # again (a next failure is narrowed down afresh).
                self._narrow_until = None
            if self._narrow_until is not None and _reached(
                self._checkpoint, self._narrow_until
            ):
                self._narrow_until = None
            self.failing = False
            delay = 0.0
            if not more:
                await wake.wait(seen, self._poll_interval_s)

    def _report_failure(self, position: int, exc: Exception, retry_in_s: float) -> None:
        """One log line per distinct (position, error), not one per retry."""
        failure = Failure(self.name, position, _error_text(exc))
        if failure == self.failure:
            return
        self.failure = failure
        metrics.set_projection_failure(self.name, position)
        log.error(
            "projection_failed",
            projection=self.name,
            position=position,
            error=failure.error,
            retry_in_s=retry_in_s,
            exc_info=exc,
        )

    async def catch_up(self) -> None:
        """Apply until every event committed before the call is applied (by this or
        another replica): the log head, once those events read below the gap-safe
        horizon (`eventstore.settle`; a transaction open since before the newest
        commit hides them from the head until it ends).

        Errors propagate: a caller that wants retries runs `run`.
        """
        await eventstore.settle(self._pool, eventstore.SETTLE_WAIT_S)
        target = await eventstore.head(self._pool)
        if self._start_head is None:
            self._start_head = target
        while not _reached(self._checkpoint, target):
            if not await self.step() and not _reached(self._checkpoint, target):
                # Another replica holds the projection: follow its checkpoint row.
                await asyncio.sleep(min(0.05, self._poll_interval_s))

    # A bounded wait is the contract of ?min_position= (API.md), so the budget is a
    # parameter rather than the caller's asyncio.timeout.
    async def wait_for(self, position: int, timeout: float) -> None:  # noqa: ASYNC109
        """Return once the event at `position` is applied, else raise ProjectionLag.

        Positions are not in commit order, so "applied" compares the event's
        (tx_id, position) with the checkpoint; an unknown position waits it out.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Until then, a position the tail may still read is awaited in memory.
        ask_at = loop.time() + LEARN_WAIT_S
        order = self._commit_order
        target: Checkpoint | None = None
        while position > 0:
            advanced = self._advanced
            learned = None if order is None else order.learned
            if target is None and order is not None:
                target = order.checkpoint_of(position)
            learning = (
                target is None
                and order is not None
                and order.may_learn(position)
                and loop.time() < ask_at
            )
            if target is None and not learning:
                target = await eventstore.checkpoint_of(self._pool, position)
            if target is not None and _reached(self._checkpoint, target):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ProjectionLag(
                    f"the {self.name} projection has not reached position {position}"
                    f" within {timeout:g} s; retry later"
                )
            if learned is not None and learning:
                await _wait(learned, min(remaining, ask_at - loop.time()))
                continue
            # Until the event is committed, look it up again at every poll.
            if target is None:
                remaining = min(remaining, self._poll_interval_s)
            await _wait(advanced, remaining)

    def _narrow(self, failed: _Batch) -> None:
        """Retry the events of `failed` (and of the batch it narrows, if any) in
        batches of half its size."""
        until = self._narrow_until
        if until is None or not _reached(until, failed.last):
            self._narrow_until = failed.last
        self._narrow_size = max(1, failed.size // 2)

    def _step_size(self) -> int:
        """One event while a failure is reported, the narrowed size while a failed
        batch is retried, else the whole batch size."""
        if self.failure is not None:
            return 1
        if self._narrow_until is not None:
            return self._narrow_size
        return self._batch_size

    async def step(self, size: int | None = None) -> bool:
        """Apply at most one batch of `size` events (default: the batch size);
        True when it was full (more may be waiting)."""
        if size is None:
            size = self._batch_size
        async with self._step_lock:
            if self.follow_only:
                return await self._step_following()
            if self.persistent:
                return await self._step_persistent(size)
            return await self._step_in_memory(size)

    async def _step_persistent(self, size: int) -> bool:
        apply = self._apply
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                if not await conn.fetchval(_TRY_LOCK, self.name):
                    row = await conn.fetchrow(_CHECKPOINT, self.name)
                    if row is not None:
                        await self._follow(conn, _checkpoint(row), row["updated_at"])
                    return False
                row = await conn.fetchrow(_CHECKPOINT, self.name)
                if row is None:
                    await conn.execute(_CREATE_CHECKPOINT, self.name)
                current = Checkpoint() if row is None else _checkpoint(row)
                if isinstance(apply, ApplyRows):
                    read, end, last = await self._apply_rows(conn, apply, current, size)
                else:
                    read, end, last = await self._apply_records(conn, current, size)
                if end != current:
                    moved = await conn.fetch(
                        _MOVE_CHECKPOINT,
                        self.name,
                        end.tx_id,
                        end.position,
                        current.tx_id,
                        current.position,
                        CHECKPOINT_CHANNEL,
                        announcement(self.name, end),
                    )
                    if not moved:
                        raise LostCheckpoint(f"{self.name} moved during a batch")
            # Committed: only now is the batch visible, so only now may waiters go.
            self._advance(end)
            return await self._measure(conn, read, last)

    async def _apply_records(
        self, conn: Connection, current: Checkpoint, size: int
    ) -> tuple[int, Checkpoint, tuple[int, datetime] | None]:
        """Read and apply a batch of decoded events after `current`; returns (rows
        read, where the batch ends, the position and recorded_at of its last
        applied event)."""
        apply = self._apply
        assert not isinstance(apply, FoldRows | ApplyRows)
        batch = await eventstore.read_batch(conn, current, size)
        records = batch.records
        self._pass_over(batch.refused)
        if records:
            self._applying = _Batch.of(records)
            await apply(conn, records)
            self._applying = None
        return len(records) + len(batch.refused), batch.end, _last(records)

    async def _apply_rows(
        self, conn: Connection, apply: ApplyRows, current: Checkpoint, size: int
    ) -> tuple[int, Checkpoint, tuple[int, datetime] | None]:
        """`_apply_records` of a projection that applies rows as read."""
        rows = await apply.read(conn, current, size)
        if not rows:
            return 0, current, None
        last = rows[-1]
        end = eventstore.place_of(last)
        self._applying = _Batch(rows[0]["global_position"], end, len(rows))
        refused = await apply.apply(conn, rows)
        self._applying = None
        self._pass_over(refused)
        return len(rows), end, (last["global_position"], last["recorded_at"])

    async def _step_following(self) -> bool:
        # A new announcement is the newest commit's checkpoint: taken without a
        # read, but the row (and the lag gauges) is read at least every poll.
        heard = self.announced.get(self.name)
        now = asyncio.get_running_loop().time()
        if heard is not None and heard != self._heard_last:
            self._heard_last = heard
            if now < self._followed_at + self._poll_interval_s:
                self._advance(heard)
                return False
        self._followed_at = now
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_CHECKPOINT, self.name)
            if row is not None:
                await self._follow(conn, _checkpoint(row), row["updated_at"])
        return False

    async def _step_in_memory(self, size: int) -> bool:
        apply = self._apply
        async with self._pool.acquire() as conn:
            if isinstance(apply, FoldRows):
                return await self._step_rows(conn, apply, size)
            read, end, last = await self._apply_records(conn, self._checkpoint, size)
            self._advance(end)
            return await self._measure(conn, read, last)

    async def _step_rows(self, conn: Connection, apply: FoldRows, size: int) -> bool:
        rows = await apply.read(conn, self._checkpoint, size)
        if not rows:
            return await self._measure(conn, 0, None)
        if self._commit_order is not None:
            self._commit_order.note(self._checkpoint, rows)
        first, last = rows[0], rows[-1]
        end = Checkpoint(last["tx_id"], last["global_position"])
        self._applying = _Batch(first["global_position"], end, len(rows))
        refused = apply.fold(rows)
        self._applying = None
        self._pass_over(refused)
        self._advance(end)
        return await self._measure(
            conn, len(rows), (last["global_position"], last["recorded_at"])
        )

    def _pass_over(self, refused: Sequence[Refused]) -> None:
        """Legacy events with no current form: every reader refuses the same ones,
        so passing over them keeps the projections in agreement. Each is said once,
        loudly: a log line, /metrics, and /readyz (the last few)."""
        for event in refused:
            if event.global_position <= self._refused_up_to:
                continue  # a batch retried after a failure
            self._refused_up_to = event.global_position
            self.refused = [*self.refused[-(MAX_REFUSED_SHOWN - 1) :], event]
            metrics.count_refused_event(self.name)
            log.error(
                "event_refused",
                projection=self.name,
                position=event.global_position,
                event_id=event.event_id,
                stream_id=event.stream_id,
                type=event.type,
                schema_version=event.schema_version,
                code=event.code,
                error=event.message,
            )

    async def _follow(
        self, conn: Connection, checkpoint: Checkpoint, updated_at: datetime
    ) -> None:
        """Track the checkpoint another replica writes (for waits and readiness)."""
        self._advance(checkpoint)
        head = await eventstore.max_position(conn)
        self.lag_events = max(0, head - checkpoint.position)
        since = (datetime.now(UTC) - updated_at).total_seconds()
        self.lag_seconds = since if self.lag_events else 0.0
        self._report()

    def _advance(self, checkpoint: Checkpoint) -> None:
        if checkpoint == self._checkpoint:
            return
        self._checkpoint = checkpoint
        advanced, self._advanced = self._advanced, asyncio.Event()
        advanced.set()

    async def _measure(
        self, conn: Connection, read: int, last: tuple[int, datetime] | None
    ) -> bool:
        """Whether the batch of `read` rows was full, and the lag after it (`last`:
        the position and recorded_at of its last event)."""
        narrowed = self._narrow_until is not None or self.failure is not None
        full = read > 0 and (read >= self._batch_size or narrowed)
        if full and last is not None:
            head = await eventstore.max_position(conn)
            position, recorded_at = last
            self.lag_events = max(0, head - position)
            age = datetime.now(UTC) - recorded_at
            self.lag_seconds = max(0.0, age.total_seconds())
        else:
            self.lag_events, self.lag_seconds = 0, 0.0
        self._report()
        return full

    def _report(self) -> None:
        metrics.set_projection_lag(
            self.name, events=self.lag_events, seconds=self.lag_seconds
        )


def _last(records: Sequence[RecordedEvent]) -> tuple[int, datetime] | None:
    """The position and recorded_at of the last of `records` (None: no records)."""
    return (records[-1].global_position, records[-1].recorded_at) if records else None


class Listener:
    """The process's one LISTEN connection: every notification of new events wakes
    `wake`, every moved checkpoint wakes `moved`.

    After each (re)connect it wakes the projectors once, since events appended while
    nobody listened sent their notifications to no one.
    """

    def __init__(
        self,
        dsn: str,
        wake: Wake,
        *,
        moved: Wake | None = None,
        heartbeat_s: float = 30.0,
    ) -> None:
        self._dsn = dsn
        self._wake = wake
        self._moved = moved or Wake()
        self._heartbeat_s = heartbeat_s
        self.pid: int | None = None
        self.listening = asyncio.Event()

    async def run(self) -> None:
        delay = 0.0
        while True:
            try:
                await self._listen()
                delay = 0.0
            except Exception:
                delay = min(max(delay * 2, 0.1), 5.0)
                log.warning("listener_failed", retry_in_s=delay, exc_info=True)
            finally:
                self.listening.clear()
                self.pid = None
            await asyncio.sleep(delay)

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(CHANNEL, self._notified)
            await conn.add_listener(CHECKPOINT_CHANNEL, self._checkpoint_moved)
            self.pid = conn.get_server_pid()
            self.listening.set()
            log.info("listener_connected", pid=self.pid)
            self._wake.notify()
            self._moved.notify()
            while not lost.is_set():
                if not await _wait(lost, self._heartbeat_s):
                    # A peer that vanished without a word shows up as an error here.
                    await conn.execute("SELECT 1", timeout=self._heartbeat_s)
            log.warning("listener_lost", pid=self.pid)
        finally:
            if not conn.is_closed():
                conn.terminate()

    def _notified(
        self, _conn: object, _pid: int, _channel: str, _payload: object
    ) -> None:
        self._wake.notify()

    def _checkpoint_moved(
        self, _conn: object, _pid: int, _channel: str, payload: object
    ) -> None:
        heard = announced(payload) if isinstance(payload, str) else None
        if heard is not None:
            name, checkpoint = heard
            self._moved.checkpoints[name] = checkpoint
        self._moved.notify()


class Tail:
    """One LISTEN connection and the projector tasks it wakes, for one process."""

    def __init__(self, dsn: str) -> None:
        self.wake = Wake()
        self.moved = Wake()  # a SQL projector moved its checkpoint (any process)
        # Noted by the process's in-memory tail, read by every wait for a position.
        self.commit_order = CommitOrder()
        self.listener = Listener(dsn, self.wake, moved=self.moved)
        self._tasks = [asyncio.create_task(self.listener.run(), name="listener")]

    def start(self, projector: Projector) -> None:
        """Run `projector` until `stop`; a follower wakes when a checkpoint moved,
        the others when events are appended."""
        wake = self.moved if projector.follow_only else self.wake
        self._tasks.append(
            asyncio.create_task(projector.run(wake), name=f"projector:{projector.name}")
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
