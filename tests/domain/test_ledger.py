"""The one fold of budget and rate-limit usage (service.domain.ledger): every
transition given/when/then, and the fold against a brute-force reference model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.domain.budgets import is_calendar_alignable, parse_duration, period_bounds
from service.domain.events import Budget, RateLimit
from service.domain.ledger import (
    BUDGET,
    REQUESTS,
    TOKENS,
    Ledger,
    Meter,
    Pending,
    Reading,
    StoredLedger,
    Transition,
    advance,
    charge,
    define_budgets,
    define_rate_limit,
    kept_from,
    meters,
    open_ledger,
    period_keys,
    periods_of,
    reading,
    restore,
    stored,
    to_money,
    to_nanos,
)
from tests.domain.cells import take_cells

NEW, KEPT, RESET = Transition.NEW, Transition.KEPT, Transition.RESET
RESHAPED, UNALIGNED, DROPPED = (
    Transition.RESHAPED,
    Transition.UNALIGNED,
    Transition.DROPPED,
)
SECOND = timedelta(seconds=1)
TICK = timedelta(microseconds=1)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# The issue's days: "yesterday" and "today".
YESTERDAY = utc(2026, 3, 9)
TODAY = utc(2026, 3, 10)


def budget(
    budget_id: str,
    max_limit: str,
    reset_duration: str,
    *,
    aligned: bool = False,
    reset_usage: bool = False,
) -> Budget:
    return Budget(
        budget_id=budget_id,
        max_limit=Decimal(max_limit),
        reset_duration=reset_duration,
        calendar_aligned=aligned,
        reset_usage=reset_usage,
    )


def spend(
    ledger: Ledger,
    cost: str,
    occurred_at: datetime,
    recorded_at: datetime | None = None,
    *,
    tokens: int = 0,
    requests: int = 1,
) -> None:
    """A record of `cost`, committed a second after it occurred unless told."""
    recorded = occurred_at + SECOND if recorded_at is None else recorded_at
    charge(ledger, occurred_at, to_nanos(Decimal(cost)), tokens, requests, recorded)


def meter(ledger: Ledger, meter_id: str) -> Meter:
    return next(m for m in meters(ledger) if m.id == meter_id)


def usage(ledger: Ledger, meter_id: str, now: datetime) -> Decimal:
    """What a check at `now` sees: the meter's usage after rolling to `now`."""
    advance(ledger, now)
    found = meter(ledger, meter_id)
    return to_money(found.used) if found.kind == BUDGET else Decimal(found.used)


def created(*budgets: Budget, at: datetime, history: bool = False) -> Ledger:
    ledger = open_ledger(at, history=history)
    assert define_budgets(ledger, budgets, at) == dict.fromkeys(
        (b.budget_id for b in budgets), NEW
    )
    return ledger


# --- money -------------------------------------------------------------------------


def test_money_is_exact_nanos_both_ways() -> None:
    assert to_nanos(Decimal("0.000000001")) == 1
    assert to_nanos(Decimal("12.5")) == 12_500_000_000
    assert to_nanos(Decimal("0.0000000001")) == 1  # finer than a nano rounds up
    assert to_nanos(Decimal("1E-10")) == 1
    assert to_nanos(Decimal("0.00")) == 0
    assert to_nanos(Decimal("3")) == 3_000_000_000
    # The largest limit a budget takes (below 10^18, nine decimals): every digit kept.
    largest = Decimal("999999999999999999.999999999")
    assert to_nanos(largest) == 999_999_999_999_999_999_999_999_999
    assert to_money(to_nanos(largest)) == largest
    assert to_money(12_500_000_000) == Decimal("12.5")
    assert str(to_money(12_000_000_000)) == "12"
    assert to_money(1) == Decimal("1E-9")


# --- new, kept, reshaped, dropped --------------------------------------------------


def test_a_new_budget_counts_usage_from_its_creation_on() -> None:
    ledger = created(budget("b", "10", "1d"), at=utc(2026, 3, 9, 9))

    spend(ledger, "7", utc(2026, 3, 9, 8, 59, 59), recorded_at=utc(2026, 3, 9, 9, 1))
    spend(ledger, "2.5", utc(2026, 3, 9, 9, 30))

    assert usage(ledger, "b", utc(2026, 3, 9, 10)) == Decimal("2.5")
    assert meter(ledger, "b").start == utc(2026, 3, 9, 9)
    assert meter(ledger, "b").end == utc(2026, 3, 10, 9)


def test_a_new_budget_counts_a_record_stamped_after_its_creation_committed_before() -> (
    None
):
    """Usage counts by occurred_at: a record stamped 10:03 and committed at 10:00
    counts in a budget created at 10:01 (it is at or after the floor)."""
    ledger = open_ledger(utc(2026, 3, 9, 9))
    spend(ledger, "3", utc(2026, 3, 9, 10, 3), recorded_at=utc(2026, 3, 9, 10))

    changes = define_budgets(ledger, [budget("b", "10", "1h")], utc(2026, 3, 9, 10, 1))

    assert changes == {"b": NEW}
    assert usage(ledger, "b", utc(2026, 3, 9, 10, 2)) == Decimal(3)
    assert usage(ledger, "b", utc(2026, 3, 9, 11, 1)) == Decimal(0)


