"""The governance projector keeps ledgers between batches (governance_books):
whatever happened to the tables meanwhile (a rolled-back batch, a replay's swap,
rows deleted), the next batch folds what the tables hold, not what memory held."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from projections import governance, governance_books, replay
from projections.runner import Projector
from service.domain.events import RateLimit, VirtualKeyUpdated
from service.records import RecordedEvent
from tests.builders import append, budget, key_created, uid, usage_event

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


async def spend_of(pool, budget_id: str) -> Decimal:
    value = await pool.fetchval(
        "SELECT coalesce(sum(spend), 0) FROM governance_budget_spend"
        " WHERE budget_id = $1",
        budget_id,
    )
    return Decimal(value)


async def a_key(pool) -> tuple[str, str]:
    key_id, budget_id = uid(), uid()
    await append(
        pool,
        f"virtual_key-{key_id}",
        key_created(key_id, budgets=(budget(budget_id, "100", "1d"),)),
        at=T0,
    )
    return key_id, budget_id


async def spend(pool, key_id: str, cost: str, seconds: int, *, ahead: int = -1) -> None:
    """Usage recorded at T0 + `seconds` that occurred `ahead` seconds from then
    (before it: filed at once; at or after it: pending until the clock passes)."""
    at = T0 + seconds * SECOND
    event = usage_event(key_id, cost, at + ahead * SECOND)
    await append(pool, f"usage-{key_id}", event, at=at)


async def test_a_batch_rolled_back_after_apply_is_folded_again_from_the_tables(pool):
    """The batch's writes roll back with its transaction after apply returned (as
    when the checkpoint moved under it): its ledger must not stay in memory, or
    the retried batch would hold its pending usage twice."""
    key_id, budget_id = await a_key(pool)
    await spend(pool, key_id, "1", 1)
    live = Projector(pool, "governance", governance.apply)
    await live.catch_up()
    assert await spend_of(pool, budget_id) == Decimal(1)

    failures = [RuntimeError("checkpoint moved")]

    async def rolled_back(conn, records: Sequence[RecordedEvent]) -> None:
        await governance.apply(conn, records)
        if failures:
            raise failures.pop()

    await spend(pool, key_id, "2", 2, ahead=100)
    flaky = Projector(pool, "governance", rolled_back)
    with pytest.raises(RuntimeError, match="checkpoint moved"):
        await flaky.catch_up()
    assert await pool.fetchval("SELECT count(*) FROM governance_pending_usage") == 0

    await flaky.catch_up()
    assert await pool.fetchval("SELECT sum(cost) FROM governance_pending_usage") == 2
    await spend(pool, key_id, "4", 200, ahead=-198)
    await live.catch_up()
    assert await spend_of(pool, budget_id) == Decimal(7)
    assert (await replay.rebuild(pool, verify=True)).differences == []


async def test_a_replay_swapped_in_under_the_live_projector_is_read_again(pool):
    key_id, budget_id = await a_key(pool)
    await spend(pool, key_id, "1", 1)
    live = Projector(pool, "governance", governance.apply)
    await live.catch_up()

    await replay.rebuild(pool)
    await spend(pool, key_id, "2", 2)
    await live.catch_up()

    assert await spend_of(pool, budget_id) == Decimal(3)
    assert (await replay.rebuild(pool, verify=True)).differences == []


async def test_tables_emptied_under_the_live_projector_are_read_again(pool):
    """Ledgers gone from the tables are not charged from memory."""
    key_id, budget_id = await a_key(pool)
    await spend(pool, key_id, "1", 1)
    live = Projector(pool, "governance", governance.apply)
    await live.catch_up()

    await pool.execute("DELETE FROM governance_virtual_keys WHERE id = $1", key_id)
    await spend(pool, key_id, "2", 2)
    await live.catch_up()

    assert await pool.fetchval("SELECT count(*) FROM governance_ledgers") == 0
    assert await spend_of(pool, budget_id) == Decimal(0)


async def test_runs_of_created_owners_write_what_one_event_at_a_time_writes(pool):
    """A batch writes a run of created owners of one type in one statement (and
    their budgets and rate limits in another): the tables hold what applying them
    one event a batch holds. Teams name customers created before them in the
    batch, keys name those teams; one key has provider configs; a key whose budget
    id another key of the run also names starts a new run."""
    from service.domain.events import (
        CustomerCreated,
        ProviderConfig,
        RateLimit,
        TeamCreated,
    )

    limit = RateLimit(token_max_limit=1000, token_reset_duration="1h")
    customers = [uid() for _ in range(3)]
    teams = [uid() for _ in range(4)]
    keys = [uid() for _ in range(5)]
    shared = uid()
    for i, c in enumerate(customers):
        budgets = (budget(uid(), "10", "1d"), budget(uid(), "50", "1M"))
        event = CustomerCreated(
            customer_id=c,
            name=f"c{i}",
            budgets=budgets,
            rate_limit=limit if i else None,
        )
        await append(pool, f"customer-{c}", event, at=T0 + i * SECOND)
    for i, t in enumerate(teams):
        event = TeamCreated(
            team_id=t,
            name=f"t{i}",
            customer_id=customers[i % 3] if i < 3 else uid(),  # the last: dangling
            budgets=(budget(uid(), "5", "1d"),),
        )
        await append(pool, f"team-{t}", event, at=T0 + (10 + i) * SECOND)
    for i, k in enumerate(keys):
        configs = (
            (
                ProviderConfig(
                    provider_config_id=uid(),
                    provider="openai",
                    budgets=(budget(uid(), "2", "1d"),),
                    rate_limit=limit,
                ),
            )
            if i == 1
            else ()
        )
        event = key_created(
            k,
            team_id=teams[i % 4],
            budgets=(budget(shared if i in (2, 3) else uid(), "3", "1d"),),
            rate_limit=limit if i % 2 else None,
            provider_configs=configs,
        )
        await append(pool, f"virtual_key-{k}", event, at=T0 + (20 + i) * SECOND)
    for i, k in enumerate(keys):
        await spend(pool, k, "1", 30 + i)

    one_by_one = Projector(pool, "governance", governance.apply, batch_size=1)
    await one_by_one.catch_up()
    assert await pool.fetchval("SELECT count(*) FROM governance_ledgers") == 13
    assert await pool.fetchval("SELECT count(*) FROM governance_rate_limits") == 5
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM governance_teams WHERE customer_id IS NOT NULL"
        )
        == 3
    )
    # The replay applies the whole log in one batch.
    assert (await replay.rebuild(pool, verify=True)).differences == []


async def test_ledgers_kept_are_bounded_and_a_forgotten_one_is_read_again(
    copy_pool, monkeypatch
):
    """Past LEDGERS_KEPT the least recently written ledgers are forgotten; usage
    for a forgotten owner folds into what the tables hold, exactly once.

    On a database of its own: a projector of another test's process, stopping,
    must not apply a batch of this one (this test counts what its books took)."""
    pool = copy_pool
    monkeypatch.setattr(governance_books, "LEDGERS_KEPT", 2)
    books = governance_books.Books()

    async def apply(conn, records: Sequence[RecordedEvent]) -> None:
        await governance.apply(conn, records, books)

    keys = [await a_key(pool) for _ in range(4)]
    live = Projector(pool, "governance", apply)
    for n, (key_id, _) in enumerate(keys):
        await spend(pool, key_id, "1", n + 1)
        await live.catch_up()
        assert books.kept <= 2
    for n, (key_id, _) in enumerate(keys):  # the first two were forgotten
        await spend(pool, key_id, "2", n + 10)
        await live.catch_up()

    assert books.kept == 2
    assert [await spend_of(pool, budget_id) for _, budget_id in keys] == [
        Decimal(3)
    ] * 4


@pytest.mark.parametrize("kept", ["requests", "tokens"])
async def test_a_rate_limit_half_removed_takes_its_usage_along(pool, kept):
    """The live read model forgets a dropped half's usage as a replay never has it:
    the live tables kept the cells written before the half went, so `replay
    --verify` found rows only live."""
    key_id = uid()
    both = RateLimit(
        token_max_limit=1000,
        token_reset_duration="1h",
        request_max_limit=100,
        request_reset_duration="1h",
    )
    one = (
        RateLimit(request_max_limit=100, request_reset_duration="1h")
        if kept == "requests"
        else RateLimit(token_max_limit=1000, token_reset_duration="1h")
    )
    stream = f"virtual_key-{key_id}"
    await append(pool, stream, key_created(key_id, rate_limit=both), at=T0)
    usage = usage_event(key_id, "1", T0, input_tokens=10)  # filed at once
    await append(pool, f"usage-{key_id}", usage, at=T0 + SECOND)
    live = Projector(pool, "governance", governance.apply)
    await live.catch_up()
    updated = VirtualKeyUpdated(
        virtual_key_id=key_id,
        name="ci",
        value_sha256=f"sha-{key_id}",
        value_hint="abcd",
        rate_limit=one,
    )
    await append(pool, stream, updated, at=T0 + 2 * SECOND)
    await live.catch_up()

    kinds = await pool.fetch(
        "SELECT u.kind, u.used FROM governance_rate_limit_usage u"
        " JOIN governance_rate_limits r ON r.id = u.rate_limit_id"
        " WHERE r.virtual_key_id = $1",
        key_id,
    )
    assert [(r["kind"], r["used"]) for r in kinds] == [
        (kept, 10 if kept == "tokens" else 1)
    ]
    assert (await replay.rebuild(pool, verify=True)).differences == []
