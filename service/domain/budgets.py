"""Budget periods (rolling and calendar-aligned) and reconciliation by reset_duration.

Everything here is a pure function of its arguments: time is always a parameter, so a
replay computes the same periods as the live path did. Datetimes must be timezone-aware;
results are in UTC.
"""

from __future__ import annotations

import re
from calendar import isleap
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, InvalidOperation
from functools import lru_cache
from typing import Annotated

import msgspec

from service.domain.events import Budget, RateLimit
from service.domain.numbers import Money, money_schema
from service.errors import (
    DuplicateResetDuration,
    InvalidCalendarAlignment,
    InvalidMaxLimit,
    InvalidRateLimit,
    InvalidResetDuration,
)

# --- durations ---------------------------------------------------------------------


class Duration(msgspec.Struct, frozen=True):
    """A parsed `reset_duration`: `count` whole `unit`s, one of s m h d w M Q Y."""

    count: int
    unit: str


_FIXED_UNITS: dict[str, timedelta] = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_MONTHS_PER_UNIT: dict[str, int] = {"M": 1, "Q": 3, "Y": 12}
_ALIGNABLE_UNITS = frozenset("dwMQY")

# A period spans at most 100 years (36_525 days), so `anchor + k·D` stays far inside
# datetime's range (years 1..9999) for any instant a client can send.
_MAX_YEARS = 100
_MAX_COUNT: dict[str, int] = {
    "s": 36_525 * 86_400,
    "m": 36_525 * 1_440,
    "h": 36_525 * 24,
    "d": 36_525,
    "w": 36_525 // 7,
    "M": _MAX_YEARS * 12,
    "Q": _MAX_YEARS * 4,
    "Y": _MAX_YEARS,
}
_MAX_COUNT_DIGITS = max(len(str(n)) for n in _MAX_COUNT.values())

# ASCII digits only (`\d` would take any Unicode digit); no sign, no spaces, and no
# leading zero, so each duration has one spelling and `01d` cannot sit beside `1d`.
_DURATION = re.compile(r"([1-9][0-9]*)([smhdwMQY])")


def _count_up_to(limit: int) -> str:
    """A regular expression for the whole numbers 1..limit, without leading zeros."""
    digits = str(limit)
    shorter = len(digits) - 1
    alternatives = [f"[1-9][0-9]{{0,{shorter - 1}}}"] if shorter else []
    for i, digit in enumerate(digits):
        low, high = (1 if i == 0 else 0), int(digit) - 1
        if high >= low:
            rest = len(digits) - i - 1
            lead = str(low) if low == high else f"[{low}-{high}]"
            tail = "" if rest == 0 else "[0-9]" if rest == 1 else f"[0-9]{{{rest}}}"
            alternatives.append(f"{digits[:i]}{lead}{tail}")
    alternatives.append(digits)
    return "(?:" + "|".join(alternatives) + ")"


# The grammar parse_duration accepts, exactly, as the OpenAPI document states it.
DURATION_PATTERN = (
    "^(?:" + "|".join(f"{_count_up_to(n)}{u}" for u, n in _MAX_COUNT.items()) + ")$"
)
MAX_DURATION_LENGTH = _MAX_COUNT_DIGITS + 1
ResetDuration = Annotated[
    str,
    msgspec.Meta(
        # Enforced by parse_duration, which names the error (invalid_reset_duration).
        extra_json_schema={
            "maxLength": MAX_DURATION_LENGTH,
            "pattern": DURATION_PATTERN,
        },
        description="<count><unit>: unit one of s m h d w M Q Y; a period spans at"
        f" most {_MAX_YEARS} years",
    ),
]


def _shown(text: str) -> str:
    """`text` quoted for an error message, cut short so a huge value stays readable."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


@lru_cache(maxsize=1024)
def parse_duration(text: str) -> Duration:
    """Parse `<count><unit>`: count a positive integer, unit one of s m h d w M Q Y."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise InvalidResetDuration(
            f"reset_duration {_shown(text)} is not valid: expected a positive whole"
            " count without sign or leading zero followed by one of s, m, h, d, w,"
            " M, Q, Y (e.g. 30s, 5m, 1h, 1d, 1w, 1M, 1Q, 1Y)"
        )
    digits, unit = match.groups()
    limit = _MAX_COUNT[unit]
    # Compare lengths first: int() refuses strings of thousands of digits.
    if len(digits) > _MAX_COUNT_DIGITS or int(digits) > limit:
        raise InvalidResetDuration(
            f"reset_duration {_shown(text)} is too long: a period spans at most"
            f" {_MAX_YEARS} years ({limit}{unit})"
        )
    return Duration(int(digits), unit)


