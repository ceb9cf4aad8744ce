"""The one fold of budget and rate-limit usage: how an owner's meters (its budgets and
the two halves of its rate limit) move under their definition events and its usage.
The read model stores what it yields, the cache holds it, and command answers, the
dashboard and a restored cache read it.

Terms (DESIGN.md, "Budget periods"), defined here once:
- A **meter** is one budget, or one half (tokens, requests) of a rate limit. Its
  *definition* is a limit, a `reset_duration`, `calendar_aligned` (budgets only), an
  **anchor** (the `recorded_at` of the event that created it, or that gave it a new
  reset_duration) and a **usage floor**. Its periods are rolling from the anchor, or
  UTC calendar units while it is calendar-aligned (`budgets.period_bounds`).
- The **reset instant** of an event is its `recorded_at`; should the owner's ledger
  already have applied an event recorded later (a race of microseconds between
  concurrent writers), it is that later instant, so time never runs backwards here.
- The **usage floor**: usage counts only if its `occurred_at` is at or after it. It is
  the reset instant of the event that created the meter, gave it a new
  reset_duration, turned `calendar_aligned` false→true, or carried `reset_usage`
  (a legacy explicit reset). Turning `calendar_aligned` true→false moves it to the
  later of itself and the start of the calendar period that contains the switch
  instant. A floor never moves back.
- A usage record **lands in** the period, under the meter's current definition, that
  contains its `occurred_at`, whenever it was committed: late records land in their
  own past period, records stamped ahead land in theirs. A meter's usage at `now` is
  the sum of the records that land in the period containing `now` and are not
  before the floor; `last_reset` is that period's start.

Transitions (`define_budgets`, `define_rate_limit`, by id): NEW (usage counted from
the floor, so records stamped at or after it count even if committed before it);
KEPT (same reset_duration: a new limit, nothing else moves); RESET; RESHAPED (a new
reset_duration under the same id, as legacy updates do: a new meter in all but id);
UNALIGNED (true→false: the usage since the calendar period's start stays, counted in
the rolling period that now holds it, so the switch never raises usage but for
records stamped ahead of the switch past that calendar period's end); DROPPED.
Legacy events fold like their current forms: a reset is read off the change of
`calendar_aligned` itself, not only off `reset_usage`, which legacy events lack.

Bookkeeping. Money is integer nanos (the service's 9 digits: exact, and int adds
and compares are what the cache's hot path can afford); `to_money` gives the Decimal
the read model's NUMERIC columns and the answers hold (a bigint of nanos would
overflow). Usage is kept per **cell**: for a budget whose duration can be aligned
(1d 1w 1M 1Q 1Y), the part of a rolling period inside one calendar period (each
period splits into at most two); otherwise the rolling period. A record is filed
under the key max(cell start, floor), so no transition ever moves a stored amount:
the floor alone decides what counts, and every write is an addition.
The ledger's **clock** is the latest `recorded_at` applied. A record whose
`occurred_at` is not before the clock is **pending** (kept by instant, for the owner)
until the clock passes it, because a later reset or creation may still fall before
it; every other record is filed at once, in every meter of the owner.

Pure: no clock, no I/O; `now` and instants are parameters. Meters and ledgers are
mutable (the cache folds in place on its hot path); the read model restores a ledger
with `history=True`, folds a run and writes `take_filed` as increments.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import NamedTuple, Protocol

import msgspec

from service.domain.budgets import (
    Duration,
    is_calendar_alignable,
    parse_duration,
    period_bounds,
)
from service.domain.events import Budget, RateLimit

NANOS = 10**9
BUDGET = "budget"
TOKENS = "tokens"
REQUESTS = "requests"
EARLIEST = datetime.min.replace(tzinfo=UTC)
FOREVER = datetime.max.replace(tzinfo=UTC)
_PARTS = {BUDGET: 0, TOKENS: 1, REQUESTS: 2}  # index into a pending (cost, tokens, …)


# A coefficient of 1: an amount times it keeps the amount's digits, so the product
# is exact within the context's 28 (a cost has at most 21, a limit at most 27).
_GIGA = Decimal("1E9")


def to_nanos(amount: Decimal) -> int:
    """Money as whole nanos; a finer amount (never accepted) rounds up."""
    return (amount * _GIGA).__ceil__()


def to_money(nanos: int) -> Decimal:
    """Whole nanos back to an exact Decimal, without trailing zeros."""
    whole, fraction = divmod(nanos, NANOS)
    return Decimal(whole) if not fraction else Decimal(nanos).scaleb(-9).normalize()


def plain_money(amount: Decimal) -> Decimal:
    """An amount exact to the nano in the one spelling answers use (`to_money`'s),
    whatever spelled it: a request (1E+2, 15.00), PostgreSQL's sums or asyncpg's
    numeric decoding (100000000000 read back as 1.000E+11)."""
    return to_money(to_nanos(amount))


class Transition(StrEnum):
    NEW = "new"
    KEPT = "kept"
    RESET = "reset"
    RESHAPED = "reshaped"
    UNALIGNED = "unaligned"
    DROPPED = "dropped"


class Reading(NamedTuple):
    """A meter's usage in the period `[start, end)`; `start` is its `last_reset`."""

    used: int
    start: datetime
    end: datetime


class Meter(msgspec.Struct, gc=False, kw_only=True):
    """A budget (`kind` BUDGET, `limit` and `used` in nanos) or a rate-limit half
    (`kind` and `id` TOKENS or REQUESTS, in tokens or requests).

    `used`, `start` and `end` are its reading at the ledger's `now`. Usage at an
    instant in `[lo, hi)` goes to `key` (the cell last filed to, from the floor on),
    which lies in `[start, end)` when `live`. `horizon` and `trim_at` say what a
    cache keeps.
    """

    id: str
    limit: int
    used: int = 0
    start: datetime = EARLIEST
    end: datetime = EARLIEST
    floor: datetime
    lo: datetime = FOREVER
    hi: datetime = EARLIEST
    key: datetime = EARLIEST
    live: bool = False
    horizon: datetime = EARLIEST
    trim_at: datetime = FOREVER
    cells: dict[datetime, int]
    kind: str
    part: int
    reset_duration: str
    duration: Duration
    calendar_aligned: bool  # as defined; `aligned` is whether periods are calendar
    aligned: bool
    alignable: bool
    anchor: datetime


class Ledger(msgspec.Struct, gc=False, kw_only=True):
    """One owner's meters (budgets in its order), pending usage and clock.

    `now` is the latest instant read or applied: periods only roll forward. With
    `history` every cell is kept (the read model); without, only those a reading at
    or after the clock, or a later transition, can need (the cache).
    """

    budgets: tuple[Meter, ...] = ()
    tokens: Meter | None = None
    requests: Meter | None = None
    clock: datetime
    now: datetime
    pending: dict[datetime, list[int]] | None = None  # occurred_at → cost, tokens, …
    due: datetime = FOREVER  # the earliest pending instant
    wake: datetime = FOREVER  # the earliest end or trim_at of a meter
    history: bool = False


def meters(ledger: Ledger) -> Iterator[Meter]:
    """The budgets in order, then the token half, then the request half."""
    yield from ledger.budgets
    if ledger.tokens is not None:
        yield ledger.tokens
    if ledger.requests is not None:
        yield ledger.requests


def open_ledger(at: datetime, *, history: bool = False) -> Ledger:
    """The ledger of an owner created at `at`, before its definitions."""
    return Ledger(clock=at, now=at, history=history)


# --- definitions -------------------------------------------------------------------


def define_budgets(
    ledger: Ledger, budgets: Iterable[Budget], at: datetime
) -> dict[str, Transition]:
    """Fold an event carrying the owner's whole budget set, recorded at `at`; the
    transition of each budget by id, the dropped ones included."""
    if at > ledger.clock:
        _tick(ledger, at)
    instant = ledger.clock
    current = {meter.id: meter for meter in ledger.budgets}
    kept: list[Meter] = []
    changes: dict[str, Transition] = {}
    for budget in budgets:
        duration = parse_duration(budget.reset_duration)
        alignable = is_calendar_alignable(duration)
        aligned = budget.calendar_aligned and alignable
        limit = to_nanos(budget.max_limit)
        meter = current.pop(budget.budget_id, None)
        if meter is None:
            meter = _new_meter(BUDGET, budget.budget_id, limit, budget.reset_duration)
            change = Transition.NEW
        elif meter.reset_duration != budget.reset_duration:
            meter.limit, meter.reset_duration = limit, sys.intern(budget.reset_duration)
            change = Transition.RESHAPED
        else:
            meter.limit = limit
            if budget.reset_usage or (aligned and not meter.aligned):
                change = Transition.RESET
            elif meter.aligned and not aligned:
                change = Transition.UNALIGNED
            else:
                change = Transition.KEPT
        meter.calendar_aligned = budget.calendar_aligned
        if change in (Transition.NEW, Transition.RESHAPED):
            meter.duration, meter.alignable, meter.anchor = duration, alignable, at
            meter.floor = instant
        elif change is Transition.RESET:
            meter.floor = instant
        elif change is Transition.UNALIGNED:
            calendar_start = _bounds(meter, at, aligned=True)[0]
            meter.floor = max(meter.floor, calendar_start)
        meter.aligned = aligned
        if change is not Transition.KEPT:
            _refresh(ledger, meter)
        changes[meter.id] = change
        kept.append(meter)
    changes.update(dict.fromkeys(current, Transition.DROPPED))
    ledger.budgets = tuple(kept)
    _rewake(ledger)
    return changes


def define_rate_limit(
    ledger: Ledger, rate_limit: RateLimit | None, at: datetime
) -> dict[str, Transition]:
    """Fold an event carrying the owner's whole rate limit (None: none), at `at`.

    A half keeps its usage while its reset_duration stays (KEPT, whatever its limit);
    a new reset_duration starts it anew (RESHAPED); a half no longer set is DROPPED.
    """
    if at > ledger.clock:
        _tick(ledger, at)
    limits = RateLimit() if rate_limit is None else rate_limit
    changes: dict[str, Transition] = {}
    token = (limits.token_max_limit, limits.token_reset_duration)
    request = (limits.request_max_limit, limits.request_reset_duration)
    ledger.tokens = _define_half(ledger, ledger.tokens, TOKENS, *token, at, changes)
    ledger.requests = _define_half(
        ledger, ledger.requests, REQUESTS, *request, at, changes
    )
    _rewake(ledger)
    return changes


def _define_half(
    ledger: Ledger,
    meter: Meter | None,
    kind: str,
    limit: int | None,
    reset_duration: str | None,
    at: datetime,
    changes: dict[str, Transition],
) -> Meter | None:
    if limit is None or reset_duration is None:
        if meter is not None:
            changes[kind] = Transition.DROPPED
        return None
    if meter is not None and meter.reset_duration == reset_duration:
        meter.limit = limit
        changes[kind] = Transition.KEPT
        return meter
    if meter is None:
        meter = _new_meter(kind, kind, limit, reset_duration)
        changes[kind] = Transition.NEW
    else:
        meter.limit, meter.reset_duration = limit, sys.intern(reset_duration)
        changes[kind] = Transition.RESHAPED
    meter.duration, meter.anchor = parse_duration(reset_duration), at
    meter.floor = ledger.clock  # the reset instant: `at`, or the clock if later
    _refresh(ledger, meter)
    return meter


def _new_meter(kind: str, meter_id: str, limit: int, reset_duration: str) -> Meter:
    """A meter whose duration, anchor and floor the caller sets, then refreshes."""
    return Meter(
        id=meter_id,
        limit=limit,
        floor=EARLIEST,
        cells={},
        kind=kind,
        part=_PARTS[kind],
        # One string per spelling, not one per meter decoded (the cache holds millions).
        reset_duration=sys.intern(reset_duration),
        duration=Duration(1, "d"),
        calendar_aligned=False,
        aligned=False,
        alignable=False,
        anchor=EARLIEST,
    )


# --- usage -------------------------------------------------------------------------

# What one usage record charges each owner it names: occurred_at (UTC), cost in
# nanos, tokens, requests, recorded_at (the arguments of `charge`).
Charge = tuple[datetime, int, int, int, datetime]


class Usage(Protocol):
    """What the fold reads of a usage record (a UsageRecorded, or the UsageCharge
    a bulk read decodes)."""

    @property
    def cost(self) -> Decimal: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def requests(self) -> int: ...
    @property
    def occurred_at(self) -> datetime: ...


def charge_of(usage: Usage, recorded_at: datetime) -> Charge:
    """What a usage record recorded at `recorded_at` charges each owner it names."""
    at = usage.occurred_at
    if at.tzinfo is None:  # a hand-made import; API.md's timestamps are UTC
        at = at.replace(tzinfo=UTC)
    return (
        at,
        to_nanos(usage.cost),
        usage.input_tokens + usage.output_tokens,
        usage.requests,
        recorded_at,
    )


def charge(
    ledger: Ledger,
    occurred_at: datetime,
    cost: int,
    tokens: int,
    requests: int,
    recorded_at: datetime,
) -> None:
    """Fold one usage record charged to this owner: `cost` in nanos, `tokens` the
    input plus output tokens, applied at `recorded_at`. The hot path of the cache."""
    if recorded_at > ledger.clock:
        _tick(ledger, recorded_at)
    if occurred_at >= ledger.clock:
        _hold(ledger, occurred_at, cost, tokens, requests)
        return
    if cost:
        for meter in ledger.budgets:
            if meter.lo <= occurred_at < meter.hi:
                meter.cells[meter.key] += cost
                if meter.live:
                    meter.used += cost
            elif _file(meter, occurred_at, cost) and meter.live:
                meter.used += cost
    for half, amount in ((ledger.tokens, tokens), (ledger.requests, requests)):
        if amount and half is not None:
            if half.lo <= occurred_at < half.hi:
                half.cells[half.key] += amount
                if half.live:
                    half.used += amount
            elif _file(half, occurred_at, amount) and half.live:
                half.used += amount


def charge_all(ledger: Ledger, charges: Iterable[Charge]) -> None:
    """`charge` of each (occurred_at, cost, tokens, requests, recorded_at), in
    order, with the same result. A record that only adds to the cells last filed
    to (nothing pending falls due, no period ends, not held) is summed with the
    records like it and added once: the bulk path of the read model."""
    blo, bhi, tlo, thi, rlo, rhi = _window(ledger)
    clock, due, wake = ledger.clock, ledger.due, ledger.wake
    cost_sum = tokens_sum = requests_sum = 0
    for occurred_at, cost, tokens, requests, recorded_at in charges:
        after = recorded_at if recorded_at > clock else clock
        if (
            recorded_at <= due
            and recorded_at < wake
            and occurred_at < after
            and (not cost or blo <= occurred_at < bhi)
            and (not tokens or tlo <= occurred_at < thi)
            and (not requests or rlo <= occurred_at < rhi)
        ):
            clock = after
            cost_sum += cost
            tokens_sum += tokens
            requests_sum += requests
            continue
        _add(ledger, clock, cost_sum, tokens_sum, requests_sum)
        cost_sum = tokens_sum = requests_sum = 0
        charge(ledger, occurred_at, cost, tokens, requests, recorded_at)
        blo, bhi, tlo, thi, rlo, rhi = _window(ledger)
        clock, due, wake = ledger.clock, ledger.due, ledger.wake
    _add(ledger, clock, cost_sum, tokens_sum, requests_sum)


class Run(NamedTuple):
    """Usage records charged together (their `Charge`s in order) and what decides
    whether `charge_runs` may add them at once."""

    charges: list[Charge]
    cost: int
    tokens: int
    requests: int
    earliest: datetime  # the earliest occurred_at
    latest: datetime  # the latest occurred_at
    recorded: datetime  # the latest recorded_at
    ahead: datetime | None  # the latest occurred_at not before its own recorded_at


def run_of(charges: list[Charge]) -> Run:
    """The records `charges` (in order) as one `Run`."""
    cost = tokens = requests = 0
    earliest, latest, recorded = FOREVER, EARLIEST, EARLIEST
    ahead: datetime | None = None
    for occurred_at, c, t, r, recorded_at in charges:
        cost += c
        tokens += t
        requests += r
        if occurred_at < earliest:
            earliest = occurred_at
        if occurred_at > latest:
            latest = occurred_at
        if recorded_at > recorded:
            recorded = recorded_at
        if occurred_at >= recorded_at and (ahead is None or occurred_at > ahead):
            ahead = occurred_at
    return Run(charges, cost, tokens, requests, earliest, latest, recorded, ahead)


def charge_runs(ledger: Ledger, runs: Iterable[Run]) -> bool:
    """Add runs of records (of one owner, their order among each other unknown) at
    once when every record of each is one `charge_all` adds without a decision:
    it lands in the cells last filed to, before the clock, and nothing falls due.
    Those sum alike in any order, so the ledger is then as `charge_all` of the
    records in log order leaves it. False, with nothing changed, when one may not
    (the caller then folds the records in log order)."""
    blo, bhi, tlo, thi, rlo, rhi = _window(ledger)
    clock, due, wake = ledger.clock, ledger.due, ledger.wake
    runs = list(runs)
    for run in runs:
        if not (
            run.recorded <= due
            and run.recorded < wake
            and (run.ahead is None or run.ahead < clock)
            and blo <= run.earliest
            and run.latest < bhi
            and tlo <= run.earliest
            and run.latest < thi
            and rlo <= run.earliest
            and run.latest < rhi
        ):
            return False
    for run in runs:
        if run.charges:  # the clock moves to the latest recorded_at, as there
            _add(ledger, run.recorded, run.cost, run.tokens, run.requests)
    return True


def _window(ledger: Ledger) -> tuple[datetime, ...]:
    """Where usage lands in the cells last filed to: [lo, hi) of every budget, of
    the token half, of the request half (a half that is not there: everywhere)."""
    blo, bhi = EARLIEST, FOREVER
    for meter in ledger.budgets:
        blo, bhi = max(blo, meter.lo), min(bhi, meter.hi)
    tokens, requests = ledger.tokens, ledger.requests
    return (
        blo,
        bhi,
        EARLIEST if tokens is None else tokens.lo,
        FOREVER if tokens is None else tokens.hi,
        EARLIEST if requests is None else requests.lo,
        FOREVER if requests is None else requests.hi,
    )


def _add(
    ledger: Ledger, clock: datetime, cost: int, tokens: int, requests: int
) -> None:
    """What records within `_window` charged: the clock moved to `clock` (nothing
    fell due, no period ended) and amounts added to the cells last filed to."""
    if clock > ledger.clock:
        ledger.clock = clock
    if clock > ledger.now:
        ledger.now = clock
    if cost:
        for meter in ledger.budgets:
            meter.cells[meter.key] += cost
            if meter.live:
                meter.used += cost
    for half, amount in ((ledger.tokens, tokens), (ledger.requests, requests)):
        if amount and half is not None:
            half.cells[half.key] += amount
            if half.live:
                half.used += amount


def advance(ledger: Ledger, now: datetime) -> None:
    """Roll every meter whose period ended by `now`: `used`, `start` and `end` are
    then the reading at `now` (or at a later instant already seen)."""
    if now > ledger.now:
        ledger.now = now
        if now >= ledger.wake:
            _wake(ledger)


def reading(ledger: Ledger, meter: Meter, at: datetime) -> Reading:
    """The meter's usage in the period containing `at`, from its cells and the
    owner's pending usage; without `history`, for an `at` not before the clock."""
    start, end = _bounds(meter, at, aligned=meter.aligned)
    used = 0
    cells = meter.cells
    for key in _period_keys(meter, start, end):
        used += cells.get(key, 0)
    if ledger.pending:
        floor, part = meter.floor, meter.part
        for occurred_at, amounts in ledger.pending.items():
            if start <= occurred_at < end and occurred_at >= floor:
                used += amounts[part]
    return Reading(used, start, end)


def period_keys(meter: Meter, at: datetime) -> list[datetime]:
    """The cell keys `reading(…, at)` sums: the rows a read fetches for `at`."""
    start, end = _bounds(meter, at, aligned=meter.aligned)
    return _period_keys(meter, start, end)


def periods_of(meter: Meter) -> list[tuple[datetime, int]]:
    """The meter's usage per period of its current definition, oldest first, keyed
    by the later of the period's start and the floor (usage filed before the floor
    stays under the period's start): a period with a reset shows as two entries."""
    spend: dict[datetime, int] = {}
    for key, amount in meter.cells.items():
        start = _bounds(meter, key, aligned=meter.aligned)[0]
        if key >= meter.floor:
            start = max(start, meter.floor)
        spend[start] = spend.get(start, 0) + amount
    return sorted(spend.items())


# --- the clock, pending usage and cells ----------------------------------------------


def _tick(ledger: Ledger, at: datetime) -> None:
    """Move the clock to a later `at`: file what is no longer pending, then roll and
    (without history) forget what no longer matters, once an instant calls for it."""
    ledger.clock = at
    if at > ledger.due:
        _settle(ledger)
    if at > ledger.now:
        ledger.now = at
    if at >= ledger.wake:
        _wake(ledger)


def _wake(ledger: Ledger) -> None:
    clock, now = ledger.clock, ledger.now
    for meter in meters(ledger):
        if clock >= meter.trim_at:
            _trim(meter, clock)
        if now >= meter.end:
            _roll(ledger, meter)
    _rewake(ledger)


def _rewake(ledger: Ledger) -> None:
    ledger.wake = min(
        (min(meter.end, meter.trim_at) for meter in meters(ledger)), default=FOREVER
    )


def _hold(
    ledger: Ledger, occurred_at: datetime, cost: int, tokens: int, requests: int
) -> None:
    pending = ledger.pending
    if pending is None:
        pending = ledger.pending = {}
    amounts = pending.get(occurred_at)
    if amounts is None:
        pending[occurred_at] = [cost, tokens, requests]
    else:
        amounts[0] += cost
        amounts[1] += tokens
        amounts[2] += requests
    if occurred_at < ledger.due:
        ledger.due = occurred_at
    parts = (cost, tokens, requests)
    for meter in meters(ledger):
        if meter.start <= occurred_at < meter.end and occurred_at >= meter.floor:
            meter.used += parts[meter.part]


def _settle(ledger: Ledger) -> None:
    """File the pending usage before the clock; it already counts in `used`."""
    pending = ledger.pending
    assert pending is not None
    clock = ledger.clock
    for occurred_at in [at for at in pending if at < clock]:
        amounts = pending.pop(occurred_at)
        for meter in meters(ledger):
            amount = amounts[meter.part]
            if amount:
                _file(meter, occurred_at, amount)
    ledger.due = min(pending, default=FOREVER)
    if not pending:
        ledger.pending = None


def _file(meter: Meter, occurred_at: datetime, amount: int) -> bool:
    """Add to the cell of `occurred_at` under its key; False when it does not count
    (before the floor) or no longer matters (before a cache's horizon)."""
    if meter.lo <= occurred_at < meter.hi:
        meter.cells[meter.key] += amount
        return True
    if occurred_at < meter.floor or occurred_at < meter.horizon:
        return False
    lo, hi = _bounds(meter, occurred_at, aligned=False)
    if meter.alignable:
        c0, c1 = _bounds(meter, occurred_at, aligned=True)
        lo, hi = max(lo, c0), min(hi, c1)
    # Cells never straddle a period, so the whole cell is in the current one or not.
    key = meter.lo = max(lo, meter.floor)
    meter.hi, meter.key, meter.live = hi, key, meter.start <= key < meter.end
    cells = meter.cells
    cells[key] = cells.get(key, 0) + amount
    return True


def _bounds(meter: Meter, at: datetime, *, aligned: bool) -> tuple[datetime, datetime]:
    return period_bounds(
        at, anchor=meter.anchor, duration=meter.duration, calendar_aligned=aligned
    )


def _period_keys(meter: Meter, start: datetime, end: datetime) -> list[datetime]:
    """The keys of the usage of `[start, end)` that counts: each of its (one or two)
    cells that ends after the floor, under the later of its start and the floor."""
    floor = meter.floor
    if end <= floor:
        return []
    if meter.alignable:
        # The other grid's boundary inside the period, if any, splits it.
        inner = _bounds(meter, start, aligned=not meter.aligned)[1]
        if inner < end:
            if inner <= floor:
                return [floor]
            return [max(start, floor), inner]
    return [max(start, floor)]


def _roll(ledger: Ledger, meter: Meter) -> None:
    meter.used, meter.start, meter.end = reading(ledger, meter, ledger.now)
    meter.live = meter.start <= meter.lo < meter.end


def _refresh(ledger: Ledger, meter: Meter) -> None:
    """After a change of definition: forget the cell last filed to, re-trim, roll."""
    meter.lo, meter.hi = FOREVER, EARLIEST
    if not ledger.history:
        _trim(meter, ledger.clock)
    _roll(ledger, meter)


def _trim(meter: Meter, clock: datetime) -> None:
    """Keep the cells a cache can still need at `clock`: from `kept_from` on."""
    horizon, meter.trim_at = _horizon(meter, clock)
    if horizon != meter.horizon:
        meter.horizon = horizon
        if meter.hi <= horizon:
            meter.lo, meter.hi = FOREVER, EARLIEST
        for key in [key for key in meter.cells if key < horizon]:
            del meter.cells[key]


def _horizon(meter: Meter, clock: datetime) -> tuple[datetime, datetime]:
    """`kept_from(meter, clock)`, and the next boundary at which it may change.

    A reading is for the period containing the clock or a later one, and a later
    true→false needs the calendar and rolling periods containing its instant: every
    cell before the earlier of those periods' starts, or before the floor, is done.
    """
    start, end = _bounds(meter, clock, aligned=False)
    if meter.alignable:
        c0, c1 = _bounds(meter, clock, aligned=True)
        start, end = min(start, c0), min(end, c1)
    return max(start, meter.floor), end


def kept_from(meter: Meter, clock: datetime) -> datetime:
    """The earliest cell key a ledger without history keeps at `clock` (the lower
    bound of the cells a cache is restored with)."""
    return _horizon(meter, clock)[0]


# --- storage -----------------------------------------------------------------------


class StoredMeter(msgspec.Struct, frozen=True, kw_only=True):
    """A meter as the read model stores it: its definition and its cells (key →
    usage); for a rate-limit half `id` is its `kind`."""

    kind: str
    id: str
    limit: int
    reset_duration: str
    calendar_aligned: bool
    anchor: datetime
    floor: datetime
    cells: tuple[tuple[datetime, int], ...] = ()


class Pending(msgspec.Struct, frozen=True):
    occurred_at: datetime
    cost: int
    tokens: int
    requests: int


class StoredLedger(msgspec.Struct, frozen=True, kw_only=True):
    """An owner's ledger as the read model stores it; `meters` lists the budgets in
    order, then the token and the request half."""

    clock: datetime
    meters: tuple[StoredMeter, ...] = ()
    pending: tuple[Pending, ...] = ()


def stored(ledger: Ledger) -> StoredLedger:
    return StoredLedger(
        clock=ledger.clock,
        meters=tuple(
            StoredMeter(
                kind=m.kind,
                id=m.id,
                limit=m.limit,
                reset_duration=m.reset_duration,
                calendar_aligned=m.calendar_aligned,
                anchor=m.anchor,
                floor=m.floor,
                cells=tuple(sorted(m.cells.items())),
            )
            for m in meters(ledger)
        ),
        pending=tuple(
            Pending(at, *amounts)
            for at, amounts in sorted((ledger.pending or {}).items())
        ),
    )


def restore(state: StoredLedger, *, now: datetime, history: bool = False) -> Ledger:
    """The ledger the rows describe, read at `now`; without `history` its cells
    before `kept_from` are dropped, so it equals the ledger a cache folded."""
    ledger = Ledger(clock=state.clock, now=max(now, state.clock), history=history)
    if state.pending:
        ledger.pending = {
            p.occurred_at: [p.cost, p.tokens, p.requests] for p in state.pending
        }
        ledger.due = min(ledger.pending)
    budgets: list[Meter] = []
    for row in state.meters:
        duration = parse_duration(row.reset_duration)
        alignable = row.kind == BUDGET and is_calendar_alignable(duration)
        meter = _new_meter(row.kind, row.id, row.limit, row.reset_duration)
        meter.duration, meter.alignable, meter.anchor = duration, alignable, row.anchor
        meter.floor, meter.cells = row.floor, dict(row.cells)
        meter.calendar_aligned = row.calendar_aligned
        meter.aligned = row.calendar_aligned and alignable
        _refresh(ledger, meter)
        if row.kind == BUDGET:
            budgets.append(meter)
        elif row.kind == TOKENS:
            ledger.tokens = meter
        else:
            ledger.requests = meter
    ledger.budgets = tuple(budgets)
    _rewake(ledger)
    return ledger


def take_filed(ledger: Ledger) -> list[tuple[str, str, datetime, int]]:
    """`take_cells`, but each meter goes on filing where it last filed (that cell
    stays, at zero): what the read model's projector takes between batches of a
    ledger it keeps, so the next batch need not find its cells again."""
    taken = [
        (meter.kind, meter.id, key, amount)
        for meter in meters(ledger)
        for key, amount in sorted(meter.cells.items())
    ]
    for meter in meters(ledger):
        cells = meter.cells
        cells.clear()
        if meter.lo < meter.hi:
            cells[meter.key] = 0
    return taken
