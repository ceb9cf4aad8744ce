"""What the reservation tests share: a service with a token per role, a key under a
team with one budget, a reserving check and a usage record of that key."""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

from service.config import Settings
from tests.api import Api, bearer

CHECK = "/api/governance/check"
KEYS = "/api/governance/virtual-keys"
TEAMS = "/api/governance/teams"
TOKENS = Settings(
    admin_tokens=frozenset({"adm"}),
    recorder_tokens=frozenset({"rec"}),
    reader_tokens=frozenset({"read"}),
)


class KeyUnderTeam(NamedTuple):
    key_id: str
    secret: str
    budget_id: str  # the team's one budget


async def key_under_team(api: Api, limit: int = 10) -> KeyUnderTeam:
    """A key under a team with one daily budget of `limit`, known to the cache and
    the read model."""
    team = await api.create(
        TEAMS,
        {"name": "t", "budgets": [{"max_limit": limit, "reset_duration": "1d"}]},
    )
    key = await api.create(KEYS, {"name": "k", "team_id": team["team"]["id"]})
    await api.caught_up(key["position"])
    return KeyUnderTeam(
        key["virtual_key"]["id"],
        key["virtual_key"]["value"],
        team["team"]["budgets"][0]["id"],
    )


def reserving(key_id: str, cost: Any, **extra: Any) -> dict[str, Any]:
    """The body of a reserving check of `cost`."""
    return {"virtual_key_id": key_id, "reserve": True, "estimated_cost": cost, **extra}


async def reserve(api: Api, key_id: str, cost: Any, **extra: Any) -> tuple[int, Any]:
    """A recorder's reserving check: (status, answer)."""
    return await api.call(
        "POST", CHECK, reserving(key_id, cost, **extra), headers=bearer("rec")
    )


async def check_at(
    api: Api, key_id: str, position: int, *, exact: bool = False
) -> tuple[int, Any]:
    """A recorder's plain check of the key once the cache has applied `position`:
    (status, answer), money exact when `exact`."""
    return await api.call(
        "POST",
        CHECK,
        {"virtual_key_id": key_id, "min_position": position},
        headers=bearer("rec"),
        exact=exact,
    )


async def budget(api: Api, budget_id: str, position: int) -> dict[str, Any]:
    """A budget as GET answers it once the read model has applied `position`
    (money exact)."""
    _, found = await api.call(
        "GET", f"/api/governance/budgets?min_position={position}", exact=True
    )
    [only] = [b for b in found["budgets"] if b["id"] == budget_id]
    return dict(only)


def usage_record(key_id: str, cost: str = "0.5", **extra: Any) -> dict[str, Any]:
    """A usage record of the key, with a fresh event id."""
    return {
        "event_id": str(uuid.uuid4()),
        "virtual_key_id": key_id,
        "provider": "openai",
        "model": "gpt-4o",
        "cost": cost,
        **extra,
    }
