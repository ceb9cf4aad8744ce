"""CommitOrder: a wait for ?min_position= finds a recent position's checkpoint in
what the process's tail read, and asks the database only for what it does not hold
(before the tail's first read, forgotten, or never read)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from projections import governance
from projections.commit_order import CommitOrder
from projections.runner import LEARN_WAIT_S, FoldRows, Projector
from service import eventstore
from service.errors import ProjectionLag
from service.records import Checkpoint
from tests.test_projections import a_customer


def read(*pairs: tuple[int, int]) -> list[dict[str, int]]:
    """Rows as a tail reads them: (tx_id, global_position) pairs."""
    return [{"tx_id": tx_id, "global_position": position} for tx_id, position in pairs]


def test_a_noted_position_has_the_checkpoint_it_was_read_with() -> None:
    order = CommitOrder()
    order.note(Checkpoint(7, 10), read((8, 12), (8, 13), (9, 11)))

    assert order.checkpoint_of(11) == Checkpoint(9, 11)
    assert order.checkpoint_of(13) == Checkpoint(8, 13)
    assert order.checkpoint_of(14) is None


def test_only_positions_past_the_first_read_and_the_forgotten_may_be_learned() -> None:
    order = CommitOrder(capacity=2)
    assert not order.may_learn(1)  # nothing read yet: only the database knows

    order.note(Checkpoint(7, 10), read((8, 12), (8, 13)))
    assert (order.may_learn(10), order.may_learn(11)) == (False, True)

    order.note(Checkpoint(8, 13), read((9, 15), (9, 14)))  # 12 and 13 forgotten
    assert order.checkpoint_of(12) is None
    assert order.checkpoint_of(14) == Checkpoint(9, 14)
    assert (order.may_learn(13), order.may_learn(14)) == (False, True)


def test_a_note_wakes_whoever_waits_to_learn() -> None:
    order = CommitOrder()
    learned = order.learned

    order.note(Checkpoint(), read((3, 4)))

    assert learned.is_set()
    assert not order.learned.is_set()  # the next note's


# --- waits, against the log ----------------------------------------------------------


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every position a wait asks the database about (the real lookup still runs)."""
    asked: list[int] = []
    lookup = eventstore.checkpoint_of

    async def counted(conn: Any, position: int) -> Checkpoint | None:
        asked.append(position)
        return await lookup(conn, position)

    monkeypatch.setattr(eventstore, "checkpoint_of", counted)
    return asked


def _nothing(rows: Sequence[Any]) -> list[Any]:
    return []


def tail_of(
    pool: Any, order: CommitOrder, start: Checkpoint | None = None
) -> Projector:
    """An in-memory projection that folds rows, noting them in `order`."""
    return Projector(
        pool,
        "noting",
        FoldRows(_nothing),
        persistent=False,
        start=start,
        commit_order=order,
    )


async def test_a_wait_for_a_position_the_tail_read_asks_no_database(pool, lookups):
    order = CommitOrder()
    tail = tail_of(pool, order)
    _, position = await a_customer(pool)
    await tail.catch_up()

    await tail.wait_for(position, timeout=5)

    assert lookups == []


async def test_a_wait_learns_a_position_the_tail_reads_after_it_began(pool, lookups):
    order = CommitOrder()
    tail = tail_of(pool, order)
    await a_customer(pool)
    await tail.catch_up()  # the tail's first read
    _, position = await a_customer(pool)

    waiting = asyncio.create_task(tail.wait_for(position, timeout=5))
    done, _ = await asyncio.wait({waiting}, timeout=LEARN_WAIT_S / 4)
    assert not done  # not read yet: waiting to learn it
    await tail.catch_up()
    await waiting

    assert lookups == []


async def test_a_position_before_the_tail_began_is_asked_of_the_database(pool, lookups):
    _, before = await a_customer(pool)
    tail = tail_of(pool, CommitOrder(), start=await eventstore.head(pool))
    await a_customer(pool)
    await tail.catch_up()

    await tail.wait_for(before, timeout=5)

    assert lookups == [before]


async def test_a_position_never_read_is_asked_of_the_database_then_refused(
    pool, lookups
):
    tail = tail_of(pool, CommitOrder())
    await a_customer(pool)
    await tail.catch_up()

    with pytest.raises(ProjectionLag):
        await tail.wait_for(10**9, timeout=LEARN_WAIT_S * 3)

    assert lookups
    assert set(lookups) == {10**9}


async def test_the_read_model_waits_with_what_the_cache_tail_read(pool, lookups):
    order = CommitOrder()
    tail = tail_of(pool, order)
    model = Projector(pool, "governance", governance.APPLIER, commit_order=order)
    _, position = await a_customer(pool)
    await tail.catch_up()
    await model.catch_up()

    await model.wait_for(position, timeout=5)

    assert lookups == []
