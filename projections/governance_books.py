"""The governance projector's ledgers kept between batches.

An owner's ledger is loaded from the read model once and reused while its
governance_ledgers row is the version this projector last wrote: the row's xmin
(`stamp`) changes with every write of the row, by anyone, and goes back when a write
rolls back, so a replay's swap, another replica's batches, a rolled-back batch or a
truncated table all show as a stamp that differs, and the ledger is loaded again. A
batch reads first (which owners have a ledger, what its usage streams were charged up
to), folds in memory (`service.domain.ledger` decides everything) and writes at
`flush`; any failure forgets everything.

Usage comes a run of records at a time (`add`: the streams' guard, and what each
charges), in log order, and is charged a run at a time (`charge`: the ledgers of
the owners the run names taken at once, then each ledger's records folded in
order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any, Protocol

from projections.governance_usage import (
    Charged,
    Entry,
    Names,
    Owner,
    chain_of,
    charged_up_to,
    entries_of,
    fold,
    group,
    stamps_of,
    write,
)
from service.domain.ledger import Charge, Ledger, charge_of
from service.eventstore import Connection

# At most this many sets of names keep their chains (memory bounded).
_CHAINS_KEPT = 100_000
# At most this many ledgers are kept between batches (1-2 KB each), the least
# recently written forgotten first: a forgotten one is read again when next needed.
LEDGERS_KEPT = 200_000
_NOTHING = (0, 0)


class Row(Protocol):
    """Where a usage record sits, as `add` reads it: stream_id, tx_id,
    global_position and recorded_at by name (a row of `eventstore.read_rows`)."""

    def __getitem__(self, column: str, /) -> Any: ...


class Books:
    """Ledgers by owner: `kept` (written, valid while their row's stamp is theirs)
    and `open` (taken by this batch: changed in memory, written at `flush`)."""

    def __init__(self) -> None:
        self._kept: dict[Owner, Entry] = {}
        self._open: dict[Owner, Entry] = {}
        # (tx_id, position) each usage stream is charged up to: as stored (read by
        # `expect`), or as moved by `add`; `_marks` what moved, not yet written.
        self._seen: dict[str, tuple[int, int]] = {}
        self._marks: dict[str, tuple[int, int]] = {}
        # What `add` found to charge, not yet charged; the records among it that
        # name a hold.
        self._run: list[tuple[Names, Charge]] = []
        self._holding: list[Charged] = []
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

    async def expect(self, conn: Connection, streams: Iterable[str]) -> None:
        """Read what these usage streams were charged up to, before `add` meets
        their records (those this batch has read or moved already are known)."""
        seen = self._seen
        unknown = sorted(set(streams).difference(seen))
        if unknown:
            seen.update(await charged_up_to(conn, unknown))

    def add(self, rows: Sequence[Row], usages: Sequence[Charged]) -> None:
        """The usage records `usages` decoded from `rows` (as `eventstore.read_rows`
        reads them, their streams `expect`ed), to be charged at the next `charge`;
        the usage streams' guard passes over one whose stream was charged up to it
        or past it. Records of one stream come in (tx_id, position) order."""
        seen, marks, run, holding = self._seen, self._marks, self._run, self._holding
        for row, usage in zip(rows, usages, strict=True):
            stream = row["stream_id"]
            mark = (row["tx_id"], row["global_position"])
            if mark <= seen.get(stream, _NOTHING):
                continue
            seen[stream] = marks[stream] = mark
            names = (
                usage.virtual_key_id,
                usage.provider_config_id,
                usage.team_id,
                usage.customer_id,
            )
            run.append((names, charge_of(usage, row["recorded_at"])))
            if usage.reservation_id is not None:
                holding.append(usage)

    @property
    def adding(self) -> bool:
        """Whether records were added since the last `charge`."""
        return bool(self._run)

    async def charge(self, conn: Connection) -> list[Charged]:
        """Fold the records added since the last `charge` into the ledgers of the
        owners they name (those that exist); returns those that name a hold."""
        charges, self._run = self._run, []
        holding, self._holding = self._holding, []
        if not charges:
            return holding
        known = self._chains
        if len(known) > _CHAINS_KEPT:
            known.clear()
        groups = group(charges)
        chains: dict[Names, list[Owner]] = {}
        for names in groups:
            chain = known.get(names)
            if chain is None:
                chain = known[names] = chain_of(names)
            chains[names] = chain
        entries = await self.take(conn, [o for chain in chains.values() for o in chain])
        fold(
            charges,
            groups,
            {
                names: [entries[o].ledger for o in chain if o in entries]
                for names, chain in chains.items()
            },
        )
        return holding

    async def flush(self, conn: Connection) -> None:
        """Write what the open ledgers and the usage streams' guard moved."""
        if self._marks or self._open:
            opened, self._open = self._open, {}
            marks, self._marks = self._marks, {}
            await write(conn, opened, marks)
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

    def end_batch(self) -> None:
        """After a batch is written: what the usage streams were charged up to is
        read again by the next (a replay or a reset may have changed it)."""
        self._seen.clear()

    def forget(self) -> None:
        """After a failure: the tables may not hold what memory does."""
        self._kept.clear()
        self._open.clear()
        self._seen.clear()
        self._marks.clear()
        self._run.clear()
        self._holding.clear()
