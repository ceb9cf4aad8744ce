"""The enforcement cache in process: a cache built by applying events, ns per check()
beside a minimal dict-and-Structs check, and resident bytes per budget.

Each measurement runs in a fresh interpreter (`python -m tools.bench.cache`), so
the heap holds only the cache, the resident-set delta is the cache's, and a large
cache is gone when its measurement ends. The child prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from hashlib import sha256

import msgspec

from projections.cache import GovernanceCache
from projections.cache_entries import CheckResult
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerCreated,
    TeamCreated,
    UsageRecorded,
    VirtualKeyCreated,
)
from service.records import RecordedEvent

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
# Checks ask an hour after creation: inside every current period, so none rolls.
NOW = T0 + timedelta(hours=1)
DURATIONS = ("1d", "1M", "1Y")  # 3 budgets per owner (key, team, customer)
KEYS_PER_TEAM = 100
TEAMS_PER_CUSTOMER = 10


class Shape(msgspec.Struct, frozen=True):
    """How many owners a built cache holds; every owner has 3 budgets."""

    keys: int
    teams: int
    customers: int

    @property
    def budgets(self) -> int:
        return (self.keys + self.teams + self.customers) * len(DURATIONS)


def shape_for_keys(keys: int) -> Shape:
    teams = max(1, keys // KEYS_PER_TEAM)
    return Shape(keys, teams, max(1, teams // TEAMS_PER_CUSTOMER))


def shape_for_budgets(budgets: int) -> Shape:
    """The shape whose budget count is closest to `budgets`."""
    per_key = len(DURATIONS) * (
        1 + 1 / KEYS_PER_TEAM + 1 / (KEYS_PER_TEAM * TEAMS_PER_CUSTOMER)
    )
    return shape_for_keys(max(1, round(budgets / per_key)))


class Measured(msgspec.Struct, frozen=True, kw_only=True):
    """What one child reports (ns per check, bytes)."""

    keys: int
    budgets: int
    events: int
    build_s: float
    rss_bytes: int  # resident-set growth from building the cache
    random_ns: list[float] = []  # per repetition, random keys
    random_base_ns: list[float] = []  # the minimal check, same keys, same order
    hot_ns: list[float] = []
    hot_base_ns: list[float] = []
    p50_ns: float = 0.0  # one call at a time, random keys (timer cost removed)
    p99_ns: float = 0.0
    base_p50_ns: float = 0.0
    base_p99_ns: float = 0.0


# --- building ----------------------------------------------------------------------


def _id(kind: int, n: int) -> str:
    """A UUID-shaped id (36 characters, as in production), cheap to make."""
    return f"{kind:08x}-0000-4000-8000-{n:012x}"


def secret(n: int) -> str:
    return f"sk-gl-{n:032d}"


def secret_sha256(n: int) -> str:
    return sha256(secret(n).encode()).hexdigest()


def _budgets(kind: int, owner: int) -> tuple[Budget, ...]:
    return tuple(
        Budget(
            budget_id=_id(kind, owner * len(DURATIONS) + i),
            max_limit=Decimal(1000 * (i + 1)),
            reset_duration=duration,
        )
        for i, duration in enumerate(DURATIONS)
    )


def events(shape: Shape) -> Iterator[tuple[str, AnyEvent]]:
    """(stream_id, event): customers, teams, keys, then one usage record per key."""
    for c in range(shape.customers):
        yield (
            f"customer-{_id(1, c)}",
            CustomerCreated(
                customer_id=_id(1, c), name=f"c{c}", budgets=_budgets(11, c)
            ),
        )
    for t in range(shape.teams):
        yield (
            f"team-{_id(2, t)}",
            TeamCreated(
                team_id=_id(2, t),
                name=f"t{t}",
                customer_id=_id(1, t % shape.customers),
                budgets=_budgets(12, t),
            ),
        )
    for k in range(shape.keys):
        yield (
            f"virtual_key-{_id(3, k)}",
            VirtualKeyCreated(
                virtual_key_id=_id(3, k),
                name=f"k{k}",
                value_sha256=secret_sha256(k),
                value_hint=secret(k)[-4:],
                team_id=_id(2, k % shape.teams),
                budgets=_budgets(13, k),
            ),
        )
    for k in range(shape.keys):
        team = k % shape.teams
        yield (
            f"usage-{_id(3, k)}",
            UsageRecorded(
                virtual_key_id=_id(3, k),
                provider="openai",
                model="gpt-4o",
                cost=Decimal("0.0123"),
                input_tokens=100,
                output_tokens=20,
                occurred_at=T0 + timedelta(minutes=1),
                team_id=_id(2, team),
                customer_id=_id(1, team % shape.customers),
            ),
        )


def recorded(shape: Shape) -> Iterator[RecordedEvent]:
    """The events as the log would deliver them, one at a time (none is kept)."""
    for position, (stream_id, event) in enumerate(events(shape), start=1):
        usage = isinstance(event, UsageRecorded)
        yield RecordedEvent(
            global_position=position,
            tx_id=position,
            event_id=_id(4, position),
            stream_id=stream_id,
            stream_version=position if usage else 1,
            schema_version=type(event).schema_version,
            event=event,
            metadata={},
            recorded_at=T0 + timedelta(seconds=2 if usage else 1),
        )


def build(shape: Shape) -> tuple[GovernanceCache, int]:
    cache = GovernanceCache()
    count = 0
    for record in recorded(shape):
        cache.apply(record)
        count += 1
    return cache, count


# --- the minimal check (the physical limit) ----------------------------------------


class Limit(msgspec.Struct, gc=False):
    used: int
    limit: int


def minimal_limits(keys: Sequence[str]) -> dict[str, tuple[Limit, Limit, Limit]]:
    """A dict lookup away from 3 small Structs per key, one object each."""
    return {
        key: (Limit(10, 1000 + i), Limit(20, 5000 + i), Limit(30, 100000 + i))
        for i, key in enumerate(keys)
    }


def minimal_check(limits: dict[str, tuple[Limit, Limit, Limit]], key: str) -> bool:
    found = limits.get(key)
    if found is None:
        return True
    # A plain loop, as the research measured it: all() over a generator costs more.
    for limit in found:  # noqa: SIM110
        if limit.used >= limit.limit:
            return False
    return True


# --- timing ------------------------------------------------------------------------


def _ours(cache: GovernanceCache) -> Callable[[str], object]:
    check = cache.check

    def one(key: str) -> object:
        return check(
            virtual_key_sha256=key,
            virtual_key_id=None,
            provider="openai",
            model="gpt-4o",
            estimated_cost=None,
            now=NOW,
        )

    return one


def _theirs(limits: dict[str, tuple[Limit, Limit, Limit]]) -> Callable[[str], object]:
    def one(key: str) -> object:
        return minimal_check(limits, key)

    return one


def _loop(call: Callable[[str], object], order: Sequence[str]) -> int:
    started = time.perf_counter_ns()
    for key in order:
        call(key)
    return time.perf_counter_ns() - started


def _idle(key: str) -> object:
    return key


def ns_per_call(
    call: Callable[[str], object], order: Sequence[str], chunk: int = 1000
) -> float:
    """ns per call over `order`, the median of chunks of `chunk` calls (a chunk the
    scheduler interrupted on this shared machine does not count); the loop and a call
    of a do-nothing function are subtracted, so both sides pay only for their body."""
    spans: list[int] = []
    idle: list[int] = []
    for start in range(0, max(1, len(order) - chunk + 1), chunk):
        part = order[start : start + chunk]
        spans.append(_loop(call, part))
        idle.append(_loop(_idle, part))
    spent = statistics.median(spans) - statistics.median(idle)
    return max(spent, 0) / min(chunk, len(order))


def percentiles(
    call: Callable[[str], object], order: Sequence[str]
) -> tuple[float, float]:
    """p50 and p99 of single calls, each timed on its own, less the timer's cost."""
    clock = time.perf_counter_ns
    overhead = sorted(-clock() + clock() for _ in range(10_000))[5_000]
    spans = []
    for key in order:
        started = clock()
        call(key)
        spans.append(clock() - started - overhead)
    spans.sort()
    return float(spans[len(spans) // 2]), float(spans[int(len(spans) * 0.99)])


def rss_bytes() -> int:
    """The current resident set (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(shape: Shape, *, reps: int, checks: int) -> Measured:
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    cache, count = build(shape)
    build_s = time.perf_counter() - started
    gc.collect()
    grown = rss_bytes() - before
    result = Measured(
        keys=shape.keys,
        budgets=shape.budgets,
        events=count,
        build_s=build_s,
        rss_bytes=grown,
    )
    if not reps:
        return result
    keys = [secret_sha256(k) for k in range(shape.keys)]
    limits = minimal_limits(keys)
    rng = random.Random(7)
    order = [keys[rng.randrange(len(keys))] for _ in range(checks)]
    hot = [keys[len(keys) // 2]] * checks
    ours, theirs = _ours(cache), _theirs(limits)
    answer = ours(keys[-1])
    if not (isinstance(answer, CheckResult) and answer.allowed):
        raise RuntimeError(f"the built cache refused a key: {answer}")
    # Warm-up: every key checked once (a key links its chain at its first check).
    ns_per_call(ours, keys)
    ns_per_call(theirs, keys)
    out: dict[str, list[float]] = {
        "random_ns": [],
        "random_base_ns": [],
        "hot_ns": [],
        "hot_base_ns": [],
    }
    for _ in range(reps):
        out["random_base_ns"].append(ns_per_call(theirs, order))
        out["random_ns"].append(ns_per_call(ours, order))
        out["hot_base_ns"].append(ns_per_call(theirs, hot))
        out["hot_ns"].append(ns_per_call(ours, hot))
    sample = order[: min(len(order), 200_000)]
    base_p50, base_p99 = percentiles(theirs, sample)
    p50, p99 = percentiles(ours, sample)
    return msgspec.structs.replace(
        result,
        **out,
        p50_ns=p50,
        p99_ns=p99,
        base_p50_ns=base_p50,
        base_p99_ns=base_p99,
    )


# --- the parent's side -------------------------------------------------------------


async def measure_in_child(shape: Shape, *, reps: int, checks: int) -> Measured:
    """Run `measure` in a fresh interpreter and read its report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.bench.cache",
        "--keys",
        str(shape.keys),
        "--teams",
        str(shape.teams),
        "--customers",
        str(shape.customers),
        "--reps",
        str(reps),
        "--checks",
        str(checks),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"cache measurement exited with {proc.returncode}")
    return msgspec.json.decode(out, type=Measured)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.cache")
    p.add_argument("--keys", type=int, required=True)
    p.add_argument("--teams", type=int, required=True)
    p.add_argument("--customers", type=int, required=True)
    p.add_argument("--reps", type=int, default=3, help="0: memory only")
    p.add_argument("--checks", type=int, default=500_000, help="checks per timing")
    args = p.parse_args(argv)
    shape = Shape(args.keys, args.teams, args.customers)
    result = measure(shape, reps=args.reps, checks=args.checks)
    sys.stdout.buffer.write(msgspec.json.encode(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
