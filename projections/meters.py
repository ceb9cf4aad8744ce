"""Meters of the enforcement cache: a budget (money as integer nanos) or one half of
a rate limit (tokens or requests) with the usage of its current period, and the
period bookkeeping: charging usage, rolling to a later period, reshaping and
resetting when an event changes the limit, and restoring from the read model.

A meter keeps the usage of its *current* period with the period's bounds; it rolls
lazily once a check's `now` (or a usage event's `recorded_at`, the service clock when
it was accepted) passes the period's end. Usage of later periods (`occurred_at` ahead
of the clock) waits in a small dict; usage of past periods is dropped: no check asks
for it and the read model keeps it. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal

import msgspec

from service.domain.budgets import Duration, parse_duration, period_bounds
from service.domain.events import Budget, RateLimit

NANOS = 10**9


def to_nanos(amount: Decimal) -> int:
    """Money as whole nanos; a finer amount rounds up (ceil(x) > h iff x > h)."""
    scaled = amount.scaleb(9)
    whole = int(scaled)
    return whole if whole == scaled else math.ceil(scaled)


def to_money(nanos: int) -> Decimal:
    """Whole nanos back to an exact Decimal, without trailing zeros."""
    whole, fraction = divmod(nanos, NANOS)
    if not fraction:
        return Decimal(whole)
    return Decimal(nanos).scaleb(-9).normalize()


# --- meters ------------------------------------------------------------------------


class Meter(msgspec.Struct, gc=False):
    """A budget (money in nanos) or one half of a rate limit (tokens or requests)
    with its usage in the current period `[start, end)`."""

    name: str  # the budget_id, or "tokens" / "requests" for a rate limit
    limit: int
    duration: Duration
    calendar_aligned: bool
    anchor: datetime
    floor: datetime  # usage before this instant never counts (creation or reset)
    start: datetime
    end: datetime
    used: int = 0
    ahead: dict[datetime, int] | None = None  # period start → usage, later periods


def _new_meter(
    name: str, limit: int, duration: Duration, calendar_aligned: bool, at: datetime
) -> Meter:
    start, end = period_bounds(
        at, anchor=at, duration=duration, calendar_aligned=calendar_aligned
    )
    return Meter(name, limit, duration, calendar_aligned, at, at, start, end)


def _bounds(meter: Meter, at: datetime) -> tuple[datetime, datetime]:
    return period_bounds(
        at,
        anchor=meter.anchor,
        duration=meter.duration,
        calendar_aligned=meter.calendar_aligned,
    )


def roll(meter: Meter, at: datetime) -> None:
    """Make the period containing `at` (≥ the current end) the current one."""
    start, end = _bounds(meter, at)
    used = 0
    ahead = meter.ahead
    if ahead:
        used = ahead.pop(start, 0)
        for later in [s for s in ahead if s < start]:
            del ahead[later]
        if not ahead:
            meter.ahead = None
    meter.start, meter.end, meter.used = start, end, used


def charge(meter: Meter, occurred_at: datetime, amount: int, clock: datetime) -> None:
    if occurred_at < meter.floor or not amount:
        return
    if clock >= meter.end:
        roll(meter, clock)
    if occurred_at < meter.start:
        return  # a past period: only the read model keeps it
    if occurred_at < meter.end:
        meter.used += amount
        return
    start = _bounds(meter, occurred_at)[0]
    if meter.ahead is None:
        meter.ahead = {}
    meter.ahead[start] = meter.ahead.get(start, 0) + amount


def _reshape(
    meter: Meter, duration: Duration, calendar_aligned: bool, at: datetime
) -> None:
    """New period shape from `at` on. Turning calendar alignment off keeps the
    usage of the period containing `at` (DESIGN.md); any other change of shape
    starts from 0, as in the read model, whose old periods no longer line up."""
    if at >= meter.end:
        roll(meter, at)
    keep = (
        meter.calendar_aligned
        and not calendar_aligned
        and meter.duration == duration
        and meter.start <= at
    )
    meter.duration, meter.calendar_aligned = duration, calendar_aligned
    meter.start, meter.end = _bounds(meter, at)
    meter.used = meter.used if keep else 0
    meter.ahead = None


def _reset(meter: Meter, at: datetime) -> None:
    """Usage counts from `at` on: the current period shows 0 at once when it began
    before `at`; later periods (all after `at`) keep their usage."""
    meter.floor = at
    if at >= meter.end:
        roll(meter, at)
    if at > meter.start:
        meter.used = 0
    if meter.ahead:
        meter.ahead = {s: u for s, u in meter.ahead.items() if s >= at} or None


def budget_meters(
    current: tuple[Meter, ...], budgets: tuple[Budget, ...], at: datetime
) -> tuple[Meter, ...]:
    """An owner's meters after an event that carries its whole budget set."""
    by_id = {meter.name: meter for meter in current}
    meters = []
    for budget in budgets:
        duration = parse_duration(budget.reset_duration)
        limit = to_nanos(budget.max_limit)
        meter = by_id.get(budget.budget_id)
        if meter is None:
            meter = _new_meter(
                budget.budget_id, limit, duration, budget.calendar_aligned, at
            )
        else:
            meter.limit = limit
            if (
                meter.duration != duration
                or meter.calendar_aligned != budget.calendar_aligned
            ):
                _reshape(meter, duration, budget.calendar_aligned, at)
            if budget.reset_usage:
                _reset(meter, at)
        meters.append(meter)
    return tuple(meters)


def _rate_meter(
    name: str,
    current: Meter | None,
    limit: int | None,
    reset_duration: str | None,
    at: datetime,
) -> Meter | None:
    """A rate limit half is anchored (and its usage starts) when it is first set or
    its duration changes; a new limit alone keeps its usage."""
    if limit is None or reset_duration is None:
        return None
    duration = parse_duration(reset_duration)
    if current is not None and current.duration == duration:
        current.limit = limit
        return current
    return _new_meter(name, limit, duration, False, at)


def rate_meters(
    current: tuple[Meter, ...], rate_limit: RateLimit | None, at: datetime
) -> tuple[Meter, ...]:
    if rate_limit is None:
        return ()
    by_name = {meter.name: meter for meter in current}
    token = _rate_meter(
        "tokens",
        by_name.get("tokens"),
        rate_limit.token_max_limit,
        rate_limit.token_reset_duration,
        at,
    )
    request = _rate_meter(
        "requests",
        by_name.get("requests"),
        rate_limit.request_max_limit,
        rate_limit.request_reset_duration,
        at,
    )
    return tuple(meter for meter in (token, request) if meter is not None)


def restored_meter(
    name: str,
    *,
    limit: int,
    reset_duration: str,
    calendar_aligned: bool,
    anchor: datetime,
    floor: datetime,
    usage: Mapping[datetime, int],
    now: datetime,
) -> Meter:
    """A budget or rate-limit half as the read model stores it.

    `usage` maps an *effective* period start (the later of the period's start and the
    usage floor, the read model's key) to the amount used, for the period containing
    `now` and any later one; earlier keys are ignored.
    """
    duration = parse_duration(reset_duration)
    start, end = period_bounds(
        now, anchor=anchor, duration=duration, calendar_aligned=calendar_aligned
    )
    meter = Meter(name, limit, duration, calendar_aligned, anchor, floor, start, end)
    meter.used = usage.get(max(start, floor), 0)
    ahead: dict[datetime, int] = {}
    for key, amount in usage.items():
        if key >= end:
            period = _bounds(meter, key)[0]
            ahead[period] = ahead.get(period, 0) + amount
    meter.ahead = ahead or None
    return meter