def test_a_kept_budget_keeps_its_usage_and_takes_the_new_limit() -> None:
    ledger = created(budget("b", "10", "1M"), at=utc(2026, 3, 1, 12))
    spend(ledger, "4", utc(2026, 3, 5))

    changes = define_budgets(ledger, [budget("b", "3", "1M")], utc(2026, 3, 6))

    assert changes == {"b": KEPT}
    assert usage(ledger, "b", utc(2026, 3, 6)) == Decimal(4)
    assert meter(ledger, "b").limit == to_nanos(Decimal(3))


def test_a_new_duration_is_a_new_budget_and_the_dropped_one_is_gone() -> None:
    ledger = created(budget("daily", "10", "1d"), at=utc(2026, 3, 9, 9))
    spend(ledger, "4", utc(2026, 3, 9, 10))

    changes = define_budgets(
        ledger, [budget("weekly", "50", "1w")], utc(2026, 3, 9, 11)
    )

    assert changes == {"weekly": NEW, "daily": DROPPED}
    assert [m.id for m in meters(ledger)] == ["weekly"]
    assert usage(ledger, "weekly", utc(2026, 3, 9, 12)) == Decimal(0)
    assert meter(ledger, "weekly").anchor == utc(2026, 3, 9, 11)


def test_a_legacy_update_reshaping_under_the_same_id_is_a_new_budget() -> None:
    """A legacy *BudgetUpdated keeps the budget's id while changing its
    reset_duration: usage starts at 0, anchored at the update, exactly like the
    current equivalent (a new id for the new duration)."""
    legacy = created(budget("b", "10", "1d"), at=utc(2026, 3, 9, 9))
    current = created(budget("b", "10", "1d"), at=utc(2026, 3, 9, 9))
    for ledger in (legacy, current):
        spend(ledger, "4", utc(2026, 3, 9, 10))

    assert define_budgets(legacy, [budget("b", "20", "1w")], utc(2026, 3, 9, 11)) == {
        "b": RESHAPED
    }
    assert define_budgets(current, [budget("b2", "20", "1w")], utc(2026, 3, 9, 11)) == {
        "b2": NEW,
        "b": DROPPED,
    }

    assert usage(legacy, "b", utc(2026, 3, 9, 12)) == Decimal(0)
    spend(legacy, "1.25", utc(2026, 3, 9, 12))
    spend(current, "1.25", utc(2026, 3, 9, 12))
    assert stored(legacy) == _renamed(stored(current), "b2", "b")
    assert usage(legacy, "b", utc(2026, 3, 16, 10)) == Decimal("1.25")
    assert usage(legacy, "b", utc(2026, 3, 16, 11)) == Decimal(0)


def _renamed(state: StoredLedger, old: str, new: str) -> StoredLedger:
    return msgspec.structs.replace(
        state,
        meters=tuple(
            msgspec.structs.replace(m, id=new) if m.id == old else m
            for m in state.meters
        ),
    )


# --- false→true: a reset ------------------------------------------------------------


def test_turning_calendar_alignment_on_resets_and_periods_become_calendar_days() -> (
    None
):
    ledger = created(budget("b", "10", "1d"), at=utc(2026, 3, 9, 9))
    spend(ledger, "4", utc(2026, 3, 10, 8))

    changes = define_budgets(
        ledger,
        [budget("b", "10", "1d", aligned=True, reset_usage=True)],
        TODAY + 12 * 3600 * SECOND,
    )

    assert changes == {"b": RESET}
    assert usage(ledger, "b", utc(2026, 3, 10, 12)) == Decimal(0)
    assert (meter(ledger, "b").start, meter(ledger, "b").end) == (
        TODAY,
        utc(2026, 3, 11),
    )
    spend(ledger, "1.5", utc(2026, 3, 10, 12, 30))
    assert usage(ledger, "b", utc(2026, 3, 10, 23)) == Decimal("1.5")
    assert usage(ledger, "b", utc(2026, 3, 11)) == Decimal(0)


def test_a_reset_counts_records_stamped_from_its_instant_on_committed_before_it() -> (
    None
):
    """Usage counts by occurred_at: of three records committed before the reset
    event, the one stamped a microsecond before the reset instant is out, the ones
    stamped at it and after it count."""
    ledger = created(budget("b", "10", "1d"), at=utc(2026, 3, 9, 9))
    reset_at = utc(2026, 3, 10, 12)
    before = reset_at - SECOND
    spend(ledger, "1", reset_at - TICK, recorded_at=before)
    spend(ledger, "2", reset_at, recorded_at=before)
    spend(ledger, "4", reset_at + 4 * 60 * SECOND, recorded_at=before)

    define_budgets(ledger, [budget("b", "10", "1d", aligned=True)], reset_at)

    assert usage(ledger, "b", reset_at) == Decimal(6)
    advance(ledger, utc(2026, 3, 10, 13))
    spend(ledger, "0.5", utc(2026, 3, 10, 12, 30))
    assert usage(ledger, "b", utc(2026, 3, 10, 13)) == Decimal("6.5")


def test_a_legacy_alignment_without_reset_usage_resets_like_the_current_event() -> None:
    """The legacy *BudgetUpdated that turns calendar_aligned on carries no
    reset_usage; the fold reads the reset off the change itself."""
    folded = []
    for flag in (True, False):
        ledger = created(budget("b", "10", "1d"), at=utc(2026, 3, 9, 9))
        spend(ledger, "4", utc(2026, 3, 10, 8))
        changes = define_budgets(
            ledger,
            [budget("b", "10", "1d", aligned=True, reset_usage=flag)],
            utc(2026, 3, 10, 12),
        )
        assert changes == {"b": RESET}
        spend(ledger, "1", utc(2026, 3, 10, 13))
        folded.append(stored(ledger))
        assert usage(ledger, "b", utc(2026, 3, 10, 14)) == Decimal(1)
    assert folded[0] == folded[1]


