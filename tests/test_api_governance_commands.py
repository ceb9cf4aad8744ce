"""Governance commands over HTTP against a real server and PostgreSQL: validation,
404/409/413, Idempotency-Key, VK secrets, reconciliation, deletes, concurrency."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service import eventstore
from service.config import Settings
from service.domain import teams, virtual_keys
from service.domain.events import RateLimit, TeamUpdated, VirtualKeyUpdated
from service.web.app import ROUTE_TABLES, create_app
from service.web.keys import cache_projector_key, governance_projector_key, pool_key
from service.web.routes import governance_commands

CUSTOMERS = "/api/governance/customers"
TEAMS = "/api/governance/teams"
KEYS = "/api/governance/virtual-keys"
MISSING = "00000000-0000-4000-8000-00000000dead"

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(database) -> AsyncIterator[Client]:
    app = create_app(Settings(), database)
    if governance_commands.ROUTES not in ROUTE_TABLES:
        for method, path, handler, _right in governance_commands.ROUTES:
            app.router.add_route(method, path, handler)
    async with TestClient(TestServer(app)) as client:
        yield client


async def call(
    client: Client, method: str, path: str, body: Any = None, **headers: str
) -> tuple[int, Any]:
    response = await client.request(
        method,
        path,
        json=body,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )
    return response.status, await response.json()


async def create(client: Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = await call(client, "POST", path, body)
    assert status == 201, answer
    return dict(answer)


async def event_count(client: Client) -> int:
    return int(await client.app[pool_key].fetchval("SELECT count(*) FROM events"))


async def stream(client: Client, stream_id: str) -> list[Any]:
    _, records = await eventstore.read_stream(client.app[pool_key], stream_id)
    return [r.event for r in records]


# --- create and answer shapes ------------------------------------------------------


async def test_create_customer_answers_201_with_the_entity_and_its_position(client):
    status, answer = await call(
        client,
        "POST",
        CUSTOMERS,
        {
            "name": "acme",
            "budgets": [
                {"max_limit": "100.5", "reset_duration": "1d"},
                {"max_limit": 2000, "reset_duration": "1M", "calendar_aligned": True},
            ],
            "rate_limit": {"token_max_limit": 1000, "token_reset_duration": "1h"},
        },
    )

    customer = answer["customer"]
    created_at = datetime.fromisoformat(customer["created_at"])
    month_start = created_at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    [daily, monthly] = customer["budgets"]
    assert status == 201
    assert answer == {
        "customer": {
            "id": customer["id"],
            "name": "acme",
            "budgets": [
                {
                    "id": daily["id"],
                    "max_limit": 100.5,
                    "reset_duration": "1d",
                    "calendar_aligned": False,
                    "current_usage": 0,
                    "last_reset": customer["created_at"],
                    "owner_type": "customer",
                    "owner_id": customer["id"],
                    "held": 0,
                },
                {
                    "id": monthly["id"],
                    "max_limit": 2000,
                    "reset_duration": "1M",
                    "calendar_aligned": True,
                    "current_usage": 0,
                    "last_reset": month_start.isoformat().replace("+00:00", "Z"),
                    "owner_type": "customer",
                    "owner_id": customer["id"],
                    "held": 0,
                },
            ],
            "rate_limit": {
                "token_max_limit": 1000,
                "token_reset_duration": "1h",
                "request_max_limit": None,
                "request_reset_duration": None,
                "token_current_usage": 0,
                "request_current_usage": 0,
                "token_held": 0,
                "request_held": 0,
            },
            "version": 1,
            "created_at": customer["created_at"],
            "updated_at": customer["created_at"],
        },
        "position": await client.app[pool_key].fetchval(
            "SELECT max(global_position) FROM events"
        ),
    }


async def test_create_virtual_key_returns_its_secret_once_and_stores_only_its_hash(
    client,
):
    team = (await create(client, TEAMS, {"name": "platform"}))["team"]
    answer = await create(
        client,
        KEYS,
        {
            "name": "ci",
            "team_id": team["id"],
            "provider_configs": [
                {
                    "provider": "openai",
                    "allowed_models": ["gpt-4o"],
                    "budgets": [{"max_limit": 5, "reset_duration": "1d"}],
                },
                {"provider": "anthropic"},
            ],
        },
    )
    key = answer["virtual_key"]
    value = key["value"]

    assert re.fullmatch(r"sk-gl-[A-Za-z0-9_-]{32}", value)
    assert key["value_hint"] == value[-4:]
    assert (key["team_id"], key["customer_id"], key["is_active"]) == (
        team["id"],
        None,
        True,
    )
    [openai, anthropic] = key["provider_configs"]
    assert openai["allowed_models"] == ["gpt-4o"]
    assert openai["budgets"][0]["owner_type"] == "provider_config"
    assert openai["budgets"][0]["owner_id"] == openai["id"]
    assert (anthropic["allowed_models"], anthropic["budgets"]) == (["*"], [])
    [created] = await stream(client, f"virtual_key-{key['id']}")
    assert created.value_sha256 == hashlib.sha256(value.encode()).hexdigest()

    # A later PUT without rotate_value never shows the secret again.
    status, renamed = await call(client, "PUT", f"{KEYS}/{key['id']}", {"name": "x"})
    assert status == 200
    assert "value" not in renamed["virtual_key"]


async def test_the_secret_never_appears_in_the_event_log_or_the_tables(client):
    answer = await create(client, KEYS, {"name": "ci"})
    key_id = answer["virtual_key"]["id"]
    status, rotated = await call(
        client, "PUT", f"{KEYS}/{key_id}", {"rotate_value": True}, Idempotency_Key="r1"
    )
    # /api/events shows committed events once no older transaction is in flight;
    # the projector having applied the last one proves that.
    await client.app[governance_projector_key].wait_for(rotated["position"], 5)
    events = await (await client.get("/api/events")).text()
    results = await client.app[pool_key].fetchval(
        "SELECT string_agg(encode(body, 'escape'), '') FROM command_results"
    )

    first, second = answer["virtual_key"]["value"], rotated["virtual_key"]["value"]
    assert status == 200
    assert first != second
    assert rotated["virtual_key"]["value_hint"] == second[-4:]
    for secret in (first, second):
        assert secret not in events
        assert secret[6:] not in events
        assert secret not in results
    assert hashlib.sha256(second.encode()).hexdigest() in events


# --- validation --------------------------------------------------------------------


def budget(limit: Any = 10, duration: str = "1d", **extra: Any) -> dict[str, Any]:
    return {"max_limit": limit, "reset_duration": duration, **extra}


# Open mode takes only bodies declared as JSON (a browser cannot send those
# cross-site without a preflight).
JSON_BODY = {"Content-Type": "application/json"}

INVALID_BODIES = [
    pytest.param(CUSTOMERS, b"{", "invalid_request", id="bad-json"),
    pytest.param(CUSTOMERS, b"[]", "invalid_request", id="not-an-object"),
    pytest.param(CUSTOMERS, {}, "invalid_request", id="missing-name"),
    pytest.param(CUSTOMERS, {"name": "  "}, "invalid_request", id="blank-name"),
    pytest.param(CUSTOMERS, {"name": 7}, "invalid_request", id="name-not-a-string"),
    pytest.param(
        CUSTOMERS, {"name": "a", "colour": "red"}, "invalid_request", id="unknown-field"
    ),
    pytest.param(
        CUSTOMERS,
        {"name": "a", "budgets": [budget(extra_field=1)]},
        "invalid_request",
        id="unknown-budget-field",
    ),
    pytest.param(
        CUSTOMERS,
        {"name": "a", "budgets": [budget("ten")]},
        "invalid_request",
        id="max-limit-not-a-number",
    ),
    pytest.param(
        CUSTOMERS,
        {"name": "a", "budgets": [budget(0)]},
        "invalid_max_limit",
        id="max-limit-zero",
    ),
    pytest.param(
        CUSTOMERS,
        {"name": "a", "budgets": [budget("-1")]},
        "invalid_max_limit",
        id="max-limit-negative",
    ),
    pytest.param(
        CUSTOMERS,
        {"name": "a", "budgets": [budget("0.0000000001")]},
        "invalid_max_limit",
        id="max-limit-ten-decimals",
    ),
    pytest.param(
        CUSTOMERS,
        {"name": "a", "budgets": [budget(1, "0d")]},
        "invalid_reset_duration",
        id="zero-duration",
    ),
    pytest.param(
        CUSTOMERS,
        {"name": "a", "budgets": [budget(1, "1x")]},
        "invalid_reset_duration",
        id="bad-unit",
    ),
    pytest.param(
        CUSTOMERS,
        {"name": "a", "budgets": [budget(1, "1d"), budget(2, "1d")]},
        "duplicate_reset_duration",
        id="duplicate-duration",
    ),
    pytest.param(
        CUSTOMERS,
        {"name": "a", "budgets": [budget(1, "1h", calendar_aligned=True)]},
        "invalid_calendar_alignment",
        id="calendar-hour",
    ),
    pytest.param(
        CUSTOMERS,
        {"name": "a", "budgets": [budget(1, "2M", calendar_aligned=True)]},
        "invalid_calendar_alignment",
        id="calendar-count-2",
    ),
    pytest.param(
        CUSTOMERS,
        {
            "name": "a",
            "rate_limit": {"token_max_limit": 0, "token_reset_duration": "1h"},
        },
        "invalid_rate_limit",
        id="rate-limit-zero",
    ),
    pytest.param(
        CUSTOMERS,
        {"name": "a", "rate_limit": {"request_max_limit": 5}},
        "invalid_rate_limit",
        id="rate-limit-without-duration",
    ),
    pytest.param(
        TEAMS,
        {"name": "a", "customer_id": MISSING},
        "unknown_reference",
        id="team-unknown-customer",
    ),
    pytest.param(
        KEYS,
        {"name": "a", "team_id": MISSING},
        "unknown_reference",
        id="key-unknown-team",
    ),
    pytest.param(
        KEYS,
        {"name": "a", "customer_id": MISSING},
        "unknown_reference",
        id="key-unknown-customer",
    ),
    pytest.param(
        KEYS,
        {"name": "a", "team_id": MISSING, "customer_id": MISSING},
        "conflicting_owner",
        id="key-team-and-customer",
    ),
    pytest.param(
        KEYS,
        {"name": "a", "provider_configs": [{"provider": "x"}, {"provider": "x"}]},
        "duplicate_provider",
        id="duplicate-provider",
    ),
    pytest.param(
        KEYS,
        {
            "name": "a",
            "provider_configs": [
                {"provider": "x", "budgets": [budget(1, "1w"), budget(2, "1w")]}
            ],
        },
        "duplicate_reset_duration",
        id="provider-config-duplicate-duration",
    ),
    pytest.param(
        KEYS,
        {"name": "a", "provider_configs": [{"provider": "x", "weight": 1}]},
        "invalid_request",
        id="provider-config-unknown-field",
    ),
]


@pytest.mark.parametrize(("path", "body", "code"), INVALID_BODIES)
async def test_invalid_bodies_are_400_with_a_specific_code_and_append_nothing(
    client, path, body, code
):
    if isinstance(body, bytes):
        response = await client.post(path, data=body, headers=JSON_BODY)
    else:
        response = await client.post(path, json=body)
    answer = await response.json()

    assert response.status == 400
    assert answer["error"]["code"] == code
    assert answer["error"]["message"].strip()
    assert await event_count(client) == 0


async def test_references_to_deleted_entities_are_400_on_put_too(client):
    customer = (await create(client, CUSTOMERS, {"name": "acme"}))["customer"]
    team = (await create(client, TEAMS, {"name": "platform"}))["team"]
    assert (await call(client, "DELETE", f"{CUSTOMERS}/{customer['id']}"))[0] == 200
    before = await event_count(client)

    status, answer = await call(
        client, "PUT", f"{TEAMS}/{team['id']}", {"customer_id": customer["id"]}
    )

    assert (status, answer["error"]["code"]) == (400, "unknown_reference")
    assert await event_count(client) == before


async def test_a_put_may_not_give_a_team_key_a_customer_without_leaving_the_team(
    client,
):
    team = (await create(client, TEAMS, {"name": "platform"}))["team"]
    customer = (await create(client, CUSTOMERS, {"name": "acme"}))["customer"]
    key = await create(client, KEYS, {"name": "ci", "team_id": team["id"]})

    path = f"{KEYS}/{key['virtual_key']['id']}"
    conflict = await call(client, "PUT", path, {"customer_id": customer["id"]})
    moved = await call(
        client, "PUT", path, {"customer_id": customer["id"], "team_id": None}
    )

    assert (conflict[0], conflict[1]["error"]["code"]) == (400, "conflicting_owner")
    assert moved[0] == 200
    assert (
        moved[1]["virtual_key"]["team_id"],
        moved[1]["virtual_key"]["customer_id"],
    ) == (
        None,
        customer["id"],
    )


@pytest.mark.parametrize("if_match", ["abc", "1.5", "-1", ""])
async def test_an_if_match_that_is_not_a_version_is_400(client, if_match):
    team = (await create(client, TEAMS, {"name": "platform"}))["team"]

    status, answer = await call(
        client, "PUT", f"{TEAMS}/{team['id']}", {"name": "x"}, If_Match=if_match
    )

    assert (status, answer["error"]["code"]) == (400, "invalid_request")


async def test_a_body_over_one_mebibyte_is_413_and_commits_nothing(client):
    body = b'{"name": "' + b"x" * (1 << 20) + b'"}'

    response = await client.post(CUSTOMERS, data=io.BytesIO(body), headers=JSON_BODY)
    answer = await response.json()

    assert response.status == 413
    assert answer["error"]["code"] == "body_too_large"
    assert await event_count(client) == 0


# --- 404 and 409 -------------------------------------------------------------------


@pytest.mark.parametrize("path", [CUSTOMERS, TEAMS, KEYS])
@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_unknown_ids_are_404(client, path, method):
    status, answer = await call(
        client, method, f"{path}/{MISSING}", {} if method == "PUT" else None
    )

    assert (status, answer["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_a_path_id_that_is_not_a_uuid_is_404(client, method):
    status, answer = await call(
        client, method, f"{TEAMS}/nope", {} if method == "PUT" else None
    )

    assert (status, answer["error"]["code"]) == (404, "not_found")


async def test_ids_in_paths_and_references_are_matched_in_any_uuid_spelling(client):
    customer = (await create(client, CUSTOMERS, {"name": "acme"}))["customer"]
    loud = customer["id"].upper()

    team = (await create(client, TEAMS, {"name": "t", "customer_id": loud}))["team"]
    status, renamed = await call(client, "PUT", f"{CUSTOMERS}/{loud}", {"name": "a2"})

    assert team["customer_id"] == customer["id"]
    assert (status, renamed["customer"]["name"]) == (200, "a2")


async def test_a_deleted_entity_is_404_even_with_a_matching_if_match(client):
    team = (await create(client, TEAMS, {"name": "platform"}))["team"]
    path = f"{TEAMS}/{team['id']}"
    assert (await call(client, "DELETE", path, If_Match="1"))[0] == 200

    assert (await call(client, "PUT", path, {"name": "x"}, If_Match="2"))[0] == 404
    assert (await call(client, "DELETE", path))[0] == 404


async def test_a_stale_if_match_is_409_and_the_current_one_succeeds(client):
    team = (await create(client, TEAMS, {"name": "platform"}))["team"]
    path = f"{TEAMS}/{team['id']}"

    renamed = await call(client, "PUT", path, {"name": "infra"}, If_Match="1")
    stale = await call(client, "PUT", path, {"name": "again"}, If_Match="1")
    stale_delete = await call(client, "DELETE", path, If_Match="1")
    deleted = await call(client, "DELETE", path, If_Match="2")

    assert (renamed[0], renamed[1]["team"]["version"]) == (200, 2)
    assert (stale[0], stale[1]["error"]["code"]) == (409, "version_conflict")
    assert (stale_delete[0], stale_delete[1]["error"]["code"]) == (
        409,
        "version_conflict",
    )
    assert deleted[0] == 200


# --- PUT semantics -----------------------------------------------------------------


async def test_put_budgets_reconciles_by_duration_and_a_noop_put_appends_nothing(
    client,
):
    team = (
        await create(
            client,
            TEAMS,
            {"name": "platform", "budgets": [budget(10, "1d"), budget(200, "1M")]},
        )
    )["team"]
    path = f"{TEAMS}/{team['id']}"
    monthly_id = team["budgets"][1]["id"]

    status, answer = await call(
        client, "PUT", path, {"budgets": [budget(50, "1w"), budget(300, "1M")]}
    )
    [weekly, monthly] = answer["team"]["budgets"]
    count = await event_count(client)
    same = await call(
        client,
        "PUT",
        path,
        {"name": "platform", "budgets": [budget(300, "1M"), budget(50, "1w")]},
    )
    removed = await call(client, "PUT", path, {"budgets": []})

    assert status == 200
    assert (weekly["reset_duration"], weekly["max_limit"]) == ("1w", 50)
    assert weekly["id"] not in {b["id"] for b in team["budgets"]}
    assert (monthly["id"], monthly["max_limit"]) == (monthly_id, 300)
    assert monthly["last_reset"] == team["created_at"]
    assert same == (200, answer)
    assert await event_count(client) == count + 1  # only the removal appended
    assert removed[1]["team"]["budgets"] == []
    assert removed[1]["team"]["version"] == 3


async def test_put_without_budgets_keeps_them_and_null_removes_the_rate_limit(client):
    team = (
        await create(
            client,
            TEAMS,
            {
                "name": "platform",
                "budgets": [budget(10, "1d")],
                "rate_limit": {"request_max_limit": 5, "request_reset_duration": "1m"},
            },
        )
    )["team"]

    status, answer = await call(
        client, "PUT", f"{TEAMS}/{team['id']}", {"name": "infra", "rate_limit": None}
    )

    assert status == 200
    assert answer["team"]["budgets"] == team["budgets"]
    assert answer["team"]["rate_limit"] is None
    assert answer["team"]["name"] == "infra"


async def test_provider_configs_keep_their_ids_by_provider(client):
    key = (
        await create(
            client,
            KEYS,
            {
                "name": "ci",
                "provider_configs": [{"provider": "openai"}, {"provider": "x"}],
            },
        )
    )["virtual_key"]
    openai_id = key["provider_configs"][0]["id"]

    status, answer = await call(
        client,
        "PUT",
        f"{KEYS}/{key['id']}",
        {
            "provider_configs": [
                {"provider": "mistral"},
                {"provider": "openai", "allowed_models": []},
            ]
        },
    )

    [mistral, openai] = answer["virtual_key"]["provider_configs"]
    assert status == 200
    assert (openai["id"], openai["allowed_models"]) == (openai_id, [])
    assert mistral["id"] not in {c["id"] for c in key["provider_configs"]}


async def spend(client: Client, team: dict[str, Any], cost: str, **tokens: int) -> None:
    """Record usage through a new key of `team`; return once the read model has it."""
    key = await create(client, KEYS, {"name": "spender", "team_id": team["id"]})
    await client.app[cache_projector_key].wait_for(key["position"], 5)
    status, recorded = await call(
        client,
        "POST",
        "/api/usage",
        {
            "event_id": str(uuid.uuid4()),
            "virtual_key": key["virtual_key"]["value"],
            "provider": "openai",
            "model": "gpt-4o",
            "cost": cost,
            **tokens,
        },
    )
    assert status == 202, recorded
    await client.app[governance_projector_key].wait_for(recorded["position"], 5)


async def test_a_put_answer_shows_the_read_models_usage_of_kept_budgets_and_limits(
    client,
):
    team = (
        await create(
            client,
            TEAMS,
            {
                "name": "platform",
                "budgets": [budget(10, "1d")],
                "rate_limit": {"token_max_limit": 1000, "token_reset_duration": "1h"},
            },
        )
    )["team"]
    await spend(client, team, "2.5", input_tokens=100, output_tokens=20)

    status, answer = await call(
        client,
        "PUT",
        f"{TEAMS}/{team['id']}",
        {"budgets": [budget(20, "1d"), budget(50, "1w")]},
    )

    [daily, weekly] = answer["team"]["budgets"]
    assert status == 200
    assert (daily["id"], daily["max_limit"], daily["current_usage"]) == (
        team["budgets"][0]["id"],
        20,
        2.5,
    )
    assert (weekly["reset_duration"], weekly["current_usage"]) == ("1w", 0)
    assert answer["team"]["rate_limit"] == {
        "token_max_limit": 1000,
        "token_reset_duration": "1h",
        "request_max_limit": None,
        "request_reset_duration": None,
        "token_current_usage": 120,
        "request_current_usage": 0,
        "token_held": 0,
        "request_held": 0,
    }
    # Once the projection has the PUT, GET shows the same.
    await client.app[governance_projector_key].wait_for(answer["position"], 5)
    assert await call(client, "GET", f"{TEAMS}/{team['id']}") == (
        200,
        {"team": answer["team"]},
    )


async def test_a_budget_reset_by_the_command_shows_0_in_its_answer(client):
    team = (
        await create(client, TEAMS, {"name": "platform", "budgets": [budget(10, "1d")]})
    )["team"]
    await spend(client, team, "4")

    # 1d turned calendar-aligned: DESIGN.md's reset of that budget.
    _, answer = await call(
        client,
        "PUT",
        f"{TEAMS}/{team['id']}",
        {"budgets": [budget(10, "1d", calendar_aligned=True)]},
    )

    [daily] = answer["team"]["budgets"]
    assert (daily["id"], daily["current_usage"]) == (team["budgets"][0]["id"], 0)
    await client.app[governance_projector_key].wait_for(answer["position"], 5)
    assert await call(client, "GET", f"{TEAMS}/{team['id']}") == (
        200,
        {"team": answer["team"]},
    )


# --- deletes detach ----------------------------------------------------------------


async def test_deleting_a_customer_detaches_its_teams_and_keys_atomically(client):
    acme = (await create(client, CUSTOMERS, {"name": "acme"}))["customer"]
    other = (await create(client, CUSTOMERS, {"name": "other"}))["customer"]
    team = await create(client, TEAMS, {"name": "t", "customer_id": acme["id"]})
    bystander = await create(client, TEAMS, {"name": "b", "customer_id": other["id"]})
    key = await create(client, KEYS, {"name": "k", "customer_id": acme["id"]})
    team_id, key_id = team["team"]["id"], key["virtual_key"]["id"]

    status, answer = await call(client, "DELETE", f"{CUSTOMERS}/{acme['id']}")

    team_events = await stream(client, f"team-{team_id}")
    key_events = await stream(client, f"virtual_key-{key_id}")
    assert status == 200
    assert answer == {
        "position": await client.app[pool_key].fetchval(
            "SELECT max(global_position) FROM events"
        )
    }
    assert team_events[-1] == TeamUpdated(team_id=team_id, name="t", customer_id=None)
    assert isinstance(key_events[-1], VirtualKeyUpdated)
    key_after = virtual_keys.fold(key_events)
    assert key_after is not None
    assert (key_after.team_id, key_after.customer_id) == (None, None)
    assert len(await stream(client, f"team-{bystander['team']['id']}")) == 1


async def test_deleting_a_team_detaches_its_keys(client):
    team = (await create(client, TEAMS, {"name": "t"}))["team"]
    key = await create(client, KEYS, {"name": "k", "team_id": team["id"]})

    assert (await call(client, "DELETE", f"{TEAMS}/{team['id']}"))[0] == 200

    key_events = await stream(client, f"virtual_key-{key['virtual_key']['id']}")
    key_after = virtual_keys.fold(key_events)
    assert key_after is not None
    assert (key_after.team_id, key_after.customer_id) == (None, None)
    assert teams.fold(await stream(client, f"team-{team['id']}")) is None


# --- Idempotency-Key ---------------------------------------------------------------


async def test_an_idempotent_retry_returns_the_same_bytes_and_appends_nothing(client):
    body = {"name": "ci", "budgets": [budget(5, "1d")]}

    first = await client.post(KEYS, json=body, headers={"Idempotency-Key": "k-1"})
    first_bytes = await first.read()
    count = await event_count(client)
    retry = await client.post(KEYS, json=body, headers={"Idempotency-Key": "k-1"})
    retry_bytes = await retry.read()
    other = await client.post(
        KEYS, json={"name": "other"}, headers={"Idempotency-Key": "k-1"}
    )
    other_body = await other.json()

    assert (first.status, retry.status) == (201, 201)
    assert retry_bytes == first_bytes
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert await event_count(client) == count == 1
    assert (other.status, other_body["error"]["code"]) == (422, "idempotency_conflict")


async def test_concurrent_requests_with_one_key_append_once(client):
    body = {"name": "acme"}

    answers = await asyncio.gather(
        *(
            client.post(CUSTOMERS, json=body, headers={"Idempotency-Key": "same"})
            for _ in range(5)
        )
    )
    bodies = [await a.read() for a in answers]

    assert {a.status for a in answers} == {201}
    assert len(set(bodies)) == 1
    assert await event_count(client) == 1


async def test_idempotent_delete_replays_its_answer(client):
    team = (await create(client, TEAMS, {"name": "t"}))["team"]
    path = f"{TEAMS}/{team['id']}"

    first = await call(client, "DELETE", path, Idempotency_Key="d-1")
    retry = await call(client, "DELETE", path, Idempotency_Key="d-1")

    assert first[0] == 200
    assert retry == first


# --- concurrency -------------------------------------------------------------------


async def test_concurrent_puts_without_if_match_all_land_with_no_lost_update(client):
    team = (await create(client, TEAMS, {"name": "platform"}))["team"]
    path = f"{TEAMS}/{team['id']}"
    rate_limit = {"request_max_limit": 9, "request_reset_duration": "1m"}

    answers = await asyncio.gather(
        call(client, "PUT", path, {"name": "infra"}),
        call(client, "PUT", path, {"budgets": [budget(7, "1w")]}),
        call(client, "PUT", path, {"rate_limit": rate_limit}),
    )

    final = teams.fold(await stream(client, f"team-{team['id']}"))
    assert [status for status, _ in answers] == [200, 200, 200]
    assert final is not None
    assert (final.name, final.rate_limit) == (
        "infra",
        RateLimit(request_max_limit=9, request_reset_duration="1m"),
    )
    assert [(b.reset_duration, b.max_limit) for b in final.budgets] == [
        ("1w", Decimal(7))
    ]
    assert len(await stream(client, f"team-{team['id']}")) == 4


async def test_concurrent_puts_with_the_same_if_match_give_exactly_one_409(client):
    team = (await create(client, TEAMS, {"name": "platform"}))["team"]
    path = f"{TEAMS}/{team['id']}"

    answers = await asyncio.gather(
        *(call(client, "PUT", path, {"name": f"n{i}"}, If_Match="1") for i in range(2))
    )

    assert sorted(status for status, _ in answers) == [200, 409]
    assert len(await stream(client, f"team-{team['id']}")) == 2


async def test_command_answers_match_what_get_shows_once_the_projection_caught_up(
    client,
):
    customer = await create(client, CUSTOMERS, {"name": "acme"})
    team = await create(
        client,
        TEAMS,
        {
            "name": "platform",
            "customer_id": customer["customer"]["id"],
            "budgets": [budget(10, "1d"), budget(100, "1M", calendar_aligned=True)],
            "rate_limit": {"token_max_limit": 50, "token_reset_duration": "1h"},
        },
    )
    key = await create(
        client,
        KEYS,
        {
            "name": "ci",
            "team_id": team["team"]["id"],
            "budgets": [budget("0.5", "1w")],
            "provider_configs": [
                {"provider": "openai", "budgets": [budget(3, "1d")]},
                {"provider": "anthropic", "allowed_models": ["claude"]},
            ],
        },
    )
    _, updated = await call(
        client,
        "PUT",
        f"{TEAMS}/{team['team']['id']}",
        {"budgets": [budget(20, "1d"), budget(7, "1w")]},
    )
    await client.app[governance_projector_key].wait_for(updated["position"], 5)

    for path, answer in [
        (f"{CUSTOMERS}/{customer['customer']['id']}", customer),
        (f"{TEAMS}/{team['team']['id']}", updated),
        (f"{KEYS}/{key['virtual_key']['id']}", key),
    ]:
        [(name, entity)] = [(k, v) for k, v in answer.items() if k != "position"]
        entity.pop("value", None)
        assert await call(client, "GET", path) == (200, {name: entity})
