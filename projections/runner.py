"""The tail loop: projectors that follow the log gap-safely, woken by LISTEN/NOTIFY
and a poll; a SQL projector applies each batch and moves its checkpoint in one
transaction under an advisory lock, so one replica at a time applies it exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import asyncpg
import structlog

from service import eventstore, metrics
from service.errors import ProjectionLag
from service.eventstore import UNREACHABLE, Connection, Executor
from service.records import Checkpoint, RecordedEvent

log = structlog.get_logger()

CHANNEL = "govledger_events"
BATCH_SIZE = 500

Apply = Callable[[Connection, Sequence[RecordedEvent]], Awaitable[None]]

# Two-int advisory lock key: (this table's oid, hashtext(projection name)), so it
# cannot collide with the locks of other code in the same database.
_TRY_LOCK = (
    "SELECT pg_try_advisory_xact_lock("
    "'projection_checkpoints'::regclass::oid::int, hashtext($1))"
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
_MOVE_CHECKPOINT = """
UPDATE projection_checkpoints
SET last_tx_id = $2, last_position = $3, updated_at = now()
WHERE projection = $1 AND last_tx_id = $4 AND last_position = $5
"""


class LostCheckpoint(Exception):
    """The checkpoint moved while this batch ran: someone else applied it."""


async def load_checkpoint(conn: Executor, name: str) -> Checkpoint:
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
    the others (a waiter passes the generation it saw before it last read)."""

    def __init__(self) -> None:
        self.generation = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seen: int, at_most_s: float) -> None:
        """Return once notified after generation `seen`, or after `at_most_s`."""
        if self.generation != seen:
            return
        await _wait(self._event, at_most_s)


class Projector:
    """Follows the log from its checkpoint and applies batches in (tx_id, position)
    order, never skipping one.

    persistent=True: `apply` writes SQL; each batch and the `projection_checkpoints`
    row move together in one transaction under an advisory lock; while another
    replica holds it this one only follows the row. persistent=False: an in-memory
    projection; `apply` must not write, the checkpoint lives in this object only
    (starting at `start`), and a failed batch is retried whole, so `apply` must leave
    its state unchanged when it raises (or be idempotent per event).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        name: str,
        apply: Apply,
        *,
        persistent: bool = True,
        start: Checkpoint | None = None,
        batch_size: int = BATCH_SIZE,
        poll_interval_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.name = name
        self.persistent = persistent
        self._pool = pool
        self._apply = apply
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._max_backoff_s = max_backoff_s
        self._checkpoint = start or Checkpoint()
        self._advanced = asyncio.Event()
        self._step_lock = asyncio.Lock()
        self._start_head: Checkpoint | None = None
        self._ready = False
        # The last attempt to read or apply failed (the database may be out of
        # reach): what this projection serves is as of `checkpoint`, maybe stale.
        self.failing = False
        # Lag as of the last step: events behind the log head, and seconds.
        self.lag_events = 0
        self.lag_seconds = 0.0

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
        """Follow the log for ever; on error log, back off and retry the same place."""
        delay = 0.0
        while True:
            seen = wake.generation
            try:
                if self._start_head is None:
                    self._start_head = await eventstore.head(self._pool)
                more = await self.step()
            except Exception as exc:
                self.failing = True
                # An unreachable database is tried again at least every second, so
                # the projection resumes soon after it is back.
                cap = 1.0 if isinstance(exc, UNREACHABLE) else self._max_backoff_s
                delay = min(max(delay * 2, 0.1), cap)
                log.exception(
                    "projection_failed",
                    projection=self.name,
                    position=self._checkpoint.position,
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)
                continue
            self.failing = False
            delay = 0.0
            if not more:
                await wake.wait(seen, self._poll_interval_s)

    async def catch_up(self) -> None:
        """Apply until the log head seen now is reached (by this or another replica).

        Errors propagate: a caller that wants retries runs `run`.
        """
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
        target: Checkpoint | None = None
        while position > 0:
            advanced = self._advanced
            if target is None:
                target = await eventstore.checkpoint_of(self._pool, position)
            if target is not None and _reached(self._checkpoint, target):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ProjectionLag(
                    f"the {self.name} projection has not reached position {position}"
                    f" within {timeout:g} s; retry later"
                )
            # Until the event is committed, look it up again at every poll.
            if target is None:
                remaining = min(remaining, self._poll_interval_s)
            await _wait(advanced, remaining)

    async def step(self) -> bool:
        """Apply at most one batch; True when it was full (more may be waiting)."""
        async with self._step_lock:
            if self.persistent:
                return await self._step_persistent()
            return await self._step_in_memory()

    async def _step_persistent(self) -> bool:
        records: list[RecordedEvent] = []
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
                records = await eventstore.read_all(conn, current, self._batch_size)
                if records:
                    await self._apply(conn, records)
                    new = records[-1].checkpoint
                    status = await conn.execute(
                        _MOVE_CHECKPOINT,
                        self.name,
                        new.tx_id,
                        new.position,
                        current.tx_id,
                        current.position,
                    )
                    if status != "UPDATE 1":
                        raise LostCheckpoint(f"{self.name} moved during a batch")
            # Committed: only now is the batch visible, so only now may waiters go.
            self._advance(records[-1].checkpoint if records else current)
            return await self._measure(conn, records)

    async def _step_in_memory(self) -> bool:
        async with self._pool.acquire() as conn:
            records = await eventstore.read_all(
                conn, self._checkpoint, self._batch_size
            )
            if records:
                await self._apply(conn, records)
                self._advance(records[-1].checkpoint)
            return await self._measure(conn, records)

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
        self, conn: Connection, records: Sequence[RecordedEvent]
    ) -> bool:
        full = len(records) >= self._batch_size
        if full:
            head = await eventstore.max_position(conn)
            self.lag_events = max(0, head - records[-1].global_position)
            age = datetime.now(UTC) - records[-1].recorded_at
            self.lag_seconds = max(0.0, age.total_seconds())
        else:
            self.lag_events, self.lag_seconds = 0, 0.0
        self._report()
        return full

    def _report(self) -> None:
        metrics.set_projection_lag(
            self.name, events=self.lag_events, seconds=self.lag_seconds
        )


class Listener:
    """The process's one LISTEN connection: every notification wakes `wake`.

    After each (re)connect it wakes the projectors once, since events appended while
    nobody listened sent their notifications to no one.
    """

    def __init__(self, dsn: str, wake: Wake, *, heartbeat_s: float = 30.0) -> None:
        self._dsn = dsn
        self._wake = wake
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
            self.pid = conn.get_server_pid()
            self.listening.set()
            log.info("listener_connected", pid=self.pid)
            self._wake.notify()
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


class Tail:
    """One LISTEN connection and the projector tasks it wakes, for one process."""

    def __init__(self, dsn: str) -> None:
        self.wake = Wake()
        self.listener = Listener(dsn, self.wake)
        self._tasks = [asyncio.create_task(self.listener.run(), name="listener")]

    def start(self, projector: Projector) -> None:
        """Run `projector` until `stop`."""
        self._tasks.append(
            asyncio.create_task(
                projector.run(self.wake), name=f"projector:{projector.name}"
            )
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