def test_a_legacy_explicit_reset_restarts_usage_without_a_change_of_alignment() -> None:
    ledger = created(budget("b", "10", "1w", aligned=True), at=utc(2026, 3, 9, 9))
    spend(ledger, "4", utc(2026, 3, 10, 8))

    changes = define_budgets(
        ledger,
        [budget("b", "10", "1w", aligned=True, reset_usage=True)],
        TODAY + 9 * 3600 * SECOND,
    )

    assert changes == {"b": RESET}
    assert usage(ledger, "b", utc(2026, 3, 10, 10)) == Decimal(0)
    assert meter(ledger, "b").floor == utc(2026, 3, 10, 9)


def test_calendar_aligned_on_a_duration_that_cannot_align_is_inert() -> None:
    """Only a legacy event can carry it (commands refuse it); it neither resets nor
    changes the periods."""
    ledger = created(budget("b", "10", "2d"), at=utc(2026, 3, 9, 9))
    spend(ledger, "4", utc(2026, 3, 10, 8))

    changes = define_budgets(
        ledger, [budget("b", "10", "2d", aligned=True)], utc(2026, 3, 10, 9)
    )

    assert changes == {"b": KEPT}
    assert usage(ledger, "b", utc(2026, 3, 10, 10)) == Decimal(4)
    assert meter(ledger, "b").start == utc(2026, 3, 9, 9)


# --- true→false ---------------------------------------------------------------------


def issue_key(*, history: bool = False) -> Ledger:
    """The issue's key: a 1d aligned budget of 5 created yesterday 09:00 UTC, usage
    6 yesterday 20:00 and 1 today 07:00."""
    ledger = created(
        budget("b", "5", "1d", aligned=True), at=utc(2026, 3, 9, 9), history=history
    )
    spend(ledger, "6", utc(2026, 3, 9, 20))
    spend(ledger, "1", utc(2026, 3, 10, 7))
    assert usage(ledger, "b", utc(2026, 3, 10, 7, 30)) == Decimal(1)
    return ledger


def test_the_issue_example_turning_alignment_off_answers_one_everywhere() -> None:
    """The PUT with calendar_aligned false at 08:00 today (the issue's GET showing 7
    puts it before 09:00). DESIGN's true→false rule: the floor moves to the start
    of the calendar day containing the switch, today 00:00; periods roll from the
    anchor, yesterday 09:00, so the current period is [yesterday 09:00, today
    09:00). It holds 6 at 20:00 (before the floor: out) and 1 at 07:00: usage 1,
    remaining 4, allowed, in the answer, the read model, the check and after a
    restart alike. At 09:00 the rolling period ends and usage is 0."""
    cache, read_model = issue_key(), issue_key(history=True)
    switch = utc(2026, 3, 10, 8)
    unaligned = [budget("b", "5", "1d", aligned=False)]

    assert define_budgets(cache, unaligned, switch) == {"b": UNALIGNED}
    assert define_budgets(read_model, unaligned, switch) == {"b": UNALIGNED}

    restarted = restore(stored(read_model), now=switch)
    for ledger in (cache, read_model, restarted):
        b = meter(ledger, "b")
        assert (to_money(b.used), b.start, b.end, b.floor) == (
            Decimal(1),
            utc(2026, 3, 9, 9),
            utc(2026, 3, 10, 9),
            TODAY,
        )
        assert to_money(b.limit - b.used) == Decimal(4)
        assert reading(ledger, b, switch) == Reading(
            to_nanos(Decimal(1)), utc(2026, 3, 9, 9), utc(2026, 3, 10, 9)
        )
        assert usage(ledger, "b", utc(2026, 3, 10, 9)) == Decimal(0)
    assert stored(restarted) == stored(cache)


def test_turning_alignment_off_later_keeps_only_what_lands_in_the_rolling_period() -> (
    None
):
    """Switched at 10:00, the rolling period is [today 09:00, tomorrow 09:00): of
    today's usage only the 0.5 at 09:30 lands in it; the 1 at 07:00 lands in the
    previous rolling period, where it still counts (it is after the floor)."""
    ledger = issue_key(history=True)
    spend(ledger, "0.5", utc(2026, 3, 10, 9, 30))
    assert usage(ledger, "b", utc(2026, 3, 10, 10)) == Decimal("1.5")

    changes = define_budgets(ledger, [budget("b", "5", "1d")], utc(2026, 3, 10, 10))

    assert changes == {"b": UNALIGNED}
    assert usage(ledger, "b", utc(2026, 3, 10, 10)) == Decimal("0.5")
    b = meter(ledger, "b")
    assert reading(ledger, b, utc(2026, 3, 10, 8)) == Reading(
        to_nanos(Decimal(1)), utc(2026, 3, 9, 9), utc(2026, 3, 10, 9)
    )
    assert periods_of(b) == [
        (utc(2026, 3, 9, 9), to_nanos(Decimal(6))),
        (TODAY, to_nanos(Decimal(1))),
        (utc(2026, 3, 10, 9), to_nanos(Decimal("0.5"))),
    ]


