"""Properties of budget periods, checked against brute-force reference models."""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.budgets import (
    BudgetSpec,
    Duration,
    period_bounds,
    reconcile,
)
from service.domain.events import Budget
from service.errors import DuplicateResetDuration

FIXED = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
MONTHS = {"M": 1, "Q": 3, "Y": 12}
MAX_STEPS = 1000  # the drawn instants lie within about 220 periods of the anchor

anchors = st.datetimes(
    min_value=datetime(1990, 1, 1),
    max_value=datetime(2100, 12, 31, 23, 59, 59, 999_999),
    timezones=st.just(UTC),
)
# Month ends and Feb 29 are where calendar steps go wrong; draw them often.
month_end_anchors = st.builds(
    lambda year, month, back, time: datetime.combine(
        date(year, month, calendar.monthrange(year, month)[1] - back), time, UTC
    ),
    st.integers(1990, 2100),
    st.integers(1, 12),
    st.integers(0, 3),
    st.times(),
)
durations = st.builds(
    Duration,
    st.integers(1, 40),
    st.sampled_from(["s", "m", "h", "d", "w", "M", "Q", "Y"]),
)


def nominal_length(duration: Duration) -> timedelta:
    if duration.unit in FIXED:
        return FIXED[duration.unit] * duration.count
    return timedelta(days=31) * MONTHS[duration.unit] * duration.count


@st.composite
def rolling_cases(draw: st.DrawFn) -> tuple[datetime, Duration, datetime]:
    anchor = draw(st.one_of(anchors, month_end_anchors))
    duration = draw(durations)
    reach = min(nominal_length(duration) * 200, timedelta(days=365 * 150))
    offset = draw(
        st.integers(-reach // timedelta.resolution, reach // timedelta.resolution)
    )
    return anchor, duration, anchor + timedelta(microseconds=offset)


def reference_boundary(anchor: datetime, duration: Duration, k: int) -> datetime:
    """The k-th boundary straight from the definition: anchor + k·D, day clamped."""
    if duration.unit in FIXED:
        return anchor + FIXED[duration.unit] * duration.count * k
    months = anchor.month - 1 + k * duration.count * MONTHS[duration.unit]
    year = anchor.year + months // 12
    month = months % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def reference_period(
    at: datetime, anchor: datetime, duration: Duration
) -> tuple[datetime, datetime]:
    """Walk period by period from the anchor until the period holds `at`."""
    k = 0
    for _ in range(MAX_STEPS):
        if reference_boundary(anchor, duration, k) > at:
            k -= 1
        elif reference_boundary(anchor, duration, k + 1) <= at:
            k += 1
        else:
            return (
                reference_boundary(anchor, duration, k),
                reference_boundary(anchor, duration, k + 1),
            )
    raise AssertionError("the reference walk did not reach the instant")


def bounds(
    at: datetime, anchor: datetime, duration: Duration, calendar_aligned: bool
) -> tuple[datetime, datetime]:
    return period_bounds(
        at, anchor=anchor, duration=duration, calendar_aligned=calendar_aligned
    )


@settings(max_examples=500, deadline=None)
@given(rolling_cases())
def test_rolling_period_matches_the_step_by_step_reference(
    case: tuple[datetime, Duration, datetime],
) -> None:
    anchor, duration, at = case
    assert bounds(at, anchor, duration, False) == reference_period(at, anchor, duration)


@settings(max_examples=500, deadline=None)
@given(rolling_cases())
def test_rolling_period_holds_the_instant_and_tiles_time(
    case: tuple[datetime, Duration, datetime],
) -> None:
    anchor, duration, at = case
    start, end = bounds(at, anchor, duration, False)
    assert start <= at < end
    assert bounds(start, anchor, duration, False) == (start, end)
    assert bounds(end, anchor, duration, False)[0] == end
    assert bounds(end - timedelta.resolution, anchor, duration, False) == (start, end)


def reference_calendar_start(at: datetime, unit: str) -> datetime:
    day = at.date()
    match unit:
        case "d":
            first = day
        case "w":
            iso = day.isocalendar()
            first = date.fromisocalendar(iso.year, iso.week, 1)
        case "M":
            first = day.replace(day=1)
        case "Q":
            first = date(day.year, (day.month - 1) // 3 * 3 + 1, 1)
        case _:
            first = date(day.year, 1, 1)
    return datetime.combine(first, datetime.min.time(), UTC)


@settings(max_examples=500, deadline=None)
@given(anchors, anchors, st.sampled_from(["d", "w", "M", "Q", "Y"]))
def test_calendar_period_is_the_utc_unit_that_holds_the_instant(
    at: datetime, anchor: datetime, unit: str
) -> None:
    duration = Duration(1, unit)
    start, end = bounds(at, anchor, duration, True)
    assert start == reference_calendar_start(at, unit)
    assert start <= at < end
    assert bounds(start, anchor, duration, True) == (start, end)
    assert bounds(end, anchor, duration, True)[0] == end
    assert end == reference_calendar_start(end, unit)
    assert bounds(end - timedelta.resolution, anchor, duration, True) == (start, end)


@settings(max_examples=200, deadline=None)
@given(rolling_cases(), st.integers(-14 * 60, 14 * 60), st.booleans())
def test_periods_depend_on_the_instant_not_on_its_zone(
    case: tuple[datetime, Duration, datetime], offset_minutes: int, aligned: bool
) -> None:
    anchor, duration, at = case
    zone = timezone(timedelta(minutes=offset_minutes))
    assert bounds(at.astimezone(zone), anchor.astimezone(zone), duration, aligned) == (
        bounds(at, anchor, duration, aligned)
    )


reset_durations = st.sampled_from(["1d", "24h", "1w", "7d", "1M", "1Q", "1Y", "30s"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(reset_durations, unique=True),
    st.lists(reset_durations, unique=True),
)
def test_reconcile_keeps_ids_exactly_for_kept_durations(
    current_durations: list[str], requested_durations: list[str]
) -> None:
    current = [
        Budget(budget_id=f"old-{text}", max_limit=Decimal(1), reset_duration=text)
        for text in current_durations
    ]
    requested = [
        BudgetSpec(max_limit=Decimal(2), reset_duration=text)
        for text in requested_durations
    ]
    fresh = iter(range(len(requested)))

    result = reconcile(current, requested, lambda: f"new-{next(fresh)}")

    assert [b.reset_duration for b in result] == requested_durations
    for kept in result:
        was_there = kept.reset_duration in current_durations
        assert kept.budget_id.startswith("old-") is was_there
        assert kept.max_limit == Decimal(2)
        assert not kept.reset_usage


# --- reconciliation over a history of replacements, against a reference model ------

ALIGNABLE = ("1d", "1w", "1M", "1Q", "1Y")
NOT_ALIGNABLE = ("24h", "7d", "30s", "2d")
specs = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(ALIGNABLE),
            st.integers(1, 9),
            st.sampled_from([None, False, True]),
        ),
        st.tuples(
            st.sampled_from(NOT_ALIGNABLE),
            st.integers(1, 9),
            st.sampled_from([None, False]),
        ),
    ),
    max_size=6,
)
histories = st.lists(
    st.one_of(
        st.tuples(st.just("replace"), specs),
        st.tuples(st.just("spend"), st.integers(1, 5)),
    ),
    max_size=12,
)


