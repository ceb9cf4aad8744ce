"""Where the events a tail read lately sit in commit order: position → tx_id.

A wait for ?min_position= must know the checkpoint (tx_id, position) of that
position before it can compare it with a projection's: positions are drawn before
their transactions commit, so they are not in commit order. Asking the database
(`eventstore.checkpoint_of`) costs a round trip per wait, and under load that round
trip was most of the wait. The enforcement cache's tail reads every event anyway and
notes each one's tx_id here, so a wait for a recent position finds it in memory.
What this does not hold (forgotten, older than the tail's start, not read yet) the
waiter asks the database for, as before.

Exact by construction: only committed events are read, and a committed event's
tx_id never changes. Which events a projection has applied is not kept here: that is
still the comparison with its checkpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from service.records import Checkpoint

# Two generations of at most this many positions each: at full ingest here (about
# 20,000 events/s) the last two to three seconds, in a few MiB.
CAPACITY = 32_768


class _Row(Protocol):
    """A row as read (an asyncpg Record): its columns by name."""

    def __getitem__(self, column: str, /) -> Any: ...


class CommitOrder:
    """The tx_id of every event read since the tail started, the newest first
    forgotten last; `learned` is set by the next `note`."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._newer: dict[int, int] = {}
        self._older: dict[int, int] = {}
        # Positions at or below it were before the first note, or may have been
        # noted and forgotten: only the database knows them. None: nothing noted.
        self._floor: int | None = None
        self._learned = asyncio.Event()

    @property
    def learned(self) -> asyncio.Event:
        """Set at the next `note` (take it before looking a position up)."""
        return self._learned

    def note(self, after: Checkpoint, rows: Sequence[_Row]) -> None:
        """Rows as a tail read them after `after` (each with its global_position and
        tx_id), then wake whoever waits to learn a position."""
        if self._floor is None:
            self._floor = after.position
        newer = self._newer
        for row in rows:
            newer[row["global_position"]] = row["tx_id"]
        if len(newer) >= self._capacity:
            forgotten, self._older, self._newer = self._older, newer, {}
            if forgotten:
                self._floor = max(self._floor, max(forgotten))
        learned, self._learned = self._learned, asyncio.Event()
        learned.set()

    def checkpoint_of(self, position: int) -> Checkpoint | None:
        """The checkpoint of the event at `position`, if it was read and is still
        remembered (None: ask the database, or wait to learn it)."""
        tx_id = self._newer.get(position)
        if tx_id is None:
            tx_id = self._older.get(position)
        return None if tx_id is None else Checkpoint(tx_id, position)

    def may_learn(self, position: int) -> bool:
        """Whether reading on may still note `position`: it is past every position
        read before the first note or forgotten since."""
        return self._floor is not None and position > self._floor