def test_turning_alignment_off_never_moves_the_floor_back_before_a_reset() -> None:
    ledger = created(budget("b", "10", "1d"), at=utc(2026, 3, 9, 9))
    spend(ledger, "4", utc(2026, 3, 10, 10))
    define_budgets(
        ledger, [budget("b", "10", "1d", aligned=True)], utc(2026, 3, 10, 12)
    )
    spend(ledger, "1", utc(2026, 3, 10, 13))

    changes = define_budgets(ledger, [budget("b", "10", "1d")], utc(2026, 3, 10, 15))

    assert changes == {"b": UNALIGNED}
    assert meter(ledger, "b").floor == utc(2026, 3, 10, 12)
    assert usage(ledger, "b", utc(2026, 3, 10, 15)) == Decimal(1)


# --- usage by occurred_at ----------------------------------------------------------


def test_a_late_record_lands_in_its_own_past_period() -> None:
    ledger = created(budget("b", "10", "1d"), at=utc(2026, 3, 9, 9), history=True)
    spend(ledger, "2", utc(2026, 3, 10, 10))

    spend(ledger, "3", utc(2026, 3, 10, 8), recorded_at=utc(2026, 3, 10, 11))

    assert usage(ledger, "b", utc(2026, 3, 10, 11)) == Decimal(2)
    assert periods_of(meter(ledger, "b")) == [
        (utc(2026, 3, 9, 9), to_nanos(Decimal(3))),
        (utc(2026, 3, 10, 9), to_nanos(Decimal(2))),
    ]


def test_a_record_stamped_ahead_lands_in_the_next_period_not_the_current_one() -> None:
    ledger = created(budget("b", "10", "1d", aligned=True), at=utc(2026, 3, 9, 9))

    spend(ledger, "3", utc(2026, 3, 11, 0, 2), recorded_at=utc(2026, 3, 10, 23, 58))

    assert usage(ledger, "b", utc(2026, 3, 10, 23, 59)) == Decimal(0)
    assert usage(ledger, "b", utc(2026, 3, 11, 0, 1)) == Decimal(3)
    spend(ledger, "1", utc(2026, 3, 11, 0, 3))
    assert usage(ledger, "b", utc(2026, 3, 11, 0, 4)) == Decimal(4)
    assert ledger.pending is None


def test_a_late_record_into_a_period_a_check_rolled_past_stays_out_of_usage() -> None:
    ledger = created(budget("b", "10", "1h"), at=utc(2026, 3, 9, 9), history=True)
    spend(ledger, "1", utc(2026, 3, 9, 9, 50))
    assert usage(ledger, "b", utc(2026, 3, 9, 10, 5)) == Decimal(0)

    spend(ledger, "2", utc(2026, 3, 9, 9, 55), recorded_at=utc(2026, 3, 9, 10, 6))

    assert usage(ledger, "b", utc(2026, 3, 9, 10, 6)) == Decimal(0)
    b = meter(ledger, "b")
    assert reading(ledger, b, utc(2026, 3, 9, 9, 30)).used == to_nanos(Decimal(3))


def test_a_reset_inside_a_cell_files_later_usage_of_that_cell_from_the_reset_on() -> (
    None
):
    """The cell [today 09:00, tomorrow 00:00) took usage before the reset at 12:00;
    usage at 12:30 in the same cell counts, the 10:00 usage does not."""
    ledger = created(budget("b", "10", "1d"), at=utc(2026, 3, 9, 9))
    spend(ledger, "1", utc(2026, 3, 10, 10))
    define_budgets(
        ledger, [budget("b", "10", "1d", aligned=True)], utc(2026, 3, 10, 12)
    )

    spend(ledger, "2", utc(2026, 3, 10, 12, 30))

    assert usage(ledger, "b", utc(2026, 3, 10, 13)) == Decimal(2)


def test_a_record_stamped_at_a_reset_instant_counts_though_the_clock_reached_it() -> (
    None
):
    """A record stamped 12:00 stays pending while the clock is at 12:00: a reset
    recorded at 12:00 may still come, and usage at its instant counts."""
    ledger = created(budget("b", "10", "1d"), at=utc(2026, 3, 9, 9))
    noon = utc(2026, 3, 10, 12)
    spend(ledger, "2", noon, recorded_at=noon - SECOND)
    spend(ledger, "1", noon - 30 * SECOND, recorded_at=noon)

    define_budgets(ledger, [budget("b", "10", "1d", aligned=True)], noon)

    assert usage(ledger, "b", noon + 60 * SECOND) == Decimal(2)


def test_a_definition_recorded_before_the_clock_resets_from_the_clock() -> None:
    """A race of concurrent writers: the reset's instant is the later of its
    recorded_at and the clock, so time never runs backwards; the anchor stays."""
    ledger = created(budget("b", "10", "1d"), at=utc(2026, 3, 9, 9))
    spend(ledger, "2", utc(2026, 3, 10, 10), recorded_at=utc(2026, 3, 10, 10, 0, 1))

    define_budgets(ledger, [budget("n", "10", "1d")], utc(2026, 3, 10, 10))

    assert (meter(ledger, "n").anchor, meter(ledger, "n").floor) == (
        utc(2026, 3, 10, 10),
        utc(2026, 3, 10, 10, 0, 1),
    )


# --- rate limits -------------------------------------------------------------------