class Ids:
    """new_id for reconcile: b0, b1, ...; counts what was drawn."""

    def __init__(self) -> None:
        self.drawn = 0

    def __call__(self) -> str:
        self.drawn += 1
        return f"b{self.drawn - 1}"


@dataclass
class RefBudget:
    """API.md's words, kept literally: one budget of the reference model."""

    budget_id: str
    limit: int
    aligned: bool
    usage: int = 0


@settings(max_examples=400, deadline=None)
@given(histories)
def test_reconcile_over_a_history_matches_the_reference_model(
    history: list[tuple[str, object]],
) -> None:
    """A kept duration keeps its id and usage (an omitted calendar_aligned keeps its
    value, false→true resets the usage, true→false keeps it); a new duration is a new
    budget with usage 0; a dropped one is gone, and coming back later it is new; a
    request naming a duration twice changes nothing and draws no id."""
    ids = Ids()
    current: tuple[Budget, ...] = ()
    usage: dict[str, int] = {}  # budget_id → spend, as a projection keeps it
    ref: dict[str, RefBudget] = {}  # duration → budget, in request order
    ref_next = 0
    for op, arg in history:
        if op == "spend":
            assert isinstance(arg, int)
            for budget in current:
                usage[budget.budget_id] += arg
            for b in ref.values():
                b.usage += arg
            continue
        assert isinstance(arg, list)
        requested = [
            BudgetSpec(max_limit=Decimal(limit), reset_duration=d, calendar_aligned=a)
            for d, limit, a in arg
        ]
        durations = [d for d, _, _ in arg]
        if len(set(durations)) != len(durations):
            drawn = ids.drawn
            with pytest.raises(DuplicateResetDuration):
                reconcile(current, requested, ids)
            assert ids.drawn == drawn
            continue

        current = reconcile(current, requested, ids)
        for budget in current:
            if budget.reset_usage or budget.budget_id not in usage:
                usage[budget.budget_id] = 0
        kept_usage = {b.budget_id: usage[b.budget_id] for b in current}
        usage = kept_usage

        reference: dict[str, RefBudget] = {}
        for duration, limit, aligned in arg:
            old = ref.get(duration)
            if old is None:
                reference[duration] = RefBudget(f"b{ref_next}", limit, aligned is True)
                ref_next += 1
                continue
            now_aligned = old.aligned if aligned is None else aligned
            if now_aligned and not old.aligned:
                old.usage = 0
            old.limit, old.aligned = limit, now_aligned
            reference[duration] = old
        ref = reference

        assert [
            (
                b.reset_duration,
                b.budget_id,
                b.max_limit,
                b.calendar_aligned,
                usage[b.budget_id],
            )
            for b in current
        ] == [
            (d, b.budget_id, Decimal(b.limit), b.aligned, b.usage)
            for d, b in ref.items()
        ]
