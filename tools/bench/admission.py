"""Over-admission with several serving processes behind SO_REUSEPORT: connections
pinned to the process that serves them, the lag from a hold's ack on one process to
another's cache, and bursts of reserving checks spread across the processes against
a fixed headroom."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec

from tools.bench.lag import percentile
from tools.bench.overspend import ESTIMATE
from tools.bench.servers import budget_key, call_json

# Counted by every serving process for the checks it answered (its own registry).
CHECKS_ANSWERED = "check_seconds_count"
# Holds of the bench lapse a minute after it, whatever it leaves open.
TTL_S = 60

Session = aiohttp.ClientSession


class Probe(msgspec.Struct, frozen=True, kw_only=True):
    hold_ms: float  # the reserving check's round trip: decided, committed, answered
    seen_ms: float  # its ack → the other process answers a check with min_position
    floor_ms: float  # a check on the other process that waits for nothing
    agree: bool  # the other's `remaining` after min_position is the holder's


class Burst(msgspec.Struct, frozen=True, kw_only=True):
    reserve: bool
    gap_ms: float  # between consecutive sends (0: all at once)
    room: int  # ⌊H / e⌋
    sent: list[int]  # checks sent to each process
    admitted: list[int]  # admitted by each process
    # After min_position (the last admitted hold), each process refuses one more
    # estimate: every process sees every hold.
    refused_after: list[bool]

    @property
    def over(self) -> int:
        return sum(self.admitted) - self.room


@contextlib.asynccontextmanager
async def connections(count: int) -> AsyncIterator[list[Session]]:
    """`count` sessions of one keep-alive connection each. The client closes an idle
    connection after 5 s, before the service's 10 s would (a request on a connection
    the server has just closed fails); `pin` then places it again."""
    sessions = [
        Session(connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=5))
        for _ in range(count)
    ]
    try:
        yield sessions
    finally:
        for session in sessions:
            await session.close()


async def _checks_answered(session: Session, url: str) -> float:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(CHECKS_ANSWERED)
    )


async def pin(
    url: str, sessions: Sequence[Session], key_id: str
) -> list[list[Session]]:
    """The sessions grouped by the process at the other end of their connection: a
    check sent on one connection raises the count of checks that only its own
    process reports (nothing else may use the service meanwhile)."""
    groups: list[list[Session]] = []
    left = list(sessions)
    while left:
        before = await asyncio.gather(*(_checks_answered(s, url) for s in left))
        await call_json(
            left[0], "POST", f"{url}/api/governance/check", {"virtual_key_id": key_id}
        )
        after = await asyncio.gather(*(_checks_answered(s, url) for s in left))
        same = [s for s, b, a in zip(left, before, after, strict=True) if a > b]
        if left[0] not in same:
            raise RuntimeError("a connection moved to another process while pinned")
        groups.append(same)
        left = [s for s in left if s not in same]
    return groups


async def probes(
    url: str, groups: Sequence[Sequence[Session]], key_id: str, count: int
) -> list[Probe]:
    """One hold at a time, each on the next process: the time from its ack until
    the next process answers a check with `min_position` = the hold's position, and
    whether that answer's `remaining` then counts the hold as its taker did."""
    check = f"{url}/api/governance/check"
    found: list[Probe] = []
    for i in range(count):
        here = groups[i % len(groups)][0]
        there = groups[(i + 1) % len(groups)][0]
        started = time.perf_counter()
        held = await call_json(
            here,
            "POST",
            check,
            {
                "virtual_key_id": key_id,
                "estimated_cost": "0.01",
                "reserve": True,
                "ttl_s": TTL_S,
            },
        )
        acked = time.perf_counter()
        seen = await call_json(
            there,
            "POST",
            check,
            {
                "virtual_key_id": key_id,
                "estimated_cost": "0",
                "min_position": held["position"],
            },
        )
        answered = time.perf_counter()
        await call_json(there, "POST", check, {"virtual_key_id": key_id})
        floor = time.perf_counter() - answered
        found.append(
            Probe(
                hold_ms=(acked - started) * 1000,
                seen_ms=(answered - acked) * 1000,
                floor_ms=floor * 1000,
                agree=bool(seen["allowed"]) and seen["remaining"] == held["remaining"],
            )
        )
    return found