def test_rate_limit_halves_move_like_budgets() -> None:
    start = utc(2026, 3, 9, 9)
    ledger = open_ledger(start)
    both = RateLimit(
        token_max_limit=1000,
        token_reset_duration="1h",
        request_max_limit=10,
        request_reset_duration="1m",
    )
    assert define_rate_limit(ledger, both, start) == {TOKENS: NEW, REQUESTS: NEW}
    spend(ledger, "0", utc(2026, 3, 9, 9, 10), tokens=300, requests=2)

    fewer = msgspec.structs.replace(both, token_max_limit=500, request_max_limit=3)
    assert define_rate_limit(ledger, fewer, utc(2026, 3, 9, 9, 10, 30)) == {
        TOKENS: KEPT,
        REQUESTS: KEPT,
    }
    assert usage(ledger, TOKENS, utc(2026, 3, 9, 9, 10, 40)) == Decimal(300)
    assert usage(ledger, REQUESTS, utc(2026, 3, 9, 9, 10, 40)) == Decimal(2)
    assert meter(ledger, TOKENS).limit == 500

    slower = msgspec.structs.replace(fewer, request_reset_duration="1h")
    assert define_rate_limit(ledger, slower, utc(2026, 3, 9, 9, 10, 50)) == {
        TOKENS: KEPT,
        REQUESTS: RESHAPED,
    }
    assert usage(ledger, REQUESTS, utc(2026, 3, 9, 9, 11)) == Decimal(0)
    assert usage(ledger, TOKENS, utc(2026, 3, 9, 9, 11)) == Decimal(300)
    assert meter(ledger, REQUESTS).start == utc(2026, 3, 9, 9, 10, 50)

    tokens_only = msgspec.structs.replace(
        slower, request_max_limit=None, request_reset_duration=None
    )
    assert define_rate_limit(ledger, tokens_only, utc(2026, 3, 9, 9, 12)) == {
        TOKENS: KEPT,
        REQUESTS: DROPPED,
    }
    assert define_rate_limit(ledger, None, utc(2026, 3, 9, 9, 13)) == {TOKENS: DROPPED}
    assert list(meters(ledger)) == []


def test_a_rate_limit_naming_only_the_request_half_keeps_the_token_half() -> None:
    """Once the decision keeps the omitted token half in the event (API.md, partial
    updates at every level), the fold keeps its usage."""
    ledger = open_ledger(utc(2026, 3, 9, 9))
    define_rate_limit(
        ledger,
        RateLimit(token_max_limit=100, token_reset_duration="1d"),
        utc(2026, 3, 9, 9),
    )
    spend(ledger, "0", utc(2026, 3, 9, 10), tokens=40)

    changes = define_rate_limit(
        ledger,
        RateLimit(
            token_max_limit=100,
            token_reset_duration="1d",
            request_max_limit=5,
            request_reset_duration="1h",
        ),
        utc(2026, 3, 9, 11),
    )

    assert changes == {TOKENS: KEPT, REQUESTS: NEW}
    assert usage(ledger, TOKENS, utc(2026, 3, 9, 12)) == Decimal(40)


# --- restore and the read model's runs ---------------------------------------------


def without_cells(state: StoredLedger) -> StoredLedger:
    """The rows a run or a read loads first: definitions, clock and pending."""
    return msgspec.structs.replace(
        state, meters=tuple(msgspec.structs.replace(m, cells=()) for m in state.meters)
    )


def test_a_restored_ledger_equals_the_folded_one_and_folds_on_alike() -> None:
    histories = [created(budget("b", "5", "1d", aligned=True), at=utc(2026, 3, 1, 9))]
    histories.append(
        created(
            budget("b", "5", "1d", aligned=True), at=utc(2026, 3, 1, 9), history=True
        )
    )
    for ledger in histories:
        define_rate_limit(
            ledger,
            RateLimit(request_max_limit=9, request_reset_duration="1h"),
            utc(2026, 3, 1, 9),
        )
        for day in range(1, 10):
            spend(ledger, "0.25", utc(2026, 3, day, 20))
        spend(ledger, "1", utc(2026, 3, 10, 7, 2), recorded_at=utc(2026, 3, 10, 7))
    cache, read_model = histories

    restarted = restore(stored(read_model), now=utc(2026, 3, 10, 7, 1))

    assert stored(restarted) == stored(cache)
    assert stored(read_model) != stored(cache)  # the read model keeps every period
    assert stored(restarted).pending == (
        Pending(utc(2026, 3, 10, 7, 2), to_nanos(Decimal(1)), 0, 1),
    )
    for ledger in (cache, restarted):
        define_budgets(ledger, [budget("b", "5", "1d")], utc(2026, 3, 10, 8))
        spend(ledger, "2", utc(2026, 3, 10, 8, 30))
        assert usage(ledger, "b", utc(2026, 3, 10, 8, 45)) == Decimal(3)
        assert usage(ledger, REQUESTS, utc(2026, 3, 10, 8, 45)) == Decimal(1)
    assert stored(restarted) == stored(cache)