def is_calendar_alignable(duration: Duration) -> bool:
    """True for exactly one day, ISO week, month, quarter or year."""
    return duration.count == 1 and duration.unit in _ALIGNABLE_UNITS


# validate_calendar_alignment as the OpenAPI document states it.
CALENDAR_ALIGNMENT_RULE = {
    "if": {
        "properties": {"calendar_aligned": {"const": True}},
        "required": ["calendar_aligned"],
    },
    "then": {
        "properties": {"reset_duration": {"enum": ["1d", "1w", "1M", "1Q", "1Y"]}}
    },
}


def validate_calendar_alignment(duration: Duration, calendar_aligned: bool) -> None:
    if calendar_aligned and not is_calendar_alignable(duration):
        raise InvalidCalendarAlignment(
            "calendar_aligned needs a reset_duration of 1d, 1w, 1M, 1Q or 1Y,"
            f" got '{duration.count}{duration.unit}'"
        )


# --- periods -----------------------------------------------------------------------


def _as_utc(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is UTC:
        return moment
    if moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {moment.isoformat()}")
    return moment.astimezone(UTC)


def period_bounds(
    at: datetime, *, anchor: datetime, duration: Duration, calendar_aligned: bool
) -> tuple[datetime, datetime]:
    """The `[start, end)` of the period that contains `at`, in UTC.

    Rolling periods are `[anchor + k·D, anchor + (k+1)·D)` for the integer k (negative
    before the anchor); month, quarter and year steps count months from the anchor and
    clamp the day to the month's end. Calendar-aligned periods are UTC days, ISO weeks,
    months, quarters or years and ignore the anchor. A calendar_aligned flag on a
    duration that cannot be aligned (commands reject it; only legacy events can carry
    it) is ignored, so replaying such a log rolls instead of failing. A period reaching
    past year 9999 raises OverflowError or ValueError, as datetime does.
    """
    if at.tzinfo is not UTC:
        at = _as_utc(at, "at")
    if anchor.tzinfo is not UTC:
        anchor = _as_utc(anchor, "anchor")
    unit = duration.unit
    if calendar_aligned and duration.count == 1 and unit in _ALIGNABLE_UNITS:
        return _calendar_bounds(at, unit)
    step = _fixed_step(duration.count, unit)
    if step is not None:
        # timedelta % timedelta floors, so this is anchor + k·step also before anchor.
        start = at - (at - anchor) % step
        return start, start + step
    return _rolling_month_bounds(at, anchor, duration.count * _MONTHS_PER_UNIT[unit])


def period_start(
    at: datetime, *, anchor: datetime, duration: Duration, calendar_aligned: bool
) -> datetime:
    """The start of the period that contains `at` (a budget's `last_reset`)."""
    return period_bounds(
        at, anchor=anchor, duration=duration, calendar_aligned=calendar_aligned
    )[0]


@lru_cache(maxsize=256)
def _fixed_step(count: int, unit: str) -> timedelta | None:
    """The length of a fixed-length period; None for months, quarters and years."""
    one = _FIXED_UNITS.get(unit)
    return None if one is None else one * count


def _rolling_month_bounds(
    at: datetime, anchor: datetime, months: int
) -> tuple[datetime, datetime]:
    # Boundary k lies in calendar month anchor_month + k·months, so a k from whole
    # months elapsed is right or one too far (when `at` precedes the boundary's day or
    # time within that same month); boundary k+1 always lies in a later month than `at`.
    k = ((at.year - anchor.year) * 12 + at.month - anchor.month) // months
    start = _months_after(anchor, k * months)
    if start > at:
        return _months_after(anchor, (k - 1) * months), start
    return start, _months_after(anchor, (k + 1) * months)


_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _months_after(anchor: datetime, months: int) -> datetime:
    """`anchor` moved by whole calendar months, its day clamped to the month's end."""
    year, month0 = divmod(anchor.year * 12 + anchor.month - 1 + months, 12)
    day = anchor.day
    if day > 28:
        last = 29 if month0 == 1 and isleap(year) else _DAYS_IN_MONTH[month0]
        day = min(day, last)
    # Positional construction: several times faster than replace() with keywords.
    return datetime(
        year,
        month0 + 1,
        day,
        anchor.hour,
        anchor.minute,
        anchor.second,
        anchor.microsecond,
        UTC,
    )


_DAYS_BACK_TO_MONDAY = tuple(timedelta(days=n) for n in range(7))


def _calendar_bounds(at: datetime, unit: str) -> tuple[datetime, datetime]:
    if unit == "d":
        return _days(at.year, at.month, at.day, 1)
    if unit == "w":
        monday = at.date() - _DAYS_BACK_TO_MONDAY[at.weekday()]
        return _days(monday.year, monday.month, monday.day, 7)
    if unit == "M":
        first = at.month
    elif unit == "Q":
        first = at.month - (at.month - 1) % 3
    else:
        first = 1
    return _months(at.year, first, _MONTHS_PER_UNIT[unit])


# Calendar periods are shared by every meter in them: one pair of objects per period
# (an enforcement cache holds millions of meters), and a lookup instead of building.
@lru_cache(maxsize=1024)
def _days(year: int, month: int, day: int, days: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, day, 0, 0, 0, 0, UTC)
    return start, start + timedelta(days=days)


@lru_cache(maxsize=1024)
def _months(year: int, month: int, months: int) -> tuple[datetime, datetime]:
    return _first_of_month(year, month, 0), _first_of_month(year, month, months)


def _first_of_month(year: int, month: int, later: int) -> datetime:
    """Midnight UTC on the 1st of the month `later` months after year-month."""
    year, month0 = divmod(year * 12 + month - 1 + later, 12)
    return datetime(year, month0 + 1, 1, 0, 0, 0, 0, UTC)


# 18 integer and 9 fractional digits: a limit fits NUMERIC(27, 9) and stays exact.
_INTEGER_TEXT = "0*[1-9][0-9]{0,17}"
_FRACTION_TEXT = "[0-9]{1,9}0*"  # at most 9 significant fractional digits
MaxLimit = Annotated[
    Money,
    msgspec.Meta(
        extra_json_schema=money_schema(
            number={
                "exclusiveMinimum": 0,
                "exclusiveMaximum": 1e18,
                "multipleOf": 1e-9,
            },
            text=f"^(?:{_INTEGER_TEXT}(?:\\.{_FRACTION_TEXT})?"
            f"|0+\\.(?=[0-9]{{0,8}}[1-9]){_FRACTION_TEXT})$",
            description="Above 0 and below 10^18, at most 9 fractional digits",
        )
    ),
]


# --- reconciliation ----------------------------------------------------------------


class BudgetSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One budget as a request asks for it; `calendar_aligned` None means not sent.
    Within one list each `reset_duration` may appear once."""

    max_limit: MaxLimit
    reset_duration: ResetDuration
    calendar_aligned: bool | None = None


# 18 integer and 9 fractional digits: a limit fits NUMERIC(27, 9) and stays exact.
_MAX_LIMIT_CEILING = Decimal(10) ** 18
_NANO = Decimal("1e-9")
_EXACT = Context(prec=60, traps=[InvalidOperation])


def _validate_max_limit(spec: BudgetSpec) -> None:
    limit = spec.max_limit
    what = f"max_limit of the {_shown(spec.reset_duration)} budget"
    given = _shown(_as_typed(limit))
    if not limit.is_finite():
        raise InvalidMaxLimit(f"{what} must be a finite number, got {given}")
    if limit <= 0:
        raise InvalidMaxLimit(f"{what} must be greater than 0, got {given}")
    if limit >= _MAX_LIMIT_CEILING:
        raise InvalidMaxLimit(f"{what} must be below 10^18, got {given}")
    if limit.quantize(_NANO, context=_EXACT) != limit:
        raise InvalidMaxLimit(f"{what} has more than 9 fractional digits: {given}")


def _as_typed(amount: Decimal) -> str:
    """A fraction in plain digits, as a form sends it (0.0000000001, which str()
    writes 1E-10), while it takes fewer than 40 digits; any other amount as str()
    writes it (1E+30 and 0E-20 were spelled so, as numbers)."""
    if amount and amount.is_finite() and -40 < amount.adjusted() < 0:
        return format(amount, "f")
    return str(amount)


def _validate_specs(requested: Sequence[BudgetSpec]) -> None:
    seen: set[str] = set()
    for spec in requested:
        duration = parse_duration(spec.reset_duration)
        validate_calendar_alignment(duration, spec.calendar_aligned is True)
        _validate_max_limit(spec)
        if spec.reset_duration in seen:
            raise DuplicateResetDuration(
                f"budgets name reset_duration {_shown(spec.reset_duration)} more than"
                " once; an owner has at most one budget per reset_duration"
            )
        seen.add(spec.reset_duration)


def reconcile(
    current: Sequence[Budget],
    requested: Sequence[BudgetSpec],
    new_id: Callable[[], str],
) -> tuple[Budget, ...]:
    """The owner's budgets after a request replaces the whole set, in requested order.

    A kept `reset_duration` keeps its budget_id (and so its usage) and takes the new
    max_limit; an omitted calendar_aligned keeps the current value, and turning it from
    false to true sets `reset_usage`. A new duration gets `new_id()`; a dropped one is
    gone. Every spec is validated before any id is drawn.
    """
    _validate_specs(requested)
    by_duration = {budget.reset_duration: budget for budget in current}
    budgets: list[Budget] = []
    for spec in requested:
        kept = by_duration.get(spec.reset_duration)
        if kept is None:
            budgets.append(
                Budget(
                    budget_id=new_id(),
                    max_limit=spec.max_limit,
                    reset_duration=spec.reset_duration,
                    calendar_aligned=spec.calendar_aligned is True,
                )
            )
            continue
        aligned = (
            kept.calendar_aligned
            if spec.calendar_aligned is None
            else spec.calendar_aligned
        )
        budgets.append(
            Budget(
                budget_id=kept.budget_id,
                max_limit=spec.max_limit,
                reset_duration=spec.reset_duration,
                calendar_aligned=aligned,
                reset_usage=aligned and not kept.calendar_aligned,
            )
        )
    return tuple(budgets)


def new_budgets(
    requested: Sequence[BudgetSpec], new_id: Callable[[], str]
) -> tuple[Budget, ...]:
    """The budgets of a newly created owner: every spec validated, every budget new."""
    return reconcile((), requested, new_id)


# --- rate limits -------------------------------------------------------------------

MAX_RATE_LIMIT = 2**63 - 1  # a PostgreSQL bigint


def validate_rate_limit(rate_limit: RateLimit) -> RateLimit:
    """`rate_limit` itself when each limit is a positive integer with a duration."""
    _validate_rate_pair(
        "token", rate_limit.token_max_limit, rate_limit.token_reset_duration
    )
    _validate_rate_pair(
        "request", rate_limit.request_max_limit, rate_limit.request_reset_duration
    )
    return rate_limit


def _validate_rate_pair(kind: str, limit: int | None, duration: str | None) -> None:
    if limit is None:
        if duration is not None:
            raise InvalidRateLimit(
                f"{kind}_reset_duration {_shown(duration)} needs a {kind}_max_limit"
            )
        return
    if isinstance(limit, bool) or not 0 < limit <= MAX_RATE_LIMIT:
        raise InvalidRateLimit(
            f"{kind}_max_limit must be a whole number from 1 to {MAX_RATE_LIMIT},"
            f" got {limit}"
        )
    if duration is None:
        raise InvalidRateLimit(f"{kind}_max_limit needs a {kind}_reset_duration")
    try:
        parse_duration(duration)
    except InvalidResetDuration as exc:
        raise InvalidRateLimit(f"{kind}_reset_duration: {exc.message}") from exc
