"""The governance projector's ledgers kept between batches.

An owner's ledger is loaded from the read model once and reused while its
governance_ledgers row is the version this projector last wrote: the row's xmin
(`stamp`) changes with every write of the row, by anyone, and goes back when a write
rolls back, so a replay's swap, another replica's batches, a rolled-back batch or a
truncated table all show as a stamp that differs, and the ledger is loaded again. A
batch reads first (which owners have a ledger, which usage is new), folds in memory
(`service.domain.ledger` decides everything) and writes at `flush`; any failure
forgets everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice

from projections.governance_usage import (
    Delivery,
    Entry,
    Names,
    Owner,
    chain_of,
    charged_up_to,
    entries_of,
    fold,
    fresh_charges,
    mark_charged,
    stamps_of,
    write,
)
from service.domain.events import UsageRecorded
from service.domain.ledger import Ledger
from service.eventstore import Connection

# At most this many sets of names keep their chains (memory bounded).
_CHAINS_KEPT = 100_000
# At most this many ledgers are kept between batches (1-2 KB each), the least
# recently written forgotten first: a forgotten one is read again when next needed.
LEDGERS_KEPT = 200_000


class Books:
    """Ledgers by owner: `kept` (written, valid while their row's stamp is theirs)
    and `open` (taken by this batch: changed in memory, written at `flush`)."""

    def __init__(self) -> None:
        self._kept: dict[Owner, Entry] = {}
        self._open: dict[Owner, Entry] = {}
        # (tx_id, position) each usage stream is charged up to, not yet written.
        self._marks: dict[str, tuple[int, int]] = {}
        # The owners each set of names charges (`chain_of`), kept across batches.
        self._chains: dict[Names, list[Owner]] = {}
        self.busy = False

    async def take(
        self, conn: Connection, owners: Iterable[Owner]
    ) -> dict[Owner, Entry]:
        """The entries of those `owners` that have a ledger, open until `flush`."""
        found: dict[Owner, Entry] = {}
        wanted: list[Owner] = []
        for owner in sorted(set(owners)):
            entry = self._open.get(owner)
            if entry is None:
                wanted.append(owner)
            else:
                found[owner] = entry
        if not wanted:
            return found
        stamps = await stamps_of(conn, wanted)
        kept = self._kept
        stale = [
            o for o, stamp in stamps.items() if o not in kept or kept[o].stamp != stamp
        ]
        loaded = await entries_of(conn, stale, stamps) if stale else {}
        for owner in wanted:
            entry = kept.pop(owner, None)
            if owner in loaded:
                entry = loaded[owner]
            elif owner not in stamps or owner in stale:
                continue  # no ledger (not yet, or not any more)
            assert entry is not None
            self._open[owner] = found[owner] = entry
        return found

    def open(self, owner: Owner, ledger: Ledger) -> Entry:
        """The entry of an owner whose ledger row was created just now."""
        self._kept.pop(owner, None)
        entry = self._open[owner] = Entry(ledger, None, False)
        return entry

    def drop(self, owner: Owner) -> None:
        """Forget an owner that is gone."""
        self._kept.pop(owner, None)
        self._open.pop(owner, None)

    async def charge(
        self, conn: Connection, usage: Sequence[tuple[Delivery, UsageRecorded]]
    ) -> None:
        """Fold a run of usage into the ledgers of the owners it names (those that
        exist); the usage streams' guard passes over what was charged before.
        Positions of one stream arrive in (tx_id, position) order."""
        marks = self._marks
        unknown = sorted({r.stream_id for r, _ in usage}.difference(marks))
        seen = await charged_up_to(conn, unknown) if unknown else {}
        seen.update(marks)
        charges = fresh_charges(usage, seen, marks)
        if not charges:
            return
        known = self._chains
        if len(known) > _CHAINS_KEPT:
            known.clear()
        chains: dict[Names, list[Owner]] = {}
        for names in {names for names, _ in charges}:
            chain = known.get(names)
            if chain is None:
                chain = known[names] = chain_of(names)
            chains[names] = chain
        entries = await self.take(conn, [o for chain in chains.values() for o in chain])
        fold(
            charges,
            {
                names: [entries[o].ledger for o in chain if o in entries]
                for names, chain in chains.items()
            },
        )

    async def flush(self, conn: Connection) -> None:
        """Write what the open ledgers and the usage streams' guard moved."""
        if self._marks:
            await mark_charged(conn, self._marks)
            self._marks = {}
        if self._open:
            opened, self._open = self._open, {}
            await write(conn, opened)
            kept = self._kept
            for owner, entry in opened.items():
                if entry.stamp:
                    kept[owner] = entry  # `take` popped it: now the most recent
            for owner in list(islice(kept, max(0, len(kept) - LEDGERS_KEPT))):
                del kept[owner]

    @property
    def kept(self) -> int:
        """How many ledgers are kept between batches."""
        return len(self._kept)

    def forget(self) -> None:
        """After a failure: the tables may not hold what memory does."""
        self._kept.clear()
        self._open.clear()
        self._marks.clear()