def test_cells_taken_per_run_add_up_to_the_folded_cells() -> None:
    """The read model restores a ledger without cells, folds a run, and adds what
    `take_cells` gives to its rows: no transition ever moves a stored amount."""
    whole = issue_key(history=True)
    rows: dict[tuple[str, str, datetime], int] = {}
    state = stored(issue_key(history=True))
    for key_amount in state.meters[0].cells:
        rows[BUDGET, "b", key_amount[0]] = key_amount[1]
    runs: list[list[tuple[str, datetime, datetime | None]]] = [
        [("spend", utc(2026, 3, 10, 7, 30), None)],
        [("unalign", utc(2026, 3, 10, 8), None)],
        [
            ("spend", utc(2026, 3, 10, 8, 30), None),
            ("spend", utc(2026, 3, 9, 23), utc(2026, 3, 10, 8, 40)),
        ],
    ]
    for run in runs:
        ledger = restore(without_cells(state), now=state.clock, history=True)
        for target in (ledger, whole):
            for what, at, recorded_at in run:
                if what == "spend":
                    spend(target, "0.5", at, recorded_at)
                else:
                    define_budgets(target, [budget("b", "5", "1d")], at)
        for kind, meter_id, key, amount in take_cells(ledger):
            rows[kind, meter_id, key] = rows.get((kind, meter_id, key), 0) + amount
        assert take_cells(ledger) == []  # taken once
        state = stored(ledger)
    assert sorted((key, amount) for (_, _, key), amount in rows.items()) == list(
        stored(whole).meters[0].cells
    )
    # 1 at 07:00, 0.5 at 07:30 and 08:30; yesterday 23:00 is before the floor.
    assert usage(whole, "b", utc(2026, 3, 10, 8, 50)) == Decimal(2)


def test_a_read_fetches_the_period_keys_and_a_cache_keeps_cells_from_kept_from() -> (
    None
):
    ledger = issue_key()
    b = meter(ledger, "b")

    assert period_keys(b, utc(2026, 3, 10, 7, 30)) == [TODAY, utc(2026, 3, 10, 9)]
    assert period_keys(b, utc(2026, 3, 9, 20)) == [utc(2026, 3, 9, 9)]
    assert kept_from(b, utc(2026, 3, 10, 7, 0, 1)) == utc(2026, 3, 9, 9)
    assert kept_from(b, utc(2026, 3, 10, 9)) == TODAY
    assert list(b.cells) == [utc(2026, 3, 9, 9), TODAY]
    advance(ledger, utc(2026, 3, 10, 9, 30))
    spend(ledger, "1", utc(2026, 3, 10, 9, 30))
    assert list(b.cells) == [TODAY, utc(2026, 3, 10, 9)]


# --- the fold against a brute-force reference ---------------------------------------

BUDGET_IDS = ("a", "b", "c")
BUDGET_DURATIONS = ("1d", "1w", "1M", "1Q", "1Y", "2h", "3d", "30m")
RATE_DURATIONS = ("30s", "1m", "1h", "1d", "2h")
WAITS = tuple(
    timedelta(seconds=s)
    for s in (0, 1, 59, 300, 3600, 7 * 3600, 86_400, 3 * 86_400, 10 * 86_400, 3_456_000)
)