def _interleaved(groups: Sequence[Sequence[Session]]) -> list[tuple[int, Session]]:
    """One session of each process in turn: consecutive sends alternate processes."""
    return [
        (process, session)
        for tier in itertools.zip_longest(*groups)
        for process, session in enumerate(tier)
        if session is not None
    ]


async def burst(
    url: str, sessions: Sequence[Session], *, room: int, gap_ms: float, reserve: bool
) -> Burst:
    """One check (reserving or plain) of estimate e on every session, against a
    fresh key whose headroom H holds `room` estimates; sent all at once, or one
    every `gap_ms` alternating processes."""
    check = f"{url}/api/governance/check"
    key_id, created = await budget_key(sessions[0], url, ESTIMATE * room)
    groups = await pin(url, sessions, key_id)
    for group in groups:  # known to every process before the first send
        await call_json(
            group[0], "POST", check, {"virtual_key_id": key_id, "min_position": created}
        )
    body: dict[str, Any] = {"virtual_key_id": key_id, "estimated_cost": str(ESTIMATE)}
    if reserve:
        body |= {"reserve": True, "ttl_s": TTL_S}
    start = time.perf_counter()

    async def send(i: int, process: int, session: Session) -> tuple[int, Any]:
        due = start + i * gap_ms / 1000
        if gap_ms and due > time.perf_counter():
            await asyncio.sleep(due - time.perf_counter())  # pacing the sends
        return process, await call_json(session, "POST", check, body)

    answers = await asyncio.gather(
        *(send(i, p, s) for i, (p, s) in enumerate(_interleaved(groups)))
    )
    admitted = [0] * len(groups)
    positions = [created]
    for process, answer in answers:
        if answer["allowed"]:
            admitted[process] += 1
            positions.append(int(answer["position"]))
    refused_after = []
    if reserve:
        for group in groups:
            # Positions are not in commit order: wait for every admitted one.
            for position in sorted(positions):
                after = await call_json(
                    group[0],
                    "POST",
                    check,
                    {
                        "virtual_key_id": key_id,
                        "estimated_cost": str(ESTIMATE),
                        "min_position": position,
                    },
                )
            refused_after.append(not after["allowed"])
        await _held_as_admitted(sessions[0], url, key_id, positions, sum(admitted))
    return Burst(
        reserve=reserve,
        gap_ms=gap_ms,
        room=room,
        sent=[len(g) for g in groups],
        admitted=admitted,
        refused_after=refused_after,
    )


async def _held_as_admitted(
    session: Session, url: str, key_id: str, positions: Sequence[int], admitted: int
) -> None:
    """The log holds every admitted hold: the read model's `held` is admitted e.
    Positions are not in commit order (the highest may commit before a lower one),
    so the read waits for every admitted hold's position in turn, the last read
    answering after all of them were applied."""
    for position in sorted(positions):
        found = await call_json(
            session,
            "GET",
            f"{url}/api/governance/virtual-keys/{key_id}?min_position={position}",
        )
    [budget] = found["virtual_key"]["budgets"]
    if Decimal(budget["held"]) != ESTIMATE * admitted:
        raise RuntimeError(f"{admitted} holds admitted, {budget['held']} held")


def detail(
    bursts: Sequence[Burst], probes: Sequence[Probe], processes: int
) -> dict[str, Any]:
    """What the results keep (and the chart draws): over-admission by kind of
    burst, the spread over processes, the lag quantiles, agreement after
    min_position."""
    reserving = [b for b in bursts if b.reserve]
    over: dict[str, list[int]] = {"plain": [b.over for b in bursts if not b.reserve]}
    for b in reserving:
        over.setdefault(f"{b.gap_ms:g}", []).append(b.over)
    spans = {
        "seen_ms": [p.seen_ms for p in probes],
        "hold_ms": [p.hold_ms for p in probes],
        "floor_ms": [p.floor_ms for p in probes],
        "window_ms": [p.hold_ms + p.seen_ms for p in probes],
    }
    return {
        "count": processes,
        "over": over,
        "spread": [b.sent for b in reserving],
        "admitted": [b.admitted for b in reserving],
        **{
            name: {"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)}
            for name, v in spans.items()
        },
        "agreed": sum(p.agree for p in probes)
        + sum(all(b.refused_after) for b in reserving),
        "of": len(probes) + len(reserving),
    }
