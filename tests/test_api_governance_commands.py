"""Governance commands over HTTP against a real server and PostgreSQL: validation,
404/409/413, Idempotency-Key, VK secrets, reconciliation, deletes, concurrency."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import re
import stat
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service import eventstore, idempotency
from service.config import ConfigError, Settings
from service.domain import teams, virtual_keys
from service.domain.events import RateLimit, TeamUpdated, VirtualKeyUpdated
from service.web.app import ROUTE_TABLES, create_app
from service.web.keys import (
    cache_projector_key,
    governance_projector_key,
    pool_key,
    settings_key,
)
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


# --- partial updates at every depth -------------------------------------------------


async def test_a_provider_entry_that_omits_fields_keeps_them_with_their_usage(client):
    rate_limit = {
        "token_max_limit": 1000,
        "token_reset_duration": "1h",
        "request_max_limit": 10,
        "request_reset_duration": "1m",
    }
    key = (
        await create(
            client,
            KEYS,
            {
                "name": "ci",
                "provider_configs": [
                    {
                        "provider": "openai",
                        "allowed_models": ["gpt-4o"],
                        "budgets": [budget(10, "1d")],
                        "rate_limit": rate_limit,
                    }
                ],
            },
        )
    )["virtual_key"]
    await client.app[cache_projector_key].wait_for(1, 5)
    status, recorded = await call(
        client,
        "POST",
        "/api/usage",
        {
            "event_id": str(uuid.uuid4()),
            "virtual_key": key["value"],
            "provider": "openai",
            "model": "gpt-4o",
            "cost": "2.5",
            "input_tokens": 100,
            "output_tokens": 20,
        },
    )
    assert status == 202, recorded
    await client.app[governance_projector_key].wait_for(recorded["position"], 5)

    status, answer = await call(
        client,
        "PUT",
        f"{KEYS}/{key['id']}",
        {
            "provider_configs": [
                {"provider": "openai", "rate_limit": {"request_max_limit": 20}},
                {"provider": "anthropic"},
            ]
        },
    )

    [openai, anthropic] = answer["virtual_key"]["provider_configs"]
    [before] = key["provider_configs"]
    [daily] = openai["budgets"]
    assert status == 200, answer
    assert (openai["id"], openai["allowed_models"]) == (before["id"], ["gpt-4o"])
    assert (daily["id"], daily["max_limit"], daily["current_usage"]) == (
        before["budgets"][0]["id"],
        10,
        2.5,
    )
    assert openai["rate_limit"] == {
        **rate_limit,
        "request_max_limit": 20,
        "token_current_usage": 120,
        "request_current_usage": 1,
        "token_held": 0,
        "request_held": 0,
    }
    assert (anthropic["allowed_models"], anthropic["budgets"]) == (["*"], [])
    assert anthropic["rate_limit"] is None
    await client.app[governance_projector_key].wait_for(answer["position"], 5)
    assert await call(client, "GET", f"{KEYS}/{key['id']}") == (
        200,
        {"virtual_key": answer["virtual_key"]},
    )


async def test_a_rate_limit_naming_one_half_keeps_the_other_and_null_drops_a_half(
    client,
):
    team = (
        await create(
            client,
            TEAMS,
            {
                "name": "platform",
                "rate_limit": {"token_max_limit": 1000, "token_reset_duration": "1h"},
            },
        )
    )["team"]
    path = f"{TEAMS}/{team['id']}"

    _, both = await call(
        client,
        "PUT",
        path,
        {"rate_limit": {"request_max_limit": 5, "request_reset_duration": "1s"}},
    )
    _, requests_only = await call(
        client, "PUT", path, {"rate_limit": {"token_max_limit": None}}
    )

    limits = ("token_max_limit", "token_reset_duration")
    limits += ("request_max_limit", "request_reset_duration")
    assert [both["team"]["rate_limit"][k] for k in limits] == [1000, "1h", 5, "1s"]
    assert [requests_only["team"]["rate_limit"][k] for k in limits] == [
        None,
        None,
        5,
        "1s",
    ]


async def get_caught_up(client: Client, path: str, position: int) -> tuple[int, Any]:
    """GET `path` once the read model has reached `position`."""
    joiner = "&" if "?" in path else "?"
    return await call(client, "GET", f"{path}{joiner}min_position={position}")


@pytest.mark.parametrize(
    ("collection", "name"),
    [(CUSTOMERS, "customer"), (TEAMS, "team"), (KEYS, "virtual_key")],
)
async def test_budgets_null_in_a_put_removes_every_budget_as_an_empty_list_does(
    client, collection, name
):
    created = (
        await create(
            client,
            collection,
            {"name": "acme", "budgets": [budget(10, "1d"), budget(200, "1M")]},
        )
    )[name]
    path = f"{collection}/{created['id']}"

    renamed = await call(client, "PUT", path, {"name": "renamed"})
    removed = await call(client, "PUT", path, {"budgets": None})
    again = await call(client, "PUT", path, {"budgets": None})

    assert renamed[0] == 200, renamed
    assert renamed[1][name]["budgets"] == created["budgets"]
    assert removed[0] == 200, removed
    entity = removed[1][name]
    assert (entity["name"], entity["budgets"], entity["version"]) == (
        "renamed",
        [],
        3,
    )
    assert again == (200, {name: entity, "position": removed[1]["position"]})
    assert await get_caught_up(client, path, removed[1]["position"]) == (
        200,
        {name: entity},
    )


async def test_provider_configs_null_in_a_put_removes_every_provider_config(client):
    key = (
        await create(
            client,
            KEYS,
            {
                "name": "ci",
                "budgets": [budget(50, "1M")],
                "provider_configs": [
                    {"provider": "openai", "budgets": [budget(5, "1d")]},
                    {"provider": "anthropic"},
                ],
            },
        )
    )["virtual_key"]
    path = f"{KEYS}/{key['id']}"

    status, answer = await call(client, "PUT", path, {"provider_configs": None})

    assert status == 200, answer
    entity = answer["virtual_key"]
    assert (entity["provider_configs"], entity["version"]) == ([], 2)
    assert entity["budgets"] == key["budgets"]  # omitted: kept
    assert await get_caught_up(client, path, answer["position"]) == (
        200,
        {"virtual_key": entity},
    )
    assert await get_caught_up(
        client, "/api/governance/budgets?owner_type=provider_config", answer["position"]
    ) == (200, {"budgets": []})


async def test_null_inside_a_provider_entry_removes_and_an_omitted_field_keeps(
    client,
):
    rate_limit = {
        "token_max_limit": 1000,
        "token_reset_duration": "1h",
        "request_max_limit": 10,
        "request_reset_duration": "1m",
    }
    openai_before = {
        "provider": "openai",
        "allowed_models": ["gpt-4o"],
        "budgets": [budget(10, "1d")],
        "rate_limit": rate_limit,
    }
    key = (
        await create(
            client,
            KEYS,
            {
                "name": "ci",
                "provider_configs": [
                    openai_before,
                    {**openai_before, "provider": "anthropic"},
                ],
            },
        )
    )["virtual_key"]
    path = f"{KEYS}/{key['id']}"

    status, answer = await call(
        client,
        "PUT",
        path,
        {
            "provider_configs": [
                {
                    "provider": "openai",
                    "allowed_models": None,
                    "budgets": None,
                    "rate_limit": {"token_max_limit": None},
                },
                {"provider": "anthropic"},
            ]
        },
    )

    assert status == 200, answer
    [openai, anthropic] = answer["virtual_key"]["provider_configs"]
    assert openai == {
        **key["provider_configs"][0],
        "allowed_models": ["*"],  # null lifts the restriction: every model
        "budgets": [],
        "rate_limit": {
            **key["provider_configs"][0]["rate_limit"],
            "token_max_limit": None,
            "token_reset_duration": None,
        },
    }
    assert anthropic == key["provider_configs"][1]
    assert await get_caught_up(client, path, answer["position"]) == (
        200,
        {"virtual_key": answer["virtual_key"]},
    )


async def test_a_key_names_its_team_in_any_letter_case_and_is_answered_in_lower_case(
    client,
):
    team = (await create(client, TEAMS, {"name": "platform"}))["team"]

    key = await create(client, KEYS, {"name": "k", "team_id": team["id"].upper()})
    status, moved = await call(
        client,
        "PUT",
        f"{KEYS}/{key['virtual_key']['id'].upper()}",
        {"team_id": None, "customer_id": None},
    )

    assert key["virtual_key"]["team_id"] == team["id"]
    assert (status, moved["virtual_key"]["team_id"]) == (200, None)


# --- every answer but a 5xx is kept for its Idempotency-Key ------------------------


async def test_a_refusal_is_replayed_even_after_the_state_changed(client):
    team = (await create(client, TEAMS, {"name": "platform"}))["team"]
    path = f"{TEAMS}/{team['id']}"
    stale = {"If-Match": "2", "Idempotency-Key": "stale-put"}

    first = await client.put(path, json={"name": "a"}, headers=stale)
    first_bytes = await first.read()
    moved = await call(client, "PUT", path, {"name": "b"})  # now at version 2
    retry = await client.put(path, json={"name": "a"}, headers=stale)
    other = await call(client, "PUT", path, {"name": "c"}, **_headers(stale))

    assert (first.status, moved[0], retry.status) == (409, 200, 409)
    assert await retry.read() == first_bytes
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert (other[0], other[1]["error"]["code"]) == (422, "idempotency_conflict")
    assert [e.name for e in await stream(client, f"team-{team['id']}")] == [
        "platform",
        "b",
    ]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", CUSTOMERS, b'{"name": ""}', 400),
        ("POST", CUSTOMERS, b"{", 400),
        ("POST", TEAMS, b'{"name": "t", "customer_id": "%s"}' % MISSING.encode(), 400),
        ("PUT", f"{TEAMS}/{MISSING}", b'{"name": "t"}', 404),
        ("DELETE", f"{KEYS}/{MISSING}", b"", 404),
    ],
)
async def test_a_refused_request_with_a_key_is_answered_the_same_on_every_retry(
    client, method, path, body, status
):
    headers = {"Idempotency-Key": f"refused-{method}-{status}", **JSON_BODY}

    answers = [
        await client.request(method, path, data=body, headers=headers) for _ in range(2)
    ]
    other = await client.request(method, path, data=b'{"name": "x"}', headers=headers)

    assert [a.status for a in answers] == [status, status]
    assert await answers[1].read() == await answers[0].read()
    assert answers[1].headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in answers[0].headers
    assert other.status == (422 if body else status)
    assert await event_count(client) == 0


def _headers(headers: dict[str, str]) -> dict[str, str]:
    """Headers as `call` takes them (underscores for dashes)."""
    return {k.replace("-", "_"): v for k, v in headers.items()}


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\there", "é" * 256])
async def test_an_idempotency_key_that_is_not_1_to_255_printable_characters_is_400(
    client, key
):
    status, answer = await call(
        client, "POST", CUSTOMERS, {"name": "acme"}, Idempotency_Key=key
    )

    assert (status, answer["error"]["code"]) == (400, "invalid_request")
    assert await event_count(client) == 0


# --- no secret recoverable from a copy of the database ------------------------------


async def test_a_copy_of_the_database_alone_cannot_open_a_kept_answer(client):
    guessable = "1"
    answer = await client.post(
        KEYS, json={"name": "ci"}, headers={"Idempotency-Key": guessable}
    )
    secret = (await answer.json())["virtual_key"]["value"]
    [row] = await client.app[pool_key].fetch(
        "SELECT idempotency_key, status, body FROM command_results"
    )
    nonce, sealed = row["body"][:12], row["body"][12:]
    status = str(row["status"]).encode()

    # Everything a copy holds, and the key the client chose: nothing opens it.
    for info in (b"govledger command result", b"govledger command result v2"):
        guess = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
            guessable.encode()
        )
        with pytest.raises(InvalidTag):
            AESGCM(guess).decrypt(nonce, sealed, status)
    with pytest.raises(idempotency.AnswerUnreadable):
        idempotency.Sealer("another service's secret, 32 chars+").unseal(
            row["status"], row["body"]
        )
    assert secret.encode() not in row["body"]
    # The service's own secret opens it: that is what a retry gets.
    settings = client.app[settings_key]
    own = idempotency.sealer(settings.secret_key, settings.data_dir)
    assert secret.encode() in own.unseal(row["status"], row["body"])


async def test_a_replica_with_the_same_secret_replays_and_another_secret_is_loud(
    client, database
):
    headers = {"Idempotency-Key": "across"}
    first = await client.post(CUSTOMERS, json={"name": "acme"}, headers=headers)
    first_bytes = await first.read()
    settings = client.app[settings_key]

    async with TestClient(TestServer(create_app(settings, database))) as twin:
        again = await twin.post(CUSTOMERS, json={"name": "acme"}, headers=headers)
        again_bytes = await again.read()
    other = Settings(secret_key="a different secret of 32 characters")
    async with TestClient(TestServer(create_app(other, database))) as stranger:
        refused = await stranger.post(CUSTOMERS, json={"name": "acme"}, headers=headers)
        refused_body = await refused.json()

    assert (first.status, again.status, again_bytes) == (201, 201, first_bytes)
    assert refused.status == 500
    assert refused_body["error"]["code"] == "idempotency_answer_unreadable"
    assert await event_count(client) == 1


def test_without_a_configured_secret_a_key_file_is_made_once_for_the_owner_only(
    tmp_path,
):
    data_dir = str(tmp_path / "data")
    path = idempotency.key_file(data_dir)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        made = list(pool.map(idempotency._file_secret, [path] * 8))

    assert path == tmp_path / "data.secret-key"
    assert len(set(made)) == 1
    assert len(made[0]) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.secret-key"]
    sealed = idempotency.sealer(None, data_dir).seal(201, b"{}")
    assert idempotency.Sealer(made[0]).unseal(201, sealed) == b"{}"
    path.chmod(0o644)
    with pytest.raises(idempotency.SecretKeyError, match="chmod 600"):
        idempotency._file_secret(path)


def test_a_secret_key_shorter_than_32_characters_is_refused_at_start():
    with pytest.raises(ConfigError, match="GOVLEDGER_SECRET_KEY"):
        Settings.from_env({"GOVLEDGER_SECRET_KEY": "short"})
    assert Settings.from_env({"GOVLEDGER_SECRET_KEY": "s" * 32}).secret_key == "s" * 32
