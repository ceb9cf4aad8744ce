"""`ledger.charge_all` and `ledger.charge_runs` (the read model's bulk paths) fold
exactly as `ledger.charge` record by record: whatever the records, the ledger is the
same afterwards."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.governance_usage import fold, group
from service.domain.events import Budget, RateLimit
from service.domain.ledger import (
    Ledger,
    charge,
    charge_all,
    charge_runs,
    define_budgets,
    define_rate_limit,
    meters,
    open_ledger,
    restore,
    run_of,
    stored,
    take_filed,
)
from tests.domain.cells import take_cells

SECOND = timedelta(seconds=1)
START = datetime(2026, 3, 9, 22, 30, tzinfo=UTC)

Charge = tuple[datetime, int, int, int, datetime]


def _ledger(aligned: bool, rate_limit: bool, history: bool) -> Ledger:
    ledger = open_ledger(START, history=history)
    define_budgets(
        ledger,
        [
            Budget(
                budget_id="d",
                max_limit=Decimal(10),
                reset_duration="1d",
                calendar_aligned=aligned,
            ),
            Budget(budget_id="h", max_limit=Decimal(5), reset_duration="3h"),
        ],
        START,
    )
    if rate_limit:
        define_rate_limit(
            ledger,
            RateLimit(
                token_max_limit=1000,
                token_reset_duration="1h",
                request_max_limit=100,
                request_reset_duration="1m",
            ),
            START,
        )
    return ledger


@st.composite
def runs(draw: st.DrawFn) -> tuple[bool, bool, bool, list[Charge]]:
    """Records in arrival order: recorded_at mostly rising by small steps (now and
    then going back), occurred_at before it, at it or ahead of it (held), spread
    over period boundaries; amounts zero now and then."""
    recorded_at = START
    found: list[Charge] = []
    for _ in range(draw(st.integers(0, 60))):
        recorded_at += draw(st.integers(-30, 4_000)) * SECOND
        occurred_at = recorded_at + draw(st.integers(-20_000, 300)) * SECOND
        found.append(
            (
                occurred_at,
                draw(st.sampled_from([0, 1, 10**6, 123_000_000])),
                draw(st.sampled_from([0, 7, 120])),
                draw(st.sampled_from([0, 1, 2])),
                recorded_at,
            )
        )
    return draw(st.booleans()), draw(st.booleans()), draw(st.booleans()), found


def _view(ledger: Ledger) -> object:
    return (
        stored(ledger),
        ledger.now,
        [(m.used, m.start, m.end, m.lo, m.hi, m.key, m.live) for m in meters(ledger)],
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_charge_all_folds_as_charge_one_by_one(
    case: tuple[bool, bool, bool, list[Charge]],
) -> None:
    aligned, rate_limit, history, run = case
    one_by_one = _ledger(aligned, rate_limit, history)
    together = _ledger(aligned, rate_limit, history)
    for occurred_at, cost, tokens, requests, recorded_at in run:
        charge(one_by_one, occurred_at, cost, tokens, requests, recorded_at)
    charge_all(together, run)
    assert _view(together) == _view(one_by_one)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs(), st.integers(0, 60))
def test_charge_all_after_cells_were_taken_folds_as_charge(
    case: tuple[bool, bool, bool, list[Charge]], split: int
) -> None:
    """The read model takes the cells between runs, and restores ledgers."""
    aligned, rate_limit, _, run = case
    one_by_one = _ledger(aligned, rate_limit, True)
    together = _ledger(aligned, rate_limit, True)
    first, second = run[:split], run[split:]
    for occurred_at, cost, tokens, requests, recorded_at in first:
        charge(one_by_one, occurred_at, cost, tokens, requests, recorded_at)
    charge_all(together, first)
    assert take_cells(together) == take_cells(one_by_one)
    restored = restore(stored(one_by_one), now=one_by_one.now, history=True)
    for occurred_at, cost, tokens, requests, recorded_at in second:
        charge(restored, occurred_at, cost, tokens, requests, recorded_at)
    charge_all(together, second)
    assert stored(together) == stored(restored)


def _nonzero(taken: list[tuple[str, str, datetime, int]]) -> list[object]:
    return [cell for cell in taken if cell[3]]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs(), st.lists(st.integers(0, 60), max_size=4))
def test_taking_what_was_filed_keeps_filing_as_taking_the_cells(
    case: tuple[bool, bool, bool, list[Charge]], splits: list[int]
) -> None:
    """The projector takes a kept ledger's cells between batches with take_filed:
    every batch then writes what take_cells would have taken."""
    aligned, rate_limit, _, run = case
    cells = _ledger(aligned, rate_limit, True)
    filed = _ledger(aligned, rate_limit, True)
    start = 0
    for end in [*sorted(splits), len(run)]:
        batch = run[start:end]
        start = max(start, end)
        charge_all(cells, batch)
        charge_all(filed, batch)
        assert _nonzero(take_filed(filed)) == _nonzero(take_cells(cells))
        assert stored(filed).pending == stored(cells).pending
        assert filed.clock == cells.clock


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.booleans(),
    st.booleans(),
    st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(0, 900),
            st.integers(-4_000, 100),
            st.sampled_from([0, 1, 10**6]),
            st.sampled_from([0, 7]),
        ),
        max_size=60,
    ),
    st.lists(st.integers(0, 60), max_size=4),
)
def test_the_read_models_fold_of_shared_owners_folds_as_charge_one_by_one(
    aligned: bool,
    rate_limit: bool,
    records: list[tuple[int, int, int, int, int]],
    splits: list[int],
) -> None:
    """Keys a, b under team t under customer c (and key d alone): the records of
    each key charge its chain, in batches; each ledger ends as `charge` of its
    records in log order, whether it took them summed per key (`charge_runs`) or
    folded them."""
    chains = {
        ("a", None, "t", "c"): ["a", "t", "c"],
        ("b", None, "t", "c"): ["b", "t", "c"],
        ("b", "p", "t", "c"): ["b", "p", "t", "c"],
        ("d", None, None, None): ["d"],
    }
    names = list(chains)
    owners = {o for chain in chains.values() for o in chain}
    folded = {o: _ledger(aligned, rate_limit, True) for o in owners}
    one_by_one = {o: _ledger(aligned, rate_limit, True) for o in owners}
    for ledger in [*folded.values(), *one_by_one.values()]:  # a cell filed to
        charge(ledger, START, 1, 1, 1, START + SECOND)
    charges = []
    recorded_at = START
    for which, step, ahead, cost, tokens in records:
        recorded_at += step * SECOND
        record = (recorded_at + ahead * SECOND, cost, tokens, 1, recorded_at)
        charges.append((names[which], record))
        for owner in chains[names[which]]:
            charge(one_by_one[owner], *record)

    ledgers = {n: [folded[o] for o in chain] for n, chain in chains.items()}
    start = 0
    for end in [*sorted(splits), len(charges)]:
        part = charges[start:end]
        fold(part, group(part), ledgers)
        start = max(start, end)

    assert {o: _view(f) for o, f in folded.items()} == {
        o: _view(f) for o, f in one_by_one.items()
    }


def test_runs_within_the_cells_last_filed_to_are_added_at_once() -> None:
    ledger = _ledger(False, True, True)
    charge(ledger, START + 5 * SECOND, 1, 1, 1, START + 6 * SECOND)  # files a cell
    at = START + 10 * SECOND
    inside = run_of([(at, 10**6, 7, 1, at + SECOND), (at, 2, 0, 1, at + 2 * SECOND)])
    assert charge_runs(ledger, [inside, inside]) is True
    assert [m.used for m in meters(ledger)] == [2_000_005, 2_000_005, 15, 5]
    assert ledger.clock == at + 2 * SECOND


def test_a_run_past_a_period_end_is_refused_and_changes_nothing() -> None:
    ledger = _ledger(False, True, True)
    charge(ledger, START + 5 * SECOND, 1, 1, 1, START + 6 * SECOND)
    at = START + 10 * SECOND
    inside = run_of([(at, 10**6, 7, 1, at + SECOND)])
    hours_later = at + 7_200 * SECOND
    past = run_of([(hours_later, 5, 0, 1, hours_later + SECOND)])
    before = _view(ledger)
    assert charge_runs(ledger, [inside, past]) is False
    assert _view(ledger) == before