def calendar_start(at: datetime, unit: str) -> datetime:
    """The UTC calendar unit holding `at`, straight from the calendar."""
    day = at.date()
    if unit == "w":
        day -= timedelta(days=day.weekday())
    elif unit == "M":
        day = day.replace(day=1)
    elif unit == "Q":
        day = date(day.year, (day.month - 1) // 3 * 3 + 1, 1)
    elif unit == "Y":
        day = date(day.year, 1, 1)
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


@dataclass
class RefMeter:
    kind: str
    id: str
    limit: int
    reset_duration: str
    aligned: bool
    anchor: datetime
    floor: datetime


@dataclass
class Reference:
    """DESIGN's rules stated plainly: each meter's final definition, and every
    record of the owner replayed against it (whenever it was committed)."""

    budgets: list[RefMeter] = field(default_factory=list)
    halves: dict[str, RefMeter] = field(default_factory=dict)
    records: list[tuple[datetime, tuple[int, int, int]]] = field(default_factory=list)

    def define_budgets(self, budgets: Iterable[Budget], at: datetime) -> None:
        before = {m.id: m for m in self.budgets}
        self.budgets = []
        for b in budgets:
            unit = parse_duration(b.reset_duration).unit
            aligned = b.calendar_aligned and is_calendar_alignable(
                parse_duration(b.reset_duration)
            )
            old = before.get(b.budget_id)
            limit = to_nanos(b.max_limit)
            if old is None or old.reset_duration != b.reset_duration:
                m = RefMeter(
                    BUDGET, b.budget_id, limit, b.reset_duration, aligned, at, at
                )
            else:
                m = RefMeter(
                    BUDGET,
                    b.budget_id,
                    limit,
                    b.reset_duration,
                    aligned,
                    old.anchor,
                    old.floor,
                )
                if b.reset_usage or (aligned and not old.aligned):
                    m.floor = at
                elif old.aligned and not aligned:
                    m.floor = max(old.floor, calendar_start(at, unit))
            self.budgets.append(m)

    def define_rate_limit(self, rate_limit: RateLimit | None, at: datetime) -> None:
        rl = rate_limit or RateLimit()
        for kind, limit, duration in (
            (TOKENS, rl.token_max_limit, rl.token_reset_duration),
            (REQUESTS, rl.request_max_limit, rl.request_reset_duration),
        ):
            old = self.halves.pop(kind, None)
            if limit is None or duration is None:
                continue
            if old is not None and old.reset_duration == duration:
                old.limit = limit
                self.halves[kind] = old
            else:
                self.halves[kind] = RefMeter(kind, kind, limit, duration, False, at, at)

    def meters(self) -> list[RefMeter]:
        return self.budgets + [
            self.halves[k] for k in (TOKENS, REQUESTS) if k in self.halves
        ]

    def usage(self, m: RefMeter, at: datetime) -> Reading:
        start, end = period_bounds(
            at,
            anchor=m.anchor,
            duration=parse_duration(m.reset_duration),
            calendar_aligned=m.aligned,
        )
        part = {BUDGET: 0, TOKENS: 1, REQUESTS: 2}[m.kind]
        used = sum(
            amounts[part]
            for at, amounts in self.records
            if at >= m.floor and start <= at < end
        )
        return Reading(used, start, end)


# Each id mostly keeps its duration, so alignment toggles and kept budgets are common;
# now and then it takes another (a legacy reshape) or leaves the set and comes back.
USUAL_DURATIONS = {"a": "1d", "b": "1M", "c": "1w"}
USUAL_HALVES = {TOKENS: "1h", REQUESTS: "1m"}


def _budget_sets(draw: st.DrawFn) -> list[tuple[str, str, int, bool]]:
    specs: list[tuple[str, str, int, bool]] = []
    taken: set[str] = set()
    for budget_id in BUDGET_IDS:
        if not draw(st.integers(0, 3)):
            continue
        duration = USUAL_DURATIONS[budget_id]
        if not draw(st.integers(0, 4)):
            duration = draw(st.sampled_from(BUDGET_DURATIONS))
        if duration in taken:
            continue
        taken.add(duration)
        alignable = is_calendar_alignable(parse_duration(duration))
        aligned = alignable and draw(st.booleans())
        specs.append((budget_id, duration, draw(st.integers(1, 50)), aligned))
    return draw(st.permutations(specs))


def _half(draw: st.DrawFn, kind: str) -> tuple[int, str] | None:
    if not draw(st.integers(0, 3)):
        return None
    duration = USUAL_HALVES[kind]
    if not draw(st.integers(0, 3)):
        duration = draw(st.sampled_from(RATE_DURATIONS))
    return draw(st.integers(1, 500)), duration


@st.composite
def histories(draw: st.DrawFn) -> tuple[datetime, list[tuple[Any, ...]]]:
    start = draw(
        st.datetimes(
            min_value=datetime(2024, 1, 1),
            max_value=datetime(2027, 12, 31),
            timezones=st.just(UTC),
        )
    )
    ops: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(
            st.sampled_from(
                ["usage"] * 6
                + ["wait"] * 3
                + ["budgets"] * 2
                + ["check"] * 2
                + ["rate", "restart"]
            )
        )
        if kind == "usage":
            # Offsets reach past periods, the current one, near-future stamps
            # (5 minutes at most) and the instants around earlier definitions;
            # some options appear twice to weigh them: a record stamped at the
            # clock, and one committed within the hour after it occurred.
            base = draw(st.one_of(st.none(), st.integers(0, 40)))
            offset = draw(
                st.one_of(
                    st.sampled_from([timedelta(0), -TICK, TICK, 300 * SECOND]),
                    st.just(timedelta(0)),
                    st.integers(-45 * 86_400, 300).map(lambda s: s * SECOND),
                    st.integers(-3600, 0).map(lambda s: s * SECOND),
                    st.integers(-3600, 0).map(lambda s: s * SECOND),
                    st.integers(-3_000_000, 3_000_000).map(lambda u: u * TICK),
                )
            )
            cost = draw(st.integers(0, 5 * 10**9))
            ops.append(
                (
                    "usage",
                    base,
                    offset,
                    cost,
                    draw(st.integers(0, 300)),
                    draw(st.integers(0, 2)),
                )
            )
        elif kind == "wait":
            ops.append(
                (
                    "wait",
                    draw(
                        st.one_of(
                            st.sampled_from((*WAITS, TICK)),
                            st.integers(0, 3600).map(lambda s: s * SECOND),
                            st.integers(0, 10**6).map(lambda s: s * SECOND),
                        )
                    ),
                )
            )
        elif kind == "budgets":
            ops.append(("budgets", _budget_sets(draw)))
        elif kind == "rate":
            ops.append(("rate", _half(draw, TOKENS), _half(draw, REQUESTS)))
        elif kind == "check":
            ops.append(("check", draw(st.integers(0, 7200)) * SECOND))
        else:
            ops.append(("restart",))
    return start, ops


class Run:
    """One owner's history folded five ways: a cache ledger (restarted from the
    read model when told), a ledger keeping history (the read model, and a replay),
    the read model's rows folded run by run, the same history in its legacy form
    (no reset_usage), and the reference."""

    def __init__(self, start: datetime) -> None:
        self.t = start
        self.definitions: list[datetime] = [start]
        self.cache = open_ledger(start)
        self.legacy = open_ledger(start)
        self.read_model = open_ledger(start, history=True)
        self.rows = stored(self.read_model)
        self.ref = Reference()
        self.current: dict[str, Budget] = {}

    def ledgers(self) -> tuple[Ledger, ...]:
        return (self.cache, self.legacy, self.read_model)

    def step(self, op: tuple[Any, ...]) -> None:
        match op:
            case ("wait", delta):
                self.t += delta
            case ("check", jitter):
                for ledger in self.ledgers():
                    advance(ledger, self.t + jitter)
            case ("restart",):
                self.cache = restore(stored(self.read_model), now=self.cache.now)
            case ("usage", base, offset, cost, tokens, requests):
                anchor = (
                    self.t
                    if base is None
                    else self.definitions[base % len(self.definitions)]
                )
                occurred_at = min(anchor + offset, self.t + 300 * SECOND)
                self.ref.records.append((occurred_at, (cost, tokens, requests)))
                self._fold(
                    lambda ledger: charge(
                        ledger, occurred_at, cost, tokens, requests, self.t
                    )
                )
            case ("budgets", specs):
                self.definitions.append(self.t)
                budgets = [self._budget(*spec) for spec in specs]
                self.current = {b.budget_id: b for b in budgets}
                self.ref.define_budgets(budgets, self.t)
                legacy = [
                    msgspec.structs.replace(b, reset_usage=False) for b in budgets
                ]
                self._fold(
                    lambda ledger: define_budgets(
                        ledger, legacy if ledger is self.legacy else budgets, self.t
                    )
                )
            case ("rate", token, request):
                self.definitions.append(self.t)
                rate_limit = RateLimit(
                    token_max_limit=token and token[0],
                    token_reset_duration=token and token[1],
                    request_max_limit=request and request[0],
                    request_reset_duration=request and request[1],
                )
                self.ref.define_rate_limit(rate_limit, self.t)
                self._fold(lambda ledger: define_rate_limit(ledger, rate_limit, self.t))

    def _budget(
        self, budget_id: str, duration: str, limit: int, aligned: bool
    ) -> Budget:
        """The budget as the current decision writes it: reset_usage exactly when a
        kept budget turns calendar_aligned on."""
        old = self.current.get(budget_id)
        reset = (
            old is not None
            and old.reset_duration == duration
            and aligned
            and not old.calendar_aligned
        )
        return Budget(
            budget_id=budget_id,
            max_limit=Decimal(limit),
            reset_duration=duration,
            calendar_aligned=aligned,
            reset_usage=reset,
        )

    def _fold(self, apply: Any) -> None:
        for ledger in self.ledgers():
            apply(ledger)
        # The read model: a ledger restored from its rows without cells folds the
        # run; its cells are added to the rows, whose other columns it replaces.
        ledger = restore(without_cells(self.rows), now=self.t, history=True)
        apply(ledger)
        added: dict[tuple[str, str], dict[datetime, int]] = {}
        for kind, meter_id, key, amount in take_cells(ledger):
            added.setdefault((kind, meter_id), {})[key] = amount
        had = {(m.kind, m.id): dict(m.cells) for m in self.rows.meters}
        rows = []
        for m in stored(ledger).meters:
            cells = had.get((m.kind, m.id), {})
            for key, amount in added.get((m.kind, m.id), {}).items():
                cells[key] = cells.get(key, 0) + amount
            rows.append(msgspec.structs.replace(m, cells=tuple(sorted(cells.items()))))
        self.rows = msgspec.structs.replace(stored(ledger), meters=tuple(rows))

    def verify(self) -> None:
        cache, read_model = self.cache, self.read_model
        assert self.rows == stored(read_model)
        assert stored(self.legacy) == stored(cache)
        assert stored(restore(stored(read_model), now=cache.now)) == stored(cache)
        expected = self.ref.meters()
        for ledger in self.ledgers():
            assert [(m.kind, m.id, m.limit) for m in meters(ledger)] == [
                (r.kind, r.id, r.limit) for r in expected
            ]
        now = max(cache.now, read_model.now)
        for ledger in self.ledgers():
            advance(ledger, now)
        for ref, m, h in zip(expected, meters(cache), meters(read_model), strict=True):
            assert (m.anchor, m.floor) == (ref.anchor, ref.floor)
            truth = self.ref.usage(ref, now)
            assert (m.used, m.start, m.end) == truth
            assert reading(cache, m, now) == truth
            assert reading(read_model, h, now) == truth
            later = now + timedelta(days=1)
            assert reading(cache, m, later) == self.ref.usage(ref, later)
            earlier = now - timedelta(days=2)
            assert reading(read_model, h, earlier) == self.ref.usage(ref, earlier)
        # A read (GET, a command's answer): the rows without cells, then only the
        # cells of the period containing `now`.
        read = restore(without_cells(stored(read_model)), now=now, history=True)
        for ref, m, h in zip(expected, meters(read), meters(read_model), strict=True):
            m.cells = {k: h.cells[k] for k in period_keys(m, now) if k in h.cells}
            assert reading(read, m, now) == self.ref.usage(ref, now)


def check_history(history: tuple[datetime, list[tuple[Any, ...]]]) -> None:
    start, ops = history
    run = Run(start)
    for op in ops:
        run.step(op)
        run.verify()
    replayed = Run(start)
    for op in ops:
        if op[0] not in ("check", "restart"):
            replayed.step(op)
    assert stored(replayed.read_model) == stored(run.read_model)


FAST = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
SOAK = settings(
    max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@FAST
@given(histories())
def test_the_fold_agrees_with_the_reference_everywhere(
    history: tuple[datetime, list[tuple[Any, ...]]],
) -> None:
    """After every step the cache's ledger (restarts included), the read model's
    (kept whole, and as rows added run by run), the legacy form and a restore from
    the read model all read what the reference reads; a replay folds the same."""
    check_history(history)


@pytest.mark.soak
@pytest.mark.timeout(3600)
@SOAK
@given(histories())
def test_soak_the_fold_agrees_with_the_reference_everywhere(
    history: tuple[datetime, list[tuple[Any, ...]]],
) -> None:
    check_history(history)
