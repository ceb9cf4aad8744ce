"""One owner's budgets in one statement: a read that asks the read model for what the
owner's last read asked (the same period keys and holders) is answered by one
statement, outside a transaction, exactly as the read in a transaction answers;
any other read of the owner falls back to that transaction (real PostgreSQL, real
aiohttp server)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest

from projections import governance_reads
from tests.api import Api, bearer, serve
from tests.reserving import KEYS, TEAMS, TOKENS, reserve, usage_record


@pytest.fixture
async def api(database):
    async with serve(database, TOKENS, bearer("adm")) as api:
        yield api


@pytest.fixture
def at_once(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per read of one owner's budgets, whether one statement answered it."""
    answered: list[bool] = []
    read_owner = governance_reads.read_owner

    async def spied(*args: Any) -> Any:
        found = await read_owner(*args)
        answered.append(found is not None)
        return found

    monkeypatch.setattr(governance_reads, "read_owner", spied)
    return answered


async def team_budgets(api: Api, team_id: str, position: int) -> list[dict[str, Any]]:
    """The team's budgets once the read model applied `position` (money exact)."""
    status, found = await api.call(
        "GET",
        f"/api/governance/budgets?owner_type=team&owner_id={team_id}"
        f"&min_position={position}",
        exact=True,
    )
    assert status == 200, found
    return [
        {k: b[k] for k in ("id", "max_limit", "current_usage", "held")}
        for b in found["budgets"]
    ]


async def spend(api: Api, key_id: str, cost: str) -> int:
    status, answer = await api.call(
        "POST", "/api/usage", usage_record(key_id, cost), headers=bearer("rec")
    )
    assert status == 202, answer
    return int(answer["position"])


async def test_a_repeated_read_is_one_statement_with_the_figures_of_the_moment(
    api, at_once
):
    team = await api.create(
        TEAMS,
        {
            "name": "t",
            "budgets": [
                {"max_limit": 10, "reset_duration": "1d"},
                {"max_limit": 100, "reset_duration": "1M"},
            ],
            "rate_limit": {"token_max_limit": 1000, "token_reset_duration": "1h"},
        },
    )
    team_id = team["team"]["id"]
    daily, monthly = (b["id"] for b in team["team"]["budgets"])
    key = await api.create(KEYS, {"name": "k", "team_id": team_id})
    key_id = key["virtual_key"]["id"]
    await api.caught_up(key["position"])

    first = await team_budgets(api, team_id, await spend(api, key_id, "0.5"))
    _, held = await reserve(api, key_id, "2")
    second = await team_budgets(api, team_id, held["position"])
    third = await team_budgets(api, team_id, await spend(api, key_id, "0.25"))

    assert at_once == [False, True, True]  # the first read is remembered
    assert first == [
        {"id": daily, "max_limit": 10, "current_usage": Decimal("0.5"), "held": 0},
        {"id": monthly, "max_limit": 100, "current_usage": Decimal("0.5"), "held": 0},
    ]
    assert second == [
        {"id": daily, "max_limit": 10, "current_usage": Decimal("0.5"), "held": 2},
        {"id": monthly, "max_limit": 100, "current_usage": Decimal("0.5"), "held": 2},
    ]
    assert third == [
        {"id": daily, "max_limit": 10, "current_usage": Decimal("0.75"), "held": 2},
        {"id": monthly, "max_limit": 100, "current_usage": Decimal("0.75"), "held": 2},
    ]


async def test_a_read_that_asks_for_other_budgets_falls_back_to_a_transaction(
    api, at_once
):
    team = await api.create(
        TEAMS, {"name": "t", "budgets": [{"max_limit": 10, "reset_duration": "1d"}]}
    )
    team_id = team["team"]["id"]
    await team_budgets(api, team_id, team["position"])
    status, replaced = await api.call(
        "PUT",
        f"{TEAMS}/{team_id}",
        {"budgets": [{"max_limit": 7, "reset_duration": "1w"}]},
    )
    assert status == 200, replaced
    [new] = replaced["team"]["budgets"]

    after = await team_budgets(api, team_id, replaced["position"])
    again = await team_budgets(api, team_id, replaced["position"])

    assert at_once == [False, False, True]  # remembered, asked for another, again
    assert (
        after
        == again
        == [{"id": new["id"], "max_limit": 7, "current_usage": 0, "held": 0}]
    )


async def test_an_owner_without_budgets_reads_empty_either_way(api, at_once):
    missing = str(uuid.uuid4())

    first = await team_budgets(api, missing, 0)
    second = await team_budgets(api, missing, 0)

    assert (first, second) == ([], [])
    assert at_once == [False, True]
