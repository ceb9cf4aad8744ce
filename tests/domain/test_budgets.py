"""Budget durations, periods and reconciliation by reset_duration."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from service.domain.budgets import (
    BudgetSpec,
    Duration,
    new_budgets,
    parse_duration,
    period_bounds,
    period_start,
    reconcile,
    validate_calendar_alignment,
    validate_rate_limit,
)
from service.domain.events import Budget, RateLimit
from service.errors import (
    DuplicateResetDuration,
    InvalidCalendarAlignment,
    InvalidMaxLimit,
    InvalidRateLimit,
    InvalidResetDuration,
)


def utc(
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    microsecond: int = 0,
) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, UTC)


def rolling(at: datetime, anchor: datetime, text: str) -> tuple[datetime, datetime]:
    return period_bounds(
        at, anchor=anchor, duration=parse_duration(text), calendar_aligned=False
    )


def aligned(at: datetime, text: str) -> tuple[datetime, datetime]:
    return period_bounds(
        at,
        anchor=utc(2020, 5, 17, 8),
        duration=parse_duration(text),
        calendar_aligned=True,
    )


def ids(*values: str) -> Callable[[], str]:
    return iter(values).__next__


# --- duration grammar --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", Duration(30, "s")),
        ("5m", Duration(5, "m")),
        ("1h", Duration(1, "h")),
        ("1d", Duration(1, "d")),
        ("2w", Duration(2, "w")),
        ("1M", Duration(1, "M")),
        ("1Q", Duration(1, "Q")),
        ("1Y", Duration(1, "Y")),
        ("90d", Duration(90, "d")),
        ("10s", Duration(10, "s")),
        ("3155760000s", Duration(3_155_760_000, "s")),
        ("36525d", Duration(36_525, "d")),
        ("1200M", Duration(1200, "M")),
        ("100Y", Duration(100, "Y")),
    ],
)
def test_parse_duration_reads_count_and_unit(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0d",
        "-1d",
        "+1d",
        "1.5h",
        "d",
        "1",
        "1x",
        "01d",
        " 1d",
        "1d ",
        "1d\n",
        "1 d",
        "1D",
        "1W",
        "1y",
        "1q",
        "1mo",
        "1d2h",
        "1_000s",
        "\uff11d",  # FULLWIDTH DIGIT ONE: a Unicode digit, not an ASCII one
        "1e3s",
    ],
)
def test_parse_duration_rejects_malformed_text(text: str) -> None:
    with pytest.raises(InvalidResetDuration) as caught:
        parse_duration(text)
    assert repr(text) in caught.value.message


def test_parse_duration_error_is_a_sentence_naming_the_value() -> None:
    with pytest.raises(InvalidResetDuration) as caught:
        parse_duration("1x")
    assert caught.value.message == (
        "reset_duration '1x' is not valid: expected a positive whole count without"
        " sign or leading zero followed by one of s, m, h, d, w, M, Q, Y"
        " (e.g. 30s, 5m, 1h, 1d, 1w, 1M, 1Q, 1Y)"
    )


@pytest.mark.parametrize(
    ("text", "most"),
    [
        ("3155760001s", "3155760000s"),
        ("52596001m", "52596000m"),
        ("876601h", "876600h"),
        ("36526d", "36525d"),
        ("5218w", "5217w"),
        ("1201M", "1200M"),
        ("401Q", "400Q"),
        ("101Y", "100Y"),
        ("99999999999999999999999d", "36525d"),
    ],
)
def test_parse_duration_rejects_periods_longer_than_100_years(
    text: str, most: str
) -> None:
    with pytest.raises(InvalidResetDuration) as caught:
        parse_duration(text)
    assert caught.value.message == (
        f"reset_duration '{text}' is too long:"
        f" a period spans at most 100 years ({most})"
    )


def test_parse_duration_shortens_a_huge_value_in_its_message() -> None:
    with pytest.raises(InvalidResetDuration) as caught:
        parse_duration("1" * 10_000 + "d")
    assert caught.value.message == (
        "reset_duration '" + "1" * 37 + "...' is too long: a period spans at most"
        " 100 years (36525d)"
    )


@pytest.mark.parametrize("text", ["1d", "1w", "1M", "1Q", "1Y"])
def test_calendar_alignment_is_allowed_for_one_day_week_month_quarter_year(
    text: str,
) -> None:
    validate_calendar_alignment(parse_duration(text), True)


@pytest.mark.parametrize(
    "text", ["1s", "30s", "1m", "1h", "24h", "2d", "7d", "2w", "3M", "2Q", "2Y"]
)
def test_calendar_alignment_is_rejected_for_other_durations(text: str) -> None:
    with pytest.raises(InvalidCalendarAlignment) as caught:
        validate_calendar_alignment(parse_duration(text), True)
    assert caught.value.message == (
        f"calendar_aligned needs a reset_duration of 1d, 1w, 1M, 1Q or 1Y, got '{text}'"
    )


@pytest.mark.parametrize("text", ["1s", "5m", "2d", "3M"])
def test_any_duration_may_roll_without_calendar_alignment(text: str) -> None:
    validate_calendar_alignment(parse_duration(text), False)


# --- rolling periods ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "text", "at", "expected"),
    [
        (
            utc(2026, 1, 1, 0, 0, 0, 500_000),
            "30s",
            utc(2026, 1, 1, 0, 1, 10),
            (utc(2026, 1, 1, 0, 1, 0, 500_000), utc(2026, 1, 1, 0, 1, 30, 500_000)),
        ),
        (
            utc(2026, 1, 1, 9, 3),
            "5m",
            utc(2026, 1, 1, 10, 0),
            (utc(2026, 1, 1, 9, 58), utc(2026, 1, 1, 10, 3)),
        ),
        (
            utc(2026, 3, 1, 12, 30),
            "1h",
            utc(2026, 3, 4, 7, 0),
            (utc(2026, 3, 4, 6, 30), utc(2026, 3, 4, 7, 30)),
        ),
        (
            utc(2026, 3, 1, 12, 30),
            "1d",
            utc(2026, 3, 4, 7, 0),
            (utc(2026, 3, 3, 12, 30), utc(2026, 3, 4, 12, 30)),
        ),
        (
            utc(2026, 3, 1, 12, 30),
            "3d",
            utc(2026, 3, 8, 7, 0),
            (utc(2026, 3, 7, 12, 30), utc(2026, 3, 10, 12, 30)),
        ),
        (
            utc(2026, 3, 1, 12, 30),
            "1w",
            utc(2026, 3, 20, 0, 0),
            (utc(2026, 3, 15, 12, 30), utc(2026, 3, 22, 12, 30)),
        ),
        (
            utc(2026, 3, 1, 12, 30),
            "2w",
            utc(2026, 3, 20, 0, 0),
            (utc(2026, 3, 15, 12, 30), utc(2026, 3, 29, 12, 30)),
        ),
    ],
)
def test_rolling_fixed_length_periods_step_from_the_anchor(
    anchor: datetime, text: str, at: datetime, expected: tuple[datetime, datetime]
) -> None:
    assert rolling(at, anchor, text) == expected


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (utc(2025, 2, 15), (utc(2025, 1, 31, 10), utc(2025, 2, 28, 10))),
        (utc(2025, 2, 28, 10), (utc(2025, 2, 28, 10), utc(2025, 3, 31, 10))),
        (utc(2025, 3, 31, 9), (utc(2025, 2, 28, 10), utc(2025, 3, 31, 10))),
        (utc(2025, 4, 5), (utc(2025, 3, 31, 10), utc(2025, 4, 30, 10))),
        (utc(2025, 12, 31, 10), (utc(2025, 12, 31, 10), utc(2026, 1, 31, 10))),
    ],
)
def test_monthly_periods_from_jan_31_clamp_to_each_month_end(
    at: datetime, expected: tuple[datetime, datetime]
) -> None:
    assert rolling(at, utc(2025, 1, 31, 10), "1M") == expected


def test_monthly_periods_from_jan_31_end_on_feb_29_in_a_leap_year() -> None:
    assert rolling(utc(2024, 3, 1), utc(2024, 1, 31), "1M") == (
        utc(2024, 2, 29),
        utc(2024, 3, 31),
    )


def test_monthly_period_keeps_the_anchor_time_of_day() -> None:
    anchor = utc(2025, 1, 15, 12)
    assert rolling(utc(2025, 3, 15, 11, 59, 59, 999_999), anchor, "1M") == (
        utc(2025, 2, 15, 12),
        utc(2025, 3, 15, 12),
    )


def test_multi_month_periods_count_months_from_the_anchor() -> None:
    assert rolling(utc(2025, 6, 1), utc(2024, 12, 31), "2M") == (
        utc(2025, 4, 30),
        utc(2025, 6, 30),
    )


def test_quarterly_periods_clamp_from_the_anchor_not_from_the_previous_boundary() -> (
    None
):
    anchor = utc(2025, 11, 30)
    assert rolling(utc(2026, 1, 1), anchor, "1Q") == (
        utc(2025, 11, 30),
        utc(2026, 2, 28),
    )
    assert rolling(utc(2026, 3, 1), anchor, "1Q") == (
        utc(2026, 2, 28),
        utc(2026, 5, 30),
    )


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (utc(2024, 12, 1), (utc(2024, 2, 29), utc(2025, 2, 28))),
        (utc(2025, 6, 1), (utc(2025, 2, 28), utc(2026, 2, 28))),
        (utc(2028, 2, 29), (utc(2028, 2, 29), utc(2029, 2, 28))),
        (utc(2028, 2, 28, 23), (utc(2027, 2, 28), utc(2028, 2, 29))),
    ],
)
def test_yearly_periods_from_feb_29_fall_on_feb_28_outside_leap_years(
    at: datetime, expected: tuple[datetime, datetime]
) -> None:
    assert rolling(at, utc(2024, 2, 29), "1Y") == expected


def test_two_year_periods_count_years_from_the_anchor() -> None:
    assert rolling(utc(2029, 1, 1), utc(2024, 2, 29), "2Y") == (
        utc(2028, 2, 29),
        utc(2030, 2, 28),
    )


def test_fixed_length_period_before_the_anchor_has_negative_k() -> None:
    assert rolling(utc(2026, 1, 7, 15), utc(2026, 1, 10), "1d") == (
        utc(2026, 1, 7),
        utc(2026, 1, 8),
    )


def test_monthly_period_before_the_anchor_clamps_too() -> None:
    anchor = utc(2025, 3, 31)
    assert rolling(utc(2025, 2, 10), anchor, "1M") == (
        utc(2025, 1, 31),
        utc(2025, 2, 28),
    )
    assert rolling(utc(2025, 2, 28, 12), anchor, "1M") == (
        utc(2025, 2, 28),
        utc(2025, 3, 31),
    )
    assert rolling(utc(2024, 12, 31), anchor, "1M") == (
        utc(2024, 12, 31),
        utc(2025, 1, 31),
    )


@pytest.mark.parametrize("text", ["30s", "1h", "1d", "1w", "1M", "1Q", "1Y"])
def test_a_rolling_period_starts_inclusive_and_ends_exclusive(text: str) -> None:
    anchor = utc(2024, 1, 31, 6)
    start, end = rolling(anchor, anchor, text)
    assert start == anchor
    assert rolling(end, anchor, text)[0] == end
    assert rolling(end - timedelta(microseconds=1), anchor, text) == (start, end)


# --- calendar-aligned periods ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "at", "expected"),
    [
        ("1d", utc(2026, 11, 28, 10), (utc(2026, 11, 28), utc(2026, 11, 29))),
        ("1d", utc(2026, 12, 31, 23, 59), (utc(2026, 12, 31), utc(2027, 1, 1))),
        ("1w", utc(2026, 11, 28, 10), (utc(2026, 11, 23), utc(2026, 11, 30))),
        ("1w", utc(2026, 1, 1), (utc(2025, 12, 29), utc(2026, 1, 5))),
        ("1M", utc(2024, 2, 10), (utc(2024, 2, 1), utc(2024, 3, 1))),
        ("1M", utc(2026, 12, 31, 23), (utc(2026, 12, 1), utc(2027, 1, 1))),
        ("1Q", utc(2026, 2, 14), (utc(2026, 1, 1), utc(2026, 4, 1))),
        ("1Q", utc(2026, 6, 30, 23), (utc(2026, 4, 1), utc(2026, 7, 1))),
        ("1Q", utc(2026, 8, 1), (utc(2026, 7, 1), utc(2026, 10, 1))),
        ("1Q", utc(2026, 11, 28), (utc(2026, 10, 1), utc(2027, 1, 1))),
        ("1Y", utc(2026, 11, 28), (utc(2026, 1, 1), utc(2027, 1, 1))),
    ],
)
def test_calendar_aligned_periods_are_utc_calendar_units(
    text: str, at: datetime, expected: tuple[datetime, datetime]
) -> None:
    assert aligned(at, text) == expected


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("1d", utc(2026, 3, 5), utc(2026, 3, 6)),
        ("1w", utc(2026, 11, 30), utc(2026, 12, 7)),
        ("1M", utc(2026, 3, 1), utc(2026, 4, 1)),
        ("1Q", utc(2026, 4, 1), utc(2026, 7, 1)),
        ("1Y", utc(2027, 1, 1), utc(2028, 1, 1)),
    ],
)
def test_a_calendar_period_starts_inclusive_and_ends_exclusive(
    text: str, start: datetime, end: datetime
) -> None:
    assert aligned(start, text) == (start, end)
    assert aligned(end, text)[0] == end
    assert aligned(end - timedelta(microseconds=1), text) == (start, end)


def test_calendar_aligned_period_ignores_the_anchor() -> None:
    at = utc(2026, 5, 20, 13)
    duration = parse_duration("1M")
    early = period_bounds(
        at, anchor=utc(2020, 1, 9, 7), duration=duration, calendar_aligned=True
    )
    late = period_bounds(
        at, anchor=utc(2026, 5, 19, 23), duration=duration, calendar_aligned=True
    )
    assert early == late == (utc(2026, 5, 1), utc(2026, 6, 1))


def test_calendar_flag_on_a_non_alignable_duration_rolls_from_the_anchor() -> None:
    """Only legacy events can carry it; a replay must not fail on them."""
    bounds = period_bounds(
        utc(2026, 5, 20, 13, 10),
        anchor=utc(2026, 5, 1, 0, 30),
        duration=parse_duration("1h"),
        calendar_aligned=True,
    )
    assert bounds == (utc(2026, 5, 20, 12, 30), utc(2026, 5, 20, 13, 30))


def test_aware_instants_in_other_zones_are_converted_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    at = datetime(2026, 1, 1, 1, 0, tzinfo=plus_two)
    assert aligned(at, "1d") == (utc(2025, 12, 31), utc(2026, 1, 1))
    anchor = datetime(2026, 1, 1, 2, 0, tzinfo=plus_two)
    assert rolling(utc(2026, 1, 1, 5), anchor, "1h") == (
        utc(2026, 1, 1, 5),
        utc(2026, 1, 1, 6),
    )


def test_period_bounds_rejects_a_naive_instant() -> None:
    with pytest.raises(ValueError, match="at must be timezone-aware"):
        rolling(datetime(2026, 1, 1), utc(2026, 1, 1), "1d")


def test_period_bounds_rejects_a_naive_anchor() -> None:
    with pytest.raises(ValueError, match="anchor must be timezone-aware"):
        rolling(utc(2026, 1, 1), datetime(2026, 1, 1), "1d")


def test_period_start_is_the_start_of_the_period_bounds() -> None:
    start = period_start(
        utc(2026, 11, 28, 10),
        anchor=utc(2026, 1, 31),
        duration=parse_duration("1M"),
        calendar_aligned=False,
    )
    assert start == utc(2026, 10, 31)


# --- reconciliation ----------------------------------------------------------------


def budget(
    budget_id: str,
    max_limit: str,
    reset_duration: str,
    *,
    calendar_aligned: bool = False,
    reset_usage: bool = False,
) -> Budget:
    return Budget(
        budget_id=budget_id,
        max_limit=Decimal(max_limit),
        reset_duration=reset_duration,
        calendar_aligned=calendar_aligned,
        reset_usage=reset_usage,
    )


def spec(
    max_limit: str, reset_duration: str, calendar_aligned: bool | None = None
) -> BudgetSpec:
    return BudgetSpec(
        max_limit=Decimal(max_limit),
        reset_duration=reset_duration,
        calendar_aligned=calendar_aligned,
    )


def test_replacing_1d_with_1w_keeps_the_1M_budget_id() -> None:
    current = [budget("daily", "10", "1d"), budget("monthly", "100", "1M")]
    result = reconcile(current, [spec("50", "1w"), spec("200", "1M")], ids("new-1"))
    assert result == (budget("new-1", "50", "1w"), budget("monthly", "200", "1M"))


def test_reconcile_keeps_the_requested_order() -> None:
    current = [budget("a", "1", "1d"), budget("b", "2", "1M")]
    result = reconcile(current, [spec("2", "1M"), spec("1", "1d")], ids())
    assert result == (budget("b", "2", "1M"), budget("a", "1", "1d"))


def test_an_empty_request_removes_every_budget() -> None:
    assert reconcile([budget("a", "1", "1d")], [], ids()) == ()


def test_omitted_calendar_aligned_keeps_the_current_value() -> None:
    current = [budget("a", "10", "1M", calendar_aligned=True)]
    result = reconcile(current, [spec("20", "1M")], ids())
    assert result == (budget("a", "20", "1M", calendar_aligned=True),)


def test_turning_calendar_alignment_on_resets_usage() -> None:
    current = [budget("a", "10", "1M")]
    result = reconcile(current, [spec("10", "1M", calendar_aligned=True)], ids())
    assert result == (budget("a", "10", "1M", calendar_aligned=True, reset_usage=True),)


def test_turning_calendar_alignment_off_keeps_usage() -> None:
    current = [budget("a", "10", "1M", calendar_aligned=True)]
    result = reconcile(current, [spec("10", "1M", calendar_aligned=False)], ids())
    assert result == (budget("a", "10", "1M"),)


def test_keeping_calendar_alignment_on_does_not_reset_usage_again() -> None:
    current = [budget("a", "10", "1M", calendar_aligned=True, reset_usage=True)]
    result = reconcile(current, [spec("10", "1M", calendar_aligned=True)], ids())
    assert result == (budget("a", "10", "1M", calendar_aligned=True),)


def test_a_new_duration_gets_a_new_id_and_no_alignment_by_default() -> None:
    result = reconcile([], [spec("5", "1d"), spec("9", "1w", True)], ids("n1", "n2"))
    assert result == (
        budget("n1", "5", "1d"),
        budget("n2", "9", "1w", calendar_aligned=True),
    )


def test_1d_and_24h_are_different_budgets() -> None:
    current = [budget("a", "10", "1d")]
    result = reconcile(current, [spec("10", "24h"), spec("10", "1d")], ids("n1"))
    assert result == (budget("n1", "10", "24h"), budget("a", "10", "1d"))


def test_duplicate_durations_in_one_request_are_rejected() -> None:
    with pytest.raises(DuplicateResetDuration) as caught:
        reconcile([], [spec("1", "1d"), spec("2", "1w"), spec("3", "1d")], ids())
    assert caught.value.message == (
        "budgets name reset_duration '1d' more than once;"
        " an owner has at most one budget per reset_duration"
    )


def test_no_id_is_drawn_when_a_later_spec_is_invalid() -> None:
    drawn: list[str] = []

    def new_id() -> str:
        drawn.append("x")
        return "x"

    with pytest.raises(InvalidResetDuration):
        reconcile([], [spec("1", "1d"), spec("1", "1x")], new_id)
    assert drawn == []


@pytest.mark.parametrize(
    ("max_limit", "message"),
    [
        ("0", "max_limit of the '1d' budget must be greater than 0, got '0'"),
        ("-0", "max_limit of the '1d' budget must be greater than 0, got '-0'"),
        ("-5", "max_limit of the '1d' budget must be greater than 0, got '-5'"),
        ("0E-20", "max_limit of the '1d' budget must be greater than 0, got '0E-20'"),
        ("NaN", "max_limit of the '1d' budget must be a finite number, got 'NaN'"),
        ("sNaN", "max_limit of the '1d' budget must be a finite number, got 'sNaN'"),
        (
            "Infinity",
            "max_limit of the '1d' budget must be a finite number, got 'Infinity'",
        ),
        (
            "-Infinity",
            "max_limit of the '1d' budget must be a finite number, got '-Infinity'",
        ),
        (
            "0.0000000001",
            "max_limit of the '1d' budget has more than 9 fractional digits:"
            " '0.0000000001'",
        ),
        (
            "1.0000000001",
            "max_limit of the '1d' budget has more than 9 fractional digits:"
            " '1.0000000001'",
        ),
        (
            "1000000000000000000",
            "max_limit of the '1d' budget must be below 10^18,"
            " got '1000000000000000000'",
        ),
        ("1E+30", "max_limit of the '1d' budget must be below 10^18, got '1E+30'"),
    ],
)
def test_invalid_max_limits_are_rejected(max_limit: str, message: str) -> None:
    with pytest.raises(InvalidMaxLimit) as caught:
        new_budgets([spec(max_limit, "1d")], ids("n1"))
    assert caught.value.message == message


@pytest.mark.parametrize(
    "max_limit",
    ["0.000000001", "1.5000000000", "100", "1E+2", "999999999999999999.999999999"],
)
def test_max_limits_exact_to_9_fractional_digits_are_accepted(max_limit: str) -> None:
    assert new_budgets([spec(max_limit, "1d")], ids("n1")) == (
        budget("n1", max_limit, "1d"),
    )


def test_a_spec_with_a_bad_duration_is_rejected() -> None:
    with pytest.raises(InvalidResetDuration):
        new_budgets([spec("1", "0d")], ids("n1"))


def test_a_spec_aligning_a_non_alignable_duration_is_rejected() -> None:
    with pytest.raises(InvalidCalendarAlignment):
        reconcile([], [spec("1", "24h", calendar_aligned=True)], ids("n1"))


def test_new_budgets_are_all_new_in_requested_order() -> None:
    result = new_budgets([spec("1", "1M", True), spec("2", "30s")], ids("n1", "n2"))
    assert result == (
        budget("n1", "1", "1M", calendar_aligned=True),
        budget("n2", "2", "30s"),
    )


# --- rate limits -------------------------------------------------------------------


@pytest.mark.parametrize(
    "rate_limit",
    [
        RateLimit(),
        RateLimit(token_max_limit=1000, token_reset_duration="1m"),
        RateLimit(request_max_limit=5, request_reset_duration="1h"),
        RateLimit(
            token_max_limit=2**63 - 1,
            token_reset_duration="1M",
            request_max_limit=1,
            request_reset_duration="30s",
        ),
    ],
)
def test_a_valid_rate_limit_is_returned_unchanged(rate_limit: RateLimit) -> None:
    assert validate_rate_limit(rate_limit) is rate_limit


@pytest.mark.parametrize(
    ("rate_limit", "message"),
    [
        (
            RateLimit(token_max_limit=0, token_reset_duration="1m"),
            "token_max_limit must be a whole number from 1 to 9223372036854775807,"
            " got 0",
        ),
        (
            RateLimit(request_max_limit=-3, request_reset_duration="1m"),
            "request_max_limit must be a whole number from 1 to 9223372036854775807,"
            " got -3",
        ),
        (
            RateLimit(token_max_limit=2**63, token_reset_duration="1m"),
            "token_max_limit must be a whole number from 1 to 9223372036854775807,"
            " got 9223372036854775808",
        ),
        (
            RateLimit(token_max_limit=True, token_reset_duration="1m"),
            "token_max_limit must be a whole number from 1 to 9223372036854775807,"
            " got True",
        ),
        (
            RateLimit(token_max_limit=10),
            "token_max_limit needs a token_reset_duration",
        ),
        (
            RateLimit(request_reset_duration="1h"),
            "request_reset_duration '1h' needs a request_max_limit",
        ),
        (
            RateLimit(request_max_limit=10, request_reset_duration="1x"),
            "request_reset_duration: reset_duration '1x' is not valid: expected a"
            " positive whole count without sign or leading zero followed by one of"
            " s, m, h, d, w, M, Q, Y (e.g. 30s, 5m, 1h, 1d, 1w, 1M, 1Q, 1Y)",
        ),
    ],
)
def test_invalid_rate_limits_are_rejected(rate_limit: RateLimit, message: str) -> None:
    with pytest.raises(InvalidRateLimit) as caught:
        validate_rate_limit(rate_limit)
    assert caught.value.message == message
