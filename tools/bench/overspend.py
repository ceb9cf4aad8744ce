"""Overspend under concurrency: gateway calls (check → provider latency → record the
actual cost) against a budget with room for a few of them, with plain checks and with
reserving checks whose holds the usage records settle."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec

from tools.bench.servers import budget_key, call_json

# What a call is expected to cost; the budget has room for `room` of these.
ESTIMATE = Decimal("1.00")
# What call i costs in the end: the estimate times ACTUAL[i % 5] (mean 1).
ACTUAL = tuple(Decimal(f) for f in ("0.70", "0.90", "1.00", "1.10", "1.30"))


class Calls(msgspec.Struct, frozen=True, kw_only=True):
    """One round of concurrent calls against a fresh key, as the service counts it."""

    reserve: bool
    calls: int
    admitted: int
    limit: Decimal
    spend: Decimal  # the budget's current_usage once every record is applied
    held: Decimal  # holds still open then (0: every admitted call settled its own)
    beyond_estimates: Decimal  # Σ max(0, actual - estimate), admitted calls

    @property
    def above_limit(self) -> Decimal:
        return max(Decimal(0), self.spend - self.limit)


def actual_cost(i: int) -> Decimal:
    return ESTIMATE * ACTUAL[i % len(ACTUAL)]


async def _call(
    session: aiohttp.ClientSession,
    url: str,
    key_id: str,
    i: int,
    *,
    reserve: bool,
    latency_s: float,
    in_flight: asyncio.Barrier,
) -> tuple[Decimal, int] | None:
    """One gateway call: (its actual cost, the record's position) when admitted.
    Every call passes `in_flight` once checked: all overlap, none ends (and frees
    headroom) before every check has been answered."""
    check: dict[str, object] = {
        "virtual_key_id": key_id,
        "provider": "openai",
        "model": "gpt-4o",
        "estimated_cost": str(ESTIMATE),
    }
    if reserve:
        check["reserve"] = True
    answer = await call_json(session, "POST", f"{url}/api/governance/check", check)
    await in_flight.wait()
    if not answer["allowed"]:
        return None
    await asyncio.sleep(latency_s)  # the provider answering: the simulated call
    cost = actual_cost(i)
    record: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "virtual_key_id": key_id,
        "provider": "openai",
        "model": "gpt-4o",
        "cost": str(cost),
        "input_tokens": 100,
        "output_tokens": 20,
    }
    if reserve:
        record["reservation_id"] = answer["reservation_id"]
    recorded = await call_json(session, "POST", f"{url}/api/usage", record)
    return cost, int(recorded["position"])


async def gateway_calls(
    url: str, *, calls: int, room: int, latency_s: float, reserve: bool
) -> Calls:
    """`calls` concurrent calls, each on its own connection, against a fresh key
    whose budget has room for `room` estimates; the spend read back from the
    service once it has applied every record."""
    limit = ESTIMATE * room
    connector = aiohttp.TCPConnector(limit=calls)
    async with aiohttp.ClientSession(connector=connector) as session:
        key_id, created = await budget_key(session, url, limit)
        in_flight = asyncio.Barrier(calls)
        ends = await asyncio.gather(
            *(
                _call(
                    session,
                    url,
                    key_id,
                    i,
                    reserve=reserve,
                    latency_s=latency_s,
                    in_flight=in_flight,
                )
                for i in range(calls)
            )
        )
        admitted = [end for end in ends if end is not None]
        position = max([created, *(p for _, p in admitted)])
        found = await call_json(
            session,
            "GET",
            f"{url}/api/governance/virtual-keys/{key_id}?min_position={position}",
        )
    [budget] = found["virtual_key"]["budgets"]
    spend = Decimal(budget["current_usage"])
    recorded = sum((cost for cost, _ in admitted), Decimal(0))
    if spend != recorded:
        raise RuntimeError(f"the calls recorded {recorded}, the service counts {spend}")
    return Calls(
        reserve=reserve,
        calls=calls,
        admitted=len(admitted),
        limit=limit,
        spend=spend,
        held=Decimal(budget["held"]),
        beyond_estimates=sum(
            (max(Decimal(0), cost - ESTIMATE) for cost, _ in admitted), Decimal(0)
        ),
    )


def detail(runs: Sequence[Calls]) -> dict[str, Any]:
    """Rounds of one kind as the results keep them (and the chart draws them)."""
    return {
        "admitted": [c.admitted for c in runs],
        "above": [float(c.above_limit) for c in runs],
        "beyond_estimates": [float(c.beyond_estimates) for c in runs],
        "held_after": [float(c.held) for c in runs],
    }
